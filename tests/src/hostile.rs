//! The attacker's tools, shared by the attack suite (`tests/attacks.rs`): TLS clients that present
//! whatever certificate the attack needs (or none) and trust any server, certificates signed by a
//! rogue root or by the mesh's own signer with the wrong validity or name, raw bytes at a port,
//! and raw HTTPS requests to the CA.

use std::{net::SocketAddr, path::Path, sync::Arc, time::Duration};

use rustls::{
    ClientConfig, DigitallySignedStruct, SignatureScheme,
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    crypto::CryptoProvider,
    pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime, pem::PemObject as _},
};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// A certificate chain and its key, as a client presents them.
pub type Chain = (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>);

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

pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// A client config presenting `cert` (or nothing), speaking only `versions`, offering h2.
pub fn attacker(
    cert: Option<Chain>,
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
pub fn leaf(
    spiffe_id: &str,
    not_before: time::OffsetDateTime,
    not_after: time::OffsetDateTime,
    issuer: &rcgen::Issuer<'_, rcgen::KeyPair>,
    issuer_der: CertificateDer<'static>,
) -> Chain {
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

/// A self-signed root nobody trusts, as an issuer.
pub fn rogue_root() -> (
    rcgen::Issuer<'static, rcgen::KeyPair>,
    CertificateDer<'static>,
) {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
    let mut p = rcgen::CertificateParams::default();
    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    p.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    let root = p.self_signed(&key).expect("rogue root");
    (rcgen::Issuer::new(p, key), root.der().clone())
}

/// The mesh's own signer, read from the CA's folder (what an attacker who stole it would hold;
/// here it makes certificates that chain correctly but are wrong in one other way).
pub fn read_issuer(
    ca_dir: &Path,
) -> (
    rcgen::Issuer<'static, rcgen::KeyPair>,
    CertificateDer<'static>,
) {
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

/// One TLS attempt at an HBONE port; returns what the attacker saw. TLS 1.3 clients finish before
/// the server has judged their certificate, so the verdict arrives as an alert on the first read.
pub async fn tls_attempt(addr: SocketAddr, cfg: Arc<ClientConfig>, sni: &str) -> String {
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .expect("TCP to the HBONE port");
    let name = ServerName::try_from(sni.to_string()).expect("server name");
    match tokio_rustls::TlsConnector::from(cfg)
        .connect(name, tcp)
        .await
    {
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

/// Raw bytes at a port; returns how the connection ended.
pub async fn raw_attempt(addr: SocketAddr, bytes: &[u8]) -> String {
    let mut s = tokio::net::TcpStream::connect(addr)
        .await
        .expect("TCP to the port");
    let _ = s.write_all(bytes).await;
    let mut buf = Vec::new();
    match tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf)).await {
        Ok(Ok(_)) => format!("closed after {} bytes", buf.len()),
        Ok(Err(e)) => format!("closed: {e}"),
        Err(_) => "no answer".into(),
    }
}

/// A TLS connection to the CA at `addr`, verified against its bundle (as a node connects).
pub async fn ca_tls(
    ca_dir: &Path,
    addr: SocketAddr,
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca_dir.join("bundle.pem")).expect("bundle.pem") {
        roots.add(c.expect("certificate")).expect("root");
    }
    let cfg = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("TLS 1.3")
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .expect("TCP to the CA");
    tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(ServerName::from(addr.ip()), tcp)
        .await
        .expect("TLS to the CA")
}

/// One signing request to the CA (`POST /v1/svid` with `token` and `body`) over a connection of
/// its own; returns the whole answer as text. The body is sent while the answer is read: a CA that
/// refuses a body early answers before it has all of it.
pub async fn ca_request(ca_dir: &Path, addr: SocketAddr, token: &str, body: Vec<u8>) -> String {
    let head = format!(
        "POST /v1/svid HTTP/1.1\r\nhost: ca\r\nauthorization: Bearer {token}\r\n\
         content-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    let (mut rd, mut wr) = tokio::io::split(ca_tls(ca_dir, addr).await);
    let writer = tokio::spawn(async move {
        let _ = wr.write_all(head.as_bytes()).await;
        let _ = wr.write_all(&body).await;
        let _ = wr.flush().await;
        wr
    });
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), rd.read_to_end(&mut buf)).await;
    writer.abort();
    String::from_utf8_lossy(&buf).into_owned()
}

/// A CSR for `spiffe_id` (PEM) and its key.
pub fn csr(spiffe_id: &str) -> (String, rcgen::KeyPair) {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
    let mut p = rcgen::CertificateParams::default();
    p.subject_alt_names = vec![rcgen::SanType::URI(spiffe_id.try_into().expect("ascii"))];
    let pem = p.serialize_request(&key).expect("csr").pem().expect("pem");
    (pem, key)
}

/// Floods the CA with `n` pipelined signing requests (a token that is no node's) over one TLS
/// connection; returns how many were answered, how many of those were 429, and the first 429 as
/// it came (status line, Retry-After, reason).
pub async fn ca_flood(ca_dir: &Path, addr: SocketAddr, n: usize) -> (usize, usize, String) {
    let tls = ca_tls(ca_dir, addr).await;
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
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while count(&seen, b"HTTP/1.1 ") < n && std::time::Instant::now() < deadline {
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
