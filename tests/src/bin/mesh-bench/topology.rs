//! The test beds: one two-pod topology per mode with its upstreams running, the scale topologies
//! with their holding clients, and the commands that run a tool inside a pod.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use nodemesh_tests::{
    bin,
    cgroup::join_on_exec,
    process::Proc,
    topology::{DaemonOpts, PodSpec, ServiceSpec, Topology},
};

use crate::Mode;

pub const HTTP_PORT: u16 = 8080;
pub const IPERF_PORT: u16 = 5201;
pub const ECHO_PORT: u16 = 7000;
/// The size of `bench-http`'s responses.
pub const RESPONSE_BYTES: usize = 1024;
/// Each scale client holds this many connections to its server…
pub const HOLD_CONNS: usize = 4;
/// …and sends 100 B on one of them this often.
pub const HOLD_EVERY_MS: u64 = 250;

/// One mode's topology with its upstreams running.
pub struct Bed {
    pub mode: Mode,
    pub t: Topology,
    pub server_ip: String,
    /// Where the HTTP scenarios send requests: the server pod (L4), or the service VIP with a
    /// route in force (L7 modes).
    pub http_addr: String,
}

/// The L7 modes' service in front of the server pod, and its route.
const SERVICE_VIP: &str = "10.96.0.50";
const ROUTE: &str = "\
httpRoutes:
  - name: bench
    namespace: demo
    spec:
      parentRefs: [{ kind: Service, name: server, port: 80 }]
      rules:
        - matches: [{ path: { type: PathPrefix, value: / } }]
          backendRefs: [{ name: server, port: 80 }]
";

/// A scale topology with its clients holding connections.
pub type ScaleBed = (Topology, Vec<Proc>);

/// The daemon's own defaults where the test topology speeds things up (bundle refresh).
fn defaults() -> DaemonOpts {
    DaemonOpts {
        bundle_refresh: "5s",
        ..DaemonOpts::default()
    }
}

pub fn build_bed(mode: Mode) -> Result<Bed, String> {
    let meshed = !mode.is_baseline();
    let server_node = if mode.same_node() { 0 } else { 1 };
    let pods = [
        PodSpec {
            meshed,
            ..PodSpec::meshed("client", 0, "client")
        },
        PodSpec {
            meshed,
            ..PodSpec::meshed("server", server_node, "server")
        },
    ];
    let services = if mode.is_l7() {
        vec![ServiceSpec::new(
            "server",
            SERVICE_VIP,
            80,
            HTTP_PORT,
            "server",
        )]
    } else {
        vec![]
    };
    let mut t = Topology::build(mode.tag(), 2, &pods, &services);
    match mode {
        Mode::Baseline | Mode::BaselineLocal => {}
        Mode::Sidecar | Mode::SidecarL7 => t.start(DaemonOpts {
            sidecar: true,
            ..defaults()
        }),
        Mode::Node | Mode::NodeLocal | Mode::NodeL7 => t.start(defaults()),
        Mode::NodeLocalSockmap => t.start(DaemonOpts {
            sockmap: true,
            ..defaults()
        }),
    }
    let server_ip = t.pod("server").ip.clone();
    let http_addr = if mode.is_l7() {
        t.rewrite_mesh_file(&format!("{}{ROUTE}", t.mesh_yaml(&pods, &services)));
        // The daemons read the file once a second.
        std::thread::sleep(Duration::from_secs(3));
        format!("{SERVICE_VIP}:80")
    } else {
        format!("{server_ip}:{HTTP_PORT}")
    };
    tune(&t);
    let upstreams: [(&str, Vec<String>, &str); 3] = [
        (
            "bench-http",
            vec![
                format!("{server_ip}:{HTTP_PORT}"),
                "--body".into(),
                RESPONSE_BYTES.to_string(),
            ],
            "listening",
        ),
        (
            "iperf3",
            vec![
                "-s".into(),
                // Without it iperf3 buffers stdout when it is not a terminal.
                "--forceflush".into(),
                "-B".into(),
                server_ip.clone(),
                "-p".into(),
                IPERF_PORT.to_string(),
            ],
            "Server listening",
        ),
        (
            "mesh-app",
            vec!["echo-server".into(), format!("{server_ip}:{ECHO_PORT}")],
            "listening",
        ),
    ];
    for (prog, args, ready) in upstreams {
        let path = if prog == "iperf3" {
            PathBuf::from("iperf3")
        } else {
            bin(prog)
        };
        let mut cmd = resident_in_pod(&t, "server", &path);
        cmd.args(&args);
        let mut p = Proc::spawn(&format!("{prog} in server"), cmd);
        p.wait_for(ready, Duration::from_secs(10));
        t.servers.push(p);
    }
    Ok(Bed {
        mode,
        t,
        server_ip,
        http_addr,
    })
}

/// Load generators reuse TIME_WAIT ports, and a per-node proxy reaching one pod from one mesh
/// source needs the same (bench/RESULTS.md: "one mesh source address per node"); applied to every
/// mode alike.
fn tune(t: &Topology) {
    let mut names: Vec<String> = t.nodes.iter().map(|n| n.ns.name().to_string()).collect();
    names.extend(t.pods.iter().map(|p| p.ns.name().to_string()));
    for ns in names {
        for sysctl in [
            "net.ipv4.tcp_tw_reuse=1",
            "net.ipv4.ip_local_port_range=10000 65000",
        ] {
            nodemesh_tests::sh("ip", &["netns", "exec", &ns, "sysctl", "-qw", sysctl]);
        }
    }
}

/// `prog` in pod `pod`: its network namespace and its cgroup (so the mesh captures it). A load
/// tool runs under `timeout` so a wedged one cannot hang the run; see [`resident_in_pod`].
pub fn in_pod(t: &Topology, pod: &str, prog: &Path) -> Command {
    let p = t.pod(pod);
    let mut c = Command::new("nsenter");
    c.arg(format!("--net={}", p.ns.path().display()))
        .args(["timeout", "--kill-after=5", "300"])
        .arg(prog);
    join_on_exec(&mut c, &p.cgroup);
    c
}

/// A long-lived process in pod `pod` (an upstream, a holding client): no time limit; it ends with
/// its topology's guard or its own `--secs`.
fn resident_in_pod(t: &Topology, pod: &str, prog: &Path) -> Command {
    let p = t.pod(pod);
    let mut c = Command::new("nsenter");
    c.arg(format!("--net={}", p.ns.path().display())).arg(prog);
    join_on_exec(&mut c, &p.cgroup);
    c
}

/// Every proxy of a topology: (node index, pid).
pub fn proxies(t: &Topology) -> Vec<(usize, u32)> {
    let mut v: Vec<(usize, u32)> = t
        .daemons
        .iter()
        .enumerate()
        .filter_map(|(i, d)| d.as_ref().map(|p| (i, p.pid())))
        .collect();
    v.extend(t.sidecars.iter().map(|(k, p)| (t.pods[*k].node, p.pid())));
    v
}

pub fn proxies_alive(bed: &mut Bed) -> Result<(), String> {
    for (i, d) in bed.t.daemons.iter_mut().enumerate() {
        if let Some(p) = d
            && p.has_exited()
        {
            return Err(format!("the node-{} daemon exited", i + 1));
        }
    }
    for (k, p) in bed.t.sidecars.iter_mut() {
        if p.has_exited() {
            return Err(format!("the sidecar of pod {} exited", bed.t.pods[*k].name));
        }
    }
    Ok(())
}

/// `n` client pods on node 1 and `n` server pods on node 2 in node or sidecar mode, an echo
/// server in each server pod, and each client holding [`HOLD_CONNS`] connections to its server
/// for `hold_secs` with a request every [`HOLD_EVERY_MS`].
pub fn scale_bed(mode: Mode, n: usize, hold_secs: u64) -> ScaleBed {
    let mut pods = Vec::new();
    for i in 0..n {
        pods.push(PodSpec::meshed(&format!("c{i}"), 0, "client"));
        pods.push(PodSpec::meshed(&format!("s{i}"), 1, "server"));
    }
    let tag = if mode == Mode::Sidecar { "ss" } else { "sn" };
    let mut t = Topology::build(tag, 2, &pods, &[]);
    t.start(DaemonOpts {
        sidecar: mode == Mode::Sidecar,
        ..defaults()
    });
    for i in 0..n {
        t.serve(&format!("s{i}"), "echo-server", ECHO_PORT);
    }
    let mut holders = Vec::new();
    for i in 0..n {
        let server = format!("{}:{ECHO_PORT}", t.pod(&format!("s{i}")).ip);
        let mut cmd = resident_in_pod(&t, &format!("c{i}"), &bin("mesh-app"));
        cmd.args(["hold", &server])
            .args(["--conns", &HOLD_CONNS.to_string()])
            .args(["--every-ms", &HOLD_EVERY_MS.to_string()])
            .args(["--secs", &hold_secs.to_string()]);
        holders.push(Proc::spawn(&format!("hold in c{i}"), cmd));
    }
    for h in &mut holders {
        h.wait_for(&held(), Duration::from_secs(30));
    }
    (t, holders)
}

/// What a holding client prints once it holds all its connections.
pub fn held() -> String {
    format!("held={HOLD_CONNS}")
}
