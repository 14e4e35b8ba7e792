//! Privileged: how the daemon stops. SIGTERM drains — the listeners close, connections in flight
//! finish (HBONE peers get GOAWAY), those still open at `--drain-timeout` are reset and counted —
//! and every stop stays fail-closed: while no daemon serves, enrolled pods' new connections are
//! refused, never sent direct, until a daemon is back or `mesh-daemon uninstall` runs.

use std::time::{Duration, Instant};

use nodemesh_tests::{
    require_root,
    topology::{DaemonOpts, PodSpec, ServiceSpec, Topology},
};

const VIP: &str = "10.96.0.10:80";
/// The transfer in flight when SIGTERM arrives.
const FIFTY_MB: &str = "52428800";
/// The drain timeout these daemons run with.
const DRAIN: Duration = Duration::from_secs(15);

fn topology(tag: &str) -> Topology {
    let pods = [
        PodSpec::meshed("client", 0, "client"),
        PodSpec::plain("stranger", 0),
        PodSpec::meshed("server", 1, "echo"),
    ];
    let services = [ServiceSpec::new("echo", "10.96.0.10", 80, 7000, "echo")];
    let mut t = Topology::build(tag, 2, &pods, &services);
    t.start(DaemonOpts {
        drain_timeout: Some("15s"),
        ..DaemonOpts::default()
    });
    t
}

/// A client → VIP connection that lasts 40 s, longer than the drain: 400 pieces of 1000 bytes,
/// one every 100 ms.
fn slow_connection(t: &Topology) -> nodemesh_tests::process::Proc {
    t.connect_in_background(
        "client",
        VIP,
        &[
            "--send",
            "400000",
            "--pace-ms",
            "100",
            "--piece-bytes",
            "1000",
        ],
    )
}

/// The `metric …` lines a daemon logs as it exits.
fn exit_metric(log: &str, family_and_labels: &str) -> u64 {
    log.lines()
        .filter_map(|l| l.split_once("metric ").map(|(_, m)| m))
        .find(|m| m.starts_with(family_and_labels))
        .and_then(|m| m.rsplit(' ').next()?.parse::<f64>().ok())
        .map_or(0, |v| v as u64)
}

#[test]
fn sigterm_drains_in_flight_connections_then_stays_fail_closed() {
    require_root("sigterm_drains");
    let mut t = topology("dr");
    let sink = t.serve_with("server", "sink-server", 7001, &["--delay-ms", "2500"]);
    t.serve("server", "echo-server", 7000);
    let server_ip = t.pod("server").ip.clone();
    let sink_addr = format!("{server_ip}:7001");
    let (ok, out) = t.connect("client", VIP, &["--send", "4096"]);
    assert!(ok && out.contains("echo=ok"), "{out}");
    let opened = |t: &Topology, i: usize| {
        t.metric(
            i,
            "nodemesh_tcp_connections_opened_total",
            &[("reporter", if i == 0 { "outbound" } else { "inbound" })],
        )
    };

    // --- The destination's daemon drains: GOAWAY, the tunnel in flight finishes. ---
    let before = opened(&t, 1);
    let mut transfer = t.connect_in_background("client", &sink_addr, &["--send", FIFTY_MB]);
    t.wait_metric(
        1,
        "nodemesh_tcp_connections_opened_total",
        &[("reporter", "inbound")],
        before + 1,
    );
    let start = Instant::now();
    t.sigterm_daemon(1);
    t.daemon(1)
        .wait_for("draining: no new connections", Duration::from_secs(5));
    // A new tunnel to the draining node is refused (its HBONE listener is closed and the pooled
    // connection got GOAWAY): the client is reset by its own node's proxy, never sent direct.
    let (ok, out) = t.connect("client", VIP, &["--send", "1000"]);
    assert!(!ok, "a draining destination takes no new tunnel: {out}");
    println!("destination draining: new connection refused: {out}");
    let st = transfer
        .wait_exit(DRAIN)
        .expect("the transfer in flight finishes within the drain timeout");
    let line = transfer.output();
    assert!(
        st.success() && line.contains(&format!("sent={FIFTY_MB} received=0")),
        "{line}"
    );
    t.servers[sink].wait_for(
        &format!("bytes={FIFTY_MB} pattern=ok"),
        Duration::from_secs(5),
    );
    let exited = t
        .daemon(1)
        .wait_exit(Duration::from_secs(5))
        .expect("the daemon exits once its last connection ends");
    let took = start.elapsed();
    assert!(exited.success(), "{}", t.daemon(1).output());
    let log = t.take_daemon(1).output();
    assert!(log.contains("drained: every connection finished"), "{log}");
    assert_eq!(
        exit_metric(
            &log,
            "nodemesh_drain_connections_total{result=\"finished\"}"
        ),
        1,
        "{log}"
    );
    assert!(took < DRAIN, "drained in {took:?}");
    println!("destination drained in {took:?}: the 50 MiB in flight arrived byte-exact");
    t.start_daemon(1);
    let (ok, out) = t.connect("client", VIP, &["--send", "4096"]);
    assert!(
        ok && out.contains("echo=ok"),
        "a new daemon serves again: {out}"
    );

    // --- The source's daemon drains: one transfer finishes, one outlives the deadline. ---
    let before = opened(&t, 0);
    let mut transfer = t.connect_in_background("client", &sink_addr, &["--send", FIFTY_MB]);
    let mut slow = slow_connection(&t);
    t.wait_metric(
        0,
        "nodemesh_tcp_connections_opened_total",
        &[("reporter", "outbound")],
        before + 2,
    );
    let start = Instant::now();
    t.sigterm_daemon(0);
    t.daemon(0)
        .wait_for("draining: no new connections", Duration::from_secs(5));
    let (ok, out) = t.connect("client", VIP, &["--send", "1000"]);
    assert!(
        !ok && out.contains("ConnectionRefused"),
        "while the source drains a new connection is refused (its listener is closed): {out}"
    );
    let (ok, out) = t.connect(
        "stranger",
        &format!("{server_ip}:7000"),
        &["--send", "1000"],
    );
    assert!(ok, "pods outside the mesh are unaffected: {out}");
    let st = transfer
        .wait_exit(DRAIN)
        .expect("the transfer in flight finishes within the drain timeout");
    let line = transfer.output();
    assert!(
        st.success() && line.contains(&format!("sent={FIFTY_MB} received=0")),
        "{line}"
    );
    t.servers[sink].wait_for_count(
        &format!("bytes={FIFTY_MB} pattern=ok"),
        2,
        Duration::from_secs(5),
    );
    println!(
        "source draining: the 50 MiB in flight finished byte-exact after {:?}",
        start.elapsed()
    );
    let exited = t
        .daemon(0)
        .wait_exit(DRAIN + Duration::from_secs(5))
        .expect("the daemon exits at the drain deadline");
    let took = start.elapsed();
    assert!(exited.success(), "{}", t.daemon(0).output());
    assert!(
        took >= DRAIN && took < DRAIN + Duration::from_secs(5),
        "exited after {took:?}, the drain timeout is {DRAIN:?}"
    );
    let st = slow
        .wait_exit(Duration::from_secs(5))
        .expect("the connection open at the deadline ended");
    let line = slow.output();
    assert!(
        !st.success() && line.contains("ConnectionReset"),
        "a connection still open at the deadline is reset, not closed as if complete: {line}"
    );
    let log = t.take_daemon(0).output();
    assert!(log.contains("drain deadline"), "{log}");
    assert_eq!(
        exit_metric(&log, "nodemesh_drain_connections_total{result=\"reset\"}"),
        1,
        "{log}"
    );
    assert_eq!(
        exit_metric(
            &log,
            "nodemesh_drain_connections_total{result=\"finished\"}"
        ),
        1,
        "{log}"
    );
    println!("source drained: exited after {took:?}; the slow connection was reset: {line}");

    // --- After the drain: fail-closed until a daemon is back. ---
    let start = Instant::now();
    let (ok, out) = t.connect("client", VIP, &["--send", "1000"]);
    assert!(
        !ok && out.contains("ConnectionRefused"),
        "no daemon: a meshed client is refused, not sent direct: {out}"
    );
    assert!(start.elapsed() < Duration::from_secs(1));
    assert!(!t.footprint().progs.is_empty(), "the hooks stay pinned");
    println!("after the drain: refused at once ({:?})", start.elapsed());

    // --- A second signal ends a drain at once. ---
    t.start_daemon(0);
    let before = opened(&t, 0);
    let mut held = slow_connection(&t);
    t.wait_metric(
        0,
        "nodemesh_tcp_connections_opened_total",
        &[("reporter", "outbound")],
        before + 1,
    );
    t.sigterm_daemon(0);
    t.daemon(0)
        .wait_for("draining: no new connections", Duration::from_secs(5));
    let start = Instant::now();
    t.sigterm_daemon(0);
    let exited = t
        .daemon(0)
        .wait_exit(Duration::from_secs(3))
        .expect("a second signal exits at once");
    assert!(exited.success(), "{}", t.daemon(0).output());
    let log = t.take_daemon(0).output();
    assert!(log.contains("second signal"), "{log}");
    println!("second signal: exited after {:?}", start.elapsed());
    let _ = held.wait_exit(Duration::from_secs(5));

    // --- Only `mesh-daemon uninstall` lets pods go direct, and it leaves nothing. ---
    t.daemon(1).terminate(Duration::from_secs(20));
    t.uninstall_and_check_nothing_is_left();
    let (ok, out) = t.connect("client", &format!("{server_ip}:7000"), &["--send", "1000"]);
    assert!(
        ok && out.contains("echo=ok"),
        "uninstalled: direct again: {out}"
    );
    println!("uninstalled: nothing left, the client goes direct: {out}");
}
