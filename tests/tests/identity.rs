//! Identity and mTLS end to end: two nodes in network namespaces, a CA process on the fabric, and
//! each node's daemon holding SVIDs for its own pods.
//!
//! - Node-to-node traffic is TLS on the wire while the pods exchange plaintext (captured with
//!   tcpdump on both sides).
//! - The destination reports the source workload's SPIFFE ID.
//! - (The attacks on HBONE and the CA: `tests/attacks.rs`.)
//! - SVIDs renew and the root rotates under a long connection.

use std::{
    path::PathBuf,
    time::{Duration, Instant},
};

use mesh_daemon::identity::Identity;
use nodemesh_tests::{
    bin,
    netns::Netns,
    process::Proc,
    require_root,
    topology::{DaemonOpts, PodSpec, ServiceSpec, Topology},
};

const TD: &str = "cluster.local";
const VIP: &str = "10.96.0.10:80";

fn id(sa: &str) -> Identity {
    Identity::new(TD, "demo", sa)
}

/// client and other (another service account) on node 1, server on node 2.
fn topology(tag: &str, opts: DaemonOpts) -> Topology {
    let pods = [
        PodSpec::meshed("client", 0, "client"),
        PodSpec::meshed("other", 0, "other"),
        PodSpec::meshed("server", 1, "echo"),
    ];
    let services = [ServiceSpec::new("echo", "10.96.0.10", 80, 7000, "echo")];
    let mut t = Topology::build(tag, 2, &pods, &services);
    t.start(opts);
    t.serve("server", "echo-server", 7000);
    t
}

/// mesh-app's payload (see `pattern` in mesh-app.rs); a slice of it is the plaintext marker.
fn marker() -> Vec<u8> {
    (1000usize..1048)
        .map(|i| (i.wrapping_mul(31) ^ (i >> 8)) as u8)
        .collect()
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// tcpdump writing full packets of one interface to a file until stopped.
struct Capture {
    proc: Proc,
    file: PathBuf,
}

impl Capture {
    fn start(ns: &Netns, ifname: &str, filter: &str, file: PathBuf) -> Self {
        let mut cmd = std::process::Command::new("ip");
        cmd.args([
            "netns",
            "exec",
            ns.name(),
            "tcpdump",
            "-i",
            ifname,
            "-U",
            "-s",
            "0",
        ])
        .arg("-w")
        .arg(&file)
        .args(filter.split_whitespace());
        let mut proc = Proc::spawn(&format!("tcpdump -i {ifname}"), cmd);
        proc.wait_for("listening on", Duration::from_secs(10));
        Self { proc, file }
    }

    fn stop(mut self) -> Vec<u8> {
        self.proc.terminate(Duration::from_secs(5));
        let bytes = std::fs::read(&self.file).expect("read capture");
        let _ = std::fs::remove_file(&self.file);
        bytes
    }
}

/// TLS 1.2 application-data record headers (TLS 1.3 records wear the 1.2 version on the wire).
fn tls_records(capture: &[u8]) -> usize {
    capture
        .windows(3)
        .filter(|w| w == &[0x17, 0x03, 0x03])
        .count()
}

#[test]
fn node_to_node_is_mtls_and_the_server_sees_workload_identities() {
    require_root("node_to_node_is_mtls");
    let t = topology("idw", DaemonOpts::default());
    let server_idx = t
        .pods
        .iter()
        .position(|p| p.name == "server")
        .expect("server");
    let tmp = std::env::temp_dir();
    // The fabric side of node 2's link carries everything other nodes send it; the server pod's
    // veth in node 2 is the positive control: there the same bytes are plaintext.
    let wire = Capture::start(
        &t.fabric,
        "f2",
        "tcp port 15008",
        tmp.join(format!("nm-wire-{}.pcap", std::process::id())),
    );
    let pod = Capture::start(
        &t.nodes[1].ns,
        &format!("v{server_idx}"),
        "tcp port 7000",
        tmp.join(format!("nm-pod-{}.pcap", std::process::id())),
    );
    let server = format!("{}:7000", t.pod("server").ip);
    let (ok, out) = t.connect("client", &server, &["--send", "1048576"]);
    assert!(ok && out.contains("echo=ok"), "client → server: {out}");
    println!("client → server by pod IP: {out}");
    let (ok, out) = t.connect("other", VIP, &["--send", "1048576"]);
    assert!(ok && out.contains("echo=ok"), "other → server VIP: {out}");
    println!("other → server by VIP: {out}");
    std::thread::sleep(Duration::from_millis(300));
    let wire = wire.stop();
    let pod = pod.stop();
    let marker = marker();
    println!(
        "captured: {} bytes between nodes ({} TLS records), {} bytes at the server pod",
        wire.len(),
        tls_records(&wire),
        pod.len()
    );
    assert!(
        contains(&pod, &marker),
        "positive control: the pods' plaintext must be visible at the pod's own interface"
    );
    // 4 MiB crossed (2 MiB each way); tcpdump may drop some packets under load, so ask only
    // that most of it was seen.
    assert!(
        wire.len() > 2 << 20,
        "4 MiB crossed nodes, the capture holds only {} bytes",
        wire.len()
    );
    assert!(
        !contains(&wire, &marker),
        "plaintext payload crossed the node-to-node link"
    );
    assert!(
        tls_records(&wire) > 100,
        "the node-to-node link must carry TLS records"
    );

    // The destination proved and reports each source's identity: two service accounts, two
    // SPIFFE IDs, each with its own pooled connection.
    let metrics = t.scrape(1);
    for sa in ["client-sa", "other-sa"] {
        let n = nodemesh_tests::topology::sample(
            &metrics,
            "nodemesh_tcp_connections_opened_total",
            &[
                ("reporter", "inbound"),
                ("source_principal", &id(sa).to_string()),
                ("destination_principal", &id("server-sa").to_string()),
            ],
        );
        assert_eq!(n, 1, "node 2 counts one inbound connection from {sa}");
    }
    assert!(
        nodemesh_tests::topology::sample(
            &metrics,
            "nodemesh_tls_handshakes_total",
            &[("direction", "inbound"), ("result", "ok")]
        ) >= 2,
        "one handshake per source identity"
    );
    let mut t = t;
    let line = t.daemon(1).wait_for(
        "source_principal=spiffe://cluster.local/ns/demo/sa/client-sa",
        Duration::from_secs(5),
    );
    println!("node 2 log: {line}");
    assert!(line.contains("inbound tunnel"), "{line}");

    // Certificates follow placement: when the last pod of other-sa leaves node 1, node 1 drops
    // that SVID (and its expiry series); client-sa's stays.
    let expiry = |t: &Topology, sa: &str| {
        nodemesh_tests::topology::sample(
            &t.scrape(0),
            "nodemesh_svid_expiry_timestamp_seconds",
            &[("identity", &id(sa).to_string())],
        )
    };
    assert!(expiry(&t, "other-sa") > 0, "node 1 holds other-sa's SVID");
    let text = std::fs::read_to_string(&t.mesh_file).expect("mesh file");
    let start = text
        .find("  - name: other\n")
        .expect("other in the mesh file");
    let end = start + 1 + text[start + 1..].find("  - name:").expect("next entry");
    t.rewrite_mesh_file(&format!("{}{}", &text[..start], &text[end..]));
    let line = t.daemon(0).wait_for("SVID dropped", Duration::from_secs(5));
    println!("node 1 log: {line}");
    assert!(line.contains("other-sa"), "{line}");
    assert_eq!(
        expiry(&t, "other-sa"),
        0,
        "the dropped SVID's series is gone"
    );
    assert!(expiry(&t, "client-sa") > 0, "client-sa's SVID stays");
}

#[test]
fn svids_renew_and_the_root_rotates_under_a_three_minute_connection() {
    require_root("svids_renew_and_the_root_rotates");
    let mut t = topology(
        "idr",
        DaemonOpts {
            svid_lifetime: "1m",
            ..DaemonOpts::default()
        },
    );
    let renewed = |t: &Topology, i: usize| {
        t.metric(i, "nodemesh_svid_fetches_total", &[("result", "renewed")])
    };
    let before = [renewed(&t, 0), renewed(&t, 1)];
    let server = format!("{}:7000", t.pod("server").ip);
    // 3 minutes: 1800 pieces of 4 KiB, 100 ms apart.
    let long = {
        let client = t.pod("client");
        let (cg, ns, server) = (
            client.cgroup.clone(),
            client.ns.name().to_string(),
            server.clone(),
        );
        std::thread::spawn(move || {
            let started = Instant::now();
            let out = nodemesh_tests::mesh_app(
                &cg,
                &ns,
                &["connect", &server, "--send", "7372800", "--pace-ms", "100"],
            );
            (
                String::from_utf8_lossy(&out.stdout).trim().to_string(),
                started.elapsed(),
            )
        })
    };
    let start = Instant::now();
    let mut short_ok = 0;
    let mut step = 0;
    let ca_dir = t.ca_dir();
    let rotate = |step: &str| {
        let out = std::process::Command::new(bin("mesh-daemon"))
            .args(["ca", "rotate", "--dir"])
            .arg(&ca_dir)
            .arg(step)
            .output()
            .expect("run ca rotate");
        assert!(
            out.status.success(),
            "rotate {step}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        println!(
            "[{:>5.1?}] ca rotate {step}: {}",
            start.elapsed(),
            String::from_utf8_lossy(&out.stdout).trim()
        );
    };
    while !long.is_finished() {
        // New connections keep working throughout (each renewal opens new mTLS connections).
        let (ok, out) = t.connect("client", VIP, &["--send", "20000"]);
        assert!(
            ok && out.contains("echo=ok"),
            "short connection at {:?}: {out}",
            start.elapsed()
        );
        short_ok += 1;
        let elapsed = start.elapsed();
        if step == 0 && elapsed > Duration::from_secs(40) {
            rotate("add-root");
            for i in 0..2 {
                t.daemon(i).wait_for("roots=2", Duration::from_secs(10));
            }
            step = 1;
        } else if step == 1 && elapsed > Duration::from_secs(70) {
            rotate("activate");
            for i in 0..2 {
                t.daemon(i)
                    .wait_for("the CA has a new signer", Duration::from_secs(10));
            }
            step = 2;
        } else if step == 2 && elapsed > Duration::from_secs(100) {
            rotate("retire");
            for i in 0..2 {
                t.daemon(i).wait_for("roots=1", Duration::from_secs(10));
            }
            step = 3;
        }
        std::thread::sleep(Duration::from_secs(4));
        assert!(
            start.elapsed() < Duration::from_secs(240),
            "the long transfer should end after ~3 min"
        );
    }
    let (out, took) = long.join().expect("long transfer thread");
    println!("long connection ({took:?}): {out}");
    assert!(
        out.contains("echo=ok"),
        "the 3-minute connection survived renewals and rotation: {out}"
    );
    assert!(
        took >= Duration::from_secs(170),
        "it really ran ~3 minutes: {took:?}"
    );
    assert_eq!(step, 3, "the whole rotation ran during the connection");
    println!("{short_ok} short connections succeeded along the way");
    for (i, b) in before.iter().enumerate() {
        let after = renewed(&t, i);
        println!(
            "node {}: {} renewals during the connection",
            i + 1,
            after - b
        );
        assert!(
            after - b >= 2,
            "node {}: at least two renewals, got {}",
            i + 1,
            after - b
        );
    }
    let (ok, out) = t.connect("other", VIP, &["--send", "20000"]);
    assert!(
        ok && out.contains("echo=ok"),
        "a fresh identity's first connection under the new root only: {out}"
    );
}
