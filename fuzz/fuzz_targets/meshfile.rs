//! The mesh file (`--mesh-file`, read at start and on every change): parsed, validated, turned
//! into the desired model and applied, as the daemon does. Any input is an error or a state.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mesh_daemon::state::{Scope, State};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(file) = mesh_daemon::meshfile::parse(std::path::Path::new("fuzz.yaml"), text) else {
        return;
    };
    let desired = mesh_daemon::discovery::file::to_desired(&file);
    for scope in [Scope::Node("n1".into()), Scope::Node("node-1".into())] {
        let _ = State::new(scope, "/".into()).apply(&desired);
    }
});
