//! HBONE, the node-to-node transport: HTTP/2 over mutual TLS 1.3, where each `CONNECT` stream is
//! a tunnelled TCP connection to `:authority` = the target pod's `ip:port`.
//!
//! The client presents the source workload's SVID and asks for the destination workload's (see
//! [`crate::identity::tls`]), so connections are pooled per (source identity, destination
//! identity, destination node): the source/destination node pair of DESIGN.md plus the
//! destination identity, because the server presents one workload's certificate per connection.
//! There is no plaintext mode.
//!
//! A tunnel mirrors TCP: a half-close is END_STREAM, and a reset is RST_STREAM(CONNECT_ERROR)
//! (RFC 9113 §8.5), turned back into a TCP reset on the other side.

use std::{
    collections::{HashMap, HashSet},
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use bytes::Bytes;
use h2::client::SendRequest;
use http::{Method, Request, StatusCode};
use tracing::{debug, warn};

use super::h2::H2Stream;
use crate::{
    identity::{
        Identity,
        manager::{Manager, Svid},
        tls,
    },
    metrics::Metrics,
};

/// The HBONE port of every proxy (a node's, or a sidecar's in its pod).
pub const PORT: u16 = crate::state::HBONE_PORT;
pub use super::route::SOURCE_HEADER;
/// How long a connection (or an L7 endpoint connection) waits for its source workload's first
/// SVID before it is refused: a pod's first connection may arrive before its certificate.
pub const SVID_WAIT: std::time::Duration = std::time::Duration::from_secs(5);
/// Header carrying the proxy's reason for a refusal: a refused CONNECT, or a request L7 answered
/// itself.
pub const ERROR_HEADER: &str = "x-nodemesh-error";
/// Flow-control windows: HTTP/2's 64 KiB default would cap a tunnel's throughput far below TCP's.
pub const STREAM_WINDOW: u32 = 4 << 20;
pub const CONNECTION_WINDOW: u32 = 16 << 20;

#[derive(Debug, thiserror::Error)]
pub enum HboneError {
    #[error("cannot reach node {node}: {source}")]
    Connect {
        node: SocketAddr,
        source: std::io::Error,
    },
    #[error("mTLS handshake with node {node} failed ({label}): {source}")]
    Tls {
        node: SocketAddr,
        label: &'static str,
        source: std::io::Error,
    },
    #[error("HTTP/2 with node {node} failed: {source}")]
    Http { node: SocketAddr, source: h2::Error },
    /// The destination proxy answered the CONNECT with an error status (target refused, not a
    /// local pod, ...); the reason is its `x-nodemesh-error` header.
    #[error("node {node} refused the tunnel to {target}: {status} {reason}")]
    Refused {
        node: SocketAddr,
        target: SocketAddr,
        status: StatusCode,
        reason: String,
    },
}

impl HboneError {
    /// Bounded reason label for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            HboneError::Connect { .. } => "node_unreachable",
            HboneError::Tls { .. } => "tls_handshake_failed",
            HboneError::Http { .. } => "hbone_protocol",
            HboneError::Refused { status, .. } if *status == StatusCode::BAD_GATEWAY => {
                "upstream_refused"
            }
            HboneError::Refused { status, .. } if *status == StatusCode::FORBIDDEN => {
                "hbone_forbidden"
            }
            HboneError::Refused { .. } => "hbone_refused",
        }
    }
}

/// How long a TLS handshake with another node may take.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Who a pooled connection speaks for and to.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct PoolKey {
    source: Identity,
    destination: Identity,
    node: SocketAddr,
}

/// A pooled connection, the source SVID it was opened with, and a generation number (so a
/// caller whose stream failed on it can tell whether someone already replaced it).
struct Pooled {
    sender: SendRequest<Bytes>,
    svid: Arc<Svid>,
    generation: u64,
}

/// A failed attempt to open a connection, kept so that the callers who waited for that attempt
/// share its outcome instead of each trying again in turn.
struct Failure {
    at: Instant,
    kind: FailKind,
    message: String,
}

#[derive(Clone, Copy)]
enum FailKind {
    Connect(std::io::ErrorKind),
    Tls(&'static str),
    Http,
}

impl Failure {
    fn of(e: &HboneError) -> Self {
        let kind = match e {
            HboneError::Connect { source, .. } => FailKind::Connect(source.kind()),
            HboneError::Tls { label, .. } => FailKind::Tls(label),
            _ => FailKind::Http,
        };
        Self {
            at: Instant::now(),
            kind,
            message: e.to_string(),
        }
    }

    /// The same failure, for a caller that waited for the attempt.
    fn error(&self, node: SocketAddr) -> HboneError {
        let source = |k| std::io::Error::new(k, self.message.clone());
        match self.kind {
            FailKind::Connect(k) => HboneError::Connect {
                node,
                source: source(k),
            },
            FailKind::Tls(label) => HboneError::Tls {
                node,
                label,
                source: source(std::io::ErrorKind::Other),
            },
            FailKind::Http => HboneError::Connect {
                node,
                source: source(std::io::ErrorKind::ConnectionAborted),
            },
        }
    }
}

/// One pool entry: the connection, or how the last attempt to open one failed.
#[derive(Default)]
struct SlotState {
    pooled: Option<Pooled>,
    failure: Option<Failure>,
}

/// One pool entry behind an async lock, which makes opening a connection single-flight:
/// concurrent first connections to a peer wait for one TLS handshake instead of each doing their
/// own, and share its failure when it fails (a peer that does not answer costs them one connect
/// timeout together, not one each in turn).
type Slot = Arc<tokio::sync::Mutex<SlotState>>;

/// Pooled mTLS HTTP/2 connections to other nodes' HBONE listeners.
pub struct Client {
    mark: u32,
    identity: Arc<Manager>,
    metrics: Arc<Metrics>,
    /// Each connection with the source SVID it was opened under: after a renewal (or a root
    /// rotation) new streams get a new connection, so every new tunnel is authenticated with
    /// current certificates; streams already open finish on the old one.
    pool: Mutex<HashMap<PoolKey, Slot>>,
    /// Generation numbers for pooled connections.
    opened: std::sync::atomic::AtomicU64,
    /// One client configuration per source identity (its certificate resolver follows renewals).
    configs: Mutex<HashMap<Identity, Arc<rustls::ClientConfig>>>,
}

/// The two ends of a tunnel, as the client knows them.
pub struct Ends<'a> {
    /// The source workload's identity (what the kernel attributed the connection to).
    pub source: &'a Identity,
    /// `namespace/name` of the source workload, for the destination's labels.
    pub source_workload: &'a str,
    /// The identity the destination pod must prove.
    pub destination: &'a Identity,
    /// `http1` or `h2` when the tunnel carries L7 requests (`x-nodemesh-protocol`); None: bytes.
    pub protocol: Option<&'static str>,
    /// The client pod's address (`forwarded: for=`; port 0 when there is no one client
    /// connection), for the destination's HTTP requests and PROXY protocol headers.
    pub client: Option<std::net::SocketAddr>,
}

impl Client {
    pub fn new(mark: u32, identity: Arc<Manager>, metrics: Arc<Metrics>) -> Self {
        Self {
            mark,
            identity,
            metrics,
            pool: Mutex::default(),
            opened: std::sync::atomic::AtomicU64::new(0),
            configs: Mutex::default(),
        }
    }

    /// Opens a tunnel to `target` through `node`'s HBONE listener.
    pub async fn connect(
        &self,
        node: SocketAddr,
        target: SocketAddr,
        ends: Ends<'_>,
    ) -> Result<H2Stream, HboneError> {
        let key = PoolKey {
            source: ends.source.clone(),
            destination: ends.destination.clone(),
            node,
        };
        // A pooled connection may have died since its last use; one fresh attempt follows.
        let mut failed = None;
        for fresh in [false, true] {
            let (sender, generation) = self.sender(&key, failed).await?;
            let mut req = Request::builder()
                .method(Method::CONNECT)
                .uri(target.to_string())
                .header(SOURCE_HEADER, ends.source_workload);
            if let Some(p) = ends.protocol {
                req = req.header(super::route::PROTOCOL_HEADER, p);
            }
            if let Some(addr) = ends.client {
                req = req.header(
                    super::route::FORWARDED_HEADER,
                    super::route::forwarded_value(addr),
                );
            }
            let req = req
                .body(())
                .expect("a CONNECT request to a socket address is valid");
            let sent = match sender.ready().await {
                Ok(mut s) => s.send_request(req, false),
                Err(e) => Err(e),
            };
            let (resp, send) = match sent {
                Ok(x) => x,
                Err(e) if !fresh => {
                    debug!(%node, error = %e, "pooled HBONE connection failed; reconnecting");
                    failed = Some(generation);
                    continue;
                }
                Err(source) => return Err(HboneError::Http { node, source }),
            };
            let resp = resp
                .await
                .map_err(|source| HboneError::Http { node, source })?;
            if resp.status() != StatusCode::OK {
                let reason = resp
                    .headers()
                    .get(ERROR_HEADER)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("")
                    .to_string();
                return Err(HboneError::Refused {
                    node,
                    target,
                    status: resp.status(),
                    reason,
                });
            }
            return Ok(H2Stream::new(send, resp.into_body()));
        }
        unreachable!("the loop returns on its second pass")
    }

    /// Drops every pooled connection (the drain): each closes once its last stream ends, and no
    /// new stream is opened on it.
    pub fn close_all(&self) {
        self.pool.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }

    fn config(&self, source: &Identity) -> Result<Arc<rustls::ClientConfig>, rustls::Error> {
        let mut configs = self.configs.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = configs.get(source) {
            return Ok(c.clone());
        }
        let c = tls::client_config(self.identity.clone(), source.clone())?;
        configs.insert(source.clone(), c.clone());
        Ok(c)
    }

    /// A connection for `key`: the pooled one, unless it was opened under an older SVID or is
    /// the one whose stream just failed (`failed`); otherwise a new one, opened once however many
    /// callers ask at the same time.
    async fn sender(
        &self,
        key: &PoolKey,
        failed: Option<u64>,
    ) -> Result<(SendRequest<Bytes>, u64), HboneError> {
        let node = key.node;
        let svid = self
            .identity
            .svid(&key.source)
            .ok_or_else(|| HboneError::Tls {
                node,
                label: "no_certificate",
                source: std::io::Error::other(format!("no SVID for {}", key.source)),
            })?;
        let slot: Slot = self
            .pool
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(key.clone())
            .or_default()
            .clone();
        let waiting_since = Instant::now();
        let mut state = slot.lock().await;
        if let Some(p) = state.pooled.as_ref()
            && Arc::ptr_eq(&p.svid, &svid)
            && Some(p.generation) != failed
        {
            return Ok((p.sender.clone(), p.generation));
        }
        if let Some(f) = &state.failure
            && f.at >= waiting_since
        {
            // The attempt this caller waited for failed: the same answer, at once.
            return Err(f.error(node));
        }
        let sender = match self.open(key).await {
            Ok(s) => s,
            Err(e) => {
                state.failure = Some(Failure::of(&e));
                // Nothing pooled under this key: drop the empty slot, so peers that never
                // answer leave no entry behind.
                if state.pooled.is_none() {
                    drop(state);
                    self.forget_empty(key, &slot);
                }
                return Err(e);
            }
        };
        let generation = self
            .opened
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        state.failure = None;
        state.pooled = Some(Pooled {
            sender: sender.clone(),
            svid,
            generation,
        });
        Ok((sender, generation))
    }

    /// Opens one mTLS HTTP/2 connection for `key` (TCP, TLS 1.3 with the source's SVID, h2).
    async fn open(&self, key: &PoolKey) -> Result<SendRequest<Bytes>, HboneError> {
        let node = key.node;
        let tcp = crate::socket::connect_marked(node, self.mark, None)
            .await
            .map_err(|source| HboneError::Connect { node, source })?;
        let tls_err = |label: &'static str, source: std::io::Error| HboneError::Tls {
            node,
            label,
            source,
        };
        let config = self
            .config(&key.source)
            .map_err(|e| tls_err("error", std::io::Error::other(e)))?;
        let server_name = rustls::pki_types::ServerName::try_from(key.destination.server_name())
            .map_err(|e| tls_err("error", std::io::Error::other(e)))?;
        let handshake = tokio_rustls::TlsConnector::from(config).connect(server_name, tcp);
        let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                let label = tls::failure_label(&e);
                self.metrics
                    .tls_handshakes
                    .with_label_values(&["outbound", label])
                    .inc();
                return Err(tls_err(label, e));
            }
            Err(_) => {
                self.metrics
                    .tls_handshakes
                    .with_label_values(&["outbound", "timeout"])
                    .inc();
                return Err(tls_err("timeout", std::io::ErrorKind::TimedOut.into()));
            }
        };
        self.metrics
            .tls_handshakes
            .with_label_values(&["outbound", "ok"])
            .inc();
        let (sender, conn) = h2::client::Builder::new()
            .initial_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .handshake::<_, Bytes>(tls)
            .await
            .map_err(|source| HboneError::Http { node, source })?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                warn!(%node, error = %e, "HBONE connection to node ended with an error");
            }
        });
        Ok(sender)
    }

    /// Removes `key`'s slot if it is still `slot` and still empty.
    fn forget_empty(&self, key: &PoolKey, slot: &Slot) {
        let mut pool = self.pool.lock().unwrap_or_else(|p| p.into_inner());
        if pool
            .get(key)
            .is_some_and(|s| Arc::ptr_eq(s, slot) && s.try_lock().is_ok_and(|g| g.pooled.is_none()))
        {
            pool.remove(key);
        }
    }

    /// Forgets pooled connections and client configurations the mesh no longer needs: a source
    /// identity with no pod here, a destination identity with no workload, a peer proxy that
    /// serves nobody. Streams open on a dropped connection finish on it.
    pub fn retain(
        &self,
        sources: &HashSet<Identity>,
        destinations: &HashSet<Identity>,
        proxies: &HashSet<SocketAddr>,
    ) {
        self.pool
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|k, _| {
                sources.contains(&k.source)
                    && destinations.contains(&k.destination)
                    && proxies.contains(&k.node)
            });
        self.configs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|id, _| sources.contains(id));
    }

    /// Client configurations held (one per source identity that opened a tunnel).
    pub fn configs(&self) -> usize {
        self.configs.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Pooled connections (for the state-size gauges and the churn test).
    pub fn pooled(&self) -> usize {
        self.pool.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}
