//! meshctl's reader of a node's `/metrics` (Prometheus text from whatever `--node` points at).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let (samples, bad) = mesh_daemon::promtext::parse(text);
    assert!(
        samples.len() + bad <= text.lines().count(),
        "more samples than lines"
    );
    for s in &samples {
        let _ = s.label("destination_workload");
    }
});
