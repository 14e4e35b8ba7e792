//! HBONE, the node-to-node transport: one HTTP/2 connection per destination node carries many
//! `CONNECT` streams, each a tunnelled TCP connection to `:authority` = the target pod's
//! `ip:port`. The mTLS issue wraps these connections in TLS with workload identities (and keys
//! the pool by source identity as well); until then they are plaintext between nodes.

use std::{collections::HashMap, net::SocketAddr, sync::Mutex, time::Duration};

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::Empty;
use hyper::{client::conn::http2::SendRequest, upgrade::Upgraded};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tracing::{debug, warn};

/// The HBONE port on every node.
pub const PORT: u16 = 15008;
/// Header naming the source workload (`namespace/name`). Plaintext HBONE cannot prove it, so the
/// destination uses it only for metric labels, and only when it names a known workload; the mTLS
/// work replaces it with the client certificate's identity.
pub const SOURCE_HEADER: &str = "x-nodemesh-source-workload";
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
    #[error("HTTP/2 with node {node} failed: {source}")]
    Http {
        node: SocketAddr,
        source: hyper::Error,
    },
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

/// Header carrying the destination proxy's reason for a refused CONNECT.
pub const ERROR_HEADER: &str = "x-nodemesh-error";

/// Pooled HTTP/2 connections to other nodes' HBONE listeners.
pub struct Client {
    mark: u32,
    pool: Mutex<HashMap<SocketAddr, SendRequest<Empty<Bytes>>>>,
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
    ) -> Result<TokioIo<Upgraded>, HboneError> {
        // A pooled connection may have died since its last use; one fresh attempt follows.
        for fresh in [false, true] {
            let mut sender = self.sender(node, fresh).await?;
            let req = Request::builder()
                .method(Method::CONNECT)
                .uri(target.to_string())
                .header(SOURCE_HEADER, source)
                .body(Empty::<Bytes>::new())
                .expect("a CONNECT request to a socket address is valid");
            let resp = match sender.ready().await {
                Ok(()) => sender.send_request(req).await,
                Err(e) => Err(e),
            };
            let mut resp = match resp {
                Ok(r) => r,
                Err(e) if !fresh => {
                    debug!(%node, error = %e, "pooled HBONE connection failed; reconnecting");
                    self.forget(node);
                    continue;
                }
                Err(source) => return Err(HboneError::Http { node, source }),
            };
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
            return hyper::upgrade::on(&mut resp)
                .await
                .map(TokioIo::new)
                .map_err(|source| HboneError::Http { node, source });
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
    ) -> Result<SendRequest<Empty<Bytes>>, HboneError> {
        if !fresh {
            let pool = self.pool.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(s) = pool.get(&node).filter(|s| !s.is_closed()) {
                return Ok(s.clone());
            }
        }
        let tcp = super::connect_marked(node, self.mark, None)
            .await
            .map_err(|source| HboneError::Connect { node, source })?;
        let (sender, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .initial_stream_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .timer(TokioTimer::new())
            .keep_alive_interval(Duration::from_secs(30))
            .handshake(TokioIo::new(tcp))
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
