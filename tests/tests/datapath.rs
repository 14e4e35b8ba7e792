//! Privileged: the L4 data path across two nodes, with the real daemons and kernel hooks.
//!
//! Node 1 holds the client pod, a pod outside the mesh, a pod that will spoof an address, and a
//! local server; node 2 holds the server behind the `echo` service VIP. Every test builds its own
//! topology and removes it on drop (also on panic).
//!
//! Every suite runs twice, with `--sockmap off` and `--sockmap on` (`<suite>::sockmap_off` and
//! `<suite>::sockmap_on`): the same-node fast path must not change what any client or server sees.
//! With it on, the same-node cases also check that the kernel did the splicing.

use std::time::{Duration, Instant};

use nodemesh_tests::{
    require_root,
    topology::{DaemonOpts, PodSpec, ServiceSpec, Topology, in_mesh_source},
};

const VIP: &str = "10.96.0.10:80";
const MIB: usize = 1 << 20;

/// Runs a suite with `--sockmap off` and with `--sockmap on`.
/// The address in an echo server's `accepted peer=IP:PORT` line.
fn accepted_peer(line: &str) -> std::net::IpAddr {
    let p = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("peer="))
        .unwrap_or_else(|| panic!("no peer= in {line:?}"));
    p.parse::<std::net::SocketAddr>()
        .unwrap_or_else(|e| panic!("{p:?} in {line:?}: {e}"))
        .ip()
}

macro_rules! both_ways {
    ($($suite:ident),* $(,)?) => {$(
        mod $suite {
            #[test]
            fn sockmap_off() {
                super::$suite(false);
            }
            #[test]
            fn sockmap_on() {
                super::$suite(true);
            }
        }
    )*};
}

both_ways!(
    pod_to_pod_across_nodes_by_ip_and_vip_same_node_and_untouched,
    half_close_reset_and_refused_port_pass_end_to_end,
    strict_inbound_admits_only_the_mesh_and_probe_ports,
    spoofed_address_is_identified_by_cgroup,
    fail_closed_while_down_then_uninstall_leaves_nothing,
    fail_open_goes_direct_while_down_and_clean_exit_detaches,
    mesh_file_reloads_and_a_bad_file_keeps_the_last_good_state,
    same_node_connections_of_every_shape,
    a_server_that_does_not_read_pushes_back_on_the_client,
    a_client_that_sends_ahead_of_its_responses,
    proxy_protocol_names_the_client_to_servers_that_ask,
);

/// The default daemon options, with `--sockmap` on or off.
fn with_sockmap(sockmap: bool) -> DaemonOpts {
    DaemonOpts {
        sockmap,
        ..DaemonOpts::default()
    }
}

fn two_nodes(tag: &str, opts: DaemonOpts) -> Topology {
    let pods = [
        PodSpec::meshed("client", 0, "client"),
        PodSpec::plain("stranger", 0),
        PodSpec::meshed("spoofer", 0, "spoofer"),
        PodSpec::meshed("local", 0, "local"),
        PodSpec::meshed("server", 1, "echo").probes(&[8081]),
    ];
    let services = [ServiceSpec::new("echo", "10.96.0.10", 80, 7000, "echo")];
    let mut t = Topology::build(tag, 2, &pods, &services);
    t.start(opts);
    t
}

/// With `--sockmap on`, node 1's same-node connections were spliced in the kernel: at least
/// `connections` of them, every byte moved by `nm_splice` (none relayed in user space), no splice
/// failed, and — with `all` — none was relayed in user space because one side had closed before
/// the splice was up (a client that sends a few bytes and its FIN at once, or a server that
/// resets at once, can beat it; such a connection is relayed as with the fast path off). With it
/// off, nothing was spliced.
fn check_splice(t: &mut Topology, sockmap: bool, connections: u64, all: bool) {
    let events = |e: &str| t.metric(0, "nodemesh_ebpf_events_total", &[("event", e)]);
    let splices = |r: &str| t.metric(0, "nodemesh_splice_connections_total", &[("result", r)]);
    if sockmap {
        let spliced = t.wait_metric(
            0,
            "nodemesh_splice_connections_total",
            &[("result", "spliced")],
            connections,
        );
        let moved = t.wait_metric(
            0,
            "nodemesh_ebpf_events_total",
            &[("event", "splice_redirected")],
            1,
        );
        println!("  spliced connections={spliced}, segments moved by nm_splice={moved}");
        assert!(spliced >= connections, "spliced connections: {spliced}");
        // The dashboard's splice panels have their families (the L7 suite checks the rest).
        let scraped = t.scrape(0);
        for (panel, fam) in nodemesh_tests::dashboard_families() {
            if fam.starts_with("nodemesh_splice_") {
                assert!(
                    scraped
                        .lines()
                        .any(|l| l.split(['{', ' ']).next() == Some(&fam)),
                    "panel {panel:?} queries {fam}, which a splicing daemon does not emit"
                );
            }
        }
        assert!(moved >= 1, "nm_splice moved nothing");
        assert_eq!(splices("failed"), 0, "splices that failed");
        if all {
            assert_eq!(
                splices("closed_early"),
                0,
                "connections closed before the splice"
            );
        }
        assert_eq!(events("splice_no_peer"), 0, "bytes left to user space");
        assert!(
            !t.daemon(0).output().contains("splice accounting"),
            "the proxy read bytes that did not come through the verdict"
        );
    } else {
        assert_eq!(splices("spliced") + events("splice_redirected"), 0);
    }
}

/// The `local=` address a mesh-app line reports.
fn local_of(line: &str) -> String {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix("local="))
        .unwrap_or_default()
        .to_string()
}

fn pod_to_pod_across_nodes_by_ip_and_vip_same_node_and_untouched(sockmap: bool) {
    require_root("pod_to_pod_across_nodes");
    let mut t = two_nodes("dp", with_sockmap(sockmap));
    let server_ip = t.pod("server").ip.clone();
    let srv = t.serve("server", "echo-server", 7000);
    let local_srv = t.serve("local", "echo-server", 7000);
    let server = format!("{server_ip}:7000");

    // By pod IP: 1 MiB each way, byte-exact; the app still sees the address it dialled.
    let (ok, out) = t.connect("client", &server, &["--send", &MIB.to_string()]);
    assert!(
        ok && out.contains("echo=ok") && out.contains(&format!("peer={server}")),
        "{out}\n{}",
        t.daemon(0).output()
    );
    println!("client → server by pod IP: {out}");
    // The server sees the connection from the mesh: node 2's mesh source block, not the client.
    let seen = t.servers[srv].wait_for("accepted peer=", Duration::from_secs(5));
    assert!(in_mesh_source(2, accepted_peer(&seen)), "{seen}");
    println!("  server: {seen}");
    let line = t
        .daemon(0)
        .wait_for("captured connection", Duration::from_secs(5));
    assert!(
        line.contains("workload=demo/client") && line.contains("hbone"),
        "{line}"
    );
    println!("  node-1: {line}");

    // By service VIP: same bytes, through the load balancer.
    let (ok, out) = t.connect("client", VIP, &["--send", &MIB.to_string()]);
    assert!(
        ok && out.contains("echo=ok") && out.contains(&format!("peer={VIP}")),
        "{out}"
    );
    println!("client → server by VIP: {out}");

    // Both daemons counted both connections, with the right workloads on the edge.
    let edge = [
        ("source_workload", "client"),
        ("destination_workload", "server"),
    ];
    let outbound = [&[("reporter", "outbound")], &edge[..]].concat();
    let inbound = [&[("reporter", "inbound")], &edge[..]].concat();
    let bytes = 2 * MIB as u64;
    let out_open = t.wait_metric(0, "nodemesh_tcp_connections_opened_total", &outbound, 2);
    let in_open = t.wait_metric(1, "nodemesh_tcp_connections_opened_total", &inbound, 2);
    let out_bytes = t.wait_metric(0, "nodemesh_tcp_sent_bytes_total", &outbound, bytes);
    let in_bytes = t.wait_metric(1, "nodemesh_tcp_sent_bytes_total", &inbound, bytes);
    println!(
        "counters: node-1 outbound opened={out_open} sent={out_bytes}; node-2 inbound opened={in_open} sent={in_bytes}"
    );
    assert_eq!(out_open, 2, "node-1 outbound connections");
    assert_eq!(in_open, 2, "node-2 inbound connections");
    assert_eq!(
        out_bytes,
        2 * MIB as u64,
        "bytes the client sent, seen by node-1"
    );
    assert_eq!(
        in_bytes,
        2 * MIB as u64,
        "bytes the client sent, seen by node-2"
    );

    // Same node: through the proxy, in-process; the local server sees node 1's mesh source.
    let local = format!("{}:7000", t.pod("local").ip);
    let (ok, out) = t.connect("client", &local, &["--send", &MIB.to_string()]);
    assert!(ok && out.contains("echo=ok"), "{out}");
    let seen = t.servers[local_srv].wait_for("accepted peer=", Duration::from_secs(5));
    assert!(in_mesh_source(1, accepted_peer(&seen)), "{seen}");
    let line = t.daemon(0).wait_for("route=local", Duration::from_secs(5));
    println!("same node: {out}\n  node-1: {line}");
    let local_edge = [
        ("reporter", "outbound"),
        ("source_workload", "client"),
        ("destination_workload", "local"),
    ];
    let sent = t.wait_metric(0, "nodemesh_tcp_sent_bytes_total", &local_edge, MIB as u64);
    let received = t.wait_metric(
        0,
        "nodemesh_tcp_received_bytes_total",
        &local_edge,
        MIB as u64,
    );
    assert_eq!(
        (sent, received),
        (MIB as u64, MIB as u64),
        "same-node bytes"
    );
    check_splice(&mut t, sockmap, 1, true);

    // Not in the mesh: untouched; the server sees the stranger's own address.
    let (ok, out) = t.connect("stranger", &server, &["--send", "1000"]);
    assert!(ok && out.contains("echo=ok"), "{out}");
    let own = local_of(&out);
    t.servers[srv].wait_for(&format!("accepted peer={own}"), Duration::from_secs(5));
    println!("non-meshed pod went direct: {out}");
    // PERMISSIVE inbound lets plaintext in and counts it.
    assert!(
        t.wait_metric(
            1,
            "nodemesh_ebpf_events_total",
            &[("event", "inbound_plaintext")],
            1
        ) >= 1,
        "plaintext inbound counted"
    );

    // A meshed pod's connection to something the mesh does not serve is left alone in the
    // kernel: it goes direct with the pod's own address, "connection refused" stays a refusal
    // (not an accept and a reset), and native IPv6 goes out untouched (no EPERM).
    let stranger_srv = t.serve("stranger", "echo-server", 7000);
    let outside = format!("{}:7000", t.pod("stranger").ip);
    let (ok, out) = t.connect("client", &outside, &["--send", "1000"]);
    assert!(ok && out.contains("echo=ok"), "{out}");
    let own = local_of(&out);
    t.servers[stranger_srv].wait_for(&format!("accepted peer={own}"), Duration::from_secs(5));
    println!("meshed pod → outside the mesh, direct: {out}");
    let (ok, out) = t.connect(
        "client",
        &format!("{}:7999", t.pod("stranger").ip),
        &["--send", "1"],
    );
    assert!(!ok && out.contains("ConnectionRefused"), "{out}");
    let (ok, out) = t.connect(
        "client",
        "[fd00:dead::1]:80",
        &["--send", "1", "--connect-timeout-ms", "1000"],
    );
    println!("meshed pod → native IPv6 outside the mesh: {out}");
    assert!(!ok && !out.contains("PermissionDenied"), "{out}");
    assert!(
        t.wait_metric(
            0,
            "nodemesh_ebpf_events_total",
            &[("event", "left_outside_mesh")],
            3
        ) >= 3,
        "counted as left alone"
    );

    // Bad input: a connection straight to the outbound port has no kernel record. It is reset
    // and counted, and the daemon keeps serving.
    let (ok, out) = t.connect("stranger", "10.203.0.1:15001", &["--send", "10"]);
    assert!(
        !ok || !out.contains("echo=ok"),
        "a recordless connection must not be proxied: {out}"
    );
    t.daemon(0)
        .wait_for("no capture record", Duration::from_secs(5));
    assert!(
        t.wait_metric(
            0,
            "nodemesh_tcp_connections_failed_total",
            &[("reason", "no_record")],
            1
        ) >= 1
    );

    // A second daemon for the same node fails start-up with the cause; the first keeps serving.
    let second = t.daemon_command(0).output().expect("run a second daemon");
    let err = String::from_utf8_lossy(&second.stderr);
    assert!(
        !second.status.success()
            && err.contains("cannot listen on")
            && err.contains("another process holds"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
    let (ok, out) = t.connect("client", VIP, &["--send", "4096"]);
    assert!(
        ok && out.contains("echo=ok"),
        "first daemon must keep serving: {out}"
    );

    // A clean exit (SIGTERM, what a rolling update sends) prints the counters and stays
    // fail-closed: the hooks remain, and a meshed client is refused rather than sent direct.
    for i in 0..2 {
        let st = t.daemon(i).terminate(Duration::from_secs(10));
        let log = t.daemon(i).output();
        assert!(
            st.success() && log.contains("the hooks stay attached (fail-closed)"),
            "{log}"
        );
        let counters = log
            .lines()
            .find(|l| l.contains("kernel counters"))
            .unwrap_or_default()
            .to_string();
        println!("node-{} at exit: {counters}", i + 1);
    }
    let ours = t.footprint();
    assert!(
        !ours.progs.is_empty(),
        "a clean stop keeps the pinned hooks"
    );
    let (ok, out) = t.connect("client", VIP, &["--send", "1000"]);
    assert!(
        !ok && out.contains("ConnectionRefused"),
        "after a clean stop a meshed client must be refused, not sent direct: {out}"
    );
    println!("stopped cleanly: meshed client refused: {out}");
    // `mesh-daemon uninstall` then leaves nothing attached.
    let root = t.pin_dir(0).parent().expect("pin root").to_path_buf();
    println!("{}", nodemesh_tests::uninstall(&root));
    std::thread::sleep(Duration::from_millis(300));
    ours.assert_gone("after uninstall");
}

fn half_close_reset_and_refused_port_pass_end_to_end(sockmap: bool) {
    require_root("half_close_reset_and_refused_port");
    let mut t = two_nodes("hc", with_sockmap(sockmap));
    // PERMISSIVE: a pod's own loopback is not counted as plaintext from outside the mesh.
    own_loopback_is_untouched(&t, "client", 0);
    let ip = t.pod("server").ip.clone();
    let echo = t.serve("server", "echo-server", 7000);
    let count = t.serve("server", "count-server", 7001);
    t.serve("server", "rst-server", 7002);
    let local_ip = t.pod("local").ip.clone();
    let local_echo = t.serve("local", "echo-server", 7000);
    let local_count = t.serve("local", "count-server", 7001);
    t.serve("local", "rst-server", 7002);

    faults_pass_end_to_end(&mut t, &ip, (echo, count), "cross-node", false);
    // Both daemons counted the closed remote port.
    assert!(
        t.wait_metric(
            0,
            "nodemesh_tcp_connections_failed_total",
            &[("reason", "upstream_refused")],
            1
        ) >= 1
    );
    assert!(
        t.wait_metric(
            1,
            "nodemesh_tcp_connections_failed_total",
            &[("reporter", "inbound"), ("reason", "upstream_refused")],
            1
        ) >= 1
    );
    // The same between two pods of node 1: the connections --sockmap on splices. The half-close
    // is paced, so its FIN comes after the splice is up (the test is about passing it through).
    faults_pass_end_to_end(
        &mut t,
        &local_ip,
        (local_echo, local_count),
        "same-node",
        true,
    );
    // The half-close and the client's reset went through the splice (the server's reset may beat
    // it; the refused port never opened).
    check_splice(&mut t, sockmap, 2, false);
}

/// Half-close, a reset from either side and a closed port, between the client and the pod at
/// `ip` (whose `echo`, `count` and reset servers listen on 7000, 7001 and 7002): each behaves as
/// it would without the mesh, promptly.
fn faults_pass_end_to_end(
    t: &mut Topology,
    ip: &str,
    (echo, count): (usize, usize),
    what: &str,
    paced: bool,
) {
    // Half-close: the server answers only after it saw the client's FIN, on the still-open
    // direction.
    let mut args = vec!["--send", "100000", "--reply"];
    if paced {
        args.extend(["--pace-ms", "1"]);
    }
    let (ok, out) = t.connect("client", &format!("{ip}:7001"), &args);
    assert!(ok && out.contains("reply=received=100000"), "{what}: {out}");
    t.servers[count].wait_for("half-close=seen", Duration::from_secs(5));
    println!("{what} half-close: {out}");

    // Reset from the server reaches the client as a reset, promptly.
    let start = Instant::now();
    let (ok, out) = t.connect("client", &format!("{ip}:7002"), &["--send", "10"]);
    let took = start.elapsed();
    assert!(
        !ok && out.contains("ConnectionReset"),
        "{what}: {out}\n--- node-1:\n{}\n--- node-2:\n{}",
        t.daemon(0).output(),
        t.daemon(1).output()
    );
    assert!(
        took < Duration::from_secs(1),
        "{what} server reset took {took:?}"
    );
    println!("{what} server reset → client: {out} ({took:?})");

    // Reset from the client reaches the server as a reset.
    let (ok, out) = t.connect(
        "client",
        &format!("{ip}:7000"),
        &["--send", "1000", "--rst"],
    );
    assert!(ok, "{what}: {out}");
    let line = t.servers[echo].wait_for("error=ConnectionReset", Duration::from_secs(5));
    println!("{what} client reset → server: {line}");

    // A closed port: a reset within a second, not a hang.
    let start = Instant::now();
    let (ok, out) = t.connect("client", &format!("{ip}:7999"), &["--send", "10"]);
    let took = start.elapsed();
    assert!(!ok && out.contains("ConnectionReset"), "{what}: {out}");
    assert!(
        took < Duration::from_secs(1),
        "{what} refusal took {took:?}"
    );
    println!("{what} closed port: {out} ({took:?})");
}

fn strict_inbound_admits_only_the_mesh_and_probe_ports(sockmap: bool) {
    require_root("strict_inbound");
    let mut t = two_nodes(
        "st",
        DaemonOpts {
            inbound: "strict",
            ..with_sockmap(sockmap)
        },
    );
    let ip = t.pod("server").ip.clone();
    t.serve("server", "echo-server", 7000);
    t.serve("server", "echo-server", 8081);

    let (ok, out) = t.connect("client", &format!("{ip}:7000"), &["--send", "4096"]);
    assert!(ok && out.contains("echo=ok"), "meshed client: {out}");
    // The kernel's drop shows on node 2's tap, with the pod, the port and who knocked.
    let mut tap = {
        let mut c = std::process::Command::new("nsenter");
        c.arg(format!("--net={}", t.nodes[1].ns.path().display()))
            .arg(nodemesh_tests::bin("meshctl"))
            .args(["tap", "--workload", "server"]);
        nodemesh_tests::process::Proc::spawn("meshctl tap on node 2", c)
    };
    tap.wait_for("following", Duration::from_secs(5));
    let (ok, out) = t.connect(
        "stranger",
        &format!("{ip}:7000"),
        &["--send", "10", "--connect-timeout-ms", "1500"],
    );
    assert!(!ok, "plaintext to a STRICT pod must not connect: {out}");
    println!("stranger → strict pod: {out}");
    let line = tap.wait_for("strict_plaintext", Duration::from_secs(5));
    println!("  node 2 tap: {line}");
    let stranger = t.pod("stranger").ip.clone();
    assert!(
        line.starts_with("refused inbound")
            && line.contains("-> demo/server")
            && line.contains(&format!("from {stranger}:"))
            && line.contains("port 7000"),
        "{line}"
    );
    let labelled = t.wait_metric(
        1,
        "nodemesh_tcp_connections_failed_total",
        &[
            ("reporter", "inbound"),
            ("destination_workload", "server"),
            ("reason", "strict_plaintext"),
        ],
        1,
    );
    assert!(labelled >= 1, "the drop is counted with the pod's workload");
    let (ok, out) = t.connect("stranger", &format!("{ip}:8081"), &["--send", "10"]);
    assert!(ok && out.contains("echo=ok"), "declared probe port: {out}");
    let denied = t.wait_metric(
        1,
        "nodemesh_ebpf_events_total",
        &[("event", "inbound_denied")],
        1,
    );
    println!("stranger → probe port: {out}; node-2 inbound_denied={denied}");
    assert!(denied >= 1);

    own_loopback_is_untouched(&t, "server", 1);
}

/// The pod's own loopback is its own business: containers of one pod reach each other over
/// 127.0.0.1, 127.0.0.2 and a v4-mapped ::ffff:127.0.0.1 (in STRICT mode too), and nothing is
/// dropped or counted as plaintext on its node (`node`).
fn own_loopback_is_untouched(t: &Topology, pod: &str, node: usize) {
    let p = t.pod(pod);
    let mut cmd = std::process::Command::new(nodemesh_tests::bin("mesh-app"));
    cmd.arg("--cgroup").arg(&p.cgroup).args([
        "--netns",
        p.ns.name(),
        "echo-server",
        "0.0.0.0:7300",
    ]);
    let mut local = nodemesh_tests::process::Proc::spawn("echo-server on the pod's loopback", cmd);
    local.wait_for("listening", Duration::from_secs(5));
    std::thread::sleep(Duration::from_millis(1100)); // kernel counters publish once a second
    let events = |e: &str| t.metric(node, "nodemesh_ebpf_events_total", &[("event", e)]);
    let (denied_before, plaintext_before) = (events("inbound_denied"), events("inbound_plaintext"));
    for addr in [
        "127.0.0.1:7300",
        "127.0.0.2:7300",
        "[::ffff:127.0.0.1]:7300",
    ] {
        let (ok, out) = t.connect(
            pod,
            addr,
            &["--send", "100", "--connect-timeout-ms", "1500"],
        );
        println!("{pod} → its own {addr}: {out}");
        assert!(ok && out.contains("echo=ok"), "{addr}: {out}");
    }
    std::thread::sleep(Duration::from_millis(1100));
    assert_eq!(
        events("inbound_denied"),
        denied_before,
        "loopback SYNs dropped"
    );
    assert_eq!(
        events("inbound_plaintext"),
        plaintext_before,
        "loopback SYNs counted as plaintext"
    );
}

fn spoofed_address_is_identified_by_cgroup(sockmap: bool) {
    require_root("spoofed_address");
    let mut t = two_nodes("sp", with_sockmap(sockmap));
    let ip = t.pod("server").ip.clone();
    t.serve("server", "echo-server", 7000);
    let victim = t.pod("client").ip.clone();
    let spoofer = t.pod("spoofer");
    // The spoofer claims the client's address. For its packets to get answers, node 1 must send
    // that address to the spoofer: the test grants it what winning an ARP race on a shared L2
    // segment would.
    spoofer
        .ns
        .ip(&["addr", "add", &format!("{victim}/32"), "dev", "eth0"]);
    let v_if = format!(
        "v{}",
        t.pods
            .iter()
            .position(|p| p.name == "spoofer")
            .expect("pod")
    );
    t.nodes[0]
        .ns
        .ip(&["route", "replace", &format!("{victim}/32"), "dev", &v_if]);
    let (ok, out) = t.connect(
        "spoofer",
        &format!("{ip}:7000"),
        &["--send", "1000", "--bind", &victim],
    );
    assert!(ok && out.contains(&format!("local={victim}:")), "{out}");
    let line = t
        .daemon(0)
        .wait_for(&format!("peer={victim}:"), Duration::from_secs(5));
    println!("spoofer using {victim}: {out}\n  node-1: {line}");
    assert!(
        line.contains("workload=demo/spoofer"),
        "identity must come from the cgroup, not the address: {line}"
    );
}

fn fail_closed_while_down_then_uninstall_leaves_nothing(sockmap: bool) {
    require_root("fail_closed");
    let mut t = two_nodes("fc", with_sockmap(sockmap));
    let server = format!("{}:7000", t.pod("server").ip);
    t.serve("server", "echo-server", 7000);
    let (ok, out) = t.connect("client", &server, &["--send", "1000"]);
    assert!(ok, "{out}");

    t.crash_daemon(0);
    let start = Instant::now();
    let (ok, out) = t.connect("client", &server, &["--send", "1000"]);
    let took = start.elapsed();
    assert!(
        !ok && out.contains("ConnectionRefused"),
        "daemon down must fail closed: {out}"
    );
    assert!(took < Duration::from_secs(1), "refusal took {took:?}");
    println!("daemon crashed: meshed client refused at once: {out} ({took:?})");
    let (ok, out) = t.connect("stranger", &server, &["--send", "1000"]);
    assert!(ok, "pods outside the mesh are unaffected: {out}");

    // A new daemon takes over the pinned hooks.
    t.start_daemon(0);
    let (ok, out) = t.connect("client", &server, &["--send", "1000"]);
    assert!(ok && out.contains("echo=ok"), "after restart: {out}");
    let taken = t
        .daemon(0)
        .wait_for("removing links left pinned", Duration::from_secs(5));
    println!("restarted: {taken}");

    // Crash both, then `mesh-daemon uninstall` removes every program, link and map.
    t.crash_daemon(0);
    t.crash_daemon(1);
    assert!(
        !t.footprint().progs.is_empty(),
        "pinned hooks outlive a crash"
    );
    t.uninstall_and_check_nothing_is_left();
    let (ok, out) = t.connect("client", &server, &["--send", "1000"]);
    assert!(
        ok && out.contains("echo=ok"),
        "uninstalled: direct again: {out}"
    );
}

fn fail_open_goes_direct_while_down_and_clean_exit_detaches(sockmap: bool) {
    require_root("fail_open");
    let mut t = two_nodes(
        "fo",
        DaemonOpts {
            fail_open: true,
            ..with_sockmap(sockmap)
        },
    );
    let server = format!("{}:7000", t.pod("server").ip);
    let srv = t.serve("server", "echo-server", 7000);
    t.crash_daemon(0);
    let (ok, out) = t.connect("client", &server, &["--send", "1000"]);
    assert!(
        ok && out.contains("echo=ok"),
        "--fail-open goes direct: {out}"
    );
    t.servers[srv].wait_for(
        &format!("accepted peer={}", local_of(&out)),
        Duration::from_secs(5),
    );
    println!("fail-open, daemon down: {out}");
    let ours = t.footprint();
    assert!(
        !ours.progs.is_empty(),
        "node-2's daemon has its hooks attached"
    );
    let st = t.daemon(1).terminate(Duration::from_secs(10));
    assert!(st.success(), "{}", t.daemon(1).output());
    std::thread::sleep(Duration::from_millis(300));
    ours.assert_gone("after a --fail-open daemon's clean exit");
}

fn mesh_file_reloads_and_a_bad_file_keeps_the_last_good_state(sockmap: bool) {
    require_root("mesh_file_reload");
    let mut t = two_nodes("mf", with_sockmap(sockmap));
    t.serve("server", "echo-server", 7000);
    let good = std::fs::read_to_string(&t.mesh_file).expect("mesh file");

    let bad = good.replacen(
        "meshSource: 10.210.2.240/28",
        "meshSource: [10.210.2.240/28",
        1,
    );
    t.rewrite_mesh_file(&bad);
    let line = t
        .daemon(0)
        .wait_for("mesh file rejected", Duration::from_secs(5));
    println!("bad file: {line}");
    assert!(line.contains("line "), "the error names the line: {line}");
    let (ok, out) = t.connect("client", VIP, &["--send", "4096"]);
    assert!(
        ok && out.contains("echo=ok"),
        "last good state still serves: {out}"
    );
    assert!(
        t.wait_metric(
            0,
            "nodemesh_config_reloads_total",
            &[("result", "error")],
            1
        ) >= 1
    );

    // Deleted, emptied (truncated to nothing), or cut in the middle of an entry: each is one
    // warning and one count, and the last good state keeps serving.
    let errors =
        |t: &Topology| t.metric(0, "nodemesh_config_reloads_total", &[("result", "error")]);
    let before = errors(&t);
    std::fs::remove_file(&t.mesh_file).expect("delete the mesh file");
    let line = t
        .daemon(0)
        .wait_for("cannot read the mesh file", Duration::from_secs(5));
    println!("deleted: {line}");
    let mid_entry = good.find("  - name: client").expect("client entry") + "  - name: client".len();
    for (what, text) in [
        ("emptied", String::new()),
        ("cut mid-entry", good[..mid_entry].to_string()),
    ] {
        let rejected = t
            .daemon(0)
            .lines()
            .iter()
            .filter(|l| l.contains("mesh file rejected"))
            .count();
        t.rewrite_mesh_file(&text);
        t.daemon(0)
            .wait_for_count("mesh file rejected", rejected + 1, Duration::from_secs(5));
        let (ok, out) = t.connect("client", VIP, &["--send", "4096"]);
        assert!(
            ok && out.contains("echo=ok"),
            "{what}: the last good state still serves: {out}"
        );
        println!("{what}: rejected, the last good state serves");
    }
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(
        errors(&t),
        before + 3,
        "one count per bad version of the file"
    );
    let warned = t
        .daemon(0)
        .lines()
        .iter()
        .filter(|l| l.contains("cannot read the mesh file"))
        .count();
    assert_eq!(
        warned, 1,
        "one warning while the file is gone, not one a second"
    );

    // A good change applies: the service is gone, so its VIP no longer leads anywhere.
    let cut = good.find("services:").expect("services section");
    t.rewrite_mesh_file(&format!("{}services: []\n", &good[..cut]));
    t.daemon(0)
        .wait_for("service_ports=0", Duration::from_secs(5));
    let (ok, out) = t.connect(
        "client",
        VIP,
        &["--send", "10", "--connect-timeout-ms", "2000"],
    );
    assert!(!ok, "a removed service is not served: {out}");
    println!("service removed by reload: {out}");
}

/// Many same-node connections of every shape, one after the other: tiny and large echoes (the
/// large ones outlast the set-up, so they are spliced), a FIN right behind the first bytes, a
/// half-close answered on the open direction, a server's reset. Each must end as it would without
/// the mesh; with `--sockmap on` the large ones went through the kernel splice. The splice window
/// is the smallest allowed (16 KiB), so the large ones pause and resume many times each: bytes
/// moved in the kernel and bytes relayed by the proxy interleave on every round.
fn same_node_connections_of_every_shape(sockmap: bool) {
    require_root("same_node_connections_of_every_shape");
    let opts = DaemonOpts {
        splice_window: Some("16KiB"),
        ..with_sockmap(sockmap)
    };
    let mut t = two_nodes("sn", opts);
    let ip = t.pod("local").ip.clone();
    t.serve("local", "echo-server", 7000);
    t.serve("local", "count-server", 7001);
    t.serve("local", "rst-server", 7002);
    let cases: [(u16, &[&str], &str); 8] = [
        (7000, &["--send", "1"], "echo=ok"),
        (7000, &["--send", "100"], "echo=ok"),
        (7000, &["--send", "70000"], "echo=ok"),
        (7000, &["--send", "3000000"], "echo=ok"),
        (7000, &["--send", "200000", "--pace-ms", "1"], "echo=ok"),
        (7001, &["--send", "5", "--reply"], "reply=received=5"),
        (
            7001,
            &["--send", "100000", "--reply"],
            "reply=received=100000",
        ),
        (7002, &["--send", "10"], "ConnectionReset"),
    ];
    const ROUNDS: u64 = 8;
    let start = Instant::now();
    for round in 0..ROUNDS {
        for (port, args, want) in cases {
            let (ok, out) = t.connect("client", &format!("{ip}:{port}"), args);
            let reset_expected = want == "ConnectionReset";
            assert!(
                out.contains(want) && ok != reset_expected,
                "round {round}, :{port} {args:?}: {out}\n--- node-1:\n{}",
                t.daemon(0).output()
            );
        }
    }
    println!(
        "{} same-node connections in {:?}, every one as without the mesh",
        ROUNDS * cases.len() as u64,
        start.elapsed()
    );
    // A server that stalls at first, then keeps up with a steady client (1 MiB every 50 ms): the
    // splice pauses while it stalls and goes back to the kernel once it has caught up; the bytes
    // arrive in order.
    let sink = t.serve_with("local", "sink-server", 7003, &["--delay-ms", "2500"]);
    let (ok, out) = t.connect(
        "client",
        &format!("{ip}:7003"),
        &[
            "--send",
            "60000000",
            "--pace-ms",
            "50",
            "--piece-bytes",
            "1048576",
        ],
    );
    assert!(ok && out.contains("sent=60000000 received=0"), "{out}");
    t.servers[sink].wait_for("bytes=60000000 pattern=ok", Duration::from_secs(20));
    println!("stalling, then steady server: {out}");
    // At least the 3 MB and the paced echoes of every round were spliced, and the paced sink.
    check_splice(&mut t, sockmap, 2 * ROUNDS + 1, false);
    if sockmap {
        let early = t.metric(
            0,
            "nodemesh_splice_connections_total",
            &[("result", "closed_early")],
        );
        let pauses = t.metric(0, "nodemesh_splice_pauses_total", &[]);
        let resumes = t.metric(0, "nodemesh_splice_resumes_total", &[]);
        println!(
            "  relayed in user space because one side closed before the splice: {early}; \
             pauses for a receiver more than a window behind: {pauses}, resumes: {resumes}"
        );
        assert!(
            pauses >= 1 && resumes >= 1,
            "the stalling server must have paused a splice, and its catching up resumed it"
        );
    }
}

/// A same-node server that does not read: the client's bytes must back up to the client (its
/// writes block), not pile up in the node. While the server stalls, what the node holds for the
/// connection — what the client's socket got acknowledged, minus what waits in the server's
/// receive queue — stays within the proxy's socket buffers plus the splice window, far from the
/// 64 MB the client tries to send. Then the server reads, and every byte arrives in order.
fn a_server_that_does_not_read_pushes_back_on_the_client(sockmap: bool) {
    require_root("a_server_that_does_not_read_pushes_back_on_the_client");
    let mut t = two_nodes("bp", with_sockmap(sockmap));
    let ip = t.pod("local").ip.clone();
    let sink = t.serve_with("local", "sink-server", 7003, &["--delay-ms", "6000"]);
    let p = t.pod("client");
    let (cg, ns, addr) = (
        p.cgroup.clone(),
        p.ns.name().to_string(),
        format!("{ip}:7003"),
    );
    const SEND: u64 = 64_000_000;
    let client = std::thread::spawn(move || {
        nodemesh_tests::mesh_app(&cg, &ns, &["connect", &addr, "--send", &SEND.to_string()])
    });
    t.servers[sink].wait_for("accepted", Duration::from_secs(5));
    std::thread::sleep(Duration::from_secs(3));
    // The client's captured connection goes to one of its node's outbound ports (15001, or a
    // further one its destination hashes to).
    let acked = ss_field(t.pod("client").ns.name(), "dst 10.203.0.1", "bytes_acked:");
    let queued = ss_recv_q(t.pod("local").ns.name(), "sport = :7003");
    let held = acked.saturating_sub(queued);
    println!(
        "server stalled: the client got {acked} bytes acknowledged, the server's receive queue \
         holds {queued}: the node holds {held}"
    );
    assert!(
        acked > 0 && acked < SEND,
        "the client should be blocked part-way: {acked}"
    );
    assert!(
        held < 20_000_000,
        "{held} bytes piled up in the node for a server that does not read"
    );
    let out = client.join().expect("client thread");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains(&format!("sent={SEND} received=0")),
        "{text}"
    );
    t.servers[sink].wait_for(&format!("bytes={SEND} pattern=ok"), Duration::from_secs(30));
    if sockmap {
        check_splice(&mut t, sockmap, 1, true);
        let pauses = t.metric(0, "nodemesh_splice_pauses_total", &[]);
        let resumes = t.metric(0, "nodemesh_splice_resumes_total", &[]);
        println!("  splice pauses: {pauses}, resumes: {resumes}");
        assert!(pauses >= 1, "the stalled server never paused the splice");
    }
}

/// A same-node client that sends 64 MB to an echo server and reads nothing of the echo for five
/// seconds. Without the splice, TCP stops the client once the buffers on the way are full, and
/// once it reads, every byte comes back. With the splice that is one of two outcomes: its bytes
/// may instead wait in the kernel behind the echo it does not read (one queue per socket serves
/// both), charged to no buffer; past the window plus its receive buffer the node then resets the
/// connection, counts it and says why. Either way nothing hangs, and the node goes on serving
/// everyone else.
fn a_client_that_sends_ahead_of_its_responses(sockmap: bool) {
    require_root("a_client_that_sends_ahead_of_its_responses");
    let mut t = two_nodes("ah", with_sockmap(sockmap));
    let ip = t.pod("local").ip.clone();
    t.serve("local", "echo-server", 7000);
    let addr = format!("{ip}:7000");
    let start = Instant::now();
    let (ok, out) = t.connect(
        "client",
        &addr,
        &["--send", "64000000", "--read-after-ms", "5000"],
    );
    println!("client reading after 5 s: {out} ({:?})", start.elapsed());
    let overflows = t.metric(0, "nodemesh_splice_overflows_total", &[]);
    if ok {
        assert!(out.contains("echo=ok"), "{out}");
        assert_eq!(
            overflows, 0,
            "an overflow was counted, but the client got its echo"
        );
    } else {
        assert!(sockmap, "only the splice may reset such a client: {out}");
        assert!(
            out.contains("ConnectionReset") || out.contains("BrokenPipe"),
            "{out}"
        );
        assert_eq!(overflows, 1, "the reset was not counted as an overflow");
        assert!(
            t.daemon(0)
                .output()
                .contains("kept sending while it read nothing"),
            "the daemon did not say why it reset the connection"
        );
    }
    let (ok, out) = t.connect("client", &addr, &["--send", "3000000"]);
    assert!(
        ok && out.contains("echo=ok"),
        "after that, another client: {out}"
    );
}

/// A number after `field` on the `ss -tni` line of the one connection `filter` selects.
fn ss_field(ns: &str, filter: &str, field: &str) -> u64 {
    let mut args = vec!["netns", "exec", ns, "ss", "-tniH"];
    args.extend(filter.split(' '));
    let out = nodemesh_tests::sh("ip", &args);
    out.split_whitespace()
        .find_map(|w| w.strip_prefix(field))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {field} in:\n{out}"))
}

/// The receive queue of the one established connection `filter` selects.
fn ss_recv_q(ns: &str, filter: &str) -> u64 {
    let mut args = vec!["netns", "exec", ns, "ss", "-tnH", "state", "established"];
    args.extend(filter.split(' '));
    let out = nodemesh_tests::sh("ip", &args);
    out.split_whitespace()
        .next()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no receive queue in:\n{out}"))
}

/// Issue 16 item 5's L4 answer: a pod port listed in `proxyProtocolPorts` gets a PROXY protocol
/// v2 header naming the client pod's address and port before the client's bytes, cross-node
/// (through HBONE's `forwarded`) and same-node; the TCP peer is still the mesh source, and other
/// ports get no header (their echo would not match).
fn proxy_protocol_names_the_client_to_servers_that_ask(sockmap: bool) {
    require_root("proxy_protocol");
    let pods = [
        PodSpec::meshed("client", 0, "client"),
        PodSpec::meshed("local", 0, "local").proxy_protocol(&[7100]),
        PodSpec::meshed("server", 1, "echo").proxy_protocol(&[7100]),
    ];
    let mut t = Topology::build("pp", 2, &pods, &[]);
    t.start(with_sockmap(sockmap));
    let far = t.serve("server", "proxy-echo-server", 7100);
    let near = t.serve("local", "proxy-echo-server", 7100);
    t.serve("server", "echo-server", 7000);
    for (pod, srv, node) in [("server", far, 2), ("local", near, 1)] {
        let target = format!("{}:7100", t.pod(pod).ip);
        let (ok, out) = t.connect("client", &target, &["--send", "5000"]);
        assert!(ok && out.contains("echo=ok"), "client → {target}: {out}");
        let client = local_of(&out);
        let line = t.servers[srv].wait_for("proxied peer=", Duration::from_secs(5));
        println!("{pod}: {line}");
        assert!(
            line.contains(&format!("command=Proxy from={client} to={target}")),
            "the header names the client {client} and {target}: {line}"
        );
        assert!(in_mesh_source(node, accepted_peer(&line)), "{line}");
    }
    let plain = format!("{}:7000", t.pod("server").ip);
    let (ok, out) = t.connect("client", &plain, &["--send", "5000"]);
    assert!(
        ok && out.contains("echo=ok"),
        "no header on other ports: {out}"
    );
}
