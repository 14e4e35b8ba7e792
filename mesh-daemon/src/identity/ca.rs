//! The CA (`mesh-daemon ca serve`): issues SVIDs over HTTPS to node daemons, each of which may
//! only obtain identities of workloads scheduled on its own node.
//!
//! Key material lives in one folder (a Kubernetes Secret in a cluster; generated at first start
//! for the demo): `root.pem`/`root.key` (the active trust anchor), `signer.pem`/`signer.key` (the
//! intermediate that signs SVIDs) and `bundle.pem` (every root nodes must trust). Roots rotate in
//! three steps (`mesh-daemon ca rotate add-root | activate | retire`) so that every node trusts
//! the new root before anything is signed under it, and keeps trusting the old one until every
//! SVID has been re-issued.
//!
//! API (JSON over HTTPS/1.1):
//! - `POST /v1/svid` with `Authorization: Bearer <node token>` and `{"csr": "<PEM>"}`; the CSR's
//!   single URI SAN names the identity. Answers `{"chain": [leaf, signer], "bundle": [...],
//!   "signer": "<fingerprint>"}`.
//! - `GET /v1/bundle`: `{"bundle": [...], "signer": "<fingerprint>"}` (roots are public).

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{Arc, RwLock},
    time::Duration,
};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::{Request, Response, StatusCode, body::Incoming, service::service_fn};
use hyper_util::rt::TokioIo;
use prometheus::{IntCounterVec, Opts};
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls::{
    pki_types::{CertificateDer, pem::PemObject},
    server::ResolvesServerCert,
    sign::CertifiedKey,
};
use tokio::net::TcpListener;
use tracing::{info, warn};

use super::{
    Identity,
    caclient::{BundleReply, Issued, SignRequest},
};
use crate::meshfile;

/// The CA's port (Istio's istiod serves certificates on the same one).
pub const PORT: u16 = super::caclient::PORT;
/// Default SVID lifetime.
pub const DEFAULT_LIFETIME: Duration = Duration::from_secs(24 * 3600);
/// Largest request body the CA reads (a P-256 CSR is well under 1 KiB).
const MAX_BODY: usize = 16 << 10;
/// Validity of generated roots and intermediates.
const ROOT_LIFETIME: Duration = Duration::from_secs(10 * 365 * 86400);
const SIGNER_LIFETIME: Duration = Duration::from_secs(2 * 365 * 86400);
/// Certificates start this long before "now", so a node whose clock is slightly behind accepts
/// them.
const BACKDATE: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    // Not `source`: the message already carries the cause, and `{:#}` would print it twice.
    #[error("{path}: {error}")]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{path}: {message}")]
    BadFile { path: PathBuf, message: String },
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("{0}")]
    Rotate(String),
    #[error("cannot listen on {addr} for the CA: {source}; {advice}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
        advice: String,
    },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> CaError + '_ {
    move |error| CaError::Io {
        path: path.to_path_buf(),
        error,
    }
}

fn read(path: &Path) -> Result<String, CaError> {
    crate::meshfile::read_file(path).map_err(io_err(path))
}

/// Reads a private key, refusing one that others than its owner may read: a signing key anyone
/// on the host can copy is a CA anyone can be.
fn read_key(path: &Path) -> Result<String, CaError> {
    use std::os::unix::fs::PermissionsExt as _;
    let mode = std::fs::metadata(path)
        .map_err(io_err(path))?
        .permissions()
        .mode();
    if mode & 0o077 != 0 {
        return Err(CaError::BadFile {
            path: path.to_path_buf(),
            message: format!(
                "the key is readable by others (mode {:o}); the CA refuses it: `chmod 600 {}` \
                 (in Kubernetes, mount the Secret with defaultMode 0400)",
                mode & 0o777,
                path.display()
            ),
        });
    }
    read(path)
}

/// Writes a file atomically (temp + rename), private when it holds a key.
fn write(path: &Path, text: &str, secret: bool) -> Result<(), CaError> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let tmp = path.with_extension("tmp");
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    if secret {
        opts.mode(0o600);
    }
    let mut f = opts.open(&tmp).map_err(io_err(&tmp))?;
    std::io::Write::write_all(&mut f, text.as_bytes()).map_err(io_err(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io_err(path))
}

/// A short, stable name for a certificate: the first 8 bytes of its SHA-256, in hex.
pub fn fingerprint(der: &[u8]) -> String {
    let provider = super::provider();
    let hash = provider
        .cipher_suites
        .iter()
        .find_map(|s| s.tls13())
        .map(|s| s.common.hash_provider.hash(der))
        .expect("every crypto provider has a TLS 1.3 suite");
    hash.as_ref()[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn now() -> time::OffsetDateTime {
    time::OffsetDateTime::now_utc()
}

fn ca_params(
    cn: &str,
    trust_domain: &str,
    lifetime: Duration,
    path_len: Option<u8>,
) -> CertificateParams {
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, trust_domain);
    dn.push(DnType::CommonName, cn);
    p.distinguished_name = dn;
    p.is_ca = match path_len {
        Some(n) => IsCa::Ca(BasicConstraints::Constrained(n)),
        None => IsCa::Ca(BasicConstraints::Unconstrained),
    };
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    p.not_before = now() - BACKDATE;
    p.not_after = now() + lifetime;
    p.use_authority_key_identifier_extension = true;
    p
}

/// A freshly generated root and the intermediate it signed, as PEM.
struct Generated {
    root_pem: String,
    root_key: String,
    signer_pem: String,
    signer_key: String,
}

fn generate(trust_domain: &str) -> Result<Generated, CaError> {
    let stamp = now().unix_timestamp();
    let root_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let root_params = ca_params(
        &format!("nodemesh root {stamp}"),
        trust_domain,
        ROOT_LIFETIME,
        None,
    );
    let root = root_params.self_signed(&root_key)?;
    let signer_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let signer_params = ca_params(
        &format!("nodemesh signer {stamp}"),
        trust_domain,
        SIGNER_LIFETIME,
        Some(0),
    );
    let issuer = Issuer::from_params(&root_params, &root_key);
    let signer = signer_params.signed_by(&signer_key, &issuer)?;
    Ok(Generated {
        root_pem: root.pem(),
        root_key: root_key.serialize_pem(),
        signer_pem: signer.pem(),
        signer_key: signer_key.serialize_pem(),
    })
}

fn write_generated(dir: &Path, g: &Generated) -> Result<(), CaError> {
    std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    write(&dir.join("root.key"), &g.root_key, true)?;
    write(&dir.join("signer.key"), &g.signer_key, true)?;
    write(&dir.join("root.pem"), &g.root_pem, false)?;
    write(&dir.join("signer.pem"), &g.signer_pem, false)
}

fn pem_certs(path: &Path, text: &str) -> Result<Vec<CertificateDer<'static>>, CaError> {
    let certs: Result<Vec<_>, _> = CertificateDer::pem_slice_iter(text.as_bytes()).collect();
    let certs = certs.map_err(|e| CaError::BadFile {
        path: path.to_path_buf(),
        message: format!("not PEM certificates: {e}"),
    })?;
    if certs.is_empty() {
        return Err(CaError::BadFile {
            path: path.to_path_buf(),
            message: "holds no certificate".into(),
        });
    }
    Ok(certs)
}

fn to_pem(der: &CertificateDer<'_>) -> String {
    pem::encode_config(
        &pem::Pem::new("CERTIFICATE", der.as_ref()),
        pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF),
    )
}

// === impl Authority ===

/// The CA's key material as loaded from its folder.
pub struct Authority {
    trust_domain: String,
    issuer: Issuer<'static, KeyPair>,
    signer_pem: String,
    /// Every trusted root, PEM.
    bundle: Vec<String>,
    /// Fingerprint of the signer (intermediate) certificate: nodes re-issue when it changes.
    pub signer: String,
}

pub use super::Refusal;

fn refusal(status: StatusCode, label: &'static str, reason: String) -> Refusal {
    Refusal {
        status,
        label,
        reason,
    }
}

impl Authority {
    /// Loads the folder, generating a root, signer and bundle when it holds none (first start).
    pub fn init_or_load(dir: &Path, trust_domain: &str) -> Result<Self, CaError> {
        if !dir.join("signer.pem").exists() && !dir.join("bundle.pem").exists() {
            let g = generate(trust_domain)?;
            write_generated(dir, &g)?;
            write(&dir.join("bundle.pem"), &g.root_pem, false)?;
            info!(dir = %dir.display(), "generated a new root and signer (first start)");
        }
        Self::load(dir, trust_domain)
    }

    pub fn load(dir: &Path, trust_domain: &str) -> Result<Self, CaError> {
        let signer_path = dir.join("signer.pem");
        let signer_pem = read(&signer_path)?;
        let key_path = dir.join("signer.key");
        let key = KeyPair::from_pem(&read_key(&key_path)?).map_err(|e| CaError::BadFile {
            path: key_path.clone(),
            message: format!("not a PEM private key: {e}"),
        })?;
        let signer_der = pem_certs(&signer_path, &signer_pem)?.remove(0);
        // A rotation swaps signer.pem and signer.key one after the other; a load in between must
        // fail (and keep the last good material) rather than sign with a key the certificate
        // does not name.
        let (_, parsed) =
            x509_parser::parse_x509_certificate(&signer_der).map_err(|e| CaError::BadFile {
                path: signer_path.clone(),
                message: format!("not a certificate: {e}"),
            })?;
        if parsed.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
            return Err(CaError::BadFile {
                path: key_path,
                message: "does not match signer.pem's public key".into(),
            });
        }
        let issuer = Issuer::from_ca_cert_der(&signer_der, key).map_err(|e| CaError::BadFile {
            path: signer_path.clone(),
            message: format!("not a CA certificate matching signer.key: {e}"),
        })?;
        let bundle_path = dir.join("bundle.pem");
        let bundle_text = read(&bundle_path)?;
        let bundle: Vec<String> = pem_certs(&bundle_path, &bundle_text)?
            .iter()
            .map(to_pem)
            .collect();
        let root_path = dir.join("root.pem");
        let root = pem_certs(&root_path, &read(&root_path)?)?.remove(0);
        if !bundle.contains(&to_pem(&root)) {
            return Err(CaError::BadFile {
                path: bundle_path,
                message: "does not hold the active root (root.pem); nodes would refuse every new \
                          SVID. Add it back, or finish a rotation with `mesh-daemon ca rotate`"
                    .into(),
            });
        }
        Ok(Self {
            trust_domain: trust_domain.to_string(),
            issuer,
            signer: fingerprint(&signer_der),
            signer_pem: to_pem(&signer_der),
            bundle,
        })
    }

    pub fn bundle(&self) -> BundleReply {
        BundleReply {
            bundle: self.bundle.clone(),
            signer: self.signer.clone(),
        }
    }

    /// Signs a leaf for `id` over `public_key` (never trusting anything else the CSR asked for).
    pub fn issue_for(
        &self,
        id: &Identity,
        public_key: &impl rcgen::PublicKeyData,
        lifetime: Duration,
    ) -> Result<Issued, rcgen::Error> {
        self.issue_leaf(
            &id.to_string(),
            public_key,
            lifetime,
            vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ],
        )
    }

    /// A leaf naming one SPIFFE ID, for the uses given: workloads both, a node's operator
    /// listener server only, an operator client only (so neither can stand in for the other).
    fn issue_leaf(
        &self,
        uri: &str,
        public_key: &impl rcgen::PublicKeyData,
        lifetime: Duration,
        uses: Vec<ExtendedKeyUsagePurpose>,
    ) -> Result<Issued, rcgen::Error> {
        let mut p = CertificateParams::default();
        p.distinguished_name = DistinguishedName::new();
        p.subject_alt_names = vec![SanType::URI(uri.to_string().try_into()?)];
        p.is_ca = IsCa::ExplicitNoCa;
        p.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyAgreement,
        ];
        p.extended_key_usages = uses;
        p.not_before = now() - BACKDATE;
        p.not_after = now() + lifetime;
        p.use_authority_key_identifier_extension = true;
        let leaf = p.signed_by(public_key, &self.issuer)?;
        Ok(Issued {
            chain: vec![leaf.pem(), self.signer_pem.clone()],
            bundle: self.bundle.clone(),
            signer: self.signer.clone(),
        })
    }

    /// An operator's client certificate (`mesh-daemon ca issue-operator`), signed here from the
    /// key folder, never over the network: `(chain PEM, private key PEM, SPIFFE ID)`.
    pub fn issue_operator(
        &self,
        name: &str,
        lifetime: Duration,
    ) -> Result<(String, String, String), CaError> {
        if !super::Role::valid_name(name) {
            return Err(CaError::Rotate(format!(
                "--name {name:?}: an operator's name is lowercase letters, digits, '-' and '.'                  (e.g. alice or oncall.sre)"
            )));
        }
        let uri = super::Role::Operator.id(&self.trust_domain, name);
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let issued = self.issue_leaf(
            &uri,
            &key,
            lifetime,
            vec![ExtendedKeyUsagePurpose::ClientAuth],
        )?;
        Ok((issued.chain.concat(), key.serialize_pem(), uri))
    }

    /// Checks and signs a node's CSR. `on_node` says whether the identity has a workload on the
    /// requesting node.
    ///
    /// Besides workload identities, a node may ask for its own node identity
    /// (`spiffe://<td>/node/<its name>`, for its operator listener; server use only) — never
    /// another node's, and never an operator's.
    pub fn sign(
        &self,
        csr_pem: &str,
        node: &str,
        on_node: impl Fn(&Identity) -> bool,
        lifetime: Duration,
    ) -> Result<(String, Issued), Refusal> {
        let bad = |reason: String| refusal(StatusCode::BAD_REQUEST, "bad_csr", reason);
        let csr = CertificateSigningRequestParams::from_pem(csr_pem).map_err(|e| {
            bad(format!(
                "the CSR cannot be parsed or its signature is wrong: {e}"
            ))
        })?;
        let uris: Vec<&str> = csr
            .params
            .subject_alt_names
            .iter()
            .filter_map(|s| match s {
                SanType::URI(u) => Some(u.as_str()),
                _ => None,
            })
            .collect();
        let [uri] = uris.as_slice() else {
            return Err(bad(format!(
                "the CSR must name exactly one SPIFFE ID as URI SAN, it names {}",
                uris.len()
            )));
        };
        // The leaf would carry only the SPIFFE ID anyway; a CSR asking for more is refused, not
        // quietly trimmed, so a tampered or confused client is seen.
        let others: Vec<String> = csr
            .params
            .subject_alt_names
            .iter()
            .filter_map(|s| match s {
                SanType::URI(_) => None,
                SanType::DnsName(n) => Some(format!("DNS {n}")),
                SanType::IpAddress(ip) => Some(format!("IP {ip}")),
                SanType::Rfc822Name(e) => Some(format!("email {e}")),
                _ => Some("an otherName".into()),
            })
            .collect();
        if !others.is_empty() {
            return Err(bad(format!(
                "the CSR asks for names besides its SPIFFE ID ({}); ask for exactly one URI SAN \
                 and nothing else",
                others.join(", ")
            )));
        }
        if matches!(csr.params.is_ca, IsCa::Ca(_)) {
            return Err(bad(
                "the CSR asks for a CA certificate (basicConstraints CA:true); this CA signs \
                 workload certificates only"
                    .into(),
            ));
        }
        if super::Role::Operator.parse(uri).is_some() {
            return Err(refusal(
                StatusCode::FORBIDDEN,
                "operator_identity",
                format!(
                    "{uri} is an operator identity; operator certificates are issued offline \
                     with `mesh-daemon ca issue-operator`, never to a node"
                ),
            ));
        }
        if let Some((td, name)) = super::Role::Node.parse(uri) {
            if td != self.trust_domain {
                return Err(refusal(
                    StatusCode::FORBIDDEN,
                    "wrong_trust_domain",
                    format!(
                        "{uri} is outside this CA's trust domain {:?}",
                        self.trust_domain
                    ),
                ));
            }
            if name != node {
                return Err(refusal(
                    StatusCode::FORBIDDEN,
                    "not_on_node",
                    format!("{uri} is another node's identity; a node gets only its own"),
                ));
            }
            let issued = self
                .issue_leaf(
                    uri,
                    &csr.public_key,
                    lifetime,
                    vec![ExtendedKeyUsagePurpose::ServerAuth],
                )
                .map_err(|e| refusal(StatusCode::INTERNAL_SERVER_ERROR, "error", e.to_string()))?;
            return Ok((uri.to_string(), issued));
        }
        let id = Identity::parse(uri).map_err(|e| bad(e.to_string()))?;
        if id.trust_domain != self.trust_domain {
            return Err(refusal(
                StatusCode::FORBIDDEN,
                "wrong_trust_domain",
                format!(
                    "{id} is outside this CA's trust domain {:?}",
                    self.trust_domain
                ),
            ));
        }
        if !on_node(&id) {
            return Err(refusal(
                StatusCode::FORBIDDEN,
                "not_on_node",
                format!("no workload with identity {id} is scheduled on the requesting node"),
            ));
        }
        let issued = self
            .issue_for(&id, &csr.public_key, lifetime)
            .map_err(|e| refusal(StatusCode::INTERNAL_SERVER_ERROR, "error", e.to_string()))?;
        Ok((id.to_string(), issued))
    }

    /// A serving certificate for the CA's own HTTPS listener, signed by the current signer.
    fn serving_key(&self, sans: &[String]) -> Result<Arc<CertifiedKey>, CaError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut p = CertificateParams::new(sans.to_vec())?;
        p.distinguished_name = DistinguishedName::new();
        p.distinguished_name.push(DnType::CommonName, "nodemesh CA");
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        p.not_before = now() - BACKDATE;
        p.not_after = now() + SIGNER_LIFETIME;
        p.use_authority_key_identifier_extension = true;
        let cert = p.signed_by(&key, &self.issuer)?;
        let chain = vec![
            cert.der().clone(),
            pem_certs(Path::new("signer.pem"), &self.signer_pem)?.remove(0),
        ];
        let der = rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into());
        let ck = CertifiedKey::from_der(chain, der, &super::provider()).map_err(|e| {
            CaError::BadFile {
                path: PathBuf::from("signer.pem"),
                message: format!("cannot build the CA's serving key: {e}"),
            }
        })?;
        Ok(Arc::new(ck))
    }
}

// === operators ===

/// `mesh-daemon ca issue-operator`: an operator's certificate from the key folder into `out`
/// (operator.pem, operator.key, bundle.pem); the summary line says what to run next.
pub fn issue_operator(
    dir: &Path,
    trust_domain: &str,
    name: &str,
    out: &Path,
    lifetime: Duration,
) -> Result<String, CaError> {
    let authority = Authority::load(dir, trust_domain)?;
    let (chain, key, uri) = authority.issue_operator(name, lifetime)?;
    std::fs::create_dir_all(out).map_err(io_err(out))?;
    {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(out, std::fs::Permissions::from_mode(0o700))
            .map_err(io_err(out))?;
    }
    write(&out.join("operator.pem"), &chain, false)?;
    write(&out.join("operator.key"), &key, true)?;
    write(&out.join("bundle.pem"), &authority.bundle.concat(), false)?;
    let hours = lifetime.as_secs_f64() / 3600.0;
    Ok(format!(
        "issued {uri}, valid for {hours:.1} h, into {out}; read a node with e.g. \
         `meshctl --operator {out} config --admin https://<node address>`",
        out = out.display()
    ))
}

// === rotation ===

/// A step of a root rotation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum RotateStep {
    /// Generate the next root and signer into `next/` and add the root to the bundle. Nodes pick
    /// the bundle up within their refresh interval; wait for that before `activate`.
    AddRoot,
    /// Sign under the next root from now on; nodes re-issue their SVIDs when they see the new
    /// signer. The old root stays trusted.
    Activate,
    /// Drop every root but the active one from the bundle, once all SVIDs are re-issued.
    Retire,
}

/// Carries out one rotation step on the CA folder; returns what to do next.
pub fn rotate(dir: &Path, trust_domain: &str, step: RotateStep) -> Result<String, CaError> {
    let next = dir.join("next");
    let previous = dir.join("previous");
    let bundle_path = dir.join("bundle.pem");
    match step {
        RotateStep::AddRoot => {
            if next.exists() {
                return Err(CaError::Rotate(format!(
                    "{} already holds a next root; run `activate`, or remove it to start over",
                    next.display()
                )));
            }
            let g = generate(trust_domain)?;
            write_generated(&next, &g)?;
            let mut bundle = read(&bundle_path)?;
            if !bundle.ends_with('\n') {
                bundle.push('\n');
            }
            bundle.push_str(&g.root_pem);
            write(&bundle_path, &bundle, false)?;
            Ok(
                "added the next root to bundle.pem; once every node has refreshed its bundle, run \
                `rotate activate`"
                    .into(),
            )
        }
        RotateStep::Activate => {
            if !next.exists() {
                return Err(CaError::Rotate(
                    "no next root to activate; run `rotate add-root` first".into(),
                ));
            }
            std::fs::create_dir_all(&previous).map_err(io_err(&previous))?;
            for f in ["root.pem", "root.key", "signer.pem", "signer.key"] {
                std::fs::copy(dir.join(f), previous.join(f)).map_err(io_err(&dir.join(f)))?;
            }
            for f in ["root.key", "signer.key", "root.pem", "signer.pem"] {
                std::fs::rename(next.join(f), dir.join(f)).map_err(io_err(&next.join(f)))?;
            }
            std::fs::remove_dir_all(&next).map_err(io_err(&next))?;
            Ok("the CA now signs under the new root; nodes re-issue their SVIDs when they see the \
                new signer. Once they all have, run `rotate retire`"
                .into())
        }
        RotateStep::Retire => {
            if next.exists() {
                return Err(CaError::Rotate(
                    "a next root is staged but not active; run `rotate activate` first".into(),
                ));
            }
            let root = read(&dir.join("root.pem"))?;
            write(&bundle_path, &root, false)?;
            if previous.exists() {
                std::fs::remove_dir_all(&previous).map_err(io_err(&previous))?;
            }
            Ok(
                "bundle.pem now holds only the active root; nodes drop the old root at their next \
                bundle refresh"
                    .into(),
            )
        }
    }
}

/// The files of a CA folder that hold its key material, including a rotation's staged (`next/`)
/// and previous (`previous/`) roots: what a Kubernetes Secret keeps for the CA.
pub const KEY_FILES: [&str; 13] = [
    "root.pem",
    "root.key",
    "signer.pem",
    "signer.key",
    "bundle.pem",
    "next/root.pem",
    "next/root.key",
    "next/signer.pem",
    "next/signer.key",
    "previous/root.pem",
    "previous/root.key",
    "previous/signer.pem",
    "previous/signer.key",
];

/// A Secret's key for a folder file (`next/root.key` → `next.root.key`: keys cannot hold `/`).
pub fn secret_key(file: &str) -> String {
    file.replace('/', ".")
}

/// The folder's key material that exists, by Secret key.
pub fn key_material(dir: &Path) -> Result<BTreeMap<String, String>, CaError> {
    let mut m = BTreeMap::new();
    for f in KEY_FILES {
        let path = dir.join(f);
        match std::fs::read_to_string(&path) {
            Ok(text) => {
                m.insert(secret_key(f), text);
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err(&path)(e)),
        }
    }
    Ok(m)
}

/// Makes the folder hold exactly `material` (from [`key_material`], e.g. kept in a Secret): each
/// file written atomically, keys private, files it does not list removed. Then checks that it
/// loads, so a damaged Secret is an error naming the file, not a CA that signs nothing.
pub fn restore_key_material(
    dir: &Path,
    trust_domain: &str,
    material: &BTreeMap<String, String>,
) -> Result<(), CaError> {
    if let Some(unknown) = material
        .keys()
        .find(|k| !KEY_FILES.iter().any(|f| secret_key(f) == **k))
    {
        return Err(CaError::BadFile {
            path: PathBuf::from(unknown),
            message: format!(
                "is not one of the CA's files ({}); was the Secret edited by hand?",
                KEY_FILES.join(", ")
            ),
        });
    }
    for f in KEY_FILES {
        let path = dir.join(f);
        match material.get(&secret_key(f)) {
            Some(text) => {
                if let Some(parent) = path.parent() {
                    std::fs::create_dir_all(parent).map_err(io_err(parent))?;
                }
                write(&path, text, f.ends_with(".key"))?;
            }
            None => match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_err(&path)(e)),
            },
        }
    }
    for sub in ["next", "previous"] {
        // Empty staging folders mean nothing is staged (`rotate` looks for the folder).
        let _ = std::fs::remove_dir(dir.join(sub));
    }
    Authority::load(dir, trust_domain).map(drop)
}

/// Where the CA's keys came from at start.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeySource {
    /// The Secret held them.
    Restored,
    /// First start: generated, and stored in the Secret.
    Created,
}

/// Makes the CA folder `dir` hold the keys kept in Secret `name`: restored when it exists, so a
/// rescheduled CA signs under the same root and no node loses trust; generated in `dir` and stored
/// there when it does not (first start). Waits, retrying, while the API server cannot say which:
/// generating keys then would split the mesh's trust.
pub async fn keys_from_secret(
    kube: &super::cakube::KubePlacement,
    name: &str,
    dir: &Path,
    trust_domain: &str,
) -> Result<KeySource, String> {
    let mut delay = Duration::from_millis(500);
    loop {
        let step = match kube.read_keys(name).await {
            Ok(Some(material)) => {
                restore_key_material(dir, trust_domain, &material).map_err(|e| {
                    format!(
                        "Secret {name} holds unusable key material ({e}); fix or delete it (a new \
                         root then means every node must fetch the new bundle)"
                    )
                })?;
                return Ok(KeySource::Restored);
            }
            Ok(None) => {
                Authority::init_or_load(dir, trust_domain).map_err(|e| e.to_string())?;
                let material = key_material(dir).map_err(|e| e.to_string())?;
                match kube.create_keys(name, &material).await {
                    Ok(true) => return Ok(KeySource::Created),
                    // Another CA replica stored its keys first: use those.
                    Ok(false) => continue,
                    Err(e) => e,
                }
            }
            Err(e) => e,
        };
        warn!(
            error = %step,
            retry_in = ?delay,
            "the CA keeps its keys in Secret {name}; its Role must allow get, create and patch on it"
        );
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(30));
    }
}

// === the server ===

/// Node name → bootstrap token, from a YAML map (`node-1: <token>`).
pub fn load_tokens(path: &Path) -> Result<BTreeMap<String, String>, CaError> {
    parse_tokens(&read(path)?).map_err(|message| CaError::BadFile {
        path: path.to_path_buf(),
        message,
    })
}

/// The token file's text: a map of node name to token. Tokens are trimmed, as the node trims its
/// own token file, so a quoted value with a trailing space or newline still matches; an empty
/// token (which would match a node that sends none) is refused.
pub fn parse_tokens(text: &str) -> Result<BTreeMap<String, String>, String> {
    let raw: BTreeMap<String, String> = serde_norway::from_str(text)
        .map_err(|e| format!("expected a map of node name to token: {e}"))?;
    raw.into_iter()
        .map(|(node, token)| {
            let token = token.trim().to_string();
            if token.is_empty() {
                Err(format!(
                    "node {node:?} has an empty token; give it a secret of its own"
                ))
            } else {
                Ok((node.trim().to_string(), token))
            }
        })
        .collect()
}

/// Compares in time independent of where the strings differ (`subtle`).
fn same_secret(a: &str, b: &str) -> bool {
    use subtle::ConstantTimeEq as _;
    a.as_bytes().ct_eq(b.as_bytes()).into()
}

/// A file's identity and version: a change of any part means "read it again".
#[derive(Clone, Debug, PartialEq, Eq)]
struct Stamp {
    ino: u64,
    len: u64,
    modified: Option<std::time::SystemTime>,
}

fn stamp(path: &Path) -> Result<Stamp, CaError> {
    use std::os::unix::fs::MetadataExt as _;
    let m = std::fs::metadata(path).map_err(io_err(path))?;
    Ok(Stamp {
        ino: m.ino(),
        len: m.len(),
        modified: m.modified().ok(),
    })
}

/// Who may ask for what: the node tokens and which identities have a pod on which node. Cached,
/// and read again only when either file changes (checked with one `stat` each per request), so
/// a request never parses files yet never signs on stale placement.
struct Placement {
    stamps: (Stamp, Stamp),
    /// A file changed within the last second when this was read: a rewrite of the same length
    /// within one mtime tick would leave the same stamp, so this copy is not trusted (it is
    /// read again at the next request; the "racy git" rule).
    recent: bool,
    tokens: BTreeMap<String, String>,
    /// (node, namespace, service account) of every workload.
    identities: std::collections::HashSet<(String, String, String)>,
}

impl Placement {
    fn load(tokens: &Path, mesh_file: &Path) -> Result<Self, CaError> {
        let stamps = (stamp(tokens)?, stamp(mesh_file)?);
        let fresh = |s: &Stamp| {
            s.modified
                .and_then(|m| std::time::SystemTime::now().duration_since(m).ok())
                .is_none_or(|age| age < Duration::from_secs(1))
        };
        let recent = fresh(&stamps.0) || fresh(&stamps.1);
        let tokens = load_tokens(tokens)?;
        let mesh = meshfile::load(mesh_file).map_err(|e| CaError::BadFile {
            path: mesh_file.to_path_buf(),
            message: e.to_string(),
        })?;
        let identities = mesh
            .workloads
            .iter()
            .map(|w| {
                (
                    w.node.clone(),
                    w.namespace.clone(),
                    w.service_account.clone(),
                )
            })
            .collect();
        Ok(Self {
            stamps,
            recent,
            tokens,
            identities,
        })
    }

    /// The node whose token this is.
    fn node_of(&self, token: &str) -> Option<&str> {
        self.tokens
            .iter()
            .find(|(_, v)| same_secret(v, token))
            .map(|(k, _)| k.as_str())
    }

    fn on_node(&self, node: &str, id: &Identity) -> bool {
        self.identities.contains(&(
            node.to_string(),
            id.namespace.clone(),
            id.service_account.clone(),
        ))
    }
}

pub struct CaConfig {
    pub dir: PathBuf,
    pub listen: SocketAddr,
    pub trust_domain: String,
    /// Placement from files: the node tokens and the mesh file (unused with `kube`).
    pub tokens: PathBuf,
    pub mesh_file: PathBuf,
    /// Placement from Kubernetes: TokenReview and the pods' nodeName.
    pub kube: Option<super::cakube::KubePlacement>,
    pub lifetime: Duration,
    /// Extra names for the serving certificate (the listen IP is always in it).
    pub sans: Vec<String>,
    /// Signing requests each client address may make per second (bursts of ten seconds'
    /// worth); 0: no limit.
    pub rate_limit: u32,
}

/// Signing requests per client address: a flood from one host (a node's daemon, or anything
/// that reaches the port) is answered 429 before it costs a TokenReview or a signature, and
/// every other node keeps being served.
type ClientLimiter = governor::DefaultKeyedRateLimiter<std::net::IpAddr>;

struct Shared {
    cfg: CaConfig,
    /// From the files; None with Kubernetes placement.
    placement: RwLock<Option<Arc<Placement>>>,
    authority: RwLock<Arc<Authority>>,
    serving: RwLock<Arc<CertifiedKey>>,
    requests: IntCounterVec,
    limiter: Option<ClientLimiter>,
}

#[derive(Debug)]
struct ServingResolver(Arc<Shared>);

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CaShared")
    }
}

impl ResolvesServerCert for ServingResolver {
    fn resolve(&self, _: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(
            self.0
                .serving
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
        )
    }
}

pub struct Ca {
    listener: TcpListener,
    shared: Arc<Shared>,
    tls: tokio_rustls::TlsAcceptor,
}

impl Ca {
    /// Loads (or generates) the key material, checks the token file and binds the listener.
    pub async fn new(cfg: CaConfig, registry: &prometheus::Registry) -> Result<Self, CaError> {
        let authority = Authority::init_or_load(&cfg.dir, &cfg.trust_domain)?;
        let placement = match cfg.kube {
            Some(_) => None,
            None => Some(Arc::new(Placement::load(&cfg.tokens, &cfg.mesh_file)?)),
        };
        let mut sans = cfg.sans.clone();
        if !cfg.listen.ip().is_unspecified() {
            sans.push(cfg.listen.ip().to_string());
        }
        let serving = authority.serving_key(&sans)?;
        let listener = TcpListener::bind(cfg.listen)
            .await
            .map_err(|source| CaError::Bind {
                addr: cfg.listen,
                advice: crate::socket::bind_advice(cfg.listen, &source, "--listen"),
                source,
            })?;
        let requests = IntCounterVec::new(
            Opts::new(
                "ca_requests_total",
                "SVID signing requests, by result (issued, or why refused)",
            ),
            &["result"],
        )
        .expect("static metric definitions are valid");
        registry
            .register(Box::new(requests.clone()))
            .expect("registered once");
        let limiter = std::num::NonZeroU32::new(cfg.rate_limit).map(|per_second| {
            let burst = std::num::NonZeroU32::new(per_second.get().saturating_mul(10))
                .unwrap_or(per_second);
            governor::RateLimiter::keyed(governor::Quota::per_second(per_second).allow_burst(burst))
        });
        let shared = Arc::new(Shared {
            limiter,
            cfg,
            placement: RwLock::new(placement),
            authority: RwLock::new(Arc::new(authority)),
            serving: RwLock::new(serving),
            requests,
        });
        let server = rustls::ServerConfig::builder_with_provider(super::provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| CaError::Rotate(format!("TLS configuration: {e}")))?
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(ServingResolver(shared.clone())));
        Ok(Self {
            listener,
            shared,
            tls: tokio_rustls::TlsAcceptor::from(Arc::new(server)),
        })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    pub async fn run(self) {
        let shared = self.shared.clone();
        tokio::spawn(reload_loop(shared.clone()));
        loop {
            let (tcp, peer) = match self.listener.accept().await {
                Ok(x) => x,
                Err(e) => {
                    warn!(error = %e, "CA accept failed");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            };
            let tls = self.tls.clone();
            let shared = shared.clone();
            tokio::spawn(async move {
                let stream =
                    match tokio::time::timeout(Duration::from_secs(10), tls.accept(tcp)).await {
                        Ok(Ok(s)) => s,
                        Ok(Err(e)) => {
                            warn!(%peer, error = %e, "CA: TLS handshake failed");
                            return;
                        }
                        Err(_) => return,
                    };
                let svc = service_fn(move |req| {
                    let shared = shared.clone();
                    async move { Ok::<_, std::convert::Infallible>(handle(&shared, peer, req).await) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    }
}

impl Shared {
    /// The placement, read again first if a file changed; an unreadable or bad file is an
    /// error (the request is refused as unavailable rather than signed on a guess).
    fn placement(&self) -> Result<Arc<Placement>, CaError> {
        let now = (stamp(&self.cfg.tokens)?, stamp(&self.cfg.mesh_file)?);
        let cached = self
            .placement
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        if let Some(cached) = cached
            && cached.stamps == now
            && !cached.recent
        {
            return Ok(cached);
        }
        let fresh = Arc::new(Placement::load(&self.cfg.tokens, &self.cfg.mesh_file)?);
        *self.placement.write().unwrap_or_else(|p| p.into_inner()) = Some(fresh.clone());
        Ok(fresh)
    }
}

/// Picks up rotations: reloads the folder every second and re-issues the serving certificate
/// when the signer changed.
async fn reload_loop(shared: Arc<Shared>) {
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        // Forget clients whose bucket is full again (the limiter's memory follows who is asking).
        if let Some(l) = &shared.limiter {
            l.retain_recent();
        }
        let current = shared
            .authority
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        match Authority::load(&shared.cfg.dir, &shared.cfg.trust_domain) {
            Ok(a) => {
                if a.signer != current.signer || a.bundle != current.bundle {
                    info!(signer = %a.signer, roots = a.bundle.len(), "CA key material changed");
                    let mut sans = shared.cfg.sans.clone();
                    if !shared.cfg.listen.ip().is_unspecified() {
                        sans.push(shared.cfg.listen.ip().to_string());
                    }
                    match a.serving_key(&sans) {
                        Ok(k) => *shared.serving.write().unwrap_or_else(|p| p.into_inner()) = k,
                        Err(e) => warn!(error = %e, "cannot re-issue the CA's serving certificate"),
                    }
                    *shared.authority.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(a);
                }
            }
            Err(e) => {
                warn!(error = %e, "CA folder unreadable; still signing with the last good key material")
            }
        }
    }
}

fn json_response(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    r
}

fn error_response(status: StatusCode, reason: &str) -> Response<Full<Bytes>> {
    json_response(status, serde_json::json!({ "error": reason }).to_string())
}

/// The 429 for a client over its rate (with the seconds until it may ask again), counted as
/// `rate_limited`; None while it is within it.
fn rate_limited(shared: &Shared, peer: SocketAddr) -> Option<Response<Full<Bytes>>> {
    use governor::clock::Clock as _;
    let limiter = shared.limiter.as_ref()?;
    let not_until = limiter.check_key(&peer.ip()).err()?;
    let wait = not_until
        .wait_time_from(governor::clock::DefaultClock::default().now())
        .as_secs()
        + 1;
    shared.requests.with_label_values(&["rate_limited"]).inc();
    let mut r = error_response(
        StatusCode::TOO_MANY_REQUESTS,
        &format!(
            "more than {} signing requests per second from {}; retry after {wait} s (the CA's \
             --rate-limit)",
            shared.cfg.rate_limit,
            peer.ip()
        ),
    );
    r.headers_mut().insert(
        hyper::header::RETRY_AFTER,
        hyper::header::HeaderValue::from(wait),
    );
    Some(r)
}

async fn handle(
    shared: &Shared,
    peer: SocketAddr,
    req: Request<Incoming>,
) -> Response<Full<Bytes>> {
    let authority = shared
        .authority
        .read()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    match (req.method().as_str(), req.uri().path()) {
        ("GET", "/v1/bundle") => json_response(
            StatusCode::OK,
            serde_json::to_string(&authority.bundle()).unwrap_or_default(),
        ),
        ("POST", "/v1/svid") => {
            if let Some(limited) = rate_limited(shared, peer) {
                return limited;
            }
            let (status, label, body) = sign_request(shared, &authority, peer, req).await;
            shared.requests.with_label_values(&[label]).inc();
            json_response(status, body)
        }
        _ => error_response(
            StatusCode::NOT_FOUND,
            "unknown path; the CA serves POST /v1/svid and GET /v1/bundle",
        ),
    }
}

/// A signing request's token (`Authorization: Bearer <token>`), if it has one.
pub fn bearer_token(headers: &hyper::HeaderMap) -> Option<&str> {
    headers
        .get(hyper::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
}

/// A signing request's body (`{"csr": "<PEM>"}`, read up to `MAX_BODY` bytes by the caller).
pub fn parse_sign_body(body: &[u8]) -> Result<SignRequest, String> {
    serde_json::from_slice(body)
        .map_err(|e| format!("the body must be {{\"csr\": \"<PEM>\"}}: {e}"))
}

async fn sign_request(
    shared: &Shared,
    authority: &Authority,
    peer: SocketAddr,
    req: Request<Incoming>,
) -> (StatusCode, &'static str, String) {
    let err = |status: StatusCode, label: &'static str, reason: String| {
        warn!(%peer, reason = %reason, "CA refused a signing request");
        (
            status,
            label,
            serde_json::json!({ "error": reason }).to_string(),
        )
    };
    let token = bearer_token(req.headers()).map(str::to_string);
    // Who is asking: a node, by its token.
    let (node, placement) = if let Some(kube) = &shared.cfg.kube {
        let Some(token) = token.as_deref() else {
            return err(
                StatusCode::UNAUTHORIZED,
                "unauthenticated",
                "no token (Authorization: Bearer <the daemon's projected service-account token>)"
                    .into(),
            );
        };
        match kube.node_of(token).await {
            Ok(node) => (node, None),
            Err(r) => return err(r.status, r.label, r.reason),
        }
    } else {
        let placement = match shared.placement() {
            Ok(p) => p,
            Err(e) => return err(StatusCode::SERVICE_UNAVAILABLE, "error", e.to_string()),
        };
        let Some(node) = token
            .as_deref()
            .and_then(|t| placement.node_of(t))
            .map(str::to_string)
        else {
            return err(
                StatusCode::UNAUTHORIZED,
                "unauthenticated",
                "no valid node token (Authorization: Bearer <token from the node's token file>)"
                    .into(),
            );
        };
        (node, Some(placement))
    };
    let declared = req
        .headers()
        .get(hyper::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let too_large = |len: String| {
        err(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
            format!(
                "the request body is {len} bytes; a signing request is {{\"csr\": \"<PEM>\"}} of \
                 at most {MAX_BODY} bytes"
            ),
        )
    };
    if let Some(len) = declared.filter(|&l| l > MAX_BODY as u64) {
        return too_large(len.to_string());
    }
    let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => {
            return too_large(format!("more than {MAX_BODY}"));
        }
        Err(e) => {
            return err(
                StatusCode::BAD_REQUEST,
                "bad_csr",
                format!("cannot read the request body (at most {MAX_BODY} bytes): {e}"),
            );
        }
    };
    let sign = match parse_sign_body(&body) {
        Ok(s) => s,
        Err(e) => return err(StatusCode::BAD_REQUEST, "bad_csr", e),
    };
    // Who runs where comes from the same control input the nodes read (the mesh file, or the
    // Pods' nodeName in Kubernetes, asked now).
    let on_kube_node = match (&shared.cfg.kube, &placement) {
        (Some(kube), _) => match kube.identities_on(&node).await {
            Ok(ids) => Some(ids),
            Err(r) => return err(r.status, r.label, r.reason),
        },
        _ => None,
    };
    let on_node = |id: &Identity| match (&on_kube_node, &placement) {
        (Some(ids), _) => ids.contains(&(id.namespace.clone(), id.service_account.clone())),
        (None, Some(p)) => p.on_node(&node, id),
        (None, None) => false,
    };
    match authority.sign(&sign.csr, &node, on_node, shared.cfg.lifetime) {
        Ok((id, issued)) => {
            info!(%node, identity = %id, lifetime = ?shared.cfg.lifetime, "issued SVID");
            (
                StatusCode::OK,
                "issued",
                serde_json::to_string(&issued).unwrap_or_default(),
            )
        }
        Err(r) => err(r.status, r.label, format!("node {node}: {}", r.reason)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn csr_for(uri: &str) -> (KeyPair, String) {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
        let mut p = CertificateParams::default();
        p.subject_alt_names = vec![SanType::URI(uri.try_into().expect("ascii"))];
        let csr = p.serialize_request(&key).expect("csr").pem().expect("pem");
        (key, csr)
    }

    #[test]
    fn pem_round_trips_with_unix_line_ends() {
        let der = CertificateDer::from(vec![0x30u8, 0x03, 0x02, 0x01, 0x05]);
        let text = to_pem(&der);
        assert!(text.starts_with("-----BEGIN CERTIFICATE-----\n") && !text.contains('\r'));
        let back: Vec<_> = CertificateDer::pem_slice_iter(text.as_bytes())
            .collect::<Result<_, _>>()
            .expect("PEM");
        assert_eq!(back, vec![der]);
    }

    #[test]
    fn key_material_round_trips_through_a_secret_shape() {
        let base = std::env::temp_dir().join(format!("nm-ca-keys-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        let (a, b) = (base.join("a"), base.join("b"));
        let ca = Authority::init_or_load(&a, "cluster.local").expect("generated");
        rotate(&a, "cluster.local", RotateStep::AddRoot).expect("add-root");
        let material = key_material(&a).expect("material");
        assert!(
            material.contains_key("next.signer.key"),
            "{:?}",
            material.keys()
        );
        // A stale file in the target folder that the Secret does not hold is removed.
        std::fs::create_dir_all(b.join("previous")).expect("dir");
        std::fs::write(b.join("previous/root.pem"), "stale").expect("stale");
        restore_key_material(&b, "cluster.local", &material).expect("restored");
        assert_eq!(key_material(&b).expect("material"), material);
        assert!(!b.join("previous").exists());
        let back = Authority::load(&b, "cluster.local").expect("loads");
        assert_eq!(back.signer, ca.signer);
        // A signing key others may read is refused, naming the file and the fix.
        {
            use std::os::unix::fs::PermissionsExt as _;
            let key = b.join("signer.key");
            std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).expect("chmod");
            let e = Authority::load(&b, "cluster.local").err().expect("refused");
            assert!(
                e.to_string().contains("readable by others") && e.to_string().contains("chmod 600"),
                "{e}"
            );
            std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        }
        {
            use std::os::unix::fs::PermissionsExt as _;
            let mode = std::fs::metadata(b.join("signer.key"))
                .expect("key")
                .permissions()
                .mode();
            assert_eq!(mode & 0o077, 0, "keys are private: {mode:o}");
        }
        // A Secret edited by hand: a foreign key or a damaged signer is refused by name.
        let mut foreign = material.clone();
        foreign.insert("notes.txt".into(), "x".into());
        let e = restore_key_material(&b, "cluster.local", &foreign).expect_err("refused");
        assert!(e.to_string().contains("notes.txt"), "{e}");
        let mut damaged = material;
        damaged.insert("signer.pem".into(), "garbage".into());
        let e = restore_key_material(&b, "cluster.local", &damaged).expect_err("refused");
        assert!(e.to_string().contains("signer.pem"), "{e}");
        let _ = std::fs::remove_dir_all(&base);
    }

    #[test]
    fn signs_only_identities_on_the_node_and_in_the_trust_domain() {
        let dir = std::env::temp_dir().join(format!("nm-ca-unit-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let ca = Authority::init_or_load(&dir, "cluster.local").expect("generated");
        let mine = Identity::new("cluster.local", "default", "client");
        let (_, csr) = csr_for(&mine.to_string());
        let (id, issued) = ca
            .sign(&csr, "node-a", |id| *id == mine, Duration::from_secs(60))
            .expect("signed");
        assert_eq!(id, mine.to_string());
        let leaf = pem_certs(Path::new("leaf"), &issued.chain[0])
            .expect("pem")
            .remove(0);
        assert_eq!(Identity::from_cert(&leaf).expect("spiffe id"), mine);
        assert_eq!(issued.bundle.len(), 1);

        let (_, other) = csr_for("spiffe://cluster.local/ns/default/sa/server");
        let r = ca.sign(&other, "node-a", |id| *id == mine, Duration::from_secs(60));
        assert_eq!(r.expect_err("not on node").label, "not_on_node");
        let (_, foreign) = csr_for("spiffe://evil.example/ns/default/sa/client");
        let r = ca.sign(&foreign, "node-a", |_| true, Duration::from_secs(60));
        assert_eq!(r.expect_err("foreign").label, "wrong_trust_domain");
        let r = ca.sign("garbage", "node-a", |_| true, Duration::from_secs(60));
        assert_eq!(r.expect_err("garbage").label, "bad_csr");
        let (_, no_uri) = {
            let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
            let p = CertificateParams::new(vec!["a.example".to_string()]).expect("params");
            let csr = p.serialize_request(&key).expect("csr").pem().expect("pem");
            (key, csr)
        };
        let r = ca.sign(&no_uri, "node-a", |_| true, Duration::from_secs(60));
        assert_eq!(r.expect_err("no uri").label, "bad_csr");
        // Tampered requests: more names than the SPIFFE ID, or a CA certificate.
        let tampered = |extra: fn(&mut CertificateParams)| {
            let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
            let mut p = CertificateParams::default();
            p.subject_alt_names = vec![SanType::URI(mine.to_string().try_into().expect("ascii"))];
            extra(&mut p);
            let csr = p.serialize_request(&key).expect("csr").pem().expect("pem");
            ca.sign(&csr, "node-a", |_| true, Duration::from_secs(60))
                .expect_err("tampered")
        };
        let r = tampered(|p| {
            p.subject_alt_names
                .push(SanType::DnsName("evil.example".try_into().expect("ascii")))
        });
        assert_eq!(r.label, "bad_csr");
        assert!(r.reason.contains("besides its SPIFFE ID"), "{}", r.reason);
        let r = tampered(|p| {
            p.subject_alt_names.push(SanType::URI(
                "spiffe://cluster.local/ns/default/sa/other"
                    .try_into()
                    .expect("ascii"),
            ))
        });
        assert!(r.reason.contains("exactly one SPIFFE ID"), "{}", r.reason);
        let r = tampered(|p| p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained));
        assert!(r.reason.contains("CA certificate"), "{}", r.reason);

        // A node gets its own node identity (server use only), never another node's, and never
        // an operator's, whatever the placement says.
        let (_, own) = csr_for("spiffe://cluster.local/node/node-a");
        let (uri, issued) = ca
            .sign(&own, "node-a", |_| false, Duration::from_secs(60))
            .expect("its own node identity");
        assert_eq!(uri, "spiffe://cluster.local/node/node-a");
        let leaf = pem_certs(Path::new("leaf"), &issued.chain[0])
            .expect("pem")
            .remove(0);
        let (_, cert) = x509_parser::parse_x509_certificate(&leaf).expect("x509");
        let eku = cert.extended_key_usage().expect("eku").expect("eku").value;
        assert!(eku.server_auth && !eku.client_auth, "{eku:?}");
        let (_, theirs) = csr_for("spiffe://cluster.local/node/node-b");
        let r = ca.sign(&theirs, "node-a", |_| true, Duration::from_secs(60));
        assert_eq!(r.expect_err("another node").label, "not_on_node");
        let (_, foreign_node) = csr_for("spiffe://evil.example/node/node-a");
        let r = ca.sign(&foreign_node, "node-a", |_| true, Duration::from_secs(60));
        assert_eq!(r.expect_err("foreign node").label, "wrong_trust_domain");
        let (_, op) = csr_for("spiffe://cluster.local/operator/alice");
        let r = ca
            .sign(&op, "node-a", |_| true, Duration::from_secs(60))
            .expect_err("operator over the network");
        assert_eq!(r.label, "operator_identity");
        assert!(r.reason.contains("issue-operator"), "{}", r.reason);
        // Offline, the operator's certificate is a client certificate only.
        let (chain, key, uri) = ca
            .issue_operator("alice", Duration::from_secs(60))
            .expect("operator");
        assert_eq!(uri, "spiffe://cluster.local/operator/alice");
        assert!(key.contains("PRIVATE KEY"), "{key}");
        let certs = pem_certs(Path::new("operator.pem"), &chain).expect("pem");
        assert_eq!(certs.len(), 2, "leaf and signer");
        let (_, cert) = x509_parser::parse_x509_certificate(&certs[0]).expect("x509");
        let eku = cert.extended_key_usage().expect("eku").expect("eku").value;
        assert!(eku.client_auth && !eku.server_auth, "{eku:?}");
        assert!(
            ca.issue_operator("Alice/x", Duration::from_secs(60))
                .is_err()
        );

        // Rotation: the bundle grows, the signer changes, then the bundle shrinks again.
        let before = ca.signer.clone();
        rotate(&dir, "cluster.local", RotateStep::AddRoot).expect("add-root");
        assert!(rotate(&dir, "cluster.local", RotateStep::AddRoot).is_err());
        let staged = Authority::load(&dir, "cluster.local").expect("loads");
        assert_eq!(
            (staged.bundle.len(), staged.signer.clone()),
            (2, before.clone())
        );
        rotate(&dir, "cluster.local", RotateStep::Activate).expect("activate");
        let active = Authority::load(&dir, "cluster.local").expect("loads");
        assert_ne!(active.signer, before);
        assert_eq!(active.bundle.len(), 2);
        // A half-swapped folder (new key, old certificate) is refused, never used.
        let active_pem = std::fs::read(dir.join("signer.pem")).expect("pem");
        std::fs::copy(dir.join("previous/signer.pem"), dir.join("signer.pem")).expect("copy");
        let err = Authority::load(&dir, "cluster.local")
            .err()
            .expect("mismatch refused");
        assert!(err.to_string().contains("does not match"), "{err}");
        std::fs::write(dir.join("signer.pem"), active_pem).expect("restore");
        rotate(&dir, "cluster.local", RotateStep::Retire).expect("retire");
        let retired = Authority::load(&dir, "cluster.local").expect("loads");
        assert_eq!(retired.bundle.len(), 1);
        assert_eq!(retired.signer, active.signer);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn token_files_are_trimmed_and_empty_tokens_refused() {
        let t = parse_tokens("node-1: \"s3cret \\n\"\nnode-2: plain\n").expect("tokens");
        assert_eq!(t["node-1"], "s3cret");
        assert_eq!(t["node-2"], "plain");
        let e = parse_tokens("node-1: \"  \"\n").expect_err("empty");
        assert!(e.contains("empty token"), "{e}");
        let e = parse_tokens("[a, b]").expect_err("a list");
        assert!(e.contains("map of node name to token"), "{e}");
    }

    #[test]
    fn token_comparison() {
        assert!(same_secret("abc", "abc"));
        assert!(!same_secret("abc", "abd"));
        assert!(!same_secret("abc", "abcd"));
    }
}
