//! Inbound: the HBONE listener (:15008) that other nodes' proxies tunnel to, and the last hop to a
//! local pod shared with same-node traffic.
//!
//! A tunnel is accepted only to a meshed pod scheduled on this node: never to the node's own
//! addresses or ports, loopback, or a pod elsewhere (no confused deputy). The proxy connects to
//! the pod from the node's mesh source address, the one source STRICT pods accept.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use bytes::Bytes;
use h2::{RecvStream, server::SendResponse};
use http::{Method, Request, Response, StatusCode};
use tokio::net::{TcpListener, TcpStream};
use tracing::{info, warn};

use super::{Inputs, hbone};
use crate::state::{Snapshot, Workload};

#[derive(Debug, thiserror::Error)]
pub enum InboundError {
    #[error(
        "cannot listen on {addr} for HBONE from other nodes: {source}; free the port, or fix the \
         node's address in the mesh file"
    )]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

pub struct Inbound {
    listener: TcpListener,
    inputs: Arc<Inputs>,
}

impl Inbound {
    pub async fn bind(addr: SocketAddr) -> Result<TcpListener, InboundError> {
        TcpListener::bind(addr)
            .await
            .map_err(|source| InboundError::Bind { addr, source })
    }

    pub fn new(listener: TcpListener, inputs: Arc<Inputs>) -> Self {
        Self { listener, inputs }
    }

    pub async fn run(self) {
        super::accept_loop(self.listener, "hbone", self.inputs, serve_connection).await
    }
}

async fn serve_connection(inputs: Arc<Inputs>, stream: TcpStream, peer: SocketAddr) {
    let _ = stream.set_nodelay(true);
    let handshake = h2::server::Builder::new()
        .initial_window_size(hbone::STREAM_WINDOW)
        .initial_connection_window_size(hbone::CONNECTION_WINDOW)
        .max_concurrent_streams(10_000)
        .handshake::<_, Bytes>(stream);
    let bad_peer = |e: &h2::Error| {
        // Garbage, a TLS hello, or HTTP/1 on the HBONE port: that peer is dropped, everyone else
        // is unaffected.
        warn!(%peer, error = %e, "HBONE connection failed: the peer did not speak HTTP/2 HBONE");
        inputs
            .metrics
            .tcp_failed
            .with_label_values(&["inbound", "hbone_protocol"])
            .inc();
    };
    let mut conn = match tokio::time::timeout(Duration::from_secs(10), handshake).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => return bad_peer(&e),
        Err(_) => {
            warn!(%peer, "HBONE connection closed: no HTTP/2 preface within 10 s");
            return;
        }
    };
    while let Some(next) = conn.accept().await {
        match next {
            Ok((req, respond)) => {
                let inputs = inputs.clone();
                tokio::spawn(async move { tunnel(inputs, req, respond).await });
            }
            Err(e) => {
                if !e.is_go_away() && !e.is_io() {
                    bad_peer(&e);
                }
                break;
            }
        }
    }
}

/// Answers a CONNECT with an error status and the reason, and counts it.
fn refuse(
    inputs: &Inputs,
    mut respond: SendResponse<Bytes>,
    status: StatusCode,
    label: &str,
    reason: String,
) {
    warn!(reason = %reason, "HBONE tunnel refused");
    inputs
        .metrics
        .tcp_failed
        .with_label_values(&["inbound", label])
        .inc();
    let mut r = Response::new(());
    *r.status_mut() = status;
    if let Ok(v) = http::HeaderValue::from_str(&reason) {
        r.headers_mut().insert(hbone::ERROR_HEADER, v);
    }
    let _ = respond.send_response(r, true);
}

/// Handles one CONNECT stream.
async fn tunnel(inputs: Arc<Inputs>, req: Request<RecvStream>, mut respond: SendResponse<Bytes>) {
    if req.method() != Method::CONNECT {
        let reason = format!(
            "{} is not CONNECT; HBONE carries only CONNECT",
            req.method()
        );
        return refuse(
            &inputs,
            respond,
            StatusCode::METHOD_NOT_ALLOWED,
            "hbone_bad_request",
            reason,
        );
    }
    let Some(target) = req
        .uri()
        .authority()
        .and_then(|a| a.as_str().parse::<SocketAddr>().ok())
    else {
        let reason = format!("authority {:?} is not ip:port", req.uri().to_string());
        return refuse(
            &inputs,
            respond,
            StatusCode::BAD_REQUEST,
            "hbone_bad_request",
            reason,
        );
    };
    let snap = inputs.state.snapshot();
    let Some(dst) = local_target(&snap, target) else {
        let reason = format!("{target} is not a meshed pod on this node");
        return refuse(
            &inputs,
            respond,
            StatusCode::FORBIDDEN,
            "not_local_pod",
            reason,
        );
    };
    let source = req
        .headers()
        .get(hbone::SOURCE_HEADER)
        .and_then(|v| v.to_str().ok())
        .and_then(|s| known_workload(&snap, s))
        .unwrap_or_else(|| ("unknown".into(), "unknown".into()));
    let source_ip = mesh_source(&snap);
    // A tunnel may live for hours; it must not pin this snapshot in memory.
    drop(snap);
    let pod = match super::connect_marked(target, inputs.proxy_mark, source_ip).await {
        Ok(s) => s,
        Err(e) => {
            let reason = format!("connect to {target}: {e}");
            return refuse(
                &inputs,
                respond,
                StatusCode::BAD_GATEWAY,
                "upstream_refused",
                reason,
            );
        }
    };
    let send = match respond.send_response(Response::new(()), false) {
        Ok(s) => s,
        Err(e) => {
            warn!(%target, error = %e, "HBONE stream ended before the tunnel opened");
            let _ = pod.set_zero_linger();
            return;
        }
    };
    let labels = [
        "inbound".to_string(),
        source.1,
        source.0,
        dst.name.clone(),
        dst.namespace.clone(),
    ];
    info!(%target, workload = %dst.display(), source = %format!("{}/{}", labels[2], labels[1]), "inbound tunnel");
    inputs.metrics.opened(&labels);
    let tunnel = hbone::Tunnel {
        send,
        recv: req.into_body(),
    };
    // Counted from the source's side: what it sent arrived through the tunnel.
    let r = hbone::relay(pod, tunnel)
        .await
        .map(|(to_src, from_src)| (from_src, to_src));
    inputs.metrics.finished(&labels, &r);
}

/// The meshed pod on this node that `target` names, if any.
pub fn local_target(snap: &Snapshot, target: SocketAddr) -> Option<Arc<Workload>> {
    snap.workloads_by_ip
        .get(&target.ip())
        .filter(|w| snap.is_local(w))
        .cloned()
}

fn known_workload(snap: &Snapshot, s: &str) -> Option<(String, String)> {
    let (ns, name) = s.split_once('/')?;
    snap.workloads_by_id
        .values()
        .find(|w| w.namespace == ns && w.name == name)
        .map(|w| (w.namespace.clone(), w.name.clone()))
}

/// The node's mesh source address: where the proxy connects to local pods from.
pub fn mesh_source(snap: &Snapshot) -> Option<std::net::IpAddr> {
    snap.node
        .as_ref()
        .map(|n| std::net::IpAddr::V4(n.mesh_source))
}
