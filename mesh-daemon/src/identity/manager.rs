//! The node's certificate manager: one SVID per identity that has a pod on this node.
//!
//! - An identity's SVID is fetched from the CA when its first pod enrolls ([`Manager::set_wanted`])
//!   and dropped when its last pod leaves.
//! - Each is renewed at half its lifetime, with a fresh key. A failed renewal keeps the current
//!   SVID and retries with backoff; it is logged and counted.
//! - The trust bundle is refreshed from the CA periodically. When the CA's signer changes (a root
//!   rotation), every SVID is re-issued at once instead of waiting for its half-life.

use std::{
    collections::HashMap,
    path::PathBuf,
    sync::{Arc, Mutex, RwLock},
    time::{Duration, SystemTime},
};

use bytes::Bytes;
use rcgen::{CertificateParams, KeyPair, SanType};
use rustls::{
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
    sign::CertifiedKey,
};
use tokio::{sync::watch, task::AbortHandle};
use tracing::{info, warn};

use super::{
    Bundle, CertSource, Identity,
    caclient::{BundleReply, CaClient, CaClientError, CaUrl, Issued, SignRequest},
};
use crate::metrics::Metrics;

/// Retry bounds after a failed fetch or renewal.
const BACKOFF_MIN: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum ManagerError {
    #[error("cannot read {path}: {source}; pass the file the CA's operator gave this node")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}")]
    Config(String),
    #[error(transparent)]
    Ca(#[from] CaClientError),
    #[error("the CA's answer is unusable: {0}")]
    BadAnswer(String),
}

impl ManagerError {
    /// A bounded label for `svid_refusals_total{reason}` and the tap event.
    pub fn refusal_label(&self) -> &'static str {
        match self {
            ManagerError::Ca(CaClientError::Refused { status, .. }) => match status {
                400 => "bad_request",
                401 => "unauthenticated",
                403 => "forbidden",
                429 => "rate_limited",
                _ => "ca_error",
            },
            ManagerError::Ca(CaClientError::Unreachable { .. }) => "unreachable",
            ManagerError::Ca(CaClientError::Untrusted { .. }) => "untrusted_ca",
            ManagerError::BadAnswer(_) => "bad_answer",
            ManagerError::Ca(CaClientError::Config(_))
            | ManagerError::Config(_)
            | ManagerError::Read { .. } => "config",
        }
    }
}

pub struct ManagerConfig {
    /// `https://<ip or DNS name>[:port]`.
    pub ca_url: String,
    /// Roots to trust the CA (and peers) with until the CA's own bundle arrives.
    pub ca_bundle: PathBuf,
    /// This node's bootstrap token.
    pub token_file: PathBuf,
    pub trust_domain: String,
    /// How often the trust bundle is refreshed from the CA.
    pub refresh: Duration,
    /// SO_MARK for the connection to the CA, so no hook ever captures it.
    pub mark: u32,
}

/// A workload certificate in hand.
#[derive(Debug)]
pub struct Svid {
    pub identity: Identity,
    pub key: Arc<CertifiedKey>,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    /// Fingerprint of the signer that issued it.
    pub signer: String,
    /// When it is due for renewal (half of the validity left when it arrived; until then, its
    /// expiry).
    pub renews_at: SystemTime,
}

/// This node's own certificate (`spiffe://<td>/node/<name>`), which the operator listener serves
/// with; fetched and renewed like an SVID.
#[derive(Debug)]
pub struct NodeCert {
    pub uri: String,
    pub key: Arc<CertifiedKey>,
    pub not_after: SystemTime,
    pub renews_at: SystemTime,
}

/// What a renewal worker keeps fresh.
#[derive(Clone, Debug)]
enum Subject {
    Workload(Identity),
    Node(String),
}

impl Subject {
    fn uri(&self, trust_domain: &str) -> String {
        match self {
            Subject::Workload(id) => id.to_string(),
            Subject::Node(name) => super::Role::Node.id(trust_domain, name),
        }
    }
}

/// A certificate just issued, before it is stored.
struct Fetched {
    key: Arc<CertifiedKey>,
    not_before: SystemTime,
    not_after: SystemTime,
    signer: String,
}

pub struct Manager {
    ca: CaClient,
    /// The node certificate and its worker, once [`Manager::want_node_cert`] asked for it.
    node_cert: RwLock<Option<Arc<NodeCert>>>,
    node_worker: Mutex<Option<AbortHandle>>,
    /// Where a refused or failed request for a certificate is shown.
    tap: std::sync::OnceLock<crate::tap::Tap>,
    trust_domain: String,
    refresh: Duration,
    svids: RwLock<HashMap<Identity, Arc<Svid>>>,
    workers: Mutex<HashMap<Identity, AbortHandle>>,
    bundle: RwLock<Arc<Bundle>>,
    /// The CA's current signer, as last seen; workers re-issue when it moves.
    signer: watch::Sender<String>,
    /// Bumped whenever an SVID is stored, for [`Manager::wait_for`].
    stored: watch::Sender<u64>,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for Manager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Manager")
            .field("ca", self.ca.url())
            .finish_non_exhaustive()
    }
}

impl Manager {
    /// Reads the bootstrap files; nothing is fetched until [`Manager::start`].
    pub fn new(cfg: ManagerConfig, metrics: Arc<Metrics>) -> Result<Arc<Self>, ManagerError> {
        let url = CaUrl::parse(&cfg.ca_url).map_err(ManagerError::Config)?;
        let read = |path: &PathBuf| {
            crate::meshfile::read_file(path).map_err(|source| ManagerError::Read {
                path: path.clone(),
                source,
            })
        };
        let token = read(&cfg.token_file)?.trim().to_string();
        if token.is_empty() {
            return Err(ManagerError::Config(format!(
                "{} is empty; it must hold this node's token for the CA (a bootstrap token, or in Kubernetes the projected service-account token)",
                cfg.token_file.display()
            )));
        }
        let roots = match crate::meshfile::read_file(&cfg.ca_bundle) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(ManagerError::Config(format!(
                    "--ca-bundle {} does not exist: the CA writes bundle.pem into its --dir at \
                     its first start; copy it here (in Kubernetes, mount ConfigMap \
                     nodemesh-trust-bundle, which the CA publishes)",
                    cfg.ca_bundle.display()
                )));
            }
            other => other.map_err(|source| ManagerError::Read {
                path: cfg.ca_bundle.clone(),
                source,
            })?,
        };
        let bundle = Bundle::new(vec![roots], String::new())
            .map_err(|e| ManagerError::Config(format!("{}: {e}", cfg.ca_bundle.display())))?;
        Ok(Arc::new(Self {
            // Read again at every request: a projected token is rotated in place.
            ca: CaClient::new(
                url,
                super::caclient::Token::File {
                    path: cfg.token_file.clone(),
                    last: std::sync::Mutex::new(token),
                },
                cfg.mark,
            ),
            node_cert: RwLock::default(),
            node_worker: Mutex::default(),
            tap: std::sync::OnceLock::new(),
            trust_domain: cfg.trust_domain,
            refresh: cfg.refresh,
            svids: RwLock::default(),
            workers: Mutex::default(),
            bundle: RwLock::new(Arc::new(bundle)),
            signer: watch::Sender::new(String::new()),
            stored: watch::Sender::new(0),
            metrics,
        }))
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    pub fn bundle(&self) -> Arc<Bundle> {
        self.bundle
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn svid(&self, id: &Identity) -> Option<Arc<Svid>> {
        self.svids
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .cloned()
    }

    /// Every SVID held, for `/config_dump` and `meshctl identity`.
    pub fn svids(&self) -> Vec<Arc<Svid>> {
        let mut v: Vec<_> = self
            .svids
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect();
        v.sort_by(|a, b| a.identity.cmp(&b.identity));
        v
    }

    /// Identities with a pod here but no SVID yet (for `/ready`).
    pub fn missing(&self) -> Vec<Identity> {
        let workers = self.workers.lock().unwrap_or_else(|p| p.into_inner());
        let svids = self.svids.read().unwrap_or_else(|p| p.into_inner());
        let mut v: Vec<Identity> = workers
            .keys()
            .filter(|id| !svids.contains_key(*id))
            .cloned()
            .collect();
        v.sort();
        v
    }

    pub fn svid_by_server_name(&self, name: &str) -> Option<Arc<CertifiedKey>> {
        self.svids
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .find(|s| s.identity.server_name() == name)
            .map(|s| s.key.clone())
    }

    /// Waits up to `timeout` for an SVID of `id` (a pod's first connection may come before its
    /// first certificate).
    pub async fn wait_for(&self, id: &Identity, timeout: Duration) -> Option<Arc<Svid>> {
        let mut rx = self.stored.subscribe();
        let wait = async {
            loop {
                if let Some(s) = self.svid(id) {
                    return s;
                }
                if rx.changed().await.is_err() {
                    std::future::pending::<()>().await;
                }
            }
        };
        tokio::time::timeout(timeout, wait).await.ok()
    }

    /// Starts the bundle refresher. Call from within the runtime.
    pub fn start(self: &Arc<Self>) {
        let me = self.clone();
        tokio::spawn(async move { me.refresh_bundle().await });
    }

    /// Follows the state: the identities of the workloads this daemon serves get SVIDs, and an
    /// identity whose last pod left loses its own (at once for the current snapshot, then on
    /// every change). Call from within the runtime.
    pub fn follow(self: &Arc<Self>, mut snapshots: watch::Receiver<Arc<crate::state::Snapshot>>) {
        let wanted = |snap: &crate::state::Snapshot, td: &str| -> Vec<Identity> {
            snap.local_workloads().map(|w| w.identity(td)).collect()
        };
        let snap = snapshots.borrow_and_update().clone();
        self.set_wanted(wanted(&snap, &self.trust_domain));
        let me = self.clone();
        tokio::spawn(async move {
            while snapshots.changed().await.is_ok() {
                let snap = snapshots.borrow_and_update().clone();
                me.set_wanted(wanted(&snap, &me.trust_domain));
            }
        });
    }

    /// Fetches and renews this node's own certificate (for the operator listener). Call from
    /// within the runtime; once.
    pub fn want_node_cert(self: &Arc<Self>, node: &str) {
        let me = self.clone();
        let subject = Subject::Node(node.to_string());
        let task = tokio::spawn(async move { me.keep_fresh(subject).await });
        if let Some(old) = self
            .node_worker
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .replace(task.abort_handle())
        {
            old.abort();
        }
    }

    /// Shows each certificate the CA refuses (or cannot be asked for) on `/tap`, as a `refused`
    /// event of reporter `identity` with the identity and the CA's reason.
    pub fn show_refusals_on(&self, tap: crate::tap::Tap) {
        let _ = self.tap.set(tap);
    }

    /// This node's certificate, once issued.
    pub fn node_cert(&self) -> Option<Arc<NodeCert>> {
        self.node_cert
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Identities with a renewal worker (one per identity with a pod here).
    pub fn workers(&self) -> usize {
        self.workers.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// The identities with a pod on this node now: new ones get an SVID, gone ones lose theirs.
    pub fn set_wanted(self: &Arc<Self>, wanted: impl IntoIterator<Item = Identity>) {
        let wanted: std::collections::HashSet<Identity> = wanted.into_iter().collect();
        let mut workers = self.workers.lock().unwrap_or_else(|p| p.into_inner());
        workers.retain(|id, task| {
            let keep = wanted.contains(id);
            if !keep {
                task.abort();
                self.svids
                    .write()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(id);
                let _ = self
                    .metrics
                    .svid_expiry
                    .remove_label_values(&[&id.to_string()]);
                info!(identity = %id, "no pod with this identity left on the node: SVID dropped");
            }
            keep
        });
        for id in wanted {
            if workers.contains_key(&id) {
                continue;
            }
            let me = self.clone();
            let task = tokio::spawn({
                let id = id.clone();
                async move { me.keep_fresh(Subject::Workload(id)).await }
            });
            workers.insert(id, task.abort_handle());
        }
    }

    /// When the certificate held for `subject` now expires.
    fn held(&self, subject: &Subject) -> Option<SystemTime> {
        match subject {
            Subject::Workload(id) => self.svid(id).map(|s| s.not_after),
            Subject::Node(_) => self.node_cert().map(|c| c.not_after),
        }
    }

    fn store(&self, subject: &Subject, uri: String, f: Fetched, renews_at: SystemTime) {
        match subject {
            Subject::Workload(id) => {
                let svid = Svid {
                    identity: id.clone(),
                    key: f.key,
                    not_before: f.not_before,
                    not_after: f.not_after,
                    signer: f.signer,
                    renews_at,
                };
                self.svids
                    .write()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(id.clone(), Arc::new(svid));
            }
            Subject::Node(_) => {
                let cert = NodeCert {
                    uri,
                    key: f.key,
                    not_after: f.not_after,
                    renews_at,
                };
                *self.node_cert.write().unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(cert));
            }
        }
        self.stored.send_modify(|n| *n += 1);
    }

    /// Fetches, then renews a certificate for as long as it is wanted.
    async fn keep_fresh(self: Arc<Self>, subject: Subject) {
        let id = subject.uri(&self.trust_domain);
        let mut signer = self.signer.subscribe();
        let mut backoff = BACKOFF_MIN;
        loop {
            let renewal = self.held(&subject).is_some();
            match self.fetch(&id).await {
                Ok(fetched) => {
                    backoff = BACKOFF_MIN;
                    let expiry = fetched
                        .not_after
                        .duration_since(SystemTime::UNIX_EPOCH)
                        .unwrap_or_default()
                        .as_secs_f64();
                    self.metrics
                        .svid_expiry
                        .with_label_values(&[&id])
                        .set(expiry);
                    self.metrics
                        .svid_fetches
                        .with_label_values(&[if renewal { "renewed" } else { "issued" }])
                        .inc();
                    // Renew at half of the validity left when it arrived; the certificate's
                    // own start is backdated for clock skew and would make short lifetimes
                    // renew at once.
                    let arrived = SystemTime::now();
                    let valid_for = fetched
                        .not_after
                        .duration_since(arrived)
                        .unwrap_or_default();
                    info!(identity = %id, ?valid_for, signer = %fetched.signer, renewal, "SVID in hand");
                    let renew_at = arrived + valid_for / 2;
                    let svid_signer = fetched.signer.clone();
                    self.store(&subject, id.clone(), fetched, renew_at);
                    let wait = renew_at
                        .duration_since(SystemTime::now())
                        .unwrap_or_default();
                    signer.mark_unchanged();
                    let rotated = async {
                        loop {
                            if signer.changed().await.is_err() {
                                std::future::pending::<()>().await;
                            }
                            let now = signer.borrow_and_update().clone();
                            if !now.is_empty() && now != svid_signer {
                                return now;
                            }
                        }
                    };
                    tokio::select! {
                        () = tokio::time::sleep(wait) => {}
                        new = rotated => {
                            info!(identity = %id, signer = %new, "the CA has a new signer: re-issuing");
                        }
                    }
                }
                Err(e) => {
                    self.metrics
                        .svid_fetches
                        .with_label_values(&["failed"])
                        .inc();
                    let reason = e.refusal_label();
                    self.metrics
                        .svid_refusals
                        .with_label_values(&[&id, reason])
                        .inc();
                    if let Some(tap) = self.tap.get() {
                        let ns = match &subject {
                            Subject::Workload(w) => w.namespace.as_str(),
                            Subject::Node(_) => "unknown",
                        };
                        tap.emit(|| {
                            crate::tap::TapEvent::refusal(
                                "identity",
                                ["unknown", ns, &id],
                                format!("CA {}", self.ca.url()),
                                format!(
                                    "ca_{reason}: no certificate for {id} (the current one, if \
                                     any, is kept; retried in {backoff:?}): {e}"
                                ),
                            )
                        });
                    }
                    let remaining = self
                        .held(&subject)
                        .and_then(|t| t.duration_since(SystemTime::now()).ok());
                    warn!(identity = %id, error = %e, retry_in = ?backoff, still_valid_for = ?remaining,
                        "cannot get an SVID from the CA; keeping the current one if any");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                }
            }
        }
    }

    /// One signing request: a fresh P-256 key, a CSR naming `uri`, the CA's answer checked.
    async fn fetch(&self, uri: &str) -> Result<Fetched, ManagerError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
            .map_err(|e| ManagerError::Config(format!("key generation: {e}")))?;
        let mut params = CertificateParams::default();
        params.subject_alt_names = vec![SanType::URI(
            uri.to_string()
                .try_into()
                .map_err(|e| ManagerError::Config(format!("{uri}: {e}")))?,
        )];
        let csr = params
            .serialize_request(&key)
            .and_then(|c| c.pem())
            .map_err(|e| ManagerError::Config(format!("CSR: {e}")))?;
        let body = serde_json::to_string(&SignRequest { csr }).unwrap_or_default();
        let answer = self.call("POST", "/v1/svid", Some(body)).await?;
        let issued: Issued = serde_json::from_slice(&answer)
            .map_err(|e| ManagerError::BadAnswer(format!("not a signing answer: {e}")))?;
        self.install_bundle(issued.bundle.clone(), issued.signer.clone());
        let chain: Vec<CertificateDer<'static>> = issued
            .chain
            .iter()
            .map(|p| CertificateDer::from_pem_slice(p.as_bytes()))
            .collect::<Result<_, _>>()
            .map_err(|e| ManagerError::BadAnswer(format!("chain is not PEM: {e}")))?;
        let leaf = chain
            .first()
            .ok_or_else(|| ManagerError::BadAnswer("empty chain".into()))?;
        let got = super::spiffe_uri(leaf).map_err(|e| ManagerError::BadAnswer(e.to_string()))?;
        if got != uri {
            return Err(ManagerError::BadAnswer(format!(
                "asked for {uri}, the certificate names {got}"
            )));
        }
        let (not_before, not_after) = validity(leaf)?;
        let der = PrivateKeyDer::Pkcs8(key.serialize_der().into());
        let ck = CertifiedKey::from_der(chain, der, &super::provider()).map_err(|e| {
            ManagerError::BadAnswer(format!("certificate and key do not match: {e}"))
        })?;
        Ok(Fetched {
            key: Arc::new(ck),
            not_before,
            not_after,
            signer: issued.signer,
        })
    }

    fn install_bundle(&self, pems: Vec<String>, signer: String) {
        let current = self.bundle();
        if current.pems == pems && current.signer == signer {
            return;
        }
        match Bundle::new(pems, signer.clone()) {
            Ok(b) => {
                if current.pems != b.pems {
                    info!(roots = b.pems.len(), "trust bundle updated");
                }
                *self.bundle.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(b);
                self.signer.send_if_modified(|s| {
                    let changed = *s != signer;
                    *s = signer;
                    changed
                });
            }
            Err(e) => {
                warn!(error = %e, "the CA sent an unusable trust bundle; keeping the current one")
            }
        }
    }

    async fn refresh_bundle(self: Arc<Self>) {
        loop {
            match self.call("GET", "/v1/bundle", None).await {
                Ok(body) => match serde_json::from_slice::<BundleReply>(&body) {
                    Ok(b) => self.install_bundle(b.bundle, b.signer),
                    Err(e) => warn!(error = %e, "the CA's bundle answer is not JSON"),
                },
                Err(e) => {
                    warn!(error = %e, "cannot refresh the trust bundle; keeping the current one")
                }
            }
            tokio::time::sleep(self.refresh).await;
        }
    }

    /// One request to the CA, trusting it with the bundle in force.
    async fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<String>,
    ) -> Result<Bytes, ManagerError> {
        Ok(self.ca.call(&self.bundle(), method, path, body).await?)
    }
}

// === impl CertSource for Manager ===

impl CertSource for Manager {
    fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    fn bundle(&self) -> Arc<Bundle> {
        Manager::bundle(self)
    }

    fn key_for(&self, id: &Identity) -> Option<Arc<CertifiedKey>> {
        self.svid(id).map(|s| s.key.clone())
    }

    fn key_by_server_name(&self, name: &str) -> Option<Arc<CertifiedKey>> {
        self.svid_by_server_name(name)
    }

    fn node_key(&self) -> Option<Arc<CertifiedKey>> {
        self.node_cert().map(|c| c.key.clone())
    }
}

fn validity(der: &[u8]) -> Result<(SystemTime, SystemTime), ManagerError> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| ManagerError::BadAnswer(e.to_string()))?;
    let at = |t: x509_parser::time::ASN1Time| {
        let secs = t.timestamp();
        SystemTime::UNIX_EPOCH + Duration::from_secs(secs.max(0) as u64)
    };
    Ok((
        at(cert.validity().not_before),
        at(cert.validity().not_after),
    ))
}
