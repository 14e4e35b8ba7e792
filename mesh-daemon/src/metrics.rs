//! Prometheus families of the node daemon (prefix `nodemesh_`). Label sets are bounded: workloads
//! and reasons, never addresses or ports.

use prometheus::{IntCounterVec, Opts, Registry};

pub struct Metrics {
    pub registry: Registry,
    pub tcp_opened: IntCounterVec,
    pub tcp_closed: IntCounterVec,
    pub tcp_failed: IntCounterVec,
    pub tcp_sent_bytes: IntCounterVec,
    pub tcp_received_bytes: IntCounterVec,
}

const WL_LABELS: [&str; 3] = ["reporter", "source_workload", "source_namespace"];

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
            registry,
        }
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
