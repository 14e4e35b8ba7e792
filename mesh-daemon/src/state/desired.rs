//! The desired model: what the mesh should look like, in terms that belong to no source. The mesh
//! file (`discovery/file.rs`) produces it today; Kubernetes discovery will produce the same from
//! Pods, Services, EndpointSlices, routes and policies. `state.rs` compiles it into the
//! [`Snapshot`](super::Snapshot) the proxy reads.
//!
//! The node, policy and proxy-mode types derive `Deserialize` with the field names the mesh file
//! and the AuthorizationPolicy CRD both use, so those sources map onto them one to one.

use std::{collections::BTreeMap, net::Ipv4Addr, path::PathBuf};

use serde::{Deserialize, Serialize};

pub use super::routes::{RouteDesc, RouteKind};

/// Everything a source says the mesh holds.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Desired {
    pub nodes: Vec<NodeSpec>,
    pub workloads: Vec<WorkloadDesc>,
    pub services: Vec<ServiceDesc>,
    pub policies: Vec<PolicySpec>,
    /// HTTPRoute/GRPCRoute attached to services (GAMMA), with the upstream `spec` types.
    pub routes: Vec<RouteDesc>,
}

impl Desired {
    /// The workload a sidecar serves: it must exist and be in sidecar mode (otherwise its node's
    /// daemon serves it). One check for start-up and every reload.
    pub fn sidecar_workload(&self, namespace: &str, name: &str) -> Result<&WorkloadDesc, String> {
        let w = self
            .workloads
            .iter()
            .find(|w| w.namespace == namespace && w.name == name)
            .ok_or_else(|| {
                format!(
                    "workload {namespace}/{name} is not in the mesh file's `workloads`; a \
                     sidecar serves one workload: add it or pass another --workload"
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
}

/// A node of the mesh.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct NodeSpec {
    pub name: String,
    /// Where other nodes reach this node's HBONE listener, and where local pods reach its outbound
    /// listener.
    pub address: Ipv4Addr,
    /// The proxy's dedicated source address toward local pods, or a small block of them
    /// (`10.210.1.240/28`): STRICT pods accept TCP only from it.
    pub mesh_source: MeshSource,
}

/// What is wrong with node `i`'s mesh source, if anything: it holds a node's address or one of
/// `pod_ips`, or overlaps another node's block. STRICT pods admit every address of the block, so
/// it must be the proxy's alone.
pub fn mesh_source_clash(
    nodes: &[NodeSpec],
    i: usize,
    pod_ips: impl IntoIterator<Item = Ipv4Addr>,
) -> Option<String> {
    let src = nodes.get(i)?.mesh_source;
    nodes
        .iter()
        .enumerate()
        .find_map(|(j, o)| {
            if src.contains(o.address) {
                Some(format!("holds node {:?}'s address {}", o.name, o.address))
            } else if j != i && src.overlaps(&o.mesh_source) {
                Some(format!(
                    "overlaps node {:?}'s meshSource {}",
                    o.name, o.mesh_source
                ))
            } else {
                None
            }
        })
        .or_else(|| {
            pod_ips
                .into_iter()
                .find(|ip| src.contains(*ip))
                .map(|ip| format!("holds pod address {ip}"))
        })
}

/// Where a node proxy connects to its local pods from: one address, or a block of at most 256
/// (`a.b.c.d/n`, n from 24 to 32) that the node holds as local (`ip route add local <block> dev
/// lo`). A block lifts the TIME_WAIT limit on new connections to one pod port: each closed
/// connection holds its (source, port, pod, port) tuple for 60 s, so one source address allows
/// about 28 000 / 60 ≈ 470 new connections a second to one pod port, and a /28 sixteen times that.
/// Connections take the block's addresses in turn, all of them: choose a block outside the pods'
/// subnets (link-local does), or a pod on a /24 would see its subnet's .0 or .255 as a source
/// and drop the connection as martian.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct MeshSource(ipnet::Ipv4Net);

/// The widest block a meshSource may be (256 addresses).
pub const MESH_SOURCE_MIN_PREFIX: u8 = 24;

impl MeshSource {
    pub fn single(ip: Ipv4Addr) -> Self {
        Self(ipnet::Ipv4Net::from(ip))
    }

    pub fn first(&self) -> Ipv4Addr {
        self.0.network()
    }

    pub fn last(&self) -> Ipv4Addr {
        self.0.broadcast()
    }

    pub fn prefix_len(&self) -> u8 {
        self.0.prefix_len()
    }

    /// The block's mask, host byte order (`u32::MAX` for one address).
    pub fn mask(&self) -> u32 {
        u32::from(self.0.netmask())
    }

    /// How many addresses it holds.
    pub fn size(&self) -> u32 {
        1 << (32 - u32::from(self.prefix_len()))
    }

    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        self.0.contains(&ip)
    }

    pub fn overlaps(&self, other: &MeshSource) -> bool {
        self.0.contains(&other.0) || other.0.contains(&self.0)
    }

    /// The `i`-th address, wrapping around the block.
    pub fn nth(&self, i: u32) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.first()) + i % self.size())
    }

    /// The next address in turn, shared by every connection of the process (a relaxed counter:
    /// an even spread is all that matters, not a strict order).
    pub fn pick(&self) -> Ipv4Addr {
        use std::sync::atomic::{AtomicU32, Ordering};
        static NEXT: AtomicU32 = AtomicU32::new(0);
        if self.size() == 1 {
            return self.first();
        }
        self.nth(NEXT.fetch_add(1, Ordering::Relaxed))
    }
}

impl std::fmt::Display for MeshSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.prefix_len() == 32 {
            write!(f, "{}", self.first())
        } else {
            write!(f, "{}", self.0)
        }
    }
}

impl std::str::FromStr for MeshSource {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        if let Ok(ip) = s.parse::<Ipv4Addr>() {
            return Ok(Self::single(ip));
        }
        let net: ipnet::Ipv4Net = s.parse().map_err(|_| {
            format!(
                "meshSource {s:?} is neither an IPv4 address (10.210.1.254) nor a block of them \
                 (10.210.1.240/28)"
            )
        })?;
        if net.prefix_len() < MESH_SOURCE_MIN_PREFIX {
            return Err(format!(
                "meshSource {s} holds {} addresses; a block of at most 256 (/{MESH_SOURCE_MIN_PREFIX}) \
                 is plenty: each address allows about 470 new connections a second to one pod port",
                1u64 << (32 - net.prefix_len())
            ));
        }
        if net.addr() != net.network() {
            return Err(format!(
                "meshSource {s} does not start its block; write {}",
                net.trunc()
            ));
        }
        Ok(Self(net))
    }
}

impl Serialize for MeshSource {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for MeshSource {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Who proxies a workload.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "lowercase")]
pub enum ProxyMode {
    /// The node daemon captures and serves it; peers reach it through the node's HBONE port.
    #[default]
    Node,
    /// A sidecar in the pod's own network namespace captures and serves it; peers reach it on
    /// the pod's own HBONE port.
    Sidecar,
}

impl ProxyMode {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Node => "node",
            Self::Sidecar => "sidecar",
        }
    }
}

/// A workload instance (a pod).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorkloadDesc {
    pub namespace: String,
    pub name: String,
    pub service_account: String,
    pub node: String,
    pub ip: Ipv4Addr,
    /// Pod-level cgroup v2 folder: absolute, or relative to the daemon's cgroup root.
    pub cgroup: PathBuf,
    pub labels: BTreeMap<String, String>,
    pub probe_ports: Vec<u16>,
    /// Ports whose server reads a PROXY protocol v2 header first.
    pub proxy_protocol_ports: Vec<u16>,
    pub mode: ProxyMode,
}

/// A service: a VIP, its ports, and how its endpoints are found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceDesc {
    pub namespace: String,
    pub name: String,
    pub vip: Ipv4Addr,
    pub ports: Vec<PortDesc>,
    pub endpoints: Endpoints,
}

/// One service port.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PortDesc {
    /// The port's name (Kubernetes `ports[].name`; routes and `appProtocol` refer to it).
    pub name: Option<String>,
    pub port: u16,
    /// Port on the endpoints.
    pub target_port: u16,
    /// What the port speaks, when the source says (Kubernetes `appProtocol`): L7 skips
    /// protocol detection for it.
    pub protocol: Option<AppProtocol>,
}

/// How a service's endpoints are found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Endpoints {
    /// The workloads whose labels include all of these (the mesh file, a Service's selector).
    Selector(BTreeMap<String, String>),
    /// These workload addresses (EndpointSlices).
    Addresses(Vec<Ipv4Addr>),
}

/// A port's protocol hint, with Kubernetes' `appProtocol` spellings.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AppProtocol {
    /// HTTP/1.1 (`http`).
    Http,
    /// HTTP/2 without TLS, prior knowledge (`kubernetes.io/h2c`).
    H2c,
    /// gRPC (`grpc`).
    Grpc,
    /// Opaque TCP: never parsed (`tcp`).
    Tcp,
}

impl AppProtocol {
    /// Parses an `appProtocol` value; an unknown one is an error naming those understood.
    pub fn parse(s: &str) -> Result<Self, String> {
        match s {
            "http" => Ok(Self::Http),
            "kubernetes.io/h2c" | "h2c" => Ok(Self::H2c),
            "grpc" => Ok(Self::Grpc),
            "tcp" => Ok(Self::Tcp),
            other => Err(format!(
                "appProtocol {other:?} is not one nodemesh understands; use http, \
                 kubernetes.io/h2c, grpc or tcp (or leave it out to detect the protocol)"
            )),
        }
    }
}

/// An L4 authorization policy (the project's AuthorizationPolicy CRD will carry the same).
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PolicySpec {
    pub name: String,
    pub namespace: String,
    #[serde(default)]
    pub selector: BTreeMap<String, String>,
    pub action: PolicyAction,
    #[serde(default)]
    pub from: Vec<PolicySource>,
    #[serde(default)]
    pub ports: Vec<u16>,
    /// Request rules (L7): any entry matches; within one, every given list must match.
    #[serde(default)]
    pub to: Vec<PolicyOperation>,
}

/// What a request must be for a policy's `to` rule to match (Istio's `operation`).
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq, schemars::JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PolicyOperation {
    /// HTTP methods (any).
    #[serde(default)]
    pub methods: Vec<String>,
    /// Paths: exact, a prefix with a trailing `*`, or a suffix with a leading `*` (any).
    #[serde(default)]
    pub paths: Vec<String>,
    /// Headers that must all be present, each with a value (same syntax as paths).
    #[serde(default)]
    pub headers: std::collections::BTreeMap<String, String>,
}

#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq, schemars::JsonSchema)]
pub enum PolicyAction {
    #[serde(rename = "ALLOW")]
    Allow,
    #[serde(rename = "DENY")]
    Deny,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq, schemars::JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PolicySource {
    /// SPIFFE IDs.
    #[serde(default)]
    pub principals: Vec<String>,
    #[serde(default)]
    pub namespaces: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn app_protocols_take_kubernetes_spellings() {
        for (s, p) in [
            ("http", AppProtocol::Http),
            ("kubernetes.io/h2c", AppProtocol::H2c),
            ("grpc", AppProtocol::Grpc),
            ("tcp", AppProtocol::Tcp),
        ] {
            assert_eq!(AppProtocol::parse(s), Ok(p));
        }
        let e = AppProtocol::parse("HTTP2").expect_err("unknown");
        assert!(e.contains("kubernetes.io/h2c"), "{e}");
    }
}
