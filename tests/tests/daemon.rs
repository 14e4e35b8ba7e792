//! Privileged: the real `mesh-daemon run` inside a namespace captures an enrolled pod's
//! connection, carries it to the original destination byte-exact, refuses connections without a
//! kernel record, and leaves nothing attached when it exits.

use std::time::Duration;

use nodemesh_tests::{
    loaded_mesh_programs, require_root,
    scenario::{ECHO_PORT, NODE_IP, OUTBOUND_PORT, Scenario},
};

#[test]
fn daemon_proxies_and_detaches() {
    require_root("daemon_proxies_and_detaches");
    let mut s = Scenario::start("d", false);
    let echo = format!("{NODE_IP}:{ECHO_PORT}");

    // Enrolled: through the proxy, 1 MiB echoed byte-exact, and the app still sees the address it
    // dialled.
    let (ok, out) = s.connect_from(&s.client_pod.clone(), &echo, 1 << 20);
    assert!(
        ok,
        "enrolled client failed: {out}\n--- daemon:\n{}",
        s.daemon.output()
    );
    assert!(
        out.contains("echo=ok") && out.contains(&format!("peer={echo}")),
        "{out}"
    );
    let captured = s
        .daemon
        .wait_for("captured connection", Duration::from_secs(5));
    assert!(
        captured.contains("demo/client"),
        "source workload from the kernel record: {captured}"
    );
    println!("enrolled client: {out}\n  daemon: {captured}");

    // Not enrolled: direct; the server sees the client's own address, the daemon nothing new.
    let (ok, out) = s.connect_from(&s.stranger_pod.clone(), &echo, 1000);
    assert!(ok && out.contains("echo=ok"), "{out}");
    let local = out
        .split_whitespace()
        .next()
        .expect("local=")
        .trim_start_matches("local=");
    s.echo
        .wait_for(&format!("accepted peer={local}"), Duration::from_secs(5));
    println!("non-enrolled client went direct: {out}");

    // Bad input: a connection straight to the outbound port has no kernel record. It is refused
    // (reset) and counted, and the daemon keeps serving.
    let (ok, out) = s.connect_from(
        &s.stranger_pod.clone(),
        &format!("{NODE_IP}:{OUTBOUND_PORT}"),
        10,
    );
    assert!(
        !ok || !out.contains("echo=ok"),
        "a recordless connection must not be proxied: {out}"
    );
    s.daemon
        .wait_for("no capture record", Duration::from_secs(5));
    let (ok, out) = s.connect_from(&s.client_pod.clone(), &echo, 4096);
    assert!(
        ok && out.contains("echo=ok"),
        "daemon must keep serving: {out}"
    );

    // A second daemon on the same port fails start-up with the cause, and the first one keeps
    // serving.
    let second = std::process::Command::new("nsenter")
        .arg(format!("--net={}", s.ns.path().display()))
        .arg(nodemesh_tests::bin("mesh-daemon"))
        .args([
            "run",
            "--outbound",
            &format!("{NODE_IP}:{OUTBOUND_PORT}"),
            "--cgroup-root",
        ])
        .arg(s.cgroups.path())
        .output()
        .expect("run second daemon");
    let err = String::from_utf8_lossy(&second.stderr);
    assert!(!second.status.success(), "second daemon must fail: {err}");
    assert!(
        err.contains("cannot listen on") && err.contains("--outbound"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
    let (ok, out) = s.connect_from(&s.client_pod.clone(), &echo, 4096);
    assert!(
        ok && out.contains("echo=ok"),
        "first daemon must keep serving: {out}"
    );

    let status = s.daemon.terminate(Duration::from_secs(10));
    assert!(
        status.success(),
        "daemon exit: {status}\n{}",
        s.daemon.output()
    );
    let log = s.daemon.output();
    assert!(
        log.contains("redirected=3"),
        "kernel counters at exit: {log}"
    );
    assert!(
        log.contains("tcp_connections_failed_total{reason=\"no_record\",reporter=\"outbound\"} 1"),
        "no-record refusal counted: {log}"
    );
    assert!(log.contains("eBPF programs detached"), "{log}");
    assert!(
        log.contains("sockhash_added=0"),
        "--sockmap off adds no socket: {log}"
    );
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        loaded_mesh_programs().is_empty(),
        "left attached: {:?}",
        loaded_mesh_programs()
    );
    println!("daemon exited cleanly; no nm_* program remains loaded");
}

/// `--sockmap on` is refused, with the reason, until the fast path passes this same suite
/// (see the note in mesh-daemon's `run`): an app-visible EAGAIN is not a mode to offer.
#[test]
fn daemon_refuses_sockmap_on_until_fast_path_is_correct() {
    require_root("daemon_refuses_sockmap_on_until_fast_path_is_correct");
    let out = std::process::Command::new(nodemesh_tests::bin("mesh-daemon"))
        .args(["run", "--sockmap", "on"])
        .output()
        .expect("run mesh-daemon");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("--sockmap on is not available yet") && err.contains("--sockmap off"),
        "{err}"
    );
    assert!(
        !err.contains("attached"),
        "it must refuse before touching the kernel: {err}"
    );
}
