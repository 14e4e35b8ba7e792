//! HBONE, the node-to-node transport: one HTTP/2 connection per destination node carries many
//! `CONNECT` streams, each a tunnelled TCP connection to `:authority` = the target pod's
//! `ip:port`. The mTLS issue wraps these connections in TLS with workload identities (and keys
//! the pool by source identity as well); until then they are plaintext between nodes.
//!
//! A tunnel mirrors TCP: a half-close is END_STREAM, and a reset is RST_STREAM(CONNECT_ERROR)
//! (RFC 9113 §8.5), turned back into a TCP reset on the other side.

use std::{collections::HashMap, future::poll_fn, net::SocketAddr, sync::Mutex};

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

/// The HBONE port on every node.
pub const PORT: u16 = 15008;
/// Header naming the source workload (`namespace/name`). Plaintext HBONE cannot prove it, so the
/// destination uses it only for metric labels, and only when it names a known workload; the mTLS
/// work replaces it with the client certificate's identity.
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
            HboneError::Http { .. } => "hbone_protocol",
            HboneError::Refused { status, .. } if *status == StatusCode::BAD_GATEWAY => {
                "upstream_refused"
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

/// Pooled HTTP/2 connections to other nodes' HBONE listeners.
pub struct Client {
    mark: u32,
    pool: Mutex<HashMap<SocketAddr, SendRequest<Bytes>>>,
}

impl Client {
    pub fn new(mark: u32) -> Self {
        Self {
            mark,
            pool: Mutex::default(),
        }
    }

    /// Opens a tunnel to `target` through `node`'s HBONE listener.
    pub async fn connect(
        &self,
        node: SocketAddr,
        target: SocketAddr,
        source: &str,
    ) -> Result<Tunnel, HboneError> {
        // A pooled connection may have died since its last use; one fresh attempt follows.
        for fresh in [false, true] {
            let sender = self.sender(node, fresh).await?;
            let req = Request::builder()
                .method(Method::CONNECT)
                .uri(target.to_string())
                .header(SOURCE_HEADER, source)
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
                    self.forget(node);
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

    fn forget(&self, node: SocketAddr) {
        self.pool
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&node);
    }

    async fn sender(
        &self,
        node: SocketAddr,
        fresh: bool,
    ) -> Result<SendRequest<Bytes>, HboneError> {
        if !fresh
            && let Some(s) = self
                .pool
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(&node)
        {
            return Ok(s.clone());
        }
        let tcp = super::connect_marked(node, self.mark, None)
            .await
            .map_err(|source| HboneError::Connect { node, source })?;
        let (sender, conn) = h2::client::Builder::new()
            .initial_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .handshake::<_, Bytes>(tcp)
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
            .insert(node, sender.clone());
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
