//! The HBONE server's CONNECT admission (authority, source header, the identity asked for), as
//! an mTLS-authenticated peer on another node can send it. Input: line 1 the method, line 2 the
//! request target, line 3 the source-workload header (empty: none), line 4 the client's
//! namespace/service-account, line 5 the server name it asked for.
#![no_main]

use http::{HeaderValue, Method, Request};
use libfuzzer_sys::fuzz_target;
use mesh_daemon::{
    identity::Identity,
    proxy::route::{self, Peer},
};

fuzz_target!(|data: &[u8]| {
    let Some(lines) = nodemesh_fuzz::lines(data) else {
        return;
    };
    let [method, target, source, client, server_name, ..] = lines.as_slice() else {
        return;
    };
    let Ok(method) = Method::from_bytes(method.as_bytes()) else {
        return;
    };
    let mut b = Request::builder().method(method);
    if !target.is_empty() {
        b = b.uri(*target);
    }
    if !source.is_empty()
        && let Ok(v) = HeaderValue::from_str(source)
    {
        b = b.header(route::SOURCE_HEADER, v);
    }
    let Ok(req) = b.body(()) else {
        return;
    };
    let (ns, sa) = client.split_once('/').unwrap_or(("x", client));
    let peer = Peer {
        source: Identity::new(nodemesh_fuzz::TRUST_DOMAIN, ns, sa),
        server_name: (*server_name).to_string(),
    };
    let snap = nodemesh_fuzz::snapshot();
    if let Ok(t) = route::admit(
        snap,
        nodemesh_fuzz::TRUST_DOMAIN,
        &peer,
        req.method(),
        req.uri(),
        req.headers(),
    ) {
        // Admitted only to a meshed pod this proxy serves, never the node's own ports.
        assert!(
            snap.is_local(&t.dst),
            "admitted a CONNECT to a pod elsewhere: {t:?}"
        );
        assert!(
            !t.target.ip().is_loopback(),
            "admitted a CONNECT to loopback: {t:?}"
        );
    }
});
