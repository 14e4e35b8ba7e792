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
    /// The proxy's dedicated source address toward local pods: STRICT pods accept TCP only from it.
    pub mesh_source: Ipv4Addr,
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
