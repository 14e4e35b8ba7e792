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
use crate::metrics::{Edge, unknown_edge};

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
    let local = stream.local_addr().unwrap_or(addr);
    let handshake_failed = |label: &str, reason: &dyn std::fmt::Display| {
        // Plaintext, garbage, an untrusted or expired certificate, TLS 1.2: that peer is dropped
        // and counted; everyone else is unaffected.
        warn!(peer = %addr, result = label, error = %reason, "HBONE mTLS handshake refused");
        inputs
            .metrics
            .tls_handshakes
            .with_label_values(&["inbound", label])
            .inc();
        // Counted above, in its own family; /tap shows it with the peer and why.
        let why = format!("tls_{label}: from {addr}: {reason}");
        inputs.tap(
            "refused",
            &unknown_edge("inbound"),
            super::Hop {
                destination: local,
                route: "none",
                bytes: None,
                reason: Some(&why),
            },
        );
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
    let mut peer_edge = unknown_edge("inbound");
    peer_edge[2].clone_from(&peer.ids.source.namespace);
    peer_edge[3] = peer.ids.source.to_string();
    let bad_peer = |detail: String| {
        warn!(peer = %addr, error = %detail, "HBONE connection failed: the peer did not speak HTTP/2 HBONE");
        inputs.refused(&peer_edge, local, "inbound", "hbone_protocol", &detail);
    };
    let mut conn = match tokio::time::timeout_at(deadline, handshake).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => return bad_peer(e.to_string()),
        Err(_) => {
            return bad_peer(format!(
                "no HTTP/2 preface within {:?} (--handshake-timeout)",
                inputs.handshake_timeout
            ));
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
                    bad_peer(e.to_string());
                }
                break;
            }
        }
    }
}

/// A refused CONNECT's edge, as far as this node knows it: the proven source principal (and its
/// workload when the claimed one has exactly that identity), the destination pod if the
/// authority names a local one; and where it asked to go.
fn refusal_edge(
    snap: &crate::state::Snapshot,
    td: &str,
    peer: &Peer,
    req: &Request<RecvStream>,
) -> (Edge, SocketAddr) {
    let mut edge = unknown_edge("inbound");
    let source = &peer.ids.source;
    if let Some(name) = req
        .headers()
        .get(route::SOURCE_HEADER)
        .and_then(|v| v.to_str().ok())
        .and_then(|s| route::known_workload(snap, s, source, td))
    {
        edge[1] = name;
    }
    edge[2].clone_from(&source.namespace);
    edge[3] = source.to_string();
    let target = req
        .uri()
        .authority()
        .and_then(|a| a.as_str().parse::<SocketAddr>().ok());
    if let Some(w) = target
        .and_then(|t| snap.workloads_by_ip.get(&t.ip()))
        .filter(|w| snap.is_local(w))
    {
        edge[4].clone_from(&w.name);
        edge[5].clone_from(&w.namespace);
        edge[6] = w.identity(td).to_string();
    }
    if let Some(s) = target.and_then(|t| snap.local_service_of(t)) {
        edge[7] = s.to_string();
    }
    (edge, target.unwrap_or(peer.addr))
}

/// Answers a CONNECT with an error status and the reason, and counts it (with both workloads, and
/// on /tap).
fn refuse(
    inputs: &Inputs,
    mut respond: SendResponse<Bytes>,
    (edge, destination): &(Edge, SocketAddr),
    status: StatusCode,
    label: &str,
    reason: String,
) {
    warn!(reason = %reason, "HBONE tunnel refused");
    inputs.refused(edge, *destination, "inbound", label, &reason);
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
        client,
        verdict,
    } = match admitted {
        Ok(t) => t,
        Err(r) => {
            let edge = refusal_edge(&snap, td, &peer, &req);
            return refuse(&inputs, respond, &edge, r.status, r.reason, r.detail);
        }
    };
    let source_ip = snap.mesh_source();
    let service = snap
        .local_service_of(target)
        .map_or_else(|| "unknown".to_string(), str::to_string);
    // A tunnel may live for hours; it must not pin this snapshot in memory.
    drop(snap);
    let connected =
        super::proxyproto::connect_pod(target, inputs.proxy_mark, source_ip, &dst, client).await;
    let pod = match connected {
        Ok(s) => s,
        Err(e) => {
            let reason = format!("connect to {target}: {e}");
            let mut edge = unknown_edge("inbound");
            edge[1].clone_from(&source_name);
            edge[2].clone_from(&peer.ids.source.namespace);
            edge[3] = peer.ids.source.to_string();
            edge[4].clone_from(&dst.name);
            edge[5].clone_from(&dst.namespace);
            edge[6] = dst_id.to_string();
            edge[7].clone_from(&service);
            return refuse(
                &inputs,
                respond,
                &(edge, target),
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
        service,
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
            service: labels[7].clone(),
            source_ip: client.map(|c| c.ip()),
            dst_id: dst_id.clone(),
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
