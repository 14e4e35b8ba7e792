//! `mesh-daemon`: the node daemon (`run`) and its preflight (`check`).

use std::{
    net::{SocketAddr, SocketAddrV4},
    path::PathBuf,
    process::ExitCode,
    sync::Arc,
};

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use mesh_daemon::{
    check,
    ebpf::{
        cgroup,
        loader::{Datapath, DatapathConfig},
    },
    metrics::Metrics,
    proxy::outbound::{Inputs, Outbound},
    state::{State, Workload},
};
use tracing::{info, warn};

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
}

#[derive(clap::Args, Debug)]
struct RunArgs {
    /// cgroup v2 folder to attach the hooks under; every enrolled pod cgroup must be below it.
    /// Default: the cgroup v2 mount found in /proc/mounts.
    #[arg(long, env = "NODEMESH_CGROUP_ROOT")]
    cgroup_root: Option<PathBuf>,
    /// Outbound capture listener, as pods reach it (node mode: the node's address on the pod
    /// network; sidecar mode: 127.0.0.1).
    #[arg(long, env = "NODEMESH_OUTBOUND", default_value = "127.0.0.1:15001")]
    outbound: SocketAddrV4,
    /// A pod to mesh: CGROUP_PATH=NAMESPACE/NAME[/SERVICE_ACCOUNT]. Repeatable.
    #[arg(long = "enroll", value_parser = parse_enroll)]
    enroll: Vec<Workload>,
    /// SO_MARK put on the proxy's own sockets so the hooks never capture them.
    #[arg(long, env = "NODEMESH_PROXY_MARK", default_value_t = 0x4e4d)]
    proxy_mark: u32,
    /// Same-host fast path (sockops + sk_msg on a SOCKHASH).
    #[arg(long, env = "NODEMESH_SOCKMAP", value_enum, default_value = "off")]
    sockmap: OnOff,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum OnOff {
    On,
    Off,
}

fn parse_enroll(s: &str) -> Result<Workload, String> {
    let (path, id) = s
        .split_once('=')
        .ok_or("expected CGROUP_PATH=NAMESPACE/NAME[/SERVICE_ACCOUNT]")?;
    let parts: Vec<&str> = id.split('/').collect();
    let (namespace, name, sa) = match parts.as_slice() {
        [ns, name] => (*ns, *name, "default"),
        [ns, name, sa] => (*ns, *name, *sa),
        _ => return Err(format!("{id:?}: expected NAMESPACE/NAME[/SERVICE_ACCOUNT]")),
    };
    if path.is_empty() || namespace.is_empty() || name.is_empty() || sa.is_empty() {
        return Err(format!("{s:?}: no part may be empty"));
    }
    Ok(Workload {
        namespace: namespace.into(),
        name: name.into(),
        service_account: sa.into(),
        cgroup: PathBuf::from(path),
    })
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("NODEMESH_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
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
        Command::Run(args) => match run(args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("mesh-daemon: {e:#}");
                ExitCode::FAILURE
            }
        },
    }
}

fn run(args: RunArgs) -> anyhow::Result<()> {
    if args.sockmap == OnOff::On {
        // Found by the daemon suite on Linux 6.18: once a pod socket sits in the SOCKHASH with our
        // pass-through sk_msg attached, the app's blocking socket calls intermittently fail with
        // EAGAIN (with or without SO_RCVTIMEO). A mode that breaks apps must not be selectable
        // until the splice is implemented and passes the same suite as `off`.
        anyhow::bail!(
            "--sockmap on is not available yet: the sk_msg fast path makes pods' blocking sockets \
             fail intermittently with EAGAIN on this kernel; run with --sockmap off (the default)"
        );
    }
    let cgroup_root = cgroup::resolve_root(args.cgroup_root.as_deref())?;
    info!(?args, cgroup_root = %cgroup_root.display(), "starting");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("dataplane")
        .build()
        .context("cannot start the data-plane runtime")?;
    rt.block_on(async move {
        let cfg = DatapathConfig {
            cgroup_root,
            proxy_addr: args.outbound,
            proxy_mark: args.proxy_mark,
            redirect: true,
            sockmap: args.sockmap == OnOff::On,
        };
        // Bind before attaching: a port conflict must fail start-up before anything is captured.
        let listener = Outbound::bind(SocketAddr::V4(args.outbound)).await?;
        let state = Arc::new(State::default());
        let metrics = Arc::new(Metrics::new());
        let mut datapath = Datapath::load(&cfg)?;
        info!(programs = ?datapath.program_names(), "eBPF programs attached");
        for w in &args.enroll {
            let id = state.add_workload(w.clone());
            let cg = datapath.enroll(&w.cgroup, id)?;
            info!(workload = %format!("{}/{}", w.namespace, w.name), cgroup = %w.cgroup.display(), cgroup_id = cg, "enrolled");
        }
        let inputs = Arc::new(Inputs {
            orig: datapath.orig_dst_table(),
            state,
            metrics: metrics.clone(),
            proxy_mark: args.proxy_mark,
        });
        let outbound = Outbound::new(listener, inputs);
        info!(addr = %outbound.local_addr()?, "ready: outbound listener up");
        tokio::select! {
            () = outbound.run() => {}
            () = shutdown_signal() => info!("shutting down"),
        }
        let counters: Vec<String> =
            datapath.counters().iter().map(|(c, v)| format!("{}={v}", c.name())).collect();
        info!(counters = %counters.join(" "), "kernel counters");
        for line in metrics.encode().lines().filter(|l| !l.starts_with('#')) {
            info!("metric {line}");
        }
        drop(datapath);
        info!("eBPF programs detached");
        anyhow::Ok(())
    })
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
