//! What operators see: `/metrics` per edge after a known traffic mix, `/ready`, the admin port
//! (`/config_dump`, `/tap` and its bad filters, loopback only) and `meshctl` reading all of it.

use std::{process::Command, time::Duration};

use nodemesh_tests::{
    bin,
    process::Proc,
    require_root,
    topology::{DaemonOpts, PodSpec, ServiceSpec, Topology, http_get, sample, try_http_request},
};

const VIP: &str = "10.96.0.10:80";

fn principal(sa: &str) -> String {
    format!("spiffe://cluster.local/ns/demo/sa/{sa}")
}

/// client, other and local on node 1; server on node 2.
fn topology(tag: &str) -> Topology {
    let pods = [
        PodSpec::meshed("client", 0, "client"),
        PodSpec::meshed("other", 0, "other"),
        PodSpec::meshed("local", 0, "local"),
        PodSpec::meshed("server", 1, "echo"),
    ];
    let services = [ServiceSpec::new("echo", "10.96.0.10", 80, 7000, "echo")];
    let mut t = Topology::build(tag, 2, &pods, &services);
    t.start(DaemonOpts::default());
    t.serve("server", "echo-server", 7000);
    t.serve("local", "echo-server", 7000);
    t
}

/// `meshctl <args>` inside node `i`'s network namespace; returns stdout, panics on failure.
fn meshctl(t: &Topology, i: usize, args: &[&str]) -> String {
    let out = Command::new("nsenter")
        .arg(format!("--net={}", t.nodes[i].ns.path().display()))
        .arg(bin("meshctl"))
        .args(args)
        .output()
        .expect("run meshctl");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "meshctl {args:?} failed: {}{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// meshctl in node `i`'s namespace, whatever its exit status.
fn meshctl_output(t: &Topology, i: usize, args: &[&str]) -> std::process::Output {
    Command::new("nsenter")
        .arg(format!("--net={}", t.nodes[i].ns.path().display()))
        .arg(bin("meshctl"))
        .args(args)
        .output()
        .expect("run meshctl")
}

fn body(resp: &str) -> &str {
    resp.split_once("\r\n\r\n").map_or("", |(_, b)| b)
}

#[test]
fn metrics_and_meshctl_match_a_known_traffic_mix() {
    require_root("metrics_and_meshctl");
    let t = topology("obm");
    let server = format!("{}:7000", t.pod("server").ip);
    let local = format!("{}:7000", t.pod("local").ip);
    // The mix: 3 × 100 000 B client → server by pod IP (HBONE), 2 × 50 000 B other → server by
    // VIP (HBONE), 4 × 10 000 B client → local (same node, in-process).
    for (pod, addr, n, bytes) in [
        ("client", server.as_str(), 3, "100000"),
        ("other", VIP, 2, "50000"),
        ("client", local.as_str(), 4, "10000"),
    ] {
        for _ in 0..n {
            let (ok, out) = t.connect(pod, addr, &["--send", bytes]);
            assert!(ok && out.contains("echo=ok"), "{pod} → {addr}: {out}");
        }
    }
    // Follow /tap with meshctl on node 1 while one more connection is made.
    let mut tap = {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net={}", t.nodes[0].ns.path().display()))
            .arg(bin("meshctl"))
            .args(["tap", "--workload", "server", "--count", "2"]);
        Proc::spawn("meshctl tap", c)
    };
    tap.wait_for("following", Duration::from_secs(5));
    let (ok, out) = t.connect("client", &server, &["--send", "1000"]);
    assert!(ok, "{out}");
    let line = tap.wait_for("close ", Duration::from_secs(5));
    println!("meshctl tap: {line}");
    for l in tap.lines() {
        println!("  {l}");
    }
    assert!(
        line.contains("demo/client -> demo/server") && line.contains("mtls=true"),
        "{line}"
    );
    assert!(line.contains("sent=1000 received=1000"), "{line}");

    // /metrics, per edge and per node, exactly (4 client → server connections now).
    fn edge<'a>(src: &'a str, dst: &'a str, reporter: &'a str) -> Vec<(&'a str, &'a str)> {
        vec![
            ("reporter", reporter),
            ("source_workload", src),
            ("destination_workload", dst),
        ]
    }
    let m1 = t.scrape(0);
    let m2 = t.scrape(1);
    // Process metrics under Prometheus' standard names (stock dashboards and alerts find them).
    for fam in [
        "process_cpu_seconds_total",
        "process_resident_memory_bytes",
        "process_open_fds",
    ] {
        assert!(
            m1.lines().any(|l| l.starts_with(&format!("{fam} "))),
            "the daemon exports {fam}"
        );
    }
    assert!(!m1.contains("nodemesh_process_"), "no prefixed copies");
    let check = |m: &str, labels: &[(&str, &str)], conns: u64, bytes: u64| {
        assert_eq!(
            sample(m, "nodemesh_tcp_connections_closed_total", labels),
            conns,
            "{labels:?}"
        );
        assert_eq!(
            sample(m, "nodemesh_tcp_sent_bytes_total", labels),
            bytes,
            "{labels:?}"
        );
        assert_eq!(
            sample(m, "nodemesh_tcp_received_bytes_total", labels),
            bytes,
            "{labels:?}"
        );
    };
    check(&m1, &edge("client", "server", "outbound"), 4, 301_000);
    check(&m2, &edge("client", "server", "inbound"), 4, 301_000);
    check(&m1, &edge("other", "server", "outbound"), 2, 100_000);
    check(&m2, &edge("other", "server", "inbound"), 2, 100_000);
    check(&m1, &edge("client", "local", "outbound"), 4, 40_000);
    // destination_service: the service dialled (outbound), the local service whose endpoint the
    // tunnel reached (inbound); a pod dialled by its address has none at the source.
    for (m, src, reporter, service, conns) in [
        (&m1, "other", "outbound", "demo/echo", 2),
        (&m2, "other", "inbound", "demo/echo", 2),
        (&m1, "client", "outbound", "unknown", 4),
    ] {
        let mut labels = edge(src, "server", reporter);
        labels.push(("destination_service", service));
        assert_eq!(
            sample(m, "nodemesh_tcp_connections_opened_total", &labels),
            conns,
            "{labels:?}"
        );
    }
    let mut inbound_other = edge("other", "server", "inbound");
    let p_other = principal("other-sa");
    let p_server = principal("server-sa");
    inbound_other.push(("source_principal", &p_other));
    inbound_other.push(("destination_principal", &p_server));
    check(&m2, &inbound_other, 2, 100_000);

    // meshctl stat from both nodes' endpoints: the same numbers.
    let nodes = "10.203.0.1:15020,10.203.0.2:15020";
    let stat: serde_json::Value = serde_json::from_str(&meshctl(
        &t,
        0,
        &["stat", "--node", nodes, "--by", "edge", "-o", "json"],
    ))
    .expect("stat -o json is JSON");
    println!(
        "{}",
        meshctl(&t, 0, &["stat", "--node", nodes, "--by", "edge"])
    );
    println!("{}", meshctl(&t, 0, &["stat", "--node", nodes]));
    let row = |name: &str| {
        stat.as_array()
            .expect("a list")
            .iter()
            .find(|r| r["name"] == name)
            .unwrap_or_else(|| panic!("no row {name} in {stat}"))["stats"]
            .clone()
    };
    let r = row("demo/client -> demo/server");
    assert_eq!(
        (r["connections"].as_u64(), r["bytes_sent"].as_u64()),
        (Some(4), Some(301_000))
    );
    let r = row("demo/other -> demo/server");
    assert_eq!(
        (r["connections"].as_u64(), r["bytes_received"].as_u64()),
        (Some(2), Some(100_000))
    );
    let r = row("demo/client -> demo/local");
    assert_eq!(
        (r["connections"].as_u64(), r["bytes_sent"].as_u64()),
        (Some(4), Some(40_000))
    );

    // meshctl edges: both ends' identities, and how each edge crossed.
    println!("{}", meshctl(&t, 0, &["edges", "--node", nodes]));
    let edges: serde_json::Value =
        serde_json::from_str(&meshctl(&t, 0, &["edges", "--node", nodes, "-o", "json"]))
            .expect("edges -o json is JSON");
    let find = |src: &str, dst: &str| {
        edges
            .as_array()
            .expect("a list")
            .iter()
            .find(|e| e["source"] == src && e["destination"] == dst)
            .unwrap_or_else(|| panic!("no edge {src} -> {dst} in {edges}"))
            .clone()
    };
    let e = find("demo/client", "demo/server");
    assert_eq!(e["transport"], "mtls");
    assert_eq!(e["source_principal"], principal("client-sa"));
    assert_eq!(e["destination_principal"], principal("server-sa"));
    assert_eq!(
        find("demo/other", "demo/server")["source_principal"],
        principal("other-sa")
    );
    assert_eq!(find("demo/client", "demo/local")["transport"], "same-node");

    // meshctl identity: node 1 holds the SVIDs of its three pods, and nothing of node 2's.
    let id = meshctl(&t, 0, &["identity"]);
    println!("{id}");
    for sa in ["client-sa", "other-sa", "local-sa"] {
        assert!(id.contains(&principal(sa)), "{id}");
    }
    assert!(!id.contains(&principal("server-sa")), "{id}");

    // --node takes host, host:port and http://host:port alike.
    let same = |node: &str| -> serde_json::Value {
        serde_json::from_str(&meshctl(&t, 0, &["stat", "--node", node, "-o", "json"]))
            .expect("JSON")
    };
    let by_port = same("10.203.0.1:15020");
    assert_eq!(same("10.203.0.1"), by_port, "host alone");
    assert_eq!(same("http://10.203.0.1:15020"), by_port, "http URL");
    // One node down: the others' rows, and a line naming the one left out.
    let out = meshctl_output(&t, 0, &["stat", "--node", "10.203.0.1,10.203.0.2:15999"]);
    assert!(out.status.success(), "partial results succeed");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("left out: cannot reach 10.203.0.2:15999"),
        "{err}"
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("demo/server"),
        "node 1's rows still shown"
    );
    // Something that answers /metrics but is not a nodemesh daemon says so (no empty table).
    let impostor = t.nodes[0].ns.run(|| {
        let l = std::net::TcpListener::bind("10.203.0.1:18080").expect("bind");
        std::thread::spawn(move || {
            use std::io::{Read as _, Write as _};
            if let Ok((mut c, _)) = l.accept() {
                let mut buf = [0u8; 1024];
                let _ = c.read(&mut buf);
                let _ = c.write_all(
                    b"HTTP/1.1 200 OK\r\ncontent-length: 18\r\n\r\nother_up_total 1\n\n",
                );
            }
        })
    });
    let server_thread = impostor.join().expect("bound");
    let out = meshctl_output(&t, 0, &["stat", "--node", "10.203.0.1:18080"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("with no nodemesh_ metrics"),
        "{err}"
    );
    let _ = server_thread.join();
    // A closed pipe ends meshctl quietly: `meshctl tap | head -1` while events flow.
    let mut piped = Command::new("nsenter");
    piped
        .arg(format!("--net={}", t.nodes[0].ns.path().display()))
        .args(["sh", "-c"])
        .arg(format!(
            "{} tap --count 50 2>/tmp/nm-tap-pipe.err | head -1",
            bin("meshctl").display()
        ));
    let mut piped = Proc::spawn("meshctl tap | head -1", piped);
    for _ in 0..5 {
        let (ok, out) = t.connect("client", &server, &["--send", "10"]);
        assert!(ok, "{out}");
    }
    piped
        .wait_exit(Duration::from_secs(20))
        .expect("the pipeline ends once head has its line");
    let err = std::fs::read_to_string("/tmp/nm-tap-pipe.err").unwrap_or_default();
    let _ = std::fs::remove_file("/tmp/nm-tap-pipe.err");
    assert!(!err.contains("panicked"), "meshctl on a closed pipe: {err}");
    println!("meshctl: --node forms, partial results, a non-nodemesh endpoint, a closed pipe: ok");

    // Cardinality: 2 × 500 connections from 1000 client ports; the second 500 add no series,
    // and no label carries an address.
    let series = |m: &str| m.lines().filter(|l| !l.starts_with('#')).count();
    let mut counts = Vec::new();
    for _ in 0..2 {
        let (ok, out) = t.connect("client", &server, &["--send", "10", "--repeat", "500"]);
        assert!(ok, "{out}");
        counts.push(series(&t.scrape(0)));
    }
    println!("series on node 1 after 500 and 1000 connections from new ports: {counts:?}");
    assert_eq!(counts[0], counts[1], "no label follows the client port");
    let m = t.scrape(0);
    assert!(!m.contains("\"10.210."), "no label carries a pod address");
}

#[test]
fn ready_config_dump_and_admin_refusals() {
    require_root("ready_config_dump_and_admin");
    let pods = [
        PodSpec::meshed("client", 0, "client"),
        PodSpec::meshed("server", 1, "echo"),
    ];
    let mut t = Topology::build("obr", 2, &pods, &[]);
    // The CA generates its root and bundle, then goes away. Node 1 starts without it: its
    // programs attach and its state loads, but it holds no SVID, so it is not ready, and says
    // why.
    t.start_ca();
    drop(t.ca.take());
    let mut d = Proc::spawn("mesh-daemon node-1", t.daemon_command(0));
    // Health answers from before the programs are loaded (loading and verifying them takes a
    // few hundred milliseconds): the first answer /ready gives must be "not attached".
    let start = std::time::Instant::now();
    let first = loop {
        match try_http_request(&t.nodes[0].ns, "10.203.0.1:15021", "GET /ready") {
            Ok(r) => break r,
            Err(_) if start.elapsed() < Duration::from_secs(30) => {
                std::thread::sleep(Duration::from_millis(1))
            }
            Err(e) => panic!("/ready never answered: {e}\n{}", d.output()),
        }
    };
    println!(
        "/ready at its first answer ({:?} after spawn): {}",
        start.elapsed(),
        first.lines().last().unwrap_or("")
    );
    assert!(
        first.contains(" 503 ") && first.contains("eBPF programs are not attached yet"),
        "{first}\n{}",
        d.output()
    );
    d.wait_for("ready", Duration::from_secs(30));
    let attached = d.wait_for("eBPF programs attached", Duration::from_secs(1));
    assert!(attached.contains("nm_connect4"), "{attached}");
    let ready = |t: &Topology| http_get(&t.nodes[0].ns, "10.203.0.1:15021", "/ready");
    let r = ready(&t);
    println!("/ready without a CA: {}", r.lines().last().unwrap_or(""));
    assert!(
        r.starts_with("HTTP/1.0 503") || r.starts_with("HTTP/1.1 503"),
        "{r}"
    );
    assert!(
        r.contains("no SVID yet for spiffe://cluster.local/ns/demo/sa/client-sa"),
        "{r}"
    );
    let live = http_get(&t.nodes[0].ns, "10.203.0.1:15021", "/live");
    assert!(live.contains(" 200 "), "{live}");
    t.start_ca();
    let start = std::time::Instant::now();
    let r = loop {
        let r = ready(&t);
        if r.contains(" 200 ") || start.elapsed() > Duration::from_secs(15) {
            break r;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    println!(
        "/ready once the CA answers: {}",
        r.lines().last().unwrap_or("")
    );
    assert!(r.contains(" 200 "), "{r}");

    // A pod that cannot be enrolled (its cgroup is not there): the node stays ready, says it is
    // degraded and names the pod and why, and counts it; fixed, the degradation goes.
    let base = t.mesh_yaml(&pods, &[]);
    let ghost = base.replacen(
        "workloads:\n",
        &format!(
            "workloads:\n  - name: ghost\n    namespace: demo\n    serviceAccount: client-sa\n    \
             node: node-1\n    ip: 10.210.1.77\n    cgroup: {}\n",
            t.node_cgroup_root(0).join("ghost-not-there").display()
        ),
        1,
    );
    let mut tap = follow_tap(&t, 0);
    t.rewrite_mesh_file(&ghost);
    // The enrollment failure on tap, with the pod and why.
    let line = tap.wait_for("refused enroll", Duration::from_secs(10));
    println!("tap of an enrollment failure: {line}");
    assert!(
        line.contains("demo/ghost") && line.contains("cgroup_missing"),
        "{line}"
    );
    let wait_ready = |want: &str| {
        let start = std::time::Instant::now();
        loop {
            let r = ready(&t);
            if r.contains(want) {
                return r;
            }
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "/ready never said {want:?}: {r}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    let r = wait_ready("degraded");
    println!(
        "/ready with an unenrollable pod: {}",
        r.lines().last().unwrap_or("")
    );
    assert!(
        r.contains(" 200 ") && r.contains("ready, degraded: pod demo/ghost cannot be enrolled"),
        "{r}"
    );
    assert!(
        t.metric(
            0,
            "nodemesh_enroll_failures_total",
            &[
                ("reason", "cgroup_missing"),
                ("workload", "ghost"),
                ("namespace", "demo")
            ]
        ) >= 1,
        "counted with the pod"
    );
    t.rewrite_mesh_file(&base);
    let r = wait_ready("\r\n\r\nready\n");
    assert!(!r.contains("degraded"), "{r}");

    // A certificate the CA refuses: node 1's token no longer matches the CA's, and a pod with a
    // new identity arrives. The refusal shows on tap with the identity and the CA's reason, and
    // is counted by identity; with the token back, the SVID comes.
    let token = std::fs::read_to_string(t.token_file(0)).expect("token");
    std::fs::write(t.token_file(0), "not-the-token\n").expect("break the token");
    let newcomer = base.replacen(
        "workloads:\n",
        &format!(
            "workloads:\n  - name: newcomer\n    namespace: demo\n    serviceAccount: \
             newcomer-sa\n    node: node-1\n    ip: 10.210.1.78\n    cgroup: {}\n",
            t.node_cgroup_root(0).join("newcomer-not-there").display()
        ),
        1,
    );
    t.rewrite_mesh_file(&newcomer);
    let line = tap.wait_for("refused identity", Duration::from_secs(10));
    println!("tap of a CA refusal: {line}");
    assert!(
        line.contains(&principal("newcomer-sa")) && line.contains("ca_unauthenticated"),
        "{line}"
    );
    assert!(
        t.metric(
            0,
            "nodemesh_svid_refusals_total",
            &[
                ("identity", &principal("newcomer-sa")),
                ("reason", "unauthenticated")
            ]
        ) >= 1,
        "counted by identity"
    );
    std::fs::write(t.token_file(0), token).expect("restore the token");
    t.rewrite_mesh_file(&base);
    let r = wait_ready("\r\n\r\nready\n");
    assert!(!r.contains("no SVID"), "{r}");
    drop(tap);

    // /config_dump: JSON with the mesh file's workloads and the certificates held (no keys).
    let dump = http_get(&t.nodes[0].ns, "127.0.0.1:15000", "/config_dump");
    let v: serde_json::Value = serde_json::from_str(body(&dump)).expect("config_dump is JSON");
    let names: Vec<&str> = v["workloads"]
        .as_array()
        .expect("workloads")
        .iter()
        .filter_map(|w| w["name"].as_str())
        .collect();
    assert_eq!(names, ["client", "server"]);
    assert_eq!(v["certificates"][0]["identity"], principal("client-sa"));
    assert!(
        !body(&dump).contains("PRIVATE KEY"),
        "no key material in the dump"
    );
    // The configuration as the daemon runs it: every `run` flag, with defaults resolved.
    let cfg = &v["config"];
    for key in [
        "mode",
        "node",
        "meshFile",
        "cgroupRoot",
        "outbound",
        "hbone",
        "metrics",
        "health",
        "admin",
        "inbound",
        "failOpen",
        "pinDir",
        "proxyMark",
        "ca",
        "caBundle",
        "tokenFile",
        "trustDomain",
        "bundleRefresh",
        "sockmap",
        "spliceWindow",
        "drainTimeout",
        "handshakeTimeout",
    ] {
        assert!(cfg.get(key).is_some(), "config_dump lacks {key}: {cfg}");
    }
    assert_eq!(
        cfg["outbound"],
        format!("{}:15001", t.nodes[0].ip),
        "the effective (defaulted) value: {cfg}"
    );
    assert_eq!(cfg["drainTimeout"], 30.0, "{cfg}");

    // meshctl config: the same view as tables, JSON or YAML, each part or all.
    let all = meshctl(&t, 0, &["config"]);
    println!("meshctl config:\n{all}");
    let row = |text: &str, start: &str| {
        text.lines()
            .find(|l| l.starts_with(start))
            .unwrap_or_else(|| panic!("no {start} row:\n{text}"))
            .to_string()
    };
    assert!(row(&all, "demo/client ").ends_with("enrolled"), "{all}");
    assert!(row(&all, "demo/server ").ends_with("remote"), "{all}");
    assert!(all.contains("trust bundle: CA signer "), "{all}");
    let cert = row(&all, &principal("client-sa"));
    assert!(
        cert.contains("CN=") || cert.contains("O="),
        "the issuer is named: {cert}"
    );
    let certs: serde_json::Value =
        serde_json::from_str(&meshctl(&t, 0, &["config", "certificates", "-o", "json"]))
            .expect("json");
    let c = &certs[0];
    println!("meshctl config certificates -o json: {c}");
    assert!(c["serial"].as_str().is_some_and(|s| !s.is_empty()), "{c}");
    assert!(c["renewsInSeconds"].as_u64() > Some(0), "{c}");
    assert!(
        c["renewsInSeconds"].as_u64() < c["expiresInSeconds"].as_u64(),
        "{c}"
    );
    assert_eq!(
        c["chain"].as_array().map(Vec::len),
        Some(2),
        "leaf and signer: {c}"
    );
    assert_eq!(
        c["chain"][0]["subjectAltNames"][0],
        principal("client-sa"),
        "{c}"
    );
    assert_eq!(c["chain"][1]["isCa"], true, "{c}");
    let yaml = meshctl(&t, 0, &["config", "workloads", "-o", "yaml"]);
    assert!(
        yaml.contains("enrollment: enrolled") && yaml.contains("name: client"),
        "{yaml}"
    );
    let bundle = meshctl(&t, 0, &["config", "bundle"]);
    println!("meshctl config bundle:\n{bundle}");
    assert!(
        bundle.lines().count() >= 3,
        "the roots are listed: {bundle}"
    );

    // /tap with a bad filter: 400 and the reason.
    let bad = http_get(&t.nodes[0].ns, "127.0.0.1:15000", "/tap?pod=client");
    println!("/tap?pod=client: {}", body(&bad).trim());
    assert!(
        bad.contains(" 400 ") && bad.contains("unknown filter"),
        "{bad}"
    );
    let bad = http_get(&t.nodes[0].ns, "127.0.0.1:15000", "/tap?status=abc");
    assert!(
        bad.contains(" 400 ") && bad.contains("not an HTTP status"),
        "{bad}"
    );

    // /debug/ebpf: the programs and maps.
    let ebpf = http_get(&t.nodes[0].ns, "127.0.0.1:15000", "/debug/ebpf");
    let e: serde_json::Value = serde_json::from_str(body(&ebpf)).expect("debug/ebpf is JSON");
    assert_eq!(e["maps"]["NM_ENROLLED"], 1, "{e}");

    // /logging: change the filter at run time.
    let log = nodemesh_tests::topology::http_request(
        &t.nodes[0].ns,
        "127.0.0.1:15000",
        "POST /logging?level=debug",
    );
    assert!(log.contains(" 200 ") && log.contains("debug"), "{log}");
    // A misspelt level is refused with the allowed values, and the filter stays as it was
    // (tracing alone would read `debu` as a target and silence every log).
    let typo = nodemesh_tests::topology::http_request(
        &t.nodes[0].ns,
        "127.0.0.1:15000",
        "POST /logging?level=debu",
    );
    assert!(
        typo.contains(" 400 ") && typo.contains("trace, debug, info, warn, error, off"),
        "{typo}"
    );
    let now = http_get(&t.nodes[0].ns, "127.0.0.1:15000", "/logging");
    assert!(now.contains("log filter: debug"), "unchanged: {now}");

    // The admin port is not reachable from outside the node, and cannot be bound wider.
    let from_outside = t.nodes[1]
        .ns
        .run(|| {
            std::net::TcpStream::connect_timeout(
                &"10.203.0.1:15000".parse().expect("addr"),
                Duration::from_secs(2),
            )
            .is_ok()
        })
        .join()
        .expect("thread");
    assert!(!from_outside, "the admin port must refuse other hosts");
    let mut wide = t.daemon_command(1);
    wide.args(["--admin", "0.0.0.0:15000"]);
    let out = wide.output().expect("run daemon");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("not a loopback address"),
        "{err}"
    );
    // An address this node does not have: the error names the flag and says so (not "free the
    // port", which would not help).
    let out = t
        .daemon_command_with(1, "--metrics", "10.99.99.99:15020")
        .output()
        .expect("run daemon");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success()
            && err.contains("10.99.99.99 is not an address of this host; pass --metrics"),
        "{err}"
    );
    // No trust bundle yet: where it comes from.
    let out = t
        .daemon_command_with(1, "--ca-bundle", "/nonexistent/bundle.pem")
        .output()
        .expect("run daemon");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success()
            && err.contains("the CA writes bundle.pem into its --dir at its first start"),
        "{err}"
    );
    // A bundle from another CA: the daemon says the CA's certificate is not signed by it (not
    // "cannot reach the CA"), and keeps trying.
    let other = std::env::temp_dir().join(format!("nm-other-bundle-{}.pem", std::process::id()));
    let root = rcgen::generate_simple_self_signed(vec!["other-ca".into()]).expect("cert");
    std::fs::write(&other, root.cert.pem()).expect("other bundle");
    let mut wrong = Proc::spawn(
        "mesh-daemon node-2, another CA's bundle",
        t.daemon_command_with(1, "--ca-bundle", other.to_str().expect("utf-8")),
    );
    let line = wrong.wait_for("is not signed by --ca-bundle", Duration::from_secs(20));
    println!("another CA's bundle: {line}");
    assert!(
        line.contains("the CA at 10.203.0.250:15012 is not trusted"),
        "{line}"
    );
    wrong.terminate(Duration::from_secs(10));
    let _ = std::fs::remove_file(&other);
    drop(d);
}

/// `meshctl tap` following node `i`'s admin port (inside its namespace).
fn follow_tap(t: &Topology, i: usize) -> Proc {
    let mut c = Command::new("nsenter");
    c.arg(format!("--net={}", t.nodes[i].ns.path().display()))
        .arg(bin("meshctl"))
        .arg("tap");
    let mut p = Proc::spawn(&format!("meshctl tap on node {}", i + 1), c);
    p.wait_for("following", Duration::from_secs(5));
    p
}

/// What a refusal case does and where it shows: (what, pod, destination, refusing node, the tap
/// line's parts, the failure metric's labels).
type RefusalCase<'a> = (
    &'a str,
    &'a str,
    &'a str,
    usize,
    &'a [&'a str],
    &'a [(&'a str, &'a str)],
);

#[test]
fn every_refusal_shows_on_tap_with_its_reason_and_in_the_labelled_failure_metric() {
    require_root("every_refusal_shows_on_tap");
    let pods = [
        PodSpec::meshed("client", 0, "client"),
        PodSpec::meshed("other", 0, "other"),
        PodSpec::meshed("server", 1, "echo"),
    ];
    let services = [
        ServiceSpec::new("echo", "10.96.0.10", 80, 7000, "echo"),
        ServiceSpec::new("empty", "10.96.0.20", 80, 7000, "nobody"),
    ];
    let mut t = Topology::build("obr", 2, &pods, &services);
    t.start(DaemonOpts::default());
    t.serve("server", "echo-server", 7000);
    t.serve("client", "echo-server", 7100);
    let base = std::fs::read_to_string(t.mesh_file_path()).expect("mesh file");
    t.rewrite_mesh_file(&format!(
        "{base}authorizationPolicies:\n  - name: deny-other\n    namespace: demo\n    \
         selector: {{ app: echo }}\n    action: DENY\n    from:\n      - principals: \
         [{other}]\n  - name: client-only-self\n    namespace: demo\n    selector: \
         {{ app: client }}\n    action: ALLOW\n    from:\n      - principals: [{client}]\n",
        other = principal("other-sa"),
        client = principal("client-sa"),
    ));
    for i in 0..2 {
        t.daemon(i)
            .wait_for_count("mesh file loaded", 2, Duration::from_secs(5));
    }
    let mut taps = [follow_tap(&t, 0), follow_tap(&t, 1)];
    let server = format!("{}:7000", t.pod("server").ip);
    let client_srv = format!("{}:7100", t.pod("client").ip);
    let failed = |t: &Topology, i: usize, labels: &[(&str, &str)]| {
        sample(
            &t.scrape(i),
            "nodemesh_tcp_connections_failed_total",
            labels,
        )
    };
    let cases: [RefusalCase; 4] = [
        (
            "cross-node policy deny (at the destination's node)",
            "other",
            &server,
            1,
            &[
                "refused inbound",
                "demo/other -> demo/server",
                "denied",
                "demo/deny-other",
            ],
            &[
                ("reporter", "inbound"),
                ("source_workload", "other"),
                ("destination_workload", "server"),
                ("reason", "denied"),
            ],
        ),
        (
            "same-node policy deny",
            "other",
            &client_srv,
            0,
            &[
                "refused outbound",
                "demo/other -> demo/client",
                "denied",
                "may not connect",
            ],
            &[
                ("reporter", "outbound"),
                ("source_workload", "other"),
                ("destination_workload", "client"),
                ("reason", "denied"),
            ],
        ),
        (
            "service without endpoints",
            "client",
            "10.96.0.20:80",
            0,
            &[
                "refused outbound",
                "demo/client -> unknown/unknown",
                "no_endpoints",
                "demo/empty",
            ],
            &[
                ("reporter", "outbound"),
                ("source_workload", "client"),
                ("reason", "no_endpoints"),
            ],
        ),
        (
            "connection without a capture record",
            "client",
            "10.203.0.1:15001",
            0,
            &[
                "refused outbound",
                "unknown/unknown -> unknown/unknown",
                "no_record",
            ],
            &[
                ("reporter", "outbound"),
                ("source_workload", "unknown"),
                ("reason", "no_record"),
            ],
        ),
    ];
    for (what, pod, dst, node, parts, labels) in cases {
        let before = failed(&t, node, labels);
        let (ok, out) = t.connect(pod, dst, &["--send", "100"]);
        assert!(
            !ok || !out.contains("echo=ok"),
            "{what} must be refused: {out}"
        );
        let line = taps[node].wait_for(parts[2], Duration::from_secs(5));
        let after = failed(&t, node, labels);
        println!(
            "{what}: node {} tap: {line}\n  failed{labels:?}: {before} → {after}",
            node + 1
        );
        for p in parts {
            assert!(
                line.contains(p),
                "{what}: want {p:?} in the tap line: {line}"
            );
        }
        assert!(after > before, "{what}: counted with its workloads");
        // The next case's line must be a new one.
        taps[node] = follow_tap(&t, node);
    }
    // A failed handshake: no identity to show, the peer and why instead; counted by why.
    let garbage = |t: &Topology| {
        sample(
            &t.scrape(1),
            "nodemesh_tls_handshakes_total",
            &[("direction", "inbound"), ("result", "garbage")],
        )
    };
    let garbage_before = garbage(&t);
    let raw = t.nodes[0].ns.run(|| {
        use std::io::{Read as _, Write as _};
        let mut s = std::net::TcpStream::connect("10.203.0.2:15008").expect("TCP");
        let _ = s.write_all(b"GET / HTTP/1.1\r\n\r\n");
        let mut b = Vec::new();
        let _ = s.read_to_end(&mut b);
    });
    raw.join().expect("raw client");
    let line = taps[1].wait_for("tls_", Duration::from_secs(5));
    println!("failed mTLS handshake: node 2 tap: {line}");
    assert!(
        line.starts_with("refused inbound")
            && line.contains("from 10.203.0.1:")
            && line.contains("mtls=false"),
        "{line}"
    );
    assert!(
        garbage(&t) > garbage_before,
        "tls_handshakes_total{{result=\"garbage\"}} counts it"
    );

    // meshctl shows the failures beside the successes: per edge in `stat` and `edges`.
    let nodes = "10.203.0.1:15020,10.203.0.2:15020";
    let (ok, out) = t.connect("client", &server, &["--send", "100"]);
    assert!(ok, "{out}");
    let table = meshctl(&t, 0, &["stat", "--node", nodes, "--by", "edge"]);
    println!("meshctl stat --by edge:\n{table}");
    let stat: serde_json::Value = serde_json::from_str(&meshctl(
        &t,
        0,
        &["stat", "--node", nodes, "--by", "edge", "-o", "json"],
    ))
    .expect("json");
    let row = |name: &str| {
        stat.as_array()
            .and_then(|a| a.iter().find(|r| r["name"] == name))
            .unwrap_or_else(|| panic!("no row {name}: {stat}"))
            .clone()
    };
    assert!(row("demo/other -> demo/server")["stats"]["failed"].as_u64() >= Some(1));
    assert!(row("demo/other -> demo/client")["stats"]["failed"].as_u64() >= Some(1));
    assert_eq!(row("demo/client -> demo/server")["stats"]["failed"], 0);
    let edges = meshctl(&t, 0, &["edges", "--node", nodes]);
    println!("meshctl edges:\n{edges}");
    let refused = edges
        .lines()
        .find(|l| l.starts_with("demo/other") && l.contains("demo/server"))
        .unwrap_or_else(|| panic!("no other → server edge:\n{edges}"));
    assert!(
        refused.contains("refused") && refused.trim_end().ends_with(" 1"),
        "{refused}"
    );
}

/// client and other on node 1, an HTTP server behind service echo (appProtocol http) on node 2,
/// and a policy denying other → server.
fn denied_caller_topology(tag: &str) -> Topology {
    let pods = [
        PodSpec::meshed("client", 0, "client"),
        PodSpec::meshed("other", 0, "other"),
        PodSpec::meshed("server", 1, "echo"),
    ];
    let services = [ServiceSpec::new("echo", "10.96.0.10", 80, 7000, "echo").app_protocol("http")];
    let mut t = Topology::build(tag, 2, &pods, &services);
    t.start(DaemonOpts::default());
    t.serve_with("server", "http-server", 7000, &["--name", "server"]);
    let base = std::fs::read_to_string(t.mesh_file_path()).expect("mesh file");
    t.rewrite_mesh_file(&format!(
        "{base}authorizationPolicies:\n  - name: deny-other\n    namespace: demo\n    \
         selector: {{ app: echo }}\n    action: DENY\n    from:\n      - principals: \
         [{other}]\n",
        other = principal("other-sa"),
    ));
    for i in 0..2 {
        t.daemon(i)
            .wait_for_count("mesh file loaded", 2, Duration::from_secs(5));
    }
    t
}

/// curl in a pod, in the background: `urls` (a curl glob) at `rate` (`25/s`), one after the other.
fn paced_curl(t: &Topology, pod: &str, rate: &str, urls: &str) -> Proc {
    let argv = [
        "curl",
        "-s",
        "-o",
        "/dev/null",
        "--max-time",
        "5",
        "--rate",
        rate,
        urls,
    ];
    exec_in_background(t, pod, &argv)
}

/// `mesh-app exec -- <argv>` in a pod, in the background.
fn exec_in_background(t: &Topology, pod: &str, argv: &[&str]) -> Proc {
    let p = t.pod(pod);
    let mut cmd = Command::new(bin("mesh-app"));
    cmd.arg("--cgroup")
        .arg(&p.cgroup)
        .args(["--netns", p.ns.name(), "exec", "--"])
        .args(argv);
    Proc::spawn(&format!("{} in {pod}", argv[0]), cmd)
}

/// `meshctl stat --window` over a known load: two callers send 25 requests per second each
/// (curl's --rate) to one service; a policy denies one of them. The window's rates are those of
/// the load, and the denied caller's requests show as failures, per edge and per service.
#[test]
fn stat_window_reports_the_rate_of_a_known_load_and_the_failures_of_a_denied_caller() {
    require_root("stat_window_reports_the_rate_of_a_known_load");
    const RATE: f64 = 25.0;
    let t = denied_caller_topology("obw");
    // 25/s for 18 s from each caller: the 10-s window opens 3 s in and closes well before.
    let urls = format!("http://{VIP}/r[1-{}]", (RATE * 18.0) as u32);
    let rate = format!("{RATE}/s");
    let mut loads = [
        paced_curl(&t, "client", &rate, &urls),
        paced_curl(&t, "other", &rate, &urls),
    ];
    std::thread::sleep(Duration::from_secs(3));
    let nodes = "10.203.0.1:15020,10.203.0.2:15020";
    let started = std::time::Instant::now();
    let stat: serde_json::Value = serde_json::from_str(&meshctl(
        &t,
        0,
        &[
            "stat", "--node", nodes, "--by", "edge", "--window", "10s", "-o", "json",
        ],
    ))
    .expect("json");
    println!(
        "meshctl stat --by edge --window 10s -o json ({:.1} s): {stat:#}",
        started.elapsed().as_secs_f64()
    );
    let by_service = meshctl(
        &t,
        0,
        &[
            "stat", "--node", nodes, "--by", "service", "--window", "5s", "-o", "wide",
        ],
    );
    println!("meshctl stat --by service --window 5s -o wide:\n{by_service}");
    for l in &mut loads {
        l.wait_exit(Duration::from_secs(30));
    }
    let row = |name: &str| {
        stat.as_array()
            .and_then(|a| a.iter().find(|r| r["name"] == name))
            .unwrap_or_else(|| panic!("no row {name}: {stat}"))
            .clone()
    };
    let window = row("demo/client -> demo/server")["window_seconds"]
        .as_f64()
        .expect("a window");
    assert!((10.0..12.0).contains(&window), "window {window} s");
    let within = |what: &str, v: f64| {
        assert!(
            (v - RATE).abs() <= RATE * 0.1,
            "{what}: {v:.2}/s, the load is {RATE}/s (within 10 %)"
        );
    };
    let ok = row("demo/client -> demo/server");
    within(
        "client → server requests",
        ok["requests_per_second"].as_f64().unwrap_or(0.0),
    );
    assert_eq!(ok["success_rate"].as_f64(), Some(1.0), "{ok}");
    // The denied caller: each request is answered with a failure, or its connection refused.
    let denied = row("demo/other -> demo/server");
    let failures = denied["requests_per_second"].as_f64().unwrap_or(0.0)
        * (1.0 - denied["success_rate"].as_f64().unwrap_or(1.0))
        + denied["failed_per_second"].as_f64().unwrap_or(0.0);
    within("other → server failures", failures);
    // Per service: both callers' requests, half of them failed.
    let svc = by_service
        .lines()
        .find(|l| l.starts_with("demo/echo "))
        .unwrap_or_else(|| panic!("no demo/echo row:\n{by_service}"));
    let cols: Vec<&str> = svc.split_whitespace().collect();
    // SERVICE CONNS OPEN SENT RECEIVED RPS SUCCESS P50 P95 P99 FAILED CONN/s FAILED/s SENT/s RECEIVED/s
    assert_eq!(cols.len(), 15, "wide columns: {svc}");
    let rps: f64 = cols[5].parse().expect("RPS");
    let success: f64 = cols[6].trim_end_matches('%').parse().expect("SUCCESS");
    assert!(
        (rps - 2.0 * RATE).abs() <= 2.0 * RATE * 0.1 && (40.0..=60.0).contains(&success),
        "demo/echo: both callers' {} /s, half failed: {svc}",
        2.0 * RATE
    );
}

/// playwright-core as `cargo xtask setup` installs it (the env it sets, or its cache).
fn playwright_core() -> String {
    if let Ok(p) = std::env::var("NODEMESH_PLAYWRIGHT_CORE") {
        return p;
    }
    std::fs::read_dir("/var/cache/nodemesh")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path().join("node_modules/playwright-core"))
        .find(|p| p.join("package.json").is_file())
        .unwrap_or_else(|| {
            panic!(
                "playwright-core is not installed: run `cargo xtask setup` (cargo xtask test \
                 installs it, with Debian's chromium)"
            )
        })
        .display()
        .to_string()
}

/// `meshctl dashboard` in headless Chromium: while client → server requests flow (HBONE, so
/// mTLS) the page draws that edge green with its rate and success, and the edge a policy
/// refuses (other → server) in red. The screenshot goes to target/dashboard.png.
#[test]
fn dashboard_draws_the_live_graph_in_a_headless_browser() {
    require_root("dashboard_draws_the_live_graph");
    assert!(
        std::path::Path::new("/usr/bin/chromium").is_file(),
        "no /usr/bin/chromium: run `cargo xtask setup` (it installs Debian's chromium)"
    );
    let t = denied_caller_topology("obd");
    // The refused edge: plain TCP from other straight to the server pod, refused at its node.
    let server = format!("{}:7000", t.pod("server").ip);
    for _ in 0..3 {
        let (ok, out) = t.connect("other", &server, &["--send", "100"]);
        assert!(
            !ok || !out.contains("echo=ok"),
            "other must be refused: {out}"
        );
    }
    // Traffic that flows while the page is open: 10 requests per second for up to 60 s.
    let urls = format!("http://{VIP}/d[1-600]");
    let mut load = paced_curl(&t, "client", "10/s", &urls);
    let mut dash = {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net={}", t.nodes[0].ns.path().display()))
            .arg(bin("meshctl"))
            .args([
                "dashboard",
                "--node",
                "10.203.0.1:15020,10.203.0.2:15020",
                "--listen",
                "127.0.0.1:15080",
            ]);
        Proc::spawn("meshctl dashboard", c)
    };
    dash.wait_for("http://127.0.0.1:15080/", Duration::from_secs(10));
    // Not served beyond loopback.
    let out = meshctl_output(&t, 0, &["dashboard", "--listen", "10.203.0.1:15081"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("loopback only"),
        "a non-loopback --listen is refused: {err}"
    );
    let shot = bin("meshctl")
        .parent()
        .and_then(|d| d.parent())
        .expect("target/")
        .join("dashboard.png");
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/dashboard/check.cjs");
    let out = Command::new("nsenter")
        .arg(format!("--net={}", t.nodes[0].ns.path().display()))
        .args(["node", script, "http://127.0.0.1:15080/"])
        .arg(&shot)
        .args([
            "demo/client|demo/server|mtls",
            "demo/other|demo/server|refused",
        ])
        .env("NODEMESH_PLAYWRIGHT_CORE", playwright_core())
        .output()
        .expect("run node");
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    println!(
        "headless Chromium on meshctl dashboard:\n{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    load.signal(libc::SIGTERM);
    assert!(out.status.success(), "the browser check failed");
    let line = |prefix: &str| {
        stdout
            .lines()
            .find(|l| l.starts_with(prefix))
            .unwrap_or_else(|| panic!("no {prefix:?} line:\n{stdout}"))
            .to_string()
    };
    let ok = line("edge demo/client -> demo/server state=mtls");
    assert!(
        ok.contains(" rps") && ok.contains("100.0% ok") && ok.contains("mTLS"),
        "the flowing edge shows its rate, success and mTLS: {ok}"
    );
    let refused = line("edge demo/other -> demo/server state=refused");
    assert!(
        refused.contains("stroke=rgb(220, 38, 38)") && refused.contains("refused"),
        "the refused edge is drawn red: {refused}"
    );
    assert!(shot.is_file(), "screenshot at {}", shot.display());
}

/// The kernel's capture decisions in the daemon's log: off by default, on at run time with
/// `/logging` for the `nodemesh::ebpf` target alone, each record naming the pod (the kernel logs
/// its workload id), and off again with the next filter.
#[test]
fn kernel_debug_logging_switched_on_at_run_time_shows_each_capture_decision_with_the_pod() {
    require_root("kernel_debug_logging");
    let mut t = topology("obk");
    let server = format!("{}:7000", t.pod("server").ip);
    let decisions = |t: &mut Topology| {
        t.daemon(0)
            .lines()
            .iter()
            .filter(|l| l.contains("kernel: connect of workload"))
            .count()
    };
    let set = |t: &Topology, filter: &str| {
        let r = nodemesh_tests::topology::http_request(
            &t.nodes[0].ns,
            "127.0.0.1:15000",
            &format!("POST /logging?level={filter}"),
        );
        assert!(r.contains(" 200 "), "{filter}: {r}");
    };
    // Off by default.
    let (ok, out) = t.connect("client", &server, &["--send", "100"]);
    assert!(ok, "{out}");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(decisions(&mut t), 0, "no decision is logged by default");
    // On, for the kernel's target only.
    set(&t, "info,nodemesh::ebpf=debug");
    let (ok, out) = t.connect("client", &server, &["--send", "100"]);
    assert!(ok, "{out}");
    let captured = t
        .daemon(0)
        .wait_for("captured: to the proxy", Duration::from_secs(5));
    println!("captured: {captured}");
    assert!(
        captured.contains("nodemesh::ebpf")
            && captured.contains("demo/client")
            && captured.contains(&server),
        "the decision names the pod and the destination: {captured}"
    );
    // A loopback connect stays in the pod, and says so.
    let _ = t.connect("client", "127.0.0.1:9", &["--send", "1"]);
    let alone = t
        .daemon(0)
        .wait_for("left alone: loopback", Duration::from_secs(5));
    println!("left alone: {alone}");
    assert!(alone.contains("demo/client"), "{alone}");
    // Off again with a filter that does not name the target.
    set(&t, "info");
    let before = decisions(&mut t);
    let (ok, out) = t.connect("client", &server, &["--send", "100"]);
    assert!(ok, "{out}");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(decisions(&mut t), before, "off again: nothing more logged");
}

/// meshctl in the fabric's network namespace (another host: the CA's, an operator's machine),
/// whatever its exit status.
fn meshctl_outside(t: &Topology, args: &[&str]) -> std::process::Output {
    Command::new("nsenter")
        .arg(format!("--net={}", t.fabric.path().display()))
        .arg(bin("meshctl"))
        .args(args)
        .output()
        .expect("run meshctl")
}

/// `cmd` in the fabric's network namespace: (success, stdout + stderr).
fn outside(t: &Topology, argv: &[&str]) -> (bool, String) {
    let out = Command::new("nsenter")
        .arg(format!("--net={}", t.fabric.path().display()))
        .args(argv)
        .output()
        .expect("run");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

fn openssl(args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .output()
        .expect("run openssl");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A P-256 key and a certificate naming `uri` (client use) into `dir`/operator.{key,pem}:
/// self-signed, or signed by `ca` (certificate, key) with the CA's chain appended.
fn forge(dir: &std::path::Path, uri: &str, ca: Option<(&std::path::Path, &std::path::Path)>) {
    std::fs::create_dir_all(dir).expect("dir");
    let p = |f: &str| dir.join(f).display().to_string();
    let ext = dir.join("ext.cnf");
    std::fs::write(
        &ext,
        format!(
            "[req]\ndistinguished_name=dn\n[dn]\n[v3]\nsubjectAltName=URI:{uri}\n\
             extendedKeyUsage=clientAuth\nkeyUsage=digitalSignature\nbasicConstraints=CA:FALSE\n"
        ),
    )
    .expect("ext");
    let ext = ext.display().to_string();
    openssl(&[
        "genpkey",
        "-algorithm",
        "EC",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-out",
        &p("operator.key"),
    ]);
    match ca {
        None => openssl(&[
            "req",
            "-x509",
            "-new",
            "-key",
            &p("operator.key"),
            "-subj",
            "/CN=forged",
            "-days",
            "1",
            "-config",
            &ext,
            "-extensions",
            "v3",
            "-out",
            &p("operator.pem"),
        ]),
        Some((cert, key)) => {
            openssl(&[
                "req",
                "-new",
                "-key",
                &p("operator.key"),
                "-subj",
                "/CN=forged",
                "-config",
                &ext,
                "-out",
                &p("req.csr"),
            ]);
            openssl(&[
                "x509",
                "-req",
                "-in",
                &p("req.csr"),
                "-CA",
                &cert.display().to_string(),
                "-CAkey",
                &key.display().to_string(),
                "-CAcreateserial",
                "-days",
                "1",
                "-extfile",
                &ext,
                "-extensions",
                "v3",
                "-out",
                &p("leaf.pem"),
            ]);
            let chain = std::fs::read_to_string(dir.join("leaf.pem")).expect("leaf")
                + &std::fs::read_to_string(cert).expect("signer");
            std::fs::write(dir.join("operator.pem"), chain).expect("chain");
        }
    }
}

/// Inspection without a shell on the node: an operator certificate from `mesh-daemon ca
/// issue-operator` reads `meshctl identity`, `config` and `stat` from another host over the
/// nodes' operator port (mTLS, the node's own certificate); no certificate, a certificate of
/// another CA, and a mesh certificate that is not an operator's are refused — each counted, each
/// with its reason — and a pod reaching the port gets nothing.
#[test]
fn operators_read_nodes_from_outside_over_mtls_and_nobody_else_does() {
    require_root("operator_port");
    let mut t = topology("obo");
    let node1 = t.nodes[0].ip.clone();
    let base = t.ca_dir().parent().expect("topology dir").to_path_buf();
    let op = base.join("alice");
    let out = Command::new(bin("mesh-daemon"))
        .args(["ca", "issue-operator", "--dir"])
        .arg(t.ca_dir())
        .args(["--name", "alice", "--lifetime", "1h", "--out"])
        .arg(&op)
        .output()
        .expect("issue-operator");
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}{said}",
        String::from_utf8_lossy(&out.stderr)
    );
    println!("{said}");
    assert!(
        said.contains("spiffe://cluster.local/operator/alice"),
        "{said}"
    );
    let op_arg = op.display().to_string();
    let remote = format!("https://{node1}");

    // identity, from another host: node 1's SVIDs (the node certificate may still be on its way
    // at first: retried for up to 10 s).
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let id = loop {
        let o = meshctl_outside(&t, &["--operator", &op_arg, "identity", "--admin", &remote]);
        if o.status.success() {
            break String::from_utf8_lossy(&o.stdout).into_owned();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "meshctl identity over the operator port: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    println!("{id}");
    for sa in ["client-sa", "other-sa", "local-sa"] {
        assert!(id.contains(&principal(sa)), "{id}");
    }
    // config, as JSON: the node's workloads and its own node certificate.
    let o = meshctl_outside(
        &t,
        &[
            "--operator",
            &op_arg,
            "config",
            "-o",
            "json",
            "--admin",
            &remote,
        ],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let dump: serde_json::Value = serde_json::from_slice(&o.stdout).expect("JSON");
    assert_eq!(dump["node"]["name"], t.nodes[0].name);
    assert!(
        dump["workloads"]
            .as_array()
            .is_some_and(|w| w.iter().any(|w| w["name"] == "client")),
        "{dump}"
    );
    assert_eq!(
        dump["nodeCertificate"]["identity"],
        format!("spiffe://cluster.local/node/{}", t.nodes[0].name)
    );
    // stat over both nodes' operator ports.
    let o = meshctl_outside(
        &t,
        &[
            "--operator",
            &op_arg,
            "stat",
            "--node",
            &format!("{remote},https://{}", t.nodes[1].ip),
        ],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // The node logs who asked.
    t.daemon(0)
        .wait_for("operator request", Duration::from_secs(5));
    assert!(
        t.daemon(0)
            .lines()
            .iter()
            .any(|l| l.contains("operator request") && l.contains("alice")),
        "the audit line names the operator"
    );

    // Refused: no --operator (meshctl says what to pass) …
    let o = meshctl_outside(&t, &["identity", "--admin", &remote]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("--operator"), "{err}");
    // … a client without a certificate (curl; the port asks for one) …
    let url = format!("https://{node1}:15010/config_dump");
    let (ok, said) = outside(&t, &["curl", "-sS", "-k", "--max-time", "5", &url]);
    println!("curl without a certificate: {said}");
    assert!(!ok && !said.contains("workloads"), "{said}");
    // … a certificate of another CA naming an operator …
    let forged = base.join("forged");
    forge(&forged, "spiffe://cluster.local/operator/mallory", None);
    std::fs::copy(op.join("bundle.pem"), forged.join("bundle.pem")).expect("bundle");
    let o = meshctl_outside(
        &t,
        &[
            "--operator",
            &forged.display().to_string(),
            "identity",
            "--admin",
            &remote,
        ],
    );
    let err = String::from_utf8_lossy(&o.stderr);
    println!("another CA's operator: {err}");
    assert!(
        !o.status.success() && err.contains("refused the operator certificate"),
        "{err}"
    );
    // … and a certificate of this mesh's CA that names a workload, not an operator: the TLS
    // handshake succeeds, every request is 403 with the reason.
    let workload = base.join("workload");
    forge(
        &workload,
        &principal("client-sa"),
        Some((
            &t.ca_dir().join("signer.pem"),
            &t.ca_dir().join("signer.key"),
        )),
    );
    let (ok, said) = outside(
        &t,
        &[
            "curl",
            "-sS",
            "-k",
            "--max-time",
            "5",
            "-w",
            "\nstatus=%{http_code}",
            "--cert",
            &workload.join("operator.pem").display().to_string(),
            "--key",
            &workload.join("operator.key").display().to_string(),
            &url,
        ],
    );
    println!("a workload's certificate: {said}");
    assert!(
        ok && said.contains("status=403") && said.contains("is not an operator"),
        "{said}"
    );
    assert!(!said.contains("\"workloads\""), "{said}");
    // meshctl itself refuses to present a workload's certificate as an operator's.
    std::fs::copy(op.join("bundle.pem"), workload.join("bundle.pem")).expect("bundle");
    let o = meshctl_outside(
        &t,
        &[
            "--operator",
            &workload.display().to_string(),
            "identity",
            "--admin",
            &remote,
        ],
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("not an operator"),
        "{err}"
    );

    // A pod reaching its node's operator port gets no answer it can use (it has no operator
    // certificate; its daemon holds only SVIDs, never an operator's key).
    let mut pod_curl = exec_in_background(
        &t,
        "client",
        &["curl", "-sS", "-k", "--max-time", "5", &url],
    );
    let status = pod_curl
        .wait_exit(Duration::from_secs(10))
        .expect("curl in the pod ends");
    let said = pod_curl.output();
    println!("from a pod: {said}");
    assert!(!status.success() && !said.contains("workloads"), "{said}");

    // Each refusal counted by its reason on the node that refused it.
    let m = t.scrape(0);
    let count = |result: &str| {
        sample(
            &m,
            "nodemesh_operator_requests_total",
            &[("result", result)],
        )
    };
    assert!(count("served") >= 3, "served: {}", count("served"));
    assert!(count("not_operator") >= 1, "not_operator");
    assert!(
        count("no_client_certificate") >= 2,
        "curl without a certificate, from outside and from the pod: {}",
        count("no_client_certificate")
    );
    assert!(count("untrusted") >= 1, "another CA's certificate");
}
