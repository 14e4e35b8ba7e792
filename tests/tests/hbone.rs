//! Privileged: the HBONE connection pool across two real nodes.

use std::time::Duration;

use nodemesh_tests::{
    require_root,
    topology::{DaemonOpts, PodSpec, ServiceSpec, Topology},
};

const VIP: &str = "10.96.0.10:80";

/// Many first connections at once from one workload to another node share one mTLS handshake:
/// the pool opens a connection once per (source, destination identity, node), however many ask.
#[test]
fn concurrent_first_connections_share_one_handshake() {
    require_root("concurrent_first_connections_share_one_handshake");
    let pods = [
        PodSpec::meshed("client", 0, "client"),
        PodSpec::meshed("server", 1, "echo"),
    ];
    let services = [ServiceSpec::new("echo", "10.96.0.10", 80, 7000, "echo")];
    let mut t = Topology::build("sf", 2, &pods, &services);
    t.start(DaemonOpts::default());
    t.serve("server", "echo-server", 7000);
    let handshakes = |t: &Topology| {
        t.metric(
            0,
            "nodemesh_tls_handshakes_total",
            &[("direction", "outbound"), ("result", "ok")],
        )
    };
    assert_eq!(handshakes(&t), 0, "no connection yet");
    let mut clients: Vec<_> = (0..16)
        .map(|_| t.connect_in_background("client", VIP, &["--send", "65536"]))
        .collect();
    for c in &mut clients {
        let st = c
            .wait_exit(Duration::from_secs(20))
            .expect("each connection finishes");
        assert!(
            st.success() && c.output().contains("echo=ok"),
            "{}",
            c.output()
        );
    }
    let n = handshakes(&t);
    println!("16 concurrent first connections: {n} outbound mTLS handshake(s)");
    assert_eq!(
        n, 1,
        "one handshake for the pool key, not one per connection"
    );
}
