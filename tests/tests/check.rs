//! Privileged: `mesh-daemon check` passes on this machine and fails, naming the cause, when the
//! capabilities it needs are dropped.

use std::process::Command;

use nodemesh_tests::{bin, require_root};

#[test]
fn check_passes_as_root() {
    require_root("check_passes_as_root");
    let out = Command::new(bin("mesh-daemon"))
        .arg("check")
        .output()
        .expect("run check");
    let text = String::from_utf8_lossy(&out.stdout);
    println!("{text}");
    assert!(out.status.success(), "check failed as root:\n{text}");
    for name in [
        "nm_connect4",
        "nm_connect6",
        "nm_sockops",
        "nm_splice",
        "cgroup v2",
        "bpffs",
    ] {
        assert!(text.contains(name), "check must report {name}:\n{text}");
    }
}

#[test]
fn check_fails_clearly_without_capabilities() {
    require_root("check_fails_clearly_without_capabilities");
    let daemon = bin("mesh-daemon");
    let out = Command::new("capsh")
        .args(["--drop=cap_bpf,cap_sys_admin", "--", "-c"])
        .arg(format!("{} check", daemon.display()))
        .output()
        .expect("run capsh (package libcap2-bin; `cargo xtask setup` installs it)");
    let text = String::from_utf8_lossy(&out.stdout);
    println!("{text}");
    assert!(
        !out.status.success(),
        "check must fail without CAP_BPF:\n{text}"
    );
    assert!(
        text.contains("[FAIL] capabilities: missing CAP_BPF"),
        "{text}"
    );
    assert!(
        text.contains("run as root or grant"),
        "the fix must be named:\n{text}"
    );
    assert!(!text.contains("panicked"), "{text}");
}
