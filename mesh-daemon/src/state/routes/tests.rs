//! Route matching and precedence, as tables.

use std::net::SocketAddr;

use http::{HeaderMap, Method, Uri};

use super::*;

const VIP: &str = "10.96.0.10:80";
const V1: &str = "10.96.0.11:80";
const V2: &str = "10.96.0.12:80";

fn services(ns: &str, name: &str) -> Option<ServiceRef<'static>> {
    let addr = |s: &str| s.parse::<SocketAddr>().expect("addr");
    let ports = match (ns, name) {
        ("demo", "echo") => vec![(80, addr(VIP))],
        ("demo", "echo-v1") => vec![(80, addr(V1))],
        ("demo", "echo-v2") => vec![(80, addr(V2))],
        _ => return None,
    };
    Some(ServiceRef {
        namespace: "demo",
        name: "x",
        ports,
    })
}

fn http_route(ns: &str, name: &str, spec: &str) -> RouteDesc {
    RouteDesc {
        namespace: ns.into(),
        name: name.into(),
        kind: RouteKind::Http(Box::new(serde_norway::from_str(spec).expect("spec"))),
        rate_limit: None,
    }
}

fn grpc_route(name: &str, spec: &str) -> RouteDesc {
    RouteDesc {
        namespace: "demo".into(),
        name: name.into(),
        kind: RouteKind::Grpc(Box::new(serde_norway::from_str(spec).expect("spec"))),
        rate_limit: None,
    }
}

fn table(routes: &[RouteDesc]) -> Arc<RouteTable> {
    let t = compile(routes, services).expect("compiles");
    t.get(&VIP.parse().expect("addr"))
        .cloned()
        .expect("table for the VIP")
}

fn err(routes: &[RouteDesc]) -> String {
    compile(routes, services).expect_err("must be rejected")
}

/// Which rule (route/rule) a request gets.
fn pick(
    t: &RouteTable,
    ns: &str,
    method: &str,
    target: &str,
    headers: &[(&str, &str)],
) -> Option<String> {
    let uri: Uri = target.parse().expect("uri");
    let mut h = HeaderMap::new();
    for (n, v) in headers {
        h.append(
            HeaderName::from_bytes(n.as_bytes()).expect("name"),
            v.parse().expect("value"),
        );
    }
    let m = Method::from_bytes(method.as_bytes()).expect("method");
    let req = RequestView {
        method: &m,
        path: uri.path(),
        query: uri.query(),
        headers: &h,
    };
    t.select(ns, &req)
        .map(|s| format!("{}#{}", s.rule.route, s.rule.rule))
}

const PARENT: &str = "parentRefs: [{ kind: Service, name: echo, port: 80 }]";

fn rules(rules: &str) -> String {
    format!("{PARENT}\nrules:\n{rules}")
}

#[test]
fn path_precedence_exact_then_longest_prefix_then_regex() {
    let t = table(&[http_route(
        "demo",
        "r",
        &rules(
            "
  - name: regex
    matches: [{ path: { type: RegularExpression, value: '/api/v[0-9]+/.*' } }]
    backendRefs: [{ name: echo-v2, port: 80 }]
  - name: short
    matches: [{ path: { type: PathPrefix, value: /api } }]
    backendRefs: [{ name: echo-v1, port: 80 }]
  - name: long
    matches: [{ path: { type: PathPrefix, value: /api/v1/ } }]
    backendRefs: [{ name: echo-v1, port: 80 }]
  - name: exact
    matches: [{ path: { type: Exact, value: /api/v1/users } }]
    backendRefs: [{ name: echo-v1, port: 80 }]
",
        ),
    )]);
    let cases = [
        ("/api/v1/users", Some("demo/r#exact")),
        ("/api/v1/users/7", Some("demo/r#long")),
        ("/api/v1", Some("demo/r#long")),
        ("/api/v2/x", Some("demo/r#short")),
        ("/api", Some("demo/r#short")),
        ("/api/", Some("demo/r#short")),
        // element-wise prefixes: /apix is not under /api
        ("/apix", None),
        ("/", None),
    ];
    for (path, want) in cases {
        assert_eq!(
            pick(&t, "demo", "GET", path, &[]).as_deref(),
            want,
            "{path}"
        );
    }
}

#[test]
fn regex_matches_the_whole_path_and_ranks_last() {
    let t = table(&[http_route(
        "demo",
        "r",
        &rules(
            "
  - name: regex
    matches: [{ path: { type: RegularExpression, value: '/v[0-9]+' } }]
    backendRefs: [{ name: echo-v2, port: 80 }]
",
        ),
    )]);
    assert_eq!(
        pick(&t, "demo", "GET", "/v12", &[]).as_deref(),
        Some("demo/r#regex")
    );
    assert_eq!(pick(&t, "demo", "GET", "/v12/x", &[]), None);
    assert_eq!(pick(&t, "demo", "GET", "/x/v12", &[]), None);
}

#[test]
fn method_headers_and_query_break_ties_in_that_order() {
    let t = table(&[http_route(
        "demo",
        "r",
        &rules(
            "
  - name: plain
    backendRefs: [{ name: echo-v1, port: 80 }]
  - name: one-header
    matches: [{ headers: [{ name: x-canary, value: 'yes' }] }]
    backendRefs: [{ name: echo-v2, port: 80 }]
  - name: two-headers
    matches: [{ headers: [{ name: x-canary, value: 'yes' }, { name: x-user, type: RegularExpression, value: 'adm.*' }] }]
    backendRefs: [{ name: echo-v2, port: 80 }]
  - name: query
    matches: [{ queryParams: [{ name: debug, value: 'on now' }] }]
    backendRefs: [{ name: echo-v2, port: 80 }]
  - name: post
    matches: [{ method: POST }]
    backendRefs: [{ name: echo-v2, port: 80 }]
",
        ),
    )]);
    type Case<'a> = (&'a str, &'a str, &'a [(&'a str, &'a str)], &'a str);
    let cases: [Case<'_>; 7] = [
        ("GET", "/", &[], "demo/r#plain"),
        ("GET", "/", &[("x-canary", "yes")], "demo/r#one-header"),
        ("GET", "/", &[("x-canary", "no")], "demo/r#plain"),
        (
            "GET",
            "/",
            &[("X-Canary", "yes"), ("x-user", "admin")],
            "demo/r#two-headers",
        ),
        ("GET", "/?a=1&debug=on+now", &[], "demo/r#query"),
        ("GET", "/?debug=on%20now", &[], "demo/r#query"),
        // a method match outranks header counts
        (
            "POST",
            "/",
            &[("x-canary", "yes"), ("x-user", "admin")],
            "demo/r#post",
        ),
    ];
    for (m, path, headers, want) in cases {
        assert_eq!(
            pick(&t, "demo", m, path, headers).as_deref(),
            Some(want),
            "{m} {path} {headers:?}"
        );
    }
}

#[test]
fn ties_go_to_the_first_route_by_name_then_rule_order() {
    let same = rules(
        "
  - name: a
    matches: [{ path: { value: /x } }]
    backendRefs: [{ name: echo-v1, port: 80 }]
  - name: b
    matches: [{ path: { value: /x } }]
    backendRefs: [{ name: echo-v2, port: 80 }]
",
    );
    let t = table(&[
        http_route("demo", "zeta", &same),
        http_route("demo", "alpha", &same),
    ]);
    assert_eq!(
        pick(&t, "demo", "GET", "/x", &[]).as_deref(),
        Some("demo/alpha#a")
    );
}

#[test]
fn consumer_routes_replace_producer_routes_for_their_namespace_only() {
    let producer = http_route(
        "demo",
        "prod",
        &rules("  - backendRefs: [{ name: echo-v1, port: 80 }]\n"),
    );
    let consumer = RouteDesc {
        namespace: "client-ns".into(),
        name: "mine".into(),
        kind: RouteKind::Http(Box::new(
            serde_norway::from_str(
                "parentRefs: [{ kind: Service, name: echo, namespace: demo }]\nrules: [{ matches: [{ path: { value: /only } }] }]",
            )
            .expect("spec"),
        )),
        rate_limit: None,
    };
    let t = table(&[producer, consumer]);
    assert_eq!(
        pick(&t, "demo", "GET", "/", &[]).as_deref(),
        Some("demo/prod#0")
    );
    assert_eq!(
        pick(&t, "other", "GET", "/", &[]).as_deref(),
        Some("demo/prod#0")
    );
    assert_eq!(
        pick(&t, "client-ns", "GET", "/only", &[]).as_deref(),
        Some("client-ns/mine#0")
    );
    // for client-ns the producer route is gone: / matches nothing
    assert_eq!(pick(&t, "client-ns", "GET", "/", &[]), None);
}

#[test]
fn weighted_backends_split_by_weight() {
    let b = |w| Backend {
        addr: VIP.parse().expect("addr"),
        name: format!("w{w}"),
        weight: w,
    };
    let backends = [b(90), b(0), b(10)];
    assert_eq!(total_weight(&backends), 100);
    let mut counts = std::collections::HashMap::new();
    for draw in 0..100 {
        *counts
            .entry(pick_backend(&backends, draw).expect("some").name.clone())
            .or_insert(0) += 1;
    }
    assert_eq!(counts.get("w90"), Some(&90));
    assert_eq!(counts.get("w10"), Some(&10));
    assert_eq!(counts.get("w0"), None);
    assert!(pick_backend(&[b(0)], 0).is_none());
}

#[test]
fn grpc_methods_become_paths() {
    let t = table(&[grpc_route(
        "g",
        &rules(
            "
  - name: exact
    matches: [{ method: { service: pkg.Echo, method: Say } }]
    backendRefs: [{ name: echo-v1, port: 80 }]
  - name: service
    matches: [{ method: { service: pkg.Echo } }]
    backendRefs: [{ name: echo-v1, port: 80 }]
  - name: method
    matches: [{ method: { method: Health } }]
    backendRefs: [{ name: echo-v1, port: 80 }]
  - name: regex
    matches: [{ method: { type: RegularExpression, service: 'pkg\\.Str.*' } }]
    backendRefs: [{ name: echo-v1, port: 80 }]
",
        ),
    )]);
    let cases = [
        ("/pkg.Echo/Say", Some("demo/g#exact")),
        ("/pkg.Echo/Other", Some("demo/g#service")),
        ("/pkg.EchoX/Other", None),
        ("/any.Svc/Health", Some("demo/g#method")),
        ("/pkg.Stream/Go", Some("demo/g#regex")),
    ];
    for (path, want) in cases {
        assert_eq!(
            pick(&t, "demo", "POST", path, &[]).as_deref(),
            want,
            "{path}"
        );
    }
}

#[test]
fn filters_rewrite_and_redirect() {
    let t = table(&[http_route(
        "demo",
        "r",
        &rules(
            "
  - name: rw
    matches: [{ path: { value: /old } }]
    filters:
      - type: URLRewrite
        urlRewrite: { hostname: new.example, path: { type: ReplacePrefixMatch, replacePrefixMatch: /new } }
      - type: RequestHeaderModifier
        requestHeaderModifier: { set: [{ name: x-a, value: '1' }], add: [{ name: x-b, value: '2' }], remove: [x-gone] }
    backendRefs: [{ name: echo-v1, port: 80 }]
  - name: rd
    matches: [{ path: { value: /moved } }]
    filters:
      - type: RequestRedirect
        requestRedirect: { scheme: https, hostname: elsewhere, statusCode: 301, path: { type: ReplaceFullPath, replaceFullPath: /here } }
",
        ),
    )]);
    let uri: Uri = "/old/page?q=1".parse().expect("uri");
    let mut h = HeaderMap::new();
    h.insert("x-gone", "x".parse().expect("v"));
    h.insert("x-b", "0".parse().expect("v"));
    let req = RequestView {
        method: &Method::GET,
        path: uri.path(),
        query: uri.query(),
        headers: &h,
    };
    let sel = t.select("demo", &req).expect("rw");
    let rw = sel.rule.rewrite.as_ref().expect("rewrite");
    let mut headers = h.clone();
    let new = apply_rewrite(rw, sel.matched, &uri, &mut headers);
    assert_eq!(new.to_string(), "/new/page?q=1");
    assert_eq!(headers.get("host").expect("host"), "new.example");
    sel.rule.request_headers.apply(&mut headers);
    assert_eq!(headers.get("x-a").expect("x-a"), "1");
    assert_eq!(headers.get_all("x-b").iter().count(), 2);
    assert!(headers.get("x-gone").is_none());

    let uri: Uri = "/moved/x?y=2".parse().expect("uri");
    let req = RequestView {
        method: &Method::GET,
        path: uri.path(),
        query: uri.query(),
        headers: &h,
    };
    let sel = t.select("demo", &req).expect("rd");
    let rd = sel.rule.redirect.as_ref().expect("redirect");
    assert_eq!(rd.status, StatusCode::MOVED_PERMANENTLY);
    assert_eq!(
        redirect_location(rd, sel.matched, &uri, "echo:8080"),
        "https://elsewhere/here?y=2"
    );
}

#[test]
fn prefix_rewrites_keep_the_rest_of_the_path() {
    let m = |p: &str| Match {
        path: PathMatch::Prefix(p.into()),
        method: None,
        headers: vec![],
        query: vec![],
    };
    let cases = [
        ("/old", "/new", "/old", "/new"),
        ("/old", "/new", "/old/a/b", "/new/a/b"),
        ("/old", "/", "/old/a", "/a"),
        ("/old", "/", "/old", "/"),
        ("/", "/pre", "/a", "/pre/a"),
    ];
    for (prefix, new, path, want) in cases {
        assert_eq!(
            rewrite_path(&PathRewrite::Prefix(new.into()), &m(prefix), path),
            want,
            "{prefix} {new} {path}"
        );
    }
}

#[test]
fn timeouts_and_retry_are_read() {
    let t = table(&[http_route(
        "demo",
        "r",
        &rules(
            "
  - timeouts: { request: 2s, backendRequest: 500ms }
    retry: { attempts: 3, codes: [503, 502], backoff: 10ms }
    backendRefs: [{ name: echo-v1, port: 80 }]
",
        ),
    )]);
    let h = HeaderMap::new();
    let sel = t
        .select(
            "demo",
            &RequestView {
                method: &Method::GET,
                path: "/",
                query: None,
                headers: &h,
            },
        )
        .expect("rule");
    assert_eq!(sel.rule.timeouts.request, Some(Duration::from_secs(2)));
    assert_eq!(
        sel.rule.timeouts.backend_request,
        Some(Duration::from_millis(500))
    );
    let r = sel.rule.retry.as_ref().expect("retry");
    assert_eq!(
        (r.attempts, r.codes.clone(), r.backoff),
        (3, vec![503, 502], Some(Duration::from_millis(10)))
    );
}

#[test]
fn bad_routes_are_rejected_with_the_fix() {
    let cases = [
        (
            rules("  - matches: [{ path: { type: RegularExpression, value: '/(' } }]\n"),
            "invalid",
        ),
        (
            rules("  - backendRefs: [{ name: nope, port: 80 }]\n"),
            "demo/nope",
        ),
        (
            rules("  - backendRefs: [{ name: echo-v1, port: 81 }]\n"),
            "no such port",
        ),
        (
            rules("  - backendRefs: [{ name: echo-v1 }]\n"),
            "has no port",
        ),
        (
            rules("  - backendRefs: [{ name: echo-v1, port: 80, namespace: other }]\n"),
            "ReferenceGrant",
        ),
        (
            rules("  - matches: [{ path: { value: nope } }]\n"),
            "must start with /",
        ),
        (
            rules("  - timeouts: { request: 1s, backendRequest: 2s }\n"),
            "longer than",
        ),
        (rules("  - timeouts: { request: soon }\n"), "500ms"),
        (
            rules(
                "  - filters: [{ type: RequestMirror, requestMirror: { backendRef: { name: echo-v1, port: 80 } } }]\n",
            ),
            "not supported",
        ),
        (
            rules(
                "  - matches: [{ path: { type: Exact, value: /a } }]\n    filters: [{ type: URLRewrite, urlRewrite: { path: { type: ReplacePrefixMatch, replacePrefixMatch: /b } } }]\n",
            ),
            "PathPrefix",
        ),
        (
            "parentRefs: [{ kind: Service, name: ghost }]".to_string(),
            "not in the mesh",
        ),
        (
            "parentRefs: [{ kind: Gateway, name: echo }]".to_string(),
            "only a Service",
        ),
        ("rules: []".to_string(), "no parentRefs"),
    ];
    for (spec, needle) in cases {
        let e = err(&[http_route("demo", "bad", &spec)]);
        assert!(
            e.contains(needle) && e.contains("HTTPRoute demo/bad"),
            "{needle}: {e}"
        );
    }
    let e = err(&[
        http_route("demo", "a", PARENT),
        http_route("demo", "a", PARENT),
    ]);
    assert!(e.contains("twice"), "{e}");
}
