//! Privileged: the attack suite. Two nodes in network namespaces, the CA on the fabric, the real
//! daemons and kernel hooks; an attacker on node 1 (with node 1's token, so it can hold node 1's
//! identities and no others) or inside a pod. Every case prints `attack <name> → <what the
//! attacker saw>` and asserts the refusal, its reason and its counter; a legitimate connection
//! runs through each suite and must be unaffected.
//!
//! - HBONE: certificates (none, another CA's, expired, not yet valid, outside the trust domain,
//!   TLS 1.2, garbage, plaintext), CONNECTs the destination must refuse (its own ports, loopback,
//!   a pod on another node, a local pod outside the mesh, malformed authorities), and clients
//!   that open and never speak, one and thousands at once (`--handshake-timeout`).
//! - CA: another node's identity, replayed and tampered CSRs, extra SANs, CA certificates,
//!   oversized and malformed bodies, no token, floods; a node token file with trailing
//!   whitespace works.
//! - Pods: a process moved between pod cgroups is identified by its cgroup at connect time; a
//!   pod's connections straight to the node proxy's ports are not proxied. (A pod spoofing or
//!   binding another pod's address: `datapath::spoofed_address_is_identified_by_cgroup`.)
//! - Files: a 100 MB mesh file, a directory or non-UTF-8 in its place, a ConfigMap-style
//!   symlink swap; the CA with keys it cannot read or that others can read.

use std::{
    net::SocketAddr,
    process::Command,
    sync::Arc,
    time::{Duration, Instant},
};

use mesh_daemon::{
    identity::{
        Identity,
        manager::{Manager, ManagerConfig},
    },
    metrics::Metrics,
    proxy::hbone,
};
use nodemesh_tests::{
    bin,
    hostile::{
        attacker, ca_flood, ca_request, csr, leaf, raw_attempt, read_issuer, rogue_root,
        tls_attempt,
    },
    process::Proc,
    require_root,
    topology::{DaemonOpts, PodSpec, ServiceSpec, Topology, sample},
};

const TD: &str = "cluster.local";
const VIP: &str = "10.96.0.10:80";
const NODE2_HBONE: &str = "10.203.0.2:15008";
const CA: &str = "10.203.0.250:15012";

/// A mesh file's policies: other-sa may not reach the echo server.
const DENY_OTHER: &str = "authorizationPolicies:\n  - name: deny-other\n    namespace: demo\n    \
     selector: { app: echo }\n    action: DENY\n    from:\n      - principals: \
     [spiffe://cluster.local/ns/demo/sa/other-sa]\n";

fn id(sa: &str) -> Identity {
    Identity::new(TD, "demo", sa)
}

fn addr(s: &str) -> SocketAddr {
    s.parse().expect("socket address")
}

/// client and other (another service account) on node 1; the server and a pod outside the mesh
/// on node 2.
fn topology(tag: &str, opts: DaemonOpts) -> Topology {
    let pods = [
        PodSpec::meshed("client", 0, "client"),
        PodSpec::meshed("other", 0, "other"),
        PodSpec::meshed("server", 1, "echo"),
        PodSpec::plain("bystander", 1),
    ];
    let services = [ServiceSpec::new("echo", "10.96.0.10", 80, 7000, "echo")];
    let mut t = Topology::build(tag, 2, &pods, &services);
    t.start(opts);
    t.serve("server", "echo-server", 7000);
    t
}

/// ~6 s of paced 4 KiB pieces from the client pod to the server: legitimate traffic that must
/// come through whatever the attacker does meanwhile. Join it for its result line.
fn legitimate(t: &Topology, secs: u64) -> std::thread::JoinHandle<String> {
    let client = t.pod("client");
    let server = format!("{}:7000", t.pod("server").ip);
    let (cg, ns) = (client.cgroup.clone(), client.ns.name().to_string());
    let bytes = (secs * 50 * 4096).to_string();
    std::thread::spawn(move || {
        let out = nodemesh_tests::mesh_app(
            &cg,
            &ns,
            &["connect", &server, "--send", &bytes, "--pace-ms", "20"],
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    })
}

fn check_legitimate(t: &Topology, legit: std::thread::JoinHandle<String>) {
    let legit = legit.join().expect("legit thread");
    println!("legitimate connection during the attacks: {legit}");
    assert!(
        legit.contains("echo=ok"),
        "legitimate traffic unaffected: {legit}"
    );
    let (ok, out) = t.connect("client", VIP, &["--send", "65536"]);
    assert!(
        ok && out.contains("echo=ok"),
        "and still served after: {out}"
    );
}

/// Prints every case and asserts none got in.
fn report(results: &[(String, String)]) {
    for (what, r) in results {
        println!("attack {what:<44} → {r}");
    }
    for (what, r) in results {
        assert!(
            !r.contains("OPENED") && !r.contains("ISSUED") && !r.starts_with("read "),
            "{what} must be refused: {r}"
        );
    }
}

fn manager_config(t: &Topology, token_file: std::path::PathBuf) -> ManagerConfig {
    ManagerConfig {
        ca_url: t.ca_url(),
        ca_bundle: t.ca_dir().join("bundle.pem"),
        token_file,
        trust_domain: TD.into(),
        refresh: Duration::from_secs(1),
        mark: 0,
    }
}

#[test]
fn hbone_refuses_bad_certificates_and_connects_while_legitimate_traffic_flows() {
    require_root("hbone_refuses");
    let mut t = topology("ath", DaemonOpts::default());
    // Policies: the `other` service account may not reach the echo server (on another node), and
    // only client-sa may reach the client pod (on other's own node: enforced in-process there).
    let base = std::fs::read_to_string(t.mesh_file_path()).expect("mesh file");
    t.rewrite_mesh_file(&format!(
        "{base}{DENY_OTHER}  - name: client-only-self\n    namespace: demo\n    selector: \
         {{ app: client }}\n    action: ALLOW\n    from:\n      - principals: \
         [spiffe://cluster.local/ns/demo/sa/client-sa]\n"
    ));
    for i in 0..2 {
        t.daemon(i)
            .wait_for_count("mesh file loaded", 2, Duration::from_secs(5));
    }
    t.serve("client", "echo-server", 7100);
    let legit = legitimate(&t, 6);
    std::thread::sleep(Duration::from_millis(500));

    let ca_dir = t.ca_dir();
    let server_ip = t.pod("server").ip.clone();
    let client_pod = format!("{}:7000", t.pod("client").ip);
    let bystander = format!("{}:7000", t.pod("bystander").ip);
    let cfg = manager_config(&t, t.token_file(0));
    let server_sni = id("server-sa").server_name();
    let server = format!("{server_ip}:7000");
    let results = t.nodes[0]
        .ns
        .run(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                let hb_addr = addr(NODE2_HBONE);
                let mut out = Vec::new();
                out.push((
                    "plaintext HTTP/2".to_string(),
                    raw_attempt(
                        hb_addr,
                        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0",
                    )
                    .await,
                ));
                out.push((
                    "garbage instead of a ClientHello".to_string(),
                    raw_attempt(hb_addr, b"\x16\x03\x01\x00\x05garbage and more garbage").await,
                ));
                let now = time::OffsetDateTime::now_utc();
                let hour = time::Duration::hours(1);
                let (rogue, rogue_der) = rogue_root();
                let (issuer, issuer_der) = read_issuer(&ca_dir);
                let certs = [
                    // Another CA's certificate, naming a real identity.
                    (
                        "certificate from another CA",
                        leaf(
                            &id("client-sa").to_string(),
                            now - hour,
                            now + hour,
                            &rogue,
                            rogue_der,
                        ),
                    ),
                    // The mesh's own signer, but wrong in time or in name.
                    (
                        "expired SVID",
                        leaf(
                            &id("client-sa").to_string(),
                            now - hour * 2,
                            now - hour,
                            &issuer,
                            issuer_der.clone(),
                        ),
                    ),
                    (
                        "not-yet-valid SVID",
                        leaf(
                            &id("client-sa").to_string(),
                            now + hour,
                            now + hour * 2,
                            &issuer,
                            issuer_der.clone(),
                        ),
                    ),
                    (
                        "SVID outside the trust domain",
                        leaf(
                            "spiffe://evil.example/ns/demo/sa/client-sa",
                            now - hour,
                            now + hour,
                            &issuer,
                            issuer_der.clone(),
                        ),
                    ),
                ];
                let tls13: &[&'static rustls::SupportedProtocolVersion] =
                    &[&rustls::version::TLS13];
                let tls12: &[&'static rustls::SupportedProtocolVersion] =
                    &[&rustls::version::TLS12];
                let attempts = certs
                    .into_iter()
                    .map(|(what, chain)| (what, Some(chain), tls13))
                    .chain([
                        ("TLS 1.2 only", None, tls12),
                        ("no client certificate", None, tls13),
                    ]);
                for (what, chain, versions) in attempts {
                    let cfg = attacker(chain, versions);
                    out.push((
                        what.to_string(),
                        tls_attempt(hb_addr, cfg, &server_sni).await,
                    ));
                }

                // A valid SVID (node 1 may hold client-sa), then CONNECTs the destination must
                // refuse.
                let metrics = Arc::new(Metrics::new());
                let mgr = Manager::new(cfg, metrics.clone()).expect("manager");
                mgr.start();
                mgr.set_wanted([id("client-sa")]);
                mgr.wait_for(&id("client-sa"), Duration::from_secs(10))
                    .await
                    .expect("node 1 gets client-sa");
                let hb = hbone::Client::new(0, mgr.clone(), metrics);
                for (what, target) in [
                    (
                        "CONNECT to node 2's metrics port",
                        "10.203.0.2:15020".to_string(),
                    ),
                    (
                        "CONNECT to node 2's health port",
                        "10.203.0.2:15021".to_string(),
                    ),
                    ("CONNECT to node 2's HBONE port", NODE2_HBONE.to_string()),
                    (
                        "CONNECT to loopback (the admin port)",
                        "127.0.0.1:15000".to_string(),
                    ),
                    ("CONNECT to a pod on another node", client_pod.clone()),
                    ("CONNECT to a local pod outside the mesh", bystander.clone()),
                    (
                        "CONNECT to a mesh source address",
                        "10.210.2.254:7000".to_string(),
                    ),
                ] {
                    let r = hb
                        .connect(
                            hb_addr,
                            addr(&target),
                            hbone::Ends {
                                source: &id("client-sa"),
                                source_workload: "demo/client",
                                destination: &id("server-sa"),
                                protocol: None,
                                client: None,
                            },
                        )
                        .await;
                    out.push((
                        format!("{what} ({target})"),
                        match r {
                            Ok(_) => "OPENED".into(),
                            Err(e) => format!("refused: {e}"),
                        },
                    ));
                }
                // Authorities that are not ip:port, sent raw on one HTTP/2 connection with the
                // valid SVID; a good CONNECT on the same connection still opens afterwards.
                out.extend(malformed_connects(mgr.clone(), &server_ip, &server_sni).await);
                out
            })
        })
        .join()
        .expect("attacker thread");
    report(&results);
    for (what, r) in &results {
        if what.starts_with("CONNECT") && !what.contains("malformed") && !what.contains("good") {
            assert!(r.contains("403"), "{what}: {r}");
        }
        if what.contains("malformed") {
            assert!(
                r.contains("400") && r.contains("is not ip:port"),
                "{what}: {r}"
            );
        }
        if what.contains("same connection") {
            assert!(r.contains("200"), "{what}: {r}");
        }
        if what.contains("outside the mesh") {
            assert!(r.contains("not a meshed pod on this node"), "{what}: {r}");
        }
    }

    // Denied by policy: the kernel attributes `other` to other-sa, node 2 refuses it.
    let (ok, out) = t.connect("other", &server, &["--send", "100"]);
    assert!(!ok, "other-sa is denied by policy: {out}");
    println!("attack {:<44} → {out}", "pod denied by a DENY policy");
    // Same node: node 1's proxy is also the destination's, and applies its ALLOW policy.
    let client_srv = format!("{}:7100", t.pod("client").ip);
    let (ok, out) = t.connect("other", &client_srv, &["--send", "100"]);
    assert!(
        !ok,
        "other-sa is not in the client pod's ALLOW policy: {out}"
    );
    println!(
        "attack {:<44} → {out}",
        "same-node pod outside an ALLOW policy"
    );
    assert!(
        t.wait_metric(
            0,
            "nodemesh_authorization_decisions_total",
            &[("result", "deny"), ("policy", "no_allow_match")],
            1
        ) >= 1,
        "node 1 counts the same-node denial"
    );
    check_legitimate(&t, legit);

    let m = t.scrape(1);
    for l in m.lines().filter(|l| {
        l.starts_with("nodemesh_tls_handshakes_total")
            || l.starts_with("nodemesh_authorization")
            || l.starts_with("nodemesh_tcp_connections_failed")
    }) {
        println!("node 2: {l}");
    }
    let handshakes = |result: &str| {
        sample(
            &m,
            "nodemesh_tls_handshakes_total",
            &[("direction", "inbound"), ("result", result)],
        )
    };
    for (result, at_least, what) in [
        ("garbage", 2, "plaintext and garbage"),
        ("untrusted", 1, "another CA's certificate"),
        ("expired", 1, "the expired SVID"),
        ("not_yet_valid", 1, "the not-yet-valid SVID"),
        ("bad_identity", 1, "the SVID outside the trust domain"),
        ("incompatible", 1, "the TLS 1.2 client"),
        ("no_client_certificate", 1, "a missing client certificate"),
    ] {
        assert!(
            handshakes(result) >= at_least,
            "{what} is counted as tls_handshakes_total{{result=\"{result}\"}}"
        );
    }
    let failed = |reason: &str| {
        sample(
            &m,
            "nodemesh_tcp_connections_failed_total",
            &[("reporter", "inbound"), ("reason", reason)],
        )
    };
    assert!(failed("not_local_pod") >= 6, "refused CONNECTs are counted");
    assert!(
        failed("hbone_bad_request") >= 3,
        "malformed authorities are counted"
    );
    assert!(
        sample(
            &m,
            "nodemesh_authorization_decisions_total",
            &[("result", "deny"), ("policy", "demo/deny-other")]
        ) >= 1
    );
    t.daemon(1)
        .wait_for("HBONE mTLS handshake refused", Duration::from_secs(1));
}

/// CONNECTs whose authority is not ip:port, on one HTTP/2 connection over a valid mTLS session,
/// then a good CONNECT on the same connection.
async fn malformed_connects(
    mgr: Arc<Manager>,
    server_ip: &str,
    server_sni: &str,
) -> Vec<(String, String)> {
    let cfg = mesh_daemon::identity::tls::client_config(mgr, id("client-sa")).expect("config");
    let tcp = tokio::net::TcpStream::connect(NODE2_HBONE)
        .await
        .expect("TCP to node 2");
    let name = rustls::pki_types::ServerName::try_from(server_sni.to_string()).expect("name");
    let tls = tokio_rustls::TlsConnector::from(cfg)
        .connect(name, tcp)
        .await
        .expect("mTLS with a valid SVID");
    let (mut h2, conn) = h2::client::handshake(tls).await.expect("HTTP/2");
    tokio::spawn(conn);
    let mut out = Vec::new();
    for (what, authority) in [
        ("a DNS name", "echo.demo.svc.cluster.local:7000".to_string()),
        ("no port", server_ip.to_string()),
        ("userinfo", format!("admin@{server_ip}:7000")),
        (
            "a good CONNECT on the same connection",
            format!("{server_ip}:7000"),
        ),
    ] {
        let req = http::Request::builder()
            .method(http::Method::CONNECT)
            .uri(authority.as_str())
            .header(hbone::SOURCE_HEADER, "demo/client")
            .body(())
            .expect("request");
        let label = if what.contains("good") {
            format!("CONNECT, {what}")
        } else {
            format!("CONNECT with a malformed authority: {what}")
        };
        h2 = match h2.ready().await {
            Ok(ready) => ready,
            Err(e) => {
                out.push((label, format!("connection gone: {e}")));
                break;
            }
        };
        let r = match h2.send_request(req, false) {
            Ok((resp, _body)) => match tokio::time::timeout(Duration::from_secs(5), resp).await {
                Ok(Ok(resp)) => {
                    let why = resp
                        .headers()
                        .get(hbone::ERROR_HEADER)
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("")
                        .to_string();
                    if resp.status() == http::StatusCode::OK && !what.contains("good") {
                        "OPENED".into()
                    } else {
                        format!("{} {why}", resp.status().as_u16())
                    }
                }
                Ok(Err(e)) => format!("refused: {e}"),
                Err(_) => "no answer".into(),
            },
            Err(e) => format!("refused: {e}"),
        };
        out.push((label, r));
    }
    out
}

#[test]
fn clients_that_open_and_never_speak_are_closed_after_the_handshake_timeout() {
    require_root("clients_that_open_and_never_speak");
    const MANY: usize = 2000;
    let mut t = topology(
        "athh",
        DaemonOpts {
            handshake_timeout: Some("2s"),
            ..DaemonOpts::default()
        },
    );
    let legit = legitimate(&t, 8);
    std::thread::sleep(Duration::from_millis(300));
    let flood = t.nodes[0].ns.run(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async move {
            use tokio::io::AsyncReadExt as _;
            // One: how long until the node gives up on it.
            let start = Instant::now();
            let mut s = tokio::net::TcpStream::connect(NODE2_HBONE)
                .await
                .expect("TCP");
            let mut b = [0u8; 16];
            let one = tokio::time::timeout(Duration::from_secs(15), s.read(&mut b)).await;
            let one = (start.elapsed(), format!("{one:?}"));
            // Thousands at once, opened 200 at a time (the listener's backlog), all held.
            let start = Instant::now();
            let gate = Arc::new(tokio::sync::Semaphore::new(200));
            let mut tasks = Vec::new();
            for _ in 0..MANY {
                let gate = gate.clone();
                tasks.push(tokio::spawn(async move {
                    let permit = gate.acquire_owned().await.expect("gate");
                    let mut s = match tokio::net::TcpStream::connect(NODE2_HBONE).await {
                        Ok(s) => s,
                        Err(e) => return Err(format!("connect: {e}")),
                    };
                    drop(permit);
                    let opened = Instant::now();
                    let mut b = [0u8; 16];
                    match tokio::time::timeout(Duration::from_secs(20), s.read(&mut b)).await {
                        Ok(Ok(0)) | Ok(Err(_)) => Ok(opened.elapsed()),
                        Ok(Ok(n)) => Err(format!("read {n} bytes")),
                        Err(_) => Err("still open after 20 s".to_string()),
                    }
                }));
            }
            let mut closed = Vec::new();
            let mut other = std::collections::BTreeMap::<String, usize>::new();
            for task in tasks {
                match task.await.expect("task") {
                    Ok(d) => closed.push(d),
                    Err(e) => *other.entry(e).or_default() += 1,
                }
            }
            if !other.is_empty() {
                println!("  not closed by the node: {other:?}");
            }
            closed.sort();
            (one, closed, start.elapsed())
        })
    });
    // While they are held: a new legitimate connection through node 2.
    std::thread::sleep(Duration::from_millis(1000));
    let during = Instant::now();
    let (ok, out) = t.connect("client", VIP, &["--send", "4096"]);
    let during = during.elapsed();
    let ((one_took, one), closed, all_took) = flood.join().expect("flood thread");
    println!(
        "attack {:<44} → closed by node 2 after {one_took:?} ({one})",
        "a client that opens and never speaks"
    );
    let median = closed.get(closed.len() / 2).copied().unwrap_or_default();
    let last = closed.last().copied().unwrap_or_default();
    println!(
        "attack {:<44} → {} of {MANY} closed by node 2, each after a median {median:?} (last \
         {last:?}); all done in {all_took:?}",
        format!("{MANY} such clients at once"),
        closed.len()
    );
    println!("a new connection while they were held: {out} (in {during:?})");
    // What node 2's kernel did with the burst (listen queue overflows, SYN cookies).
    let nstat = Command::new("ip")
        .args(["netns", "exec", t.nodes[1].ns.name(), "nstat", "-az"])
        .output()
        .expect("nstat");
    for l in String::from_utf8_lossy(&nstat.stdout).lines().filter(|l| {
        [
            "ListenOverflows",
            "ListenDrops",
            "SyncookiesSent",
            "SyncookiesRecv",
            "TCPReqQFullDrop",
        ]
        .iter()
        .any(|k| l.contains(k))
    }) {
        println!("  node 2 kernel: {l}");
    }
    assert!(
        one_took >= Duration::from_millis(1500) && one_took < Duration::from_secs(8),
        "--handshake-timeout 2s bounds a silent client: {one_took:?}"
    );
    assert_eq!(
        closed.len(),
        MANY,
        "every silent client is closed by the node (a client left open here whose connection the \
         node never had is an accept-queue overflow: see ListenOverflows above)"
    );
    // And node 2 holds nothing of them: only the daemons' own pooled HBONE connections remain.
    let ss = Command::new("ip")
        .args([
            "netns",
            "exec",
            t.nodes[1].ns.name(),
            "ss",
            "-Htn",
            "state",
            "established",
        ])
        .arg("( sport = :15008 )")
        .output()
        .expect("ss");
    let held = String::from_utf8_lossy(&ss.stdout).lines().count();
    println!("  node 2: {held} established connections on :15008 afterwards");
    assert!(held <= 4, "node 2 still holds {held} connections on :15008");
    assert!(
        last < Duration::from_secs(10),
        "each within the timeout and a margin: {last:?}"
    );
    assert!(
        ok && out.contains("echo=ok"),
        "served while they were held: {out}"
    );
    check_legitimate(&t, legit);
    let timeouts = t.wait_metric(
        1,
        "nodemesh_tls_handshakes_total",
        &[("direction", "inbound"), ("result", "timeout")],
        MANY as u64 + 1,
    );
    println!("node 2: tls_handshakes_total{{result=\"timeout\"}} {timeouts}");
    assert!(timeouts > MANY as u64, "each is counted as a timeout");
    t.daemon(1)
        .wait_for("--handshake-timeout", Duration::from_secs(1));
}

#[test]
fn ca_refuses_forged_replayed_and_oversized_requests_and_floods() {
    require_root("ca_refuses");
    let t = topology("atca", DaemonOpts::default());
    let legit = legitimate(&t, 4);
    let ca_dir = t.ca_dir();
    let token = |i: usize| {
        std::fs::read_to_string(t.token_file(i))
            .expect("token file")
            .trim()
            .to_string()
    };
    let (tok1, tok2) = (token(0), token(1));
    // The node token file as editors leave it: a trailing space, a tab and blank lines.
    let padded = t.ca_dir().with_file_name("padded.token");
    std::fs::write(&padded, format!("{tok1}  \t\n\n")).expect("padded token");
    let cfg = manager_config(&t, t.token_file(0));
    let padded_cfg = manager_config(&t, padded);
    let results = t.nodes[0]
        .ns
        .run(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                let ca = addr(CA);
                let mut out: Vec<(String, String)> = Vec::new();
                let body = |pem: &str| serde_json::json!({ "csr": pem }).to_string().into_bytes();
                let status = |r: &str| r.lines().next().unwrap_or("no answer").to_string();
                let answer = |r: &str| {
                    let body = r.split("\r\n\r\n").nth(1).unwrap_or("");
                    format!("{} {}", status(r), body.chars().take(220).collect::<String>())
                };

                // Node 1 asks for node 2's identity (a Manager, as a daemon asks).
                let mgr = Manager::new(cfg, Arc::new(Metrics::new())).expect("manager");
                mgr.start();
                mgr.set_wanted([id("client-sa"), id("server-sa")]);
                mgr.wait_for(&id("client-sa"), Duration::from_secs(10))
                    .await
                    .expect("node 1 gets client-sa");
                tokio::time::sleep(Duration::from_secs(2)).await;
                out.push((
                    "SVID for another node's identity".into(),
                    if mgr.svid(&id("server-sa")).is_some() {
                        "ISSUED".into()
                    } else {
                        "refused".into()
                    },
                ));

                // A CSR of node 1's, replayed: under node 2's token it names an identity node 2
                // does not run; under node 1's it is signed — for the CSR's key, which the
                // replayer lacks, so the certificate is useless to it.
                let (pem, _owner_key) = csr(&id("client-sa").to_string());
                let r = ca_request(&ca_dir, ca, &tok2, body(&pem)).await;
                out.push(("replayed CSR under another node's token".into(), answer(&r)));
                let r = ca_request(&ca_dir, ca, &tok1, body(&pem)).await;
                out.push((
                    "replayed CSR under its node's token".into(),
                    replayed_certificate_is_useless(&r).await,
                ));

                let (foreign, _) = csr("spiffe://evil.example/ns/demo/sa/client-sa");
                let r = ca_request(&ca_dir, ca, &tok1, body(&foreign)).await;
                out.push(("CSR for another trust domain".into(), answer(&r)));
                // Tampered: one bit of the signature flipped.
                let r = ca_request(&ca_dir, ca, &tok1, body(&tamper(&pem))).await;
                out.push(("tampered CSR".into(), answer(&r)));
                // Asking for more than a workload certificate.
                let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
                let mut p = rcgen::CertificateParams::default();
                p.subject_alt_names = vec![
                    rcgen::SanType::URI(id("client-sa").to_string().as_str().try_into().expect("uri")),
                    rcgen::SanType::DnsName("kubernetes.default.svc".try_into().expect("dns")),
                ];
                let extra = p.serialize_request(&key).expect("csr").pem().expect("pem");
                let r = ca_request(&ca_dir, ca, &tok1, body(&extra)).await;
                out.push(("CSR asking for extra SANs".into(), answer(&r)));
                let mut p = rcgen::CertificateParams::default();
                p.subject_alt_names = vec![rcgen::SanType::URI(
                    id("client-sa").to_string().as_str().try_into().expect("uri"),
                )];
                p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
                let ca_csr = p.serialize_request(&key).expect("csr").pem().expect("pem");
                let r = ca_request(&ca_dir, ca, &tok1, body(&ca_csr)).await;
                out.push(("CSR asking for a CA certificate".into(), answer(&r)));
                // Bodies.
                let r = ca_request(&ca_dir, ca, &tok1, vec![b'x'; 1 << 20]).await;
                out.push(("oversized body (1 MiB)".into(), answer(&r)));
                for (what, b) in [
                    ("malformed body: not JSON", b"csr=please".to_vec()),
                    ("malformed body: csr not a string", br#"{"csr": 5}"#.to_vec()),
                    (
                        "malformed body: csr not a CSR",
                        body("-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n"),
                    ),
                    ("malformed body: empty", Vec::new()),
                ] {
                    let r = ca_request(&ca_dir, ca, &tok1, b).await;
                    out.push((what.into(), answer(&r)));
                }
                let r = ca_request(&ca_dir, ca, "", body(&pem)).await;
                out.push(("no token".into(), answer(&r)));
                let r = ca_request(&ca_dir, ca, &format!("{tok1}x"), body(&pem)).await;
                out.push(("a token one byte off".into(), answer(&r)));

                // The node's token file with trailing whitespace still works.
                let padded = Manager::new(padded_cfg, Arc::new(Metrics::new())).expect("manager");
                padded.start();
                padded.set_wanted([id("other-sa")]);
                let got = padded.wait_for(&id("other-sa"), Duration::from_secs(10)).await;
                out.push((
                    "node token file with trailing whitespace".into(),
                    match got {
                        Some(_) => "accepted: the SVID was issued".into(),
                        None => "FAILED: no SVID within 10 s".into(),
                    },
                ));

                // A flood from this node: past the per-client burst, 429s.
                let (answered, limited, first) = ca_flood(&ca_dir, ca, 1500).await;
                out.push((
                    "CA flood (1500 requests)".into(),
                    format!("refused: {limited} of {answered} answered 429; the first: {first}"),
                ));
                out
            })
        })
        .join()
        .expect("attacker thread");
    report(&results);
    let expect = |what: &str, needles: &[&str]| {
        let (_, r) = results
            .iter()
            .find(|(w, _)| w == what)
            .unwrap_or_else(|| panic!("no case {what}"));
        for n in needles {
            assert!(r.contains(n), "{what}: want {n:?} in {r}");
        }
    };
    expect(
        "replayed CSR under another node's token",
        &["403", "scheduled on the requesting node"],
    );
    expect("replayed CSR under its node's token", &["refused"]);
    expect("tampered CSR", &["400", "signature"]);
    expect(
        "CSR for another trust domain",
        &["403", "outside this CA's trust domain"],
    );
    expect(
        "CSR asking for extra SANs",
        &["400", "DNS kubernetes.default.svc"],
    );
    expect("CSR asking for a CA certificate", &["400", "CA:true"]);
    expect("oversized body (1 MiB)", &["413", "at most 16384 bytes"]);
    expect("malformed body: not JSON", &["400", "must be {\\\"csr\\\""]);
    expect("malformed body: csr not a string", &["400"]);
    expect(
        "malformed body: csr not a CSR",
        &["400", "CSR cannot be parsed"],
    );
    expect("malformed body: empty", &["400"]);
    expect("no token", &["401"]);
    expect("a token one byte off", &["401"]);
    expect("node token file with trailing whitespace", &["accepted"]);
    let (_, flood) = results
        .iter()
        .find(|(w, _)| w.starts_with("CA flood"))
        .expect("flood");
    assert!(
        !flood.starts_with("refused: 0 ")
            && flood.contains("retry-after: ")
            && flood.contains("signing requests per second from 10.203.0.1"),
        "past the burst the CA answers 429 with Retry-After and why: {flood}"
    );
    let ca = t.scrape_ca();
    for l in ca
        .lines()
        .filter(|l| l.starts_with("nodemesh_ca_requests_total"))
    {
        println!("CA: {l}");
    }
    for (result, at_least) in [
        ("not_on_node", 2),
        ("bad_csr", 6),
        ("too_large", 1),
        ("unauthenticated", 2),
        ("rate_limited", 1),
    ] {
        assert!(
            sample(&ca, "nodemesh_ca_requests_total", &[("result", result)]) >= at_least,
            "the CA counts {result}:\n{ca}"
        );
    }
    check_legitimate(&t, legit);
}

/// Flips the last bit of a PEM CSR's DER (inside its signature).
fn tamper(pem: &str) -> String {
    use base64::Engine as _;
    let b64: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
    let mut der = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .expect("base64");
    *der.last_mut().expect("bytes") ^= 1;
    let body = base64::engine::general_purpose::STANDARD.encode(der);
    let lines: Vec<&str> = body
        .as_bytes()
        .chunks(64)
        .map(|c| std::str::from_utf8(c).expect("ascii"))
        .collect();
    format!(
        "-----BEGIN CERTIFICATE REQUEST-----\n{}\n-----END CERTIFICATE REQUEST-----\n",
        lines.join("\n")
    )
}

/// The certificate a replayed CSR earned, used with the replayer's own key at node 2's HBONE
/// port: the handshake cannot prove the certificate's key.
async fn replayed_certificate_is_useless(answer: &str) -> String {
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject as _};
    let Some(json) = answer.split("\r\n\r\n").nth(1) else {
        return format!("refused: {}", answer.lines().next().unwrap_or("no answer"));
    };
    let Ok(issued) = serde_json::from_str::<mesh_daemon::identity::caclient::Issued>(json) else {
        return format!("refused: {}", answer.lines().next().unwrap_or("no answer"));
    };
    let chain: Vec<CertificateDer<'static>> = issued
        .chain
        .iter()
        .filter_map(|p| CertificateDer::from_pem_slice(p.as_bytes()).ok())
        .collect();
    let mine = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
    let key = PrivateKeyDer::Pkcs8(mine.serialize_der().into());
    let p = nodemesh_tests::hostile::provider();
    // rustls itself refuses a certificate with a key that is not its own; past that check, the
    // server would refuse the handshake signature.
    match rustls::ClientConfig::builder_with_provider(p)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("TLS 1.3")
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_client_auth_cert(chain.clone(), key.clone_key())
    {
        Err(e) => format!("signed for the CSR's key; refused with another key: {e}"),
        Ok(_) => {
            let r = tls_attempt(
                addr(NODE2_HBONE),
                attacker(Some((chain, key)), &[&rustls::version::TLS13]),
                &id("server-sa").server_name(),
            )
            .await;
            format!("signed for the CSR's key; with another key: {r}")
        }
    }
}

#[test]
fn a_process_moved_between_pod_cgroups_takes_the_new_identity_and_pods_cannot_use_proxy_ports() {
    require_root("a_process_moved_between_pod_cgroups");
    let mut t = topology("atcg", DaemonOpts::default());
    t.serve("server", "echo-server", 7001);
    let server = t.pod("server").ip.clone();
    let client = t.pod("client");
    let (client_ip, client_cg, client_ns) = (
        client.ip.clone(),
        client.cgroup.clone(),
        client.ns.name().to_string(),
    );
    let other_cgroup = t.pod("other").cgroup.clone();
    // A shell in the client pod (its cgroup and network namespace) connects, waits to be moved,
    // then connects again.
    let fifo = t.ca_dir().with_file_name("move.fifo");
    let c = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).expect("path");
    // SAFETY: a valid C string; mkfifo only creates a node.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0, "mkfifo");
    let script = format!(
        "echo pid=$$; \"$0\" connect {server}:7000 --send 1000; read go < {fifo}; \
         \"$0\" connect {server}:7001 --send 1000; echo done",
        fifo = fifo.display()
    );
    let mut cmd = Command::new(bin("mesh-app"));
    cmd.arg("--cgroup")
        .arg(&client_cg)
        .args(["--netns", &client_ns, "exec", "sh", "-c", &script])
        .arg(bin("mesh-app"));
    let mut shell = Proc::spawn("shell in the client pod", cmd);
    let pid: u32 = shell
        .wait_for("pid=", Duration::from_secs(10))
        .trim()
        .trim_start_matches("pid=")
        .parse()
        .expect("the shell's pid");
    shell.wait_for("echo=", Duration::from_secs(10));
    // As root in the node: move the shell into the other pod's cgroup (a pod's own processes
    // cannot; they are not root in the node).
    std::fs::write(other_cgroup.join("cgroup.procs"), pid.to_string()).expect("move the shell");
    std::fs::write(&fifo, "go\n").expect("release the shell");
    shell.wait_for("done", Duration::from_secs(10));
    let echoes: Vec<String> = shell
        .lines()
        .into_iter()
        .filter(|l| l.contains("echo="))
        .collect();
    let [first, second] = echoes.as_slice() else {
        panic!("two connections, one before and one after the move: {echoes:?}");
    };
    let d = t.daemon(0);
    let before = d.wait_for(&format!("dst={server}:7000"), Duration::from_secs(5));
    let after = d.wait_for(&format!("dst={server}:7001"), Duration::from_secs(5));
    println!(
        "attack {:<44} → before: {first}; after: {second}\n  node 1: {before}\n  node 1: {after}",
        "process moved to another pod's cgroup"
    );
    assert!(first.contains("echo=ok") && second.contains("echo=ok"));
    assert!(
        before.contains("workload=demo/client") && after.contains("workload=demo/other"),
        "identity follows the cgroup at connect time, not the address ({}):\n{before}\n{after}",
        client_ip
    );

    // A meshed pod's connections straight to the node proxy's ports are not proxied anywhere: a
    // connection to an outbound listener has no capture record (reset, counted); one to an HBONE
    // port has no SVID (the handshake is refused, counted).
    for (what, target, node, metric, labels) in [
        (
            "pod straight to the outbound listener",
            "10.203.0.1:15001",
            0,
            "nodemesh_tcp_connections_failed_total",
            &[("reason", "no_record")][..],
        ),
        (
            "pod straight to another node's outbound port",
            "10.203.0.2:15001",
            1,
            "nodemesh_tcp_connections_failed_total",
            &[("reason", "no_record")][..],
        ),
        (
            "pod straight to one of the outbound listener's further ports",
            "10.203.0.1:15100",
            0,
            "nodemesh_tcp_connections_failed_total",
            &[("reason", "no_record")][..],
        ),
        (
            "pod straight to its node's HBONE port",
            "10.203.0.1:15008",
            0,
            "nodemesh_tls_handshakes_total",
            &[("direction", "inbound"), ("result", "garbage")][..],
        ),
    ] {
        let before = t.metric(node, metric, labels);
        let (_, out) = t.connect(
            "client",
            target,
            &["--send", "10", "--connect-timeout-ms", "2000"],
        );
        let after = t.wait_metric(node, metric, labels, before + 1);
        println!(
            "attack {what:<44} → {out}; node {}: {metric}{labels:?} {before} → {after}",
            node + 1
        );
        assert!(
            !out.contains("echo=ok"),
            "{what} ({target}) must not be proxied: {out}"
        );
        assert!(after > before, "{what} is counted");
    }
    let (ok, out) = t.connect("client", VIP, &["--send", "65536"]);
    assert!(ok && out.contains("echo=ok"), "still served after: {out}");
}

#[test]
fn hostile_control_files_are_refused_and_the_last_good_state_kept() {
    require_root("hostile_control_files");
    let mut t = topology("atf", DaemonOpts::default());
    let mesh = t.mesh_file_path().to_path_buf();
    let good = std::fs::read_to_string(&mesh).expect("mesh file");
    let errors =
        |t: &Topology| t.metric(0, "nodemesh_config_reloads_total", &[("result", "error")]);
    let served = |t: &Topology| {
        let (ok, out) = t.connect("client", VIP, &["--send", "4096"]);
        assert!(
            ok && out.contains("echo=ok"),
            "the last good state serves: {out}"
        );
    };
    let refused = |t: &mut Topology, what: &str, needle: &str, before: u64| {
        let line = t.daemon(0).wait_for(needle, Duration::from_secs(5));
        let now = t.wait_metric(
            0,
            "nodemesh_config_reloads_total",
            &[("result", "error")],
            before + 1,
        );
        println!("attack {what:<44} → {line}");
        assert!(
            now > before,
            "{what} is counted as config_reloads_total{{result=\"error\"}}"
        );
        served(t);
    };
    let tmp = mesh.with_extension("incoming");

    // 100 MB: refused by its size, before it is read.
    let before = errors(&t);
    std::fs::write(&tmp, &good).expect("write");
    std::fs::OpenOptions::new()
        .write(true)
        .open(&tmp)
        .and_then(|f| f.set_len(100 << 20))
        .expect("100 MiB");
    std::fs::rename(&tmp, &mesh).expect("rename");
    refused(
        &mut t,
        "mesh file of 100 MB",
        "over the 16 MiB limit",
        before,
    );

    // Not UTF-8.
    let before = errors(&t);
    std::fs::write(&tmp, b"nodes: [\xff\xfe]\n").expect("write");
    std::fs::rename(&tmp, &mesh).expect("rename");
    refused(
        &mut t,
        "mesh file that is not UTF-8",
        "not UTF-8 text",
        before,
    );

    // A directory where the file was.
    let before = errors(&t);
    std::fs::remove_file(&mesh).expect("remove");
    std::fs::create_dir(&mesh).expect("a directory in its place");
    refused(
        &mut t,
        "mesh file replaced by a directory",
        "not a regular file",
        before,
    );
    std::fs::remove_dir(&mesh).expect("remove the directory");

    // A ConfigMap mount: mesh.yaml → ..data/mesh.yaml, ..data → a timestamped folder, updated by
    // swapping ..data. Each swap is read (symlinks followed).
    let root = mesh.parent().expect("dir").to_path_buf();
    let loaded = t
        .daemon(0)
        .lines()
        .iter()
        .filter(|l| l.contains("mesh file loaded"))
        .count();
    let version = |n: u32, text: &str| {
        let dir = root.join(format!("..2026_12_03_v{n}"));
        std::fs::create_dir_all(&dir).expect("version dir");
        std::fs::write(dir.join(mesh.file_name().expect("name")), text).expect("write");
        let link = root.join("..data_tmp");
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(dir.file_name().expect("name"), &link).expect("symlink");
        std::fs::rename(&link, root.join("..data")).expect("swap ..data");
    };
    version(1, &good);
    std::os::unix::fs::symlink(
        std::path::Path::new("..data").join(mesh.file_name().expect("name")),
        &mesh,
    )
    .expect("mesh file as a symlink");
    t.daemon(0)
        .wait_for_count("mesh file loaded", loaded + 1, Duration::from_secs(5));
    version(2, &format!("{good}{DENY_OTHER}"));
    t.daemon(0)
        .wait_for_count("mesh file loaded", loaded + 2, Duration::from_secs(5));
    let (ok, out) = t.connect("other", VIP, &["--send", "100"]);
    println!(
        "attack {:<44} → followed: both versions loaded; the second's DENY applies: {out}",
        "mesh file as a ConfigMap symlink, swapped"
    );
    assert!(!ok, "the swapped-in policy is in force: {out}");
    served(&t);

    // The CA's key files: as a non-root user that cannot read them, and readable by others.
    let copy = root.join("ca-copy");
    let status = Command::new("cp")
        .arg("-a")
        .arg(t.ca_dir())
        .arg(&copy)
        .status()
        .expect("cp");
    assert!(status.success());
    let ca = |dir: &std::path::Path, as_nobody: bool| {
        let mut c = if as_nobody {
            let mut c = Command::new("setpriv");
            c.args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
                .arg(bin("mesh-daemon"));
            c
        } else {
            Command::new(bin("mesh-daemon"))
        };
        c.args(["ca", "serve", "--dir"])
            .arg(dir)
            .args(["--listen", "127.0.0.1:0", "--metrics", "127.0.0.1:0"])
            .arg("--tokens")
            .arg(root.join("tokens.yaml"))
            .arg("--mesh-file")
            .arg(root.join("..data").join(mesh.file_name().expect("name")));
        let mut p = Proc::spawn("mesh-daemon ca (hostile files)", c);
        let status = p.wait_exit(Duration::from_secs(10));
        (status, p.output())
    };
    // Let nobody reach the folder, not the key.
    std::fs::set_permissions(&root, std::os::unix::fs::PermissionsExt::from_mode(0o755))
        .expect("chmod");
    std::fs::set_permissions(&copy, std::os::unix::fs::PermissionsExt::from_mode(0o755))
        .expect("chmod");
    let (status, out) = ca(&copy, true);
    let line = out
        .lines()
        .find(|l| l.contains("signer.key") || l.contains("ermission"))
        .unwrap_or(&out)
        .to_string();
    println!(
        "attack {:<44} → {status:?}: {line}",
        "CA key file it cannot read"
    );
    assert!(
        status.is_some_and(|s| !s.success())
            && out.contains("Permission denied")
            && !out.contains("panicked"),
        "the CA stops with the unreadable file named: {out}"
    );
    std::fs::set_permissions(
        copy.join("signer.key"),
        std::os::unix::fs::PermissionsExt::from_mode(0o644),
    )
    .expect("chmod");
    let (status, out) = ca(&copy, false);
    let line = out
        .lines()
        .find(|l| l.contains("readable by others"))
        .unwrap_or(&out)
        .to_string();
    println!(
        "attack {:<44} → {status:?}: {line}",
        "CA key file readable by others"
    );
    assert!(
        status.is_some_and(|s| !s.success()) && out.contains("chmod 600"),
        "the CA refuses a world-readable key: {out}"
    );
}

/// A low soft open-file limit (1024, the common default) is raised to the hard one at start and
/// said; then 1100 idle, unauthenticated peers held on node 2's HBONE port do not starve anyone
/// (under 1024 they took every descriptor: cross-node traffic, file reloads and CA refresh broke).
#[test]
fn a_low_open_file_limit_is_raised_and_idle_peers_do_not_starve_the_node() {
    require_root("a_low_open_file_limit_is_raised");
    const IDLE: usize = 1100;
    let mut t = topology(
        "atfd",
        DaemonOpts {
            nofile: Some("1024:8192"),
            // The idle peers stay for the whole test (a handshake timeout would close them).
            handshake_timeout: Some("60s"),
            ..DaemonOpts::default()
        },
    );
    let said = t
        .daemon(1)
        .wait_for("raised the open-file limit", Duration::from_secs(5));
    assert!(
        said.contains("from=1024") && said.contains("to=8192"),
        "{said}"
    );
    let max_fds = nodemesh_tests::topology::sample(&t.scrape(1), "process_max_fds", &[]);
    assert_eq!(max_fds, 8192, "node 2's daemon runs with the hard limit");
    println!("node 2's daemon: {}", said.trim());
    // The idle peers, held from node 1's namespace while the mesh is used through node 2.
    let (hold, release) = std::sync::mpsc::channel::<()>();
    let (opened_tx, opened) = std::sync::mpsc::channel::<usize>();
    let holder = t.nodes[0].ns.run(move || {
        let mut held = Vec::new();
        for _ in 0..IDLE {
            match std::net::TcpStream::connect(NODE2_HBONE) {
                Ok(s) => held.push(s),
                Err(e) => {
                    println!("  idle peer {}: {e}", held.len());
                    break;
                }
            }
        }
        let _ = opened_tx.send(held.len());
        let _ = release.recv_timeout(Duration::from_secs(60));
        drop(held);
    });
    let n = opened
        .recv_timeout(Duration::from_secs(30))
        .expect("the idle peers opened");
    assert_eq!(n, IDLE, "every idle peer connected");
    let fds = within_fds(&t, IDLE as u64);
    let (ok, out) = t.connect("client", VIP, &["--send", "4096"]);
    let _ = hold.send(());
    holder.join().expect("holder");
    println!(
        "attack {:<44} → node 2 holds {fds} descriptors; a new cross-node connection: {out}",
        format!("{IDLE} idle peers on :15008")
    );
    assert!(
        ok && out.contains("echo=ok"),
        "served while they were held: {out}"
    );
}

/// Waits (up to 10 s) until node 2's daemon holds at least `n` descriptors; returns how many.
fn within_fds(t: &Topology, n: u64) -> u64 {
    let start = Instant::now();
    loop {
        let fds = nodemesh_tests::topology::sample(&t.scrape(1), "process_open_fds", &[]);
        if fds >= n || start.elapsed() > Duration::from_secs(10) {
            assert!(
                fds >= n,
                "node 2's daemon holds {fds} descriptors, not the {n} idle peers'"
            );
            return fds;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}
