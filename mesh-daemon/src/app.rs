//! `mesh-daemon run`, put together: validate the configuration, bind every listener, start
//! observability and identity, attach the kernel hooks, load the first state, serve, and on
//! SIGTERM drain. Part of the binary (anyhow for errors with context, as in `main`); every
//! component it builds lives in the library.
//!
//! A clean stop is fail-closed like a crash: the pinned hooks stay, so while no daemon serves,
//! enrolled pods' connections are refused instead of going out in plaintext. Only `--fail-open`
//! (nothing pinned) or `mesh-daemon uninstall` lets them go direct.

use std::{
    net::SocketAddr,
    os::fd::AsFd,
    sync::{Arc, Mutex},
};

use anyhow::Context as _;
use mesh_common::Counter;
use mesh_daemon::{
    admin::{self, AdminInputs, Observability},
    config::{Config, Discovery, OnOff, RunArgs},
    discovery::{
        self,
        file::FileSource,
        kube::{KubeSource, model::View},
    },
    drain::{self, Drain},
    ebpf::{
        cgroup,
        loader::{Datapath, DatapathConfig},
    },
    enroll::Enroller,
    identity::{
        self,
        manager::{Manager, ManagerConfig},
    },
    meshfile,
    metrics::Metrics,
    proxy::{Inputs, balance::Balancer, hbone, inbound::Inbound, outbound::Outbound},
    state::State,
    tap::Tap,
};
use tracing::{info, warn};

/// Validates the configuration (flags first, then what needs the mesh file), then runs the
/// daemon until it is told to stop and has drained.
pub fn run(args: RunArgs, log: admin::LogControl) -> anyhow::Result<()> {
    // Contradicting flags are refused before anything is read, bound or attached.
    args.check()?;
    let cgroup_root = cgroup::resolve_root(args.cgroup_root.as_deref())?;
    let metrics = Arc::new(Metrics::new().with_process_metrics());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("dataplane")
        .build()
        .context("cannot start the data-plane runtime")?;
    let obs = Arc::new(Observability {
        metrics: metrics.clone(),
        ready: admin::Readiness::default(),
        admin: std::sync::OnceLock::new(),
    });
    let mut early_bound = None;
    let result = rt.block_on(async {
        let (cfg, source) = match args.discovery {
            Discovery::File => {
                // The mesh file must be good at start: there is no earlier state to fall back on.
                let path = args.mesh_file.clone().unwrap_or_default();
                let file = meshfile::load(&path)?;
                let cfg = args.resolve(&discovery::file::to_desired(&file), cgroup_root)?;
                (cfg, Source::File(path))
            }
            Discovery::Kube => {
                // Without a first listing there is no state: wait for the API server (retrying
                // with backoff and saying why), then place this daemon from what it listed.
                // Health and metrics answer meanwhile, so the kubelet's readiness probe (and an
                // operator) reads why the node is not ready rather than a refused connection.
                let config = discovery::kube::config(args.kubeconfig.as_deref())
                    .await
                    .map_err(anyhow::Error::msg)?;
                let view = View {
                    node: args.node.clone().unwrap_or_default(),
                    cgroup_root: cgroup_root.clone(),
                };
                let errors = discovery::kube::WatchErrors::default();
                let _ = obs.ready.watches.set(errors.clone());
                let early = EarlyListeners::bind(&args.metrics, &args.health, args.proxy_mark)?;
                admin::spawn(early.listeners()?, obs.clone())
                    .context("cannot start the observability thread")?;
                early_bound = Some(early);
                let mut source = KubeSource::start(config, view, metrics.clone(), errors)
                    .await
                    .map_err(anyhow::Error::msg)?;
                let first = source.initial().await;
                let cfg = args.resolve(&first.desired, cgroup_root)?;
                (cfg, Source::Kube(Box::new(source), first))
            }
        };
        info!(config = %cfg.dump(), "starting");
        serve(cfg, log, obs, early_bound, source).await
    });
    // Tasks still running (a second signal cut the drain short) are dropped with the runtime;
    // their sockets close, and the pinned hooks keep new connections fail-closed.
    rt.shutdown_timeout(std::time::Duration::from_millis(100));
    result
}

/// The source of the state, before the state exists.
enum Source {
    File(std::path::PathBuf),
    /// Started, with its first model (the one the configuration was resolved from).
    Kube(Box<KubeSource>, discovery::kube::model::Built),
}

/// The metrics and health listeners, bound and served before the first listing from the API
/// server (`--discovery kube`). Their addresses are flags, so they are the configuration's.
struct EarlyListeners {
    metrics: std::net::TcpListener,
    health: std::net::TcpListener,
}

impl EarlyListeners {
    fn bind(metrics: &SocketAddr, health: &SocketAddr, mark: u32) -> anyhow::Result<Self> {
        let early = Self {
            metrics: bind(*metrics, "/metrics", "--metrics")?,
            health: bind(*health, "/ready and /live", "--health")?,
        };
        for l in [&early.metrics, &early.health] {
            mesh_daemon::socket::set_mark(&l.as_fd(), mark)
                .context("cannot mark the proxy's listeners (SO_MARK needs CAP_NET_ADMIN)")?;
        }
        Ok(early)
    }

    /// The observability thread's share: the same sockets.
    fn listeners(&self) -> anyhow::Result<admin::Listeners> {
        Ok(admin::Listeners {
            metrics: Some(self.metrics.try_clone()?),
            health: Some(self.health.try_clone()?),
            admin: None,
            operator: None,
        })
    }
}

/// A listener for `what`, or why not with the fix (`flag` sets the address).
fn bind(addr: SocketAddr, what: &str, flag: &str) -> anyhow::Result<std::net::TcpListener> {
    std::net::TcpListener::bind(addr).map_err(|e| {
        anyhow::anyhow!(
            "cannot listen on {addr} for {what}: {e}; {}",
            mesh_daemon::socket::bind_advice(addr, &e, flag)
        )
    })
}

async fn serve(
    cfg: Config,
    log: admin::LogControl,
    obs: Arc<Observability>,
    early: Option<EarlyListeners>,
    source: Source,
) -> anyhow::Result<()> {
    let metrics = obs.metrics.clone();
    // Bind everything before attaching: a port conflict must fail start-up before anything is
    // captured.
    let out_listeners = Outbound::bind(SocketAddr::V4(cfg.outbound), cfg.outbound_spread.clone())?;
    let in_listener = Inbound::bind(cfg.hbone).await?;
    // Already served (kube discovery) from the flags' addresses, which are the configuration's.
    let (metrics_l, health_l) = match early {
        Some(_) => (None, None),
        None => (
            Some(bind(cfg.metrics, "/metrics", "--metrics")?),
            Some(bind(cfg.health, "/ready and /live", "--health")?),
        ),
    };
    let listeners = admin::Listeners {
        metrics: metrics_l,
        health: health_l,
        admin: Some(bind(cfg.admin, "the admin endpoints", "--admin")?),
        operator: cfg
            .operator
            .map(|a| bind(a, "the operator port", "--operator"))
            .transpose()?,
    };
    // Every listener carries the proxy mark: a sidecar lives in its pod's cgroup, and the pod's
    // STRICT inbound check must let the proxy's own ports through (connections from the app to
    // 15001, from peers to 15008, scrapes and probes).
    let mark = |fd: std::os::fd::BorrowedFd<'_>| {
        mesh_daemon::socket::set_mark(&fd, cfg.proxy_mark)
            .context("cannot mark the proxy's listeners (SO_MARK needs CAP_NET_ADMIN)")
    };
    for l in &out_listeners {
        mark(l.as_fd())?;
    }
    mark(in_listener.as_fd())?;
    for l in [
        &listeners.metrics,
        &listeners.health,
        &listeners.admin,
        &listeners.operator,
    ]
    .into_iter()
    .flatten()
    {
        mark(l.as_fd())?;
    }
    // The mesh source must be an address here, or no local pod could be reached; for a block,
    // its first and last address (a local route holds the whole block, or it is a mistake).
    for ip in [cfg.mesh_source.first(), cfg.mesh_source.last()] {
        std::net::TcpListener::bind((ip, 0)).with_context(|| {
            let fix = if cfg.mesh_source.size() == 1 {
                format!("ip addr add {ip}/32 dev lo")
            } else {
                format!("ip route add local {} dev lo", cfg.mesh_source)
            };
            format!(
                "mesh source {ip} ({}, {}) is not an address of this network namespace; add it \
                 (`{fix}`) or fix the mesh file",
                cfg.what(),
                cfg.mesh_source
            )
        })?;
    }
    let dp_cfg = DatapathConfig {
        cgroup_root: cfg.cgroup_root.clone(),
        proxy_addr: cfg.outbound,
        proxy_mark: cfg.proxy_mark,
        redirect: true,
        capture_all: cfg.capture == mesh_daemon::config::CaptureMode::All,
        sockmap: cfg.sockmap == OnOff::On,
        splice_window: cfg.splice_window,
        mesh_source: cfg.mesh_source,
        spread_ports: cfg.outbound_spread.clone(),
        pin_dir: cfg.pin_dir.clone(),
    };
    // Health and metrics answer from here on (or since the wait for the API server): /ready
    // says what is still missing.
    admin::spawn(listeners, obs.clone()).context("cannot start the observability thread")?;
    // Identity before the kernel: bad CA settings fail start-up before anything is captured.
    let identity = Manager::new(
        ManagerConfig {
            ca_url: cfg.ca.clone(),
            ca_bundle: cfg.ca_bundle.clone(),
            token_file: cfg.token_file.clone(),
            trust_domain: cfg.trust_domain.clone(),
            refresh: cfg.bundle_refresh,
            mark: cfg.proxy_mark,
        },
        metrics.clone(),
    )?;
    identity.start();
    if cfg.operator.is_some() {
        // The operator port serves with this node's own certificate.
        identity.want_node_cert(&cfg.node);
    }
    let _ = obs.ready.identity.set(identity.clone());
    let tls = tokio_rustls::TlsAcceptor::from(
        identity::tls::server_config(identity.clone())
            .context("cannot build the HBONE TLS configuration")?,
    );
    let mut datapath = Datapath::load(&dp_cfg)?;
    let deny_events = datapath.take_deny_events();
    let (kernel_log, kernel_log_sink) = datapath.take_kernel_log();
    if let Some(reader) = kernel_log {
        tokio::spawn(read_kernel_log(reader));
    }
    // NODEMESH_LOG may already ask for the kernel's decisions.
    if let Err(e) = datapath.log_decisions(mesh_daemon::ebpf::kernel_log::wanted()) {
        warn!(error = %e, "cannot switch the kernel's decision log");
    }
    info!(programs = ?datapath.program_names(), fail_closed = cfg.pin_dir.is_some(), pin_dir = ?cfg.pin_dir, "eBPF programs attached");
    obs.ready
        .attached
        .store(true, std::sync::atomic::Ordering::Release);
    let orig = datapath.orig_dst_table();
    let splice = datapath.splice_maps();
    if let Some(maps) = &splice {
        tokio::spawn(mesh_daemon::proxy::splice::run_events(maps.clone()));
    }
    let datapath = Arc::new(Mutex::new(datapath));
    // The state, its first snapshot from the mesh file, and what follows it: enrollment in the
    // kernel and the certificates, each up to date with the first snapshot before "ready".
    let state = Arc::new(State::new(cfg.scope.clone(), cfg.cgroup_root.clone()));
    {
        let state = Arc::downgrade(&state);
        kernel_log_sink.name_pods_with(Box::new(move |id| {
            let snap = state.upgrade()?.snapshot();
            snap.workload(id)
                .map(|w| format!("{}/{}", w.namespace, w.name))
        }));
    }
    let follow: std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> = match source {
        Source::File(path) => {
            let mut source = FileSource::new(path, state.clone(), metrics.clone());
            source.load_initial().map_err(anyhow::Error::msg)?;
            Box::pin(source.run())
        }
        Source::Kube(mut source, first) => {
            source
                .apply(&state, first)
                .map_err(|e| anyhow::anyhow!("the state from Kubernetes is not usable: {e}"))?;
            Box::pin(source.run(state.clone()))
        }
    };
    let tap = Tap::default();
    identity.show_refusals_on(tap.clone());
    let mut enroller = Enroller::new(datapath.clone(), metrics.clone(), cfg.strict())
        .with_tap(tap.clone(), &cfg.trust_domain);
    let unenrolled = enroller.unenrolled();
    let _ = obs.ready.unenrolled.set(unenrolled.clone());
    enroller.reconcile(&state.snapshot());
    tokio::spawn(enroller.run(state.subscribe()));
    identity.follow(state.subscribe());
    tokio::spawn(follow);
    obs.ready
        .loaded
        .store(true, std::sync::atomic::Ordering::Release);
    let access_log = match &cfg.access_log {
        Some(path) => mesh_daemon::tap::AccessLog::open(path).map_err(anyhow::Error::msg)?,
        None => Default::default(),
    };
    let drain = Drain::new();
    let inputs = Arc::new(Inputs {
        orig,
        state,
        metrics: metrics.clone(),
        proxy_mark: cfg.proxy_mark,
        balancer: Balancer::default(),
        hbone: hbone::Client::new(cfg.proxy_mark, identity.clone(), metrics.clone()),
        identity: identity.clone(),
        tls,
        tap: tap.clone(),
        access_log,
        splice,
        drain: drain.clone(),
        l7: Default::default(),
        l7_enabled: cfg.l7 == OnOff::On,
        detect_timeout: cfg.detect_timeout,
        handshake_timeout: cfg.handshake_timeout,
    });
    let ebpf: admin::EbpfDump = {
        // Weak: the admin thread must not keep the programs alive past the daemon.
        let datapath = Arc::downgrade(&datapath);
        let pin_dir = cfg.pin_dir.clone();
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
    // A new log filter also switches the kernel's decision log (target nodemesh::ebpf).
    let log: admin::LogControl = {
        let datapath = Arc::downgrade(&datapath);
        Box::new(move |filter| {
            let r = log(filter);
            if r.is_ok()
                && !filter.is_empty()
                && let Some(dp) = datapath.upgrade()
            {
                let on = mesh_daemon::ebpf::kernel_log::wanted();
                let mut dp = dp.lock().unwrap_or_else(|p| p.into_inner());
                if let Err(e) = dp.log_decisions(on) {
                    warn!(error = %e, "cannot switch the kernel's decision log");
                }
            }
            r
        })
    };
    let _ = obs.admin.set(AdminInputs {
        state: inputs.state.clone(),
        identity,
        tap,
        log,
        ebpf,
        config: cfg.dump(),
        unenrolled,
    });
    let outbound = Outbound::new(out_listeners, inputs.clone());
    let inbound = Inbound::new(in_listener, inputs.clone());
    info!(outbound = %outbound.local_addr()?, hbone = %cfg.hbone, metrics = %cfg.metrics, health = %cfg.health, admin = %cfg.admin, operator = ?cfg.operator, inbound = ?cfg.inbound, "ready");
    let servers = [tokio::spawn(outbound.run()), tokio::spawn(inbound.run())];
    if let Some(events) = deny_events {
        tokio::spawn(mesh_daemon::proxy::kernel_events::run(
            events,
            inputs.clone(),
        ));
    }
    tokio::spawn(mesh_daemon::proxy::prune_caches(
        inputs.clone(),
        inputs.state.subscribe(),
    ));
    // The kernel counters and the tables' sizes, once a second, until the process ends (also
    // while it drains).
    tokio::spawn({
        let datapath = datapath.clone();
        let metrics = metrics.clone();
        let inputs = inputs.clone();
        async move {
            let mut last = vec![0u64; Counter::ALL.len()];
            loop {
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                table_sizes(&metrics, &inputs);
                let (now, maps) = {
                    let dp = datapath.lock().unwrap_or_else(|p| p.into_inner());
                    (dp.counters(), dp.map_occupancy())
                };
                kernel_counters_tick(&metrics, &mut last, &now);
                for (map, n) in maps {
                    metrics
                        .ebpf_map_entries
                        .with_label_values(&[map])
                        .set(n as i64);
                }
            }
        }
    });
    let mut signals = Signals::new();
    let why = signals.next().await;
    // === drain ===
    obs.ready
        .draining
        .store(true, std::sync::atomic::Ordering::Release);
    inputs.hbone.close_all();
    info!(signal = why, open = drain.open(), timeout = ?cfg.drain_timeout, "draining: no new connections; those in flight may finish (HBONE peers get GOAWAY)");
    let outcome = tokio::select! {
        o = drain.run(cfg.drain_timeout) => Some(o),
        why = signals.next() => {
            warn!(signal = why, open = drain.open(), "second signal: exiting without waiting for the drain");
            None
        }
    };
    for s in servers {
        s.abort();
    }
    match outcome {
        Some(drain::Outcome::Finished { took }) => {
            info!(?took, "drained: every connection finished")
        }
        Some(drain::Outcome::Deadline { open }) => warn!(
            reset = metrics.drain_connections.with_label_values(&["reset"]).get(),
            tasks_left = open,
            timeout = ?cfg.drain_timeout,
            "drain deadline: connections still open were reset (raise --drain-timeout to give them longer)"
        ),
        None => {}
    }
    {
        let dp = datapath.lock().unwrap_or_else(|p| p.into_inner());
        let counters: Vec<String> = dp
            .counters()
            .iter()
            .map(|(c, v)| format!("{}={v}", c.name()))
            .collect();
        info!(counters = %counters.join(" "), "kernel counters");
    }
    for line in metrics.encode().lines().filter(|l| !l.starts_with('#')) {
        info!("metric {line}");
    }
    match &cfg.pin_dir {
        Some(dir) => info!(
            pin_dir = %dir.display(),
            "stopped; the hooks stay attached (fail-closed): enrolled pods' connections are refused until a daemon is back. `mesh-daemon uninstall` lets them go direct"
        ),
        // Nothing is pinned: the programs detach as the process ends.
        None => info!("stopped (--fail-open): eBPF programs detached; enrolled pods go direct"),
    }
    anyhow::Ok(())
}

/// `nodemesh_state_entries{table}`: the daemon's own tables, which must follow the mesh.
fn table_sizes(metrics: &Metrics, inputs: &Inputs) {
    let g = |table: &str, n: usize| {
        metrics
            .state_entries
            .with_label_values(&[table])
            .set(n as i64)
    };
    g("workload_ids", inputs.state.workload_ids());
    g("balancer_endpoints", inputs.balancer.len());
    g("hbone_connections", inputs.hbone.pooled());
    g("tls_client_configs", inputs.hbone.configs());
    g("svids", inputs.identity.svids().len());
    g("identity_workers", inputs.identity.workers());
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

/// SIGTERM and SIGINT, as a stream: the first starts the drain, a second ends it.
pub struct Signals {
    term: Option<tokio::signal::unix::Signal>,
}

impl Signals {
    pub fn new() -> Self {
        use tokio::signal::unix::{SignalKind, signal};
        let term = signal(SignalKind::terminate())
            .inspect_err(
                |e| warn!(error = %e, "cannot watch SIGTERM; only Ctrl-C stops the daemon"),
            )
            .ok();
        Self { term }
    }

    /// The next SIGTERM or SIGINT, by name.
    pub async fn next(&mut self) -> &'static str {
        let term = async {
            match &mut self.term {
                Some(t) => {
                    t.recv().await;
                }
                None => std::future::pending::<()>().await,
            }
        };
        tokio::select! {
            () = term => "SIGTERM",
            _ = tokio::signal::ctrl_c() => "SIGINT",
        }
    }
}

/// Reads the capture hooks' decision log (aya-log's ring buffer) as it fills.
async fn read_kernel_log(reader: aya_log::EbpfLogger<mesh_daemon::ebpf::kernel_log::KernelLog>) {
    // SAFETY: the logger owns its ring buffer's map fd, which stays open and unchanged for as long
    // as the `AsyncFd` holds it.
    let registered = unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(reader, tokio::io::Interest::READABLE)
    };
    let mut fd = match registered {
        Ok(fd) => fd,
        Err(e) => {
            warn!(error = %e, "cannot read the kernel's decision log");
            return;
        }
    };
    loop {
        let Ok(mut guard) = fd.readable_mut().await else {
            return;
        };
        guard.get_inner_mut().flush();
        guard.clear_ready();
    }
}
