//! `mesh-daemon run`'s configuration: the command line ([`RunArgs`], each flag with an env
//! fallback) becomes one validated [`Config`] before anything binds or attaches. Contradictions
//! between flags are refused naming both; defaults that depend on the mesh file (a node's
//! addresses, a sidecar's pod) are resolved here. The `Config` is also what `/config_dump` shows,
//! as it is (ztunnel's `config.rs` is the model).

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4},
    path::PathBuf,
    time::Duration,
};

use serde::Serialize;

use crate::{
    identity,
    state::{
        HBONE_PORT, SIDECAR_MESH_SOURCE, Scope,
        desired::{Desired, MeshSource, NodeSpec},
    },
};

/// Default folder for pinned links (one sub-folder per node name).
pub const PIN_ROOT: &str = "/sys/fs/bpf/nodemesh";
/// The outbound capture listener's port.
pub const OUTBOUND_PORT: u16 = 15001;
/// The first of the outbound listener's further ports (`--outbound-spread`).
pub const OUTBOUND_SPREAD_PORT: u16 = 15100;
/// The most further outbound ports.
pub const MAX_OUTBOUND_SPREAD: u16 = 64;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    /// Two flags that cannot both hold (or one that the other requires).
    #[error("{0}")]
    Conflict(String),
    /// The mesh file does not place this daemon.
    #[error("{0}")]
    Placement(String),
}

/// `mesh-daemon run`'s flags.
#[derive(clap::Args, Debug, Clone)]
pub struct RunArgs {
    /// `node`: one daemon per node serves the node's node-mode pods. `sidecar`: one daemon inside
    /// one pod's network namespace serves only that pod (--workload), with the same hooks and code.
    #[arg(long, env = "NODEMESH_MODE", value_enum, default_value = "node")]
    pub mode: RunMode,
    /// This node's name in the mesh file (node mode; a sidecar's node is its pod's).
    #[arg(long, env = "NODEMESH_NODE")]
    pub node: Option<String>,
    /// Sidecar mode: the pod this sidecar serves, as namespace/name in the mesh file.
    #[arg(long, env = "NODEMESH_WORKLOAD")]
    pub workload: Option<String>,
    /// Where the mesh's state comes from: `file` (the mesh file, --mesh-file) or `kube` (the
    /// Kubernetes API server: Pods, Namespaces, Services, EndpointSlices, routes, policies).
    #[arg(long, env = "NODEMESH_DISCOVERY", value_enum, default_value = "file")]
    pub discovery: Discovery,
    /// The mesh file (nodes, workloads, services); reloaded when it changes. `--discovery file`.
    #[arg(long, env = "NODEMESH_MESH_FILE")]
    pub mesh_file: Option<PathBuf>,
    /// `--discovery kube`: the kubeconfig to reach the API server with. Default: the pod's
    /// service account in a cluster, else $KUBECONFIG or ~/.kube/config.
    #[arg(long, env = "NODEMESH_KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,
    /// cgroup v2 folder to attach the hooks under; every enrolled pod cgroup must be below it.
    /// Default: the cgroup v2 mount found in /proc/mounts.
    #[arg(long, env = "NODEMESH_CGROUP_ROOT")]
    pub cgroup_root: Option<PathBuf>,
    /// Outbound capture listener, as pods reach it. Default: the node's address (a sidecar:
    /// 127.0.0.1), port 15001.
    #[arg(long, env = "NODEMESH_OUTBOUND")]
    pub outbound: Option<SocketAddrV4>,
    /// More outbound ports on that address, from 15100 (0: only the one): a captured connection
    /// goes to the one its destination hashes to, so one pod's new connections to different
    /// destinations do not all share one (pod, proxy port) pair and its TIME_WAIT limit (about
    /// 470 a second). A sidecar uses none (its loopback reuses TIME_WAIT ports).
    #[arg(long, env = "NODEMESH_OUTBOUND_SPREAD", default_value_t = 16)]
    pub outbound_spread: u16,
    /// HBONE listener for other proxies. Default: the node's address (a sidecar: its pod's),
    /// port 15008.
    #[arg(long, env = "NODEMESH_HBONE")]
    pub hbone: Option<SocketAddr>,
    /// Prometheus endpoint (`/metrics`).
    #[arg(long, env = "NODEMESH_METRICS", default_value = "0.0.0.0:15020")]
    pub metrics: SocketAddr,
    /// Health endpoint (`/live`, `/ready`).
    #[arg(long, env = "NODEMESH_HEALTH", default_value = "0.0.0.0:15021")]
    pub health: SocketAddr,
    /// Admin endpoint (`/config_dump`, `/logging`, `/debug/ebpf`, `/tap`); loopback only.
    #[arg(long, env = "NODEMESH_ADMIN", default_value = "127.0.0.1:15000")]
    pub admin: SocketAddr,
    /// The operator port: `/tap`, `/config_dump`, `/logging`, `/debug/ebpf`, `/metrics` and
    /// `/ready` over mutual TLS, served only to operator certificates (`mesh-daemon ca
    /// issue-operator`; `meshctl --operator <dir> … https://<node>`), so nobody needs a shell on
    /// the node. Default: the node's address, port 15010 (a sidecar: off). `off` disables it.
    #[arg(long, env = "NODEMESH_OPERATOR", value_parser = parse_operator)]
    pub operator: Option<Listen>,
    /// What the kernel captures from enrolled pods: `mesh` (the default) only connections to
    /// the mesh's destinations — service VIPs on their ports and meshed pods — so any other
    /// connection keeps the app's exact semantics (its own timeouts, "connection refused", its own
    /// source address, native IPv6); `all` every TCP connection, for egress metrics and policy on
    /// all traffic (others are relayed as passthrough, see ARCHITECTURE.md for what differs).
    #[arg(long, env = "NODEMESH_CAPTURE", value_enum, default_value = "mesh")]
    pub capture: CaptureMode,
    /// Inbound enforcement for enrolled pods: `strict` accepts TCP only from the mesh (plus each
    /// pod's probePorts); `permissive` also accepts plaintext, and counts it.
    #[arg(
        long,
        env = "NODEMESH_INBOUND",
        value_enum,
        default_value = "permissive"
    )]
    pub inbound: InboundMode,
    /// Let enrolled pods' connections go direct (unmeshed) while no daemon runs, instead of
    /// failing them. Without it every kind of stop (crash, SIGTERM, upgrade) fails closed until a
    /// daemon is back or `mesh-daemon uninstall` runs.
    #[arg(long, env = "NODEMESH_FAIL_OPEN")]
    pub fail_open: bool,
    /// Where the fail-closed links are pinned. Default: /sys/fs/bpf/nodemesh/<node> (a sidecar:
    /// /sys/fs/bpf/nodemesh/sidecar.<namespace>.<name>). Unused with --fail-open.
    #[arg(long, env = "NODEMESH_PIN_DIR")]
    pub pin_dir: Option<PathBuf>,
    /// SO_MARK put on the proxy's own sockets so the hooks never capture them.
    #[arg(long, env = "NODEMESH_PROXY_MARK", default_value_t = 0x4e4d)]
    pub proxy_mark: u32,
    /// The CA, as `https://<ip or DNS name>[:port]`. Every inter-node connection is mTLS with
    /// SVIDs from it.
    #[arg(long, env = "NODEMESH_CA")]
    pub ca: String,
    /// Roots to trust the CA with at start (the CA's bundle.pem); the CA's own bundle replaces
    /// them once it answers.
    #[arg(long, env = "NODEMESH_CA_BUNDLE")]
    pub ca_bundle: PathBuf,
    /// File holding this node's bootstrap token for the CA.
    #[arg(long, env = "NODEMESH_TOKEN_FILE")]
    pub token_file: PathBuf,
    /// SPIFFE trust domain.
    #[arg(long, env = "NODEMESH_TRUST_DOMAIN", default_value = identity::DEFAULT_TRUST_DOMAIN)]
    pub trust_domain: String,
    /// How often the trust bundle is refreshed from the CA (a root rotation reaches this node
    /// within it).
    #[arg(long, env = "NODEMESH_BUNDLE_REFRESH", default_value = "5s", value_parser = identity::parse_duration)]
    pub bundle_refresh: Duration,
    /// Same-node fast path: the proxy's two sockets of a connection between pods of this node are
    /// spliced in the kernel (sk_skb verdict on a SOCKHASH), so the bytes skip user space. Pod
    /// sockets never enter a socket map. Sidecars and cross-node traffic always relay (mTLS).
    #[arg(long, env = "NODEMESH_SOCKMAP", value_enum, default_value = "off")]
    pub sockmap: OnOff,
    /// With --sockmap on: bytes the kernel may hold for one direction of a spliced connection
    /// whose receiver is slower than its sender, before the splice pauses and TCP pushes back on
    /// the sender (as with the user-space relay). Bigger: fewer pauses in bulk transfers;
    /// smaller: less kernel memory per connection. Bytes, or with a KiB/MiB suffix.
    #[arg(long, env = "NODEMESH_SPLICE_WINDOW", default_value = "4MiB", value_parser = parse_size)]
    pub splice_window: u64,
    /// On SIGTERM: stop accepting, and let connections in flight finish for up to this long
    /// (HBONE peers get GOAWAY); those still open then are reset. A second signal ends the drain
    /// at once. Kubernetes' terminationGracePeriodSeconds should exceed it.
    #[arg(long, env = "NODEMESH_DRAIN_TIMEOUT", default_value = "30s", value_parser = identity::parse_duration)]
    pub drain_timeout: Duration,
    /// L7 on service ports: HTTP/1.1 and HTTP/2 (gRPC) connections are served per request
    /// (routes, per-request balancing, request metrics); other protocols stay L4. Off: every
    /// connection is relayed as bytes.
    #[arg(long, env = "NODEMESH_L7", value_enum, default_value = "on")]
    pub l7: OnOff,
    /// How long protocol detection waits for a client's first bytes on a service port without
    /// `appProtocol`. The upstream is connected in parallel after 5 ms, so a server that speaks
    /// first (MySQL, SMTP) is never held back; a client silent for this long is relayed as TCP.
    #[arg(long, env = "NODEMESH_DETECT_TIMEOUT", default_value = "100ms", value_parser = identity::parse_duration)]
    pub detect_timeout: Duration,
    /// How long an inbound HBONE connection may take to finish its mTLS handshake and send its
    /// HTTP/2 preface; one that is slower (a client that opens and never speaks) is closed and
    /// counted as `tls_handshakes_total{result="timeout"}`. What a half-open connection can hold
    /// (a socket and a small task) is bounded by this time.
    #[arg(long, env = "NODEMESH_HANDSHAKE_TIMEOUT", default_value = "10s", value_parser = identity::parse_duration)]
    pub handshake_timeout: Duration,
    /// A JSON access log: one line per L7 request (the fields `/tap` shows), to this file, or to
    /// standard output with `-`. Written off the data path: when the disk falls behind, lines are
    /// dropped and counted (`nodemesh_access_log_dropped_total`), requests never wait.
    #[arg(long, env = "NODEMESH_ACCESS_LOG", value_name = "PATH|-")]
    pub access_log: Option<PathBuf>,
}

/// The operator port's default port.
pub const OPERATOR_PORT: u16 = 15010;

/// A listener that can be switched off.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Listen {
    Off,
    At(SocketAddr),
}

/// `off`, or an address (`10.0.0.1:15010`).
pub fn parse_operator(s: &str) -> Result<Listen, String> {
    if s.trim() == "off" {
        return Ok(Listen::Off);
    }
    s.trim().parse().map(Listen::At).map_err(|_| {
        format!(
            "{s:?} is neither `off` nor an address with its port (e.g. 10.0.0.1:{OPERATOR_PORT})"
        )
    })
}

/// `4096`, `64KiB`, `4MiB`: a size in bytes (at least 16 KiB, at most 1 GiB).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let (num, unit) = match t.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => t.split_at(i),
        None => (t, ""),
    };
    let mult = match unit.trim() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        other => {
            return Err(format!(
                "unknown unit {other:?} in {s:?}; use bytes, KiB or MiB"
            ));
        }
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size; write e.g. 4MiB or 65536"))?;
    let v = n.saturating_mul(mult);
    if !(16 << 10..=1 << 30).contains(&v) {
        return Err(format!("{s:?} is out of range; use 16KiB to 1024MiB"));
    }
    Ok(v)
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum OnOff {
    On,
    Off,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RunMode {
    Node,
    Sidecar,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CaptureMode {
    Mesh,
    All,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum InboundMode {
    Strict,
    Permissive,
}

/// The daemon's configuration, validated and with every default resolved: what runs, and what
/// `/config_dump` shows. Every `run` flag has a field of the same name (camelCase in the dump).
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Config {
    pub mode: RunMode,
    /// The node this daemon runs on (a sidecar: its pod's).
    pub node: String,
    pub workload: Option<String>,
    pub discovery: Discovery,
    pub mesh_file: Option<PathBuf>,
    pub kubeconfig: Option<PathBuf>,
    pub cgroup_root: PathBuf,
    pub outbound: SocketAddrV4,
    /// The outbound listener's further ports (empty: none).
    pub outbound_spread: std::ops::Range<u16>,
    pub hbone: SocketAddr,
    pub metrics: SocketAddr,
    pub health: SocketAddr,
    pub admin: SocketAddr,
    /// None: off.
    pub operator: Option<SocketAddr>,
    pub capture: CaptureMode,
    pub inbound: InboundMode,
    pub fail_open: bool,
    /// Where this daemon pins its fail-closed links; none with --fail-open.
    pub pin_dir: Option<PathBuf>,
    pub proxy_mark: u32,
    pub ca: String,
    pub ca_bundle: PathBuf,
    pub token_file: PathBuf,
    pub trust_domain: String,
    #[serde(serialize_with = "seconds")]
    pub bundle_refresh: Duration,
    pub sockmap: OnOff,
    pub splice_window: u64,
    #[serde(serialize_with = "seconds")]
    pub drain_timeout: Duration,
    pub l7: OnOff,
    #[serde(serialize_with = "seconds")]
    pub detect_timeout: Duration,
    #[serde(serialize_with = "seconds")]
    pub handshake_timeout: Duration,
    pub access_log: Option<PathBuf>,
    /// Derived: where local pods are reached from (the node's meshSource; a sidecar: 127.0.0.6).
    pub mesh_source: MeshSource,
    /// Derived: which workloads this daemon serves.
    #[serde(skip)]
    pub scope: Scope,
    /// The node's entry in the mesh file.
    #[serde(skip)]
    pub node_spec: NodeSpec,
}

fn seconds<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64())
}

impl RunArgs {
    /// The checks that need nothing but the flags; run before any file is read.
    pub fn check(&self) -> Result<(), ConfigError> {
        let conflict = |m: String| Err(ConfigError::Conflict(m));
        match self.mode {
            RunMode::Node if self.node.is_none() => {
                return conflict(
                    "--mode node needs --node (this node's name in the mesh file)".into(),
                );
            }
            RunMode::Node if self.workload.is_some() => {
                return conflict(
                    "--workload is only for --mode sidecar; drop it, or pass --mode sidecar".into(),
                );
            }
            RunMode::Sidecar if self.workload.is_none() => {
                return conflict(
                    "--mode sidecar needs --workload <namespace>/<name> (the pod it serves)".into(),
                );
            }
            _ => {}
        }
        match self.discovery {
            Discovery::File if self.mesh_file.is_none() => {
                return conflict(
                    "--discovery file needs --mesh-file (or pass --discovery kube to read \
                     Kubernetes)"
                        .into(),
                );
            }
            Discovery::File if self.kubeconfig.is_some() => {
                return conflict(
                    "--kubeconfig is only for --discovery kube; drop it, or pass --discovery kube"
                        .into(),
                );
            }
            Discovery::Kube if self.mode == RunMode::Sidecar => {
                return conflict(
                    "--discovery kube is for node daemons; a sidecar reads the mesh file \
                     (--discovery file), there is no sidecar injector for Kubernetes"
                        .into(),
                );
            }
            Discovery::Kube if self.mesh_file.is_some() => {
                return conflict(
                    "--mesh-file is only for --discovery file; with --discovery kube the state \
                     comes from the API server"
                        .into(),
                );
            }
            _ => {}
        }
        if !self.admin.ip().is_loopback() {
            return conflict(format!(
                "--admin {} is not a loopback address; the admin port must stay on the node \
                 (127.0.0.1)",
                self.admin
            ));
        }
        if self.detect_timeout.is_zero() || self.detect_timeout > Duration::from_secs(10) {
            return conflict(format!(
                "--detect-timeout {:?} must be above 0 and at most 10s; clients that are silent \
                 longer are relayed as TCP (set appProtocol on the service port to skip detection)",
                self.detect_timeout
            ));
        }
        if self.handshake_timeout.is_zero() || self.handshake_timeout > Duration::from_secs(60) {
            return conflict(format!(
                "--handshake-timeout {:?} must be above 0 and at most 60s; a peer that takes longer \
                 to handshake holds a socket for nothing",
                self.handshake_timeout
            ));
        }
        if self.drain_timeout > Duration::from_secs(3600) {
            return conflict(format!(
                "--drain-timeout {:?} is longer than an hour; no orchestrator waits that long",
                self.drain_timeout
            ));
        }
        // The listeners given explicitly must not collide; defaults are checked in `resolve`.
        let explicit = [
            ("--outbound", self.outbound.map(SocketAddr::V4)),
            ("--hbone", self.hbone),
            ("--metrics", Some(self.metrics)),
            ("--health", Some(self.health)),
            ("--admin", Some(self.admin)),
            ("--operator", self.operator_addr()),
        ];
        listeners_apart(&explicit)
    }

    /// The whole configuration: `check`, then defaults from the mesh file, then the checks that
    /// need them. `cgroup_root` is the resolved attach root.
    pub fn resolve(self, file: &Desired, cgroup_root: PathBuf) -> Result<Config, ConfigError> {
        self.check()?;
        let placed = |m: String| ConfigError::Placement(m);
        let node_named = |name: &str| {
            file.nodes
                .iter()
                .find(|n| n.name == name)
                .cloned()
                .ok_or_else(|| {
                    placed(format!(
                        "node {name:?} is not in {}; pass --node with a name from its `nodes`",
                        self.source_name()
                    ))
                })
        };
        let (scope, node_spec, outbound, hbone, mesh_source, pin_dir, operator) = match self.mode {
            RunMode::Node => {
                let name = self.node.clone().unwrap_or_default();
                let node = node_named(&name)?;
                (
                    Scope::Node(name.clone()),
                    node.clone(),
                    SocketAddrV4::new(node.address, OUTBOUND_PORT),
                    SocketAddr::new(IpAddr::V4(node.address), HBONE_PORT),
                    node.mesh_source,
                    PathBuf::from(PIN_ROOT).join(&name),
                    Some(SocketAddr::new(IpAddr::V4(node.address), OPERATOR_PORT)),
                )
            }
            RunMode::Sidecar => {
                let wanted = self.workload.clone().unwrap_or_default();
                let scope = Scope::sidecar(&wanted).map_err(ConfigError::Conflict)?;
                let Scope::Sidecar { namespace, name } = &scope else {
                    return Err(placed(format!(
                        "--workload {wanted} did not name a sidecar's pod"
                    )));
                };
                let w = file
                    .sidecar_workload(namespace, name)
                    .map_err(|e| placed(format!("{e} ({})", self.source_name())))?;
                if let Some(n) = &self.node
                    && *n != w.node
                {
                    return Err(ConfigError::Conflict(format!(
                        "--node {n} disagrees with the mesh file, which places {wanted} on {}; \
                         drop --node in sidecar mode",
                        w.node
                    )));
                }
                let pin =
                    PathBuf::from(PIN_ROOT).join(format!("sidecar.{}.{}", w.namespace, w.name));
                (
                    scope.clone(),
                    node_named(&w.node)?,
                    SocketAddrV4::new(Ipv4Addr::LOCALHOST, OUTBOUND_PORT),
                    SocketAddr::new(IpAddr::V4(w.ip), HBONE_PORT),
                    MeshSource::single(SIDECAR_MESH_SOURCE),
                    pin,
                    None,
                )
            }
        };
        let operator = match self.operator {
            None => operator,
            Some(Listen::Off) => None,
            Some(Listen::At(a)) => Some(a),
        };
        let outbound = self.outbound.unwrap_or(outbound);
        let hbone = self.hbone.unwrap_or(hbone);
        if self.outbound_spread > MAX_OUTBOUND_SPREAD {
            return Err(ConfigError::Conflict(format!(
                "--outbound-spread {} is more than {MAX_OUTBOUND_SPREAD} ports; 16 already lets \
                 one pod open ~7 500 new connections a second to different destinations",
                self.outbound_spread
            )));
        }
        let outbound_spread = if self.mode == RunMode::Sidecar {
            0..0
        } else {
            OUTBOUND_SPREAD_PORT..OUTBOUND_SPREAD_PORT + self.outbound_spread
        };
        let mut apart = vec![
            ("--outbound", Some(SocketAddr::V4(outbound))),
            ("--hbone", Some(hbone)),
            ("--metrics", Some(self.metrics)),
            ("--health", Some(self.health)),
            ("--admin", Some(self.admin)),
            ("--operator", operator),
        ];
        apart.extend(outbound_spread.clone().map(|p| {
            (
                "--outbound-spread",
                Some(SocketAddr::new(IpAddr::V4(*outbound.ip()), p)),
            )
        }));
        listeners_apart(&apart)?;
        Ok(Config {
            mode: self.mode,
            node: node_spec.name.clone(),
            workload: self.workload,
            discovery: self.discovery,
            mesh_file: self.mesh_file,
            kubeconfig: self.kubeconfig,
            cgroup_root,
            outbound,
            outbound_spread,
            hbone,
            metrics: self.metrics,
            health: self.health,
            admin: self.admin,
            operator,
            capture: self.capture,
            inbound: self.inbound,
            fail_open: self.fail_open,
            pin_dir: (!self.fail_open).then(|| self.pin_dir.unwrap_or(pin_dir)),
            proxy_mark: self.proxy_mark,
            ca: self.ca,
            ca_bundle: self.ca_bundle,
            token_file: self.token_file,
            trust_domain: self.trust_domain,
            bundle_refresh: self.bundle_refresh,
            sockmap: self.sockmap,
            splice_window: self.splice_window,
            drain_timeout: self.drain_timeout,
            l7: self.l7,
            detect_timeout: self.detect_timeout,
            handshake_timeout: self.handshake_timeout,
            access_log: self.access_log,
            mesh_source,
            scope,
            node_spec,
        })
    }
}

impl RunArgs {
    fn operator_addr(&self) -> Option<SocketAddr> {
        match self.operator {
            Some(Listen::At(a)) => Some(a),
            _ => None,
        }
    }

    /// Where the state comes from, as errors name it.
    fn source_name(&self) -> String {
        match (&self.discovery, &self.mesh_file) {
            (Discovery::File, Some(f)) => format!("the mesh file {}", f.display()),
            (Discovery::File, None) => "the mesh file".into(),
            (Discovery::Kube, _) => {
                "Kubernetes (Node objects with an InternalIP; meshed pods of enrolled namespaces)"
                    .into()
            }
        }
    }
}

/// Where the mesh's state comes from.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Discovery {
    /// The mesh file (`--mesh-file`), reloaded when it changes.
    File,
    /// The Kubernetes API server, watched.
    Kube,
}

/// Two listeners collide when they share a port and an address, or one of them is the wildcard.
fn listeners_apart(addrs: &[(&str, Option<SocketAddr>)]) -> Result<(), ConfigError> {
    let given: Vec<(&str, SocketAddr)> = addrs
        .iter()
        .filter_map(|(f, a)| a.map(|a| (*f, a)))
        .collect();
    for (i, (fa, a)) in given.iter().enumerate() {
        for (fb, b) in &given[i + 1..] {
            let overlap = a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified();
            if a.port() == b.port() && overlap {
                let fix = if *fb == "--outbound-spread" {
                    format!(
                        "move {fa} off the outbound listener's further ports (from \
                         {OUTBOUND_SPREAD_PORT}), or pass a smaller --outbound-spread"
                    )
                } else {
                    "give one of them another port".to_string()
                };
                return Err(ConfigError::Conflict(format!(
                    "{fa} {a} and {fb} {b} would listen on the same address; {fix}"
                )));
            }
        }
    }
    Ok(())
}

impl Config {
    pub fn strict(&self) -> bool {
        self.inbound == InboundMode::Strict
    }

    /// What the daemon is, for messages: "node n1's meshSource", "the sidecar of demo/client".
    pub fn what(&self) -> String {
        match &self.scope {
            Scope::Node(n) => format!("node {n}'s meshSource"),
            Scope::Sidecar { namespace, name } => format!("the sidecar of {namespace}/{name}"),
        }
    }

    /// The configuration as `/config_dump` shows it.
    pub fn dump(&self) -> serde_json::Value {
        serde_json::to_value(self).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use clap::{Args as _, Parser};

    use super::*;

    #[derive(Parser)]
    struct Cmd {
        #[command(flatten)]
        run: RunArgs,
    }

    fn args(extra: &[&str]) -> RunArgs {
        let base = [
            "run",
            "--mesh-file",
            "/x/mesh.yaml",
            "--ca",
            "https://10.0.0.10:15012",
            "--ca-bundle",
            "/x/bundle.pem",
            "--token-file",
            "/x/token",
        ];
        Cmd::try_parse_from(base.iter().chain(extra))
            .map(|c| c.run)
            .unwrap_or_else(|e| panic!("{extra:?}: {e}"))
    }

    fn file() -> Desired {
        let f = crate::meshfile::parse(
            std::path::Path::new("mesh.yaml"),
            "nodes:\n  - { name: n1, address: 10.0.0.1, meshSource: 10.210.1.254 }\n\
             workloads:\n\
             \x20 - { name: a, namespace: demo, serviceAccount: a, node: n1, ip: 10.210.1.2, cgroup: a }\n\
             \x20 - { name: s, namespace: demo, serviceAccount: s, node: n1, ip: 10.210.1.3, cgroup: s, mode: sidecar }\n",
        )
        .expect("mesh file");
        crate::discovery::file::to_desired(&f)
    }

    fn resolve(extra: &[&str]) -> Result<Config, ConfigError> {
        args(extra).resolve(&file(), "/sys/fs/cgroup".into())
    }

    #[test]
    fn sizes_parse_with_units_and_refuse_nonsense() {
        assert_eq!(parse_size("4MiB"), Ok(4 << 20));
        assert_eq!(parse_size("64KiB"), Ok(64 << 10));
        assert_eq!(parse_size("65536"), Ok(65536));
        for bad in ["4MB", "lots", "1KiB", "2048MiB", ""] {
            let e = parse_size(bad).expect_err(bad);
            assert!(e.contains("KiB") || e.contains("MiB"), "{bad}: {e}");
        }
    }

    #[test]
    fn node_defaults_come_from_the_mesh_file() {
        let c = resolve(&["--node", "n1"]).expect("valid");
        assert_eq!(c.outbound.to_string(), "10.0.0.1:15001");
        assert_eq!(c.hbone.to_string(), "10.0.0.1:15008");
        assert_eq!(
            c.mesh_source,
            MeshSource::single(Ipv4Addr::new(10, 210, 1, 254))
        );
        assert_eq!(c.pin_dir, Some(PathBuf::from("/sys/fs/bpf/nodemesh/n1")));
        assert_eq!(c.drain_timeout, Duration::from_secs(30));
        let open = resolve(&["--node", "n1", "--fail-open", "--pin-dir", "/p"]).expect("valid");
        assert_eq!(open.pin_dir, None, "fail-open pins nothing");
        let side = resolve(&["--mode", "sidecar", "--workload", "demo/s"]).expect("valid");
        assert_eq!(side.outbound.to_string(), "127.0.0.1:15001");
        assert_eq!(side.hbone.to_string(), "10.210.1.3:15008");
        assert_eq!(side.node, "n1");
        assert_eq!(side.mesh_source, MeshSource::single(SIDECAR_MESH_SOURCE));
        // The operator port: on the node's address by default, off in a sidecar, `off` or an
        // address when given.
        assert_eq!(
            c.operator.map(|a| a.to_string()).as_deref(),
            Some("10.0.0.1:15010")
        );
        assert_eq!(side.operator, None);
        let off = resolve(&["--node", "n1", "--operator", "off"]).expect("valid");
        assert_eq!(off.operator, None);
        let at = resolve(&["--node", "n1", "--operator", "10.0.0.1:9443"]).expect("valid");
        assert_eq!(at.operator.map(|a| a.port()), Some(9443));
        let e = resolve(&["--node", "n1", "--operator", "10.0.0.1:15008"]).expect_err("clash");
        assert!(e.to_string().contains("--operator"), "{e}");
        assert!(parse_operator("somewhere").is_err());
        // Only the mesh's destinations are captured unless asked otherwise.
        assert_eq!(c.capture, CaptureMode::Mesh);
        let all = resolve(&["--node", "n1", "--capture", "all"]).expect("valid");
        assert_eq!(all.capture, CaptureMode::All);
    }

    #[test]
    fn contradictions_are_refused_naming_both_flags() {
        for (extra, both) in [
            (&["--mode", "sidecar"][..], ["--mode sidecar", "--workload"]),
            (&[][..], ["--mode node", "--node"]),
            (
                &["--node", "n1", "--workload", "demo/a"][..],
                ["--workload", "--mode sidecar"],
            ),
            (
                &["--node", "n1", "--metrics", "10.0.0.1:15008"][..],
                ["--hbone 10.0.0.1:15008", "--metrics 10.0.0.1:15008"],
            ),
            (
                &["--node", "n1", "--hbone", "10.0.0.1:15020"][..],
                ["--hbone 10.0.0.1:15020", "--metrics 0.0.0.0:15020"],
            ),
            (
                &["--node", "n1", "--health", "127.0.0.1:15000"][..],
                ["--health", "--admin"],
            ),
            (
                &["--node", "n1", "--outbound", "10.0.0.1:15021"][..],
                ["--outbound", "--health"],
            ),
            (
                &["--mode", "sidecar", "--workload", "demo/s", "--node", "n2"][..],
                ["--node n2", "drop --node"],
            ),
        ] {
            let e = resolve(extra).expect_err(&format!("{extra:?}")).to_string();
            for part in both {
                assert!(e.contains(part), "{extra:?}: {e:?} should name {part:?}");
            }
        }
        let e = resolve(&["--node", "n1", "--admin", "0.0.0.0:15000"]).expect_err("wide admin");
        assert!(e.to_string().contains("loopback"), "{e}");
        let e = resolve(&["--node", "n9"]).expect_err("unknown node");
        assert!(e.to_string().contains("--node"), "{e}");
        let e = resolve(&["--mode", "sidecar", "--workload", "demo/a"]).expect_err("node-mode pod");
        assert!(e.to_string().contains("mode: sidecar"), "{e}");
    }

    #[test]
    fn the_dump_shows_every_flag() {
        let c = resolve(&["--node", "n1"]).expect("valid");
        let dump = c.dump();
        let obj = dump.as_object().expect("an object");
        let cmd = RunArgs::augment_args(clap::Command::new("run"));
        let mut n = 0;
        for a in cmd.get_arguments() {
            let id = a.get_id().as_str();
            if id == "help" {
                continue;
            }
            let mut camel = String::new();
            let mut up = false;
            for ch in id.chars() {
                if ch == '_' {
                    up = true;
                } else if up {
                    camel.push(ch.to_ascii_uppercase());
                    up = false;
                } else {
                    camel.push(ch);
                }
            }
            assert!(
                obj.contains_key(&camel),
                "flag {id} missing from the dump: {dump}"
            );
            n += 1;
        }
        assert!(n >= 22, "only {n} flags seen");
        assert_eq!(
            obj["outbound"], "10.0.0.1:15001",
            "effective values, not the flags"
        );
        assert_eq!(obj["drainTimeout"], 30.0);
        assert_eq!(obj["mode"], "node");
    }
}
