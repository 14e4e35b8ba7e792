//! `mesh-daemon`: the node daemon (`run`), the CA (`ca serve`, `ca rotate`), the preflight
//! (`check`) and `uninstall`. This file only parses the command line; `app.rs` puts the daemon
//! together.

mod app;

use std::{net::SocketAddr, path::PathBuf, process::ExitCode, sync::Arc};

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use mesh_daemon::{
    admin::{self, Observability},
    check,
    config::{self, RunArgs},
    ebpf::loader,
    identity::{
        self,
        ca::{self, Ca, CaConfig, RotateStep},
    },
    metrics::Metrics,
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
    Run(Box<RunArgs>),
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
    /// Print the AuthorizationPolicy CRD (`nodemesh.io/v1alpha1`) as YAML, generated from the
    /// daemon's own types (deploy/crds/authorizationpolicies.yaml is this output).
    Crd {
        /// Print instead the Gateway API HTTPRoute and GRPCRoute CRDs as the daemon reads them
        /// (for test clusters; prefer the upstream release's, which validate more).
        #[arg(long)]
        gateway_api: bool,
    },
    /// Remove every program, link and map the mesh left pinned (after a crash, or to take a
    /// fail-closed node out of the mesh while no daemon runs).
    Uninstall {
        /// Pinned-link folder to clear (default: every node's, under /sys/fs/bpf/nodemesh).
        #[arg(long, env = "NODEMESH_PIN_DIR", default_value = config::PIN_ROOT)]
        pin_dir: PathBuf,
    },
}

#[derive(Subcommand)]
enum CaCommand {
    /// Serve SVID signing over HTTPS. Generates a root, signer and bundle in --dir at first start.
    Serve(Box<CaArgs>),
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
    /// Sign an operator's client certificate (`spiffe://<trust-domain>/operator/<name>`) from the
    /// key folder, for `meshctl --operator <out>` to read nodes over their operator port (mTLS):
    /// writes operator.pem (the chain), operator.key and bundle.pem into --out. Never issued over
    /// the network, so only who holds the CA's keys can make one.
    IssueOperator {
        /// The CA's key folder.
        #[arg(long, env = "NODEMESH_CA_DIR")]
        dir: PathBuf,
        #[arg(long, env = "NODEMESH_TRUST_DOMAIN", default_value = identity::DEFAULT_TRUST_DOMAIN)]
        trust_domain: String,
        /// Who the certificate is for (lowercase letters, digits, '-', '.'); nodes log it with
        /// every request.
        #[arg(long)]
        name: String,
        /// Folder to write the certificate, key and bundle into (created, mode 0700).
        #[arg(long)]
        out: PathBuf,
        /// How long the certificate is valid (`8h`, `7d`): keep it short, issue again when needed.
        #[arg(long, default_value = "24h", value_parser = identity::parse_duration)]
        lifetime: std::time::Duration,
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
    /// Who the nodes are and which pods run where: `file` (--tokens and --mesh-file) or `kube`
    /// (TokenReview of each daemon's projected service-account token, and the pods' nodeName).
    #[arg(long, env = "NODEMESH_DISCOVERY", value_enum, default_value = "file")]
    discovery: config::Discovery,
    /// YAML map of node name to bootstrap token; a node may only get SVIDs for its own pods.
    /// `--discovery file`.
    #[arg(long, env = "NODEMESH_CA_TOKENS")]
    tokens: Option<PathBuf>,
    /// The mesh file: which workload runs on which node. `--discovery file`.
    #[arg(long, env = "NODEMESH_MESH_FILE")]
    mesh_file: Option<PathBuf>,
    /// `--discovery kube`: the kubeconfig (default: the pod's service account, $KUBECONFIG).
    #[arg(long, env = "NODEMESH_KUBECONFIG")]
    kubeconfig: Option<PathBuf>,
    /// `--discovery kube`: the audience daemon tokens must be issued for.
    #[arg(long, env = "NODEMESH_TOKEN_AUDIENCE", default_value = "nodemesh-ca")]
    token_audience: String,
    /// `--discovery kube`: the node daemons' service account, namespace/name; only its
    /// pod-bound tokens may ask for SVIDs.
    #[arg(
        long,
        env = "NODEMESH_DAEMON_SERVICE_ACCOUNT",
        default_value = "nodemesh/nodemesh-daemon"
    )]
    daemon_service_account: String,
    /// `--discovery kube`: the ConfigMap (in the daemons' namespace) the CA publishes its trust
    /// bundle in, key `bundle.pem`, at start and whenever it changes (a root rotation).
    #[arg(
        long,
        env = "NODEMESH_BUNDLE_CONFIGMAP",
        default_value = "nodemesh-trust-bundle"
    )]
    bundle_configmap: String,
    /// `--discovery kube`: the Secret (in the daemons' namespace) that keeps the CA's keys: read
    /// into --dir at start, created at first start, updated when the folder changes (a rotation).
    #[arg(long, env = "NODEMESH_KEY_SECRET", default_value = "nodemesh-ca-keys")]
    key_secret: String,
    /// SPIFFE trust domain.
    #[arg(long, env = "NODEMESH_TRUST_DOMAIN", default_value = identity::DEFAULT_TRUST_DOMAIN)]
    trust_domain: String,
    /// SVID lifetime (e.g. 24h, 1m); nodes renew at half of it.
    #[arg(long, env = "NODEMESH_SVID_LIFETIME", default_value = "24h", value_parser = identity::parse_duration)]
    lifetime: std::time::Duration,
    /// Extra DNS names or IPs for the CA's serving certificate (the --listen IP is always in it).
    #[arg(long = "san", env = "NODEMESH_CA_SANS", value_delimiter = ',')]
    sans: Vec<String>,
    /// Signing requests each client address may make per second, in bursts of up to ten
    /// seconds' worth (a node starting with many pods asks for all their SVIDs at once); more
    /// are answered 429 with Retry-After and counted as `rate_limited`. 0: no limit.
    #[arg(long, env = "NODEMESH_CA_RATE_LIMIT", default_value_t = 50)]
    rate_limit: u32,
    /// Prometheus endpoint of the CA (`nodemesh_ca_requests_total`).
    #[arg(long, env = "NODEMESH_METRICS", default_value = "0.0.0.0:15014")]
    metrics: SocketAddr,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // NODEMESH_LOG, checked as /logging checks it: a misspelt level must not silence the logs.
    let filter = match std::env::var("NODEMESH_LOG") {
        Ok(v) => match admin::log_filter(&v) {
            Ok(f) => f,
            Err(e) => {
                eprintln!("mesh-daemon: NODEMESH_LOG={v:?}: {e}; logging at info instead");
                tracing_subscriber::EnvFilter::new("info")
            }
        },
        Err(_) => tracing_subscriber::EnvFilter::new("info"),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
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
        let f = admin::log_filter(level).map_err(|e| format!("bad filter: {e}"))?;
        handle.reload(f).map_err(|e| e.to_string())?;
        Ok(format!("log filter is now {level}"))
    });
    // The long-running servers hold a descriptor per connection: the whole hard limit is theirs.
    if matches!(
        cli.command,
        Command::Run(_)
            | Command::Ca {
                command: CaCommand::Serve(_)
            }
    ) {
        mesh_daemon::socket::raise_open_file_limit_and_say();
    }
    match cli.command {
        Command::Check { cgroup_root } => {
            let outcomes = check::run(cgroup_root.as_deref());
            let (text, ok) = check::render(&outcomes, "mesh-daemon check");
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
            command:
                CaCommand::IssueOperator {
                    dir,
                    trust_domain,
                    name,
                    out,
                    lifetime,
                },
        } => match ca::issue_operator(&dir, &trust_domain, &name, &out, lifetime) {
            Ok(summary) => {
                println!("{summary}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("mesh-daemon ca issue-operator: {e}");
                ExitCode::FAILURE
            }
        },
        Command::Ca {
            command: CaCommand::Serve(args),
        } => match serve_ca(*args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("mesh-daemon ca: {e:#}");
                ExitCode::FAILURE
            }
        },
        Command::Crd { gateway_api } => match if gateway_api {
            mesh_daemon::discovery::kube::crd::gateway_api_yaml()
        } else {
            mesh_daemon::discovery::kube::crd::yaml()
        } {
            Ok(y) => {
                print!("{y}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("mesh-daemon crd: {e}");
                ExitCode::FAILURE
            }
        },
        Command::Run(args) => match app::run(*args, log) {
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
        let metrics_listener = std::net::TcpListener::bind(args.metrics).map_err(|e| {
            anyhow::anyhow!(
                "cannot listen on {} for /metrics: {e}; {}",
                args.metrics,
                mesh_daemon::socket::bind_advice(args.metrics, &e, "--metrics")
            )
        })?;
        let metrics = Arc::new(Metrics::new().with_process_metrics());
        let (tokens, mesh_file, kube) = match args.discovery {
            config::Discovery::File => match (args.tokens, args.mesh_file) {
                (Some(t), Some(m)) => (t, m, None),
                _ => anyhow::bail!(
                    "--discovery file needs --tokens and --mesh-file (or pass --discovery kube)"
                ),
            },
            config::Discovery::Kube => {
                let client = mesh_daemon::discovery::kube::client(args.kubeconfig.as_deref())
                    .await
                    .map_err(anyhow::Error::msg)?;
                let placement = identity::cakube::KubePlacement::new(
                    client,
                    args.token_audience.clone(),
                    &args.daemon_service_account,
                )
                .map_err(anyhow::Error::msg)?;
                // The keys outlive the pod: the folder is a working copy of the Secret.
                let source = identity::ca::keys_from_secret(
                    &placement,
                    &args.key_secret,
                    &args.dir,
                    &args.trust_domain,
                )
                .await
                .map_err(anyhow::Error::msg)?;
                info!(secret = %args.key_secret, ?source, "CA keys");
                // The bundle the daemons trust the CA with, and the keys in their Secret, kept
                // in step with the CA's folder (`ca rotate` changes both).
                let dir = args.dir.clone();
                let (cm, secret) = (args.bundle_configmap.clone(), args.key_secret.clone());
                let trust_domain = args.trust_domain.clone();
                let publisher = placement.clone();
                tokio::spawn(async move {
                    let mut published = String::new();
                    let mut stored = identity::ca::key_material(&dir).unwrap_or_default();
                    loop {
                        if let Ok(pem) = tokio::fs::read_to_string(dir.join("bundle.pem")).await
                            && pem != published
                        {
                            match publisher.publish_bundle(&cm, &pem).await {
                                Ok(()) => {
                                    info!(configmap = %cm, "trust bundle published");
                                    published = pem;
                                }
                                Err(e) => warn!(error = %e, "retrying in 2 s"),
                            }
                        }
                        // Only a folder that loads (not one caught mid-rotation, with a new
                        // certificate beside an old key) is stored.
                        if let Ok(now) = identity::ca::key_material(&dir)
                            && now != stored
                            && identity::ca::Authority::load(&dir, &trust_domain).is_ok()
                        {
                            match publisher.store_keys(&secret, &now).await {
                                Ok(()) => {
                                    info!(%secret, "CA keys changed in the folder; stored");
                                    stored = now;
                                }
                                Err(e) => warn!(error = %e, "retrying in 2 s"),
                            }
                        }
                        tokio::time::sleep(std::time::Duration::from_secs(2)).await;
                    }
                });
                (PathBuf::new(), PathBuf::new(), Some(placement))
            }
        };
        let ca = Ca::new(
            CaConfig {
                dir: args.dir,
                listen: args.listen,
                trust_domain: args.trust_domain,
                tokens,
                mesh_file,
                kube,
                lifetime: args.lifetime,
                sans: args.sans,
                rate_limit: args.rate_limit,
            },
            &metrics.registry,
        )
        .await?;
        admin::spawn(
            admin::Listeners {
                metrics: Some(metrics_listener),
                health: None,
                admin: None,
                operator: None,
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
