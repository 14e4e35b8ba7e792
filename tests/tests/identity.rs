//! Identity and mTLS end to end: two nodes in network namespaces, a CA process on the fabric, and
//! each node's daemon holding SVIDs for its own pods.
//!
//! - Node-to-node traffic is TLS on the wire while the pods exchange plaintext (captured with
//!   tcpdump on both sides).
//! - The destination reports the source workload's SPIFFE ID.
//! - Every attack of the issue is refused and counted while legitimate traffic flows.
//! - SVIDs renew and the root rotates under a long connection.

use std::{
    path::{Path, PathBuf},
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
    netns::Netns,
    process::Proc,
    require_root,
    topology::{DaemonOpts, PodSpec, ServiceSpec, Topology},
};
use rustls::{
    ClientConfig, DigitallySignedStruct, SignatureScheme,
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    crypto::CryptoProvider,
    pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime},
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

// === the attacker's tools ===

/// A TLS client that does not care who the server is (the attacker only wants in).
#[derive(Debug)]
struct AnyServer(Arc<CryptoProvider>);

impl ServerCertVerifier for AnyServer {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }

    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// A client config presenting `chain`/`key` (or nothing), speaking only `versions`.
fn attacker(
    cert: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> Arc<ClientConfig> {
    let p = provider();
    let b = ClientConfig::builder_with_provider(p.clone())
        .with_protocol_versions(versions)
        .expect("versions")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyServer(p)));
    let mut cfg = match cert {
        Some((chain, key)) => b.with_client_auth_cert(chain, key).expect("client cert"),
        None => b.with_no_client_auth(),
    };
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Arc::new(cfg)
}

/// A leaf for `spiffe_id`, valid from `not_before` to `not_after`, signed by `issuer`.
fn leaf(
    spiffe_id: &str,
    not_before: time::OffsetDateTime,
    not_after: time::OffsetDateTime,
    issuer: &rcgen::Issuer<'_, rcgen::KeyPair>,
    issuer_der: CertificateDer<'static>,
) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
    let mut p = rcgen::CertificateParams::default();
    p.subject_alt_names = vec![rcgen::SanType::URI(spiffe_id.try_into().expect("ascii"))];
    p.extended_key_usages = vec![
        rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        rcgen::ExtendedKeyUsagePurpose::ServerAuth,
    ];
    p.not_before = not_before;
    p.not_after = not_after;
    let cert = p.signed_by(&key, issuer).expect("sign");
    (
        vec![cert.der().clone(), issuer_der],
        PrivateKeyDer::Pkcs8(key.serialize_der().into()),
    )
}

/// One TLS attempt at node 2's HBONE port; returns what the attacker saw.
async fn tls_attempt(cfg: Arc<ClientConfig>, sni: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let tcp = tokio::net::TcpStream::connect("10.203.0.2:15008")
        .await
        .expect("TCP to node 2's HBONE port");
    let name = ServerName::try_from(sni.to_string()).expect("server name");
    match tokio_rustls::TlsConnector::from(cfg)
        .connect(name, tcp)
        .await
    {
        // TLS 1.3 clients finish before the server has judged their certificate; the verdict
        // arrives as an alert on the first read.
        Ok(mut s) => {
            let _ = s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await;
            let mut buf = [0u8; 64];
            match tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await {
                Ok(Ok(0)) => "closed".into(),
                Ok(Ok(n)) => format!("read {n} bytes"),
                Ok(Err(e)) => format!("refused: {e}"),
                Err(_) => "no answer".into(),
            }
        }
        Err(e) => format!("refused: {e}"),
    }
}

/// Raw bytes at node 2's HBONE port; returns how the connection ended.
/// Floods the CA with `n` pipelined signing requests (a token that is no node's) over one TLS
/// connection from this namespace; returns how many were answered, how many of those were 429,
/// and the first 429 as it came (status line, Retry-After, reason).
async fn ca_flood(ca_dir: &Path, n: usize) -> (usize, usize, String) {
    use rustls::pki_types::pem::PemObject as _;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca_dir.join("bundle.pem")).expect("bundle.pem") {
        roots.add(c.expect("certificate")).expect("root");
    }
    let cfg = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("TLS 1.3")
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect("10.203.0.250:15012")
        .await
        .expect("TCP to the CA");
    let tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(ServerName::try_from("10.203.0.250").expect("IP name"), tcp)
        .await
        .expect("TLS to the CA");
    let (mut rd, mut wr) = tokio::io::split(tls);
    let writer = tokio::spawn(async move {
        let req: &[u8] =
            b"POST /v1/svid HTTP/1.1\r\nhost: ca\r\nauthorization: Bearer not-a-node\r\n\
                           content-length: 0\r\n\r\n";
        for _ in 0..n {
            if wr.write_all(req).await.is_err() {
                break;
            }
        }
        let _ = wr.flush().await;
        wr
    });
    let count = |s: &[u8], pat: &[u8]| s.windows(pat.len()).filter(|w| *w == pat).count();
    let (mut seen, mut buf) = (Vec::new(), vec![0u8; 1 << 16]);
    let deadline = Instant::now() + Duration::from_secs(30);
    while count(&seen, b"HTTP/1.1 ") < n && Instant::now() < deadline {
        match tokio::time::timeout(Duration::from_secs(5), rd.read(&mut buf)).await {
            Ok(Ok(k)) if k > 0 => seen.extend_from_slice(&buf[..k]),
            _ => break,
        }
    }
    let _ = writer.await;
    let text = String::from_utf8_lossy(&seen);
    let first = text
        .find("HTTP/1.1 429")
        .map(|i| text[i..].chars().take(400).collect())
        .unwrap_or_default();
    (
        count(&seen, b"HTTP/1.1 "),
        count(&seen, b"HTTP/1.1 429"),
        first,
    )
}

async fn raw_attempt(bytes: &'static [u8]) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect("10.203.0.2:15008")
        .await
        .expect("TCP to node 2's HBONE port");
    let _ = s.write_all(bytes).await;
    let mut buf = Vec::new();
    match tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf)).await {
        Ok(Ok(_)) => format!("closed after {} bytes", buf.len()),
        Ok(Err(e)) => format!("closed: {e}"),
        Err(_) => "no answer".into(),
    }
}

fn read_issuer(
    ca_dir: &Path,
) -> (
    rcgen::Issuer<'static, rcgen::KeyPair>,
    CertificateDer<'static>,
) {
    use rustls::pki_types::pem::PemObject as _;
    let pem = std::fs::read_to_string(ca_dir.join("signer.pem")).expect("signer.pem");
    let key = rcgen::KeyPair::from_pem(
        &std::fs::read_to_string(ca_dir.join("signer.key")).expect("signer.key"),
    )
    .expect("signer key");
    let der = CertificateDer::from_pem_slice(pem.as_bytes()).expect("signer PEM");
    (
        rcgen::Issuer::from_ca_cert_der(&der, key).expect("issuer"),
        der,
    )
}

#[test]
fn attacks_are_refused_and_counted_while_legitimate_traffic_flows() {
    require_root("attacks_are_refused");
    let mut t = topology("ida", DaemonOpts::default());
    // Policies: the `other` service account may not reach the echo server (on another node), and
    // only client-sa may reach the client pod (on other's own node: enforced in-process there).
    let base = std::fs::read_to_string(&t.mesh_file).expect("mesh file");
    t.rewrite_mesh_file(&format!(
        "{base}authorizationPolicies:\n  - name: deny-other\n    namespace: demo\n    \
         selector: {{ app: echo }}\n    action: DENY\n    from:\n      - principals: \
         [spiffe://cluster.local/ns/demo/sa/other-sa]\n  - name: client-only-self\n    \
         namespace: demo\n    selector: {{ app: client }}\n    action: ALLOW\n    from:\n      \
         - principals: [spiffe://cluster.local/ns/demo/sa/client-sa]\n"
    ));
    for i in 0..2 {
        t.daemon(i)
            .wait_for_count("mesh file loaded", 2, Duration::from_secs(5));
    }
    t.serve("client", "echo-server", 7100);

    // Legitimate traffic runs through every attack: ~6 s of paced 4 KiB pieces.
    let server = format!("{}:7000", t.pod("server").ip);
    let legit = {
        let client = t.pod("client");
        let (cg, ns, server) = (
            client.cgroup.clone(),
            client.ns.name().to_string(),
            server.clone(),
        );
        std::thread::spawn(move || {
            let out = nodemesh_tests::mesh_app(
                &cg,
                &ns,
                &["connect", &server, "--send", "1228800", "--pace-ms", "20"],
            );
            String::from_utf8_lossy(&out.stdout).trim().to_string()
        })
    };
    std::thread::sleep(Duration::from_millis(500));

    let ca_dir = t.ca_dir();
    let client_pod = format!("{}:7000", t.pod("client").ip);
    let cfg = ManagerConfig {
        ca_url: t.ca_url(),
        ca_bundle: ca_dir.join("bundle.pem"),
        token_file: t.token_file(0),
        trust_domain: TD.into(),
        refresh: Duration::from_secs(1),
        mark: 0,
    };
    let server_sni = id("server-sa").server_name();
    // The attacker sits on node 1 with node 1's token: it can get node 1's identities, no others.
    let results = t.nodes[0]
        .ns
        .run(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                let mut out = Vec::new();
                out.push((
                    "plaintext HTTP/2".to_string(),
                    raw_attempt(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0").await,
                ));
                out.push((
                    "garbage".to_string(),
                    raw_attempt(b"\x16\x03\x01\x00\x05garbage and more garbage").await,
                ));
                // A certificate from a root nobody trusts, naming a real identity.
                let rogue_key =
                    rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
                let mut rp = rcgen::CertificateParams::default();
                rp.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
                rp.key_usages = vec![
                    rcgen::KeyUsagePurpose::KeyCertSign,
                    rcgen::KeyUsagePurpose::DigitalSignature,
                ];
                let rogue = rp.self_signed(&rogue_key).expect("rogue root");
                let rogue_issuer = rcgen::Issuer::new(rp, rogue_key);
                let now = time::OffsetDateTime::now_utc();
                let untrusted = leaf(
                    &id("client-sa").to_string(),
                    now - time::Duration::hours(1),
                    now + time::Duration::hours(1),
                    &rogue_issuer,
                    rogue.der().clone(),
                );
                out.push((
                    "untrusted root".into(),
                    tls_attempt(
                        attacker(Some(untrusted), &[&rustls::version::TLS13]),
                        &server_sni,
                    )
                    .await,
                ));
                // A certificate from the mesh's own signer that has expired.
                let (issuer, issuer_der) = read_issuer(&ca_dir);
                let expired = leaf(
                    &id("client-sa").to_string(),
                    now - time::Duration::hours(2),
                    now - time::Duration::hours(1),
                    &issuer,
                    issuer_der,
                );
                out.push((
                    "expired certificate".into(),
                    tls_attempt(
                        attacker(Some(expired), &[&rustls::version::TLS13]),
                        &server_sni,
                    )
                    .await,
                ));
                out.push((
                    "TLS 1.2 only".into(),
                    tls_attempt(attacker(None, &[&rustls::version::TLS12]), &server_sni).await,
                ));
                out.push((
                    "no client certificate".into(),
                    tls_attempt(attacker(None, &[&rustls::version::TLS13]), &server_sni).await,
                ));

                // A valid SVID (node 1 may hold client-sa), then CONNECTs the destination must
                // refuse; and a request for node 2's identity, which the CA must refuse.
                let metrics = Arc::new(Metrics::new());
                let mgr = Manager::new(cfg, metrics.clone()).expect("manager");
                mgr.start();
                mgr.set_wanted([id("client-sa"), id("server-sa")]);
                mgr.wait_for(&id("client-sa"), Duration::from_secs(10))
                    .await
                    .expect("node 1 gets client-sa");
                let hb = hbone::Client::new(0, mgr.clone(), metrics);
                for target in [
                    "10.203.0.2:15020",
                    "10.203.0.2:15008",
                    "127.0.0.1:15000",
                    "10.210.2.254:7000",
                    &client_pod,
                ] {
                    let r = hb
                        .connect(
                            "10.203.0.2:15008".parse().expect("addr"),
                            target.parse().expect("addr"),
                            hbone::Ends {
                                source: &id("client-sa"),
                                source_workload: "demo/client",
                                destination: &id("server-sa"),
                                protocol: None,
                            },
                        )
                        .await;
                    out.push((
                        format!("CONNECT {target}"),
                        match r {
                            Ok(_) => "OPENED".into(),
                            Err(e) => format!("refused: {e}"),
                        },
                    ));
                }
                tokio::time::sleep(Duration::from_secs(2)).await;
                let stolen = mgr.svid(&id("server-sa")).is_some();
                out.push((
                    "SVID for node 2's identity".into(),
                    if stolen {
                        "ISSUED".into()
                    } else {
                        "refused".into()
                    },
                ));
                // A request flood from this node: past the CA's per-client burst, 429s.
                let (answered, limited, first) = ca_flood(&ca_dir, 1500).await;
                out.push((
                    "CA flood (1500 requests)".into(),
                    format!("refused: {limited} of {answered} answered 429; the first: {first}"),
                ));
                out
            })
        })
        .join()
        .expect("attacker thread");
    for (what, r) in &results {
        println!("attack {what:<24} → {r}");
        assert!(
            !r.contains("OPENED") && !r.contains("ISSUED") && !r.starts_with("read "),
            "{what} must be refused: {r}"
        );
        if what.starts_with("CONNECT") {
            assert!(r.contains("403"), "{what}: {r}");
        }
        if what.starts_with("CA flood") {
            assert!(
                !r.starts_with("refused: 0 ")
                    && r.contains("retry-after: ")
                    && r.contains("signing requests per second from 10.203.0.1"),
                "{what}: past the burst the CA answers 429 with Retry-After and why: {r}"
            );
        }
    }
    let ca_metrics = t.scrape_ca();
    let limited = ca_metrics
        .lines()
        .find(|l| l.starts_with("nodemesh_ca_requests_total{result=\"rate_limited\"}"))
        .unwrap_or("");
    println!("CA: {limited}");
    assert!(
        !limited.is_empty() && !limited.ends_with(" 0"),
        "the CA counts rate-limited requests:\n{ca_metrics}"
    );

    // Denied by policy: the kernel attributes `other` to other-sa, node 2 refuses it.
    let (ok, out) = t.connect("other", &server, &["--send", "100"]);
    assert!(!ok, "other-sa is denied by policy: {out}");
    println!("other → server (DENY policy): {out}");

    // Same node: node 1's proxy is also the destination's, and applies its ALLOW policy.
    let client_srv = format!("{}:7100", t.pod("client").ip);
    let (ok, out) = t.connect("other", &client_srv, &["--send", "100"]);
    assert!(
        !ok,
        "other-sa is not in the client pod's ALLOW policy: {out}"
    );
    println!("other → client on the same node (ALLOW only client-sa): {out}");
    assert!(
        t.wait_metric(
            0,
            "nodemesh_authorization_decisions_total",
            &[("result", "deny"), ("policy", "no_allow_match")],
            1
        ) >= 1,
        "node 1 counts the same-node denial"
    );

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

    let m = t.scrape(1);
    let handshakes = |result: &str| {
        nodemesh_tests::topology::sample(
            &m,
            "nodemesh_tls_handshakes_total",
            &[("direction", "inbound"), ("result", result)],
        )
    };
    for l in m.lines().filter(|l| {
        l.starts_with("nodemesh_tls_handshakes_total")
            || l.starts_with("nodemesh_authorization")
            || l.starts_with("nodemesh_tcp_connections_failed")
    }) {
        println!("node 2: {l}");
    }
    assert!(
        handshakes("garbage") >= 2,
        "plaintext and garbage are counted"
    );
    assert!(
        handshakes("untrusted") >= 1,
        "the untrusted root is counted"
    );
    assert!(
        handshakes("expired") >= 1,
        "the expired certificate is counted"
    );
    assert!(
        handshakes("incompatible") >= 1,
        "the TLS 1.2 client is counted"
    );
    assert!(
        handshakes("no_client_certificate") >= 1,
        "a missing client certificate is counted"
    );
    assert!(
        nodemesh_tests::topology::sample(
            &m,
            "nodemesh_authorization_decisions_total",
            &[("result", "deny"), ("policy", "demo/deny-other")]
        ) >= 1
    );
    assert!(
        nodemesh_tests::topology::sample(
            &m,
            "nodemesh_tcp_connections_failed_total",
            &[("reporter", "inbound"), ("reason", "not_local_pod")]
        ) >= 5
    );
    let ca = t.scrape_ca();
    assert!(
        nodemesh_tests::topology::sample(
            &ca,
            "nodemesh_ca_requests_total",
            &[("result", "not_on_node")]
        ) >= 1,
        "the CA counts the refused identity request:\n{ca}"
    );
    let line =
        t.ca.as_mut()
            .expect("CA running")
            .wait_for("scheduled on the requesting node", Duration::from_secs(2));
    println!("CA log: {line}");
    t.daemon(1)
        .wait_for("HBONE mTLS handshake refused", Duration::from_secs(1));
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
