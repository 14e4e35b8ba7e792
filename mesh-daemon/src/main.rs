//! `mesh-daemon`: the node daemon (`run`), the CA (`ca serve`, `ca rotate`), the preflight
//! (`check`) and `uninstall`.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4},
    path::PathBuf,
    process::ExitCode,
    sync::{Arc, Mutex},
};

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use mesh_common::Counter;
use mesh_daemon::{
    admin::{self, AdminInputs, Observability},
    check,
    control::{self, Control, ControlConfig},
    ebpf::{
        cgroup,
        loader::{self, Datapath, DatapathConfig},
    },
    identity::{
        self,
        ca::{self, Ca, CaConfig, RotateStep},
        manager::{Manager, ManagerConfig},
    },
    meshfile,
    metrics::Metrics,
    proxy::{Inputs, balance::Balancer, hbone, inbound::Inbound, outbound::Outbound},
    state::{self, SIDECAR_MESH_SOURCE, Scope, State},
};
use tracing::{info, warn};

/// Default folder for pinned links (one sub-folder per node name).
const PIN_ROOT: &str = "/sys/fs/bpf/nodemesh";

#[derive(Parser)]
#[command(
    name = "mesh-daemon",
    version,
    about = "nodemesh: a per-node service mesh proxy"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the node daemon: attach the kernel hooks and proxy captured connections.
    Run(RunArgs),
    /// Check that this node can run the mesh (kernel, BTF, cgroup v2, bpffs, capabilities,
    /// program loads). Exits non-zero when any check fails.
    Check {
        /// cgroup v2 folder to use instead of the one found in /proc/mounts.
        #[arg(long, env = "NODEMESH_CGROUP_ROOT")]
        cgroup_root: Option<PathBuf>,
    },
    /// The mesh's certificate authority: issues workload SVIDs to node daemons.
    Ca {
        #[command(subcommand)]
        command: CaCommand,
    },
    /// Remove every program, link and map the mesh left pinned (after a crash, or to take a
    /// fail-closed node out of the mesh while no daemon runs).
    Uninstall {
        /// Pinned-link folder to clear (default: every node's, under /sys/fs/bpf/nodemesh).
        #[arg(long, env = "NODEMESH_PIN_DIR", default_value = PIN_ROOT)]
        pin_dir: PathBuf,
    },
}

#[derive(Subcommand)]
enum CaCommand {
    /// Serve SVID signing over HTTPS. Generates a root, signer and bundle in --dir at first start.
    Serve(CaArgs),
    /// One step of a root rotation (add-root, then activate, then retire), on --dir; a running CA
    /// picks each step up within a second.
    Rotate {
        /// The CA's key folder.
        #[arg(long, env = "NODEMESH_CA_DIR")]
        dir: PathBuf,
        /// Trust domain of the new root's SVIDs.
        #[arg(long, env = "NODEMESH_TRUST_DOMAIN", default_value = identity::DEFAULT_TRUST_DOMAIN)]
        trust_domain: String,
        #[arg(value_enum)]
        step: RotateStep,
    },
}

#[derive(clap::Args, Debug)]
struct CaArgs {
    /// Folder of the CA's keys and bundle (root.pem/key, signer.pem/key, bundle.pem).
    #[arg(long, env = "NODEMESH_CA_DIR")]
    dir: PathBuf,
    /// HTTPS listener for signing requests.
    #[arg(long, env = "NODEMESH_CA_LISTEN", default_value = "0.0.0.0:15012")]
    listen: SocketAddr,
    /// YAML map of node name to bootstrap token; a node may only get SVIDs for its own pods.
    #[arg(long, env = "NODEMESH_CA_TOKENS")]
    tokens: PathBuf,
    /// The mesh file: which workload runs on which node.
    #[arg(long, env = "NODEMESH_MESH_FILE")]
    mesh_file: PathBuf,
    /// SPIFFE trust domain.
    #[arg(long, env = "NODEMESH_TRUST_DOMAIN", default_value = identity::DEFAULT_TRUST_DOMAIN)]
    trust_domain: String,
    /// SVID lifetime (e.g. 24h, 1m); nodes renew at half of it.
    #[arg(long, env = "NODEMESH_SVID_LIFETIME", default_value = "24h", value_parser = identity::parse_duration)]
    lifetime: std::time::Duration,
    /// Extra DNS names or IPs for the CA's serving certificate (the --listen IP is always in it).
    #[arg(long = "san", env = "NODEMESH_CA_SANS", value_delimiter = ',')]
    sans: Vec<String>,
    /// Prometheus endpoint of the CA (`nodemesh_ca_requests_total`).
    #[arg(long, env = "NODEMESH_METRICS", default_value = "0.0.0.0:15014")]
    metrics: SocketAddr,
}

#[derive(clap::Args, Debug)]
struct RunArgs {
    /// `node`: one daemon per node serves the node's node-mode pods. `sidecar`: one daemon inside
    /// one pod's network namespace serves only that pod (--workload), with the same hooks and code.
    #[arg(long, env = "NODEMESH_MODE", value_enum, default_value = "node")]
    mode: RunMode,
    /// This node's name in the mesh file (node mode; a sidecar's node is its pod's).
    #[arg(long, env = "NODEMESH_NODE", required_if_eq("mode", "node"))]
    node: Option<String>,
    /// Sidecar mode: the pod this sidecar serves, as namespace/name in the mesh file.
    #[arg(long, env = "NODEMESH_WORKLOAD", required_if_eq("mode", "sidecar"))]
    workload: Option<String>,
    /// The mesh file (nodes, workloads, services); reloaded when it changes.
    #[arg(long, env = "NODEMESH_MESH_FILE")]
    mesh_file: PathBuf,
    /// cgroup v2 folder to attach the hooks under; every enrolled pod cgroup must be below it.
    /// Default: the cgroup v2 mount found in /proc/mounts.
    #[arg(long, env = "NODEMESH_CGROUP_ROOT")]
    cgroup_root: Option<PathBuf>,
    /// Outbound capture listener, as pods reach it. Default: the node's address (a sidecar:
    /// 127.0.0.1), port 15001.
    #[arg(long, env = "NODEMESH_OUTBOUND")]
    outbound: Option<SocketAddrV4>,
    /// HBONE listener for other proxies. Default: the node's address (a sidecar: its pod's),
    /// port 15008.
    #[arg(long, env = "NODEMESH_HBONE")]
    hbone: Option<SocketAddr>,
    /// Prometheus endpoint (`/metrics`).
    #[arg(long, env = "NODEMESH_METRICS", default_value = "0.0.0.0:15020")]
    metrics: SocketAddr,
    /// Health endpoint (`/live`, `/ready`).
    #[arg(long, env = "NODEMESH_HEALTH", default_value = "0.0.0.0:15021")]
    health: SocketAddr,
    /// Admin endpoint (`/config_dump`, `/logging`, `/debug/ebpf`, `/tap`); loopback only.
    #[arg(long, env = "NODEMESH_ADMIN", default_value = "127.0.0.1:15000")]
    admin: SocketAddr,
    /// Inbound enforcement for enrolled pods: `strict` accepts TCP only from the mesh (plus each
    /// pod's probePorts); `permissive` also accepts plaintext, and counts it.
    #[arg(
        long,
        env = "NODEMESH_INBOUND",
        value_enum,
        default_value = "permissive"
    )]
    inbound: InboundMode,
    /// Let enrolled pods' connections go direct (unmeshed) while the daemon is down, instead of
    /// failing them.
    #[arg(long, env = "NODEMESH_FAIL_OPEN")]
    fail_open: bool,
    /// Where the fail-closed links are pinned. Default: /sys/fs/bpf/nodemesh/<node> (a sidecar:
    /// /sys/fs/bpf/nodemesh/sidecar.<namespace>.<name>).
    #[arg(long, env = "NODEMESH_PIN_DIR")]
    pin_dir: Option<PathBuf>,
    /// SO_MARK put on the proxy's own sockets so the hooks never capture them.
    #[arg(long, env = "NODEMESH_PROXY_MARK", default_value_t = 0x4e4d)]
    proxy_mark: u32,
    /// The CA, as `https://<ip>[:port]`. Every inter-node connection is mTLS with SVIDs from it.
    #[arg(long, env = "NODEMESH_CA")]
    ca: String,
    /// Roots to trust the CA with at start (the CA's bundle.pem); the CA's own bundle replaces
    /// them once it answers.
    #[arg(long, env = "NODEMESH_CA_BUNDLE")]
    ca_bundle: PathBuf,
    /// File holding this node's bootstrap token for the CA.
    #[arg(long, env = "NODEMESH_TOKEN_FILE")]
    token_file: PathBuf,
    /// SPIFFE trust domain.
    #[arg(long, env = "NODEMESH_TRUST_DOMAIN", default_value = identity::DEFAULT_TRUST_DOMAIN)]
    trust_domain: String,
    /// How often the trust bundle is refreshed from the CA (a root rotation reaches this node
    /// within it).
    #[arg(long, env = "NODEMESH_BUNDLE_REFRESH", default_value = "5s", value_parser = identity::parse_duration)]
    bundle_refresh: std::time::Duration,
    /// Same-node fast path: the proxy's two sockets of a connection between pods of this node are
    /// spliced in the kernel (sk_skb verdict on a SOCKHASH), so the bytes skip user space. Pod
    /// sockets never enter a socket map. Sidecars and cross-node traffic always relay (mTLS).
    #[arg(long, env = "NODEMESH_SOCKMAP", value_enum, default_value = "off")]
    sockmap: OnOff,
    /// With --sockmap on: bytes the kernel may hold for one direction of a spliced connection
    /// whose receiver is slower than its sender, before the splice pauses and TCP pushes back on
    /// the sender (as with the user-space relay). Bigger: fewer pauses in bulk transfers;
    /// smaller: less kernel memory per connection. Bytes, or with a KiB/MiB suffix.
    #[arg(long, env = "NODEMESH_SPLICE_WINDOW", default_value = "4MiB", value_parser = parse_size)]
    splice_window: u64,
}

/// `4096`, `64KiB`, `4MiB`: a size in bytes (at least 16 KiB, at most 1 GiB).
fn parse_size(s: &str) -> Result<u64, String> {
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

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum OnOff {
    On,
    Off,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum RunMode {
    Node,
    Sidecar,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum InboundMode {
    Strict,
    Permissive,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("NODEMESH_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_filter_reloading();
    let handle = builder.reload_handle();
    builder.init();
    // `/logging` on the admin port: show or replace the filter at run time.
    let log: admin::LogControl = Box::new(move |level: &str| {
        if level.is_empty() {
            return handle
                .with_current(|f| format!("log filter: {f}"))
                .map_err(|e| e.to_string());
        }
        let f = tracing_subscriber::EnvFilter::try_new(level).map_err(|e| {
            format!("bad filter {level:?}: {e}; use e.g. debug or info,mesh_daemon::proxy=debug")
        })?;
        handle.reload(f).map_err(|e| e.to_string())?;
        Ok(format!("log filter is now {level}"))
    });
    match cli.command {
        Command::Check { cgroup_root } => {
            let outcomes = check::run(cgroup_root.as_deref());
            let (text, ok) = check::render(&outcomes);
            print!("{text}");
            if ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Command::Uninstall { pin_dir } => match loader::uninstall(&pin_dir) {
            Ok(removed) => {
                for p in &removed {
                    println!("removed {}", p.display());
                }
                println!(
                    "uninstalled: {} pinned link(s) removed; the kernel frees their programs and \
                     maps once no daemon holds them",
                    removed.len()
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!(
                    "mesh-daemon uninstall: cannot clear {}: {e}",
                    pin_dir.display()
                );
                ExitCode::FAILURE
            }
        },
        Command::Ca {
            command:
                CaCommand::Rotate {
                    dir,
                    trust_domain,
                    step,
                },
        } => match ca::rotate(&dir, &trust_domain, step) {
            Ok(next) => {
                println!("{next}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("mesh-daemon ca rotate: {e}");
                ExitCode::FAILURE
            }
        },
        Command::Ca {
            command: CaCommand::Serve(args),
        } => match serve_ca(args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("mesh-daemon ca: {e:#}");
                ExitCode::FAILURE
            }
        },
        Command::Run(args) => match run(args, log) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("mesh-daemon: {e:#}");
                ExitCode::FAILURE
            }
        },
    }
}

fn serve_ca(args: CaArgs) -> anyhow::Result<()> {
    info!(?args, "starting the CA");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .thread_name("ca")
        .build()
        .context("cannot start the CA runtime")?;
    rt.block_on(async move {
        let metrics_listener = std::net::TcpListener::bind(args.metrics).with_context(|| {
            format!(
                "cannot listen on {} for /metrics; free the port or pass --metrics",
                args.metrics
            )
        })?;
        let metrics = Arc::new(Metrics::new().with_process_metrics());
        let ca = Ca::new(
            CaConfig {
                dir: args.dir,
                listen: args.listen,
                trust_domain: args.trust_domain,
                tokens: args.tokens,
                mesh_file: args.mesh_file,
                lifetime: args.lifetime,
                sans: args.sans,
            },
            &metrics.registry,
        )
        .await?;
        admin::spawn(
            admin::Listeners {
                metrics: Some(metrics_listener),
                health: None,
                admin: None,
            },
            Arc::new(Observability {
                metrics,
                ready: admin::Readiness::default(),
                admin: std::sync::OnceLock::new(),
            }),
        )
        .context("cannot start the metrics thread")?;
        info!(listen = %ca.local_addr()?, "CA ready");
        tokio::select! {
            () = ca.run() => {}
            () = shutdown_signal() => info!("CA shutting down"),
        }
        anyhow::Ok(())
    })
}

/// Where a daemon sits and what it serves, from `--mode` and the mesh file.
struct Placement {
    scope: Scope,
    /// Its node (a sidecar's: its pod's node).
    node: meshfile::NodeSpec,
    outbound: SocketAddrV4,
    hbone: SocketAddr,
    /// Where it connects to the pods it serves from.
    mesh_source: Ipv4Addr,
    pin_dir: PathBuf,
    /// For errors: "node node-1's meshSource", "sidecar of demo/client".
    what: String,
}

impl Placement {
    fn resolve(args: &RunArgs, file: &meshfile::MeshFile) -> anyhow::Result<Self> {
        let node_named = |name: &str| {
            file.nodes
                .iter()
                .find(|n| n.name == name)
                .cloned()
                .with_context(|| {
                    format!(
                        "node {name:?} is not in {}; pass --node with a name from its `nodes`",
                        args.mesh_file.display()
                    )
                })
        };
        match args.mode {
            RunMode::Node => {
                let name = args
                    .node
                    .as_deref()
                    .context("--node is required in node mode")?;
                let node = node_named(name)?;
                Ok(Self {
                    scope: Scope::Node(name.to_string()),
                    outbound: SocketAddrV4::new(node.address, 15001),
                    hbone: SocketAddr::new(IpAddr::V4(node.address), hbone::PORT),
                    mesh_source: node.mesh_source,
                    pin_dir: PathBuf::from(PIN_ROOT).join(name),
                    what: format!("node {name}'s meshSource"),
                    node,
                })
            }
            RunMode::Sidecar => {
                let wanted = args
                    .workload
                    .as_deref()
                    .context("--workload is required in sidecar mode")?;
                let scope = Scope::sidecar(wanted).map_err(anyhow::Error::msg)?;
                let Scope::Sidecar { namespace, name } = &scope else {
                    anyhow::bail!("--workload {wanted} did not name a sidecar's pod");
                };
                let w = state::sidecar_workload(file, namespace, name)
                    .map_err(|e| anyhow::anyhow!("{e} (mesh file {})", args.mesh_file.display()))?;
                if let Some(n) = &args.node
                    && *n != w.node
                {
                    anyhow::bail!(
                        "--node {n} disagrees with the mesh file, which places {wanted} on {}; \
                         drop --node in sidecar mode",
                        w.node
                    );
                }
                Ok(Self {
                    outbound: SocketAddrV4::new(Ipv4Addr::LOCALHOST, 15001),
                    hbone: SocketAddr::new(IpAddr::V4(w.ip), hbone::PORT),
                    mesh_source: SIDECAR_MESH_SOURCE,
                    pin_dir: PathBuf::from(PIN_ROOT)
                        .join(format!("sidecar.{}.{}", w.namespace, w.name)),
                    what: format!("the sidecar of {wanted}"),
                    node: node_named(&w.node)?,
                    scope,
                })
            }
        }
    }
}

fn run(args: RunArgs, log: admin::LogControl) -> anyhow::Result<()> {
    let cgroup_root = cgroup::resolve_root(args.cgroup_root.as_deref())?;
    // The mesh file must be good at start: there is no earlier state to fall back on.
    let file = meshfile::load(&args.mesh_file)?;
    let place = Placement::resolve(&args, &file)?;
    let me = place.node.clone();
    let outbound_addr = args.outbound.unwrap_or(place.outbound);
    let hbone_addr = args.hbone.unwrap_or(place.hbone);
    let pin_dir = (!args.fail_open).then(|| args.pin_dir.clone().unwrap_or(place.pin_dir.clone()));
    info!(?args, cgroup_root = %cgroup_root.display(), "starting");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("dataplane")
        .build()
        .context("cannot start the data-plane runtime")?;
    rt.block_on(async move {
        // Bind everything before attaching: a port conflict must fail start-up before anything
        // is captured.
        let out_listener = Outbound::bind(SocketAddr::V4(outbound_addr)).await?;
        let in_listener = Inbound::bind(hbone_addr).await?;
        let bind = |addr: SocketAddr, what: &str, flag: &str| {
            std::net::TcpListener::bind(addr).with_context(|| {
                format!("cannot listen on {addr} for {what}; free the port or pass {flag}")
            })
        };
        if !args.admin.ip().is_loopback() {
            anyhow::bail!(
                "--admin {} is not a loopback address; the admin port must stay on the node \
                 (127.0.0.1)",
                args.admin
            );
        }
        let listeners = admin::Listeners {
            metrics: Some(bind(args.metrics, "/metrics", "--metrics")?),
            health: Some(bind(args.health, "/ready and /live", "--health")?),
            admin: Some(bind(args.admin, "the admin endpoints", "--admin")?),
        };
        // Every listener carries the proxy mark: a sidecar lives in its pod's cgroup, and the
        // pod's STRICT inbound check must let the proxy's own ports through (connections from the
        // app to 15001, from peers to 15008, scrapes and probes).
        let mark = |fd: &dyn std::os::fd::AsRawFd| {
            mesh_daemon::proxy::set_mark(&fd.as_raw_fd(), args.proxy_mark)
                .context("cannot mark the proxy's listeners (SO_MARK needs CAP_NET_ADMIN)")
        };
        mark(&out_listener)?;
        mark(&in_listener)?;
        for l in [&listeners.metrics, &listeners.health, &listeners.admin]
            .into_iter()
            .flatten()
        {
            mark(l)?;
        }
        // The mesh source must be an address here, or no local pod could be reached.
        std::net::TcpListener::bind((place.mesh_source, 0)).with_context(|| {
            format!(
                "mesh source {} ({}) is not an address of this network namespace; add it (e.g. \
                 `ip addr add {}/32 dev lo`) or fix the mesh file",
                place.mesh_source, place.what, place.mesh_source
            )
        })?;
        let cfg = DatapathConfig {
            cgroup_root: cgroup_root.clone(),
            proxy_addr: outbound_addr,
            proxy_mark: args.proxy_mark,
            redirect: true,
            sockmap: args.sockmap == OnOff::On,
            splice_window: args.splice_window,
            mesh_source: place.mesh_source,
            pin_dir: pin_dir.clone(),
        };
        let metrics = Arc::new(Metrics::new().with_process_metrics());
        // Health and metrics answer from here on: /ready says what is still missing.
        let obs = Arc::new(Observability {
            metrics: metrics.clone(),
            ready: admin::Readiness::default(),
            admin: std::sync::OnceLock::new(),
        });
        admin::spawn(listeners, obs.clone()).context("cannot start the observability thread")?;
        // Identity before the kernel: bad CA settings fail start-up before anything is captured.
        let identity = Manager::new(
            ManagerConfig {
                ca_url: args.ca.clone(),
                ca_bundle: args.ca_bundle.clone(),
                token_file: args.token_file.clone(),
                trust_domain: args.trust_domain.clone(),
                refresh: args.bundle_refresh,
                mark: args.proxy_mark,
            },
            metrics.clone(),
        )?;
        identity.start();
        let _ = obs.ready.identity.set(identity.clone());
        let tls = tokio_rustls::TlsAcceptor::from(
            identity::tls::server_config(identity.clone())
                .context("cannot build the HBONE TLS configuration")?,
        );
        let datapath = Datapath::load(&cfg)?;
        info!(programs = ?datapath.program_names(), fail_closed = pin_dir.is_some(), pin_dir = ?pin_dir, "eBPF programs attached");
        obs.ready.attached.store(true, std::sync::atomic::Ordering::Release);
        let orig = datapath.orig_dst_table();
        let splice = datapath.splice_maps();
        if let Some(maps) = &splice {
            tokio::spawn(mesh_daemon::proxy::splice::run_events(maps.clone()));
        }
        let datapath = Arc::new(Mutex::new(datapath));
        let state = Arc::new(State::default());
        let mut control = Control::new(
            ControlConfig {
                path: args.mesh_file.clone(),
                scope: place.scope.clone(),
                cgroup_root: cgroup_root.clone(),
                strict: args.inbound == InboundMode::Strict,
            },
            state.clone(),
            datapath.clone(),
            metrics.clone(),
            identity.clone(),
        );
        control.load_initial().map_err(anyhow::Error::msg)?;
        obs.ready.loaded.store(true, std::sync::atomic::Ordering::Release);
        let tap = admin::Tap::default();
        let inputs = Arc::new(Inputs {
            orig,
            state,
            metrics: metrics.clone(),
            proxy_mark: args.proxy_mark,
            balancer: Balancer::default(),
            hbone: hbone::Client::new(args.proxy_mark, identity.clone(), metrics.clone()),
            identity: identity.clone(),
            tls,
            tap: tap.clone(),
            splice,
        });
        let ebpf: admin::EbpfDump = {
            // Weak: the admin thread must not keep the programs alive past a clean exit, which
            // needs the only reference to detach them.
            let datapath = Arc::downgrade(&datapath);
            let pin_dir = pin_dir.clone();
            Box::new(move || {
                let Some(datapath) = datapath.upgrade() else {
                    return serde_json::json!({ "error": "the daemon is shutting down" });
                };
                let dp = datapath.lock().unwrap_or_else(|p| p.into_inner());
                serde_json::json!({
                    "programs": dp.program_names(),
                    "failClosed": pin_dir.is_some(),
                    "pinDir": pin_dir.as_ref().map(|p| p.display().to_string()),
                    "maps": dp.map_occupancy().into_iter()
                        .map(|(m, n)| (m.to_string(), n)).collect::<std::collections::BTreeMap<_, _>>(),
                    "counters": dp.counters().into_iter()
                        .map(|(c, v)| (c.name().to_string(), v)).collect::<std::collections::BTreeMap<_, _>>(),
                })
            })
        };
        let _ = obs.admin.set(AdminInputs {
            state: inputs.state.clone(),
            identity,
            tap,
            log,
            ebpf,
            config: serde_json::json!({
                "mode": format!("{:?}", args.mode).to_lowercase(),
                "node": me.name,
                "workload": args.workload,
                "meshFile": args.mesh_file.display().to_string(),
                "cgroupRoot": cgroup_root.display().to_string(),
                "outbound": outbound_addr.to_string(),
                "hbone": hbone_addr.to_string(),
                "metrics": args.metrics.to_string(),
                "health": args.health.to_string(),
                "admin": args.admin.to_string(),
                "inbound": format!("{:?}", args.inbound).to_lowercase(),
                "failOpen": args.fail_open,
                "proxyMark": args.proxy_mark,
                "sockmap": format!("{:?}", args.sockmap).to_lowercase(),
                "spliceWindow": args.splice_window,
                "ca": args.ca,
                "trustDomain": args.trust_domain,
                "bundleRefreshSeconds": args.bundle_refresh.as_secs(),
            }),
        });
        let outbound = Outbound::new(out_listener, inputs.clone());
        let inbound = Inbound::new(in_listener, inputs);
        info!(outbound = %outbound.local_addr()?, hbone = %hbone_addr, metrics = %args.metrics, health = %args.health, admin = %args.admin, inbound = ?args.inbound, "ready");
        let ticks = {
            let datapath = datapath.clone();
            let metrics = metrics.clone();
            async move {
                let mut last = vec![0u64; Counter::ALL.len()];
                loop {
                    tokio::time::sleep(control::POLL).await;
                    control.poll();
                    let (now, maps) = {
                        let dp = datapath.lock().unwrap_or_else(|p| p.into_inner());
                        (dp.counters(), dp.map_occupancy())
                    };
                    kernel_counters_tick(&metrics, &mut last, &now);
                    for (map, n) in maps {
                        metrics.ebpf_map_entries.with_label_values(&[map]).set(n as i64);
                    }
                }
            }
        };
        tokio::select! {
            () = outbound.run() => {}
            () = inbound.run() => {}
            () = ticks => {}
            () = shutdown_signal() => info!("shutting down"),
        }
        // A `/debug/ebpf` answer may hold the datapath for a moment; wait for it (bounded).
        let mut shared = datapath;
        let mut waited = 0;
        let datapath = loop {
            match Arc::try_unwrap(shared) {
                Ok(m) => break m.into_inner().unwrap_or_else(|p| p.into_inner()),
                Err(still) if waited < 200 => {
                    shared = still;
                    waited += 1;
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
                Err(_) => anyhow::bail!(
                    "the datapath is still in use at exit; run `mesh-daemon uninstall` to remove \
                     the pinned hooks"
                ),
            }
        };
        let counters: Vec<String> = datapath
            .counters()
            .iter()
            .map(|(c, v)| format!("{}={v}", c.name()))
            .collect();
        info!(counters = %counters.join(" "), "kernel counters");
        for line in metrics.encode().lines().filter(|l| !l.starts_with('#')) {
            info!("metric {line}");
        }
        datapath
            .uninstall()
            .context("cannot remove the pinned links; run `mesh-daemon uninstall`")?;
        info!("eBPF programs detached");
        anyhow::Ok(())
    })
}

/// Publishes the kernel's counters as `nodemesh_ebpf_events_total` and logs when a failure
/// counter moves (map full, record lost), so those conditions are never silent.
fn kernel_counters_tick(metrics: &Metrics, last: &mut [u64], now: &[(Counter, u64)]) {
    for (i, (c, v)) in now.iter().enumerate() {
        let delta = v.saturating_sub(last[i]);
        if delta == 0 {
            continue;
        }
        metrics
            .ebpf_events
            .with_label_values(&[c.name()])
            .inc_by(delta);
        match c {
            Counter::RecordStoreFailed => warn!(
                new = delta,
                "the kernel could not store capture records (map full?); the proxy refuses those \
                 connections"
            ),
            Counter::SockopsNoRecord => warn!(
                new = delta,
                "captured connections reached the proxy without a record (evicted from a full LRU \
                 map?); they are refused"
            ),
            Counter::SpliceNoPeer => warn!(
                new = delta,
                "spliced bytes found no peer socket; the proxy relayed them itself"
            ),
            _ => {}
        }
        last[i] = *v;
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(e) => {
            warn!(error = %e, "cannot watch SIGTERM; only Ctrl-C stops the daemon");
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::parse_size;

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
}
