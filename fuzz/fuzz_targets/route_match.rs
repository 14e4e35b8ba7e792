//! HTTP and gRPC route matching and the filters that follow it, on a request any pod can send.
//! Input: line 1 the method, line 2 the request target (path and query), line 3 the client's
//! namespace, then `name: value` headers.
#![no_main]

use http::{HeaderMap, HeaderName, HeaderValue, Method, Uri};
use libfuzzer_sys::fuzz_target;
use mesh_daemon::state::routes::{self, RequestView};

fuzz_target!(|data: &[u8]| {
    let Some(lines) = nodemesh_fuzz::lines(data) else {
        return;
    };
    let [method, target, ns, headers @ ..] = lines.as_slice() else {
        return;
    };
    // What hyper hands the proxy has passed these parsers already.
    let (Ok(method), Ok(uri)) = (Method::from_bytes(method.as_bytes()), target.parse::<Uri>())
    else {
        return;
    };
    let mut h = HeaderMap::new();
    for line in headers {
        let Some((n, v)) = line.split_once(':') else {
            continue;
        };
        if let (Ok(n), Ok(v)) = (
            HeaderName::from_bytes(n.trim().as_bytes()),
            HeaderValue::from_str(v.trim()),
        ) {
            h.append(n, v);
        }
    }
    let view = RequestView {
        method: &method,
        path: uri.path(),
        query: uri.query(),
        headers: &h,
    };
    for table in nodemesh_fuzz::snapshot().route_tables.values() {
        let _ = table.is_empty_for(ns);
        let Some(sel) = table.select(ns, &view) else {
            continue;
        };
        let rule = sel.rule;
        let mut headers = h.clone();
        rule.request_headers.apply(&mut headers);
        rule.response_headers.apply(&mut headers);
        if let Some(rw) = &rule.rewrite {
            let _ = routes::apply_rewrite(rw, sel.matched, &uri, &mut headers);
        }
        if let Some(rd) = &rule.redirect {
            let _ = routes::redirect_location(rd, sel.matched, &uri, "b.x.svc");
        }
        for draw in [0, 1, u64::MAX] {
            let _ = routes::pick_backend(&rule.backends, draw);
        }
    }
});
