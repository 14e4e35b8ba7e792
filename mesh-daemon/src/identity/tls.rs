//! TLS for HBONE: TLS 1.3 only, mutual, with SVIDs from a [`CertSource`] (the node's certificate
//! manager) and a trust bundle that can change at run time (root rotation).
//!
//! - The client presents the *source workload's* SVID and checks that the server's certificate
//!   chains to the bundle and names the destination identity it asked for (by server name, see
//!   [`Identity::server_name`]).
//! - The server picks the destination workload's SVID by that server name and requires a client
//!   certificate that chains to the bundle and names exactly one SPIFFE ID of our trust domain.
//!
//! Session resumption is off on both sides: every handshake checks the bundle as it is now, so a
//! retired root stops being accepted at once.

use std::sync::Arc;

use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, DistinguishedName, Error, ServerConfig,
    SignatureScheme,
    client::{
        ResolvesClientCert, Resumption,
        danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
        verify_server_cert_signed_by_trust_anchor,
    },
    crypto::CryptoProvider,
    pki_types::{CertificateDer, ServerName, UnixTime},
    server::{
        ClientHello, ParsedCertificate, ResolvesServerCert,
        danger::{ClientCertVerified, ClientCertVerifier},
    },
    sign::CertifiedKey,
};

use super::{Bundle, CertSource, Identity};

/// HBONE is HTTP/2.
pub const ALPN_H2: &[u8] = b"h2";

/// A bounded label for a failed handshake (`nodemesh_tls_handshakes_total{result}`), from the
/// error tokio-rustls returned.
pub fn failure_label(e: &std::io::Error) -> &'static str {
    let Some(tls) = e.get_ref().and_then(|i| i.downcast_ref::<Error>()) else {
        return match e.kind() {
            std::io::ErrorKind::UnexpectedEof => "eof",
            std::io::ErrorKind::TimedOut => "timeout",
            _ => "io",
        };
    };
    match tls {
        Error::InvalidCertificate(c) => match c {
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => "expired",
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                "not_yet_valid"
            }
            CertificateError::UnknownIssuer | CertificateError::BadSignature => "untrusted",
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => {
                "wrong_identity"
            }
            CertificateError::ApplicationVerificationFailure => "bad_identity",
            _ => "bad_certificate",
        },
        Error::NoCertificatesPresented => "no_client_certificate",
        Error::PeerIncompatible(_) => "incompatible",
        Error::InvalidMessage(_) | Error::InappropriateMessage { .. } => "garbage",
        Error::AlertReceived(_) => "alert_received",
        Error::General(_) => "no_certificate",
        _ => "error",
    }
}

fn app_failure() -> Error {
    Error::InvalidCertificate(CertificateError::ApplicationVerificationFailure)
}

/// What both verifiers check alike: handshake signatures, with the one provider, TLS 1.3 only.
#[derive(Debug)]
struct Signatures(Arc<CryptoProvider>);

impl Signatures {
    fn tls12() -> Result<HandshakeSignatureValid, Error> {
        // The configs offer TLS 1.3 only; a TLS 1.2 signature never reaches a verifier.
        Err(Error::PeerIncompatible(
            rustls::PeerIncompatible::SupportedVersionsExtensionRequired,
        ))
    }

    fn tls13(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// The three signature methods every verifier here shares, from its `sigs` field (TLS 1.3 only,
/// the one provider).
macro_rules! signatures_from_sigs {
    () => {
        fn verify_tls12_signature(
            &self,
            _: &[u8],
            _: &CertificateDer<'_>,
            _: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, Error> {
            Signatures::tls12()
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, Error> {
            self.sigs.tls13(message, cert, dss)
        }

        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            self.sigs.schemes()
        }
    };
}

// === impl PeerVerifier (server side: the client's certificate) ===

#[derive(Debug)]
struct PeerVerifier {
    certs: Arc<dyn CertSource>,
    sigs: Signatures,
}

impl ClientCertVerifier for PeerVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // Hints are optional (RFC 8446 §4.2.4); each node holds one SVID per identity anyway.
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        let bundle = self.certs.bundle();
        bundle
            .client_verifier
            .verify_client_cert(end_entity, intermediates, now)?;
        let id = Identity::from_cert(end_entity).map_err(|_| app_failure())?;
        if id.trust_domain != self.certs.trust_domain() {
            return Err(app_failure());
        }
        Ok(ClientCertVerified::assertion())
    }

    signatures_from_sigs!();
}

// === impl IdentityVerifier (client side: the server's certificate) ===

#[derive(Debug)]
struct IdentityVerifier {
    certs: Arc<dyn CertSource>,
    sigs: Signatures,
}

impl ServerCertVerifier for IdentityVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        let bundle = self.certs.bundle();
        let cert = ParsedCertificate::try_from(end_entity)?;
        verify_server_cert_signed_by_trust_anchor(
            &cert,
            &bundle.roots,
            intermediates,
            now,
            self.sigs.0.signature_verification_algorithms.all,
        )?;
        let id = Identity::from_cert(end_entity).map_err(|_| app_failure())?;
        // The client asked for the destination identity by name; the certificate must carry it.
        match server_name {
            ServerName::DnsName(n) if n.as_ref() == id.server_name() => {
                Ok(ServerCertVerified::assertion())
            }
            _ => Err(Error::InvalidCertificate(CertificateError::NotValidForName)),
        }
    }

    signatures_from_sigs!();
}

// === cert resolvers ===

/// Server side: the SVID of the identity the client named.
#[derive(Debug)]
struct ByServerName(Arc<dyn CertSource>);

impl ResolvesServerCert for ByServerName {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.0.key_by_server_name(hello.server_name()?)
    }
}

/// Client side: always the source workload's SVID.
#[derive(Debug)]
struct SourceSvid {
    certs: Arc<dyn CertSource>,
    source: Identity,
}

impl ResolvesClientCert for SourceSvid {
    fn resolve(&self, _: &[&[u8]], _: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        self.certs.key_for(&self.source)
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// The HBONE listener's configuration.
pub fn server_config(certs: Arc<dyn CertSource>) -> Result<Arc<ServerConfig>, Error> {
    let provider = super::provider();
    let mut cfg = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(Arc::new(PeerVerifier {
            certs: certs.clone(),
            sigs: Signatures(provider),
        }))
        .with_cert_resolver(Arc::new(ByServerName(certs)));
    cfg.alpn_protocols = vec![ALPN_H2.to_vec()];
    cfg.send_tls13_tickets = 0;
    cfg.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    Ok(Arc::new(cfg))
}

/// The configuration for HBONE connections made on behalf of `source`.
pub fn client_config(
    certs: Arc<dyn CertSource>,
    source: Identity,
) -> Result<Arc<ClientConfig>, Error> {
    let provider = super::provider();
    let mut cfg = ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(IdentityVerifier {
            certs: certs.clone(),
            sigs: Signatures(provider),
        }))
        .with_client_cert_resolver(Arc::new(SourceSvid { certs, source }));
    cfg.alpn_protocols = vec![ALPN_H2.to_vec()];
    cfg.resumption = Resumption::disabled();
    Ok(Arc::new(cfg))
}

// === the operator channel ===

/// The operator listener speaks HTTP/1.1.
pub const ALPN_HTTP1: &[u8] = b"http/1.1";

/// Server side of the operator channel: a client certificate that chains to the bundle, for
/// client use (so a node certificate, server use only, is refused here). Which identity it names
/// is checked per request ([`super::Role::Operator`] only), so a refused peer is told why.
#[derive(Debug)]
struct OperatorPeer {
    certs: Arc<dyn CertSource>,
    sigs: Signatures,
}

impl ClientCertVerifier for OperatorPeer {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        self.certs
            .bundle()
            .client_verifier
            .verify_client_cert(end_entity, intermediates, now)
    }

    signatures_from_sigs!();
}

/// The node certificate, whatever name the client asked for (it dials an address).
#[derive(Debug)]
struct NodeKey(Arc<dyn CertSource>);

impl ResolvesServerCert for NodeKey {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.0.node_key()
    }
}

/// The operator listener's configuration: TLS 1.3, the node certificate, a client certificate
/// required.
pub fn operator_server_config(certs: Arc<dyn CertSource>) -> Result<Arc<ServerConfig>, Error> {
    let provider = super::provider();
    let mut cfg = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(Arc::new(OperatorPeer {
            certs: certs.clone(),
            sigs: Signatures(provider),
        }))
        .with_cert_resolver(Arc::new(NodeKey(certs)));
    cfg.alpn_protocols = vec![ALPN_HTTP1.to_vec()];
    cfg.send_tls13_tickets = 0;
    cfg.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    Ok(Arc::new(cfg))
}

/// Client side of the operator channel (meshctl): the server must chain to the operator's
/// bundle and name a node of the trust domain ([`super::Role::Node`]); a workload's SVID or the
/// CA's serving certificate is not a node.
#[derive(Debug)]
struct NodeVerifier {
    roots: Arc<rustls::RootCertStore>,
    trust_domain: String,
    sigs: Signatures,
}

impl ServerCertVerifier for NodeVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        let cert = ParsedCertificate::try_from(end_entity)?;
        verify_server_cert_signed_by_trust_anchor(
            &cert,
            &self.roots,
            intermediates,
            now,
            self.sigs.0.signature_verification_algorithms.all,
        )?;
        let uri = super::spiffe_uri(end_entity).map_err(|_| app_failure())?;
        match super::Role::Node.parse(&uri) {
            Some((td, _)) if td == self.trust_domain => Ok(ServerCertVerified::assertion()),
            _ => Err(app_failure()),
        }
    }

    signatures_from_sigs!();
}

/// meshctl's configuration for a node's operator port: the operator's certificate (chain and
/// key) as the client's, any node of `trust_domain` under `bundle` as the server.
pub fn operator_client_config(
    bundle: &Bundle,
    trust_domain: &str,
    chain: Vec<CertificateDer<'static>>,
    key: rustls::pki_types::PrivateKeyDer<'static>,
) -> Result<Arc<ClientConfig>, Error> {
    let provider = super::provider();
    let mut cfg = ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(NodeVerifier {
            roots: bundle.roots.clone(),
            trust_domain: trust_domain.to_string(),
            sigs: Signatures(provider),
        }))
        .with_client_auth_cert(chain, key)?;
    cfg.alpn_protocols = vec![ALPN_HTTP1.to_vec()];
    cfg.resumption = Resumption::disabled();
    Ok(Arc::new(cfg))
}

/// The configuration for talking to the CA: its serving certificate must chain to the bundle.
pub fn ca_client_config(bundle: &Bundle) -> Result<Arc<ClientConfig>, Error> {
    let cfg = ClientConfig::builder_with_provider(super::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(bundle.roots.clone())
        .with_no_client_auth();
    Ok(Arc::new(cfg))
}
