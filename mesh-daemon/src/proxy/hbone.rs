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
    collections::HashMap,
    future::poll_fn,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use bytes::{Bytes, BytesMut};
use h2::{Reason, RecvStream, SendStream, client::SendRequest};
use http::{Method, Request, StatusCode};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{
        TcpStream,
        tcp::{ReadHalf, WriteHalf},
    },
};
use tracing::{debug, warn};

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
/// Header naming the source workload (`namespace/name`). The client certificate proves only the
/// identity (namespace + service account), so the destination uses this for its workload label,
/// and only when it names a known workload with exactly the proven identity.
pub const SOURCE_HEADER: &str = "x-nodemesh-source-workload";
/// Header carrying the destination proxy's reason for a refused CONNECT.
pub const ERROR_HEADER: &str = "x-nodemesh-error";
/// Flow-control windows: HTTP/2's 64 KiB default would cap a tunnel's throughput far below TCP's.
pub const STREAM_WINDOW: u32 = 4 << 20;
pub const CONNECTION_WINDOW: u32 = 16 << 20;
/// Read size from the pod socket (one DATA frame sequence per read).
const CHUNK: usize = 64 << 10;

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

/// One open tunnel: the two halves of a CONNECT stream.
pub struct Tunnel {
    pub send: SendStream<Bytes>,
    pub recv: RecvStream,
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

/// A pooled connection and the source SVID it was opened with.
type Pooled = (SendRequest<Bytes>, Arc<Svid>);

/// Pooled mTLS HTTP/2 connections to other nodes' HBONE listeners.
pub struct Client {
    mark: u32,
    identity: Arc<Manager>,
    metrics: Arc<Metrics>,
    /// Each connection with the source SVID it was opened under: after a renewal (or a root
    /// rotation) new streams get a new connection, so every new tunnel is authenticated with
    /// current certificates; streams already open finish on the old one.
    pool: Mutex<HashMap<PoolKey, Pooled>>,
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
}

impl Client {
    pub fn new(mark: u32, identity: Arc<Manager>, metrics: Arc<Metrics>) -> Self {
        Self {
            mark,
            identity,
            metrics,
            pool: Mutex::default(),
            configs: Mutex::default(),
        }
    }

    /// Opens a tunnel to `target` through `node`'s HBONE listener.
    pub async fn connect(
        &self,
        node: SocketAddr,
        target: SocketAddr,
        ends: Ends<'_>,
    ) -> Result<Tunnel, HboneError> {
        let key = PoolKey {
            source: ends.source.clone(),
            destination: ends.destination.clone(),
            node,
        };
        // A pooled connection may have died since its last use; one fresh attempt follows.
        for fresh in [false, true] {
            let sender = self.sender(&key, fresh).await?;
            let req = Request::builder()
                .method(Method::CONNECT)
                .uri(target.to_string())
                .header(SOURCE_HEADER, ends.source_workload)
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
                    self.forget(&key);
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
            return Ok(Tunnel {
                send,
                recv: resp.into_body(),
            });
        }
        unreachable!("the loop returns on its second pass")
    }

    fn forget(&self, key: &PoolKey) {
        self.pool
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(key);
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

    async fn sender(&self, key: &PoolKey, fresh: bool) -> Result<SendRequest<Bytes>, HboneError> {
        let node = key.node;
        let svid = self
            .identity
            .svid(&key.source)
            .ok_or_else(|| HboneError::Tls {
                node,
                label: "no_certificate",
                source: std::io::Error::other(format!("no SVID for {}", key.source)),
            })?;
        if !fresh
            && let Some((s, opened_with)) =
                self.pool.lock().unwrap_or_else(|p| p.into_inner()).get(key)
            && Arc::ptr_eq(opened_with, &svid)
        {
            return Ok(s.clone());
        }
        let tcp = super::connect_marked(node, self.mark, None)
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
        self.pool
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key.clone(), (sender.clone(), svid));
        Ok(sender)
    }
}

fn h2_io(e: h2::Error) -> std::io::Error {
    if e.is_io() {
        e.into_io()
            .unwrap_or_else(|| std::io::Error::other("HTTP/2 I/O error"))
    } else {
        std::io::Error::new(std::io::ErrorKind::ConnectionReset, e)
    }
}

/// Pod socket → tunnel. EOF becomes END_STREAM; a read error (the pod reset) becomes
/// RST_STREAM(CONNECT_ERROR).
async fn tcp_to_tunnel(mut r: ReadHalf<'_>, mut send: SendStream<Bytes>) -> std::io::Result<u64> {
    let mut buf = BytesMut::with_capacity(CHUNK);
    let mut total = 0u64;
    loop {
        buf.reserve(CHUNK);
        let n = match r.read_buf(&mut buf).await {
            Ok(n) => n,
            Err(e) => {
                send.send_reset(Reason::CONNECT_ERROR);
                return Err(e);
            }
        };
        if n == 0 {
            send.send_data(Bytes::new(), true).map_err(h2_io)?;
            return Ok(total);
        }
        total += n as u64;
        let mut data = buf.split().freeze();
        while !data.is_empty() {
            send.reserve_capacity(data.len());
            let cap = match poll_fn(|cx| send.poll_capacity(cx)).await {
                Some(Ok(c)) => c,
                Some(Err(e)) => return Err(h2_io(e)),
                None => return Err(std::io::ErrorKind::BrokenPipe.into()),
            };
            if cap == 0 {
                continue;
            }
            let chunk = data.split_to(cap.min(data.len()));
            send.send_data(chunk, false).map_err(h2_io)?;
        }
    }
}

/// Tunnel → pod socket. END_STREAM becomes a half-close; a reset of the stream is an error, on
/// which the caller resets the pod's connection.
async fn tunnel_to_tcp(mut recv: RecvStream, mut w: WriteHalf<'_>) -> std::io::Result<u64> {
    let mut total = 0u64;
    while let Some(chunk) = recv.data().await {
        let chunk = chunk.map_err(h2_io)?;
        let _ = recv.flow_control().release_capacity(chunk.len());
        w.write_all(&chunk).await?;
        total += chunk.len() as u64;
    }
    w.shutdown().await?;
    Ok(total)
}

/// Relays between a pod-side TCP connection and a tunnel until both directions end. Returns
/// (bytes pod→tunnel, bytes tunnel→pod). On an error in either direction the other is abandoned:
/// the stream is reset (dropping an open stream sends RST_STREAM) and the pod's connection is
/// reset (SO_LINGER 0 before close).
pub async fn relay(mut pod: TcpStream, tunnel: Tunnel) -> std::io::Result<(u64, u64)> {
    // Borrowed halves: unlike owned ones they send no FIN when dropped, so an abort below reaches
    // the pod as a reset and not as a clean end followed by one.
    let result = {
        let (r, w) = pod.split();
        let up = tcp_to_tunnel(r, tunnel.send);
        let down = tunnel_to_tcp(tunnel.recv, w);
        tokio::pin!(up, down);
        let (mut a, mut b) = (None, None);
        loop {
            if let (Some(a), Some(b)) = (a, b) {
                break Ok((a, b));
            }
            tokio::select! {
                res = &mut up, if a.is_none() => match res {
                    Ok(n) => a = Some(n),
                    Err(e) => break Err(e),
                },
                res = &mut down, if b.is_none() => match res {
                    Ok(n) => b = Some(n),
                    Err(e) => break Err(e),
                },
            }
        }
    };
    if result.is_err() {
        let _ = pod.set_zero_linger();
    }
    result
}
