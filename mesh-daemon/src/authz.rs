//! L4 authorization at the destination: may this source identity open a connection to this
//! workload's port? Decided where the destination pod runs, after mTLS proved the source (or, on
//! the same node, after the kernel attributed it).
//!
//! Semantics follow Istio's AuthorizationPolicy, which our users know: with no policy for a
//! workload everything in the mesh is allowed; a matching DENY wins; if any ALLOW policy applies to
//! the workload, one of them must match.
//!
//! A policy with `to` rules (methods, paths, headers) is about requests. One function decides both
//! layers, told what it decides ([`Check`]): a connection that will carry HTTP checked per request
//! leaves those policies to each request; an opaque TCP connection cannot show a request, so a DENY
//! with `to` rules refuses it (fail closed) and an ALLOW with `to` rules never matches it (as
//! Istio's ztunnel does).

use crate::{
    identity::Identity,
    meshfile::{PolicyAction, PolicySpec},
    state::{Workload, desired::PolicyOperation},
};

/// What is being decided.
#[derive(Clone, Copy, Debug)]
pub enum Check<'a> {
    /// A connection; `http`: its requests will each be checked too.
    Connection { http: bool },
    /// One HTTP request.
    Request(&'a RequestAttrs<'a>),
}

/// What `to` rules look at.
#[derive(Debug)]
pub struct RequestAttrs<'a> {
    pub method: &'a str,
    pub path: &'a str,
    pub headers: &'a http::HeaderMap,
}

/// Istio's path syntax: exact, or a prefix with a trailing `*` (`/admin/*`), or a suffix with a
/// leading `*`.
fn path_matches(pattern: &str, path: &str) -> bool {
    if let Some(prefix) = pattern.strip_suffix('*') {
        path.starts_with(prefix)
    } else if let Some(suffix) = pattern.strip_prefix('*') {
        path.ends_with(suffix)
    } else {
        pattern == path
    }
}

fn operation_matches(op: &PolicyOperation, req: &RequestAttrs<'_>) -> bool {
    (op.methods.is_empty()
        || op
            .methods
            .iter()
            .any(|m| m.eq_ignore_ascii_case(req.method)))
        && (op.paths.is_empty() || op.paths.iter().any(|p| path_matches(p, req.path)))
        && op.headers.iter().all(|(name, want)| {
            req.headers
                .get_all(name.as_str())
                .iter()
                .any(|v| v.to_str().is_ok_and(|v| path_matches(want, v)))
        })
}

/// The outcome, with the policy that decided it (a bounded metric label).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    Allow { policy: String },
    Deny { policy: String },
}

impl Verdict {
    pub fn allowed(&self) -> bool {
        matches!(self, Verdict::Allow { .. })
    }

    pub fn policy(&self) -> &str {
        match self {
            Verdict::Allow { policy } | Verdict::Deny { policy } => policy,
        }
    }

    pub fn result(&self) -> &'static str {
        if self.allowed() { "allow" } else { "deny" }
    }
}

/// Label when no policy applies (mesh default: allow).
pub const DEFAULT: &str = "default";
/// Label when ALLOW policies apply but none matched.
pub const NO_ALLOW_MATCH: &str = "no_allow_match";

fn applies(p: &PolicySpec, dst: &Workload) -> bool {
    p.namespace == dst.namespace && p.selector.iter().all(|(k, v)| dst.labels.get(k) == Some(v))
}

fn matches(p: &PolicySpec, src: &Identity, port: u16, check: Check<'_>) -> bool {
    let to_ok = match check {
        _ if p.to.is_empty() => true,
        Check::Request(req) => p.to.iter().any(|op| operation_matches(op, req)),
        // An opaque connection has no request: only a DENY's other conditions count (fail
        // closed); an ALLOW about requests does not allow bytes.
        Check::Connection { http: false } => p.action == PolicyAction::Deny,
        Check::Connection { http: true } => unreachable!("skipped by authorize"),
    };
    let port_ok = p.ports.is_empty() || p.ports.contains(&port);
    let src_ok = p.from.is_empty()
        || p.from.iter().any(|f| {
            (f.principals.is_empty() || f.principals.iter().any(|pr| *pr == src.to_string()))
                && (f.namespaces.is_empty() || f.namespaces.contains(&src.namespace))
        });
    to_ok && port_ok && src_ok
}

/// Decides one connection from `src` to `dst`'s `port`.
pub fn authorize<'a>(
    policies: impl IntoIterator<Item = &'a PolicySpec>,
    src: &Identity,
    dst: &Workload,
    port: u16,
    check: Check<'_>,
) -> Verdict {
    let name = |p: &PolicySpec| format!("{}/{}", p.namespace, p.name);
    let mut allow_applies = false;
    let mut allowed_by = None;
    // A connection whose requests are checked one by one leaves request policies to them.
    let per_request = matches!(check, Check::Connection { http: true });
    for p in policies
        .into_iter()
        .filter(|p| (!per_request || p.to.is_empty()) && applies(p, dst))
    {
        match p.action {
            PolicyAction::Deny if matches(p, src, port, check) => {
                return Verdict::Deny { policy: name(p) };
            }
            PolicyAction::Deny => {}
            PolicyAction::Allow => {
                allow_applies = true;
                if allowed_by.is_none() && matches(p, src, port, check) {
                    allowed_by = Some(name(p));
                }
            }
        }
    }
    match (allow_applies, allowed_by) {
        (false, _) => Verdict::Allow {
            policy: DEFAULT.into(),
        },
        (true, Some(policy)) => Verdict::Allow { policy },
        (true, None) => Verdict::Deny {
            policy: NO_ALLOW_MATCH.into(),
        },
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::meshfile::PolicySource;

    fn server() -> Workload {
        Workload {
            id: 1,
            namespace: "prod".into(),
            name: "server".into(),
            service_account: "server".into(),
            node: "node-2".into(),
            ip: "10.0.0.2".parse().expect("ip"),
            cgroup: "/x".into(),
            probe_ports: vec![],
            proxy_protocol_ports: vec![],
            mode: Default::default(),
            labels: BTreeMap::from([("app".into(), "server".into())]),
        }
    }

    fn id(ns: &str, sa: &str) -> Identity {
        Identity::new("cluster.local", ns, sa)
    }

    fn policy(
        name: &str,
        action: PolicyAction,
        from: Vec<PolicySource>,
        ports: Vec<u16>,
    ) -> PolicySpec {
        PolicySpec {
            name: name.into(),
            namespace: "prod".into(),
            selector: BTreeMap::from([("app".into(), "server".into())]),
            action,
            from,
            ports,
            to: vec![],
        }
    }

    fn principals(p: &[&str]) -> PolicySource {
        PolicySource {
            principals: p.iter().map(|s| s.to_string()).collect(),
            namespaces: vec![],
        }
    }

    fn namespaces(n: &[&str]) -> PolicySource {
        PolicySource {
            principals: vec![],
            namespaces: n.iter().map(|s| s.to_string()).collect(),
        }
    }

    const CLIENT: &str = "spiffe://cluster.local/ns/prod/sa/client";

    #[test]
    fn table() {
        use PolicyAction::*;
        let client = id("prod", "client");
        let evil = id("prod", "evil");
        let monitor = id("monitoring", "prom");
        let allow_client = policy("allow-client", Allow, vec![principals(&[CLIENT])], vec![]);
        let deny_evil = policy(
            "deny-evil",
            Deny,
            vec![principals(&["spiffe://cluster.local/ns/prod/sa/evil"])],
            vec![],
        );
        let allow_ns = policy(
            "allow-mon",
            Allow,
            vec![namespaces(&["monitoring"])],
            vec![9090],
        );
        let deny_all_port = policy("deny-7001", Deny, vec![], vec![7001]);
        let mut other_ns = allow_client.clone();
        other_ns.namespace = "staging".into();
        let mut other_labels = allow_client.clone();
        other_labels.selector = BTreeMap::from([("app".into(), "db".into())]);
        let other = id("prod", "other");
        let foreign = Identity::new("evil.example", "prod", "client");
        let both = policy(
            "both",
            Allow,
            vec![PolicySource {
                principals: vec![CLIENT.into()],
                namespaces: vec!["prod".into()],
            }],
            vec![],
        );

        let allow = |p: &str| Verdict::Allow { policy: p.into() };
        let deny = |p: &str| Verdict::Deny { policy: p.into() };
        let cases: Vec<(&str, Vec<&PolicySpec>, &Identity, u16, Verdict)> = vec![
            (
                "no policy: mesh default allows",
                vec![],
                &evil,
                7000,
                allow(DEFAULT),
            ),
            (
                "allow matches",
                vec![&allow_client],
                &client,
                7000,
                allow("prod/allow-client"),
            ),
            (
                "allow present, no match",
                vec![&allow_client],
                &evil,
                7000,
                deny(NO_ALLOW_MATCH),
            ),
            (
                "deny matches",
                vec![&deny_evil],
                &evil,
                7000,
                deny("prod/deny-evil"),
            ),
            (
                "deny does not match",
                vec![&deny_evil],
                &client,
                7000,
                allow(DEFAULT),
            ),
            (
                "deny wins over allow",
                vec![&allow_client, &deny_evil],
                &evil,
                7000,
                deny("prod/deny-evil"),
            ),
            (
                "allow by namespace and port",
                vec![&allow_ns],
                &monitor,
                9090,
                allow("prod/allow-mon"),
            ),
            (
                "allow by namespace, wrong port",
                vec![&allow_ns],
                &monitor,
                7000,
                deny(NO_ALLOW_MATCH),
            ),
            (
                "deny a port for everyone",
                vec![&deny_all_port],
                &client,
                7001,
                deny("prod/deny-7001"),
            ),
            (
                "deny a port, other port",
                vec![&deny_all_port],
                &client,
                7000,
                allow(DEFAULT),
            ),
            (
                "policy of another namespace",
                vec![&other_ns],
                &evil,
                7000,
                allow(DEFAULT),
            ),
            (
                "policy for other labels",
                vec![&other_labels],
                &evil,
                7000,
                allow(DEFAULT),
            ),
            (
                "two allows, second matches",
                vec![&allow_client, &allow_ns],
                &monitor,
                9090,
                allow("prod/allow-mon"),
            ),
            (
                "lists within an entry are ANDed",
                vec![&both],
                &client,
                7000,
                allow("prod/both"),
            ),
            (
                "lists within an entry are ANDed (miss)",
                vec![&both],
                &other,
                7000,
                deny(NO_ALLOW_MATCH),
            ),
            (
                "same name, other trust domain",
                vec![&allow_client],
                &foreign,
                7000,
                deny(NO_ALLOW_MATCH),
            ),
        ];
        for (what, policies, src, port, want) in cases {
            let l4 = Check::Connection { http: false };
            assert_eq!(
                authorize(policies, src, &server(), port, l4),
                want,
                "{what}"
            );
        }
    }

    #[test]
    fn request_rules_decide_requests_and_fail_closed_for_bytes() {
        use PolicyAction::*;
        let client = id("prod", "client");
        let other = id("prod", "other");
        let mut no_admin_posts =
            policy("no-admin-posts", Deny, vec![principals(&[CLIENT])], vec![]);
        no_admin_posts.to = vec![PolicyOperation {
            methods: vec!["POST".into()],
            paths: vec!["/admin".into(), "/admin/*".into()],
            headers: Default::default(),
        }];
        let mut only_gets = policy("only-gets", Allow, vec![], vec![]);
        only_gets.to = vec![PolicyOperation {
            methods: vec!["GET".into()],
            paths: vec![],
            headers: BTreeMap::from([("x-team".into(), "blue*".into())]),
        }];
        let headers = |pairs: &[(&str, &str)]| {
            let mut h = http::HeaderMap::new();
            for (n, v) in pairs {
                h.append(
                    http::HeaderName::from_bytes(n.as_bytes()).expect("n"),
                    v.parse().expect("v"),
                );
            }
            h
        };
        let none = headers(&[]);
        let blue = headers(&[("x-team", "blue-2")]);
        let allow = |p: &str| Verdict::Allow { policy: p.into() };
        let deny = |p: &str| Verdict::Deny { policy: p.into() };
        type Req<'a> = Option<(&'a str, &'a str, &'a http::HeaderMap)>;
        // (what, policy, source, the request or None for a connection, whether it carries HTTP, want)
        let cases: Vec<(&str, &PolicySpec, &Identity, Req<'_>, bool, Verdict)> = vec![
            (
                "POST /admin from the client",
                &no_admin_posts,
                &client,
                Some(("POST", "/admin", &none)),
                true,
                deny("prod/no-admin-posts"),
            ),
            (
                "POST /admin/users from the client",
                &no_admin_posts,
                &client,
                Some(("POST", "/admin/users", &none)),
                true,
                deny("prod/no-admin-posts"),
            ),
            (
                "GET / from the client",
                &no_admin_posts,
                &client,
                Some(("GET", "/", &none)),
                true,
                allow(DEFAULT),
            ),
            (
                "GET /admin from the client",
                &no_admin_posts,
                &client,
                Some(("GET", "/admin", &none)),
                true,
                allow(DEFAULT),
            ),
            (
                "POST /administrator from the client",
                &no_admin_posts,
                &client,
                Some(("POST", "/administrator", &none)),
                true,
                allow(DEFAULT),
            ),
            (
                "POST /admin from another principal",
                &no_admin_posts,
                &other,
                Some(("POST", "/admin", &none)),
                true,
                allow(DEFAULT),
            ),
            (
                "the client's connection that carries HTTP: left to its requests",
                &no_admin_posts,
                &client,
                None,
                true,
                allow(DEFAULT),
            ),
            (
                "the client's opaque connection: fail closed",
                &no_admin_posts,
                &client,
                None,
                false,
                deny("prod/no-admin-posts"),
            ),
            (
                "GET with the header",
                &only_gets,
                &other,
                Some(("GET", "/x", &blue)),
                true,
                allow("prod/only-gets"),
            ),
            (
                "GET without the header",
                &only_gets,
                &other,
                Some(("GET", "/x", &none)),
                true,
                deny(NO_ALLOW_MATCH),
            ),
            (
                "POST with the header",
                &only_gets,
                &other,
                Some(("POST", "/x", &blue)),
                true,
                deny(NO_ALLOW_MATCH),
            ),
            (
                "an ALLOW about requests does not allow bytes",
                &only_gets,
                &other,
                None,
                false,
                deny(NO_ALLOW_MATCH),
            ),
            (
                "an HTTP connection under request ALLOWs: left to its requests",
                &only_gets,
                &other,
                None,
                true,
                allow(DEFAULT),
            ),
        ];
        for (what, p, src, request, http, want) in cases {
            let attrs = request.map(|(method, path, headers)| RequestAttrs {
                method,
                path,
                headers,
            });
            let check = match &attrs {
                Some(a) => Check::Request(a),
                None => Check::Connection { http },
            };
            assert_eq!(authorize([p], src, &server(), 7000, check), want, "{what}");
        }
    }
}
