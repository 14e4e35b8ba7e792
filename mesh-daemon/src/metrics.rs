//! Prometheus families of the node daemon (prefix `nodemesh_`). Label sets are bounded: workloads
//! and reasons, never addresses or ports.

use prometheus::{GaugeVec, IntCounterVec, IntGauge, Opts, Registry};

pub struct Metrics {
    pub registry: Registry,
    pub tcp_opened: IntCounterVec,
    pub tcp_closed: IntCounterVec,
    pub tcp_failed: IntCounterVec,
    pub tcp_sent_bytes: IntCounterVec,
    pub tcp_received_bytes: IntCounterVec,
    pub config_reloads: IntCounterVec,
    pub enroll_failures: IntCounterVec,
    pub enrolled: IntGauge,
    pub ebpf_events: IntCounterVec,
    pub tls_handshakes: IntCounterVec,
    pub authz: IntCounterVec,
    pub svid_expiry: GaugeVec,
    pub svid_fetches: IntCounterVec,
}

/// Labels of the per-edge TCP families, in this order. Principals are SPIFFE IDs: the source's
/// as the kernel attributed it (outbound) or as its client certificate proved it (inbound).
pub const EDGE_LABELS: [&str; 7] = [
    "reporter",
    "source_workload",
    "source_namespace",
    "source_principal",
    "destination_workload",
    "destination_namespace",
    "destination_principal",
];
const WL_LABELS: [&str; 7] = EDGE_LABELS;
/// One edge's label values, in [`EDGE_LABELS`] order.
pub type Edge = [String; 7];

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new_custom(Some("nodemesh".into()), None)
            .expect("the prefix is a valid metric name");
        let vec = |name: &str, help: &str, labels: &[&str]| {
            let c = IntCounterVec::new(Opts::new(name, help), labels)
                .expect("static metric definitions are valid");
            registry
                .register(Box::new(c.clone()))
                .expect("each family is registered once");
            c
        };
        Self {
            tcp_opened: vec(
                "tcp_connections_opened_total",
                "TCP connections proxied",
                &WL_LABELS,
            ),
            tcp_closed: vec(
                "tcp_connections_closed_total",
                "TCP connections finished",
                &WL_LABELS,
            ),
            tcp_failed: vec(
                "tcp_connections_failed_total",
                "TCP connections the proxy refused or could not complete, by reason",
                &["reporter", "reason"],
            ),
            tcp_sent_bytes: vec(
                "tcp_sent_bytes_total",
                "Bytes sent by the source workload through the proxy",
                &WL_LABELS,
            ),
            tcp_received_bytes: vec(
                "tcp_received_bytes_total",
                "Bytes received by the source workload through the proxy",
                &WL_LABELS,
            ),
            config_reloads: vec(
                "config_reloads_total",
                "Mesh file loads, by result (ok, error: the last good state stays in force)",
                &["result"],
            ),
            enroll_failures: vec(
                "enroll_failures_total",
                "Workloads of this node that could not be enrolled, by reason",
                &["reason"],
            ),
            enrolled: {
                let g = IntGauge::new(
                    "enrolled_workloads",
                    "Pods of this node the kernel captures",
                )
                .expect("static metric definitions are valid");
                registry
                    .register(Box::new(g.clone()))
                    .expect("each family is registered once");
                g
            },
            ebpf_events: vec(
                "ebpf_events_total",
                "Kernel program events (summed per-CPU counters), by event",
                &["event"],
            ),
            tls_handshakes: vec(
                "tls_handshakes_total",
                "mTLS handshakes on HBONE, by direction and result (ok, or why it failed)",
                &["direction", "result"],
            ),
            authz: vec(
                "authorization_decisions_total",
                "L4 authorization decisions at the destination, by result and deciding policy",
                &["result", "policy"],
            ),
            svid_expiry: {
                let g = GaugeVec::new(
                    Opts::new(
                        "svid_expiry_timestamp_seconds",
                        "When the SVID this node holds for an identity expires (Unix time)",
                    ),
                    &["identity"],
                )
                .expect("static metric definitions are valid");
                registry
                    .register(Box::new(g.clone()))
                    .expect("each family is registered once");
                g
            },
            svid_fetches: vec(
                "svid_fetches_total",
                "SVID requests to the CA, by result (issued, renewed, failed)",
                &["result"],
            ),
            registry,
        }
    }

    /// A proxied connection was established on this edge.
    pub fn opened(&self, labels: &Edge) {
        let l: Vec<&str> = labels.iter().map(String::as_str).collect();
        self.tcp_opened.with_label_values(&l).inc();
    }

    /// A proxied connection ended: bytes (from source, to source) and the close.
    pub fn finished(&self, labels: &Edge, result: &std::io::Result<(u64, u64)>) {
        let l: Vec<&str> = labels.iter().map(String::as_str).collect();
        if let Ok((sent, received)) = result {
            self.tcp_sent_bytes.with_label_values(&l).inc_by(*sent);
            self.tcp_received_bytes
                .with_label_values(&l)
                .inc_by(*received);
        }
        self.tcp_closed.with_label_values(&l).inc();
    }

    /// The registry in Prometheus text format.
    pub fn encode(&self) -> String {
        let mut buf = String::new();
        let enc = prometheus::TextEncoder::new();
        // Encoding only fails on invalid families, which `new` rules out.
        let _ = enc.encode_utf8(&self.registry.gather(), &mut buf);
        buf
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Serves `/metrics` (Prometheus text) on its own thread and runtime, so a scrape never competes
/// with the data plane. The listener is bound by the caller first, so a port conflict fails
/// start-up.
pub fn serve(listener: std::net::TcpListener, metrics: std::sync::Arc<Metrics>) {
    use http_body_util::Full;
    use hyper::{Response, StatusCode, body::Bytes, service::service_fn};
    use hyper_util::rt::TokioIo;

    let spawned = std::thread::Builder::new()
        .name("metrics".into())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    tracing::error!(error = %e, "cannot start the metrics runtime; /metrics is off");
                    return;
                }
            };
            rt.block_on(async move {
                let listener = match listener
                    .set_nonblocking(true)
                    .and_then(|()| tokio::net::TcpListener::from_std(listener))
                {
                    Ok(l) => l,
                    Err(e) => {
                        tracing::error!(error = %e, "metrics listener unusable; /metrics is off");
                        return;
                    }
                };
                loop {
                    let Ok((stream, _)) = listener.accept().await else {
                        continue;
                    };
                    let metrics = metrics.clone();
                    tokio::spawn(async move {
                        let svc = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                            let metrics = metrics.clone();
                            async move {
                                let mut resp = if req.uri().path() == "/metrics" {
                                    Response::new(Full::new(Bytes::from(metrics.encode())))
                                } else {
                                    let mut r = Response::new(Full::new(Bytes::from_static(
                                        b"not found; try /metrics\n",
                                    )));
                                    *r.status_mut() = StatusCode::NOT_FOUND;
                                    r
                                };
                                resp.headers_mut().insert(
                                    hyper::header::CONTENT_TYPE,
                                    hyper::header::HeaderValue::from_static(
                                        "text/plain; version=0.0.4",
                                    ),
                                );
                                Ok::<_, std::convert::Infallible>(resp)
                            }
                        });
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(TokioIo::new(stream), svc)
                            .await;
                    });
                }
            });
        });
    if let Err(e) = spawned {
        tracing::error!(error = %e, "cannot start the metrics thread; /metrics is off");
    }
}
