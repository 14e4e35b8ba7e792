//! Prometheus families of the node daemon (prefix `nodemesh_`). Label sets are bounded: workloads
//! and reasons, never addresses or ports.

use prometheus::{
    GaugeVec, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry,
};

pub struct Metrics {
    pub registry: Registry,
    /// The process collector's own registry: its families keep their standard, unprefixed names.
    process: Registry,
    pub tcp_opened: IntCounterVec,
    pub tcp_closed: IntCounterVec,
    pub tcp_failed: IntCounterVec,
    pub tcp_sent_bytes: IntCounterVec,
    pub tcp_received_bytes: IntCounterVec,
    pub config_reloads: IntCounterVec,
    pub enroll_failures: IntCounterVec,
    pub svid_refusals: IntCounterVec,
    pub enrolled: IntGauge,
    pub ebpf_events: IntCounterVec,
    pub tls_handshakes: IntCounterVec,
    pub operator_requests: IntCounterVec,
    pub authz: IntCounterVec,
    pub svid_expiry: GaugeVec,
    pub svid_fetches: IntCounterVec,
    pub ebpf_map_entries: IntGaugeVec,
    pub splices: IntCounterVec,
    pub splice_pauses: IntCounter,
    pub splice_resumes: IntCounter,
    pub splice_overflows: IntCounter,
    /// Sizes of the daemon's own tables (workload ids, balancer endpoints, pooled HBONE
    /// connections, TLS client configurations, SVIDs): each follows the mesh, none only grows.
    pub state_entries: IntGaugeVec,
    /// Connections a drain ended: `finished` on their own, `reset` at the deadline.
    pub drain_connections: IntCounterVec,
    /// HTTP/gRPC requests, counted when the response ends (a gRPC status is in its trailers),
    /// and their latency from the request's headers to the response's end.
    pub requests: IntCounterVec,
    pub request_duration: HistogramVec,
    pub protocol_detections: IntCounterVec,
    /// HTTP connections that ended in a protocol error (malformed, headers too large, header
    /// timeout), by reason.
    pub http_errors: IntCounterVec,
    /// L7 retries by result: `retried`, or `budget_exhausted` (a retry the budget refused).
    pub retries: IntCounterVec,
    /// Endpoints the circuit breaker ejected (consecutive failures, or a failed probe).
    pub ejections: IntCounterVec,
    /// Requests a route's local rate limit refused (429 / RESOURCE_EXHAUSTED).
    pub rate_limited: IntCounterVec,
    /// Access-log lines dropped because the writer was behind.
    pub access_log_dropped: IntCounter,
    /// Kubernetes watches that failed (and were resumed with backoff), by kind.
    pub kube_watch_errors: IntCounterVec,
    /// 1 while a kind's Kubernetes watch is current, 0 from its first failure until it has
    /// listed or watched again (the node serves the last state meanwhile), by kind.
    pub kube_watch_up: IntGaugeVec,
    /// Kubernetes objects left out of the mesh because they are malformed (logged once each).
    pub kube_rejected_objects: IntGauge,
}

/// Labels of the request families, in this order.
pub const REQUEST_LABELS: [&str; 13] = [
    "reporter",
    "source_workload",
    "source_namespace",
    "source_principal",
    "destination_workload",
    "destination_namespace",
    "destination_principal",
    "destination_service",
    "route",
    "response_code",
    // `2xx` ... `5xx`
    "response_class",
    // `failure`: a 5xx, a gRPC status other than OK, or a response stream that broke; else
    // `success` (linkerd's classification)
    "classification",
    "grpc_status",
];

/// Labels of the per-edge TCP families, in this order. Principals are SPIFFE IDs: the source's
/// as the kernel attributed it (outbound) or as its client certificate proved it (inbound).
/// `destination_service` (`namespace/name`, as on the request families) is the service the
/// client dialled (outbound) or the local service whose endpoint the tunnel reached (inbound);
/// `unknown` for a pod dialled directly.
pub const EDGE_LABELS: [&str; 8] = [
    "reporter",
    "source_workload",
    "source_namespace",
    "source_principal",
    "destination_workload",
    "destination_namespace",
    "destination_principal",
    "destination_service",
];
const WL_LABELS: [&str; 8] = EDGE_LABELS;
/// Labels of `tcp_connections_failed_total`: an edge's workloads (no principals: a refusal's
/// source is often unproven) and the reason.
pub const FAILED_LABELS: [&str; 7] = [
    "reporter",
    "source_workload",
    "source_namespace",
    "destination_workload",
    "destination_namespace",
    "destination_service",
    "reason",
];

/// An edge whose two sides the reporter does not know (a connection refused before either was
/// identified).
pub fn unknown_edge(reporter: &str) -> Edge {
    std::array::from_fn(|i| {
        if i == 0 {
            reporter.to_string()
        } else {
            "unknown".to_string()
        }
    })
}
/// One edge's label values, in [`EDGE_LABELS`] order.
pub type Edge = [String; 8];

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new_custom(Some("nodemesh".into()), None)
            .expect("the prefix is a valid metric name");
        // Every family is static: a definition or registration error is a programming error.
        fn reg<C: prometheus::core::Collector + Clone + 'static>(r: &Registry, c: C) -> C {
            r.register(Box::new(c.clone()))
                .expect("each family is registered once");
            c
        }
        let vec = |name: &str, help: &str, labels: &[&str]| {
            let c = IntCounterVec::new(Opts::new(name, help), labels)
                .expect("static metric definitions are valid");
            reg(&registry, c)
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
                "TCP connections the proxy refused or could not complete, by the workloads on \
                 either side (`unknown` where the refusing proxy cannot know it) and a bounded \
                 reason; each is also a `refused` event on /tap with the detail",
                &FAILED_LABELS,
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
                "Loads of the mesh state (mesh file or Kubernetes), by result (ok, error: the last good state stays in force)",
                &["result"],
            ),
            enroll_failures: vec(
                "enroll_failures_total",
                "Workloads of this node that could not be enrolled, by reason and workload",
                &["reason", "workload", "namespace"],
            ),
            svid_refusals: vec(
                "svid_refusals_total",
                "Certificates this node asked the CA for and did not get, by identity and reason \
                 (unauthenticated, forbidden, rate_limited, bad_request, ca_error, unreachable, \
                 untrusted_ca, bad_answer)",
                &["identity", "reason"],
            ),
            enrolled: reg(
                &registry,
                IntGauge::new(
                    "enrolled_workloads",
                    "Pods of this node the kernel captures",
                )
                .expect("static metric definitions are valid"),
            ),
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
            operator_requests: vec(
                "operator_requests_total",
                "Connections and requests on the operator port: served, refused (not_operator: a \
                 mesh certificate that is not an operator's), or the handshake's failure",
                &["result"],
            ),
            authz: vec(
                "authorization_decisions_total",
                "L4 authorization decisions at the destination, by result and deciding policy",
                &["result", "policy"],
            ),
            svid_expiry: reg(
                &registry,
                GaugeVec::new(
                    Opts::new(
                        "svid_expiry_timestamp_seconds",
                        "When the SVID this node holds for an identity expires (Unix time)",
                    ),
                    &["identity"],
                )
                .expect("static metric definitions are valid"),
            ),
            svid_fetches: vec(
                "svid_fetches_total",
                "SVID requests to the CA, by result (issued, renewed, failed)",
                &["result"],
            ),
            ebpf_map_entries: reg(
                &registry,
                IntGaugeVec::new(
                    Opts::new(
                        "ebpf_map_entries",
                        "Entries in the kernel maps the daemon reads, by map (read once a second)",
                    ),
                    &["map"],
                )
                .expect("static metric definitions are valid"),
            ),
            splices: vec(
                "splice_connections_total",
                "Same-node connections under --sockmap on, by how they were relayed: spliced (in \
                 the kernel), closed_early (in user space: one side had closed before the splice \
                 was up), failed (in user space: the splice could not be set up, e.g. a full map)",
                &["result"],
            ),
            splice_pauses: reg(
                &registry,
                IntCounter::new(
                    "splice_pauses_total",
                    "Times a spliced direction paused because its receiver fell more than \
                     --splice-window behind (its bytes then wait in the sender's receive buffer)",
                )
                .expect("static metric definitions are valid"),
            ),
            splice_resumes: reg(
                &registry,
                IntCounter::new(
                    "splice_resumes_total",
                    "Times a paused spliced direction went back to the kernel after its receiver \
                     caught up",
                )
                .expect("static metric definitions are valid"),
            ),
            splice_overflows: reg(
                &registry,
                IntCounter::new(
                    "splice_overflows_total",
                    "Spliced connections reset because one side kept sending while it read \
                     nothing of what it was sent: the kernel held its bytes behind the ones for \
                     it, past --splice-window plus its receive buffer",
                )
                .expect("static metric definitions are valid"),
            ),
            state_entries: reg(
                &registry,
                IntGaugeVec::new(
                    Opts::new(
                        "state_entries",
                        "Entries in the daemon's own tables, by table: workload_ids, \
                         balancer_endpoints, hbone_connections, tls_client_configs, svids, \
                         identity_workers (each follows the mesh; none only grows)",
                    ),
                    &["table"],
                )
                .expect("static metric definitions are valid"),
            ),
            drain_connections: vec(
                "drain_connections_total",
                "Connections open when the daemon began to drain (SIGTERM), by how they ended: \
                 finished within --drain-timeout, or reset at its deadline",
                &["result"],
            ),
            requests: vec(
                "requests_total",
                "HTTP/gRPC requests through the proxy",
                &REQUEST_LABELS,
            ),
            request_duration: reg(
                &registry,
                HistogramVec::new(
                    HistogramOpts::new(
                        "request_duration_seconds",
                        "HTTP/gRPC request latency seen by the proxy, from the request's headers \
                         to the response's end",
                    )
                    .buckets(vec![
                        0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                        5.0, 10.0,
                    ]),
                    &REQUEST_LABELS[..9],
                )
                .expect("static metric definitions are valid"),
            ),
            protocol_detections: vec(
                "protocol_detections_total",
                "Outbound connections to service ports by protocol (http1, h2, opaque) and how it \
                 was known (detected, timeout, server_first, closed, app_protocol)",
                &["protocol", "how"],
            ),
            http_errors: vec(
                "http_errors_total",
                "HTTP connections that ended in a protocol error, by reason",
                &["reporter", "reason"],
            ),
            retries: vec(
                "request_retries_total",
                "Requests sent again by the proxy (retried), or not because the retry budget was \
                 spent (budget_exhausted)",
                &["destination_service", "route", "result"],
            ),
            ejections: vec(
                "endpoint_ejections_total",
                "Endpoints the circuit breaker took out of balancing after consecutive failures",
                &["destination_service", "destination_workload"],
            ),
            rate_limited: vec(
                "requests_rate_limited_total",
                "Requests refused by a route's local rate limit (429, or gRPC RESOURCE_EXHAUSTED), \
                 by the client workload",
                &["destination_service", "route", "source_workload"],
            ),
            access_log_dropped: reg(
                &registry,
                IntCounter::new(
                    "access_log_dropped_total",
                    "Access-log lines dropped because its writer fell behind (requests never wait)",
                )
                .expect("static metric definitions are valid"),
            ),
            kube_watch_errors: vec(
                "kube_watch_errors_total",
                "Kubernetes watches that failed and were resumed with backoff, by kind (the last \
                 state stays in force meanwhile)",
                &["kind"],
            ),
            kube_watch_up: reg(
                &registry,
                IntGaugeVec::new(
                    Opts::new(
                        "kube_watch_up",
                        "1 while a kind's Kubernetes watch is current, 0 while it fails and is \
                         retried with backoff (the node serves the last state meanwhile), by kind",
                    ),
                    &["kind"],
                )
                .expect("static metric definitions are valid"),
            ),
            kube_rejected_objects: reg(
                &registry,
                IntGauge::new(
                    "kube_rejected_objects",
                    "Kubernetes objects left out of the mesh because they are malformed (the log \
                     names each)",
                )
                .expect("static metric definitions are valid"),
            ),
            registry,
            process: Registry::new(),
        }
    }

    /// Adds process CPU, memory, open files and start time under Prometheus' standard names
    /// (`process_cpu_seconds_total`, `process_resident_memory_bytes`, ..., without the
    /// `nodemesh_` prefix, so stock dashboards and alerts find them), for daemons (not tests,
    /// which create many registries in one process).
    pub fn with_process_metrics(self) -> Self {
        let pc = prometheus::process_collector::ProcessCollector::for_self();
        if let Err(e) = self.process.register(Box::new(pc)) {
            tracing::warn!(error = %e, "process metrics unavailable");
        }
        self
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
        let mut families = self.registry.gather();
        families.extend(self.process.gather());
        let _ = enc.encode_utf8(&families, &mut buf);
        buf
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
