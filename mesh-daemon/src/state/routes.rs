//! HTTP and gRPC routes, compiled: Gateway API HTTPRoute and GRPCRoute rules attached to a
//! Service (GAMMA), turned into one table per service port whose entries are already in the
//! spec's precedence order, so choosing a rule for a request is a first-match scan with no
//! allocation ([`RouteTable::select`]). Everything here is pure: table tests in `routes/tests.rs`.
//!
//! What the spec leaves to implementations, decided here:
//! - `RegularExpression` paths rank after every `PathPrefix` (Envoy-based meshes do the same);
//!   patterns use the `regex` crate (RE2 syntax, linear time) and match the whole path.
//! - `hostnames` are ignored: a mesh route is chosen by the Service it is attached to (GAMMA).
//! - Ties that the spec breaks by creation time are broken by `namespace/name` (the mesh file has
//!   no creation time), then by rule and match order.
//! - A GRPCRoute method match is a path match on `/service/method`: service and method exact is
//!   an exact path, a service alone a prefix, anything else a regular expression.
//! - Consumer routes (in the client's namespace, attached to a Service elsewhere) apply only to
//!   that namespace's clients and, for them, replace the Service's own (producer) routes.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use gateway_api::{experimental::httproutes as hr, grpcroutes as gr};
use http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Uri, uri::PathAndQuery};
use regex::Regex;

/// A route attached to a service, as a source gives it.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RouteDesc {
    pub namespace: String,
    pub name: String,
    pub kind: RouteKind,
    /// A local rate limit on the route's requests (not in the upstream types: the mesh file's
    /// `rateLimit` beside `spec`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimit>,
}

/// A local rate limit (token bucket): per source workload, each proxy enforcing its own, so a
/// node proxy gives each of its pods the bucket its sidecar would have had (one noisy pod cannot
/// spend another's). Over it: 429 with `retry-after`, or gRPC `RESOURCE_EXHAUSTED`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RateLimit {
    /// Tokens added per second (the sustained rate).
    pub requests_per_second: std::num::NonZeroU32,
    /// The bucket's size: how many requests may come at once.
    pub burst: std::num::NonZeroU32,
}

/// The upstream types, unchanged: a Kubernetes object's `spec` maps onto them 1:1.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub enum RouteKind {
    #[serde(rename = "HTTPRoute")]
    Http(Box<hr::HttpRouteSpec>),
    #[serde(rename = "GRPCRoute")]
    Grpc(Box<gr::GrpcRouteSpec>),
}

impl RouteDesc {
    pub fn kind_name(&self) -> &'static str {
        match self.kind {
            RouteKind::Http(_) => "HTTPRoute",
            RouteKind::Grpc(_) => "GRPCRoute",
        }
    }
}

/// A service as routes name it: namespace, name and its ports (VIP:port of each).
pub struct ServiceRef<'a> {
    pub namespace: &'a str,
    pub name: &'a str,
    /// (service port, VIP:port) for each declared port.
    pub ports: Vec<(u16, SocketAddr)>,
}

/// One rule's outcome: where requests go and what is done to them on the way.
#[derive(Debug)]
pub struct Rule {
    /// `namespace/name` of the route, the `route` label of request metrics.
    pub route: String,
    /// The rule's `name`, or its index.
    pub rule: String,
    pub backends: Vec<Backend>,
    pub request_headers: HeaderModifier,
    pub response_headers: HeaderModifier,
    pub rewrite: Option<Rewrite>,
    pub redirect: Option<Redirect>,
    pub timeouts: Timeouts,
    pub retry: Option<RetryPolicy>,
    pub rate_limit: Option<RateLimit>,
}

impl Rule {
    fn new(route: &RouteDesc, rule: String, backends: Vec<Backend>) -> Self {
        Self {
            route: format!("{}/{}", route.namespace, route.name),
            rule,
            backends,
            request_headers: HeaderModifier::default(),
            response_headers: HeaderModifier::default(),
            rewrite: None,
            redirect: None,
            timeouts: Timeouts::default(),
            retry: None,
            rate_limit: route.rate_limit,
        }
    }
}

/// A weighted backendRef: a service port, by its VIP:port.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Backend {
    pub addr: SocketAddr,
    /// `namespace/name:port`, for logs and config_dump.
    pub name: String,
    pub weight: u32,
}

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct HeaderModifier {
    pub set: Vec<(HeaderName, HeaderValue)>,
    pub add: Vec<(HeaderName, HeaderValue)>,
    pub remove: Vec<HeaderName>,
}

impl HeaderModifier {
    pub fn is_empty(&self) -> bool {
        self.set.is_empty() && self.add.is_empty() && self.remove.is_empty()
    }

    /// Applies the filter in the spec's order: set, add, remove.
    pub fn apply(&self, headers: &mut HeaderMap) {
        for (n, v) in &self.set {
            headers.insert(n.clone(), v.clone());
        }
        for (n, v) in &self.add {
            headers.append(n.clone(), v.clone());
        }
        for n in &self.remove {
            headers.remove(n);
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathRewrite {
    Full(String),
    /// Replaces the prefix the request matched (the rule's match must be a PathPrefix).
    Prefix(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rewrite {
    pub hostname: Option<HeaderValue>,
    pub path: Option<PathRewrite>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Redirect {
    pub scheme: Option<String>,
    pub hostname: Option<String>,
    pub port: Option<u16>,
    pub path: Option<PathRewrite>,
    pub status: StatusCode,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// The whole request, retries included (`timeouts.request`).
    pub request: Option<Duration>,
    /// One attempt at a backend (`timeouts.backendRequest`).
    pub backend_request: Option<Duration>,
}

/// HTTPRoute's `retry` (experimental channel, GEP-1731).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryPolicy {
    pub attempts: u32,
    pub codes: Vec<u16>,
    pub backoff: Option<Duration>,
}

#[derive(Debug, Clone)]
pub enum PathMatch {
    Exact(String),
    /// Element-wise: `/a` matches `/a`, `/a/` and `/a/b`, never `/ab`. Stored without a trailing
    /// slash (except `/` itself).
    Prefix(String),
    /// Anchored at both ends.
    Regex(Regex),
}

#[derive(Debug, Clone)]
pub enum ValueMatch {
    Exact(String),
    Regex(Regex),
}

impl ValueMatch {
    fn matches(&self, v: &str) -> bool {
        match self {
            Self::Exact(e) => e == v,
            Self::Regex(r) => r.is_match(v),
        }
    }
}

/// One `matches[]` entry: every condition present must hold.
#[derive(Debug, Clone)]
pub struct Match {
    pub path: PathMatch,
    pub method: Option<Method>,
    pub headers: Vec<(HeaderName, ValueMatch)>,
    pub query: Vec<(String, ValueMatch)>,
}

/// The parts of a request a route matches on.
pub struct RequestView<'a> {
    pub method: &'a Method,
    pub path: &'a str,
    pub query: Option<&'a str>,
    pub headers: &'a HeaderMap,
}

impl Match {
    /// What a rule without `matches` matches: every request (a `/` prefix).
    pub fn everything() -> Self {
        Self {
            path: PathMatch::Prefix("/".into()),
            method: None,
            headers: vec![],
            query: vec![],
        }
    }

    pub fn matches(&self, req: &RequestView<'_>) -> bool {
        let path_ok = match &self.path {
            PathMatch::Exact(p) => req.path == p,
            PathMatch::Prefix(p) => prefix_matches(p, req.path),
            PathMatch::Regex(r) => r.is_match(req.path),
        };
        path_ok
            && self.method.as_ref().is_none_or(|m| m == req.method)
            && self.headers.iter().all(|(n, vm)| {
                // A header given more than once matches on its first value (the spec leaves
                // repeated headers to implementations; Envoy joins them, which a regex can
                // then match across).
                req.headers
                    .get(n)
                    .and_then(|v| v.to_str().ok())
                    .is_some_and(|v| vm.matches(v))
            })
            && self
                .query
                .iter()
                .all(|(n, vm)| query_first(req.query, n).is_some_and(|v| vm.matches(&v)))
    }

    /// The spec's precedence as a sort key (smaller first).
    fn rank(
        &self,
    ) -> (
        u8,
        std::cmp::Reverse<usize>,
        bool,
        std::cmp::Reverse<usize>,
        std::cmp::Reverse<usize>,
    ) {
        let (kind, len) = match &self.path {
            PathMatch::Exact(p) => (0, p.len()),
            PathMatch::Prefix(p) => (1, p.len()),
            PathMatch::Regex(_) => (2, 0),
        };
        (
            kind,
            std::cmp::Reverse(len),
            self.method.is_none(),
            std::cmp::Reverse(self.headers.len()),
            std::cmp::Reverse(self.query.len()),
        )
    }
}

fn prefix_matches(prefix: &str, path: &str) -> bool {
    if prefix == "/" {
        return true;
    }
    match path.strip_prefix(prefix) {
        Some(rest) => rest.is_empty() || rest.starts_with('/'),
        None => false,
    }
}

/// The first value of query parameter `name`, decoded as a form (`+` is a space) with the
/// decoder `/tap` uses; a badly encoded parameter matches nothing.
fn query_first(query: Option<&str>, name: &str) -> Option<String> {
    query?.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        if crate::tap::percent_decode(k)? == name {
            crate::tap::percent_decode(v)
        } else {
            None
        }
    })
}

#[derive(Debug)]
struct Entry {
    m: Match,
    rule: Arc<Rule>,
    /// `namespace/name`, rule index, match index: the tie-breakers.
    order: (String, usize, usize),
}

/// The compiled routes of one service port.
#[derive(Debug, Default)]
pub struct RouteTable {
    /// The Service's own routes (in its namespace).
    producer: Vec<Entry>,
    /// Routes of other namespaces, each for its own namespace's clients.
    consumer: std::collections::HashMap<String, Vec<Entry>>,
}

/// What a request gets: a rule (with the match that chose it, for prefix rewrites).
pub struct Selected<'a> {
    pub rule: &'a Arc<Rule>,
    pub matched: &'a Match,
}

impl RouteTable {
    /// The (route, limit) of every rule with a rate limit.
    pub fn rate_limits(&self) -> impl Iterator<Item = (String, RateLimit)> + '_ {
        self.producer
            .iter()
            .chain(self.consumer.values().flatten())
            .filter_map(|e| e.rule.rate_limit.map(|l| (e.rule.route.clone(), l)))
    }

    /// The rule for a request from a client in `client_ns`; None: no route matches (the
    /// request goes to the service itself, as without routes — GAMMA answers 404 only when
    /// routes exist, see [`RouteTable::is_empty_for`]).
    pub fn select<'a>(&'a self, client_ns: &str, req: &RequestView<'_>) -> Option<Selected<'a>> {
        let entries = self.consumer.get(client_ns).unwrap_or(&self.producer);
        entries.iter().find(|e| e.m.matches(req)).map(|e| Selected {
            rule: &e.rule,
            matched: &e.m,
        })
    }

    /// Whether any route applies to clients of `client_ns`.
    pub fn is_empty_for(&self, client_ns: &str) -> bool {
        self.consumer
            .get(client_ns)
            .unwrap_or(&self.producer)
            .is_empty()
    }

    pub fn is_empty(&self) -> bool {
        self.producer.is_empty() && self.consumer.is_empty()
    }

    fn sort(&mut self) {
        let key = |e: &Entry| (e.m.rank(), e.order.clone());
        self.producer.sort_by_key(key);
        for v in self.consumer.values_mut() {
            v.sort_by_key(key);
        }
    }
}

/// Chooses among weighted backends with `draw`, a uniform number in `0..total weight` (the
/// caller's randomness, so the choice itself is testable). None: every weight is zero.
pub fn pick_backend(backends: &[Backend], draw: u64) -> Option<&Backend> {
    let mut left = draw;
    for b in backends {
        if left < u64::from(b.weight) {
            return Some(b);
        }
        left -= u64::from(b.weight);
    }
    None
}

pub fn total_weight(backends: &[Backend]) -> u64 {
    backends.iter().map(|b| u64::from(b.weight)).sum()
}

/// The new path (and query) after a rewrite or redirect's path change.
pub fn rewrite_path(rw: &PathRewrite, matched: &Match, path: &str) -> String {
    match rw {
        PathRewrite::Full(p) => p.clone(),
        PathRewrite::Prefix(new) => {
            let rest = match &matched.path {
                PathMatch::Prefix(p) if p != "/" => path.strip_prefix(p.as_str()).unwrap_or(path),
                _ => path,
            };
            let new = new.trim_end_matches('/');
            if rest.is_empty() {
                if new.is_empty() {
                    "/".into()
                } else {
                    new.into()
                }
            } else if rest.starts_with('/') {
                format!("{new}{rest}")
            } else {
                format!("{new}/{rest}")
            }
        }
    }
}

/// Applies a URL rewrite to a request's URI and headers (hostname: `Host` and `:authority`).
pub fn apply_rewrite(rw: &Rewrite, matched: &Match, uri: &Uri, headers: &mut HeaderMap) -> Uri {
    let mut parts = uri.clone().into_parts();
    if let Some(p) = &rw.path {
        let path = rewrite_path(p, matched, uri.path());
        let pq = match uri.query() {
            Some(q) => format!("{path}?{q}"),
            None => path,
        };
        if let Ok(pq) = PathAndQuery::try_from(pq) {
            parts.path_and_query = Some(pq);
        }
    }
    if let Some(h) = &rw.hostname {
        headers.insert(http::header::HOST, h.clone());
        if parts.authority.is_some()
            && let Ok(a) = h.to_str().unwrap_or_default().parse()
        {
            parts.authority = Some(a);
        }
    }
    Uri::from_parts(parts).unwrap_or_else(|_| uri.clone())
}

/// The `Location` of a redirect for a request to `host` (its `Host` or `:authority`).
pub fn redirect_location(rd: &Redirect, matched: &Match, uri: &Uri, host: &str) -> String {
    let scheme = rd
        .scheme
        .clone()
        .or_else(|| uri.scheme_str().map(str::to_string))
        .unwrap_or_else(|| "http".into());
    let (req_host, req_port) = split_host_port(host);
    let hostname = rd.hostname.clone().unwrap_or_else(|| req_host.to_string());
    // The spec: a scheme change without a port drops the port (its default follows the scheme).
    let port = rd
        .port
        .or(if rd.scheme.is_some() { None } else { req_port });
    let default_port = if scheme == "https" { 443 } else { 80 };
    let authority = match port {
        Some(p) if p != default_port => format!("{hostname}:{p}"),
        _ => hostname,
    };
    let path = match &rd.path {
        Some(p) => rewrite_path(p, matched, uri.path()),
        None => uri.path().to_string(),
    };
    let query = uri.query().map(|q| format!("?{q}")).unwrap_or_default();
    format!("{scheme}://{authority}{path}{query}")
}

fn split_host_port(host: &str) -> (&str, Option<u16>) {
    if let Some(rest) = host.strip_prefix('[')
        && let Some((h, p)) = rest.split_once(']')
    {
        return (
            &host[..h.len() + 2],
            p.strip_prefix(':').and_then(|p| p.parse().ok()),
        );
    }
    match host.rsplit_once(':') {
        Some((h, p)) if !h.contains(':') => (h, p.parse().ok()),
        _ => (host, None),
    }
}

// === compiling ===

/// Compiles every route into tables keyed by the VIP:port of the service port each attaches to.
/// `service` finds a service by (namespace, name). An error names the route and what to fix.
pub fn compile<'a>(
    routes: &[RouteDesc],
    service: impl Fn(&str, &str) -> Option<ServiceRef<'a>>,
) -> Result<std::collections::HashMap<SocketAddr, Arc<RouteTable>>, String> {
    let mut tables: std::collections::HashMap<SocketAddr, RouteTable> = Default::default();
    let mut seen = std::collections::HashSet::new();
    for r in routes {
        let id = format!("{} {}/{}", r.kind_name(), r.namespace, r.name);
        if !seen.insert((r.kind_name(), r.namespace.clone(), r.name.clone())) {
            return Err(format!(
                "{id} is declared twice; route names must be unique per kind and namespace"
            ));
        }
        let compiled = match &r.kind {
            RouteKind::Http(spec) => compile_http(r, spec, &service),
            RouteKind::Grpc(spec) => compile_grpc(r, spec, &service),
        }
        .map_err(|e| format!("{id}: {e}"))?;
        for (parent_ns, addrs) in &compiled.parents {
            for addr in addrs {
                let table = tables.entry(*addr).or_default();
                let entries = compiled.entries(&r.namespace, &r.name);
                if *parent_ns == r.namespace {
                    table.producer.extend(entries);
                } else {
                    table
                        .consumer
                        .entry(r.namespace.clone())
                        .or_default()
                        .extend(entries);
                }
            }
        }
    }
    Ok(tables
        .into_iter()
        .map(|(k, mut t)| {
            t.sort();
            (k, Arc::new(t))
        })
        .collect())
}

struct Compiled {
    /// (the parent service's namespace, the VIP:ports it attaches to)
    parents: Vec<(String, Vec<SocketAddr>)>,
    /// (rule index, its matches, the rule)
    rules: Vec<(usize, Vec<Match>, Arc<Rule>)>,
}

impl Compiled {
    fn entries(&self, ns: &str, name: &str) -> Vec<Entry> {
        self.rules
            .iter()
            .flat_map(|(ri, matches, rule)| {
                matches.iter().enumerate().map(move |(mi, m)| Entry {
                    m: m.clone(),
                    rule: rule.clone(),
                    order: (format!("{ns}/{name}"), *ri, mi),
                })
            })
            .collect()
    }
}

/// A parentRef or backendRef's common fields.
struct Ref<'r> {
    group: Option<&'r str>,
    kind: Option<&'r str>,
    name: &'r str,
    namespace: Option<&'r str>,
    port: Option<i32>,
}

fn service_kind(what: &str, r: &Ref<'_>) -> Result<(), String> {
    let group_ok = matches!(r.group, None | Some("") | Some("core"));
    let kind_ok = matches!(r.kind, None | Some("Service"));
    if group_ok && kind_ok {
        Ok(())
    } else {
        Err(format!(
            "{what} {:?} is a {}/{}; in the mesh only a Service (group \"\", kind Service) can be one",
            r.name,
            r.group.unwrap_or(""),
            r.kind.unwrap_or("Service")
        ))
    }
}

fn port_of(r: &Ref<'_>) -> Result<Option<u16>, String> {
    r.port
        .map(|p| {
            u16::try_from(p)
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| format!("port {p} of {:?} is not a TCP port", r.name))
        })
        .transpose()
}

fn parents<'a>(
    route: &RouteDesc,
    refs: Vec<Ref<'_>>,
    service: &impl Fn(&str, &str) -> Option<ServiceRef<'a>>,
) -> Result<Vec<(String, Vec<SocketAddr>)>, String> {
    if refs.is_empty() {
        return Err("no parentRefs: attach the route to a Service (parentRefs: [{kind: Service, name: ...}])".into());
    }
    refs.iter()
        .map(|p| {
            service_kind("parentRef", p)?;
            let ns = p.namespace.unwrap_or(&route.namespace);
            let svc = service(ns, p.name).ok_or_else(|| {
                format!("parentRef names service {ns}/{}, which is not in the mesh; add it to `services` or fix the name", p.name)
            })?;
            let addrs: Vec<SocketAddr> = match port_of(p)? {
                Some(port) => {
                    let a = svc.ports.iter().find(|(sp, _)| *sp == port).map(|(_, a)| *a).ok_or_else(|| {
                        format!("parentRef port {port}: service {ns}/{} has no such port", p.name)
                    })?;
                    vec![a]
                }
                None => svc.ports.iter().map(|(_, a)| *a).collect(),
            };
            Ok((svc.namespace.to_string(), addrs))
        })
        .collect()
}

fn backends<'a>(
    route: &RouteDesc,
    refs: Vec<(Ref<'_>, Option<i32>, bool)>,
    service: &impl Fn(&str, &str) -> Option<ServiceRef<'a>>,
) -> Result<Vec<Backend>, String> {
    refs.into_iter()
        .map(|(b, weight, has_filters)| {
            service_kind("backendRef", &b)?;
            if has_filters {
                return Err(format!(
                    "backendRef {:?} has filters, which nodemesh does not apply yet; move them to the rule's `filters`",
                    b.name
                ));
            }
            let ns = b.namespace.unwrap_or(&route.namespace);
            if ns != route.namespace {
                return Err(format!(
                    "backendRef {ns}/{} is in another namespace; that needs a ReferenceGrant, which nodemesh does not support yet: route to a service of {}",
                    b.name, route.namespace
                ));
            }
            let port = port_of(&b)?.ok_or_else(|| format!("backendRef {:?} has no port; a Service backend needs one", b.name))?;
            let svc = service(ns, b.name).ok_or_else(|| {
                format!("backendRef names service {ns}/{}, which is not in the mesh; add it to `services` or fix the name", b.name)
            })?;
            let addr = svc.ports.iter().find(|(sp, _)| *sp == port).map(|(_, a)| *a).ok_or_else(|| {
                format!("backendRef port {port}: service {ns}/{} has no such port", b.name)
            })?;
            let weight = match weight {
                None => 1,
                Some(w) => u32::try_from(w).ok().filter(|w| *w <= 1_000_000).ok_or_else(|| {
                    format!("backendRef {:?} weight {w} is outside 0..=1000000", b.name)
                })?,
            };
            Ok(Backend {
                addr,
                name: format!("{ns}/{}:{port}", b.name),
                weight,
            })
        })
        .collect()
}

fn regex(what: &str, pattern: &str) -> Result<Regex, String> {
    if pattern.len() > 1024 {
        return Err(format!(
            "{what} regular expression is {} bytes; at most 1024",
            pattern.len()
        ));
    }
    regex::RegexBuilder::new(&format!("^(?:{pattern})$"))
        .size_limit(1 << 20)
        .build()
        .map_err(|e| format!("{what} regular expression {pattern:?} is invalid: {e}"))
}

fn header_name(what: &str, n: &str) -> Result<HeaderName, String> {
    HeaderName::from_bytes(n.as_bytes())
        .map_err(|_| format!("{what} {n:?} is not a valid header name"))
}

fn header_value(what: &str, v: &str) -> Result<HeaderValue, String> {
    HeaderValue::from_str(v).map_err(|_| format!("{what} value {v:?} is not a valid header value"))
}

fn value_match(what: &str, regex_type: bool, value: &str) -> Result<ValueMatch, String> {
    if regex_type {
        Ok(ValueMatch::Regex(regex(what, value)?))
    } else {
        Ok(ValueMatch::Exact(value.to_string()))
    }
}

/// A header modifier filter of any route kind (their generated types differ only in name).
macro_rules! modifier_of {
    ($what:expr, $m:expr) => {
        modifier(
            $what,
            $m.set
                .iter()
                .flatten()
                .map(|h| (h.name.as_str(), h.value.as_str()))
                .collect(),
            $m.add
                .iter()
                .flatten()
                .map(|h| (h.name.as_str(), h.value.as_str()))
                .collect(),
            $m.remove.iter().flatten().map(String::as_str).collect(),
        )
    };
}

/// A parentRef or backendRef of any route kind as a [`Ref`].
macro_rules! ref_of {
    ($r:expr) => {
        Ref {
            group: $r.group.as_deref(),
            kind: $r.kind.as_deref(),
            name: &$r.name,
            namespace: $r.namespace.as_deref(),
            port: $r.port,
        }
    };
}

/// A rule's backendRefs of any route kind: (the ref, its weight, whether it has filters).
macro_rules! backend_refs_of {
    ($r:expr) => {
        $r.backend_refs
            .iter()
            .flatten()
            .map(|b| {
                (
                    ref_of!(b),
                    b.weight,
                    b.filters.as_ref().is_some_and(|f| !f.is_empty()),
                )
            })
            .collect()
    };
}

fn modifier(
    what: &str,
    set: Vec<(&str, &str)>,
    add: Vec<(&str, &str)>,
    remove: Vec<&str>,
) -> Result<HeaderModifier, String> {
    let pairs = |v: Vec<(&str, &str)>| -> Result<Vec<(HeaderName, HeaderValue)>, String> {
        v.into_iter()
            .map(|(n, val)| Ok((header_name(what, n)?, header_value(what, val)?)))
            .collect()
    };
    Ok(HeaderModifier {
        set: pairs(set)?,
        add: pairs(add)?,
        remove: remove
            .into_iter()
            .map(|n| header_name(what, n))
            .collect::<Result<_, _>>()?,
    })
}

fn duration(what: &str, s: &str) -> Result<Duration, String> {
    let d: gateway_api::Duration = s.parse().map_err(|e| {
        format!("{what} {s:?} is not a Gateway API duration ({e}); write e.g. 500ms, 10s or 1m")
    })?;
    Ok(Duration::new(d.as_secs(), d.subsec_nanos()))
}

fn path_rewrite(
    what: &str,
    full: Option<&str>,
    prefix: Option<&str>,
    prefix_type: bool,
    matches: &[Match],
) -> Result<PathRewrite, String> {
    if prefix_type {
        let p =
            prefix.ok_or_else(|| format!("{what} ReplacePrefixMatch needs replacePrefixMatch"))?;
        if matches
            .iter()
            .any(|m| !matches!(m.path, PathMatch::Prefix(_)))
        {
            return Err(format!(
                "{what} ReplacePrefixMatch needs every match of the rule to be a PathPrefix"
            ));
        }
        Ok(PathRewrite::Prefix(p.to_string()))
    } else {
        let p = full.ok_or_else(|| format!("{what} ReplaceFullPath needs replaceFullPath"))?;
        Ok(PathRewrite::Full(p.to_string()))
    }
}

fn compile_http<'a>(
    route: &RouteDesc,
    spec: &hr::HttpRouteSpec,
    service: &impl Fn(&str, &str) -> Option<ServiceRef<'a>>,
) -> Result<Compiled, String> {
    let parents = parents(
        route,
        spec.parent_refs
            .iter()
            .flatten()
            .map(|p| ref_of!(p))
            .collect(),
        service,
    )?;
    let mut rules = Vec::new();
    for (ri, r) in spec.rules.iter().flatten().enumerate() {
        let name = r.name.clone().unwrap_or_else(|| ri.to_string());
        let what = format!("rule {name}");
        let matches: Vec<Match> = match r.matches.as_deref() {
            None | Some([]) => vec![Match::everything()],
            Some(ms) => ms
                .iter()
                .map(|m| http_match(&what, m))
                .collect::<Result<_, _>>()?,
        };
        let backends =
            backends(route, backend_refs_of!(r), service).map_err(|e| format!("{what}: {e}"))?;
        let mut rule = Rule::new(route, name, backends);
        for f in r.filters.iter().flatten() {
            http_filter(&what, f, &matches, &mut rule)?;
        }
        if rule.redirect.is_some() && rule.rewrite.is_some() {
            return Err(format!(
                "{what}: RequestRedirect and URLRewrite cannot be used together"
            ));
        }
        if let Some(t) = &r.timeouts {
            rule.timeouts.request = t
                .request
                .as_deref()
                .map(|s| duration(&format!("{what} timeouts.request"), s))
                .transpose()?;
            rule.timeouts.backend_request = t
                .backend_request
                .as_deref()
                .map(|s| duration(&format!("{what} timeouts.backendRequest"), s))
                .transpose()?;
            if let (Some(req), Some(be)) = (rule.timeouts.request, rule.timeouts.backend_request)
                && be > req
            {
                return Err(format!(
                    "{what}: timeouts.backendRequest ({be:?}) is longer than timeouts.request ({req:?})"
                ));
            }
        }
        if let Some(rt) = &r.retry {
            let attempts = rt.attempts.unwrap_or(1);
            let attempts = u32::try_from(attempts)
                .ok()
                .filter(|a| *a <= 10)
                .ok_or_else(|| format!("{what} retry.attempts {attempts} is outside 0..=10"))?;
            let codes = rt
                .codes
                .iter()
                .flatten()
                .map(|c| {
                    u16::try_from(*c)
                        .ok()
                        .filter(|c| (500..=599).contains(c))
                        .ok_or_else(|| format!("{what} retry code {c} is not a 5xx status"))
                })
                .collect::<Result<Vec<_>, _>>()?;
            let backoff = rt
                .backoff
                .as_deref()
                .map(|s| duration(&format!("{what} retry.backoff"), s))
                .transpose()?;
            rule.retry = Some(RetryPolicy {
                attempts,
                codes,
                backoff,
            });
        }
        rules.push((ri, matches, Arc::new(rule)));
    }
    Ok(Compiled { parents, rules })
}

fn http_match(what: &str, m: &hr::HttpRouteRulesMatches) -> Result<Match, String> {
    let path = match &m.path {
        None => PathMatch::Prefix("/".into()),
        Some(p) => {
            let value = p.value.clone().unwrap_or_else(|| "/".into());
            match p.r#type {
                Some(hr::HttpRouteRulesMatchesPathType::Exact) => {
                    path_value(what, &value)?;
                    PathMatch::Exact(value)
                }
                None | Some(hr::HttpRouteRulesMatchesPathType::PathPrefix) => {
                    path_value(what, &value)?;
                    let v = value.trim_end_matches('/');
                    PathMatch::Prefix(if v.is_empty() { "/".into() } else { v.into() })
                }
                Some(hr::HttpRouteRulesMatchesPathType::RegularExpression) => {
                    PathMatch::Regex(regex(&format!("{what} path"), &value)?)
                }
            }
        }
    };
    let method = m
        .method
        .as_ref()
        .map(|mm| {
            let s = serde_json::to_value(mm)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default();
            Method::from_bytes(s.as_bytes()).map_err(|_| format!("{what}: method {s:?} is invalid"))
        })
        .transpose()?;
    let headers = m
        .headers
        .iter()
        .flatten()
        .map(|h| {
            Ok((
                header_name(&format!("{what} header match"), &h.name)?,
                value_match(
                    &format!("{what} header {}", h.name),
                    h.r#type == Some(hr::HttpRouteRulesMatchesHeadersType::RegularExpression),
                    &h.value,
                )?,
            ))
        })
        .collect::<Result<_, String>>()?;
    let query = m
        .query_params
        .iter()
        .flatten()
        .map(|q| {
            Ok((
                q.name.clone(),
                value_match(
                    &format!("{what} query param {}", q.name),
                    q.r#type == Some(hr::HttpRouteRulesMatchesQueryParamsType::RegularExpression),
                    &q.value,
                )?,
            ))
        })
        .collect::<Result<_, String>>()?;
    Ok(Match {
        path,
        method,
        headers,
        query,
    })
}

fn path_value(what: &str, v: &str) -> Result<(), String> {
    if !v.starts_with('/') {
        return Err(format!("{what}: path {v:?} must start with /"));
    }
    Ok(())
}

fn http_filter(
    what: &str,
    f: &hr::HttpRouteRulesFilters,
    matches: &[Match],
    rule: &mut Rule,
) -> Result<(), String> {
    use hr::HttpRouteRulesFiltersType as T;
    let missing = |name: &str| format!("{what}: filter type {name} has no {name} settings");
    match f.r#type {
        T::RequestHeaderModifier => {
            let m = f
                .request_header_modifier
                .as_ref()
                .ok_or_else(|| missing("RequestHeaderModifier"))?;
            rule.request_headers = modifier_of!(&format!("{what} RequestHeaderModifier"), m)?;
        }
        T::ResponseHeaderModifier => {
            let m = f
                .response_header_modifier
                .as_ref()
                .ok_or_else(|| missing("ResponseHeaderModifier"))?;
            rule.response_headers = modifier_of!(&format!("{what} ResponseHeaderModifier"), m)?;
        }
        T::UrlRewrite => {
            let u = f
                .url_rewrite
                .as_ref()
                .ok_or_else(|| missing("URLRewrite"))?;
            let hostname = u
                .hostname
                .as_deref()
                .map(|h| header_value(&format!("{what} URLRewrite hostname"), h))
                .transpose()?;
            let path = u
                .path
                .as_ref()
                .map(|p| {
                    path_rewrite(
                        &format!("{what} URLRewrite"),
                        p.replace_full_path.as_deref(),
                        p.replace_prefix_match.as_deref(),
                        p.r#type == hr::HttpRouteRulesFiltersUrlRewritePathType::ReplacePrefixMatch,
                        matches,
                    )
                })
                .transpose()?;
            rule.rewrite = Some(Rewrite { hostname, path });
        }
        T::RequestRedirect => {
            let r = f
                .request_redirect
                .as_ref()
                .ok_or_else(|| missing("RequestRedirect"))?;
            let status = match r.status_code {
                None => StatusCode::FOUND,
                Some(c) => u16::try_from(c)
                    .ok()
                    .filter(|c| [301, 302, 303, 307, 308].contains(c))
                    .and_then(|c| StatusCode::from_u16(c).ok())
                    .ok_or_else(|| {
                        format!(
                            "{what} RequestRedirect statusCode {c} is not 301, 302, 303, 307 or 308"
                        )
                    })?,
            };
            let scheme = r.scheme.as_ref().map(|s| match s {
                hr::HttpRouteRulesFiltersRequestRedirectScheme::Http => "http".to_string(),
                hr::HttpRouteRulesFiltersRequestRedirectScheme::Https => "https".to_string(),
            });
            let port = r
                .port
                .map(|p| {
                    u16::try_from(p)
                        .ok()
                        .filter(|p| *p != 0)
                        .ok_or_else(|| format!("{what} RequestRedirect port {p} is not a port"))
                })
                .transpose()?;
            let path = r
                .path
                .as_ref()
                .map(|p| {
                    path_rewrite(
                        &format!("{what} RequestRedirect"),
                        p.replace_full_path.as_deref(),
                        p.replace_prefix_match.as_deref(),
                        p.r#type
                            == hr::HttpRouteRulesFiltersRequestRedirectPathType::ReplacePrefixMatch,
                        matches,
                    )
                })
                .transpose()?;
            rule.redirect = Some(Redirect {
                scheme,
                hostname: r.hostname.clone(),
                port,
                path,
                status,
            });
        }
        T::RequestMirror | T::ExtensionRef | T::Cors | T::ExternalAuth => {
            let name = serde_json::to_value(&f.r#type)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default();
            return Err(format!(
                "{what}: filter {name} is not supported by nodemesh yet; supported: RequestHeaderModifier, ResponseHeaderModifier, URLRewrite, RequestRedirect"
            ));
        }
    }
    Ok(())
}

fn compile_grpc<'a>(
    route: &RouteDesc,
    spec: &gr::GrpcRouteSpec,
    service: &impl Fn(&str, &str) -> Option<ServiceRef<'a>>,
) -> Result<Compiled, String> {
    let parents = parents(
        route,
        spec.parent_refs
            .iter()
            .flatten()
            .map(|p| ref_of!(p))
            .collect(),
        service,
    )?;
    let mut rules = Vec::new();
    for (ri, r) in spec.rules.iter().flatten().enumerate() {
        let name = r.name.clone().unwrap_or_else(|| ri.to_string());
        let what = format!("rule {name}");
        let matches: Vec<Match> = match r.matches.as_deref() {
            None | Some([]) => vec![Match::everything()],
            Some(ms) => ms
                .iter()
                .map(|m| grpc_match(&what, m))
                .collect::<Result<_, _>>()?,
        };
        let backends =
            backends(route, backend_refs_of!(r), service).map_err(|e| format!("{what}: {e}"))?;
        let mut rule = Rule::new(route, name, backends);
        for f in r.filters.iter().flatten() {
            use gr::GrpcRouteRulesFiltersType as T;
            match f.r#type {
                T::RequestHeaderModifier => {
                    if let Some(m) = &f.request_header_modifier {
                        rule.request_headers =
                            modifier_of!(&format!("{what} RequestHeaderModifier"), m)?;
                    }
                }
                T::ResponseHeaderModifier => {
                    if let Some(m) = &f.response_header_modifier {
                        rule.response_headers =
                            modifier_of!(&format!("{what} ResponseHeaderModifier"), m)?;
                    }
                }
                T::RequestMirror | T::ExtensionRef => {
                    return Err(format!(
                        "{what}: filter {:?} is not supported by nodemesh yet; supported: RequestHeaderModifier, ResponseHeaderModifier",
                        f.r#type
                    ));
                }
            }
        }
        rules.push((ri, matches, Arc::new(rule)));
    }
    Ok(Compiled { parents, rules })
}

/// gRPC names: a service is `package.Service`, a method an identifier.
fn grpc_name(what: &str, s: &str) -> Result<(), String> {
    if s.is_empty()
        || s.contains('/')
        || !s
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.')
    {
        return Err(format!(
            "{what}: {s:?} is not a gRPC service or method name"
        ));
    }
    Ok(())
}

fn grpc_match(what: &str, m: &gr::GrpcRouteRulesMatches) -> Result<Match, String> {
    let path = match &m.method {
        None => PathMatch::Prefix("/".into()),
        Some(mm) => {
            let regex_type =
                mm.r#type == Some(gr::GrpcRouteRulesMatchesMethodType::RegularExpression);
            match (mm.service.as_deref(), mm.method.as_deref(), regex_type) {
                (None, None, _) => {
                    return Err(format!(
                        "{what}: a gRPC method match needs a service, a method or both"
                    ));
                }
                (Some(s), Some(me), false) => {
                    grpc_name(what, s)?;
                    grpc_name(what, me)?;
                    PathMatch::Exact(format!("/{s}/{me}"))
                }
                (Some(s), None, false) => {
                    grpc_name(what, s)?;
                    PathMatch::Prefix(format!("/{s}"))
                }
                (None, Some(me), false) => {
                    grpc_name(what, me)?;
                    PathMatch::Regex(regex(what, &format!("/[^/]+/{}", regex::escape(me)))?)
                }
                (s, me, true) => PathMatch::Regex(regex(
                    &format!("{what} gRPC method"),
                    &format!(
                        "/(?:{})/(?:{})",
                        s.unwrap_or("[^/]+"),
                        me.unwrap_or("[^/]+")
                    ),
                )?),
            }
        }
    };
    let headers = m
        .headers
        .iter()
        .flatten()
        .map(|h| {
            Ok((
                header_name(&format!("{what} header match"), &h.name)?,
                value_match(
                    &format!("{what} header {}", h.name),
                    h.r#type == Some(gr::GrpcRouteRulesMatchesHeadersType::RegularExpression),
                    &h.value,
                )?,
            ))
        })
        .collect::<Result<_, String>>()?;
    Ok(Match {
        path,
        method: None,
        headers,
        query: vec![],
    })
}

#[cfg(test)]
mod tests;
