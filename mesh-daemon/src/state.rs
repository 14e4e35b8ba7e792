//! The daemon's one in-memory picture of the mesh, fed by the mesh file today and by Kubernetes
//! discovery later: both produce a [`Snapshot`], and the proxy reads whichever is current.
//!
//! Snapshots are immutable; a reload builds a new one and swaps it in, so a connection task holds
//! one consistent view for its whole decision.

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::PathBuf,
    sync::{Arc, Mutex, RwLock},
};

use crate::meshfile::{MeshFile, NodeSpec, PolicySpec, ProxyMode};

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

/// The workload a sidecar serves: it must be in the mesh file and in sidecar mode (otherwise its
/// node's daemon serves it). One check for start-up and every reload.
pub fn sidecar_workload<'f>(
    file: &'f MeshFile,
    namespace: &str,
    name: &str,
) -> Result<&'f crate::meshfile::WorkloadSpec, String> {
    let w = file
        .workloads
        .iter()
        .find(|w| w.namespace == namespace && w.name == name)
        .ok_or_else(|| {
            format!(
                "workload {namespace}/{name} is not in the mesh file's `workloads`; a sidecar \
                 serves one workload: add it or pass another --workload"
            )
        })?;
    if w.mode != ProxyMode::Sidecar {
        return Err(format!(
            "workload {namespace}/{name} has `mode: {}`, so node {}'s daemon serves it; set \
             `mode: sidecar` on it to run it with a sidecar",
            w.mode.as_str(),
            w.node
        ));
    }
    Ok(w)
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
}

impl Snapshot {
    pub fn workload(&self, id: u32) -> Option<&Arc<Workload>> {
        self.workloads_by_id.get(&id)
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

    /// Where this daemon connects to the pods it serves from: the node's mesh source, or a
    /// sidecar's loopback one.
    pub fn mesh_source(&self) -> Option<IpAddr> {
        if self.scope.is_sidecar() {
            return Some(IpAddr::V4(SIDECAR_MESH_SOURCE));
        }
        self.node.as_ref().map(|n| IpAddr::V4(n.mesh_source))
    }
}

/// The current snapshot plus the id allocator that outlives snapshots.
#[derive(Default)]
pub struct State {
    current: RwLock<Arc<Snapshot>>,
    ids: Mutex<HashMap<(String, String), u32>>,
}

impl State {
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn replace(&self, snap: Snapshot) {
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(snap);
    }

    fn id_for(&self, namespace: &str, name: &str) -> u32 {
        let mut ids = self.ids.lock().unwrap_or_else(|p| p.into_inner());
        let next = ids.len() as u32;
        *ids.entry((namespace.to_string(), name.to_string()))
            .or_insert(next)
    }

    /// Builds the snapshot a (validated) mesh file describes, from the view of a daemon serving
    /// `scope`. Relative cgroup paths are resolved against `cgroup_root`.
    pub fn build(
        &self,
        file: &MeshFile,
        scope: &Scope,
        cgroup_root: &std::path::Path,
    ) -> Result<Snapshot, String> {
        let me = match scope {
            Scope::Node(node) => node.as_str(),
            Scope::Sidecar { namespace, name } => {
                sidecar_workload(file, namespace, name)?.node.as_str()
            }
        };
        let nodes: HashMap<String, NodeSpec> = file
            .nodes
            .iter()
            .map(|n| (n.name.clone(), n.clone()))
            .collect();
        let node = nodes.get(me).cloned().ok_or_else(|| {
            format!(
                "this node ({me:?}) is not in the mesh file's `nodes`; add it or pass --node with \
                 one of: {}",
                file.nodes
                    .iter()
                    .map(|n| n.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        })?;
        let mut snap = Snapshot {
            node: Some(node),
            scope: scope.clone(),
            nodes,
            policies: file.authorization_policies.clone(),
            ..Snapshot::default()
        };
        for w in &file.workloads {
            let cgroup = if w.cgroup.is_absolute() {
                w.cgroup.clone()
            } else {
                cgroup_root.join(&w.cgroup)
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
                labels: w.labels.clone(),
                mode: w.mode,
            });
            snap.workloads_by_ip.insert(IpAddr::V4(w.ip), wl.clone());
            snap.workloads_by_id.insert(wl.id, wl);
        }
        for s in &file.services {
            let selected: Vec<(&crate::meshfile::WorkloadSpec, Arc<Workload>)> = file
                .workloads
                .iter()
                .filter(|w| s.selector.iter().all(|(k, v)| w.labels.get(k) == Some(v)))
                .filter_map(|w| {
                    snap.workloads_by_ip
                        .get(&IpAddr::V4(w.ip))
                        .map(|wl| (w, wl.clone()))
                })
                .collect();
            for p in &s.ports {
                let endpoints = selected
                    .iter()
                    .map(|(spec, wl)| Endpoint {
                        addr: SocketAddr::new(IpAddr::V4(spec.ip), p.target()),
                        workload: wl.clone(),
                    })
                    .collect();
                snap.services.insert(
                    SocketAddr::new(IpAddr::V4(s.vip), p.port),
                    Arc::new(Service {
                        namespace: s.namespace.clone(),
                        name: s.name.clone(),
                        endpoints,
                    }),
                );
            }
        }
        Ok(snap)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::meshfile::parse;

    const FILE: &str = "\
nodes:
  - { name: n1, address: 10.0.0.1, meshSource: 10.1.1.254 }
  - { name: n2, address: 10.0.0.2, meshSource: 10.1.2.254 }
workloads:
  - { name: a, namespace: x, node: n1, ip: 10.1.1.2, cgroup: pa, labels: { app: a } }
  - { name: b1, namespace: x, node: n2, ip: 10.1.2.2, cgroup: /cg/pb1, labels: { app: b } }
  - { name: b2, namespace: x, node: n1, ip: 10.1.1.3, cgroup: pb2, labels: { app: b } }
services:
  - { name: b, namespace: x, vip: 10.96.0.1, ports: [{ port: 80, targetPort: 8080 }], selector: { app: b } }
";

    fn n1() -> Scope {
        Scope::Node("n1".into())
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
        let f = parse(std::path::Path::new("t"), &text).expect("parse");
        let st = State::default();
        let scope = Scope::sidecar("x/a").expect("scope");
        let snap = st
            .build(&f, &scope, std::path::Path::new("/"))
            .expect("build");
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
        let node = st
            .build(&f, &n1(), std::path::Path::new("/"))
            .expect("build");
        let local: Vec<&str> = node.local_workloads().map(|w| w.name.as_str()).collect();
        assert_eq!(local, ["b2"]);
        // A sidecar for a node-mode pod, or an unknown one, is refused with the fix.
        let e = st
            .build(
                &f,
                &Scope::sidecar("x/b2").expect("scope"),
                std::path::Path::new("/"),
            )
            .expect_err("node-mode pod");
        assert!(e.contains("mode: sidecar") && e.contains("n1"), "{e}");
        let e = st
            .build(
                &f,
                &Scope::sidecar("x/zz").expect("scope"),
                std::path::Path::new("/"),
            )
            .expect_err("unknown pod");
        assert!(e.contains("x/zz"), "{e}");
        assert!(Scope::sidecar("nons").is_err());
    }

    #[test]
    fn snapshot_resolves_services_cgroups_and_locality() {
        let f = parse(std::path::Path::new("t"), FILE).expect("parse");
        let st = State::default();
        let snap = st
            .build(&f, &n1(), std::path::Path::new("/root"))
            .expect("build");
        let svc = snap.services[&"10.96.0.1:80".parse().expect("addr")].clone();
        let mut eps: Vec<String> = svc.endpoints.iter().map(|e| e.addr.to_string()).collect();
        eps.sort();
        assert_eq!(eps, ["10.1.1.3:8080", "10.1.2.2:8080"]);
        let a = &snap.workloads_by_ip[&"10.1.1.2".parse::<IpAddr>().expect("ip")];
        assert_eq!(a.cgroup, PathBuf::from("/root/pa"));
        let local: Vec<&str> = {
            let mut v: Vec<&str> = snap.local_workloads().map(|w| w.name.as_str()).collect();
            v.sort();
            v
        };
        assert_eq!(local, ["a", "b2"]);
    }

    #[test]
    fn ids_are_stable_across_reloads_and_never_reused() {
        let f = parse(std::path::Path::new("t"), FILE).expect("parse");
        let st = State::default();
        let s1 = st
            .build(&f, &n1(), std::path::Path::new("/"))
            .expect("build");
        let id_b2 = s1.workloads_by_ip[&"10.1.1.3".parse::<IpAddr>().expect("ip")].id;
        let mut f2 = f.clone();
        f2.workloads.retain(|w| w.name != "a");
        let s2 = st
            .build(&f2, &n1(), std::path::Path::new("/"))
            .expect("build");
        assert_eq!(
            s2.workloads_by_ip[&"10.1.1.3".parse::<IpAddr>().expect("ip")].id,
            id_b2
        );
        let mut f3 = f2.clone();
        let mut c = f.workloads[0].clone();
        c.name = "c".into();
        f3.workloads.push(c);
        let s3 = st
            .build(&f3, &n1(), std::path::Path::new("/"))
            .expect("build");
        let ids: std::collections::HashSet<u32> = s1.workloads_by_id.keys().copied().collect();
        let c_id = s3.workloads_by_ip[&"10.1.1.2".parse::<IpAddr>().expect("ip")].id;
        assert!(!ids.contains(&c_id), "a new workload gets a new id");
    }

    #[test]
    fn unknown_self_node_is_explained() {
        let f = parse(std::path::Path::new("t"), FILE).expect("parse");
        let e = State::default()
            .build(&f, &Scope::Node("n9".into()), std::path::Path::new("/"))
            .expect_err("unknown node");
        assert!(e.contains("n9") && e.contains("n1, n2"), "{e}");
    }
}
