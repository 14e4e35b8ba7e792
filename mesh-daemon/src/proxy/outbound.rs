//! Outbound: connections the kernel captured from local pods arrive here. The kernel's record
//! (original destination and source workload, keyed by the client's address) decides everything;
//! without a fresh record the connection is refused, never guessed.
//!
//! [`decide`] is the branch point: a service VIP resolves to an endpoint (P2C), a pod on this node
//! is served in-process, a pod on another node goes through HBONE, anything outside the mesh goes
//! direct. Protocol detection and L7 routing branch off here later.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use mesh_common::{AF_INET, ConnKey, OrigDst};
use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, info, warn};

use super::{Hop, Inputs, balance::Outstanding, hbone};
use crate::state::{Snapshot, Workload};

/// A record older than this is refused: sockops writes it when the connection is established and
/// the proxy accepts within milliseconds, so an old one belongs to a connection that never reached
/// the proxy, and must not lend its identity to a later one from the same address and port.
pub const RECORD_MAX_AGE: Duration = Duration::from_secs(10);
/// How long a connection waits for its source workload's first SVID.
const SVID_WAIT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum OutboundError {
    #[error(
        "cannot listen on {addr} for captured connections: {source}; free the port or pass \
         --outbound with another address"
    )]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

pub struct Outbound {
    listener: TcpListener,
    inputs: Arc<Inputs>,
}

/// Where a captured connection goes.
#[derive(Debug)]
pub enum Decision {
    /// A meshed pod on this node: served in-process, no network hop.
    Local {
        target: SocketAddr,
        workload: Arc<Workload>,
    },
    /// A meshed pod another proxy serves: an HBONE tunnel to that proxy (its node's, or its own
    /// sidecar's).
    Remote {
        via: SocketAddr,
        target: SocketAddr,
        workload: Arc<Workload>,
    },
    /// Not a mesh destination: straight to it.
    Passthrough(SocketAddr),
    /// Nowhere to send it (a service without endpoints).
    Refuse(&'static str),
}

impl Outbound {
    /// Binds the listener. The daemon does this before it attaches anything to the kernel, so a
    /// port conflict fails start-up without ever capturing a connection.
    pub async fn bind(addr: SocketAddr) -> Result<TcpListener, OutboundError> {
        TcpListener::bind(addr)
            .await
            .map_err(|source| OutboundError::Bind { addr, source })
    }

    pub fn new(listener: TcpListener, inputs: Arc<Inputs>) -> Self {
        Self { listener, inputs }
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    pub async fn run(self) {
        super::accept_loop(self.listener, "outbound", self.inputs, handle).await
    }
}

/// The key sockops stored the record under, computed from the accepted socket's peer.
pub fn conn_key(peer: SocketAddr, netns_cookie: impl FnOnce() -> u64) -> ConnKey {
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
        port: u32::from(peer.port()),
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

/// The original destination a record names.
pub fn orig_dst_addr(rec: &OrigDst) -> SocketAddr {
    let port = rec.port as u16;
    if rec.family == AF_INET {
        SocketAddr::new(IpAddr::V4(Ipv4Addr::from(u32::from_be(rec.ip[0]))), port)
    } else {
        let mut o = [0u8; 16];
        for (i, w) in rec.ip.iter().enumerate() {
            o[4 * i..4 * i + 4].copy_from_slice(&w.to_ne_bytes());
        }
        SocketAddr::new(IpAddr::V6(Ipv6Addr::from(o)), port)
    }
}

/// Pure routing decision for a captured connection's original destination. A VIP's endpoint is
/// picked here; the returned guard counts the connection as outstanding on it.
pub fn decide(
    snap: &Snapshot,
    balancer: &super::balance::Balancer,
    dst: SocketAddr,
) -> (Decision, Option<(SocketAddr, Outstanding)>) {
    let (target, picked) = match snap.services.get(&dst) {
        Some(svc) => match balancer.pick(&svc.endpoints) {
            Some((ep, guard)) => (ep.addr, Some((ep.addr, guard))),
            None => return (Decision::Refuse("no_endpoints"), None),
        },
        None => (dst, None),
    };
    let Some(workload) = snap.workloads_by_ip.get(&target.ip()).cloned() else {
        return (Decision::Passthrough(target), picked);
    };
    if snap.is_local(&workload) {
        return (Decision::Local { target, workload }, picked);
    }
    match snap.proxy_for(&workload) {
        Some(via) => (
            Decision::Remote {
                via,
                target,
                workload,
            },
            picked,
        ),
        // The mesh file is validated, so every workload's node exists; refuse rather than guess.
        None => (Decision::Refuse("unknown_node"), picked),
    }
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
    let key = conn_key(peer, || super::netns_cookie(&client).unwrap_or(0));
    let Some(rec) = inputs.orig.take(&key) else {
        warn!(%peer, "no capture record for this connection: refusing it (the proxy never guesses a destination; a direct connection to the outbound port is not allowed)");
        refuse(&inputs, client, "no_record");
        return;
    };
    let age = Duration::from_nanos(monotonic_ns().saturating_sub(rec.established_ns));
    if age > RECORD_MAX_AGE {
        warn!(%peer, ?age, "capture record is stale: refusing the connection rather than trusting an old identity");
        refuse(&inputs, client, "stale_record");
        return;
    }
    let snap = inputs.state.snapshot();
    let Some(src) = snap.workload(rec.workload_id).cloned() else {
        warn!(%peer, workload_id = rec.workload_id, "the kernel attributed this connection to a workload no longer in the mesh: refusing it");
        refuse(&inputs, client, "unknown_source");
        return;
    };
    let _ = client.set_nodelay(true);
    let orig = orig_dst_addr(&rec);
    let (decision, picked) = decide(&snap, &inputs.balancer, orig);
    info!(%peer, dst = %orig, workload = %src.display(), cgroup_id = rec.cgroup_id, route = ?RouteLog(&decision), "captured connection");
    let td = inputs.identity.trust_domain().to_string();
    let src_id = src.identity(&td);
    let dst_workload = match &decision {
        Decision::Local { workload, .. } | Decision::Remote { workload, .. } => {
            Some(workload.clone())
        }
        _ => None,
    };
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
    ];
    // Same node: no HBONE hop, so this proxy is also the destination's and enforces its policies
    // here, with the identity the kernel attributed.
    if let Decision::Local { target, workload } = &decision {
        let verdict = inputs.authorize(&snap, &src_id, workload, target.port());
        if !verdict.allowed() {
            warn!(%peer, source = %src_id, dst = %workload.display(), port = target.port(), policy = verdict.policy(), "connection denied by authorization policy");
            let reason = format!("denied by policy {}", verdict.policy());
            inputs.tap(
                "refused",
                &labels,
                Hop {
                    destination: *target,
                    route: "local",
                    bytes: None,
                    reason: Some(&reason),
                },
            );
            refuse(&inputs, client, "denied");
            return;
        }
    }
    let source_ip = snap.mesh_source();
    // A connection may live for hours; it must not pin this snapshot in memory.
    drop(snap);
    let local = matches!(decision, Decision::Local { .. });
    let (hop_dst, route) = match &decision {
        Decision::Local { target, .. } => (*target, "local"),
        Decision::Remote { target, .. } => (*target, "hbone"),
        Decision::Passthrough(target) => (*target, "passthrough"),
        Decision::Refuse(_) => (orig, "refused"),
    };
    let hop = |bytes, reason| Hop {
        destination: hop_dst,
        route,
        bytes,
        reason,
    };
    let mut client = client;
    let result = match decision {
        Decision::Refuse(reason) => {
            warn!(%peer, dst = %orig, reason, "no route for captured connection");
            refuse(&inputs, client, reason);
            return;
        }
        // Same node, or outside the mesh: one TCP hop. Local pods are reached from the mesh
        // source (what STRICT pods accept); other destinations from the node's own address.
        Decision::Local { target, .. } | Decision::Passthrough(target) => {
            let source = if local { source_ip } else { None };
            match super::connect_marked(target, inputs.proxy_mark, source).await {
                Ok(mut upstream) => {
                    mark_endpoint(&inputs, &picked, true);
                    inputs.metrics.opened(&labels);
                    inputs.tap("open", &labels, hop(None, None));
                    match inputs.splice.as_deref().filter(|_| local) {
                        Some(maps) => relay_local(&inputs, maps, &mut client, &mut upstream).await,
                        None => super::relay_tcp(&mut client, &mut upstream).await,
                    }
                }
                Err(e) => {
                    warn!(%target, error = %e, "upstream refused the connection");
                    mark_endpoint(&inputs, &picked, false);
                    refuse(&inputs, client, "upstream_refused");
                    return;
                }
            }
        }
        Decision::Remote {
            via,
            target,
            workload,
        } => {
            // The tunnel speaks as the source workload; a pod's first connection may arrive before
            // its first certificate, so wait briefly rather than refuse.
            if inputs.identity.wait_for(&src_id, SVID_WAIT).await.is_none() {
                warn!(%peer, source = %src_id, "no SVID for the source workload yet (is the CA reachable?): refusing rather than sending plaintext");
                refuse(&inputs, client, "no_certificate");
                return;
            }
            let dst_id = workload.identity(&td);
            let ends = hbone::Ends {
                source: &src_id,
                source_workload: &src.display(),
                destination: &dst_id,
            };
            match inputs.hbone.connect(via, target, ends).await {
                Ok(tunnel) => {
                    mark_endpoint(&inputs, &picked, true);
                    inputs.metrics.opened(&labels);
                    inputs.tap("open", &labels, hop(None, None));
                    hbone::relay(client, tunnel).await
                }
                Err(e) => {
                    warn!(%target, error = %e, "HBONE tunnel failed");
                    mark_endpoint(&inputs, &picked, false);
                    refuse(&inputs, client, e.reason());
                    return;
                }
            }
        }
    };
    match &result {
        Ok((sent, received)) => debug!(%peer, sent, received, "connection closed"),
        Err(e) => debug!(%peer, error = %e, "connection ended with an error (reset passed on)"),
    }
    inputs.metrics.finished(&labels, &result);
    let err = result.as_ref().err().map(ToString::to_string);
    inputs.tap(
        "close",
        &labels,
        hop(result.as_ref().ok().copied(), err.as_deref()),
    );
    drop(picked);
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
    match super::splice::relay(maps, client, upstream, counters).await {
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
            super::relay_tcp(client, upstream).await
        }
    }
}

/// The decision without the workload details, for one log field.
struct RouteLog<'a>(&'a Decision);

impl std::fmt::Debug for RouteLog<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Decision::Local { target, .. } => write!(f, "local {target}"),
            Decision::Remote { via, target, .. } => write!(f, "hbone {target} via {via}"),
            Decision::Passthrough(a) => write!(f, "passthrough {a}"),
            Decision::Refuse(r) => write!(f, "refuse {r}"),
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

/// Counts a refused connection and resets it, so the client fails at once (a refusal, not an EOF
/// it might take for a clean end).
fn refuse(inputs: &Inputs, client: TcpStream, reason: &str) {
    inputs
        .metrics
        .tcp_failed
        .with_label_values(&["outbound", reason])
        .inc();
    let _ = client.set_zero_linger();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn port_conflict_fails_bind_with_the_fix() {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = taken.local_addr().expect("addr");
        let err = Outbound::bind(addr).await.expect_err("port is taken");
        let msg = err.to_string();
        assert!(
            msg.contains(&addr.to_string()) && msg.contains("--outbound"),
            "{msg}"
        );
    }

    #[test]
    fn key_for_ipv4_peer_has_no_netns() {
        let k = conn_key("10.1.2.3:40000".parse().expect("addr"), || {
            panic!("not loopback")
        });
        assert_eq!(k.ip[0], u32::from(Ipv4Addr::new(10, 1, 2, 3)).to_be());
        assert_eq!(k.port, 40000);
        assert_eq!(k.family, AF_INET);
        assert_eq!(k.netns_cookie, 0);
    }

    #[test]
    fn key_for_loopback_peer_carries_netns() {
        let k = conn_key("127.0.0.1:5555".parse().expect("addr"), || 77);
        assert_eq!(k.netns_cookie, 77);
    }

    #[test]
    fn v4_mapped_peer_folds_to_ipv4() {
        let a = conn_key("[::ffff:10.0.0.9]:1234".parse().expect("addr"), || 0);
        let b = conn_key("10.0.0.9:1234".parse().expect("addr"), || 0);
        assert_eq!(a, b);
    }

    #[test]
    fn orig_dst_round_trips() {
        for s in ["10.96.0.10:80", "[fd00::1]:8080", "192.168.1.254:65535"] {
            let addr: SocketAddr = s.parse().expect("addr");
            let k = conn_key(addr, || 0);
            let rec = OrigDst {
                ip: k.ip,
                port: k.port,
                family: k.family,
                ..Default::default()
            };
            assert_eq!(orig_dst_addr(&rec), addr);
        }
    }

    #[test]
    fn decisions_follow_the_mesh() {
        let f = crate::meshfile::parse(
            std::path::Path::new("t"),
            "\
nodes:
  - { name: n1, address: 10.0.0.1, meshSource: 10.1.1.254 }
  - { name: n2, address: 10.0.0.2, meshSource: 10.1.2.254 }
workloads:
  - { name: a, namespace: x, node: n1, ip: 10.1.1.2, cgroup: a, labels: { app: a } }
  - { name: b, namespace: x, node: n2, ip: 10.1.2.2, cgroup: b, labels: { app: b } }
services:
  - { name: b, namespace: x, vip: 10.96.0.1, ports: [{ port: 80, targetPort: 8080 }], selector: { app: b } }
  - { name: none, namespace: x, vip: 10.96.0.2, ports: [{ port: 80 }], selector: { app: zzz } }
",
        )
        .expect("parse");
        let snap = crate::state::State::default()
            .build(
                &f,
                &crate::state::Scope::Node("n1".into()),
                std::path::Path::new("/"),
            )
            .expect("build");
        let b = crate::proxy::balance::Balancer::default();
        let d = |s: &str| decide(&snap, &b, s.parse().expect("addr")).0;
        assert!(
            matches!(d("10.1.1.2:9"), Decision::Local { target, .. } if target.to_string() == "10.1.1.2:9")
        );
        assert!(
            matches!(d("10.1.2.2:9"), Decision::Remote { via, .. } if via.to_string() == "10.0.0.2:15008")
        );
        assert!(
            matches!(d("10.96.0.1:80"), Decision::Remote { target, .. } if target.to_string() == "10.1.2.2:8080")
        );
        assert!(matches!(
            d("10.96.0.2:80"),
            Decision::Refuse("no_endpoints")
        ));
        assert!(
            matches!(d("192.0.2.1:443"), Decision::Passthrough(a) if a.to_string() == "192.0.2.1:443")
        );
        // A VIP on a port the service does not declare is not the service.
        assert!(matches!(d("10.96.0.1:81"), Decision::Passthrough(_)));
    }
}
