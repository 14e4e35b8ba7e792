//! Inbound: the HBONE listener (:15008) that other nodes' proxies tunnel to over mutual TLS, and
//! the last hop to a local pod shared with same-node traffic.
//!
//! A connection must complete a TLS 1.3 handshake with a client SVID that chains to the bundle;
//! the source principal is that certificate's SPIFFE ID. A tunnel is then accepted only:
//! - to a meshed pod scheduled on this node: never to the node's own addresses or ports,
//!   loopback, or a pod elsewhere (no confused deputy);
//! - whose identity is the one the client asked for (and got a certificate of);
//! - when the authorization policies allow the source principal on that pod and port.
//!
//! The proxy connects to the pod from the node's mesh source address, the one source STRICT pods
//! accept.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use bytes::Bytes;
use h2::{RecvStream, server::SendResponse};
use http::{Method, Request, Response, StatusCode};
use tokio::net::{TcpListener, TcpStream};
use tracing::{info, warn};

use super::{Inputs, hbone};
use crate::{
    identity::{Identity, tls},
    state::{Snapshot, Workload},
};

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

/// What the handshake proved about one HBONE connection.
struct Peer {
    addr: SocketAddr,
    /// The client certificate's SPIFFE ID.
    source: Identity,
    /// The server name the client asked for: the destination identity it expects.
    server_name: String,
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

async fn serve_connection(inputs: Arc<Inputs>, stream: TcpStream, addr: SocketAddr) {
    let _ = stream.set_nodelay(true);
    let handshake_failed = |label: &str, reason: &dyn std::fmt::Display| {
        // Plaintext, garbage, an untrusted or expired certificate, TLS 1.2: that peer is dropped
        // and counted; everyone else is unaffected.
        warn!(peer = %addr, result = label, error = %reason, "HBONE mTLS handshake refused");
        inputs
            .metrics
            .tls_handshakes
            .with_label_values(&["inbound", label])
            .inc();
    };
    let accept = inputs.tls.accept(stream);
    let tls = match tokio::time::timeout(hbone::HANDSHAKE_TIMEOUT, accept).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return handshake_failed(tls::failure_label(&e), &e),
        Err(_) => return handshake_failed("timeout", &"no TLS handshake within 10 s"),
    };
    let (_, conn) = tls.get_ref();
    let source = conn
        .peer_certificates()
        .and_then(|c| c.first())
        .map(|c| Identity::from_cert(c));
    let (source, server_name) = match (source, conn.server_name()) {
        (Some(Ok(id)), Some(name)) => (id, name.to_string()),
        // The verifier already required both; this is defence in depth, not a path.
        _ => return handshake_failed("bad_identity", &"no client identity or server name"),
    };
    inputs
        .metrics
        .tls_handshakes
        .with_label_values(&["inbound", "ok"])
        .inc();
    info!(peer = %addr, source = %source, "HBONE mTLS connection");
    let peer = Arc::new(Peer {
        addr,
        source,
        server_name,
    });
    let handshake = h2::server::Builder::new()
        .initial_window_size(hbone::STREAM_WINDOW)
        .initial_connection_window_size(hbone::CONNECTION_WINDOW)
        .max_concurrent_streams(10_000)
        .handshake::<_, Bytes>(tls);
    let bad_peer = |e: &h2::Error| {
        warn!(peer = %addr, error = %e, "HBONE connection failed: the peer did not speak HTTP/2 HBONE");
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
            warn!(peer = %addr, "HBONE connection closed: no HTTP/2 preface within 10 s");
            return;
        }
    };
    while let Some(next) = conn.accept().await {
        match next {
            Ok((req, respond)) => {
                let inputs = inputs.clone();
                let peer = peer.clone();
                tokio::spawn(async move { tunnel(inputs, peer, req, respond).await });
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
async fn tunnel(
    inputs: Arc<Inputs>,
    peer: Arc<Peer>,
    req: Request<RecvStream>,
    mut respond: SendResponse<Bytes>,
) {
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
    let td = inputs.identity.trust_domain();
    let dst_id = dst.identity(td);
    if dst_id.server_name() != peer.server_name {
        let reason = format!(
            "{target} is {dst_id}, but the client asked for (and verified) another identity; \
             connect with the destination's own identity"
        );
        return refuse(
            &inputs,
            respond,
            StatusCode::FORBIDDEN,
            "identity_mismatch",
            reason,
        );
    }
    let verdict = inputs.authorize(&snap, &peer.source, &dst, target.port());
    if !verdict.allowed() {
        let reason = format!(
            "{} may not connect to {}:{} (policy {})",
            peer.source,
            dst.display(),
            target.port(),
            verdict.policy()
        );
        return refuse(&inputs, respond, StatusCode::FORBIDDEN, "denied", reason);
    }
    // The workload name is a claim; it is believed only when it names a workload with exactly
    // the identity the certificate proved.
    let source_name = req
        .headers()
        .get(hbone::SOURCE_HEADER)
        .and_then(|v| v.to_str().ok())
        .and_then(|s| known_workload(&snap, s, &peer.source, td))
        .unwrap_or_else(|| "unknown".into());
    let source_ip = snap.mesh_source();
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
        source_name,
        peer.source.namespace.clone(),
        peer.source.to_string(),
        dst.name.clone(),
        dst.namespace.clone(),
        dst_id.to_string(),
    ];
    info!(peer = %peer.addr, %target, workload = %dst.display(), source_principal = %peer.source, source_workload = %labels[1], policy = verdict.policy(), "inbound tunnel");
    inputs.metrics.opened(&labels);
    let hop = |bytes, reason| super::Hop {
        destination: target,
        route: "inbound",
        bytes,
        reason,
    };
    inputs.tap("open", &labels, hop(None, None));
    let tunnel = hbone::Tunnel {
        send,
        recv: req.into_body(),
    };
    // Counted from the source's side: what it sent arrived through the tunnel.
    let r = hbone::relay(pod, tunnel)
        .await
        .map(|(to_src, from_src)| (from_src, to_src));
    inputs.metrics.finished(&labels, &r);
    let err = r.as_ref().err().map(ToString::to_string);
    inputs.tap(
        "close",
        &labels,
        hop(r.as_ref().ok().copied(), err.as_deref()),
    );
}

/// The meshed pod on this node that `target` names, if any.
pub fn local_target(snap: &Snapshot, target: SocketAddr) -> Option<Arc<Workload>> {
    snap.workloads_by_ip
        .get(&target.ip())
        .filter(|w| snap.is_local(w))
        .cloned()
}

fn known_workload(snap: &Snapshot, s: &str, proven: &Identity, td: &str) -> Option<String> {
    let (ns, name) = s.split_once('/')?;
    snap.workloads_by_id
        .values()
        .find(|w| w.namespace == ns && w.name == name && w.identity(td) == *proven)
        .map(|w| w.name.clone())
}
