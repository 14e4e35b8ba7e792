//! What the fuzz targets share: one small mesh (two nodes, local and remote pods, services with
//! routes of every kind of match and filter, policies), parsed and applied the way the daemon
//! does it, and a way to cut an input into fields.

use std::sync::{Arc, OnceLock};

use mesh_daemon::state::{Scope, Snapshot, State};

/// Node n1 is this proxy. Service `b` carries an HTTPRoute and a GRPCRoute; `c` has none.
pub const MESH: &str = "\
nodes:
  - { name: n1, address: 10.0.0.1, meshSource: 10.1.1.254 }
  - { name: n2, address: 10.0.0.2, meshSource: 10.1.2.254 }
workloads:
  - { name: a, namespace: x, serviceAccount: a, node: n1, ip: 10.1.1.2, cgroup: a, labels: { app: a } }
  - { name: c, namespace: x, serviceAccount: c, node: n1, ip: 10.1.1.3, cgroup: c, labels: { app: c } }
  - { name: locked, namespace: x, serviceAccount: locked, node: n1, ip: 10.1.1.4, cgroup: l, labels: { app: locked } }
  - { name: b, namespace: x, serviceAccount: b, node: n2, ip: 10.1.2.2, cgroup: b, labels: { app: b } }
  - { name: b2, namespace: x, serviceAccount: b, node: n2, ip: 10.1.2.3, cgroup: b2, labels: { app: b2 } }
  - { name: s1, namespace: x, serviceAccount: s1, node: n1, ip: 10.1.1.9, cgroup: s1, mode: sidecar, labels: { app: s1 } }
  - { name: e, namespace: evil, serviceAccount: e, node: n2, ip: 10.1.2.66, cgroup: e }
services:
  - { name: b, namespace: x, vip: 10.96.0.1, ports: [{ port: 80, targetPort: 8080 }], selector: { app: b } }
  - { name: b-v2, namespace: x, vip: 10.96.0.5, ports: [{ port: 80, targetPort: 8080 }], selector: { app: b2 } }
  - { name: c, namespace: x, vip: 10.96.0.3, ports: [{ port: 80, targetPort: 8080 }], selector: { app: c } }
  - { name: none, namespace: x, vip: 10.96.0.2, ports: [{ port: 80 }], selector: { app: zzz } }
authorizationPolicies:
  - { name: no-evil, namespace: x, action: DENY, from: [{ namespaces: [evil] }] }
  - { name: locked-callers, namespace: x, selector: { app: locked }, action: ALLOW, from: [{ principals: [spiffe://cluster.local/ns/x/sa/a] }], ports: [7000], to: [{ methods: [POST], paths: [/admin, /admin/*], headers: { x-team: blue* } }] }
httpRoutes:
  - name: split
    namespace: x
    spec:
      parentRefs: [{ kind: Service, name: b, port: 80 }]
      rules:
        - name: exact
          matches: [{ path: { type: Exact, value: /exact }, method: GET }]
          backendRefs: [{ name: b-v2, port: 80 }]
        - name: regex
          matches: [{ path: { type: RegularExpression, value: '/api/v[0-9]+/.*' }, queryParams: [{ name: q, value: '1' }] }]
          backendRefs: [{ name: b, port: 80, weight: 90 }, { name: b-v2, port: 80, weight: 10 }]
        - name: headers
          matches: [{ headers: [{ name: x-canary, value: 'yes' }, { name: x-user, type: RegularExpression, value: 'adm.*' }] }]
          backendRefs: [{ name: b-v2, port: 80 }]
        - name: rewrite
          matches: [{ path: { type: PathPrefix, value: /old } }]
          filters:
            - type: URLRewrite
              urlRewrite: { hostname: new.example, path: { type: ReplacePrefixMatch, replacePrefixMatch: /new } }
            - type: RequestHeaderModifier
              requestHeaderModifier: { set: [{ name: x-a, value: '1' }], add: [{ name: x-b, value: '2' }], remove: [x-gone] }
          backendRefs: [{ name: b, port: 80 }]
        - name: redirect
          matches: [{ path: { type: PathPrefix, value: /moved } }]
          filters:
            - type: RequestRedirect
              requestRedirect: { scheme: https, hostname: elsewhere, statusCode: 301, path: { type: ReplacePrefixMatch, replacePrefixMatch: /here } }
        - name: rest
          backendRefs: [{ name: b, port: 80 }]
          timeouts: { request: 5s }
          retry: { attempts: 2, codes: [503] }
grpcRoutes:
  - name: grpc
    namespace: x
    spec:
      parentRefs: [{ kind: Service, name: c, port: 80 }]
      rules:
        - matches: [{ method: { service: pkg.Echo, method: Say } }]
          backendRefs: [{ name: c, port: 80 }]
        - matches: [{ method: { type: RegularExpression, service: 'pkg\\.Str.*' } }]
          backendRefs: [{ name: c, port: 80 }]
";

pub const TRUST_DOMAIN: &str = "cluster.local";

/// [`MESH`] as node n1's proxy sees it (built once per process).
pub fn snapshot() -> &'static Arc<Snapshot> {
    static SNAP: OnceLock<Arc<Snapshot>> = OnceLock::new();
    SNAP.get_or_init(|| {
        let file = mesh_daemon::meshfile::parse(std::path::Path::new("fuzz.yaml"), MESH)
            .expect("the fuzz mesh parses");
        State::new(Scope::Node("n1".into()), "/".into())
            .apply(&mesh_daemon::discovery::file::to_desired(&file))
            .expect("the fuzz mesh applies")
    })
}

/// An input read as lines of text (None when it is not UTF-8: those targets' real inputs are
/// text already, checked by the layer before them).
pub fn lines(data: &[u8]) -> Option<Vec<&str>> {
    std::str::from_utf8(data)
        .ok()
        .map(|s| s.split('\n').collect())
}
