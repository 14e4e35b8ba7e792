//! Outbound: connections the kernel captured from local pods arrive here. The kernel's record
//! (original destination and source workload, keyed by the client's address) decides everything;
//! without a fresh record the connection is refused, never guessed.
//!
//! The decisions are pure steps in [`super::route`] (record, destination, endpoint, route); this
//! file carries them out: a pod on this node is served in-process, a pod another proxy serves
//! goes through HBONE, anything outside the mesh goes direct. Protocol detection and L7 routing
//! branch off after the destination step later (per request: the endpoint choice).

use std::{
    net::{Ipv6Addr, SocketAddr},
    sync::Arc,
};

use bytes::BytesMut;
use mesh_common::{AF_INET, ConnKey};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};
use tracing::{debug, info, warn};

use crate::metrics::{Edge, unknown_edge};

use super::{
    Hop, Inputs,
    balance::Outstanding,
    detect::{self, How, Protocol},
    hbone, http,
    relay::relay,
    route::{self, Destination, Route},
    upstream::Upstream,
};

#[derive(Debug, thiserror::Error)]
pub enum OutboundError {
    #[error("cannot listen on {addr} for captured connections: {source}; {advice}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
        advice: String,
    },
}

/// The outbound listener: its port, and its further ports (`--outbound-spread`) that the kernel
/// sends captured connections to by their destination's hash. All are served the same way; the
/// port a connection arrived on means nothing beyond that.
pub struct Outbound {
    listeners: Vec<TcpListener>,
    inputs: Arc<Inputs>,
}

impl Outbound {
    /// Binds the listeners, `addr` first. The daemon does this before it attaches anything to the
    /// kernel, so a port conflict fails start-up without ever capturing a connection.
    pub fn bind(
        addr: SocketAddr,
        spread: std::ops::Range<u16>,
    ) -> Result<Vec<TcpListener>, OutboundError> {
        std::iter::once(addr)
            .chain(spread.map(|p| SocketAddr::new(addr.ip(), p)))
            .map(|a| {
                crate::socket::listen(a).map_err(|source| {
                    let advice = if a != addr && source.kind() == std::io::ErrorKind::AddrInUse {
                        format!(
                            "another process holds {a}, one of the outbound listener's further \
                             ports; stop it, or pass --outbound-spread 0 to listen on {addr} only"
                        )
                    } else {
                        crate::socket::bind_advice(a, &source, "--outbound")
                    };
                    OutboundError::Bind {
                        addr: a,
                        advice,
                        source,
                    }
                })
            })
            .collect()
    }

    pub fn new(listeners: Vec<TcpListener>, inputs: Arc<Inputs>) -> Self {
        Self { listeners, inputs }
    }

    /// The first listener's address (the one port without a spread).
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        match self.listeners.first() {
            Some(l) => l.local_addr(),
            None => Err(std::io::Error::other("no outbound listener")),
        }
    }

    pub async fn run(self) {
        let loops: Vec<_> = self
            .listeners
            .into_iter()
            .map(|l| {
                tokio::spawn(super::accept_loop(
                    l,
                    "outbound",
                    self.inputs.clone(),
                    handle,
                ))
            })
            .collect();
        for l in loops {
            let _ = l.await;
        }
    }
}

/// The key sockops stored the record under, computed from the accepted socket's peer and the
/// proxy port it reached.
pub fn conn_key(peer: SocketAddr, proxy_port: u16, netns_cookie: impl FnOnce() -> u64) -> ConnKey {
    let (ip, family, loopback) = match peer {
        SocketAddr::V4(a) => (
            [u32::from(*a.ip()).to_be(), 0, 0, 0],
            AF_INET,
            a.ip().is_loopback(),
        ),
        SocketAddr::V6(a) => match a.ip().to_ipv4_mapped() {
            Some(v4) => ([u32::from(v4).to_be(), 0, 0, 0], AF_INET, v4.is_loopback()),
            None => (
                ipv6_words(a.ip()),
                mesh_common::AF_INET6,
                a.ip().is_loopback(),
            ),
        },
    };
    ConnKey {
        netns_cookie: if loopback { netns_cookie() } else { 0 },
        ip,
        port: mesh_common::conn_port(peer.port(), proxy_port),
        family,
    }
}

fn ipv6_words(ip: &Ipv6Addr) -> [u32; 4] {
    let o = ip.octets();
    // Each word keeps the network byte order the kernel uses.
    std::array::from_fn(|i| {
        u32::from_ne_bytes([o[4 * i], o[4 * i + 1], o[4 * i + 2], o[4 * i + 3]])
    })
}

/// CLOCK_MONOTONIC in nanoseconds, the clock of `bpf_ktime_get_ns`.
fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into a live local.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

async fn handle(inputs: Arc<Inputs>, client: TcpStream, peer: SocketAddr) {
    let here = client.local_addr().unwrap_or(peer);
    let key = conn_key(peer, here.port(), || {
        crate::socket::netns_cookie(&client).unwrap_or(0)
    });
    let Some(rec) = inputs.orig.take(&key) else {
        warn!(%peer, "no capture record for this connection: refusing it (the proxy never guesses a destination; a direct connection to the outbound port is not allowed)");
        refuse(
            &inputs,
            client,
            &unknown_edge("outbound"),
            here,
            "none",
            "no_record",
            &format!(
                "no capture record for {peer}: a direct connection to the outbound port is not \
                 allowed (the proxy never guesses a destination)"
            ),
        );
        return;
    };
    let snap = inputs.state.snapshot();
    let admitted = match route::admit_record(&snap, &rec, monotonic_ns()) {
        Ok(a) => a,
        Err(r) => {
            warn!(%peer, reason = r.reason, "{}", r.detail);
            let edge = unknown_edge("outbound");
            refuse(&inputs, client, &edge, here, "none", r.reason, &r.detail);
            return;
        }
    };
    let (src, orig) = (admitted.source, admitted.orig);
    let _ = client.set_nodelay(true);
    let mut client = client;
    let destination = route::resolve(&snap, orig);
    // L7: a service port that speaks HTTP is served per request (its appProtocol says, or its
    // first bytes do). Bytes read while detecting are replayed to whichever path takes them.
    let mut early = BytesMut::new();
    let mut keep_detecting = false;
    // Bytes detection carried outside the relay (the client's replayed, the server's greeting),
    // added to the relay's counts.
    let mut pre = (0u64, 0u64);
    if let Destination::Service(svc) = &destination
        && inputs.l7_enabled
    {
        use crate::state::desired::AppProtocol;
        let hinted = match svc.protocol {
            Some(AppProtocol::Tcp) => Some(Protocol::Opaque),
            Some(AppProtocol::Http) => Some(Protocol::Http1),
            Some(AppProtocol::H2c | AppProtocol::Grpc) => Some(Protocol::Http2),
            None => None,
        };
        let known = match hinted {
            Some(p) => Some((p, How::AppProtocol)),
            None => {
                let grace = detect::GRACE.min(inputs.detect_timeout);
                match tokio::time::timeout(grace, detect::read_until_known(&mut client, &mut early))
                    .await
                {
                    Ok(Ok(known)) => Some(known),
                    Ok(Err(e)) => {
                        debug!(%peer, error = %e, "client failed before its protocol was known");
                        return;
                    }
                    // Silent so far: connect the upstream in parallel and keep listening.
                    Err(_) => {
                        keep_detecting = true;
                        None
                    }
                }
            }
        };
        if let Some((protocol, how)) = known {
            count_detection(&inputs, protocol, how);
            if protocol != Protocol::Opaque {
                drop(snap);
                serve_http(&inputs, client, early, &src, orig, protocol).await;
                return;
            }
        }
    }
    let service = match &destination {
        Destination::Service(svc) => format!("{}/{}", svc.namespace, svc.name),
        _ => "unknown".to_string(),
    };
    // The destination, then (for a service) the endpoint, then the route to it.
    let (target, picked) = match destination {
        Destination::Service(svc) => match inputs.balancer.pick(&svc.endpoints) {
            Some((ep, guard)) => (ep.addr, Some((ep.addr, guard))),
            None => {
                warn!(%peer, dst = %orig, %service, "no route for captured connection: the service has no endpoints");
                let td = inputs.identity.trust_domain();
                let mut edge = unknown_edge("outbound");
                edge[1].clone_from(&src.name);
                edge[2].clone_from(&src.namespace);
                edge[3] = src.identity(td).to_string();
                edge[7].clone_from(&service);
                let detail = format!(
                    "service {service} has no endpoints (no ready pod matches its selector)"
                );
                refuse(
                    &inputs,
                    client,
                    &edge,
                    orig,
                    "none",
                    route::NO_ENDPOINTS,
                    &detail,
                );
                return;
            }
        },
        Destination::Workload { target, .. } | Destination::Outside(target) => (target, None),
    };
    let decision = route::route(&snap, target);
    info!(%peer, dst = %orig, workload = %src.display(), cgroup_id = rec.cgroup_id, route = ?RouteLog(&decision), "captured connection");
    let td = inputs.identity.trust_domain().to_string();
    let src_id = src.identity(&td);
    let dst_workload = decision.workload().cloned();
    let dst_id = dst_workload.as_ref().map(|w| w.identity(&td));
    let labels = [
        "outbound".to_string(),
        src.name.clone(),
        src.namespace.clone(),
        src_id.to_string(),
        dst_workload
            .as_ref()
            .map_or("unknown".into(), |w| w.name.clone()),
        dst_workload
            .as_ref()
            .map_or("unknown".into(), |w| w.namespace.clone()),
        dst_id.as_ref().map_or("unknown".into(), |i| i.to_string()),
        service,
    ];
    // Same node: no HBONE hop, so this proxy is also the destination's and enforces its policies
    // here, with the identity the kernel attributed.
    if let Route::Local { target, workload } = &decision {
        let checked = route::authorize(
            &snap,
            &src_id,
            workload,
            target.port(),
            crate::authz::Check::Connection { http: false },
        );
        inputs.count_verdict(checked.as_ref().map_or_else(|r| r.verdict.as_ref(), Some));
        if let Err(r) = checked {
            let policy = r.verdict.as_ref().map_or("", |v| v.policy());
            warn!(%peer, source = %src_id, dst = %workload.display(), port = target.port(), policy, "connection denied by authorization policy");
            refuse(
                &inputs, client, &labels, *target, "local", r.reason, &r.detail,
            );
            return;
        }
    }
    let source_ip = snap.mesh_source();
    // A connection may live for hours; it must not pin this snapshot in memory.
    drop(snap);
    let local = matches!(decision, Route::Local { .. });
    let route = decision.label();
    let hop_dst = match &decision {
        Route::Local { target, .. } | Route::Remote { target, .. } | Route::Passthrough(target) => {
            *target
        }
        Route::Refuse(_) => orig,
    };
    let hop = |bytes, reason| Hop {
        destination: hop_dst,
        route,
        bytes,
        reason,
    };
    // Open the upstream: one TCP hop (same node, or outside the mesh) or an HBONE tunnel.
    let opened = match decision {
        Route::Refuse(reason) => {
            warn!(%peer, dst = %orig, reason, "no route for captured connection");
            let detail = format!("no route to {orig}");
            refuse(&inputs, client, &labels, orig, "none", reason, &detail);
            return;
        }
        // Local pods are reached from the mesh source (what STRICT pods accept); other
        // destinations from the node's own address.
        Route::Local { target, workload } => {
            // The workload's address (never one the pod bound on its own), its real port.
            let client = SocketAddr::new(src.ip.into(), peer.port());
            super::proxyproto::connect_pod(
                target,
                inputs.proxy_mark,
                source_ip,
                &workload,
                Some(client),
            )
            .await
            .map(Upstream::Tcp)
            .map_err(|e| {
                warn!(%target, error = %e, "upstream refused the connection");
                ("upstream_refused", format!("connect to {target}: {e}"))
            })
        }
        Route::Passthrough(target) => {
            crate::socket::connect_marked(target, inputs.proxy_mark, None)
                .await
                .map(Upstream::Tcp)
                .map_err(|e| {
                    warn!(%target, error = %e, "upstream refused the connection");
                    ("upstream_refused", format!("connect to {target}: {e}"))
                })
        }
        Route::Remote {
            via,
            target,
            workload,
        } => {
            // The tunnel speaks as the source workload; a pod's first connection may arrive before
            // its first certificate, so wait briefly rather than refuse.
            if inputs
                .identity
                .wait_for(&src_id, hbone::SVID_WAIT)
                .await
                .is_none()
            {
                warn!(%peer, source = %src_id, "no SVID for the source workload yet (is the CA reachable?): refusing rather than sending plaintext");
                let detail = format!(
                    "no SVID for {src_id} yet (is the CA reachable?): refused rather than sent \
                     in plaintext"
                );
                refuse(
                    &inputs,
                    client,
                    &labels,
                    target,
                    route,
                    "no_certificate",
                    &detail,
                );
                return;
            }
            let dst_id = workload.identity(&td);
            let ends = hbone::Ends {
                source: &src_id,
                source_workload: &src.display(),
                destination: &dst_id,
                protocol: None,
                // The workload's address (never one the pod bound on its own), its real port.
                client: Some(SocketAddr::new(src.ip.into(), peer.port())),
            };
            inputs
                .hbone
                .connect(via, target, ends)
                .await
                .map(Upstream::Tunnel)
                .map_err(|e| {
                    warn!(%target, error = %e, "HBONE tunnel failed");
                    (e.reason(), e.to_string())
                })
        }
    };
    let mut upstream = match opened {
        Ok(u) => u,
        Err((reason, detail)) => {
            mark_endpoint(&inputs, &picked, false);
            refuse(&inputs, client, &labels, hop_dst, route, reason, &detail);
            return;
        }
    };
    mark_endpoint(&inputs, &picked, true);
    // A client silent through detection's grace period: its bytes, the server's greeting or the
    // timeout decide now; HTTP goes to L7 and the spare upstream is dropped.
    if keep_detecting
        && let Some(protocol) =
            keep_listening(&inputs, &mut client, &mut early, &mut upstream, &mut pre.1).await
    {
        drop(upstream);
        serve_http(&inputs, client, early, &src, orig, protocol).await;
        return;
    }
    if let Err(e) = replay(&mut early, &mut upstream, &mut pre.0).await {
        debug!(%peer, error = %e, "connection failed while replaying its first bytes");
        return;
    }
    inputs.metrics.opened(&labels);
    inputs.tap("open", &labels, hop(None, None));
    let result = match (&mut upstream, inputs.splice.as_deref().filter(|_| local)) {
        // Same node with --sockmap on: the kernel splices the proxy's two sockets.
        (Upstream::Tcp(tcp), Some(maps)) => relay_local(&inputs, maps, &mut client, tcp).await,
        _ => relay(&mut client, &mut upstream, inputs.drain.deadline()).await,
    };
    let result = result.map(|(sent, received)| (sent + pre.0, received + pre.1));
    match &result {
        Ok((sent, received)) => debug!(%peer, sent, received, "connection closed"),
        Err(e) => debug!(%peer, error = %e, "connection ended with an error (reset passed on)"),
    }
    inputs.count_drained(&result);
    inputs.metrics.finished(&labels, &result);
    let err = result.as_ref().err().map(ToString::to_string);
    inputs.tap(
        "close",
        &labels,
        hop(result.as_ref().ok().copied(), err.as_deref()),
    );
    drop(picked);
}

fn count_detection(inputs: &Inputs, protocol: Protocol, how: How) {
    inputs
        .metrics
        .protocol_detections
        .with_label_values(&[protocol.label(), how.label()])
        .inc();
}

/// Serves a connection at L7 (see [`http`]).
async fn serve_http(
    inputs: &Arc<Inputs>,
    client: TcpStream,
    early: BytesMut,
    src: &Arc<crate::state::Workload>,
    service: SocketAddr,
    protocol: Protocol,
) {
    let td = inputs.identity.trust_domain().to_string();
    info!(source = %src.display(), dst = %service, protocol = protocol.label(), "captured connection served at L7");
    let c = http::Client {
        source: src.clone(),
        source_id: src.identity(&td),
        service,
        protocol,
    };
    http::serve(
        inputs.clone(),
        super::upstream::Prefixed::new(early, client),
        c,
    )
    .await;
}

/// Detection goes on after the upstream is connected (the client was silent through the
/// grace period): the client's bytes, the upstream's greeting (a server-first protocol, relayed
/// at once) or the timeout decide. `Some`: the client speaks HTTP, and L7 takes it over.
async fn keep_listening<U: AsyncRead + AsyncWrite + Unpin>(
    inputs: &Inputs,
    client: &mut TcpStream,
    early: &mut BytesMut,
    upstream: &mut U,
    greeted: &mut u64,
) -> Option<Protocol> {
    let mut greeting = BytesMut::with_capacity(4096);
    let remaining = inputs.detect_timeout.saturating_sub(detect::GRACE);
    let (protocol, how) = tokio::select! {
        r = detect::read_until_known(client, early) => r.unwrap_or((Protocol::Opaque, How::Closed)),
        _ = upstream.read_buf(&mut greeting) => (Protocol::Opaque, How::ServerFirst),
        () = tokio::time::sleep(remaining) => (Protocol::Opaque, How::Timeout),
    };
    count_detection(inputs, protocol, how);
    if protocol != Protocol::Opaque {
        return Some(protocol);
    }
    if !greeting.is_empty() {
        if client.write_all(&greeting).await.is_err() {
            // The relay finds the client gone next.
            debug!("client gone before the server's greeting reached it");
        } else {
            *greeted += greeting.len() as u64;
        }
    }
    None
}

/// Sends the bytes detection read on to the upstream, before the relay takes over.
async fn replay<U: AsyncWrite + Unpin>(
    early: &mut BytesMut,
    upstream: &mut U,
    replayed: &mut u64,
) -> std::io::Result<()> {
    if !early.is_empty() {
        upstream.write_all(early).await?;
        *replayed += early.len() as u64;
        early.clear();
    }
    Ok(())
}

/// Same node with `--sockmap on`: the kernel splices the two sockets; user space relays only when
/// the splice cannot be set up.
async fn relay_local(
    inputs: &Inputs,
    maps: &crate::ebpf::loader::SpliceMaps,
    client: &mut TcpStream,
    upstream: &mut TcpStream,
) -> std::io::Result<(u64, u64)> {
    let count = |result| inputs.metrics.splices.with_label_values(&[result]).inc();
    let counters = super::splice::Counters {
        pauses: &inputs.metrics.splice_pauses,
        resumes: &inputs.metrics.splice_resumes,
        overflows: &inputs.metrics.splice_overflows,
    };
    let spliced = tokio::select! {
        s = super::splice::relay(maps, client, upstream, counters) => s,
        () = inputs.drain.deadline() => {
            let _ = client.set_zero_linger();
            let _ = upstream.set_zero_linger();
            return Err(crate::drain::deadline_error());
        }
    };
    match spliced {
        super::splice::Started::Spliced(r) => {
            count("spliced");
            r
        }
        super::splice::Started::NotStarted { why, expected } => {
            if expected {
                // The client sent its FIN (or the server closed) before the splice was up: a
                // socket map takes only established sockets.
                debug!(reason = %why, "same-node connection relayed in user space");
                count("closed_early");
            } else {
                warn!(reason = %why, "same-node splice failed (map full?); relaying this connection in user space");
                count("failed");
            }
            relay(client, upstream, inputs.drain.deadline()).await
        }
    }
}

/// The decision without the workload details, for one log field.
struct RouteLog<'a>(&'a Route);

impl std::fmt::Debug for RouteLog<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Route::Local { target, .. } => write!(f, "local {target}"),
            Route::Remote { via, target, .. } => write!(f, "hbone {target} via {via}"),
            Route::Passthrough(a) => write!(f, "passthrough {a}"),
            Route::Refuse(r) => write!(f, "refuse {r}"),
        }
    }
}

fn mark_endpoint(inputs: &Inputs, picked: &Option<(SocketAddr, Outstanding)>, ok: bool) {
    if let Some((addr, _)) = picked {
        if ok {
            inputs.balancer.succeeded(*addr);
        } else {
            inputs.balancer.failed(*addr);
        }
    }
}

/// Counts a refused connection (with its workloads, and on /tap) and resets it, so the client
/// fails at once (a refusal, not an EOF it might take for a clean end).
fn refuse(
    inputs: &Inputs,
    client: TcpStream,
    edge: &Edge,
    destination: SocketAddr,
    route: &'static str,
    reason: &str,
    detail: &str,
) {
    inputs.refused(edge, destination, route, reason, detail);
    let _ = client.set_zero_linger();
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use mesh_common::OrigDst;

    use super::*;

    #[tokio::test]
    async fn port_conflict_fails_bind_with_the_fix() {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = taken.local_addr().expect("addr");
        let err = Outbound::bind(addr, 0..0).expect_err("port is taken");
        let msg = err.to_string();
        assert!(
            msg.contains(&addr.to_string()) && msg.contains("--outbound"),
            "{msg}"
        );
    }

    #[test]
    fn key_for_ipv4_peer_has_no_netns() {
        let k = conn_key("10.1.2.3:40000".parse().expect("addr"), 15103, || {
            panic!("not loopback")
        });
        assert_eq!(k.ip[0], u32::from(Ipv4Addr::new(10, 1, 2, 3)).to_be());
        assert_eq!(
            k.port,
            40000 | 15103 << 16,
            "the client's port and the proxy's"
        );
        assert_eq!(k.family, AF_INET);
        assert_eq!(k.netns_cookie, 0);
    }

    #[test]
    fn key_for_loopback_peer_carries_netns() {
        let k = conn_key("127.0.0.1:5555".parse().expect("addr"), 15001, || 77);
        assert_eq!(k.netns_cookie, 77);
    }

    #[test]
    fn v4_mapped_peer_folds_to_ipv4() {
        let a = conn_key("[::ffff:10.0.0.9]:1234".parse().expect("addr"), 15001, || 0);
        let b = conn_key("10.0.0.9:1234".parse().expect("addr"), 15001, || 0);
        assert_eq!(a, b);
    }

    #[test]
    fn orig_dst_round_trips() {
        for s in ["10.96.0.10:80", "[fd00::1]:8080", "192.168.1.254:65535"] {
            let addr: SocketAddr = s.parse().expect("addr");
            let k = conn_key(addr, 0, || 0);
            let rec = OrigDst {
                ip: k.ip,
                port: k.port,
                family: k.family,
                ..Default::default()
            };
            assert_eq!(route::orig_dst_addr(&rec), addr);
        }
    }
}
