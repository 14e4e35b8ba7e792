//! The CA's signing request as any client on the network can send it: line 1 the Authorization
//! header's value, the rest the body (`{"csr": "<PEM>"}`). Checked and, if it passes, signed by a
//! real in-memory authority (every identity counts as on the node here, so the CSR parser and
//! the SAN checks are what is fuzzed).
#![no_main]

use std::{sync::OnceLock, time::Duration};

use http::{HeaderMap, HeaderValue, header::AUTHORIZATION};
use libfuzzer_sys::fuzz_target;
use mesh_daemon::identity::ca::{self, Authority};

fn authority() -> &'static Authority {
    static CA: OnceLock<Authority> = OnceLock::new();
    CA.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("nodemesh-fuzz-ca-{}", std::process::id()));
        let a = Authority::init_or_load(&dir, nodemesh_fuzz::TRUST_DOMAIN).expect("a CA");
        let _ = std::fs::remove_dir_all(&dir);
        a
    })
}

fuzz_target!(|data: &[u8]| {
    let (header, body) = match data.iter().position(|b| *b == b'\n') {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &[][..]),
    };
    let mut headers = HeaderMap::new();
    if let Ok(v) = HeaderValue::from_bytes(header) {
        headers.insert(AUTHORIZATION, v);
    }
    let _ = ca::bearer_token(&headers);
    let Ok(req) = ca::parse_sign_body(body) else {
        return;
    };
    if let Ok((uri, issued)) =
        authority().sign(&req.csr, "node-a", |_| true, Duration::from_secs(3600))
    {
        // A workload of the trust domain, or this node's own node identity; never an operator's
        // or another node's.
        let workload = mesh_daemon::identity::Identity::parse(&uri)
            .is_ok_and(|id| id.trust_domain == nodemesh_fuzz::TRUST_DOMAIN);
        let own_node = mesh_daemon::identity::Role::Node.parse(&uri)
            == Some((nodemesh_fuzz::TRUST_DOMAIN, "node-a"));
        assert!(workload || own_node, "signed {uri}");
        assert_eq!(issued.chain.len(), 2, "a leaf and its signer");
    }
});
