//! Table tests of the routing steps, over one small mesh: node n1 (this proxy) and n2, with
//! node-mode and sidecar-mode pods on each, services with and without endpoints, and policies.

use http::Request;
use mesh_common::{AF_INET, AF_INET6, OrigDst};

use super::*;
use crate::state::{Scope, State};

const MESH: &str = "\
nodes:
  - { name: n1, address: 10.0.0.1, meshSource: 10.1.1.254 }
  - { name: n2, address: 10.0.0.2, meshSource: 10.1.2.254 }
workloads:
  - { name: a, namespace: x, serviceAccount: a, node: n1, ip: 10.1.1.2, cgroup: a, labels: { app: a } }
  - { name: c, namespace: x, serviceAccount: c, node: n1, ip: 10.1.1.3, cgroup: c, labels: { app: c } }
  - { name: locked, namespace: x, serviceAccount: locked, node: n1, ip: 10.1.1.4, cgroup: l, labels: { app: locked } }
  - { name: b, namespace: x, serviceAccount: b, node: n2, ip: 10.1.2.2, cgroup: b, labels: { app: b } }
  - { name: s1, namespace: x, serviceAccount: s1, node: n1, ip: 10.1.1.9, cgroup: s1, mode: sidecar, labels: { app: s1 } }
  - { name: s2, namespace: x, serviceAccount: s2, node: n2, ip: 10.1.2.9, cgroup: s2, mode: sidecar, labels: { app: s2 } }
  - { name: e, namespace: evil, serviceAccount: e, node: n2, ip: 10.1.2.66, cgroup: e }
services:
  - { name: b, namespace: x, vip: 10.96.0.1, ports: [{ port: 80, targetPort: 8080 }], selector: { app: b } }
  - { name: c, namespace: x, vip: 10.96.0.3, ports: [{ port: 80, targetPort: 8080 }], selector: { app: c } }
  - { name: side, namespace: x, vip: 10.96.0.4, ports: [{ port: 80, targetPort: 8080 }], selector: { app: s2 } }
  - { name: none, namespace: x, vip: 10.96.0.2, ports: [{ port: 80 }], selector: { app: zzz } }
authorizationPolicies:
  - { name: no-evil, namespace: x, action: DENY, from: [{ namespaces: [evil] }] }
  - { name: locked-callers, namespace: x, selector: { app: locked }, action: ALLOW, from: [{ principals: [spiffe://cluster.local/ns/x/sa/a] }], ports: [7000] }
";

const TD: &str = "cluster.local";
/// "Now" on the records' clock.
const NOW: u64 = 100_000_000_000;

fn snap() -> Arc<Snapshot> {
    let f = crate::meshfile::parse(std::path::Path::new("t"), MESH).expect("parse");
    State::new(Scope::Node("n1".into()), "/".into())
        .apply(&crate::discovery::file::to_desired(&f))
        .expect("apply")
}

fn id(snap: &Snapshot, name: &str) -> u32 {
    snap.workloads_by_id
        .values()
        .find(|w| w.name == name)
        .map(|w| w.id)
        .expect("workload")
}

fn record(workload_id: u32, dst: &str, age_ms: u64) -> OrigDst {
    let addr: SocketAddr = dst.parse().expect("addr");
    let (ip, family) = match addr.ip() {
        IpAddr::V4(v4) => ([u32::from(v4).to_be(), 0, 0, 0], AF_INET),
        IpAddr::V6(v6) => {
            let o = v6.octets();
            (
                std::array::from_fn(|i| {
                    u32::from_ne_bytes([o[4 * i], o[4 * i + 1], o[4 * i + 2], o[4 * i + 3]])
                }),
                AF_INET6,
            )
        }
    };
    OrigDst {
        ip,
        port: u32::from(addr.port()),
        family,
        workload_id,
        established_ns: NOW - age_ms * 1_000_000,
        ..Default::default()
    }
}

/// The whole outbound decision as one line: every step, with the first endpoint of a service
/// standing in for the balancer's choice.
fn outbound(snap: &Snapshot, rec: &OrigDst) -> String {
    let admitted = match admit_record(snap, rec, NOW) {
        Ok(a) => a,
        Err(r) => return format!("refuse {}", r.reason),
    };
    let target = match resolve(snap, admitted.orig) {
        Destination::Service(svc) => match svc.endpoints.first() {
            Some(ep) => ep.addr,
            None => return format!("refuse {NO_ENDPOINTS}"),
        },
        Destination::Workload { target, .. } | Destination::Outside(target) => target,
    };
    match route(snap, target) {
        Route::Local { target, workload } => {
            match authorize(
                snap,
                &admitted.source.identity(TD),
                &workload,
                target.port(),
                crate::authz::Check::Connection { http: false },
            ) {
                Ok(_) => format!("local {target} {}", workload.name),
                Err(r) => format!(
                    "refuse {} {}",
                    r.reason,
                    r.verdict.expect("verdict").policy()
                ),
            }
        }
        Route::Remote {
            via,
            target,
            workload,
        } => format!("remote {target} via {via} {}", workload.name),
        Route::Passthrough(t) => format!("passthrough {t}"),
        Route::Refuse(r) => format!("refuse {r}"),
    }
}

#[test]
fn outbound_decisions() {
    let s = snap();
    let a = id(&s, "a");
    for (who, src, dst, age_ms, want) in [
        ("pod on this node", a, "10.1.1.3:9", 1, "local 10.1.1.3:9 c"),
        (
            "pod on another node",
            a,
            "10.1.2.2:9",
            1,
            "remote 10.1.2.2:9 via 10.0.0.2:15008 b",
        ),
        (
            "VIP, remote endpoint",
            a,
            "10.96.0.1:80",
            1,
            "remote 10.1.2.2:8080 via 10.0.0.2:15008 b",
        ),
        (
            "VIP, local endpoint",
            a,
            "10.96.0.3:80",
            1,
            "local 10.1.1.3:8080 c",
        ),
        (
            "VIP, sidecar endpoint",
            a,
            "10.96.0.4:80",
            1,
            "remote 10.1.2.9:8080 via 10.1.2.9:15008 s2",
        ),
        (
            "VIP without endpoints",
            a,
            "10.96.0.2:80",
            1,
            "refuse no_endpoints",
        ),
        (
            "VIP, undeclared port",
            a,
            "10.96.0.1:81",
            1,
            "passthrough 10.96.0.1:81",
        ),
        (
            "sidecar pod on this node",
            a,
            "10.1.1.9:80",
            1,
            "remote 10.1.1.9:80 via 10.1.1.9:15008 s1",
        ),
        (
            "sidecar pod elsewhere",
            a,
            "10.1.2.9:80",
            1,
            "remote 10.1.2.9:80 via 10.1.2.9:15008 s2",
        ),
        (
            "outside the mesh",
            a,
            "192.0.2.1:443",
            1,
            "passthrough 192.0.2.1:443",
        ),
        (
            "a node's own address",
            a,
            "10.0.0.2:22",
            1,
            "passthrough 10.0.0.2:22",
        ),
        (
            "IPv6 outside",
            a,
            "[2001:db8::1]:443",
            1,
            "passthrough [2001:db8::1]:443",
        ),
        (
            "same-node pod, policy allows",
            a,
            "10.1.1.4:7000",
            1,
            "local 10.1.1.4:7000 locked",
        ),
        (
            "same-node pod, port not allowed",
            a,
            "10.1.1.4:7001",
            1,
            "refuse denied no_allow_match",
        ),
        (
            "stale record",
            a,
            "10.1.1.3:9",
            11_000,
            "refuse stale_record",
        ),
        (
            "record at the age limit",
            a,
            "10.1.1.3:9",
            10_000,
            "local 10.1.1.3:9 c",
        ),
        (
            "unknown workload id",
            999_999,
            "10.1.1.3:9",
            1,
            "refuse unknown_source",
        ),
        (
            "source on another node",
            id(&s, "b"),
            "10.1.1.3:9",
            1,
            "refuse source_not_served",
        ),
        (
            "source is a sidecar pod",
            id(&s, "s1"),
            "10.1.1.3:9",
            1,
            "refuse source_not_served",
        ),
    ] {
        assert_eq!(outbound(&s, &record(src, dst, age_ms)), want, "{who}");
    }
}

#[test]
fn same_node_policy_denies_by_source_namespace() {
    // A DENY for namespace `evil` applies wherever the destination is served; here the source
    // is remote, so only the inbound side sees it (below), but the pure check is the same.
    let s = snap();
    let evil = Identity::new(TD, "evil", "e");
    let c = s.workloads_by_ip[&"10.1.1.3".parse::<IpAddr>().expect("ip")].clone();
    let r = authorize(
        &s,
        &evil,
        &c,
        80,
        crate::authz::Check::Connection { http: false },
    )
    .expect_err("denied");
    assert_eq!((r.reason, r.status), ("denied", StatusCode::FORBIDDEN));
    assert_eq!(r.verdict.expect("verdict").policy(), "x/no-evil");
}

fn connect(
    s: &Snapshot,
    source: (&str, &str),
    server_name: &str,
    method: &str,
    authority: &str,
    header: Option<&str>,
) -> String {
    let peer = Peer {
        source: Identity::new(TD, source.0, source.1),
        server_name: server_name.into(),
    };
    let mut b = Request::builder().method(method);
    if !authority.is_empty() {
        b = b.uri(authority);
    }
    if let Some(h) = header {
        b = b.header(SOURCE_HEADER, h);
    }
    let Ok(req) = b.body(()) else {
        return "unparsable".into();
    };
    match admit(s, TD, &peer, req.method(), req.uri(), req.headers()) {
        Ok(t) => format!(
            "tunnel {} {} from {} ({})",
            t.target,
            t.dst.name,
            t.source_workload,
            t.verdict.policy()
        ),
        Err(r) => format!("{} {}", r.status.as_u16(), r.reason),
    }
}

#[test]
fn inbound_decisions() {
    let s = snap();
    let c_name = Identity::new(TD, "x", "c").server_name();
    let locked = Identity::new(TD, "x", "locked").server_name();
    let b_src = ("x", "b");
    for (who, src, name, method, authority, header, want) in [
        (
            "a local pod",
            b_src,
            c_name.as_str(),
            "CONNECT",
            "10.1.1.3:8080",
            Some("x/b"),
            "tunnel 10.1.1.3:8080 c from b (default)",
        ),
        (
            "no source header",
            b_src,
            &c_name,
            "CONNECT",
            "10.1.1.3:8080",
            None,
            "tunnel 10.1.1.3:8080 c from unknown (default)",
        ),
        (
            "header claims another identity's workload",
            b_src,
            &c_name,
            "CONNECT",
            "10.1.1.3:8080",
            Some("x/a"),
            "tunnel 10.1.1.3:8080 c from unknown (default)",
        ),
        (
            "header is not namespace/name",
            b_src,
            &c_name,
            "CONNECT",
            "10.1.1.3:8080",
            Some("b"),
            "tunnel 10.1.1.3:8080 c from unknown (default)",
        ),
        (
            "not CONNECT",
            b_src,
            &c_name,
            "GET",
            "10.1.1.3:8080",
            None,
            "405 hbone_bad_request",
        ),
        (
            "authority is a name",
            b_src,
            &c_name,
            "CONNECT",
            "c.x.svc:8080",
            None,
            "400 hbone_bad_request",
        ),
        (
            "authority without a port",
            b_src,
            &c_name,
            "CONNECT",
            "10.1.1.3",
            None,
            "400 hbone_bad_request",
        ),
        (
            "no authority",
            b_src,
            &c_name,
            "CONNECT",
            "",
            None,
            "400 hbone_bad_request",
        ),
        (
            "the node's admin port",
            b_src,
            &c_name,
            "CONNECT",
            "10.0.0.1:15000",
            None,
            "403 not_local_pod",
        ),
        (
            "the node's metrics port",
            b_src,
            &c_name,
            "CONNECT",
            "10.0.0.1:15020",
            None,
            "403 not_local_pod",
        ),
        (
            "loopback",
            b_src,
            &c_name,
            "CONNECT",
            "127.0.0.1:8080",
            None,
            "403 not_local_pod",
        ),
        (
            "IPv6 loopback",
            b_src,
            &c_name,
            "CONNECT",
            "[::1]:8080",
            None,
            "403 not_local_pod",
        ),
        (
            "a pod on another node",
            b_src,
            &c_name,
            "CONNECT",
            "10.1.2.2:8080",
            None,
            "403 not_local_pod",
        ),
        (
            "a sidecar pod on this node",
            b_src,
            &c_name,
            "CONNECT",
            "10.1.1.9:8080",
            None,
            "403 not_local_pod",
        ),
        (
            "an address outside the mesh",
            b_src,
            &c_name,
            "CONNECT",
            "192.0.2.1:80",
            None,
            "403 not_local_pod",
        ),
        (
            "asked for another identity",
            b_src,
            &locked,
            "CONNECT",
            "10.1.1.3:8080",
            None,
            "403 identity_mismatch",
        ),
        (
            "denied by namespace",
            ("evil", "e"),
            &c_name,
            "CONNECT",
            "10.1.1.3:8080",
            None,
            "403 denied",
        ),
        (
            "allowed principal and port",
            ("x", "a"),
            &locked,
            "CONNECT",
            "10.1.1.4:7000",
            Some("x/a"),
            "tunnel 10.1.1.4:7000 locked from a (x/locked-callers)",
        ),
        (
            "allowed principal, other port",
            ("x", "a"),
            &locked,
            "CONNECT",
            "10.1.1.4:7001",
            None,
            "403 denied",
        ),
        (
            "principal not allowed",
            b_src,
            &locked,
            "CONNECT",
            "10.1.1.4:7000",
            None,
            "403 denied",
        ),
    ] {
        assert_eq!(
            connect(&s, src, name, method, authority, header),
            want,
            "{who}"
        );
    }
}

#[test]
fn a_forwarded_client_is_believed_only_for_the_proven_identity() {
    let s = snap();
    let b = Identity::new(TD, "x", "b");
    let with = |v: &str| {
        let mut h = HeaderMap::new();
        h.insert(FORWARDED_HEADER, v.parse().expect("header"));
        forwarded_client(&s, &h, &b, TD).map(|ip| ip.to_string())
    };
    for (forwarded, want) in [
        ("for=10.1.2.2", Some("10.1.2.2:0")),
        ("for=\"10.1.2.2:4711\"", Some("10.1.2.2:4711")),
        ("for=\"10.1.1.2:4711\"", None),
        ("for=\"10.1.2.2\";proto=https", Some("10.1.2.2:0")),
        ("For=10.1.2.2, for=10.1.1.2", Some("10.1.2.2:0")),
        // another workload's address: a node cannot speak for pods of other identities
        ("for=10.1.1.2", None),
        ("for=10.1.2.66", None),
        // not a workload at all, or not an address
        ("for=192.0.2.1", None),
        ("for=unknown", None),
        ("for=\"[fd00::1]\"", None),
        ("by=10.1.2.2", None),
        ("", None),
    ] {
        assert_eq!(with(forwarded).as_deref(), want, "{forwarded:?}");
    }
    assert_eq!(forwarded_client(&s, &HeaderMap::new(), &b, TD), None);
    for (addr, want) in [
        ("10.1.2.2:0", "for=10.1.2.2"),
        ("10.1.2.2:4711", "for=\"10.1.2.2:4711\""),
        ("[fd00::1]:0", "for=\"[fd00::1]\""),
        ("[fd00::1]:4711", "for=\"[fd00::1]:4711\""),
    ] {
        assert_eq!(forwarded_value(addr.parse().expect("addr")), want);
    }
}
