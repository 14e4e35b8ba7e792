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
use http::{Request, Response, StatusCode};
use tokio::net::{TcpListener, TcpStream};
use tracing::{info, warn};

use super::{Inputs, h2::H2Stream, hbone, relay::relay, route};
use crate::identity::{Identity, tls};

#[derive(Debug, thiserror::Error)]
pub enum InboundError {
    #[error("cannot listen on {addr} for HBONE from other nodes: {source}; {advice}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
        advice: String,
    },
}

pub struct Inbound {
    listener: TcpListener,
    inputs: Arc<Inputs>,
}

/// What the handshake proved about one HBONE connection, and where it came from.
struct Peer {
    addr: SocketAddr,
    ids: route::Peer,
}

impl Inbound {
    pub async fn bind(addr: SocketAddr) -> Result<TcpListener, InboundError> {
        crate::socket::listen(addr).map_err(|source| InboundError::Bind {
            addr,
            advice: crate::socket::bind_advice(
                addr,
                &source,
                "--hbone (or fix the node's address in the mesh file)",
            ),
            source,
        })
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
    // One deadline for the TLS handshake and the HTTP/2 preface: a peer that opens and never
    // speaks (or speaks a byte at a time) holds its socket for at most this long.
    let deadline = tokio::time::Instant::now() + inputs.handshake_timeout;
    let accept = inputs.tls.accept(stream);
    let tls = match tokio::time::timeout_at(deadline, accept).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return handshake_failed(tls::failure_label(&e), &e),
        Err(_) => {
            return handshake_failed(
                "timeout",
                &format!(
                    "no TLS handshake within {:?} (--handshake-timeout)",
                    inputs.handshake_timeout
                ),
            );
        }
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
        ids: route::Peer {
            source,
            server_name,
        },
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
    let mut conn = match tokio::time::timeout_at(deadline, handshake).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => return bad_peer(&e),
        Err(_) => {
            warn!(
                peer = %addr,
                timeout = ?inputs.handshake_timeout,
                "HBONE connection closed: no HTTP/2 preface within --handshake-timeout"
            );
            inputs
                .metrics
                .tcp_failed
                .with_label_values(&["inbound", "hbone_protocol"])
                .inc();
            return;
        }
    };
    // On drain: GOAWAY (the peer opens no new streams here), streams in flight carry on, and the
    // connection ends with its last stream; at the deadline it ends regardless.
    let mut goaway_sent = false;
    // Tunnels of this connection still running: once GOAWAY is out and none is left, the
    // connection ends without waiting for the peer to acknowledge (a dead peer never would).
    let active = Arc::new(());
    loop {
        let next = tokio::select! {
            biased;
            () = inputs.drain.deadline() => break,
            () = inputs.drain.draining(), if !goaway_sent => {
                conn.graceful_shutdown();
                goaway_sent = true;
                continue;
            }
            () = tokio::time::sleep(Duration::from_millis(200)), if goaway_sent => {
                if Arc::strong_count(&active) == 1 {
                    break;
                }
                continue;
            }
            next = conn.accept() => next,
        };
        let Some(next) = next else { break };
        match next {
            Ok((req, respond)) => {
                let inputs = inputs.clone();
                let peer = peer.clone();
                let drain = inputs.drain.clone();
                let running = active.clone();
                drain.spawn(async move {
                    tunnel(inputs, peer, req, respond).await;
                    drop(running);
                });
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
    let snap = inputs.state.snapshot();
    let td = inputs.identity.trust_domain();
    let admitted = route::admit(&snap, td, &peer.ids, req.method(), req.uri(), req.headers());
    inputs.count_verdict(
        admitted
            .as_ref()
            .map_or_else(|r| r.verdict.as_ref(), |t| Some(&t.verdict)),
    );
    let route::Tunnel {
        target,
        dst,
        dst_id,
        source_workload: source_name,
        verdict,
    } = match admitted {
        Ok(t) => t,
        Err(r) => return refuse(&inputs, respond, r.status, r.reason, r.detail),
    };
    let source_ip = snap.mesh_source();
    // A tunnel may live for hours; it must not pin this snapshot in memory.
    drop(snap);
    let pod = match crate::socket::connect_marked(target, inputs.proxy_mark, source_ip).await {
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
        peer.ids.source.namespace.clone(),
        peer.ids.source.to_string(),
        dst.name.clone(),
        dst.namespace.clone(),
        dst_id.to_string(),
    ];
    info!(peer = %peer.addr, %target, workload = %dst.display(), source_principal = %peer.ids.source, source_workload = %labels[1], policy = verdict.policy(), "inbound tunnel");
    inputs.metrics.opened(&labels);
    let hop = |bytes, reason| super::Hop {
        destination: target,
        route: "inbound",
        bytes,
        reason,
    };
    inputs.tap("open", &labels, hop(None, None));
    // A tunnel of requests from a source proxy's L7: served as HTTP, each request checked.
    let protocol = match req
        .headers()
        .get(route::PROTOCOL_HEADER)
        .map(|v| v.as_bytes())
    {
        Some(b"http1") => Some(super::detect::Protocol::Http1),
        Some(b"h2") => Some(super::detect::Protocol::Http2),
        _ => None,
    };
    let mut tunnel = H2Stream::new(send, req.into_body());
    if let Some(protocol) = protocol {
        let t = super::http::Tunnel {
            source_id: peer.ids.source.clone(),
            source_workload: labels[1].clone(),
            dst: dst.clone(),
            target,
            protocol,
        };
        super::http::serve_inbound(inputs.clone(), tunnel, pod, t).await;
        inputs.metrics.finished(&labels, &Ok((0, 0)));
        inputs.tap("close", &labels, hop(None, None));
        return;
    }
    let mut pod = pod;
    // Counted from the source's side: what it sent arrived through the tunnel.
    let r = relay(&mut pod, &mut tunnel, inputs.drain.deadline())
        .await
        .map(|(to_src, from_src)| (from_src, to_src));
    inputs.count_drained(&r);
    inputs.metrics.finished(&labels, &r);
    let err = r.as_ref().err().map(ToString::to_string);
    inputs.tap(
        "close",
        &labels,
        hop(r.as_ref().ok().copied(), err.as_deref()),
    );
}
