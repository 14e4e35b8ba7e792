//! N nodes and M pods on one machine: a network namespace per node and per pod, a bridge between
//! the nodes, a veth pair and a cgroup per pod, routes between the nodes' pod ranges, a mesh file
//! describing it all, and the real daemon running inside each node's namespace.
//!
//! Addresses: node `i` (1-based) is `10.203.0.i` on the node network and routes `10.210.i.0/24`
//! to its pods; its pods reach it through the gateway `10.210.i.1`, and its proxy talks to them
//! from its mesh source block `10.210.i.240/28` (a local route, so every address of it is the
//! node's). Service VIPs are `10.96.0.x`.
//!
//! Everything is a guard: dropping the [`Topology`] (also while a test panics) stops the
//! processes, removes the pinned links, the cgroups and every namespace.

use std::{
    fmt::Write as _,
    io::{Read, Write},
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use crate::{
    bin, cgroup::TestCgroup, footprint::Footprint, netns::Netns, process::Proc, sh, unique,
};

/// A pod to create.
#[derive(Clone, Debug)]
pub struct PodSpec {
    pub name: String,
    /// 0-based node index.
    pub node: usize,
    /// In the mesh file (captured and served by the mesh) or not.
    pub meshed: bool,
    pub labels: Vec<(String, String)>,
    pub probe_ports: Vec<u16>,
    /// Ports whose server reads a PROXY protocol v2 header (`proxyProtocolPorts`).
    pub proxy_protocol_ports: Vec<u16>,
}

impl PodSpec {
    pub fn meshed(name: &str, node: usize, app: &str) -> Self {
        Self {
            name: name.into(),
            node,
            meshed: true,
            labels: vec![("app".into(), app.into())],
            probe_ports: vec![],
            proxy_protocol_ports: vec![],
        }
    }

    pub fn plain(name: &str, node: usize) -> Self {
        Self {
            name: name.into(),
            node,
            meshed: false,
            labels: vec![],
            probe_ports: vec![],
            proxy_protocol_ports: vec![],
        }
    }

    pub fn probes(mut self, ports: &[u16]) -> Self {
        self.probe_ports = ports.to_vec();
        self
    }

    pub fn proxy_protocol(mut self, ports: &[u16]) -> Self {
        self.proxy_protocol_ports = ports.to_vec();
        self
    }
}

/// A service to declare: VIP, (port, target port), selected app label.
#[derive(Clone, Debug)]
pub struct ServiceSpec {
    pub name: String,
    pub vip: String,
    pub port: u16,
    pub target_port: u16,
    pub app: String,
    /// The port's `appProtocol` (None: detected).
    pub app_protocol: Option<&'static str>,
}

impl ServiceSpec {
    pub fn new(name: &str, vip: &str, port: u16, target_port: u16, app: &str) -> Self {
        Self {
            name: name.into(),
            vip: vip.into(),
            port,
            target_port,
            app: app.into(),
            app_protocol: None,
        }
    }

    pub fn app_protocol(mut self, p: &'static str) -> Self {
        self.app_protocol = Some(p);
        self
    }
}

pub struct Pod {
    pub name: String,
    pub node: usize,
    pub ip: String,
    pub cgroup: PathBuf,
    pub ns: Netns,
    pub meshed: bool,
}

pub struct Node {
    pub name: String,
    pub ip: String,
    pub mesh_source: String,
    pub ns: Netns,
}

/// How each node's daemon runs.
#[derive(Clone, Debug)]
pub struct DaemonOpts {
    pub inbound: &'static str,
    pub fail_open: bool,
    pub sockmap: bool,
    /// `--splice-window` (None: the daemon's default).
    pub splice_window: Option<&'static str>,
    /// SVID lifetime the CA issues (`--lifetime`).
    pub svid_lifetime: &'static str,
    /// `--bundle-refresh` (tests use 1 s so a rotation shows quickly; the daemon's default is 5 s).
    pub bundle_refresh: &'static str,
    /// Sidecar mode: every meshed pod is `mode: sidecar` and gets its own `mesh-daemon run
    /// --mode sidecar` in its namespace and cgroup; no node daemons run.
    pub sidecar: bool,
    /// `--drain-timeout` (None: the daemon's default, 30 s).
    pub drain_timeout: Option<&'static str>,
    /// `--handshake-timeout` (None: the daemon's default, 10 s).
    pub handshake_timeout: Option<&'static str>,
    /// `--access-log` for every daemon and sidecar, at [`Topology::access_log`].
    pub access_log: bool,
    /// `--discovery kube` with this kubeconfig for the daemons and the CA (TokenReview of each
    /// node's token file, which then holds its daemon pod's bound token), instead of the mesh
    /// file and bootstrap tokens.
    pub kubeconfig: Option<PathBuf>,
    /// The CA's kubeconfig when it differs from the daemons' (its own service account).
    pub ca_kubeconfig: Option<PathBuf>,
    /// Start node daemons under `prlimit --nofile=<soft>:<hard>` (a low soft limit, as many
    /// hosts and container runtimes give).
    pub nofile: Option<&'static str>,
}

impl Default for DaemonOpts {
    fn default() -> Self {
        Self {
            inbound: "permissive",
            fail_open: false,
            sockmap: false,
            splice_window: None,
            svid_lifetime: "24h",
            bundle_refresh: "1s",
            sidecar: false,
            drain_timeout: None,
            handshake_timeout: None,
            access_log: false,
            kubeconfig: None,
            ca_kubeconfig: None,
            nofile: None,
        }
    }
}

/// Where the CA listens, on the fabric (the "control plane" network every node reaches).
pub const CA_IP: &str = "10.203.0.250";

pub struct Topology {
    // Drop order matters: processes first, then pins, cgroups, namespaces.
    pub daemons: Vec<Option<Proc>>,
    /// Sidecar mode: (pod index, its sidecar).
    pub sidecars: Vec<(usize, Proc)>,
    pub ca: Option<Proc>,
    pub servers: Vec<Proc>,
    pins: PinGuard,
    pub pods: Vec<Pod>,
    pub cgroups: TestCgroup,
    pub nodes: Vec<Node>,
    pub fabric: Netns,
    pub mesh_file: PathBuf,
    pub opts: DaemonOpts,
    specs: (Vec<PodSpec>, Vec<ServiceSpec>),
    dir: TempDir,
}

struct PinGuard(PathBuf);

impl Drop for PinGuard {
    fn drop(&mut self) {
        let _ = mesh_daemon::ebpf::loader::uninstall(&self.0);
    }
}

struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub const GATEWAY_HOST: u8 = 1;
/// The first address of each node's mesh source block (`10.210.i.240/28`).
pub const MESH_SOURCE_HOST: u8 = 240;
/// The block's prefix length: 16 source addresses.
pub const MESH_SOURCE_PREFIX: u8 = 28;

/// Whether `ip` is in node `i`'s (1-based) mesh source block.
pub fn in_mesh_source(i: usize, ip: std::net::IpAddr) -> bool {
    match ip {
        std::net::IpAddr::V4(v4) => {
            let o = v4.octets();
            o[..3] == [10, 210, i as u8] && o[3] >= MESH_SOURCE_HOST
        }
        std::net::IpAddr::V6(_) => false,
    }
}

impl Topology {
    /// Builds `nodes` nodes, the pods and the mesh file; daemons are started by [`Self::start`].
    pub fn build(tag: &str, nodes: usize, pods: &[PodSpec], services: &[ServiceSpec]) -> Self {
        let base = unique(tag);
        let dir = std::env::temp_dir().join(format!("{base}-topology"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temp dir");
        let dir = TempDir(dir);
        let fabric = Netns::new(&format!("{base}f"));
        fabric.ip(&["link", "add", "br0", "type", "bridge"]);
        fabric.ip(&["link", "set", "br0", "up"]);
        fabric.ip(&["addr", "add", &format!("{CA_IP}/24"), "dev", "br0"]);
        let mut node_list = Vec::new();
        for i in 1..=nodes {
            let ns = Netns::new(&format!("{base}n{i}"));
            let ip = format!("10.203.0.{i}");
            let f_if = format!("f{i}");
            let tmp = format!("t{i}");
            fabric.ip(&["link", "add", &f_if, "type", "veth", "peer", "name", &tmp]);
            fabric.ip(&["link", "set", &tmp, "netns", ns.name()]);
            ns.ip(&["link", "set", &tmp, "name", "eth0"]);
            fabric.ip(&["link", "set", &f_if, "master", "br0", "up"]);
            ns.ip(&["addr", "add", &format!("{ip}/24"), "dev", "eth0"]);
            ns.ip(&["link", "set", "eth0", "up"]);
            let mesh_source = format!("10.210.{i}.{MESH_SOURCE_HOST}/{MESH_SOURCE_PREFIX}");
            ns.ip(&["route", "add", "local", &mesh_source, "dev", "lo"]);
            sh(
                "ip",
                &[
                    "netns",
                    "exec",
                    ns.name(),
                    "sysctl",
                    "-qw",
                    "net.ipv4.ip_forward=1",
                ],
            );
            node_list.push(Node {
                name: format!("node-{i}"),
                ip,
                mesh_source,
                ns,
            });
        }
        for (i, n) in node_list.iter().enumerate() {
            // The control plane reaches pods as a cluster's does (a sidecar talks to the CA
            // from its pod's address).
            fabric.ip(&[
                "route",
                "add",
                &format!("10.210.{}.0/24", i + 1),
                "via",
                &n.ip,
            ]);
            for j in 1..=nodes {
                if j != i + 1 {
                    n.ns.ip(&[
                        "route",
                        "add",
                        &format!("10.210.{j}.0/24"),
                        "via",
                        &format!("10.203.0.{j}"),
                    ]);
                }
            }
        }
        let mut cgroups = TestCgroup::new(&format!("{base}cg"));
        for i in 1..=nodes {
            cgroups.child(&format!("node-{i}"));
        }
        let mut pod_list = Vec::new();
        let mut next_host = vec![2u8; nodes];
        for (k, spec) in pods.iter().enumerate() {
            let n = &node_list[spec.node];
            let host = next_host[spec.node];
            next_host[spec.node] += 1;
            let ip = format!("10.210.{}.{host}", spec.node + 1);
            let gw = format!("10.210.{}.{GATEWAY_HOST}", spec.node + 1);
            let ns = Netns::new(&format!("{base}p{k}"));
            let v = format!("v{k}");
            let tmp = format!("p{k}");
            n.ns.ip(&["link", "add", &v, "type", "veth", "peer", "name", &tmp]);
            n.ns.ip(&["link", "set", &tmp, "netns", ns.name()]);
            ns.ip(&["link", "set", &tmp, "name", "eth0"]);
            n.ns.ip(&["addr", "add", &format!("{gw}/32"), "dev", &v]);
            n.ns.ip(&["link", "set", &v, "up"]);
            n.ns.ip(&["route", "add", &format!("{ip}/32"), "dev", &v]);
            ns.ip(&["addr", "add", &format!("{ip}/32"), "dev", "eth0"]);
            ns.ip(&["link", "set", "eth0", "up"]);
            ns.ip(&["route", "add", &gw, "dev", "eth0"]);
            ns.ip(&["route", "add", "default", "via", &gw]);
            // Each node has its own cgroup subtree, as each machine has its own hierarchy.
            let cgroup = cgroups.child(&format!(
                "node-{}/kubepods/burstable/pod-{}",
                spec.node + 1,
                spec.name
            ));
            pod_list.push(Pod {
                name: spec.name.clone(),
                node: spec.node,
                ip,
                cgroup,
                ns,
                meshed: spec.meshed,
            });
        }
        let mesh_file = dir.0.join("mesh.yaml");
        let topo = Self {
            daemons: (0..nodes).map(|_| None).collect(),
            sidecars: Vec::new(),
            ca: None,
            servers: Vec::new(),
            pins: PinGuard(PathBuf::from("/sys/fs/bpf").join(format!("{base}-pins"))),
            pods: pod_list,
            cgroups,
            nodes: node_list,
            fabric,
            mesh_file,
            opts: DaemonOpts::default(),
            specs: (pods.to_vec(), services.to_vec()),
            dir,
        };
        std::fs::write(&topo.mesh_file, topo.mesh_yaml(pods, services)).expect("write mesh file");
        // One bootstrap token per node, as an operator would hand them out.
        let mut tokens = String::new();
        for (i, n) in topo.nodes.iter().enumerate() {
            let token = format!(
                "{base}-{}-{:x}",
                n.name,
                std::process::id() as u64 * 7919 + i as u64
            );
            std::fs::write(topo.token_file(i), &token).expect("write token");
            let _ = writeln!(tokens, "{}: {token}", n.name);
        }
        std::fs::write(topo.dir.0.join("tokens.yaml"), tokens).expect("write tokens");
        topo
    }

    /// The mesh file for this topology.
    pub fn mesh_yaml(&self, pods: &[PodSpec], services: &[ServiceSpec]) -> String {
        let mut y = String::from("# written by nodemesh-tests' topology helper\nnodes:\n");
        for n in &self.nodes {
            let _ = writeln!(
                y,
                "  - name: {}\n    address: {}\n    meshSource: {}",
                n.name, n.ip, n.mesh_source
            );
        }
        y.push_str("workloads:\n");
        for (p, spec) in self.pods.iter().zip(pods).filter(|(p, _)| p.meshed) {
            let labels: Vec<String> = spec
                .labels
                .iter()
                .map(|(k, v)| format!("{k}: {v}"))
                .collect();
            let _ = writeln!(
                y,
                "  - name: {}\n    namespace: demo\n    serviceAccount: {}-sa\n    node: {}\n    \
                 ip: {}\n    cgroup: {}\n    labels: {{ {} }}\n    probePorts: {:?}\n    \
                 proxyProtocolPorts: {:?}\n    mode: {}",
                p.name,
                p.name,
                self.nodes[p.node].name,
                p.ip,
                p.cgroup.display(),
                labels.join(", "),
                spec.probe_ports,
                spec.proxy_protocol_ports,
                if self.opts.sidecar { "sidecar" } else { "node" }
            );
        }
        y.push_str("services:\n");
        for s in services {
            let _ = writeln!(
                y,
                "  - name: {}\n    namespace: demo\n    vip: {}\n    ports: [{{ port: {}, targetPort: {}{} }}]\n    selector: {{ app: {} }}",
                s.name,
                s.vip,
                s.port,
                s.target_port,
                s.app_protocol
                    .map(|p| format!(", appProtocol: {p}"))
                    .unwrap_or_default(),
                s.app
            );
        }
        y
    }

    pub fn pod(&self, name: &str) -> &Pod {
        self.pods
            .iter()
            .find(|p| p.name == name)
            .unwrap_or_else(|| panic!("no pod {name}"))
    }

    /// Node `i`'s cgroup subtree: its daemon attaches there.
    pub fn node_cgroup_root(&self, i: usize) -> PathBuf {
        self.cgroups.path().join(&self.nodes[i].name)
    }

    pub fn pin_dir(&self, node: usize) -> PathBuf {
        self.pins.0.join(&self.nodes[node].name)
    }

    /// What this topology's daemons and sidecars put in the kernel and is there now: programs
    /// attached under its cgroups or held by its pins, and their maps (by id; another daemon on
    /// the machine is not counted).
    pub fn footprint(&self) -> Footprint {
        Footprint::of(&[self.cgroups.path()], &[&self.pins.0])
    }

    /// `mesh-daemon uninstall` on every pin this topology's daemons left, then checks that the
    /// kernel holds none of the programs and maps they had, and the pin folder is empty. Call
    /// once no daemon runs.
    pub fn uninstall_and_check_nothing_is_left(&self) {
        let before = self.footprint();
        assert!(
            !before.progs.is_empty(),
            "nothing of this topology is in the kernel before the uninstall: checking it is gone \
             would prove nothing"
        );
        println!("{}", crate::uninstall(&self.pins.0));
        std::thread::sleep(Duration::from_millis(300));
        before.assert_gone("after uninstall");
        let pins = crate::footprint::pins_left(&self.pins.0);
        assert!(pins.is_empty(), "pins left after uninstall: {pins:?}");
        println!(
            "after uninstall: none of this topology's {} programs and {} maps is loaded, no pin \
             left",
            before.progs.len(),
            before.maps.len()
        );
    }

    /// Where pod `name`'s sidecar pins its fail-closed hooks.
    pub fn sidecar_pin_dir(&self, name: &str) -> PathBuf {
        self.pins.0.join(format!("sidecar-{name}"))
    }

    /// The CA's key folder (root, signer, bundle).
    pub fn ca_dir(&self) -> PathBuf {
        self.dir.0.join("ca")
    }

    /// Node `i`'s bootstrap token file.
    pub fn token_file(&self, i: usize) -> PathBuf {
        self.dir.0.join(format!("node-{}.token", i + 1))
    }

    /// The CA's URL as nodes reach it.
    pub fn ca_url(&self) -> String {
        format!("https://{CA_IP}:15012")
    }

    /// The CA command, as `start` runs it.
    pub fn ca_command(&self) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net={}", self.fabric.path().display()))
            .arg(bin("mesh-daemon"))
            .args(["ca", "serve", "--dir"])
            .arg(self.ca_dir())
            .args(["--listen", &format!("{CA_IP}:15012")])
            .args(["--metrics", &format!("{CA_IP}:15014")])
            .args(["--lifetime", self.opts.svid_lifetime]);
        match self
            .opts
            .ca_kubeconfig
            .as_ref()
            .or(self.opts.kubeconfig.as_ref())
        {
            Some(k) => c.args(["--discovery", "kube", "--kubeconfig"]).arg(k),
            None => c
                .arg("--tokens")
                .arg(self.dir.0.join("tokens.yaml"))
                .arg("--mesh-file")
                .arg(&self.mesh_file),
        };
        c.env(
            "NODEMESH_LOG",
            std::env::var("NODEMESH_LOG").unwrap_or_else(|_| "info".into()),
        );
        c
    }

    /// Starts the CA (once) and waits until it serves.
    pub fn start_ca(&mut self) {
        if self.ca.is_some() {
            return;
        }
        let mut p = Proc::spawn("mesh-daemon ca", self.ca_command());
        p.wait_for("CA ready", Duration::from_secs(30));
        self.ca = Some(p);
    }

    /// The CA's `/metrics`.
    pub fn scrape_ca(&self) -> String {
        http_get(&self.fabric, &format!("{CA_IP}:15014"), "/metrics")
    }

    /// [`Self::daemon_command`] with `flag`'s value replaced (a flag given twice is an error).
    pub fn daemon_command_with(&self, i: usize, flag: &str, value: &str) -> Command {
        let d = self.daemon_command(i);
        let mut c = Command::new(d.get_program());
        let mut args = d.get_args().peekable();
        let mut found = false;
        while let Some(a) = args.next() {
            c.arg(a);
            if a == flag {
                args.next();
                c.arg(value);
                found = true;
            }
        }
        assert!(found, "the daemon command has no {flag}");
        for (k, v) in d.get_envs() {
            match v {
                Some(v) => c.env(k, v),
                None => c.env_remove(k),
            };
        }
        c
    }

    /// The daemon command for node `i`, as `start` runs it (tests add or change flags).
    pub fn daemon_command(&self, i: usize) -> Command {
        let n = &self.nodes[i];
        let mut d = match self.opts.nofile {
            Some(limits) => {
                let mut c = Command::new("prlimit");
                c.arg(format!("--nofile={limits}")).arg("nsenter");
                c
            }
            None => Command::new("nsenter"),
        };
        // nsenter --net changes only the network namespace, so /sys (cgroup v2, bpffs) stays.
        d.arg(format!("--net={}", n.ns.path().display()))
            .arg(bin("mesh-daemon"))
            .arg("run")
            .args(["--node", &n.name]);
        match &self.opts.kubeconfig {
            Some(k) => d.args(["--discovery", "kube", "--kubeconfig"]).arg(k),
            None => d.arg("--mesh-file").arg(&self.mesh_file),
        };
        d.arg("--cgroup-root")
            .arg(self.node_cgroup_root(i))
            .arg("--pin-dir")
            .arg(self.pin_dir(i))
            .args(["--metrics", &format!("{}:15020", n.ip)]);
        self.common_run_args(&mut d, i);
        if self.opts.access_log {
            d.arg("--access-log").arg(self.access_log(&n.name));
        }
        d
    }

    /// The access log of node `name`'s daemon, or of pod `name`'s sidecar (with
    /// `DaemonOpts::access_log`).
    pub fn access_log(&self, name: &str) -> PathBuf {
        self.mesh_file.with_file_name(format!("access-{name}.log"))
    }

    /// The flags node daemons and sidecars share (on node `node`'s token).
    fn common_run_args(&self, d: &mut Command, node: usize) {
        d.args(["--inbound", self.opts.inbound])
            .args(["--sockmap", if self.opts.sockmap { "on" } else { "off" }])
            .args(["--ca", &self.ca_url()])
            .arg("--ca-bundle")
            .arg(self.ca_dir().join("bundle.pem"))
            .arg("--token-file")
            .arg(self.token_file(node))
            .args(["--bundle-refresh", self.opts.bundle_refresh])
            .env(
                "NODEMESH_LOG",
                std::env::var("NODEMESH_LOG").unwrap_or_else(|_| "info".into()),
            );
        if self.opts.fail_open {
            d.arg("--fail-open");
        }
        if let Some(w) = self.opts.splice_window {
            d.args(["--splice-window", w]);
        }
        if let Some(t) = self.opts.drain_timeout {
            d.args(["--drain-timeout", t]);
        }
        if let Some(t) = self.opts.handshake_timeout {
            d.args(["--handshake-timeout", t]);
        }
    }

    /// Starts the CA and every node's daemon (or, with `opts.sidecar`, every meshed pod's
    /// sidecar), and waits until each is ready.
    pub fn start(&mut self, opts: DaemonOpts) {
        self.opts = opts;
        if self.opts.sidecar {
            let yaml = self.mesh_yaml(&self.specs.0, &self.specs.1);
            std::fs::write(&self.mesh_file, yaml).expect("write mesh file");
        }
        self.start_ca();
        if self.opts.sidecar {
            let meshed: Vec<usize> = (0..self.pods.len())
                .filter(|&k| self.pods[k].meshed)
                .collect();
            // Start them all, then wait: each one's start-up (program loads, first SVID) is
            // independent of the others'.
            let mut started = Vec::new();
            for k in meshed {
                let name = format!("sidecar of {}", self.pods[k].name);
                started.push((k, Proc::spawn(&name, self.sidecar_command(k))));
            }
            for (k, mut p) in started {
                p.wait_for("ready", Duration::from_secs(60));
                self.sidecars.push((k, p));
                let pod = self.pods[k].name.clone();
                let got = wait_sample(
                    || self.scrape_pod(&pod),
                    "nodemesh_svid_fetches_total",
                    &[("result", "issued")],
                    1,
                );
                if got < 1 {
                    let log = self.sidecars.last_mut().map(|(_, p)| p.output());
                    panic!(
                        "the sidecar of {pod} holds no SVID after 5 s:\n{}",
                        log.unwrap_or_default()
                    );
                }
            }
            return;
        }
        for i in 0..self.nodes.len() {
            self.start_daemon(i);
        }
    }

    /// The sidecar command for pod `k`: `mesh-daemon run --mode sidecar` in the pod's network
    /// namespace *and* cgroup (it lives inside the pod; its own sockets carry the proxy mark).
    pub fn sidecar_command(&self, k: usize) -> Command {
        let p = &self.pods[k];
        let mut d = Command::new("nsenter");
        d.arg(format!("--net={}", p.ns.path().display()))
            .arg(bin("mesh-daemon"))
            .args(["run", "--mode", "sidecar"])
            .args(["--workload", &format!("demo/{}", p.name)])
            .arg("--mesh-file")
            .arg(&self.mesh_file)
            .arg("--cgroup-root")
            .arg(&p.cgroup)
            .arg("--pin-dir")
            .arg(self.sidecar_pin_dir(&p.name))
            .args(["--metrics", &format!("{}:15020", p.ip)]);
        self.common_run_args(&mut d, p.node);
        if self.opts.access_log {
            d.arg("--access-log").arg(self.access_log(&p.name));
        }
        crate::cgroup::join_on_exec(&mut d, &p.cgroup);
        d
    }

    /// Pod `name`'s sidecar.
    pub fn sidecar(&mut self, pod: &str) -> &mut Proc {
        let k = self
            .pods
            .iter()
            .position(|p| p.name == pod)
            .unwrap_or_else(|| panic!("no pod {pod}"));
        self.sidecars
            .iter_mut()
            .find(|(i, _)| *i == k)
            .map(|(_, p)| p)
            .unwrap_or_else(|| panic!("pod {pod} has no sidecar"))
    }

    /// Pod `name`'s sidecar's `/metrics`, fetched from inside the pod.
    pub fn scrape_pod(&self, name: &str) -> String {
        let p = self.pod(name);
        http_get(&p.ns, &format!("{}:15020", p.ip), "/metrics")
    }

    /// [`Self::wait_metric`] for pod `name`'s sidecar.
    pub fn wait_pod_metric(
        &self,
        name: &str,
        metric: &str,
        labels: &[(&str, &str)],
        at_least: u64,
    ) -> u64 {
        wait_sample(|| self.scrape_pod(name), metric, labels, at_least)
    }

    pub fn start_daemon(&mut self, i: usize) {
        let mut p = Proc::spawn(
            &format!("mesh-daemon {}", self.nodes[i].name),
            self.daemon_command(i),
        );
        p.wait_for("ready", Duration::from_secs(30));
        self.daemons[i] = Some(p);
        // Ready to serve means holding an SVID for every identity with a pod on the node (one
        // per meshed pod here: each has its own service account).
        let pods = self.pods.iter().filter(|p| p.meshed && p.node == i).count() as u64;
        let got = self.wait_metric(
            i,
            "nodemesh_svid_fetches_total",
            &[("result", "issued")],
            pods,
        );
        assert!(
            got >= pods,
            "node {i} holds {got} SVIDs after 5 s, expected {pods}"
        );
    }

    pub fn daemon(&mut self, i: usize) -> &mut Proc {
        self.daemons[i].as_mut().expect("daemon running")
    }

    /// Kills node `i`'s daemon with SIGKILL (a crash: nothing is cleaned up).
    pub fn crash_daemon(&mut self, i: usize) {
        if let Some(mut p) = self.daemons[i].take() {
            // SAFETY: kill on a child pid we own.
            unsafe { libc::kill(p.pid() as i32, libc::SIGKILL) };
            p.terminate(Duration::from_secs(5));
        }
    }

    /// Starts a mesh-app server (`echo-server`, `count-server`, `rst-server`) in a pod.
    pub fn serve(&mut self, pod: &str, kind: &str, port: u16) -> usize {
        self.serve_with(pod, kind, port, &[])
    }

    /// [`Self::serve`] with the server's own flags (e.g. `sink-server --delay-ms`).
    pub fn serve_with(&mut self, pod: &str, kind: &str, port: u16, args: &[&str]) -> usize {
        let p = self.pod(pod);
        let mut cmd = Command::new(bin("mesh-app"));
        cmd.arg("--cgroup")
            .arg(&p.cgroup)
            .args(["--netns", p.ns.name(), kind])
            .arg(format!("{}:{port}", p.ip))
            .args(args);
        let mut proc = Proc::spawn(&format!("{kind} in {pod}"), cmd);
        proc.wait_for("listening", Duration::from_secs(5));
        self.servers.push(proc);
        self.servers.len() - 1
    }

    /// Starts `mesh-app connect <addr> <args>` in a pod without waiting for it (a connection that
    /// must be in flight while something else happens); its result line is in its output.
    pub fn connect_in_background(&self, pod: &str, addr: &str, args: &[&str]) -> Proc {
        let mut a = vec!["connect", addr];
        a.extend_from_slice(args);
        self.app_in_background(pod, &a)
    }

    /// Runs `mesh-app <args>` in a pod without waiting for it.
    pub fn app_in_background(&self, pod: &str, args: &[&str]) -> Proc {
        let p = self.pod(pod);
        let mut cmd = Command::new(bin("mesh-app"));
        cmd.arg("--cgroup")
            .arg(&p.cgroup)
            .args(["--netns", p.ns.name()])
            .args(args);
        Proc::spawn(&format!("mesh-app {} in {pod}", args.join(" ")), cmd)
    }

    /// Sends SIGTERM to node `i`'s daemon and returns at once (it drains; see
    /// [`Proc::wait_exit`]).
    pub fn sigterm_daemon(&mut self, i: usize) {
        self.daemon(i).signal(libc::SIGTERM);
    }

    /// Takes node `i`'s daemon out of the topology once it has exited (so it can be started
    /// again), returning it for its output.
    pub fn take_daemon(&mut self, i: usize) -> Proc {
        self.daemons[i].take().expect("daemon running")
    }

    /// Runs `mesh-app connect <addr> <args>` in a pod; returns (success, output line).
    pub fn connect(&self, pod: &str, addr: &str, args: &[&str]) -> (bool, String) {
        let p = self.pod(pod);
        let mut a = vec!["connect", addr];
        a.extend_from_slice(args);
        let out = crate::mesh_app(&p.cgroup, p.ns.name(), &a);
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).trim().to_string(),
        )
    }

    /// Runs curl in a pod with `args` (URLs, options), one line per response; returns how many
    /// responses each server gave (its `x-served-by`), or `status <code>` for the others.
    pub fn curl_by_server(
        &self,
        pod: &str,
        args: &[&str],
    ) -> std::collections::HashMap<String, u32> {
        let p = self.pod(pod);
        let mut a = vec![
            "exec",
            "--",
            "curl",
            "-s",
            "-o",
            "/dev/null",
            "--max-time",
            "60",
        ];
        a.extend_from_slice(&["-w", "%{http_code} %header{x-served-by}\\n"]);
        a.extend_from_slice(args);
        let out = crate::mesh_app(&p.cgroup, p.ns.name(), &a);
        let text = String::from_utf8_lossy(&out.stdout);
        let errors = String::from_utf8_lossy(&out.stderr);
        if !errors.is_empty() {
            println!(
                "curl: {}",
                errors.lines().take(5).collect::<Vec<_>>().join("\n      ")
            );
        }
        let mut by = std::collections::HashMap::new();
        for line in text.lines() {
            let (code, who) = line.split_once(' ').unwrap_or((line, ""));
            let key = if code == "200" {
                who.to_string()
            } else {
                format!("status {code}")
            };
            *by.entry(key).or_insert(0) += 1;
        }
        by
    }

    /// node `i`'s `/metrics`, fetched from inside its namespace.
    pub fn scrape(&self, i: usize) -> String {
        http_get(
            &self.nodes[i].ns,
            &format!("{}:15020", self.nodes[i].ip),
            "/metrics",
        )
    }

    /// node `i`'s `/ready` (the whole response), fetched from inside its namespace.
    pub fn ready(&self, i: usize) -> String {
        http_get(
            &self.nodes[i].ns,
            &format!("{}:15021", self.nodes[i].ip),
            "/ready",
        )
    }

    /// The value of one sample in node `i`'s metrics (0 when absent): `name` plus every
    /// `label="value"` in `labels` must match.
    pub fn metric(&self, i: usize, name: &str, labels: &[(&str, &str)]) -> u64 {
        sample(&self.scrape(i), name, labels)
    }

    /// Waits (up to 5 s) until a sample reaches `at_least` — kernel counters are published once a
    /// second and a connection's bytes when it ends — and returns its last value.
    pub fn wait_metric(&self, i: usize, name: &str, labels: &[(&str, &str)], at_least: u64) -> u64 {
        wait_sample(|| self.scrape(i), name, labels, at_least)
    }

    pub fn rewrite_mesh_file(&self, text: &str) {
        // Write then rename, as a config management tool would, so the daemon never reads half.
        let tmp = self.mesh_file.with_extension("tmp");
        std::fs::write(&tmp, text).expect("write mesh file");
        std::fs::rename(&tmp, &self.mesh_file).expect("rename mesh file");
    }

    pub fn mesh_file_path(&self) -> &Path {
        &self.mesh_file
    }
}

/// A plain HTTP/1.0 GET from inside a namespace; returns the whole response.
pub fn http_get(ns: &Netns, addr: &str, path: &str) -> String {
    http_request(ns, addr, &format!("GET {path}"))
}

/// An HTTP/1.0 request (`"<METHOD> <path>"`) from inside a namespace; returns the whole response.
pub fn http_request(ns: &Netns, addr: &str, request_line: &str) -> String {
    try_http_request(ns, addr, request_line)
        .unwrap_or_else(|e| panic!("HTTP {request_line} to {addr}: {e}"))
}

/// [`http_request`], or why it got no response (nothing listening yet, for instance).
pub fn try_http_request(ns: &Netns, addr: &str, request_line: &str) -> std::io::Result<String> {
    let addr = addr.to_string();
    let req = format!("{request_line} HTTP/1.0\r\nHost: x\r\n\r\n");
    ns.run(move || {
        let mut s = std::net::TcpStream::connect(&addr)?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        s.write_all(req.as_bytes())?;
        let mut body = String::new();
        s.read_to_string(&mut body)?;
        Ok(body)
    })
    .join()
    .expect("HTTP request thread")
}

/// Waits (up to 5 s) until the sample `name`/`labels` in what `scrape` returns reaches
/// `at_least`; returns its last value.
pub fn wait_sample(
    scrape: impl Fn() -> String,
    name: &str,
    labels: &[(&str, &str)],
    at_least: u64,
) -> u64 {
    let start = std::time::Instant::now();
    loop {
        let v = sample(&scrape(), name, labels);
        if v >= at_least || start.elapsed() > Duration::from_secs(5) {
            return v;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Sums the samples of family `name` whose labels include all of `labels`.
pub fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> u64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.split(['{', ' ']).next().is_some_and(|n| n == name))
        .filter(|l| {
            labels
                .iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .map(|v| v as u64)
        .sum()
}
