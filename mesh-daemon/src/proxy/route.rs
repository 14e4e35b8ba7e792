//! Where a connection goes, decided in pure steps over one state snapshot (ztunnel's outbound
//! `build_request` is the model); the async code in `outbound.rs` and `inbound.rs` only carries
//! the decisions out.
//!
//! Outbound (a connection the kernel captured from a local pod):
//! 1. [`admit_record`]: the kernel's record names the source workload and the original
//!    destination; a stale record, an unknown workload or one this proxy does not serve is
//!    refused.
//! 2. [`resolve`]: the logical destination — a service port, a meshed workload, or outside.
//! 3. endpoint choice for a service (the balancer's step; L7 will take it per request).
//! 4. [`route`]: for the concrete address, `Local` (a pod this proxy serves), `Remote` (HBONE to
//!    the proxy that serves it), `Passthrough` (outside the mesh) or `Refuse`.
//!
//! Inbound (a CONNECT on the HBONE listener): [`admit`] checks the request against the snapshot
//! and the peer's proven identity. Both directions authorize through [`authorize`].

use std::{
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use http::{HeaderMap, Method, StatusCode, Uri};
use mesh_common::OrigDst;

use crate::{
    authz::{self, Verdict},
    identity::Identity,
    state::{Service, Snapshot, Workload},
};

/// A record older than this is refused: sockops writes it when the connection is established and
/// the proxy accepts within milliseconds, so an old one belongs to a connection that never reached
/// the proxy, and must not lend its identity to a later one from the same address and port.
pub const RECORD_MAX_AGE: Duration = Duration::from_secs(10);
/// Header naming the source workload (`namespace/name`). The client certificate proves only the
/// identity (namespace + service account), so the destination uses this for its workload label,
/// and only when it names a known workload with exactly the proven identity.
pub const SOURCE_HEADER: &str = "x-nodemesh-source-workload";
/// Header on a CONNECT whose tunnel carries HTTP from the source proxy's L7 (`http1` or `h2`):
/// the destination proxy serves it as HTTP too, and checks each request.
pub const PROTOCOL_HEADER: &str = "x-nodemesh-protocol";
/// Header on a CONNECT naming the client pod's address (`for=<ip>` or `for="<ip>:<port>"`,
/// RFC 7239, as HBONE peers send it). Believed only when that address is a workload with exactly the proven identity; the
/// destination hands it to the pod's HTTP requests (`x-forwarded-for`, `forwarded`).
pub const FORWARDED_HEADER: &str = "forwarded";

/// The client address a CONNECT's `forwarded` header claims, when it is a workload of `snap`
/// whose identity is the `proven` one (else None: a node cannot speak for another node's pods).
pub fn forwarded_client(
    snap: &Snapshot,
    headers: &HeaderMap,
    proven: &Identity,
    td: &str,
) -> Option<SocketAddr> {
    let v = headers.get(FORWARDED_HEADER)?.to_str().ok()?;
    // The first element's `for` parameter: `for=10.0.0.1`, `for="[fd00::1]"`.
    let first = v.split(',').next()?;
    let value = first.split(';').find_map(|kv| {
        let (k, v) = kv.trim().split_once('=')?;
        k.eq_ignore_ascii_case("for").then_some(v)
    })?;
    let value = value.trim_matches('"');
    // RFC 7239 nodes: `10.0.0.1`, `"10.0.0.1:4711"`, `"[fd00::1]"`, `"[fd00::1]:4711"`.
    let addr = value.parse::<SocketAddr>().ok().or_else(|| {
        let ip: std::net::IpAddr = value
            .strip_prefix('[')
            .and_then(|v| v.strip_suffix(']'))
            .unwrap_or(value)
            .parse()
            .ok()?;
        Some(SocketAddr::new(ip, 0))
    })?;
    let std::net::IpAddr::V4(v4) = addr.ip() else {
        return None; // no IPv6 workloads yet
    };
    let w = snap.workloads_by_ip.get(&std::net::IpAddr::V4(v4))?;
    (w.identity(td) == *proven).then_some(addr)
}

/// The `forwarded` header value for a client address (IPv6 quoted in brackets, RFC 7239).
pub fn forwarded_value(addr: SocketAddr) -> String {
    match (addr.ip(), addr.port()) {
        (std::net::IpAddr::V4(v4), 0) => format!("for={v4}"),
        (std::net::IpAddr::V6(v6), 0) => format!("for=\"[{v6}]\""),
        // With a port the node is a quoted string (RFC 7239 section 6).
        (_, _) => format!("for=\"{addr}\""),
    }
}

/// Why a connection was refused: a bounded reason label (metrics, tap), the HTTP status an
/// inbound CONNECT is answered with, the policy verdict when a policy decided it, and a sentence
/// for the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub status: StatusCode,
    pub reason: &'static str,
    pub verdict: Option<Verdict>,
    pub detail: String,
}

fn refusal(status: StatusCode, reason: &'static str, detail: String) -> Refusal {
    Refusal {
        status,
        reason,
        verdict: None,
        detail,
    }
}

// === outbound ===

/// A captured connection the proxy will carry: who sent it, and where it was going.
#[derive(Debug, Clone)]
pub struct Admitted {
    pub source: Arc<Workload>,
    pub orig: SocketAddr,
}

/// Step 1: the kernel's record, checked. `now_ns` is CLOCK_MONOTONIC, the record's clock.
pub fn admit_record(snap: &Snapshot, rec: &OrigDst, now_ns: u64) -> Result<Admitted, Refusal> {
    let age = Duration::from_nanos(now_ns.saturating_sub(rec.established_ns));
    if age > RECORD_MAX_AGE {
        return Err(refusal(
            StatusCode::FORBIDDEN,
            "stale_record",
            format!(
                "capture record is {age:?} old: refusing the connection rather than trusting an \
                 old identity"
            ),
        ));
    }
    let Some(source) = snap.workload(rec.workload_id).cloned() else {
        return Err(refusal(
            StatusCode::FORBIDDEN,
            "unknown_source",
            format!(
                "the kernel attributed this connection to workload id {}, which is no longer in \
                 the mesh: refusing it",
                rec.workload_id
            ),
        ));
    };
    if !snap.is_local(&source) {
        // Enrollment holds only the pods this proxy serves; a record naming another is stale
        // kernel state, and must not lend this proxy's certificates to it.
        return Err(refusal(
            StatusCode::FORBIDDEN,
            "source_not_served",
            format!(
                "the kernel attributed this connection to {}, which this proxy does not serve: \
                 refusing it",
                source.display()
            ),
        ));
    }
    Ok(Admitted {
        source,
        orig: orig_dst_addr(rec),
    })
}

/// The original destination a record names.
pub fn orig_dst_addr(rec: &OrigDst) -> SocketAddr {
    let port = rec.port as u16;
    if rec.family == mesh_common::AF_INET {
        SocketAddr::new(
            IpAddr::V4(std::net::Ipv4Addr::from(u32::from_be(rec.ip[0]))),
            port,
        )
    } else {
        let mut o = [0u8; 16];
        for (i, w) in rec.ip.iter().enumerate() {
            o[4 * i..4 * i + 4].copy_from_slice(&w.to_ne_bytes());
        }
        SocketAddr::new(IpAddr::V6(std::net::Ipv6Addr::from(o)), port)
    }
}

/// What the original destination means in the mesh.
#[derive(Debug, Clone)]
pub enum Destination {
    /// A service's VIP on one of its ports: an endpoint is chosen next.
    Service(Arc<Service>),
    /// A meshed workload, addressed directly.
    Workload {
        target: SocketAddr,
        workload: Arc<Workload>,
    },
    /// Nothing the mesh knows.
    Outside(SocketAddr),
}

/// Step 2: the logical destination. A VIP on a port its service does not declare is not the
/// service.
pub fn resolve(snap: &Snapshot, orig: SocketAddr) -> Destination {
    if let Some(svc) = snap.services.get(&orig) {
        return Destination::Service(svc.clone());
    }
    match snap.workloads_by_ip.get(&orig.ip()) {
        Some(w) => Destination::Workload {
            target: orig,
            workload: w.clone(),
        },
        None => Destination::Outside(orig),
    }
}

/// Where a captured connection goes once its address is concrete.
#[derive(Debug, Clone)]
pub enum Route {
    /// A meshed pod this proxy serves: in-process, no network hop.
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
    /// Nowhere to send it.
    Refuse(&'static str),
}

impl Route {
    /// The route's label in metrics, tap and logs.
    pub fn label(&self) -> &'static str {
        match self {
            Route::Local { .. } => "local",
            Route::Remote { .. } => "hbone",
            Route::Passthrough(_) => "passthrough",
            Route::Refuse(_) => "refused",
        }
    }

    /// The meshed workload at the other end, if any.
    pub fn workload(&self) -> Option<&Arc<Workload>> {
        match self {
            Route::Local { workload, .. } | Route::Remote { workload, .. } => Some(workload),
            _ => None,
        }
    }
}

/// Step 3, for a service without the balancer: none of its endpoints.
pub const NO_ENDPOINTS: &str = "no_endpoints";

/// Step 4: the route to a concrete address (a pod, a chosen endpoint, or outside).
pub fn route(snap: &Snapshot, target: SocketAddr) -> Route {
    let Some(workload) = snap.workloads_by_ip.get(&target.ip()).cloned() else {
        return Route::Passthrough(target);
    };
    if snap.is_local(&workload) {
        return Route::Local { target, workload };
    }
    match snap.proxy_for(&workload) {
        Some(via) => Route::Remote {
            via,
            target,
            workload,
        },
        // Every workload's node exists in a validated state; refuse rather than guess.
        None => Route::Refuse("unknown_node"),
    }
}

// === authorization, both directions ===

/// The destination's authorization policies applied to a source identity: the one check for
/// the HBONE server and for same-node connections (where this proxy is also the destination's).
/// Allowed or not, the verdict comes back for counting.
pub fn authorize(
    snap: &Snapshot,
    source: &Identity,
    dst: &Workload,
    port: u16,
    check: authz::Check<'_>,
) -> Result<Verdict, Refusal> {
    let verdict = authz::authorize(&snap.policies, source, dst, port, check);
    if verdict.allowed() {
        return Ok(verdict);
    }
    Err(Refusal {
        status: StatusCode::FORBIDDEN,
        reason: "denied",
        detail: format!(
            "{source} may not connect to {}:{port} (policy {})",
            dst.display(),
            verdict.policy()
        ),
        verdict: Some(verdict),
    })
}

// === inbound ===

/// What the HBONE handshake proved about the peer.
#[derive(Debug, Clone)]
pub struct Peer {
    /// The client certificate's SPIFFE ID.
    pub source: Identity,
    /// The server name the client asked for: the destination identity it expects.
    pub server_name: String,
}

/// A CONNECT the HBONE server will carry out.
#[derive(Debug, Clone)]
pub struct Tunnel {
    pub target: SocketAddr,
    pub dst: Arc<Workload>,
    pub dst_id: Identity,
    /// The source workload's name when the header's claim checks out, else `unknown`.
    pub source_workload: String,
    /// The client pod's address (port 0 when the claim has none) when the `forwarded` claim
    /// checks out.
    pub client: Option<SocketAddr>,
    pub verdict: Verdict,
}

/// Decides one CONNECT: only to a meshed pod this proxy serves (never the node's own addresses
/// or ports, loopback, or a pod elsewhere: no confused deputy), whose identity is the one the
/// client asked for, and that the policies allow for the proven source.
pub fn admit(
    snap: &Snapshot,
    trust_domain: &str,
    peer: &Peer,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
) -> Result<Tunnel, Refusal> {
    if method != Method::CONNECT {
        return Err(refusal(
            StatusCode::METHOD_NOT_ALLOWED,
            "hbone_bad_request",
            format!("{method} is not CONNECT; HBONE carries only CONNECT"),
        ));
    }
    let Some(target) = uri
        .authority()
        .and_then(|a| a.as_str().parse::<SocketAddr>().ok())
    else {
        return Err(refusal(
            StatusCode::BAD_REQUEST,
            "hbone_bad_request",
            format!("authority {:?} is not ip:port", uri.to_string()),
        ));
    };
    let Some(dst) = snap
        .workloads_by_ip
        .get(&target.ip())
        .filter(|w| snap.is_local(w))
        .cloned()
    else {
        return Err(refusal(
            StatusCode::FORBIDDEN,
            "not_local_pod",
            format!("{target} is not a meshed pod on this node"),
        ));
    };
    let dst_id = dst.identity(trust_domain);
    if dst_id.server_name() != peer.server_name {
        return Err(refusal(
            StatusCode::FORBIDDEN,
            "identity_mismatch",
            format!(
                "{target} is {dst_id}, but the client asked for (and verified) another identity; \
                 connect with the destination's own identity"
            ),
        ));
    }
    // A tunnel of requests is checked per request as well (by the destination's L7).
    let http = headers.contains_key(PROTOCOL_HEADER);
    let verdict = authorize(
        snap,
        &peer.source,
        &dst,
        target.port(),
        authz::Check::Connection { http },
    )?;
    // The workload name is a claim; it is believed only when it names a workload with exactly
    // the identity the certificate proved.
    let source_workload = headers
        .get(SOURCE_HEADER)
        .and_then(|v| v.to_str().ok())
        .and_then(|s| known_workload(snap, s, &peer.source, trust_domain))
        .unwrap_or_else(|| "unknown".into());
    let client = forwarded_client(snap, headers, &peer.source, trust_domain);
    Ok(Tunnel {
        target,
        dst,
        dst_id,
        source_workload,
        client,
        verdict,
    })
}

pub(super) fn known_workload(
    snap: &Snapshot,
    s: &str,
    proven: &Identity,
    td: &str,
) -> Option<String> {
    let (ns, name) = s.split_once('/')?;
    snap.workloads_by_id
        .values()
        .find(|w| w.namespace == ns && w.name == name && w.identity(td) == *proven)
        .map(|w| w.name.clone())
}

#[cfg(test)]
mod tests;
