//! The daemon's one in-memory picture of the mesh. A source (the mesh file today, Kubernetes
//! discovery later) produces the neutral [`desired::Desired`] model; [`State::apply`] compiles it
//! into an immutable [`Snapshot`] and publishes it on a `tokio::sync::watch`. The proxy reads the
//! current snapshot per connection; enrollment, the certificate manager and the proxy's own
//! caches subscribe and follow every change. State knows nothing of where the model came from.
//!
//! A connection task holds one consistent snapshot for its whole decision. Workload ids (what the
//! kernel's records carry) are stable for a workload while it exists and never reused: a record
//! with a departed workload's id cannot be attributed to a newcomer.

pub mod desired;
pub mod routes;

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::PathBuf,
    sync::{Arc, Mutex},
};

use tokio::sync::watch;

use self::desired::{AppProtocol, Desired, Endpoints, NodeSpec, PolicySpec, ProxyMode, RouteDesc};

/// The HBONE port of every proxy: a node's, or a sidecar's inside its pod.
pub const HBONE_PORT: u16 = 15008;

/// Which workloads this daemon serves.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Scope {
    /// A node daemon: the node-mode workloads scheduled on this node.
    Node(String),
    /// A sidecar: exactly this workload (namespace, name), which must be in sidecar mode.
    Sidecar { namespace: String, name: String },
}

impl Default for Scope {
    fn default() -> Self {
        Self::Node(String::new())
    }
}

impl Scope {
    /// Parses `namespace/name` for a sidecar.
    pub fn sidecar(workload: &str) -> Result<Self, String> {
        match workload.split_once('/') {
            Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => {
                Ok(Self::Sidecar {
                    namespace: ns.into(),
                    name: name.into(),
                })
            }
            _ => Err(format!(
                "--workload {workload:?} is not namespace/name; pass the pod this sidecar serves, \
                 e.g. demo/client"
            )),
        }
    }

    pub fn is_sidecar(&self) -> bool {
        matches!(self, Self::Sidecar { .. })
    }

    /// Whether this daemon serves `w`.
    pub fn serves(&self, w: &Workload) -> bool {
        match self {
            Self::Node(node) => w.mode == ProxyMode::Node && w.node == *node,
            Self::Sidecar { namespace, name } => w.namespace == *namespace && w.name == *name,
        }
    }
}

/// Where a sidecar connects to its own pod's app from (Istio's inbound passthrough source): a
/// loopback address that no app uses, so the pod's STRICT check can tell the sidecar's
/// connections from anybody else's.
pub const SIDECAR_MESH_SOURCE: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 6);

/// A meshed workload instance (a pod).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Workload {
    /// The id the kernel carries in its records; stable for (namespace, name) while the daemon
    /// runs and never reused for another workload.
    pub id: u32,
    pub namespace: String,
    pub name: String,
    pub service_account: String,
    pub node: String,
    pub ip: Ipv4Addr,
    /// The pod-level cgroup whose sockets are this workload's (resolved against the cgroup root).
    pub cgroup: PathBuf,
    pub probe_ports: Vec<u16>,
    /// Ports whose server reads a PROXY protocol v2 header before the client's bytes.
    pub proxy_protocol_ports: Vec<u16>,
    /// Selected by services and authorization policies.
    pub labels: std::collections::BTreeMap<String, String>,
    /// Who proxies it: its node's daemon or its own sidecar.
    pub mode: ProxyMode,
}

impl Workload {
    /// The workload's SPIFFE identity in `trust_domain`.
    pub fn identity(&self, trust_domain: &str) -> crate::identity::Identity {
        crate::identity::Identity::new(trust_domain, &self.namespace, &self.service_account)
    }

    /// `namespace/name`, as logs and errors show it.
    pub fn display(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// A service port: its VIP and port, and the endpoints behind it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Service {
    pub namespace: String,
    pub name: String,
    /// The port's name, when the source gives one.
    pub port_name: Option<String>,
    /// What the port speaks, when the source says (`appProtocol`); None: detect.
    pub protocol: Option<AppProtocol>,
    pub endpoints: Vec<Endpoint>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    pub addr: SocketAddr,
    pub workload: Arc<Workload>,
}

/// One consistent view of the mesh.
#[derive(Debug, Default)]
pub struct Snapshot {
    /// This daemon's node (absent in an empty state); a sidecar's is its pod's node.
    pub node: Option<NodeSpec>,
    /// Which workloads this daemon serves.
    pub scope: Scope,
    pub nodes: HashMap<String, NodeSpec>,
    pub workloads_by_id: HashMap<u32, Arc<Workload>>,
    pub workloads_by_ip: HashMap<IpAddr, Arc<Workload>>,
    /// Keyed by VIP and service port.
    pub services: HashMap<SocketAddr, Arc<Service>>,
    /// L4 authorization policies, enforced where the destination runs.
    pub policies: Vec<PolicySpec>,
    /// Routes attached to services, as the source gave them (for `/config_dump`).
    pub routes: Vec<RouteDesc>,
    /// The same routes compiled, keyed by the VIP:port of the service port they attach to.
    pub route_tables: HashMap<SocketAddr, Arc<routes::RouteTable>>,
    /// Endpoint (pod address and target port) of a workload on this node → the service it
    /// serves (`namespace/name`; the first by name when several select it): the
    /// `destination_service` of an inbound tunnel.
    local_services: HashMap<SocketAddr, String>,
}

impl Snapshot {
    pub fn workload(&self, id: u32) -> Option<&Arc<Workload>> {
        self.workloads_by_id.get(&id)
    }

    /// The service (`namespace/name`) a local endpoint serves, if any.
    pub fn local_service_of(&self, endpoint: SocketAddr) -> Option<&str> {
        self.local_services.get(&endpoint).map(String::as_str)
    }

    /// The workloads this daemon serves: the node-mode ones on its node, or a sidecar's pod.
    pub fn local_workloads(&self) -> impl Iterator<Item = &Arc<Workload>> {
        self.workloads_by_id
            .values()
            .filter(move |w| self.scope.serves(w))
    }

    pub fn is_local(&self, w: &Workload) -> bool {
        self.scope.serves(w)
    }

    /// The HBONE address of the proxy that serves `w`: its node's, or its own sidecar's.
    pub fn proxy_for(&self, w: &Workload) -> Option<SocketAddr> {
        match w.mode {
            ProxyMode::Sidecar => Some(SocketAddr::new(IpAddr::V4(w.ip), HBONE_PORT)),
            ProxyMode::Node => self
                .nodes
                .get(&w.node)
                .map(|n| SocketAddr::new(IpAddr::V4(n.address), HBONE_PORT)),
        }
    }

    /// Where this daemon's next connection to a pod it serves leaves from: the node's mesh
    /// source (the next address of its block, in turn), or a sidecar's loopback one.
    pub fn mesh_source(&self) -> Option<IpAddr> {
        if self.scope.is_sidecar() {
            return Some(IpAddr::V4(SIDECAR_MESH_SOURCE));
        }
        self.node.as_ref().map(|n| IpAddr::V4(n.mesh_source.pick()))
    }
}

/// Workload ids: stable per (namespace, name) while the workload exists, never reused.
#[derive(Default)]
struct Ids {
    by_name: HashMap<(String, String), u32>,
    next: u32,
}

/// The published snapshot, the view it is compiled for, and the id allocator.
pub struct State {
    tx: watch::Sender<Arc<Snapshot>>,
    scope: Scope,
    cgroup_root: PathBuf,
    ids: Mutex<Ids>,
}

impl Default for State {
    fn default() -> Self {
        Self::new(Scope::default(), PathBuf::from("/"))
    }
}

impl State {
    /// An empty state for a daemon serving `scope`; relative workload cgroups are resolved
    /// against `cgroup_root`.
    pub fn new(scope: Scope, cgroup_root: PathBuf) -> Self {
        Self {
            tx: watch::Sender::new(Arc::new(Snapshot::default())),
            scope,
            cgroup_root,
            ids: Mutex::default(),
        }
    }

    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.tx.borrow().clone()
    }

    /// Follows every snapshot published from now on (the current one is marked seen).
    pub fn subscribe(&self) -> watch::Receiver<Arc<Snapshot>> {
        self.tx.subscribe()
    }

    /// Workload ids held (for the state-size gauges: it follows the workloads, never only grows).
    pub fn workload_ids(&self) -> usize {
        self.ids
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .by_name
            .len()
    }

    /// Compiles `desired` and publishes it; on an error nothing changes (the last good
    /// snapshot stays). Ids of workloads no longer desired are freed.
    pub fn apply(&self, desired: &Desired) -> Result<Arc<Snapshot>, String> {
        let snap = Arc::new(self.compile(desired)?);
        {
            let mut ids = self.ids.lock().unwrap_or_else(|p| p.into_inner());
            let wanted: std::collections::HashSet<(&str, &str)> = desired
                .workloads
                .iter()
                .map(|w| (w.namespace.as_str(), w.name.as_str()))
                .collect();
            ids.by_name
                .retain(|(ns, name), _| wanted.contains(&(ns.as_str(), name.as_str())));
        }
        self.tx.send_replace(snap.clone());
        Ok(snap)
    }

    fn id_for(&self, namespace: &str, name: &str) -> u32 {
        let mut ids = self.ids.lock().unwrap_or_else(|p| p.into_inner());
        let key = (namespace.to_string(), name.to_string());
        if let Some(id) = ids.by_name.get(&key) {
            return *id;
        }
        let id = ids.next;
        ids.next = ids.next.wrapping_add(1);
        ids.by_name.insert(key, id);
        id
    }

    /// The snapshot `desired` describes, from the view of this daemon's scope.
    pub fn compile(&self, desired: &Desired) -> Result<Snapshot, String> {
        let me = match &self.scope {
            Scope::Node(node) => node.as_str(),
            Scope::Sidecar { namespace, name } => {
                desired.sidecar_workload(namespace, name)?.node.as_str()
            }
        };
        let nodes: HashMap<String, NodeSpec> = desired
            .nodes
            .iter()
            .map(|n| (n.name.clone(), n.clone()))
            .collect();
        let node = nodes.get(me).cloned().ok_or_else(|| {
            format!(
                "this node ({me:?}) is not in the mesh file's `nodes`; add it or pass --node with \
                 one of: {}",
                desired
                    .nodes
                    .iter()
                    .map(|n| n.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        })?;
        let mut snap = Snapshot {
            node: Some(node),
            scope: self.scope.clone(),
            nodes,
            policies: desired.policies.clone(),
            routes: desired.routes.clone(),
            ..Snapshot::default()
        };
        for w in &desired.workloads {
            let cgroup = if w.cgroup.is_absolute() {
                w.cgroup.clone()
            } else {
                self.cgroup_root.join(&w.cgroup)
            };
            let wl = Arc::new(Workload {
                id: self.id_for(&w.namespace, &w.name),
                namespace: w.namespace.clone(),
                name: w.name.clone(),
                service_account: w.service_account.clone(),
                node: w.node.clone(),
                ip: w.ip,
                cgroup,
                probe_ports: w.probe_ports.clone(),
                proxy_protocol_ports: w.proxy_protocol_ports.clone(),
                labels: w.labels.clone(),
                mode: w.mode,
            });
            snap.workloads_by_ip.insert(IpAddr::V4(w.ip), wl.clone());
            snap.workloads_by_id.insert(wl.id, wl);
        }
        for s in &desired.services {
            let selected: Vec<Arc<Workload>> = match &s.endpoints {
                Endpoints::Selector(sel) => desired
                    .workloads
                    .iter()
                    .filter(|w| sel.iter().all(|(k, v)| w.labels.get(k) == Some(v)))
                    .filter_map(|w| snap.workloads_by_ip.get(&IpAddr::V4(w.ip)).cloned())
                    .collect(),
                Endpoints::Addresses(ips) => ips
                    .iter()
                    .filter_map(|ip| snap.workloads_by_ip.get(&IpAddr::V4(*ip)).cloned())
                    .collect(),
            };
            for p in &s.ports {
                let endpoints: Vec<Endpoint> = selected
                    .iter()
                    .map(|wl| Endpoint {
                        addr: SocketAddr::new(IpAddr::V4(wl.ip), p.target_port),
                        workload: wl.clone(),
                    })
                    .collect();
                let name = format!("{}/{}", s.namespace, s.name);
                for ep in endpoints.iter().filter(|e| e.workload.node == me) {
                    snap.local_services
                        .entry(ep.addr)
                        .and_modify(|n| {
                            if name < *n {
                                n.clone_from(&name);
                            }
                        })
                        .or_insert_with(|| name.clone());
                }
                snap.services.insert(
                    SocketAddr::new(IpAddr::V4(s.vip), p.port),
                    Arc::new(Service {
                        namespace: s.namespace.clone(),
                        name: s.name.clone(),
                        port_name: p.name.clone(),
                        protocol: p.protocol,
                        endpoints,
                    }),
                );
            }
        }
        snap.route_tables = compile_routes(desired, &desired.routes)?;
        Ok(snap)
    }
}

/// `routes` compiled against `desired`'s services. A source that must keep going past one bad
/// route (Kubernetes) checks each route alone with it.
pub fn compile_routes(
    desired: &Desired,
    routes: &[RouteDesc],
) -> Result<HashMap<SocketAddr, Arc<routes::RouteTable>>, String> {
    routes::compile(routes, |ns, name| {
        desired
            .services
            .iter()
            .find(|s| s.namespace == ns && s.name == name)
            .map(|s| routes::ServiceRef {
                namespace: &s.namespace,
                name: &s.name,
                ports: s
                    .ports
                    .iter()
                    .map(|p| (p.port, SocketAddr::new(IpAddr::V4(s.vip), p.port)))
                    .collect(),
            })
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{discovery::file::to_desired, meshfile::parse};

    const FILE: &str = "\
nodes:
  - { name: n1, address: 10.0.0.1, meshSource: 10.1.1.254 }
  - { name: n2, address: 10.0.0.2, meshSource: 10.1.2.254 }
workloads:
  - { name: a, namespace: x, node: n1, ip: 10.1.1.2, cgroup: pa, labels: { app: a } }
  - { name: b1, namespace: x, node: n2, ip: 10.1.2.2, cgroup: /cg/pb1, labels: { app: b } }
  - { name: b2, namespace: x, node: n1, ip: 10.1.1.3, cgroup: pb2, labels: { app: b } }
services:
  - { name: b, namespace: x, vip: 10.96.0.1, ports: [{ port: 80, targetPort: 8080, name: web, appProtocol: http }], selector: { app: b } }
";

    fn n1() -> Scope {
        Scope::Node("n1".into())
    }

    fn desired(text: &str) -> Desired {
        to_desired(&parse(std::path::Path::new("t"), text).expect("parse"))
    }

    fn build(text: &str, scope: Scope, root: &str) -> Result<Snapshot, String> {
        State::new(scope, root.into()).compile(&desired(text))
    }

    #[test]
    fn sidecar_scope_serves_its_pod_and_reaches_peers_at_their_own_hbone_port() {
        let text = FILE
            .replace(
                "cgroup: pa, labels: { app: a } }",
                "cgroup: pa, labels: { app: a }, mode: sidecar }",
            )
            .replace(
                "cgroup: /cg/pb1, labels: { app: b } }",
                "cgroup: /cg/pb1, labels: { app: b }, mode: sidecar }",
            );
        let scope = Scope::sidecar("x/a").expect("scope");
        let snap = build(&text, scope, "/").expect("build");
        let local: Vec<&str> = snap.local_workloads().map(|w| w.name.as_str()).collect();
        assert_eq!(local, ["a"], "a sidecar serves only its own pod");
        let ip = |s: &str| s.parse::<IpAddr>().expect("ip");
        let b1 = &snap.workloads_by_ip[&ip("10.1.2.2")];
        let b2 = &snap.workloads_by_ip[&ip("10.1.1.3")];
        assert_eq!(
            snap.proxy_for(b1).expect("b1").to_string(),
            "10.1.2.2:15008"
        );
        assert_eq!(
            snap.proxy_for(b2).expect("b2").to_string(),
            "10.0.0.1:15008"
        );
        assert_eq!(snap.mesh_source(), Some(ip("127.0.0.6")));
        // The node daemon of n1 leaves the sidecar pod alone.
        let node = build(&text, n1(), "/").expect("build");
        let local: Vec<&str> = node.local_workloads().map(|w| w.name.as_str()).collect();
        assert_eq!(local, ["b2"]);
        // A sidecar for a node-mode pod, or an unknown one, is refused with the fix.
        let e =
            build(&text, Scope::sidecar("x/b2").expect("scope"), "/").expect_err("node-mode pod");
        assert!(e.contains("mode: sidecar") && e.contains("n1"), "{e}");
        let e = build(&text, Scope::sidecar("x/zz").expect("scope"), "/").expect_err("unknown pod");
        assert!(e.contains("x/zz"), "{e}");
        assert!(Scope::sidecar("nons").is_err());
    }

    #[test]
    fn snapshot_resolves_services_cgroups_and_locality() {
        let snap = build(FILE, n1(), "/root").expect("build");
        let svc = snap.services[&"10.96.0.1:80".parse().expect("addr")].clone();
        let mut eps: Vec<String> = svc.endpoints.iter().map(|e| e.addr.to_string()).collect();
        eps.sort();
        assert_eq!(eps, ["10.1.1.3:8080", "10.1.2.2:8080"]);
        assert_eq!(svc.port_name.as_deref(), Some("web"));
        assert_eq!(svc.protocol, Some(AppProtocol::Http));
        let a = &snap.workloads_by_ip[&"10.1.1.2".parse::<IpAddr>().expect("ip")];
        assert_eq!(a.cgroup, PathBuf::from("/root/pa"));
        let local: Vec<&str> = {
            let mut v: Vec<&str> = snap.local_workloads().map(|w| w.name.as_str()).collect();
            v.sort();
            v
        };
        assert_eq!(local, ["a", "b2"]);
        assert!(snap.routes.is_empty());
    }

    #[test]
    fn explicit_endpoints_resolve_to_workloads() {
        let mut d = desired(FILE);
        d.services[0].endpoints = Endpoints::Addresses(vec![
            "10.1.2.2".parse().expect("ip"),
            // Not a workload: no endpoint.
            "10.9.9.9".parse().expect("ip"),
        ]);
        let snap = State::new(n1(), "/".into()).compile(&d).expect("build");
        let svc = &snap.services[&"10.96.0.1:80".parse().expect("addr")];
        let eps: Vec<String> = svc.endpoints.iter().map(|e| e.addr.to_string()).collect();
        assert_eq!(eps, ["10.1.2.2:8080"]);
    }

    #[test]
    fn ids_are_stable_across_reloads_never_reused_and_freed() {
        let st = State::new(n1(), "/".into());
        let mut d = desired(FILE);
        let s1 = st.apply(&d).expect("apply");
        assert_eq!(st.workload_ids(), 3);
        let id_b2 = s1.workloads_by_ip[&"10.1.1.3".parse::<IpAddr>().expect("ip")].id;
        let a = d.workloads.remove(0);
        let s2 = st.apply(&d).expect("apply");
        assert_eq!(
            s2.workloads_by_ip[&"10.1.1.3".parse::<IpAddr>().expect("ip")].id,
            id_b2
        );
        assert_eq!(st.workload_ids(), 2, "a departed workload's id is freed");
        // `a` comes back: a new id, never the old one (a kernel record with the old id must not
        // be attributed to it).
        d.workloads.push(a);
        let s3 = st.apply(&d).expect("apply");
        let ids: std::collections::HashSet<u32> = s1.workloads_by_id.keys().copied().collect();
        let back = s3.workloads_by_ip[&"10.1.1.2".parse::<IpAddr>().expect("ip")].id;
        assert!(!ids.contains(&back), "a returning workload gets a new id");
        assert_eq!(st.workload_ids(), 3);
    }

    #[test]
    fn a_bad_model_changes_nothing_and_subscribers_see_each_good_one() {
        let st = State::new(Scope::Node("n1".into()), "/".into());
        let mut rx = st.subscribe();
        st.apply(&desired(FILE)).expect("apply");
        assert!(rx.has_changed().expect("open"), "subscribers are told");
        let seen = rx.borrow_and_update().clone();
        let mut bad = desired(FILE);
        bad.nodes.retain(|n| n.name != "n1");
        let e = st
            .apply(&bad)
            .expect_err("this node is gone from the model");
        assert!(e.contains("n1"), "{e}");
        assert!(!rx.has_changed().expect("open"), "nothing published");
        assert!(
            Arc::ptr_eq(&st.snapshot(), &seen),
            "the last good snapshot stays"
        );
    }

    #[test]
    fn unknown_self_node_is_explained() {
        let e = build(FILE, Scope::Node("n9".into()), "/").expect_err("unknown node");
        assert!(e.contains("n9") && e.contains("n1, n2"), "{e}");
    }
}
