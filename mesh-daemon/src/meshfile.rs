//! The mesh file: the embedded default control input (demo, tests, hosts without Kubernetes).
//!
//! It holds what Kubernetes discovery will later feed: nodes, workloads (pods) and services, and
//! it is turned into the same [`Snapshot`](crate::state::Snapshot). A bad file never replaces a
//! good state: [`parse`] either returns a fully validated file or an error naming the line and
//! what to change.
//!
//! ```yaml
//! nodes:
//!   - name: node-1
//!     address: 10.203.0.1       # node-to-node (HBONE :15008) and the outbound listener (:15001)
//!     meshSource: 10.210.1.254  # the proxy's source address toward local pods (or a block: 10.210.1.240/28)
//! workloads:
//!   - name: client
//!     namespace: demo
//!     serviceAccount: client-sa # default: "default"
//!     node: node-1
//!     ip: 10.210.1.2
//!     cgroup: /sys/fs/cgroup/kubepods/pod1234   # pod-level cgroup v2 folder
//!     labels: { app: client }
//!     probePorts: [8081]        # reachable from the node in STRICT mode (at most 4)
//! services:
//!   - name: echo
//!     namespace: demo
//!     vip: 10.96.0.10
//!     ports: [{ name: echo, port: 80, targetPort: 7000, appProtocol: tcp }]  # name, appProtocol
//!                               # optional; appProtocol: http, kubernetes.io/h2c, grpc or tcp
//!     selector: { app: echo }
//! authorizationPolicies:        # L4, enforced where the destination pod runs; default: allow
//!   - name: echo-callers
//!     namespace: demo           # applies to workloads of this namespace ...
//!     selector: { app: echo }   # ... with these labels (empty: all of the namespace)
//!     action: ALLOW             # ALLOW or DENY; DENY wins; with any ALLOW, one must match
//!     from:                     # any entry matches; within one, every given list must match
//!       - principals: [spiffe://cluster.local/ns/demo/sa/client-sa]
//!       - namespaces: [monitoring]
//!     ports: [7000]             # destination ports (empty: all)
//!     to:                       # request rules (L7): any entry matches; within one, every list
//!       - methods: [POST]
//!         paths: [/admin, /admin/*]    # exact, prefix with a trailing *, suffix with a leading *
//!         headers: { x-team: blue* }
//! httpRoutes:                   # Gateway API HTTPRoutes attached to a Service (GAMMA)
//!   - name: echo-split
//!     namespace: demo
//!     spec:                     # an HTTPRoute's spec, field for field
//!       parentRefs: [{ kind: Service, name: echo, port: 80 }]
//!       rules:
//!         - matches: [{ path: { type: PathPrefix, value: /api } }]
//!           backendRefs: [{ name: echo-v1, port: 80, weight: 90 }, { name: echo-v2, port: 80, weight: 10 }]
//!           timeouts: { request: 5s }
//!     rateLimit: { requestsPerSecond: 100, burst: 20 }   # optional; per client workload: 429
//! grpcRoutes: []                # the same, with a GRPCRoute's spec
//! ```

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    net::{IpAddr, Ipv4Addr},
    path::{Path, PathBuf},
};

use mesh_common::MAX_PROBE_PORTS;
use serde::Deserialize;

/// Nodes, proxy modes and policies have one shape in every source; the mesh file reads them as
/// the desired model defines them.
pub use crate::state::desired::{NodeSpec, PolicyAction, PolicySource, PolicySpec, ProxyMode};
use crate::state::routes::{RouteDesc, RouteKind};

#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct MeshFile {
    #[serde(default)]
    pub nodes: Vec<NodeSpec>,
    #[serde(default)]
    pub workloads: Vec<WorkloadSpec>,
    #[serde(default)]
    pub services: Vec<ServiceSpec>,
    #[serde(default)]
    pub authorization_policies: Vec<PolicySpec>,
    /// Gateway API HTTPRoutes attached to services (GAMMA); `spec` is an HTTPRoute's spec.
    #[serde(default)]
    pub http_routes: Vec<RouteSpec>,
    /// Gateway API GRPCRoutes attached to services; `spec` is a GRPCRoute's spec.
    #[serde(default)]
    pub grpc_routes: Vec<RouteSpec>,
    /// `httpRoutes` and `grpcRoutes` read into the upstream types (filled in by [`parse`]).
    #[serde(skip)]
    pub routes: Vec<RouteDesc>,
}

/// A route as the mesh file holds it: a Kubernetes object's name, namespace and `spec`.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RouteSpec {
    pub name: String,
    pub namespace: String,
    pub spec: serde_norway::Value,
    /// A local rate limit on the route's requests, per client workload (Gateway API has no such
    /// field; in Kubernetes it will be the route's `nodemesh.io/rate-limit` annotation).
    #[serde(default)]
    pub rate_limit: Option<RateLimitSpec>,
}

#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RateLimitSpec {
    pub requests_per_second: u32,
    /// How many may come at once (default: one second's worth).
    #[serde(default)]
    pub burst: Option<u32>,
}

impl RateLimitSpec {
    pub fn check(&self) -> Result<crate::state::routes::RateLimit, String> {
        use std::num::NonZeroU32;
        let rps = NonZeroU32::new(self.requests_per_second).ok_or(
            "rateLimit.requestsPerSecond is 0; give a positive rate, or remove rateLimit for no limit",
        )?;
        let burst = match self.burst {
            None => rps,
            Some(b) => NonZeroU32::new(b)
                .ok_or("rateLimit.burst is 0: no request could ever pass; give at least 1")?,
        };
        Ok(crate::state::routes::RateLimit {
            requests_per_second: rps,
            burst,
        })
    }
}

#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct WorkloadSpec {
    pub name: String,
    pub namespace: String,
    #[serde(default = "default_sa")]
    pub service_account: String,
    pub node: String,
    pub ip: Ipv4Addr,
    /// Pod-level cgroup v2 folder: absolute, or relative to the daemon's `--cgroup-root`.
    pub cgroup: PathBuf,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub probe_ports: Vec<u16>,
    /// Ports whose server expects a PROXY protocol v2 header naming the real client (HAProxy's
    /// `send-proxy-v2`): the proxy writes one on each connection to such a port before the
    /// client's bytes (Kubernetes: the `nodemesh.io/proxy-protocol-ports` annotation).
    #[serde(default)]
    pub proxy_protocol_ports: Vec<u16>,
    /// Who proxies this pod: its node's daemon (`node`, the default) or its own sidecar
    /// (`sidecar`; Kubernetes: the `nodemesh.io/mode` label).
    #[serde(default)]
    pub mode: ProxyMode,
}

fn default_sa() -> String {
    "default".into()
}

#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ServiceSpec {
    pub name: String,
    pub namespace: String,
    pub vip: Ipv4Addr,
    pub ports: Vec<ServicePort>,
    pub selector: BTreeMap<String, String>,
}

#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ServicePort {
    /// The port's name (optional; as a Kubernetes Service port's).
    #[serde(default)]
    pub name: Option<String>,
    pub port: u16,
    /// Port on the endpoints; default: `port`.
    pub target_port: Option<u16>,
    /// What the port speaks: `http`, `kubernetes.io/h2c`, `grpc` or `tcp` (Kubernetes'
    /// `appProtocol`); without it the proxy detects the protocol.
    #[serde(default)]
    pub app_protocol: Option<String>,
}

impl ServicePort {
    pub fn target(&self) -> u16 {
        self.target_port.unwrap_or(self.port)
    }
}

/// A mesh file that cannot be used, with the line to fix (1-based) when it is known.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("mesh file {}{}: {message}", path.display(), line.map(|l| format!(" line {l}")).unwrap_or_default())]
pub struct MeshFileError {
    pub path: PathBuf,
    pub line: Option<usize>,
    pub message: String,
}

/// The largest control file (mesh file, token file, PEM) read: a mesh of tens of thousands of
/// workloads fits; a bigger file is a mistake or an attack, and reading it every second would
/// take the daemon's memory and time from the pods it serves.
pub const MAX_FILE: u64 = 16 << 20;

/// Reads a control file as text: a regular file (symlinks followed, as a ConfigMap mount's are)
/// of at most [`MAX_FILE`] bytes. A directory, FIFO or device is refused rather than read (a FIFO
/// would block the reader for ever), and so is a file that grows past the limit while read.
pub fn read_file(path: &Path) -> std::io::Result<String> {
    use std::io::Read as _;
    let file = std::fs::File::open(path)?;
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "it is not a regular file (a directory, FIFO or device); name the file itself",
        ));
    }
    let too_big = |len: u64| {
        std::io::Error::new(
            std::io::ErrorKind::FileTooLarge,
            format!(
                "it is {:.1} MiB, over the {} MiB limit for a control file; a mesh this large \
                 belongs in Kubernetes discovery (--discovery kube)",
                len as f64 / f64::from(1 << 20),
                MAX_FILE >> 20
            ),
        )
    };
    if meta.len() > MAX_FILE {
        return Err(too_big(meta.len()));
    }
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    file.take(MAX_FILE + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > MAX_FILE {
        return Err(too_big(bytes.len() as u64));
    }
    String::from_utf8(bytes).map_err(|e| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!(
                "it is not UTF-8 text (byte {})",
                e.utf8_error().valid_up_to()
            ),
        )
    })
}

/// Reads and validates a mesh file.
pub fn load(path: &Path) -> Result<MeshFile, MeshFileError> {
    let text = read_file(path).map_err(|e| MeshFileError {
        path: path.to_path_buf(),
        line: None,
        message: format!("cannot read it: {e}; pass --mesh-file with a readable file"),
    })?;
    parse(path, &text)
}

/// Parses and validates mesh file text; `path` only names the file in errors.
pub fn parse(path: &Path, text: &str) -> Result<MeshFile, MeshFileError> {
    let err = |line: Option<usize>, message: String| MeshFileError {
        path: path.to_path_buf(),
        line,
        message,
    };
    let mut file: MeshFile = if text.trim().is_empty() {
        MeshFile::default()
    } else {
        serde_norway::from_str(text).map_err(|e| {
            let line = e.location().map(|l| l.line());
            // The parser's message already names the field and what it expected.
            let msg = e.to_string();
            let msg = msg.split(" at line ").next().unwrap_or(&msg).to_string();
            err(line, msg)
        })?
    };
    validate(&mut file)
        .map_err(|(section, needle, message)| err(line_of(text, section, &needle), message))?;
    Ok(file)
}

/// Checks what the YAML schema cannot: references and uniqueness. An error is
/// (section, text to find its line by, message).
fn validate(f: &mut MeshFile) -> Result<(), (&'static str, String, String)> {
    let mut node_names = HashSet::new();
    let mut addrs = HashSet::new();
    for n in &f.nodes {
        name_ok("node", &n.name).map_err(|m| ("nodes", n.name.clone(), m))?;
        if !node_names.insert(n.name.as_str()) {
            return Err((
                "nodes",
                n.name.clone(),
                format!(
                    "node {:?} is declared twice; node names must be unique",
                    n.name
                ),
            ));
        }
        if !addrs.insert(IpAddr::V4(n.address)) {
            return Err((
                "nodes",
                n.address.to_string(),
                format!(
                    "node {:?}: address {} is already used by another node",
                    n.name, n.address
                ),
            ));
        }
    }
    // Mesh sources are blocks: none may overlap another, nor hold a node's address.
    for (i, n) in f.nodes.iter().enumerate() {
        let src = n.mesh_source;
        // Pod addresses are checked with each workload below (naming its line).
        let clash = crate::state::desired::mesh_source_clash(&f.nodes, i, []);
        if let Some(clash) = clash {
            return Err((
                "nodes",
                src.to_string(),
                format!(
                    "node {:?}: meshSource {src} {clash}; each node needs source addresses of its own",
                    n.name
                ),
            ));
        }
    }
    let mut pods = HashSet::new();
    for w in &f.workloads {
        let id = format!("{}/{}", w.namespace, w.name);
        name_ok("workload", &w.name).map_err(|m| ("workloads", w.name.clone(), m))?;
        name_ok("namespace", &w.namespace).map_err(|m| ("workloads", w.name.clone(), m))?;
        if !node_names.contains(w.node.as_str()) {
            return Err((
                "workloads",
                w.node.clone(),
                format!(
                    "workload {id}: node {:?} is not in `nodes`; add it there or fix the name",
                    w.node
                ),
            ));
        }
        if !pods.insert(id.clone()) {
            return Err((
                "workloads",
                w.name.clone(),
                format!("workload {id} is declared twice"),
            ));
        }
        if let Some(n) = f.nodes.iter().find(|n| n.mesh_source.contains(w.ip)) {
            return Err((
                "workloads",
                w.ip.to_string(),
                format!(
                    "workload {id}: ip {} is in node {:?}'s meshSource {}; pods need addresses \
                     of their own",
                    w.ip, n.name, n.mesh_source
                ),
            ));
        }
        if !addrs.insert(IpAddr::V4(w.ip)) {
            return Err((
                "workloads",
                w.ip.to_string(),
                format!(
                    "workload {id}: ip {} is already used by a node or another workload",
                    w.ip
                ),
            ));
        }
        if w.cgroup.as_os_str().is_empty() {
            return Err((
                "workloads",
                w.name.clone(),
                format!("workload {id}: cgroup is empty; give the pod-level cgroup v2 folder"),
            ));
        }
        if w.probe_ports.len() > MAX_PROBE_PORTS || w.probe_ports.contains(&0) {
            return Err((
                "workloads",
                "probePorts".into(),
                format!(
                    "workload {id}: probePorts takes 1 to {MAX_PROBE_PORTS} non-zero ports, got {:?}",
                    w.probe_ports
                ),
            ));
        }
        if w.proxy_protocol_ports.contains(&0) {
            return Err((
                "workloads",
                "proxyProtocolPorts".into(),
                format!(
                    "workload {id}: proxyProtocolPorts lists port 0; list the ports whose server \
                     reads a PROXY protocol header"
                ),
            ));
        }
    }
    let mut svcs = HashSet::new();
    let mut vips: HashMap<(Ipv4Addr, u16), String> = HashMap::new();
    for s in &f.services {
        let id = format!("{}/{}", s.namespace, s.name);
        name_ok("service", &s.name).map_err(|m| ("services", s.name.clone(), m))?;
        if !svcs.insert(id.clone()) {
            return Err((
                "services",
                s.name.clone(),
                format!("service {id} is declared twice"),
            ));
        }
        if addrs.contains(&IpAddr::V4(s.vip)) {
            return Err((
                "services",
                s.vip.to_string(),
                format!(
                    "service {id}: vip {} is the address of a node or workload",
                    s.vip
                ),
            ));
        }
        if s.ports.is_empty() {
            return Err((
                "services",
                s.name.clone(),
                format!("service {id}: ports is empty; a service needs at least one port"),
            ));
        }
        if s.selector.is_empty() {
            return Err((
                "services",
                s.name.clone(),
                format!(
                    "service {id}: selector is empty; it would select every workload — give labels"
                ),
            ));
        }
        for p in &s.ports {
            if p.port == 0 || p.target_port == Some(0) {
                return Err((
                    "services",
                    "port".into(),
                    format!("service {id}: port 0 is not a port"),
                ));
            }
            if let Some(ap) = &p.app_protocol {
                crate::state::desired::AppProtocol::parse(ap).map_err(|m| {
                    (
                        "services",
                        ap.clone(),
                        format!("service {id}, port {}: {m}", p.port),
                    )
                })?;
            }
            if let Some(other) = vips.insert((s.vip, p.port), id.clone()) {
                return Err((
                    "services",
                    s.vip.to_string(),
                    format!("service {id}: {}:{} is also service {other}", s.vip, p.port),
                ));
            }
        }
    }
    let mut policies = HashSet::new();
    for p in &f.authorization_policies {
        let id = format!("{}/{}", p.namespace, p.name);
        name_ok("policy", &p.name).map_err(|m| ("authorizationPolicies", p.name.clone(), m))?;
        name_ok("namespace", &p.namespace)
            .map_err(|m| ("authorizationPolicies", p.name.clone(), m))?;
        if !policies.insert(id.clone()) {
            return Err((
                "authorizationPolicies",
                p.name.clone(),
                format!("policy {id} is declared twice"),
            ));
        }
        for src in &p.from {
            if src.principals.is_empty() && src.namespaces.is_empty() {
                return Err((
                    "authorizationPolicies",
                    "from".into(),
                    format!(
                        "policy {id}: a `from` entry names neither principals nor namespaces; \
                         omit `from` to match every source"
                    ),
                ));
            }
            for pr in &src.principals {
                crate::identity::Identity::parse(pr).map_err(|e| {
                    (
                        "authorizationPolicies",
                        pr.clone(),
                        format!("policy {id}: {e}"),
                    )
                })?;
            }
        }
        if p.ports.contains(&0) {
            return Err((
                "authorizationPolicies",
                "ports".into(),
                format!("policy {id}: port 0 is not a port"),
            ));
        }
        for op in &p.to {
            if let Some(m) = op
                .methods
                .iter()
                .find(|m| http::Method::from_bytes(m.as_bytes()).is_err() || m.is_empty())
            {
                return Err((
                    "authorizationPolicies",
                    m.clone(),
                    format!("policy {id}: {m:?} is not an HTTP method"),
                ));
            }
            if let Some(path) = op.paths.iter().chain(op.headers.values()).find(|v| {
                let inner = v
                    .strip_suffix('*')
                    .or_else(|| v.strip_prefix('*'))
                    .unwrap_or(v);
                v.is_empty() || inner.contains('*')
            }) {
                return Err((
                    "authorizationPolicies",
                    path.clone(),
                    format!(
                        "policy {id}: {path:?}: a path or header value is exact, a prefix ending in \
                         `*` or a suffix starting with `*`"
                    ),
                ));
            }
            if let Some(path) = op
                .paths
                .iter()
                .find(|p| !p.starts_with('/') && !p.starts_with('*'))
            {
                return Err((
                    "authorizationPolicies",
                    path.clone(),
                    format!("policy {id}: path {path:?} must start with / (or *)"),
                ));
            }
        }
    }
    f.routes = read_routes(f)?;
    crate::state::routes::compile(&f.routes, |ns, name| {
        f.services
            .iter()
            .find(|s| s.namespace == ns && s.name == name)
            .map(|s| crate::state::routes::ServiceRef {
                namespace: &s.namespace,
                name: &s.name,
                ports: s
                    .ports
                    .iter()
                    .map(|p| (p.port, std::net::SocketAddr::new(IpAddr::V4(s.vip), p.port)))
                    .collect(),
            })
    })
    .map_err(|m| {
        // The message starts with the route's kind and namespace/name: find its line by name.
        let section = if m.starts_with("GRPCRoute") {
            "grpcRoutes"
        } else {
            "httpRoutes"
        };
        let name = m
            .split_once(' ')
            .and_then(|(_, rest)| rest.split_once(':'))
            .and_then(|(id, _)| id.split_once('/'))
            .map(|(_, n)| n.to_string())
            .unwrap_or_default();
        (section, format!("name: {name}"), m)
    })?;
    Ok(())
}

/// The routes' `spec`s read into the upstream Gateway API types. Those types accept unknown
/// fields, so a misspelt one (`matchs:`) is found by reading the spec back and comparing: a
/// route that silently matched everything would be worse than an error.
fn read_routes(f: &MeshFile) -> Result<Vec<RouteDesc>, (&'static str, String, String)> {
    let mut out = Vec::new();
    for (section, kind, list) in [
        ("httpRoutes", "HTTPRoute", &f.http_routes),
        ("grpcRoutes", "GRPCRoute", &f.grpc_routes),
    ] {
        for r in list {
            let id = format!("{kind} {}/{}", r.namespace, r.name);
            let at = format!("name: {}", r.name);
            name_ok("route", &r.name).map_err(|m| (section, at.clone(), m))?;
            name_ok("namespace", &r.namespace).map_err(|m| (section, at.clone(), m))?;
            let bad = |e: String| (section, at.clone(), format!("{id}: spec: {e}"));
            let (kind, back) = if section == "httpRoutes" {
                let spec: gateway_api::experimental::httproutes::HttpRouteSpec =
                    serde_norway::from_value(r.spec.clone()).map_err(|e| bad(e.to_string()))?;
                let back = serde_norway::to_value(&spec).map_err(|e| bad(e.to_string()))?;
                (RouteKind::Http(Box::new(spec)), back)
            } else {
                let spec: gateway_api::grpcroutes::GrpcRouteSpec =
                    serde_norway::from_value(r.spec.clone()).map_err(|e| bad(e.to_string()))?;
                let back = serde_norway::to_value(&spec).map_err(|e| bad(e.to_string()))?;
                (RouteKind::Grpc(Box::new(spec)), back)
            };
            if let Some(path) = unknown_field(&r.spec, &back, String::new()) {
                return Err(bad(format!(
                    "unknown field `{path}`; see the Gateway API {} reference for the fields",
                    if section == "httpRoutes" {
                        "HTTPRoute"
                    } else {
                        "GRPCRoute"
                    }
                )));
            }
            let rate_limit = r
                .rate_limit
                .as_ref()
                .map(RateLimitSpec::check)
                .transpose()
                .map_err(|m| (section, at.clone(), format!("{id}: {m}")))?;
            out.push(RouteDesc {
                namespace: r.namespace.clone(),
                name: r.name.clone(),
                kind,
                rate_limit,
            });
        }
    }
    Ok(out)
}

/// The first key of `given` that did not survive reading into the typed spec (`back`).
fn unknown_field(
    given: &serde_norway::Value,
    back: &serde_norway::Value,
    at: String,
) -> Option<String> {
    use serde_norway::Value;
    match (given, back) {
        (Value::Mapping(g), Value::Mapping(b)) => g.iter().find_map(|(k, v)| {
            let name = k.as_str().map_or_else(|| format!("{k:?}"), str::to_string);
            let path = if at.is_empty() {
                name
            } else {
                format!("{at}.{name}")
            };
            match b.get(k) {
                Some(bv) => unknown_field(v, bv, path),
                // an explicit null reads back as absent
                None if v.is_null() => None,
                None => Some(path),
            }
        }),
        (Value::Sequence(g), Value::Sequence(b)) => g
            .iter()
            .zip(b)
            .enumerate()
            .find_map(|(i, (gv, bv))| unknown_field(gv, bv, format!("{at}[{i}]"))),
        (Value::Tagged(g), _) => unknown_field(&g.value, back, at),
        _ => None,
    }
}

fn name_ok(what: &str, name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 253
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{what} name {name:?} is not a Kubernetes name (lowercase letters, digits, '-', '.')"
        ))
    }
}

/// The 1-based line of the first occurrence of `needle` inside top-level `section`.
fn line_of(text: &str, section: &str, needle: &str) -> Option<usize> {
    let header = format!("{section}:");
    let mut inside = false;
    for (i, line) in text.lines().enumerate() {
        if !line.starts_with(' ') && !line.starts_with('-') && !line.trim().is_empty() {
            inside = line.starts_with(&header);
            if inside && line.contains(needle) && line.trim() != header {
                return Some(i + 1);
            }
            continue;
        }
        if inside && line.contains(needle) {
            return Some(i + 1);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Control files: symlinks followed (a ConfigMap mount), directories, FIFOs, oversized and
    /// non-UTF-8 files refused with the reason.
    #[test]
    fn control_files_are_read_within_limits() {
        let dir = std::env::temp_dir().join(format!("nm-read-file-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("..data")).expect("dir");
        let real = dir.join("..data/mesh.yaml");
        std::fs::write(&real, "nodes: []\n").expect("write");
        let link = dir.join("mesh.yaml");
        std::os::unix::fs::symlink("..data/mesh.yaml", &link).expect("symlink");
        assert_eq!(
            read_file(&link).expect("through the symlink"),
            "nodes: []\n"
        );
        let e = read_file(&dir).expect_err("a directory");
        assert!(e.to_string().contains("not a regular file"), "{e}");
        let fifo = dir.join("fifo");
        let c = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).expect("path");
        // SAFETY: a valid C string; mkfifo only creates a node.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0, "mkfifo");
        // Opening a FIFO for reading blocks until a writer comes: one comes, and the reader
        // still refuses it without reading.
        let writer = std::thread::spawn({
            let fifo = fifo.clone();
            move || drop(std::fs::OpenOptions::new().write(true).open(fifo))
        });
        let e = read_file(&fifo).expect_err("a FIFO");
        writer.join().expect("writer");
        assert!(e.to_string().contains("not a regular file"), "{e}");
        let big = dir.join("big.yaml");
        let f = std::fs::File::create(&big).expect("create");
        f.set_len(100 << 20).expect("100 MiB");
        let e = read_file(&big).expect_err("100 MiB");
        assert_eq!(e.kind(), std::io::ErrorKind::FileTooLarge);
        assert!(
            e.to_string().contains("100.0 MiB, over the 16 MiB limit"),
            "{e}"
        );
        std::fs::write(&big, b"nodes: [\xff]").expect("write");
        let e = read_file(&big).expect_err("not UTF-8");
        assert!(e.to_string().contains("not UTF-8"), "{e}");
        let e = load(&dir.join("missing.yaml")).expect_err("missing");
        assert!(e.to_string().contains("pass --mesh-file"), "{e}");
        std::fs::remove_dir_all(&dir).expect("clean up");
    }

    #[test]
    fn request_rules_of_policies_are_checked() {
        let with = |to: &str| {
            format!(
                "{GOOD}authorizationPolicies:\n  - name: p\n    namespace: demo\n    action: DENY\n    to: [{to}]\n"
            )
        };
        let ok = parse(Path::new("m"), &with("{ methods: [POST], paths: [/admin, /admin/*, '*.png'], headers: { x-team: 'blue*' } }"))
            .expect("good rules");
        assert_eq!(ok.authorization_policies[0].to[0].paths.len(), 3);
        for (to, needle) in [
            ("{ methods: ['PO ST'] }", "not an HTTP method"),
            ("{ paths: [admin] }", "must start with /"),
            ("{ paths: ['/a*b'] }", "a prefix ending in"),
            ("{ pathz: [/a] }", "unknown field"),
        ] {
            let e = parse(Path::new("m"), &with(to)).expect_err(to);
            assert!(e.message.contains(needle), "{to}: {e}");
        }
    }

    #[test]
    fn routes_are_read_checked_and_named_by_line() {
        let base = format!(
            "{GOOD}  - name: echo-v2\n    namespace: demo\n    vip: 10.96.0.12\n    ports: [{{ port: 80, targetPort: 7000 }}]\n    selector: {{ app: echo }}\n"
        );
        let with = |spec: &str| {
            format!("{base}httpRoutes:\n  - name: split\n    namespace: demo\n    spec:\n{spec}")
        };
        let good = with(
            "      parentRefs: [{ kind: Service, name: echo, port: 80 }]\n      rules:\n        - backendRefs: [{ name: echo, port: 80, weight: 90 }, { name: echo-v2, port: 80, weight: 10 }]\n",
        );
        let f = parse(Path::new("m.yaml"), &good).expect("good routes");
        assert_eq!(f.routes.len(), 1);
        let typo = with(
            "      parentRefs: [{ kind: Service, name: echo }]\n      rules:\n        - matchs: [{ path: { value: /x } }]\n",
        );
        let e = parse(Path::new("m.yaml"), &typo).expect_err("typo");
        assert!(e.message.contains("unknown field `rules[0].matchs`"), "{e}");
        let line = good
            .lines()
            .position(|l| l.contains("name: split"))
            .map(|i| i + 1);
        assert_eq!(e.line, line, "{e}");
        let bad_regex = with(
            "      parentRefs: [{ kind: Service, name: echo }]\n      rules:\n        - matches: [{ path: { type: RegularExpression, value: '[' } }]\n",
        );
        let e = parse(Path::new("m.yaml"), &bad_regex).expect_err("regex");
        assert!(
            e.message.contains("HTTPRoute demo/split") && e.message.contains("invalid"),
            "{e}"
        );
        assert_eq!(e.line, line, "{e}");
        let unknown_backend = with(
            "      parentRefs: [{ kind: Service, name: echo }]\n      rules:\n        - backendRefs: [{ name: echo-v9, port: 80 }]\n",
        );
        let e = parse(Path::new("m.yaml"), &unknown_backend).expect_err("backend");
        assert!(e.message.contains("demo/echo-v9"), "{e}");
        let limited = format!("{good}    rateLimit: {{ requestsPerSecond: 50 }}\n");
        let f = parse(Path::new("m.yaml"), &limited).expect("a rate limit");
        let rl = f.routes[0].rate_limit.expect("rate limit read");
        assert_eq!((rl.requests_per_second.get(), rl.burst.get()), (50, 50));
        for (bad, needle) in [
            ("{ requestsPerSecond: 0 }", "requestsPerSecond is 0"),
            ("{ requestsPerSecond: 5, burst: 0 }", "burst is 0"),
            ("{ rps: 5 }", "unknown field"),
        ] {
            let e = parse(
                Path::new("m.yaml"),
                &format!("{good}    rateLimit: {bad}\n"),
            )
            .expect_err(bad);
            assert!(e.message.contains(needle), "{bad}: {e}");
        }
    }

    const GOOD: &str = "\
nodes:
  - name: node-1
    address: 10.203.0.1
    meshSource: 10.210.1.254
  - name: node-2
    address: 10.203.0.2
    meshSource: 10.210.2.254
workloads:
  - name: client
    namespace: demo
    serviceAccount: client-sa
    node: node-1
    ip: 10.210.1.2
    cgroup: kubepods/pod-client
    labels: { app: client }
  - name: echo-1
    namespace: demo
    node: node-2
    ip: 10.210.2.2
    cgroup: /sys/fs/cgroup/pod-echo
    labels: { app: echo }
    probePorts: [8081]
services:
  - name: echo
    namespace: demo
    vip: 10.96.0.10
    ports: [{ port: 80, targetPort: 7000 }]
    selector: { app: echo }
";

    fn p(text: &str) -> Result<MeshFile, MeshFileError> {
        parse(Path::new("mesh.yaml"), text)
    }

    #[test]
    fn good_file_parses() {
        let f = p(GOOD).expect("good");
        assert_eq!(f.nodes.len(), 2);
        assert_eq!(f.workloads[1].service_account, "default");
        assert_eq!(f.workloads[1].probe_ports, vec![8081]);
        assert_eq!(f.services[0].ports[0].target(), 7000);
    }

    #[test]
    fn empty_file_is_an_empty_mesh() {
        assert_eq!(p("").expect("empty"), MeshFile::default());
    }

    #[test]
    fn syntax_error_names_the_line() {
        let bad = GOOD.replace("    ip: 10.210.2.2", "    ip: [10.210.2.2");
        let e = p(&bad).expect_err("bad yaml");
        assert!(e.line.is_some_and(|l| (18..=21).contains(&l)), "{e}");
    }

    #[test]
    fn bad_value_names_the_line_and_field() {
        let bad = GOOD.replace("ip: 10.210.2.2", "ip: 10.210.2.300");
        let e = p(&bad).expect_err("bad ip");
        assert_eq!(e.line, Some(19), "{e}");
        assert!(e.to_string().contains("mesh.yaml line 19"), "{e}");
    }

    #[test]
    fn unknown_field_is_refused() {
        let bad = GOOD.replace("serviceAccount: client-sa", "serviceAcount: client-sa");
        let e = p(&bad).expect_err("typo");
        assert!(e.message.contains("serviceAcount"), "{e}");
        assert_eq!(e.line, Some(11), "{e}");
    }

    #[test]
    fn unknown_node_names_the_line() {
        let bad = GOOD.replace("node: node-2", "node: node-9");
        let e = p(&bad).expect_err("unknown node");
        assert_eq!(e.line, Some(18), "{e}");
        assert!(
            e.message.contains("node-9") && e.message.contains("nodes"),
            "{e}"
        );
    }

    #[test]
    fn mesh_source_blocks_parse_and_may_not_clash() {
        let f = p(&GOOD.replace("meshSource: 10.210.1.254", "meshSource: 10.210.1.240/28"))
            .expect("a block");
        let src = f.nodes[0].mesh_source;
        assert_eq!(src.to_string(), "10.210.1.240/28");
        assert_eq!((src.size(), src.mask()), (16, 0xffff_fff0));
        assert_eq!(src.nth(17).to_string(), "10.210.1.241");
        assert_eq!(f.nodes[1].mesh_source.to_string(), "10.210.2.254");
        for (from, to, says) in [
            ("10.210.1.254", "10.210.1.245/28", "write 10.210.1.240/28"),
            ("10.210.1.254", "10.210.0.0/16", "65536 addresses"),
            (
                "10.210.1.254",
                "10.210.1.0/24",
                "10.210.1.2 is in node \"node-1\"'s meshSource",
            ),
            (
                "10.210.1.254",
                "10.203.0.0/24",
                "holds node \"node-1\"'s address",
            ),
            ("10.210.1.254", "10.210.2.0/24", "overlaps node \"node-2\""),
            ("10.210.1.254", "not-an-ip", "neither an IPv4 address"),
        ] {
            let e = p(&GOOD.replace(&format!("meshSource: {from}"), &format!("meshSource: {to}")))
                .expect_err(to);
            assert!(e.to_string().contains(says), "{to}: {e}");
        }
    }

    #[test]
    fn duplicate_ip_and_vip_clash_are_refused() {
        let bad = GOOD.replace("ip: 10.210.2.2", "ip: 10.210.1.2");
        let e = p(&bad).expect_err("dup ip");
        assert!(e.message.contains("already used"), "{e}");
        let bad = GOOD.replace("vip: 10.96.0.10", "vip: 10.210.1.2");
        let e = p(&bad).expect_err("vip clash");
        assert!(e.message.contains("vip"), "{e}");
        assert_eq!(e.line, Some(26), "{e}");
    }

    #[test]
    fn empty_selector_and_too_many_probe_ports_are_refused() {
        let bad = GOOD.replace("selector: { app: echo }", "selector: {}");
        assert!(p(&bad).expect_err("selector").message.contains("selector"));
        let bad = GOOD.replace("probePorts: [8081]", "probePorts: [1, 2, 3, 4, 5]");
        assert!(p(&bad).expect_err("probes").message.contains("probePorts"));
    }
}
