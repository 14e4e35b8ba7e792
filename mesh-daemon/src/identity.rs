//! Workload identity: SPIFFE IDs, the certificates (SVIDs) that carry them, the CA that issues
//! them ([`ca`]), the node's certificate manager ([`manager`]) and the TLS configurations HBONE
//! uses ([`tls`]).
//!
//! An identity is per workload (namespace + service account), never per node: the node proxy
//! holds one SVID for each identity with a pod on its node and presents the one the kernel
//! attributed a connection to.

pub mod ca;
pub mod caclient;
pub mod cakube;
pub mod manager;
pub mod tls;

use std::{fmt, sync::Arc};

use rustls::crypto::CryptoProvider;

/// Why the CA refused a signing request: the HTTP status, the `ca_requests_total` result label,
/// and a reason for the node's log (the CA's checks and its Kubernetes placement share it).
#[derive(Debug, thiserror::Error)]
#[error("{reason}")]
pub struct Refusal {
    pub status: hyper::StatusCode,
    pub label: &'static str,
    pub reason: String,
}

/// The trust domain when none is configured (Kubernetes' default cluster domain, as Istio uses).
pub const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";

/// The rustls crypto provider for every TLS connection the mesh makes. Chosen by measurement
/// (`cargo xtask bench tls`, numbers in ARCHITECTURE.md); one place to change it.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

// === trust and certificates, as TLS asks for them ===

/// The roots in force, in the forms the verifiers need.
pub struct Bundle {
    pub pems: Vec<String>,
    pub roots: Arc<rustls::RootCertStore>,
    /// Fingerprint of the CA's current signer: an SVID from another signer is re-issued.
    pub signer: String,
    pub(crate) client_verifier: Arc<dyn rustls::server::danger::ClientCertVerifier>,
}

impl std::fmt::Debug for Bundle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bundle")
            .field("roots", &self.pems.len())
            .field("signer", &self.signer)
            .finish()
    }
}

impl Bundle {
    pub fn new(pems: Vec<String>, signer: String) -> Result<Self, String> {
        use rustls::pki_types::{CertificateDer, pem::PemObject as _};
        let mut roots = rustls::RootCertStore::empty();
        for pem in &pems {
            for cert in CertificateDer::pem_slice_iter(pem.as_bytes()) {
                let cert = cert.map_err(|e| format!("a bundle root is not PEM: {e}"))?;
                roots
                    .add(cert)
                    .map_err(|e| format!("a bundle root is not a usable trust anchor: {e}"))?;
            }
        }
        if roots.is_empty() {
            return Err("the trust bundle holds no root".into());
        }
        let roots = Arc::new(roots);
        let client_verifier =
            rustls::server::WebPkiClientVerifier::builder_with_provider(roots.clone(), provider())
                .build()
                .map_err(|e| format!("cannot build the client verifier: {e}"))?;
        Ok(Self {
            pems,
            roots,
            signer,
            client_verifier,
        })
    }
}

/// Where TLS gets certificates and trust from: the narrow view of the certificate manager that
/// [`tls`] needs, so the TLS code never imports the manager (ztunnel's `tls` crate asks a
/// provider trait the same way).
pub trait CertSource: Send + Sync + std::fmt::Debug + 'static {
    /// The trust domain every peer's SPIFFE ID must be in.
    fn trust_domain(&self) -> &str;
    /// The roots in force now.
    fn bundle(&self) -> Arc<Bundle>;
    /// The current SVID of an identity this node holds.
    fn key_for(&self, id: &Identity) -> Option<Arc<rustls::sign::CertifiedKey>>;
    /// The SVID whose identity a TLS server name stands for ([`Identity::server_name`]).
    fn key_by_server_name(&self, name: &str) -> Option<Arc<rustls::sign::CertifiedKey>>;
    /// This node's own certificate ([`Role::Node`]), for the operator listener.
    fn node_key(&self) -> Option<Arc<rustls::sign::CertifiedKey>>;
}

// === SPIFFE IDs ===

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IdentityError {
    #[error("{0:?} is not a SPIFFE ID of the form spiffe://<trust-domain>/ns/<namespace>/sa/<sa>")]
    Malformed(String),
    #[error("the certificate cannot be parsed: {0}")]
    BadCertificate(String),
    #[error("the certificate names no SPIFFE ID (no spiffe:// URI SAN)")]
    NoSpiffeId,
    #[error("the certificate names {0} SPIFFE IDs; an SVID names exactly one")]
    SeveralSpiffeIds(usize),
}

/// `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Identity {
    pub trust_domain: String,
    pub namespace: String,
    pub service_account: String,
}

impl Identity {
    pub fn new(trust_domain: &str, namespace: &str, service_account: &str) -> Self {
        Self {
            trust_domain: trust_domain.into(),
            namespace: namespace.into(),
            service_account: service_account.into(),
        }
    }

    pub fn parse(uri: &str) -> Result<Self, IdentityError> {
        let bad = || IdentityError::Malformed(uri.to_string());
        let rest = uri.strip_prefix("spiffe://").ok_or_else(bad)?;
        let parts: Vec<&str> = rest.split('/').collect();
        match parts.as_slice() {
            [td, "ns", ns, "sa", sa] if [td, ns, sa].iter().all(|p| valid_segment(p)) => {
                Ok(Self::new(td, ns, sa))
            }
            _ => Err(bad()),
        }
    }

    /// The TLS server name a client asks for to reach this identity, and the name the server
    /// picks its certificate by: one HBONE listener serves every workload on its node, so the
    /// client must say whose certificate it expects (Linkerd names identities the same way).
    /// Kubernetes names are DNS labels (service accounts may hold dots), so this is a DNS name.
    pub fn server_name(&self) -> String {
        format!(
            "{}.{}.sa.{}",
            self.service_account, self.namespace, self.trust_domain
        )
    }

    /// The SPIFFE ID of a DER certificate's single `spiffe://` URI SAN.
    pub fn from_cert(der: &[u8]) -> Result<Self, IdentityError> {
        Self::parse(&spiffe_uri(der)?)
    }
}

/// The roles a certificate from this CA can name besides a workload's: a node daemon (which
/// serves the operator channel with it) and an operator (who reads nodes through that channel).
/// Neither is a workload identity, so neither can carry mesh traffic: [`Identity::parse`] refuses
/// both, and HBONE accepts only workload identities.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// `spiffe://<trust-domain>/node/<node name>`: signed only for the node asking, server use.
    Node,
    /// `spiffe://<trust-domain>/operator/<name>`: signed offline by `mesh-daemon ca
    /// issue-operator`, client use.
    Operator,
}

impl Role {
    fn segment(self) -> &'static str {
        match self {
            Role::Node => "node",
            Role::Operator => "operator",
        }
    }

    /// The SPIFFE ID of `name` in this role.
    pub fn id(self, trust_domain: &str, name: &str) -> String {
        format!("spiffe://{trust_domain}/{}/{name}", self.segment())
    }

    /// `(trust domain, name)` when `uri` is an ID of this role.
    pub fn parse(self, uri: &str) -> Option<(&str, &str)> {
        let rest = uri.strip_prefix("spiffe://")?;
        let (td, rest) = rest.split_once('/')?;
        let (role, name) = rest.split_once('/')?;
        (role == self.segment() && valid_segment(td) && valid_segment(name)).then_some((td, name))
    }

    /// Whether `name` can be named in this role (a DNS label-like name, as Kubernetes node names
    /// are).
    pub fn valid_name(name: &str) -> bool {
        valid_segment(name)
    }
}

/// The single `spiffe://` URI SAN of a DER certificate, whatever it names.
pub fn spiffe_uri(der: &[u8]) -> Result<String, IdentityError> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| IdentityError::BadCertificate(e.to_string()))?;
    let san = cert
        .subject_alternative_name()
        .map_err(|e| IdentityError::BadCertificate(e.to_string()))?;
    let uris: Vec<&str> = san
        .map(|ext| {
            ext.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    x509_parser::extensions::GeneralName::URI(u) if u.starts_with("spiffe://") => {
                        Some(*u)
                    }
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    match uris.as_slice() {
        [] => Err(IdentityError::NoSpiffeId),
        [one] => Ok((*one).to_string()),
        many => Err(IdentityError::SeveralSpiffeIds(many.len())),
    }
}

fn valid_segment(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "spiffe://{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }
}

/// Parses durations as operators write them: `90s`, `1m`, `24h`, `7d`.
pub fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !c.is_ascii_digit())
        .ok_or_else(|| format!("{s:?} has no unit; write e.g. 90s, 1m, 24h"))?;
    let (n, unit) = s.split_at(split);
    let n: u64 = n
        .parse()
        .map_err(|_| format!("{s:?} does not start with a number; write e.g. 90s, 1m, 24h"))?;
    if unit == "ms" {
        if n == 0 {
            return Err(format!("{s:?} is zero; give a positive duration"));
        }
        return Ok(std::time::Duration::from_millis(n));
    }
    let secs = match unit {
        "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        "d" => n * 86400,
        _ => {
            return Err(format!(
                "{s:?}: unknown unit {unit:?}; use ms, s, m, h or d"
            ));
        }
    };
    if secs == 0 {
        return Err(format!("{s:?} is zero; give a positive duration"));
    }
    Ok(std::time::Duration::from_secs(secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spiffe_ids_round_trip_and_bad_ones_are_refused() {
        let id = Identity::parse("spiffe://cluster.local/ns/prod/sa/web").expect("valid ID");
        assert_eq!(id, Identity::new("cluster.local", "prod", "web"));
        assert_eq!(id.to_string(), "spiffe://cluster.local/ns/prod/sa/web");
        assert_eq!(id.server_name(), "web.prod.sa.cluster.local");
        for bad in [
            "https://cluster.local/ns/prod/sa/web",
            "spiffe://cluster.local/ns/prod/sa/",
            "spiffe://cluster.local/ns/prod/web",
            "spiffe://cluster.local/ns/prod/sa/web/extra",
            "spiffe://cluster.local/ns/Prod/sa/web",
            "spiffe:///ns/prod/sa/web",
            "spiffe://cluster.local/ns/pr od/sa/web",
        ] {
            assert!(Identity::parse(bad).is_err(), "{bad} must be refused");
        }
    }

    #[test]
    fn node_and_operator_ids_are_not_workload_identities() {
        let node = Role::Node.id("cluster.local", "node-a");
        assert_eq!(node, "spiffe://cluster.local/node/node-a");
        assert_eq!(Role::Node.parse(&node), Some(("cluster.local", "node-a")));
        assert_eq!(Role::Operator.parse(&node), None);
        assert!(Identity::parse(&node).is_err());
        let op = Role::Operator.id("cluster.local", "alice");
        assert_eq!(Role::Operator.parse(&op), Some(("cluster.local", "alice")));
        assert!(Identity::parse(&op).is_err());
        for bad in [
            "spiffe://cluster.local/node/",
            "spiffe://cluster.local/node/a/b",
            "spiffe://cluster.local/node/A",
            "spiffe:///node/a",
            "https://cluster.local/node/a",
            "spiffe://cluster.local/ns/default/sa/x",
        ] {
            assert_eq!(Role::Node.parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn durations() {
        assert_eq!(
            parse_duration("90s"),
            Ok(std::time::Duration::from_secs(90))
        );
        assert_eq!(parse_duration("1m"), Ok(std::time::Duration::from_secs(60)));
        assert_eq!(
            parse_duration("24h"),
            Ok(std::time::Duration::from_secs(86400))
        );
        for bad in ["", "10", "h", "0s", "5w", "-1s"] {
            assert!(parse_duration(bad).is_err(), "{bad:?} must be refused");
        }
    }

    #[test]
    fn garbage_certificates_are_errors_not_panics() {
        assert!(matches!(
            Identity::from_cert(b"not a certificate"),
            Err(IdentityError::BadCertificate(_))
        ));
        assert!(matches!(
            Identity::from_cert(&[]),
            Err(IdentityError::BadCertificate(_))
        ));
    }
}
