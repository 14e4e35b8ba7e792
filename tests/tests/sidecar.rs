//! Privileged: sidecar mode — the same daemon, one per pod, inside the pod's network namespace
//! and cgroup, capturing with the same hooks (redirect to 127.0.0.1) and talking HBONE over mTLS
//! to the peer pod's own sidecar.
//!
//! Node 1 holds the client, a same-node server (`near`) and a pod outside the mesh; node 2 holds
//! the server behind the `echo` VIP. Pods are STRICT, so the test also shows that the pod admits
//! its sidecar's HBONE port and its sidecar's loopback source, and nothing else.

use std::time::Duration;

use nodemesh_tests::{
    require_root,
    topology::{DaemonOpts, PodSpec, ServiceSpec, Topology},
};

const VIP: &str = "10.96.0.10:80";
const MIB: usize = 1 << 20;

#[test]
fn sidecars_capture_in_the_pod_and_speak_mtls_to_the_peer_sidecar() {
    require_root("sidecars_capture_in_the_pod");
    let pods = [
        PodSpec::meshed("client", 0, "client"),
        PodSpec::meshed("near", 0, "near"),
        PodSpec::plain("stranger", 0),
        PodSpec::meshed("server", 1, "echo"),
    ];
    let services = [ServiceSpec::new("echo", "10.96.0.10", 80, 7000, "echo")];
    let mut t = Topology::build("sc", 2, &pods, &services);
    t.start(DaemonOpts {
        sidecar: true,
        inbound: "strict",
        ..DaemonOpts::default()
    });
    assert!(
        t.daemons.iter().all(Option::is_none),
        "sidecar mode runs no node daemon"
    );
    let srv = t.serve("server", "echo-server", 7000);
    let near_srv = t.serve("near", "echo-server", 7000);
    let server_ip = t.pod("server").ip.clone();

    // Through the VIP, 1 MiB each way, byte-exact; the app still sees the VIP as its peer.
    let (ok, out) = t.connect("client", VIP, &["--send", &MIB.to_string()]);
    assert!(
        ok && out.contains("echo=ok") && out.contains(&format!("peer={VIP}")),
        "{out}\n{}",
        t.sidecar("client").output()
    );
    println!("client → server by VIP: {out}");
    // The client's own sidecar captured it and tunnelled to the server pod's sidecar, not to a
    // node.
    let line = t
        .sidecar("client")
        .wait_for("captured connection", Duration::from_secs(5));
    assert!(
        line.contains("workload=demo/client") && line.contains(&format!("via {server_ip}:15008")),
        "{line}"
    );
    println!("  client's sidecar: {line}");
    // The server app sees its own sidecar's loopback source (127.0.0.6), as under Istio.
    let seen = t.servers[srv].wait_for("accepted peer=127.0.0.6:", Duration::from_secs(5));
    println!("  server app: {seen}");
    let line = t
        .sidecar("server")
        .wait_for("inbound tunnel", Duration::from_secs(5));
    assert!(
        line.contains("source_principal=spiffe://cluster.local/ns/demo/sa/client-sa"),
        "{line}"
    );
    println!("  server's sidecar: {line}");

    // Same node: a sidecar has no in-process shortcut; it goes to the peer's sidecar over mTLS.
    let near = format!("{}:7000", t.pod("near").ip);
    let (ok, out) = t.connect("client", &near, &["--send", "65536"]);
    assert!(ok && out.contains("echo=ok"), "{out}");
    t.servers[near_srv].wait_for("accepted peer=127.0.0.6:", Duration::from_secs(5));
    let inbound_ok = [("direction", "inbound"), ("result", "ok")];
    assert!(
        t.wait_pod_metric("near", "nodemesh_tls_handshakes_total", &inbound_ok, 1) >= 1,
        "the same-node peer's sidecar terminated mTLS"
    );

    // Each side counted the edge with both principals.
    let edge = [
        ("source_workload", "client"),
        ("destination_workload", "server"),
        (
            "source_principal",
            "spiffe://cluster.local/ns/demo/sa/client-sa",
        ),
        (
            "destination_principal",
            "spiffe://cluster.local/ns/demo/sa/server-sa",
        ),
    ];
    let outbound = [&[("reporter", "outbound")], &edge[..]].concat();
    let inbound = [&[("reporter", "inbound")], &edge[..]].concat();
    let sent = MIB as u64;
    assert_eq!(
        t.wait_pod_metric("client", "nodemesh_tcp_sent_bytes_total", &outbound, sent),
        sent
    );
    assert_eq!(
        t.wait_pod_metric("server", "nodemesh_tcp_sent_bytes_total", &inbound, sent),
        sent
    );
    // A sidecar holds only its own pod's identity.
    let client_metrics = t.scrape_pod("client");
    let held: Vec<&str> = client_metrics
        .lines()
        .filter(|l| l.starts_with("nodemesh_svid_expiry_timestamp_seconds{"))
        .collect();
    assert!(
        held.len() == 1 && held[0].contains("client-sa"),
        "the client's sidecar holds: {held:?}"
    );

    // STRICT: a pod outside the mesh cannot reach the app port directly …
    let direct = format!("{server_ip}:7000");
    let (ok, out) = t.connect(
        "stranger",
        &direct,
        &["--send", "10", "--connect-timeout-ms", "1000"],
    );
    assert!(
        !ok,
        "plaintext to a STRICT sidecar pod must not connect: {out}"
    );
    assert!(
        t.wait_pod_metric(
            "server",
            "nodemesh_ebpf_events_total",
            &[("event", "inbound_denied")],
            1
        ) >= 1
    );
    // … while its SYN to the sidecar's HBONE port passes the kernel, and the sidecar refuses the
    // plaintext and counts it.
    let hbone = format!("{server_ip}:15008");
    let (ok, out) = t.connect("stranger", &hbone, &["--send", "64"]);
    assert!(!ok || !out.contains("echo=ok"), "{out}");
    assert!(
        t.wait_pod_metric(
            "server",
            "nodemesh_tls_handshakes_total",
            &[("direction", "inbound"), ("result", "garbage")],
            1
        ) >= 1,
        "{}",
        t.sidecar("server").output()
    );
    // And the mesh kept working.
    let (ok, out) = t.connect("client", VIP, &["--send", "4096"]);
    assert!(ok && out.contains("echo=ok"), "{out}");

    // A sidecar for a pod the mesh file gives to its node daemon is refused with the fix.
    let yaml = std::fs::read_to_string(t.mesh_file_path()).expect("mesh file");
    let node_mode = yaml.replacen("mode: sidecar", "mode: node", 1);
    let wrong = t.mesh_file_path().with_extension("node-mode.yaml");
    std::fs::write(&wrong, node_mode).expect("write");
    let real = t.sidecar_command(0);
    let mut cmd = std::process::Command::new(real.get_program());
    let mut args: Vec<std::ffi::OsString> = real.get_args().map(Into::into).collect();
    let at = args
        .iter()
        .position(|a| a == "--mesh-file")
        .expect("--mesh-file");
    args[at + 1] = wrong.clone().into_os_string();
    cmd.args(args);
    let out = cmd.output().expect("run a misconfigured sidecar");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("set `mode: sidecar`") && !err.contains("panicked"),
        "{err}"
    );
    println!("misconfigured sidecar: {}", err.trim());

    // A clean exit stays fail-closed; `mesh-daemon uninstall` then detaches every sidecar's
    // programs.
    let names: Vec<String> = ["client", "near", "server"].map(String::from).to_vec();
    for n in &names {
        let st = t.sidecar(n).terminate(Duration::from_secs(10));
        let log = t.sidecar(n).output();
        assert!(
            st.success() && log.contains("the hooks stay attached (fail-closed)"),
            "{log}"
        );
    }
    let ours = t.footprint();
    assert!(
        !ours.progs.is_empty(),
        "a clean stop keeps the pinned hooks"
    );
    for n in &names {
        println!("{}", nodemesh_tests::uninstall(&t.sidecar_pin_dir(n)));
    }
    std::thread::sleep(Duration::from_millis(300));
    ours.assert_gone("after the sidecars' uninstall");
}
