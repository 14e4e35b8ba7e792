//! Kubernetes objects → the neutral [`Desired`] model: a pure function of the reflectors' stores,
//! so the unit tests drive it with synthetic watch events and no API server.
//!
//! - Nodes → [`NodeSpec`]: the InternalIP (HBONE and the outbound listener) and the
//!   `nodemesh.io/mesh-source` annotation (the proxy's source toward its local pods; default
//!   [`DEFAULT_MESH_SOURCE`]).
//! - A pod is meshed when its namespace carries `nodemesh.io/mode: node|sidecar` (a pod label of
//!   the same name overrides; `disabled` opts a pod out), it runs and it has an IP. A local pod
//!   also needs its cgroup to exist (found under the kubelet's layouts, [`find_pod_cgroup`]);
//!   until then it is left out and looked for again.
//! - Services of meshed namespaces (ClusterIP, IPv4) with their ports' names and `appProtocol`;
//!   their endpoints are the ready addresses of their EndpointSlices.
//! - HTTPRoute/GRPCRoute with a Service parentRef (GAMMA), the route's `nodemesh.io/rate-limit`
//!   annotation as the mesh file's `rateLimit`; a route that does not compile is left out and
//!   reported (not the whole state).
//! - AuthorizationPolicy (`nodemesh.io/v1alpha1`) → [`PolicySpec`].

use std::{
    collections::BTreeMap,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    sync::Arc,
};

use gateway_api::{experimental::httproutes::HttpRoute, grpcroutes::GrpcRoute};
use k8s_openapi::{
    api::{
        core::v1::{Container, Namespace, Node, Pod, Service},
        discovery::v1::EndpointSlice,
    },
    apimachinery::pkg::util::intstr::IntOrString,
};
use kube::ResourceExt as _;
use mesh_common::MAX_PROBE_PORTS;

use super::crd::AuthorizationPolicy;
use crate::{
    meshfile::RateLimitSpec,
    state::{
        compile_routes,
        desired::{
            AppProtocol, Desired, Endpoints, MeshSource, NodeSpec, PolicySpec, PortDesc, ProxyMode,
            ServiceDesc, WorkloadDesc, mesh_source_clash,
        },
        routes::{RouteDesc, RouteKind},
    },
};

/// The enrollment label, on a namespace (all its pods) or a pod (overrides its namespace).
pub const MODE_LABEL: &str = "nodemesh.io/mode";
/// A pod label value that keeps the pod out of the mesh in an enrolled namespace.
pub const MODE_DISABLED: &str = "disabled";
/// The node annotation giving the proxy's source address toward its local pods.
pub const MESH_SOURCE_ANNOTATION: &str = "nodemesh.io/mesh-source";
/// A pod's ports whose server reads a PROXY protocol v2 header first (`"7000,8443"`).
pub const PROXY_PROTOCOL_ANNOTATION: &str = "nodemesh.io/proxy-protocol-ports";
/// A route annotation with the mesh file's `rateLimit` (`{requestsPerSecond: 100, burst: 20}`).
pub const RATE_LIMIT_ANNOTATION: &str = "nodemesh.io/rate-limit";
/// The mesh source when a node has no annotation: a link-local address no pod or node uses
/// (Istio ambient's inbound passthrough source is in the same range).
pub const DEFAULT_MESH_SOURCE: Ipv4Addr = Ipv4Addr::new(169, 254, 7, 127);
/// The label tying an EndpointSlice to its Service.
const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// What the stores hold, read as plain lists (a reflector's `Store::state()`).
#[derive(Debug, Default)]
pub struct Objects {
    pub nodes: Vec<Arc<Node>>,
    pub namespaces: Vec<Arc<Namespace>>,
    pub pods: Vec<Arc<Pod>>,
    pub services: Vec<Arc<Service>>,
    pub slices: Vec<Arc<EndpointSlice>>,
    pub http_routes: Vec<Arc<HttpRoute>>,
    pub grpc_routes: Vec<Arc<GrpcRoute>>,
    pub policies: Vec<Arc<AuthorizationPolicy>>,
}

/// What the model needs to know about this daemon.
#[derive(Clone, Debug)]
pub struct View {
    /// This daemon's node: its pods are the ones whose cgroups must exist.
    pub node: String,
    /// The cgroup v2 folder the hooks attach under; pod cgroups are looked for below it.
    pub cgroup_root: PathBuf,
}

/// The model, and what was left out of it and why (logged and counted by the caller).
#[derive(Debug, Default, PartialEq)]
pub struct Built {
    pub desired: Desired,
    /// `kind namespace/name: reason` for each object left out.
    pub rejected: Vec<String>,
    /// Local pods that are meshed but not complete yet (no cgroup yet): look again soon.
    pub pending: Vec<String>,
}

/// The desired model `objects` describe, from `view`'s node.
pub fn build(objects: &Objects, view: &View) -> Built {
    let mut out = Built::default();
    let modes: BTreeMap<&str, ProxyMode> = objects
        .namespaces
        .iter()
        .filter_map(|ns| {
            let mode = parse_mode(ns.labels().get(MODE_LABEL)?)?;
            Some((ns.metadata.name.as_deref()?, mode))
        })
        .collect();
    out.desired.nodes = objects.nodes.iter().filter_map(|n| node_spec(n)).collect();
    out.desired.nodes.sort_by(|a, b| a.name.cmp(&b.name));
    for pod in &objects.pods {
        match workload(pod, &modes, view) {
            // Nothing injects sidecars in Kubernetes: a pod left to one would be unreachable (its
            // peers would send HBONE to its own port), so it is reported and left out.
            Ok(Some(w)) if w.mode == ProxyMode::Sidecar => out.rejected.push(format!(
                "Pod {}/{}: nodemesh.io/mode=sidecar needs a sidecar, which Kubernetes discovery \
                 does not inject; use mode node",
                w.namespace, w.name
            )),
            Ok(Some(w)) => out.desired.workloads.push(w),
            Ok(None) => {}
            Err(Incomplete(why)) => out.pending.push(format!("{}: {why}", obj_id(&**pod))),
        }
    }
    out.desired
        .workloads
        .sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    // A mesh source that holds another node's or a pod's address would let that address past
    // STRICT: the annotation is refused (named) and the default used.
    for i in 0..out.desired.nodes.len() {
        let pod_ips = out.desired.workloads.iter().map(|w| w.ip);
        if let Some(why) = mesh_source_clash(&out.desired.nodes, i, pod_ips) {
            let n = &mut out.desired.nodes[i];
            out.rejected.push(format!(
                "Node {}: annotation {MESH_SOURCE_ANNOTATION}={} {why}; give the node a block of \
                 its own (the default {DEFAULT_MESH_SOURCE} is used until then)",
                n.name, n.mesh_source
            ));
            n.mesh_source = MeshSource::single(DEFAULT_MESH_SOURCE);
        }
    }
    // Two pods claiming one IP (a stale object, a bad CNI, a lying node): neither is meshed,
    // both are reported. Keeping one would let whoever sorts first take the other's traffic.
    let mut claims: BTreeMap<Ipv4Addr, usize> = BTreeMap::new();
    for w in &out.desired.workloads {
        *claims.entry(w.ip).or_default() += 1;
    }
    let rejected = &mut out.rejected;
    out.desired.workloads.retain(|w| {
        let alone = claims.get(&w.ip) == Some(&1);
        if !alone {
            rejected.push(format!(
                "Pod {}/{}: its IP {} is another meshed pod's too; both left out until one goes",
                w.namespace, w.name, w.ip
            ));
        }
        alone
    });
    for svc in &objects.services {
        let Some(ns) = svc.metadata.namespace.as_deref() else {
            continue;
        };
        if !modes.contains_key(ns) {
            continue;
        }
        match service(svc, &objects.slices) {
            Ok(Some(s)) => out.desired.services.push(s),
            Ok(None) => {}
            Err(e) => out
                .rejected
                .push(format!("Service {}: {e}", obj_id(&**svc))),
        }
    }
    out.desired
        .services
        .sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    for p in &objects.policies {
        out.desired.policies.push(PolicySpec {
            name: p.name_any(),
            namespace: p.namespace().unwrap_or_default(),
            selector: p.spec.selector.clone(),
            action: p.spec.action,
            from: p.spec.from.clone(),
            ports: p.spec.ports.clone(),
            to: p.spec.to.clone(),
        });
    }
    out.desired
        .policies
        .sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    let mut routes = Vec::new();
    for r in &objects.http_routes {
        routes.push((
            r.metadata.clone(),
            RouteKind::Http(Box::new(r.spec.clone())),
        ));
    }
    for r in &objects.grpc_routes {
        routes.push((
            r.metadata.clone(),
            RouteKind::Grpc(Box::new(r.spec.clone())),
        ));
    }
    for (meta, kind) in routes {
        let desc = RouteDesc {
            namespace: meta.namespace.clone().unwrap_or_default(),
            name: meta.name.clone().unwrap_or_default(),
            kind,
            rate_limit: None,
        };
        let id = format!("{} {}/{}", desc.kind_name(), desc.namespace, desc.name);
        if !modes.contains_key(desc.namespace.as_str()) || !attaches_to_service(&desc) {
            // Routes of other namespaces, or for a Gateway (north-south), are not the mesh's.
            continue;
        }
        let desc = match rate_limit(&meta) {
            Ok(rate_limit) => RouteDesc { rate_limit, ..desc },
            Err(e) => {
                out.rejected.push(format!("{id}: {e}"));
                continue;
            }
        };
        match compile_routes(&out.desired, std::slice::from_ref(&desc)) {
            Ok(_) => out.desired.routes.push(desc),
            Err(e) => out.rejected.push(e),
        }
    }
    out.desired.routes.sort_by(|a, b| {
        (a.kind_name(), &a.namespace, &a.name).cmp(&(b.kind_name(), &b.namespace, &b.name))
    });
    out
}

fn obj_id<K: kube::Resource>(o: &K) -> String {
    format!(
        "{}/{}",
        o.meta().namespace.as_deref().unwrap_or(""),
        o.meta().name.as_deref().unwrap_or("")
    )
}

/// A label value: `node`, `sidecar`; anything else is not meshed.
fn parse_mode(v: &str) -> Option<ProxyMode> {
    match v {
        "node" => Some(ProxyMode::Node),
        "sidecar" => Some(ProxyMode::Sidecar),
        _ => None,
    }
}

fn node_spec(n: &Node) -> Option<NodeSpec> {
    let name = n.metadata.name.clone()?;
    let address = n
        .status
        .as_ref()?
        .addresses
        .as_ref()?
        .iter()
        .filter(|a| a.type_ == "InternalIP")
        .find_map(|a| a.address.parse::<Ipv4Addr>().ok())?;
    let mesh_source = match n.annotations().get(MESH_SOURCE_ANNOTATION) {
        None => MeshSource::single(DEFAULT_MESH_SOURCE),
        Some(a) => a.parse().unwrap_or_else(|e: String| {
            tracing::warn!(
                node = %name,
                "annotation {MESH_SOURCE_ANNOTATION}={a:?} is not used: {e}; fix it (`kubectl \
                 annotate node {name} --overwrite {MESH_SOURCE_ANNOTATION}=...`); until then the \
                 default {DEFAULT_MESH_SOURCE} applies"
            );
            MeshSource::single(DEFAULT_MESH_SOURCE)
        }),
    };
    Some(NodeSpec {
        name,
        address,
        mesh_source,
    })
}

/// A meshed local pod that cannot be enrolled yet.
struct Incomplete(String);

fn workload(
    pod: &Pod,
    modes: &BTreeMap<&str, ProxyMode>,
    view: &View,
) -> Result<Option<WorkloadDesc>, Incomplete> {
    let (Some(ns), Some(name)) = (
        pod.metadata.namespace.as_deref(),
        pod.metadata.name.as_deref(),
    ) else {
        return Ok(None);
    };
    let mode = match pod.labels().get(MODE_LABEL) {
        Some(v) => parse_mode(v),
        None => modes.get(ns).copied(),
    };
    let (Some(mode), Some(spec)) = (mode, pod.spec.as_ref()) else {
        return Ok(None);
    };
    if spec.host_network == Some(true) {
        // A host-network pod is the node itself.
        return Ok(None);
    }
    // A terminating pod stays meshed while it drains (its endpoints' readiness takes it out of
    // balancing); it leaves when its phase ends or its object goes.
    let status = pod.status.as_ref();
    if matches!(
        status.and_then(|s| s.phase.as_deref()),
        Some("Succeeded" | "Failed")
    ) {
        return Ok(None);
    }
    let Some(node) = spec.node_name.clone() else {
        return Ok(None);
    };
    let local = node == view.node;
    let Some(ip) = status
        .and_then(|s| s.pod_ip.as_deref())
        .and_then(|ip| ip.parse::<Ipv4Addr>().ok())
    else {
        return if local {
            Err(Incomplete("no IPv4 pod IP yet".into()))
        } else {
            Ok(None)
        };
    };
    let cgroup = if local {
        let uid = pod.metadata.uid.as_deref().unwrap_or_default();
        let qos = status.and_then(|s| s.qos_class.as_deref());
        find_pod_cgroup(&view.cgroup_root, uid, qos).ok_or_else(|| {
            Incomplete(format!(
                "its cgroup (pod uid {uid}) is not under {} yet",
                view.cgroup_root.display()
            ))
        })?
    } else {
        // Only the node that runs a pod attaches to its cgroup.
        PathBuf::new()
    };
    let mut probe_ports: Vec<u16> = spec.containers.iter().flat_map(probe_ports).collect();
    probe_ports.sort_unstable();
    probe_ports.dedup();
    probe_ports.truncate(MAX_PROBE_PORTS);
    let proxy_protocol_ports = match pod.annotations().get(PROXY_PROTOCOL_ANNOTATION) {
        None => Vec::new(),
        Some(a) => parse_ports(a).unwrap_or_else(|e| {
            tracing::warn!(
                pod = %format!("{ns}/{name}"),
                "annotation {PROXY_PROTOCOL_ANNOTATION}={a:?} is not used: {e}; write ports \
                 separated by commas (\"7000,8443\")"
            );
            Vec::new()
        }),
    };
    Ok(Some(WorkloadDesc {
        namespace: ns.into(),
        name: name.into(),
        service_account: spec
            .service_account_name
            .clone()
            .unwrap_or_else(|| "default".into()),
        node,
        ip,
        cgroup,
        labels: pod.labels().clone(),
        probe_ports,
        proxy_protocol_ports,
        mode,
    }))
}

/// `"7000, 8443"` → `[7000, 8443]`; every entry a non-zero port.
pub(super) fn parse_ports(s: &str) -> Result<Vec<u16>, String> {
    s.split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(|p| match p.parse::<u16>() {
            Ok(0) | Err(_) => Err(format!("{p:?} is not a port (1-65535)")),
            Ok(n) => Ok(n),
        })
        .collect()
}

/// The ports the kubelet probes (liveness, readiness, startup): reachable from the node in
/// STRICT mode, as the mesh file's `probePorts`.
fn probe_ports(c: &Container) -> Vec<u16> {
    let named = |n: &str| {
        c.ports
            .iter()
            .flatten()
            .find(|p| p.name.as_deref() == Some(n))
            .and_then(|p| u16::try_from(p.container_port).ok())
    };
    let port = |p: &IntOrString| match p {
        IntOrString::Int(i) => u16::try_from(*i).ok(),
        IntOrString::String(s) => named(s),
    };
    [&c.liveness_probe, &c.readiness_probe, &c.startup_probe]
        .into_iter()
        .flatten()
        .filter_map(|p| {
            p.http_get
                .as_ref()
                .and_then(|h| port(&h.port))
                .or_else(|| p.tcp_socket.as_ref().and_then(|t| port(&t.port)))
                .or_else(|| p.grpc.as_ref().and_then(|g| u16::try_from(g.port).ok()))
        })
        .collect()
}

/// A pod's cgroup below `root`, under the kubelet's layouts, found by looking: the systemd
/// driver's `kubepods.slice/kubepods-<qos>.slice/kubepods-<qos>-pod<uid_>.slice` and the cgroupfs
/// driver's `kubepods/<qos>/pod<uid>` (Guaranteed pods sit directly under `kubepods`), at the root
/// or one folder below it (a kubelet `--cgroup-root`). An unknown QoS class tries all three.
pub fn find_pod_cgroup(root: &Path, uid: &str, qos: Option<&str>) -> Option<PathBuf> {
    if uid.is_empty() || uid.contains(['/', '.']) {
        return None;
    }
    let classes: &[&str] = match qos {
        Some("Guaranteed") => &["guaranteed"],
        Some("Burstable") => &["burstable"],
        Some("BestEffort") => &["besteffort"],
        _ => &["burstable", "besteffort", "guaranteed"],
    };
    let under = uid.replace('-', "_");
    let mut candidates = Vec::new();
    for qos in classes {
        if *qos == "guaranteed" {
            candidates.push(format!("kubepods.slice/kubepods-pod{under}.slice"));
            candidates.push(format!("kubepods/pod{uid}"));
        } else {
            candidates.push(format!(
                "kubepods.slice/kubepods-{qos}.slice/kubepods-{qos}-pod{under}.slice"
            ));
            candidates.push(format!("kubepods/{qos}/pod{uid}"));
        }
    }
    let mut bases = vec![root.to_path_buf()];
    if let Ok(dir) = std::fs::read_dir(root) {
        bases.extend(
            dir.flatten()
                .map(|e| e.path())
                .filter(|p| p.join("kubepods").is_dir() || p.join("kubepods.slice").is_dir()),
        );
    }
    bases.iter().find_map(|b| {
        candidates
            .iter()
            .map(|c| b.join(c))
            .find(|p| p.is_dir())
            .and_then(|p| p.strip_prefix(root).ok().map(Path::to_path_buf))
    })
}

fn service(svc: &Service, slices: &[Arc<EndpointSlice>]) -> Result<Option<ServiceDesc>, String> {
    let (Some(ns), Some(name), Some(spec)) = (
        svc.metadata.namespace.as_deref(),
        svc.metadata.name.as_deref(),
        svc.spec.as_ref(),
    ) else {
        return Ok(None);
    };
    // Headless and ExternalName services have no VIP to capture; IPv6 VIPs wait for dual-stack.
    let Some(vip) = spec
        .cluster_ip
        .as_deref()
        .and_then(|ip| ip.parse::<Ipv4Addr>().ok())
    else {
        return Ok(None);
    };
    let mine: Vec<&EndpointSlice> = slices
        .iter()
        .map(|s| &**s)
        .filter(|s| {
            s.metadata.namespace.as_deref() == Some(ns)
                && s.labels().get(SERVICE_NAME_LABEL).map(String::as_str) == Some(name)
                && s.address_type == "IPv4"
        })
        .collect();
    let mut ports = Vec::new();
    for p in spec.ports.iter().flatten() {
        if p.protocol.as_deref().is_some_and(|proto| proto != "TCP") {
            continue;
        }
        let port = u16::try_from(p.port).map_err(|_| format!("port {} is out of range", p.port))?;
        // The slices carry the resolved target port (a named targetPort is per pod).
        let from_slice = mine
            .iter()
            .flat_map(|s| s.ports.iter().flatten())
            .find(|sp| sp.name == p.name)
            .and_then(|sp| sp.port)
            .and_then(|n| u16::try_from(n).ok());
        let target_port = from_slice
            .or(match &p.target_port {
                Some(IntOrString::Int(i)) => u16::try_from(*i).ok(),
                _ => None,
            })
            .unwrap_or(port);
        let protocol = match p.app_protocol.as_deref() {
            None => None,
            Some(a) => Some(AppProtocol::parse(a).map_err(|e| format!("port {port}: {e}"))?),
        };
        ports.push(PortDesc {
            name: p.name.clone(),
            port,
            target_port,
            protocol,
        });
    }
    let mut addrs: Vec<Ipv4Addr> = mine
        .iter()
        .flat_map(|s| s.endpoints.iter())
        .filter(|e| e.conditions.as_ref().and_then(|c| c.ready) != Some(false))
        .flat_map(|e| e.addresses.iter())
        .filter_map(|a| a.parse().ok())
        .collect();
    addrs.sort_unstable();
    addrs.dedup();
    Ok(Some(ServiceDesc {
        namespace: ns.into(),
        name: name.into(),
        vip,
        ports,
        endpoints: Endpoints::Addresses(addrs),
    }))
}

/// GAMMA: a route for the mesh names a Service among its parents.
fn attaches_to_service(r: &RouteDesc) -> bool {
    let kinds: Vec<Option<&str>> = match &r.kind {
        RouteKind::Http(s) => s
            .parent_refs
            .iter()
            .flatten()
            .map(|p| p.kind.as_deref())
            .collect(),
        RouteKind::Grpc(s) => s
            .parent_refs
            .iter()
            .flatten()
            .map(|p| p.kind.as_deref())
            .collect(),
    };
    kinds.contains(&Some("Service"))
}

fn rate_limit(
    meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
) -> Result<Option<crate::state::routes::RateLimit>, String> {
    let Some(text) = meta
        .annotations
        .as_ref()
        .and_then(|a| a.get(RATE_LIMIT_ANNOTATION))
    else {
        return Ok(None);
    };
    let spec: RateLimitSpec = serde_norway::from_str(text).map_err(|e| {
        format!(
            "annotation {RATE_LIMIT_ANNOTATION} {text:?} is not {{requestsPerSecond: N, burst: M}}: {e}"
        )
    })?;
    spec.check().map(Some)
}
