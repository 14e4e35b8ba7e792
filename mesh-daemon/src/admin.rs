//! The node's operator endpoints, all served off the data plane (one small runtime on its own
//! thread, see [`spawn`]):
//!
//! - `:15020` `/metrics` — Prometheus text.
//! - `:15021` `/live` (the process answers) and `/ready` (programs attached, first state loaded,
//!   an SVID for every local identity), each 200 or 503 with the reason.
//! - `127.0.0.1:15000` admin: `/config_dump` (JSON), `/logging` (GET shows, POST `?level=`
//!   changes), `/debug/ebpf` (programs, counters, map occupancy), `/tap` (NDJSON stream of
//!   connection events, filtered by `workload`, `namespace`, `path`, `status`). Connections from
//!   anything but loopback are refused even if the listener was bound wider.
//! - `<node address>:15010` operator port: all of the above over mutual TLS — the node's own
//!   certificate (`spiffe://<td>/node/<name>`) as server, and only operator certificates
//!   (`spiffe://<td>/operator/<name>`, from `mesh-daemon ca issue-operator`) served; each request
//!   is logged with the operator's name.

use std::{
    collections::BTreeMap,
    convert::Infallible,
    net::SocketAddr,
    sync::{
        Arc, OnceLock,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, SystemTime},
};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper::{Request, Response, StatusCode, body::Incoming, service::service_fn};
use hyper_util::rt::TokioIo;
use tokio::sync::broadcast;
use tracing::{info, warn};

use crate::{
    identity::manager::Manager,
    metrics::Metrics,
    state::State,
    tap::{Tap, TapEvent, TapFilter, percent_decode},
};

type Body = BoxBody<Bytes, Infallible>;

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Body> {
    let mut r = Response::new(Full::new(body.into()).boxed());
    *r.status_mut() = status;
    r
}

fn json(value: &serde_json::Value) -> Response<Body> {
    let mut r = text(
        StatusCode::OK,
        serde_json::to_string_pretty(value).unwrap_or_default() + "\n",
    );
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    r
}

// === readiness ===

/// What `/ready` waits for.
#[derive(Default)]
pub struct Readiness {
    pub attached: AtomicBool,
    pub loaded: AtomicBool,
    /// Set when the drain begins (SIGTERM): not ready from then on.
    pub draining: AtomicBool,
    pub identity: OnceLock<Arc<Manager>>,
    /// Local pods that cannot be enrolled (set once the enroller runs).
    pub unenrolled: OnceLock<crate::enroll::Unenrolled>,
    /// Kubernetes watches failing now (set under `--discovery kube`).
    pub watches: OnceLock<crate::discovery::kube::WatchErrors>,
}

impl Readiness {
    /// Ready, but something serves from less than the whole truth, each with its reason: local
    /// pods that cannot be enrolled (their connections are not captured), Kubernetes watches
    /// that fail (the last state stays in force, so changes since are not seen). The node stays
    /// ready — one bad pod or an API server restart must not take its node's proxy out of
    /// service — and says so.
    pub fn degraded(&self) -> Option<String> {
        let mut lines = Vec::new();
        if let Some(pods) = self.unenrolled.get() {
            let pods = pods.lock().unwrap_or_else(|p| p.into_inner());
            lines.extend(
                pods.iter()
                    .map(|(pod, why)| format!("pod {pod} cannot be enrolled: {why}")),
            );
        }
        if let Some(watches) = self.watches.get() {
            lines.extend(crate::discovery::kube::describe_watch_errors(watches));
        }
        (!lines.is_empty()).then(|| lines.join("; "))
    }

    /// Ok, or the first thing still missing.
    pub fn check(&self) -> Result<(), String> {
        if self.draining.load(Ordering::Acquire) {
            return Err("draining: the daemon is shutting down".into());
        }
        let loaded = self.loaded.load(Ordering::Acquire);
        if !loaded {
            // Under --discovery kube nothing is attached before the first listing: while the
            // API server cannot be read, that is the reason to give.
            let waiting = self
                .watches
                .get()
                .map(crate::discovery::kube::describe_start_errors)
                .unwrap_or_default();
            if !waiting.is_empty() {
                return Err(format!(
                    "the first mesh state is not loaded yet: {}",
                    waiting.join("; ")
                ));
            }
        }
        if !self.attached.load(Ordering::Acquire) {
            return Err("eBPF programs are not attached yet".into());
        }
        if !loaded {
            return Err("the first mesh state is not loaded yet".into());
        }
        match self.identity.get() {
            None => Err("the certificate manager has not started".into()),
            Some(m) => match m.missing() {
                missing if missing.is_empty() => Ok(()),
                missing => Err(format!(
                    "no SVID yet for {}",
                    missing
                        .iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join(", ")
                )),
            },
        }
    }
}

// === the server ===

/// The levels a log filter names.
pub const LOG_LEVELS: [&str; 6] = ["trace", "debug", "info", "warn", "error", "off"];

/// Checks a log filter before it replaces the running one. `tracing`'s own syntax reads a bare
/// word as a target enabled at every level, so a misspelt level (`debu`) would silence all logs;
/// here every directive must name a level: `debug`, or `target=debug` (spans and fields allowed
/// before the `=`).
pub fn check_log_filter(filter: &str) -> Result<(), String> {
    let allowed = LOG_LEVELS.join(", ");
    if filter.trim().is_empty() {
        return Err(format!(
            "an empty filter; give a level ({allowed}) or target=level"
        ));
    }
    // At most one directive may filter on span fields (`target[span{field=value}]=level`):
    // tracing-subscriber's debug builds assert, and so panic, when two directives with field
    // value filters order as equal (its `ValueMatch` orders two equal plain-string values as
    // equal without comparing them equal), and its parser reads different texts as the same
    // field value, so no check of the text can tell which pairs those are (both found by the
    // admin_query fuzz target). Field filters are only parsed inside `{...}`.
    let mut with_fields: Option<&str> = None;
    for directive in filter.split(',').map(str::trim) {
        if directive.contains('{') {
            if let Some(first) = with_fields {
                return Err(format!(
                    "{first:?} and {directive:?} both filter on span fields; one directive of a \
                     filter may (tracing cannot order two such directives safely)"
                ));
            }
            with_fields = Some(directive);
        }
        let level = directive.rsplit_once('=').map_or(directive, |(_, l)| l);
        if directive
            .rsplit_once('=')
            .is_some_and(|(t, _)| t.trim().is_empty())
        {
            return Err(format!("{directive:?} names no target before '='"));
        }
        if !LOG_LEVELS
            .iter()
            .any(|l| l.eq_ignore_ascii_case(level.trim()))
        {
            return Err(format!(
                "{directive:?} names no level; the levels are {allowed}, as a level alone \
                 (debug) or for a target (mesh_daemon::proxy=debug)"
            ));
        }
    }
    Ok(())
}

/// A checked log filter (`NODEMESH_LOG`, `/logging`), its field values read as plain strings:
/// tracing's default compiles each into a regular-expression automaton, whose construction a
/// crafted filter can make take seconds (found by the `admin_query` fuzz target: a 300-byte
/// filter stalled the observability thread — and with it /metrics and /ready — for over 10 s).
pub fn log_filter(filter: &str) -> Result<tracing_subscriber::EnvFilter, String> {
    check_log_filter(filter)?;
    // As check_log_filter reads it: spaces around a directive are not part of it.
    let directives: Vec<&str> = filter.split(',').map(str::trim).collect();
    tracing_subscriber::EnvFilter::builder()
        .with_regex(false)
        .parse(directives.join(","))
        .map_err(|e| format!("{filter:?}: {e}; use e.g. debug or info,mesh_daemon::proxy=debug"))
}

/// The new filter a `POST /logging?level=<filter>` asks for (percent-decoded), if it gives one.
pub fn logging_filter(query: &str) -> Option<String> {
    query
        .split('&')
        .find_map(|p| p.strip_prefix("level="))
        .and_then(percent_decode)
        .filter(|l| !l.is_empty())
}

/// Changes the log filter at run time (`/logging`).
pub type LogControl = Box<dyn Fn(&str) -> Result<String, String> + Send + Sync>;
/// Summarises the kernel side for `/debug/ebpf`.
pub type EbpfDump = Box<dyn Fn() -> serde_json::Value + Send + Sync>;

/// What the admin endpoints read; set once the daemon has it (until then they answer 503).
pub struct AdminInputs {
    pub state: Arc<State>,
    pub identity: Arc<Manager>,
    pub tap: Tap,
    pub log: LogControl,
    pub ebpf: EbpfDump,
    /// The daemon's configuration, as started.
    pub config: serde_json::Value,
    /// Local pods that cannot be enrolled now, and why (each workload's `enrollment`).
    pub unenrolled: crate::enroll::Unenrolled,
}

/// Everything the observability thread serves.
pub struct Observability {
    pub metrics: Arc<Metrics>,
    pub ready: Readiness,
    pub admin: OnceLock<AdminInputs>,
}

/// The listeners, bound by `main` before anything is attached (the CA serves only metrics).
pub struct Listeners {
    pub metrics: Option<std::net::TcpListener>,
    pub health: Option<std::net::TcpListener>,
    pub admin: Option<std::net::TcpListener>,
    /// The operator port (mTLS, operator certificates only).
    pub operator: Option<std::net::TcpListener>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Port {
    Metrics,
    Health,
    Admin,
    /// Every endpoint of the three above, over mTLS to operators.
    Operator,
}

/// How long an operator connection may take to finish its TLS handshake.
const OPERATOR_HANDSHAKE: Duration = Duration::from_secs(10);

/// Who is on the other end of an operator connection: the operator's name, or why they are
/// refused (answered 403 to each request, so the caller reads the reason).
fn operator_of(conn: &rustls::ServerConnection, trust_domain: &str) -> Result<String, String> {
    let Some(leaf) = conn.peer_certificates().and_then(|c| c.first()) else {
        return Err("no client certificate".into());
    };
    let uri = crate::identity::spiffe_uri(leaf).map_err(|e| e.to_string())?;
    match crate::identity::Role::Operator.parse(&uri) {
        Some((td, name)) if td == trust_domain => Ok(name.to_string()),
        _ => Err(format!(
            "{uri} is not an operator of trust domain {trust_domain:?}; the operator port serves \
             only certificates from `mesh-daemon ca issue-operator` (spiffe://{trust_domain}/\
             operator/<name>)"
        )),
    }
}

/// Starts the observability thread: its own current-thread runtime, so a scrape or a tap never
/// competes with the data plane's workers.
pub fn spawn(listeners: Listeners, obs: Arc<Observability>) -> std::io::Result<()> {
    let Listeners {
        metrics,
        health,
        admin,
        operator,
    } = listeners;
    let listeners: Vec<(std::net::TcpListener, Port)> = [
        (metrics, Port::Metrics),
        (health, Port::Health),
        (admin, Port::Admin),
        (operator, Port::Operator),
    ]
    .into_iter()
    .filter_map(|(l, p)| l.map(|l| (l, p)))
    .collect();
    for (l, _) in &listeners {
        l.set_nonblocking(true)?;
    }
    std::thread::Builder::new()
        .name("observability".into())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    tracing::error!(error = %e, "cannot start the observability runtime");
                    return;
                }
            };
            rt.block_on(async move {
                let mut tasks = Vec::new();
                for (l, port) in listeners {
                    match tokio::net::TcpListener::from_std(l) {
                        Ok(l) => tasks.push(tokio::spawn(accept(l, port, obs.clone()))),
                        Err(e) => tracing::error!(error = %e, "observability listener unusable"),
                    }
                }
                for t in tasks {
                    let _ = t.await;
                }
            });
        })?;
    Ok(())
}

async fn accept(listener: tokio::net::TcpListener, port: Port, obs: Arc<Observability>) {
    loop {
        let Ok((stream, peer)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        if port == Port::Admin && !peer.ip().is_loopback() {
            warn!(%peer, "admin connection from outside loopback refused");
            continue;
        }
        let obs = obs.clone();
        if port == Port::Operator {
            tokio::spawn(serve_operator(stream, peer, obs));
            continue;
        }
        tokio::spawn(async move {
            let svc = service_fn(move |req: Request<Incoming>| {
                let obs = obs.clone();
                async move { Ok::<_, Infallible>(route(&obs, port, peer, req).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

/// One operator connection: mutual TLS (the node certificate; a client certificate of the mesh
/// required), then every request answered as its own port would — but only to an operator, and
/// each one logged with the operator's name.
async fn serve_operator(stream: tokio::net::TcpStream, peer: SocketAddr, obs: Arc<Observability>) {
    let count = |result: &str| {
        obs.metrics
            .operator_requests
            .with_label_values(&[result])
            .inc()
    };
    let Some(inputs) = obs.admin.get() else {
        return; // starting: no certificate manager yet
    };
    let tls = match crate::identity::tls::operator_server_config(inputs.identity.clone()) {
        Ok(c) => c,
        Err(e) => {
            warn!(error = %e, "cannot build the operator port's TLS configuration");
            return;
        }
    };
    let accepted = tokio::time::timeout(
        OPERATOR_HANDSHAKE,
        tokio_rustls::TlsAcceptor::from(tls).accept(stream),
    )
    .await;
    let stream = match accepted {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            let label = crate::identity::tls::failure_label(&e);
            count(label);
            let why = if inputs.identity.node_cert().is_none() {
                " (this node has no node certificate from the CA yet)".to_string()
            } else {
                String::new()
            };
            warn!(%peer, error = %e, "operator connection refused in its TLS handshake{why}");
            return;
        }
        Err(_) => {
            count("timeout");
            return;
        }
    };
    let who = operator_of(stream.get_ref().1, inputs.identity.trust_domain());
    if let Err(why) = &who {
        warn!(%peer, reason = %why, "operator port: refused a certificate that is not an operator's");
    }
    let who = Arc::new(who);
    let svc = service_fn(move |req: Request<Incoming>| {
        let obs = obs.clone();
        let who = who.clone();
        async move {
            let r = match &*who {
                Err(why) => {
                    obs.metrics
                        .operator_requests
                        .with_label_values(&["not_operator"])
                        .inc();
                    text(StatusCode::FORBIDDEN, format!("refused: {why}\n"))
                }
                Ok(name) => {
                    obs.metrics
                        .operator_requests
                        .with_label_values(&["served"])
                        .inc();
                    info!(operator = %name, %peer, method = %req.method(), path = %req.uri().path(), "operator request");
                    let port = match req.uri().path() {
                        "/metrics" => Port::Metrics,
                        "/live" | "/ready" => Port::Health,
                        _ => Port::Admin,
                    };
                    route(&obs, port, peer, req).await
                }
            };
            Ok::<_, Infallible>(r)
        }
    });
    let _ = hyper::server::conn::http1::Builder::new()
        .serve_connection(TokioIo::new(stream), svc)
        .await;
}

async fn route(
    obs: &Observability,
    port: Port,
    peer: SocketAddr,
    req: Request<Incoming>,
) -> Response<Body> {
    let path = req.uri().path().to_string();
    match (port, path.as_str()) {
        (Port::Metrics, "/metrics") => {
            let mut r = text(StatusCode::OK, obs.metrics.encode());
            r.headers_mut().insert(
                hyper::header::CONTENT_TYPE,
                hyper::header::HeaderValue::from_static("text/plain; version=0.0.4"),
            );
            r
        }
        (Port::Health, "/live") => text(StatusCode::OK, "live\n"),
        (Port::Health, "/ready") => match obs.ready.check() {
            Ok(()) => match obs.ready.degraded() {
                None => text(StatusCode::OK, "ready\n"),
                Some(why) => text(StatusCode::OK, format!("ready, degraded: {why}\n")),
            },
            Err(why) => text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("not ready: {why}\n"),
            ),
        },
        (Port::Admin, _) => match obs.admin.get() {
            None => text(StatusCode::SERVICE_UNAVAILABLE, "starting\n"),
            Some(a) => admin(a, peer, req).await,
        },
        (Port::Metrics, _) => text(StatusCode::NOT_FOUND, "not found; try /metrics\n"),
        (Port::Health, _) => text(StatusCode::NOT_FOUND, "not found; try /ready or /live\n"),
        (Port::Operator, _) => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}

async fn admin(a: &AdminInputs, peer: SocketAddr, req: Request<Incoming>) -> Response<Body> {
    let query = req.uri().query().unwrap_or("").to_string();
    match (req.method().as_str(), req.uri().path()) {
        ("GET", "/config_dump") => json(&config_dump(a)),
        ("GET", "/debug/ebpf") => json(&(a.ebpf)()),
        ("GET", "/logging") => match (a.log)("") {
            Ok(s) => text(StatusCode::OK, format!("{s}\n")),
            Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")),
        },
        ("POST", "/logging") => {
            let Some(level) = logging_filter(&query) else {
                return text(
                    StatusCode::BAD_REQUEST,
                    "give the new filter as ?level=<filter>, e.g. ?level=debug or \
                     ?level=info,mesh_daemon::proxy=debug\n",
                );
            };
            match (a.log)(&level) {
                Ok(s) => {
                    info!(%peer, filter = %level, "log filter changed");
                    text(StatusCode::OK, format!("{s}\n"))
                }
                Err(e) => text(StatusCode::BAD_REQUEST, format!("{e}\n")),
            }
        }
        ("GET", "/tap") => match TapFilter::parse(&query) {
            Ok(filter) => tap_stream(a.tap.subscribe(), filter),
            Err(why) => text(StatusCode::BAD_REQUEST, format!("bad /tap filter: {why}\n")),
        },
        _ => text(
            StatusCode::NOT_FOUND,
            "not found; the admin port serves /config_dump, /logging, /debug/ebpf, /tap\n",
        ),
    }
}

fn tap_stream(mut rx: broadcast::Receiver<Arc<TapEvent>>, filter: TapFilter) -> Response<Body> {
    let (mut tx, body) = http_body_util::channel::Channel::<Bytes, Infallible>::new(64);
    tokio::spawn(async move {
        loop {
            let line = match rx.recv().await {
                Ok(e) if filter.matches(&e) => serde_json::to_string(&*e).unwrap_or_default(),
                Ok(_) => continue,
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    serde_json::json!({ "event": "lagged", "dropped": n }).to_string()
                }
                Err(broadcast::error::RecvError::Closed) => return,
            };
            if tx.send_data(Bytes::from(line + "\n")).await.is_err() {
                return; // the follower went away
            }
        }
    });
    let mut r = Response::new(body.boxed());
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/x-ndjson"),
    );
    r
}

fn config_dump(a: &AdminInputs) -> serde_json::Value {
    use serde_json::json;
    let snap = a.state.snapshot();
    let td = a.identity.trust_domain();
    let unenrolled = a
        .unenrolled
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    let mut workloads: Vec<_> = snap.workloads_by_id.values().collect();
    workloads.sort_by(|x, y| (&x.namespace, &x.name).cmp(&(&y.namespace, &y.name)));
    let workloads: Vec<_> = workloads
        .iter()
        .map(|w| {
            json!({
                "name": w.name,
                "namespace": w.namespace,
                "serviceAccount": w.service_account,
                "identity": w.identity(td).to_string(),
                "node": w.node,
                "mode": w.mode.as_str(),
                "local": snap.is_local(w),
                // Whether this node's kernel captures it: `enrolled`, `failed: <why>` (retried
                // every second), or `remote` (another node's pod).
                "enrollment": if !snap.is_local(w) {
                    "remote".to_string()
                } else {
                    match unenrolled.get(&w.display()) {
                        Some(why) => format!("failed: {why}"),
                        None => "enrolled".to_string(),
                    }
                },
                "ip": w.ip.to_string(),
                "labels": w.labels,
                "cgroup": w.cgroup.display().to_string(),
                "probePorts": w.probe_ports,
                "proxyProtocolPorts": w.proxy_protocol_ports,
            })
        })
        .collect();
    let mut services: BTreeMap<String, serde_json::Value> = BTreeMap::new();
    for (addr, s) in &snap.services {
        services.insert(
            format!("{}/{} {addr}", s.namespace, s.name),
            json!({
                "name": s.name,
                "namespace": s.namespace,
                "address": addr.to_string(),
                "portName": s.port_name,
                "appProtocol": s.protocol,
                "endpoints": s.endpoints.iter().map(|e| json!({
                    "address": e.addr.to_string(),
                    "workload": e.workload.display(),
                })).collect::<Vec<_>>(),
            }),
        );
    }
    let policies: Vec<_> = snap
        .policies
        .iter()
        .map(|p| {
            json!({
                "name": p.name,
                "namespace": p.namespace,
                "selector": p.selector,
                "action": format!("{:?}", p.action).to_uppercase(),
                "from": p.from.iter().map(|f| json!({
                    "principals": f.principals,
                    "namespaces": f.namespaces,
                })).collect::<Vec<_>>(),
                "ports": p.ports,
            })
        })
        .collect();
    let unix = |t: SystemTime| {
        t.duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs()
    };
    let certificates: Vec<_> = a
        .identity
        .svids()
        .iter()
        .map(|s| {
            let now = SystemTime::now();
            let chain: Vec<_> = s.key.cert.iter().map(|c| describe_cert(c)).collect();
            json!({
                "identity": s.identity.to_string(),
                "serial": chain.first().map(|c| c["serial"].clone()),
                "issuer": chain.first().map(|c| c["issuer"].clone()),
                "notBefore": unix(s.not_before),
                "notAfter": unix(s.not_after),
                "expiresInSeconds": s.not_after.duration_since(now).map(|d| d.as_secs()).unwrap_or(0),
                "renewsInSeconds": s.renews_at.duration_since(now).map(|d| d.as_secs()).unwrap_or(0),
                "signer": s.signer,
                "chainLength": s.key.cert.len(),
                "chain": chain,
            })
        })
        .collect();
    // The node's own certificate (the operator port's), when it has one.
    let node_certificate = a.identity.node_cert().map(|c| {
        let now = SystemTime::now();
        json!({
            "identity": c.uri,
            "notAfter": unix(c.not_after),
            "expiresInSeconds": c.not_after.duration_since(now).map(|d| d.as_secs()).unwrap_or(0),
            "renewsInSeconds": c.renews_at.duration_since(now).map(|d| d.as_secs()).unwrap_or(0),
            "chain": c.key.cert.iter().map(|c| describe_cert(c)).collect::<Vec<_>>(),
        })
    });
    let bundle = a.identity.bundle();
    json!({
        "node": snap.node.as_ref().map(|n| json!({
            "name": n.name,
            "address": n.address.to_string(),
            "meshSource": n.mesh_source.to_string(),
        })),
        "config": a.config,
        "workloads": workloads,
        "services": services.into_values().collect::<Vec<_>>(),
        "routes": snap.routes,
        "policies": policies,
        "certificates": certificates,
        "nodeCertificate": node_certificate,
        "trustBundle": {
            "roots": bundle.pems.len(),
            "signer": bundle.signer,
            "certificates": bundle
                .pems
                .iter()
                .flat_map(|p| {
                    use rustls::pki_types::{CertificateDer, pem::PemObject as _};
                    CertificateDer::pem_slice_iter(p.as_bytes()).flatten().collect::<Vec<_>>()
                })
                .map(|c| describe_cert(&c))
                .collect::<Vec<_>>(),
        },
    })
}

/// A certificate as `meshctl config` shows it: subject, SANs, issuer, serial, validity and the
/// fingerprint the CA's signer is named by.
fn describe_cert(der: &[u8]) -> serde_json::Value {
    use x509_parser::prelude::{FromDer as _, GeneralName, X509Certificate};
    let fingerprint = crate::identity::ca::fingerprint(der);
    match X509Certificate::from_der(der) {
        Ok((_, c)) => {
            let sans: Vec<String> = c
                .subject_alternative_name()
                .ok()
                .flatten()
                .map(|s| {
                    s.value
                        .general_names
                        .iter()
                        .map(|n| match n {
                            GeneralName::URI(u) => (*u).to_string(),
                            GeneralName::DNSName(d) => (*d).to_string(),
                            other => format!("{other:?}"),
                        })
                        .collect()
                })
                .unwrap_or_default();
            serde_json::json!({
                "subject": c.subject().to_string(),
                "subjectAltNames": sans,
                "issuer": c.issuer().to_string(),
                "serial": c.raw_serial_as_string(),
                "notBefore": c.validity().not_before.timestamp(),
                "notAfter": c.validity().not_after.timestamp(),
                "isCa": c.is_ca(),
                "fingerprint": fingerprint,
            })
        }
        Err(e) => serde_json::json!({ "fingerprint": fingerprint, "error": e.to_string() }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_log_filter_must_name_a_level_in_every_directive() {
        for good in [
            "debug",
            "INFO",
            "info,mesh_daemon::proxy=debug",
            "warn, h2=off",
            "mesh_daemon[conn{peer=10.0.0.1}]=trace",
        ] {
            assert_eq!(check_log_filter(good), Ok(()), "{good}");
            assert!(log_filter(good).is_ok(), "{good}");
        }
        // Field values are strings, never compiled as patterns (see log_filter; the fuzz
        // corpus's slow-field-regex input is the regression case, replayed by `cargo xtask test`).
        assert!(log_filter("mesh_daemon[conn{peer=a.*(b|c)+}]=trace").is_ok());
        for (bad, says) in [
            ("debu", "\"debu\" names no level"),
            (
                "info,mesh_daemon::proxy",
                "\"mesh_daemon::proxy\" names no level",
            ),
            ("mesh_daemon=verbose", "names no level"),
            ("=debug", "names no target"),
            ("", "an empty filter"),
            // Found by the admin_query fuzz target: tracing-subscriber's debug builds panicked
            // on two directives for one target and field value (fuzz/corpus/admin_query/
            // duplicate-field-directive and same-field-value-two-texts replay the inputs).
            ("a[{f=x}]=info,a[{f=x}]=debug", "both filter on span fields"),
            (
                "a[{f=x}]=info, b[s{ g = y }]=info",
                "both filter on span fields",
            ),
        ] {
            let e = check_log_filter(bad).expect_err(bad);
            assert!(e.contains(says), "{bad}: {e}");
            if says.contains("level") {
                assert!(e.contains("trace, debug, info, warn, error, off"), "{e}");
            }
        }
    }

    /// The fuzz target's findings, in this (debug) build, where tracing-subscriber's assertion
    /// is live: refused, never a panic.
    #[test]
    fn the_fuzzed_filters_are_refused_without_a_panic() {
        for input in [
            &include_bytes!("../../fuzz/corpus/admin_query/duplicate-field-directive")[..],
            include_bytes!("../../fuzz/corpus/admin_query/same-field-value-two-texts"),
            include_bytes!("../../fuzz/corpus/admin_query/same-field-value-campaign"),
        ] {
            let query = String::from_utf8_lossy(input);
            let level = logging_filter(&query).expect("a level= query");
            assert!(log_filter(&level).is_err(), "{level:?}");
        }
    }

    #[test]
    fn ready_only_after_attach_then_state_then_certificates() {
        let r = Readiness::default();
        let why = r.check().expect_err("nothing done yet");
        assert!(why.contains("not attached"), "{why}");
        r.loaded.store(true, Ordering::Release);
        let why = r.check().expect_err("state alone is not enough");
        assert!(why.contains("not attached"), "{why}");
        r.attached.store(true, Ordering::Release);
        let why = r.check().expect_err("no certificate manager yet");
        assert!(why.contains("certificate manager"), "{why}");
        r.loaded.store(false, Ordering::Release);
        let why = r.check().expect_err("attached, no state");
        assert!(why.contains("mesh state"), "{why}");
    }
}
