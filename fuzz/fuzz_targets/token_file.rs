//! The CA's token file (`--tokens`, node name → bootstrap token): any text is a map of trimmed,
//! non-empty tokens or an error naming the problem.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(tokens) = mesh_daemon::identity::ca::parse_tokens(text) {
        for (node, token) in &tokens {
            assert!(!token.is_empty(), "node {node:?} kept an empty token");
            assert_eq!(token.trim(), token, "node {node:?}'s token is not trimmed");
        }
    }
});
