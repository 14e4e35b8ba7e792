//! Test topology for nodemesh: network namespaces as nodes and pods, cgroups as pods, and the
//! binaries under test. Every resource is a guard that removes itself on `Drop`, so a panicking
//! test leaves nothing behind. Used by the privileged suites in `tests/tests/` and by
//! `cargo xtask demo`.
//!
//! Everything here needs root; a setup step that fails panics with the command and its output,
//! so a test that cannot build its environment fails loudly instead of passing silently.

pub mod cgroup;
pub mod footprint;
pub mod hostile;
pub mod kube;
pub mod netns;
pub mod process;
pub mod topology;

use std::{path::PathBuf, process::Command};

/// Runs a command and panics with its output when it fails.
/// The metric families a PromQL expression names: the mesh's (`nodemesh_…`) and the process
/// collector's standard ones (`process_…`), as written (histograms with their `_bucket`).
pub fn families_in(expr: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = expr;
    while let Some(i) = rest
        .find("nodemesh_")
        .into_iter()
        .chain(rest.find("process_"))
        .min()
    {
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        out.push(tail[..end].to_string());
        rest = &tail[end..];
    }
    out
}

/// Every family the Grafana dashboard in deploy/ queries, by panel title.
pub fn dashboard_families() -> Vec<(String, String)> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy/grafana/nodemesh-node.json");
    let text = std::fs::read_to_string(&path).expect("deploy/grafana/nodemesh-node.json");
    let d: serde_json::Value = serde_json::from_str(&text).expect("dashboard is JSON");
    let mut out = Vec::new();
    for p in d["panels"].as_array().into_iter().flatten() {
        let title = p["title"].as_str().unwrap_or("?").to_string();
        for t in p["targets"].as_array().into_iter().flatten() {
            for fam in families_in(t["expr"].as_str().unwrap_or("")) {
                out.push((title.clone(), fam));
            }
        }
    }
    out
}

pub fn sh(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run {program}: {e} (is it installed? `cargo xtask setup` installs it)")
        });
    if !out.status.success() {
        panic!(
            "`{program} {}` failed ({}): {}{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A binary of this workspace, found next to the running executable (`target/<profile>/`).
/// `cargo xtask test` builds them all before the suites run.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    for dir in exe.ancestors().skip(1).take(3) {
        let p = dir.join(name);
        if p.is_file() {
            return p;
        }
    }
    panic!(
        "binary {name} not found near {}; build it first (`cargo build --workspace --bins`, \
         which `cargo xtask test` does)",
        exe.display()
    )
}

/// Runs `mesh-app` inside a pod: joined to `cgroup`, then in network namespace `netns`.
pub fn mesh_app(cgroup: &std::path::Path, netns: &str, args: &[&str]) -> std::process::Output {
    Command::new(bin("mesh-app"))
        .arg("--cgroup")
        .arg(cgroup)
        .args(["--netns", netns])
        .args(args)
        .output()
        .expect("run mesh-app")
}

/// `mesh-daemon uninstall --pin-dir <dir>`: removes the fail-closed pins a daemon left (every
/// stop but `--fail-open` leaves them). Panics unless it succeeds; returns what it printed.
pub fn uninstall(pin_dir: &std::path::Path) -> String {
    let out = Command::new(bin("mesh-daemon"))
        .args(["uninstall", "--pin-dir"])
        .arg(pin_dir)
        .output()
        .expect("run mesh-daemon uninstall");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success() && text.contains("uninstalled"),
        "mesh-daemon uninstall --pin-dir {}: {text}{}",
        pin_dir.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

/// Fails loudly unless running as root: these suites create namespaces, cgroups and programs.
pub fn require_root(suite: &str) {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "{suite} needs root (network namespaces, cgroups, eBPF); run `cargo xtask test` as root. \
         It must fail here rather than be skipped: a skipped privileged test looks like a pass."
    );
}

/// A name unique to this process and tag, short enough for interface names.
pub fn unique(tag: &str) -> String {
    format!("nm{}{}", tag, std::process::id() % 100_000)
}
