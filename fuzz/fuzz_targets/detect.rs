//! Protocol detection on a captured connection's first bytes (sent by any pod).
#![no_main]

use libfuzzer_sys::fuzz_target;
use mesh_daemon::proxy::detect::{Verdict, classify};

fuzz_target!(|data: &[u8]| {
    if let Verdict::Known(protocol) = classify(data) {
        let _ = protocol.label();
    }
    // Every prefix is classified too (detection runs as bytes arrive).
    for n in [1, 2, 8, 24] {
        if n < data.len() {
            let _ = classify(&data[..n]);
        }
    }
});
