//! `cargo xtask`: set up the toolchain, run the demo, run the tests.
//!
//! Every command does the set-up it needs first, idempotently, so a newcomer on a fresh machine
//! types one command. Set-up never assumes a path: the nightly sysroot, its LLVM and the cgroup
//! mount are all computed here.

mod fuzz;
mod kube;
mod modgraph;
mod setup;

use std::process::Command;

use anyhow::{Context as _, bail};

const USAGE: &str = "\
usage: cargo xtask <command>

  setup   install what building and testing need (idempotent): apt packages, nightly rust-src,
          bpf-linker matched to nightly's LLVM, bpffs, and the Kubernetes tests' etcd and
          kube-apiserver (built once from Debian's source package, cached in /var/cache/nodemesh);
          `setup --build-only` skips the test tools
  kube-test-server
          a real API server on 127.0.0.1 (etcd + kube-apiserver, TokenRequest/TokenReview on)
          until Ctrl-C; prints the kubeconfig to use
  demo    the main job: a meshed pod's connection captured in the kernel and proxied by the daemon
  test    fmt check, clippy -D warnings (host, eBPF, fuzz), cargo deny (licenses, bans, sources),
          unit tests, the fuzz corpora replayed, privileged end-to-end tests
  imports check that mesh-daemon's modules import one way (no cycle); part of `test`
  leftovers
          on a quiet machine: no mesh program (nm_*) or map (NM_*) loaded anywhere — what a
          clean uninstall leaves (the suites check only what they made, by id); part of `test`
          when no other nodemesh daemon or demo runs
  fuzz    `fuzz [TARGET] [--secs N]`: the libFuzzer targets in fuzz/ (every parser of input from
          the network, the API server, a file or a user), N seconds each (default 60), from
          their seed corpora; prints executions and coverage. `test` replays every corpus and
          fuzzes each target for a few seconds
  bench   measurements, medians and ratios from one run. `bench [--quick]`: baseline, sidecar,
          node, node+sockmap and the L7 modes (node L7, sidecar L7: a route in force) side by
          side (h2load, iperf3; latency at 1000 req/s HTTP/1.1 and h2c, max req/s,
          one TCP stream, new connections/s, memory and CPU for 1-100 pods per node); writes
          bench/results.json, bench/RESULTS.md and SVG plots (~25 min; --quick about 6).
          `bench tls` compares the rustls crypto providers; `bench scrape` measures whether
          scraping /metrics moves the data plane's latency; `bench kernel-log` times nm_connect4
          per run (kernel.bpf_stats_enabled) with the kernel's decision log off and on
";

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        // `--build-only`: what building needs, not the test tools (an image build).
        Some("setup") if args.iter().any(|a| a == "--build-only") => setup::all(),
        Some("setup") => setup::all()
            .and_then(|()| setup::cargo_tools())
            .and_then(|()| kube::binaries().map(drop))
            .and_then(|()| kube::validator())
            .and_then(|()| setup::browser_tools()),
        Some("kube-test-server") => kube_test_server(),
        Some("demo") => demo(),
        Some("test") => test(),
        Some("bench") => bench(&args[1..]),
        Some("imports") => imports(),
        Some("leftovers") => leftovers(),
        Some("fuzz") => setup::all()
            .and_then(|()| setup::cargo_tools())
            .and_then(|()| fuzz::campaign(&args[1..])),
        Some("-h" | "--help" | "help") | None => {
            print!("{USAGE}");
            Ok(())
        }
        Some(other) => bail!("unknown command {other:?}\n{USAGE}"),
    }
}

/// Runs a command inheriting stdio; fails with the command line when it fails.
pub fn run(cmd: &mut Command) -> anyhow::Result<()> {
    eprintln!("+ {}", show(cmd));
    let st = cmd
        .status()
        .with_context(|| format!("cannot start {}", show(cmd)))?;
    if !st.success() {
        bail!("`{}` failed ({st})", show(cmd));
    }
    Ok(())
}

pub fn show(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

fn cargo() -> Command {
    Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
}

fn require_root(what: &str) -> anyhow::Result<()> {
    let out = Command::new("id")
        .arg("-u")
        .output()
        .context("cannot run `id -u`")?;
    if String::from_utf8_lossy(&out.stdout).trim() != "0" {
        bail!("{what} needs root (network namespaces, cgroups, eBPF); run it with sudo or as root");
    }
    Ok(())
}

fn demo() -> anyhow::Result<()> {
    require_root("cargo xtask demo")?;
    setup::all()?;
    run(cargo().args(["build", "--bins"]))?;
    let target = setup::target_dir()?;
    run(&mut Command::new(target.join("debug/nodemesh-demo")))
}

fn kube_test_server() -> anyhow::Result<()> {
    kube::binaries()?;
    run(cargo().args([
        "build",
        "--package",
        "nodemesh-tests",
        "--bin",
        "kube-test-server",
    ]))?;
    run(&mut Command::new(
        setup::target_dir()?.join("debug/kube-test-server"),
    ))
}

fn bench(args: &[String]) -> anyhow::Result<()> {
    require_root("cargo xtask bench")?;
    let quick = args.iter().any(|a| a == "--quick");
    let part = args
        .iter()
        .find(|a| !a.starts_with("--"))
        .map(String::as_str);
    let bin = match part {
        None | Some("mesh") => "mesh-bench",
        Some("tls") => "tls-bench",
        Some("scrape") => "nodemesh-bench",
        Some("kernel-log") => "kernel-log-bench",
        Some(other) => {
            bail!(
                "unknown bench {other:?}; available: mesh (default), tls, scrape, kernel-log\n{USAGE}"
            )
        }
    };
    setup::all()?;
    if bin == "mesh-bench" {
        // The comparison drives the topologies with well-known tools from Debian.
        setup::apt_packages(&setup::BENCH_APT)?;
    }
    // Release builds: debug-build numbers mean nothing.
    run(cargo().args(["build", "--release", "--bins"]))?;
    let target = setup::target_dir()?;
    let mut cmd = Command::new(target.join("release").join(bin));
    if bin == "mesh-bench" {
        // Results go to bench/ at the top of the repository, whatever the current folder.
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .context("xtask has no parent folder")?;
        cmd.arg("--out").arg(root.join("bench"));
        if quick {
            cmd.arg("--quick");
        }
    }
    run(&mut cmd)
}

fn repo_root() -> anyhow::Result<&'static std::path::Path> {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("xtask has no parent folder")
}

/// `mesh-daemon` or `nodemesh-demo` processes running now (name and pid).
fn other_mesh_processes() -> Vec<String> {
    ["mesh-daemon", "nodemesh-demo"]
        .iter()
        .flat_map(|name| {
            let out = Command::new("pgrep").args(["-x", name]).output();
            let pids = out
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                .unwrap_or_default();
            pids.split_whitespace()
                .map(|pid| format!("{name} (pid {pid})"))
                .collect::<Vec<_>>()
        })
        .collect()
}

/// The machine-wide check: no program or map of the mesh is loaded anywhere.
fn leftovers() -> anyhow::Result<()> {
    let show = |what: &str| -> anyhow::Result<String> {
        let out = Command::new("bpftool")
            .args([what, "show"])
            .output()
            .context("cannot run bpftool (`cargo xtask setup` installs it)")?;
        if !out.status.success() {
            bail!(
                "`bpftool {what} show` failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    let (progs, maps) = (show("prog")?, show("map")?);
    let left: Vec<&str> = progs
        .lines()
        .filter(|l| l.contains(" name nm_"))
        .chain(maps.lines().filter(|l| l.contains(" name NM_")))
        .collect();
    if !left.is_empty() {
        bail!(
            "the kernel still holds the mesh's:\n{}\nA daemon or demo still running holds them \
             (stop it first: this check is for a quiet machine); otherwise pins were left: \
             `mesh-daemon uninstall --pin-dir <dir>` removes them",
            left.join("\n")
        );
    }
    eprintln!("xtask leftovers: no nm_* program and no NM_* map is loaded on this machine");
    Ok(())
}

fn imports() -> anyhow::Result<()> {
    let n = modgraph::check_daemon(repo_root()?)?;
    eprintln!("xtask: mesh-daemon's {n} modules import one way (no cycle)");
    Ok(())
}

/// How long `test` fuzzes each target after replaying its corpus.
const FUZZ_SMOKE_SECS: u64 = 5;

fn test() -> anyhow::Result<()> {
    require_root("cargo xtask test")?;
    setup::all()?;
    // The Kubernetes suites' API server (built once; the suites find it through the env) and
    // the manifests' validator.
    kube::binaries()?;
    kube::validator()?;
    // The dashboard's headless-browser test: Chromium and playwright-core.
    setup::browser_tools()?;
    setup::cargo_tools()?;
    run(cargo().args(["fmt", "--all", "--check"]))?;
    // Supply chain: licenses, banned crates and sources, all offline (deny.toml).
    run(cargo().args([
        "deny",
        "check",
        "--hide-inclusion-graph",
        "licenses",
        "bans",
        "sources",
    ]))?;
    // One-way imports: a cycle between the daemon's modules fails the test run.
    imports()?;
    run(cargo().args(["clippy", "--all-targets", "--", "-D", "warnings"]))?;
    // The kernel crate only builds for the BPF target; lint it there.
    // `+nightly` works only through the rustup proxy, and $CARGO is the toolchain's own binary.
    run(Command::new("rustup").args([
        "run",
        "nightly",
        "cargo",
        "clippy",
        "--package",
        "mesh-ebpf",
        "--target",
        "bpfel-unknown-none",
        "-Z",
        "build-std=core",
        "--release",
        "--",
        "-D",
        "warnings",
    ]))?;
    fuzz::lint()?;
    // The suites find the binaries next to themselves.
    run(cargo().args(["build", "--bins"]))?;
    // Unit tests of every host crate; nodemesh-tests' own run below covers that crate.
    run(cargo().args([
        "test",
        "--workspace",
        "--exclude",
        "mesh-ebpf",
        "--exclude",
        "nodemesh-tests",
        "--lib",
        "--bins",
    ]))?;
    // Every fuzz corpus replayed (each fixed crash is an entry), then each target fuzzed briefly.
    fuzz::smoke(FUZZ_SMOKE_SECS)?;
    // Privileged end-to-end suites, one at a time, printing what each set up and observed.
    run(cargo().args([
        "test",
        "--package",
        "nodemesh-tests",
        "--tests",
        "--",
        "--nocapture",
        "--test-threads=1",
    ]))?;
    // Machine-wide, only when nothing else of ours runs (a demo beside the suite is allowed).
    let others = other_mesh_processes();
    if others.is_empty() {
        leftovers()?;
    } else {
        eprintln!(
            "xtask test: the machine-wide leftovers check was NOT run: {} runs beside the \
             suite (each suite checked its own programs, maps and pins by id); run `cargo xtask \
             leftovers` on a quiet machine",
            others.join(", ")
        );
    }
    eprintln!("xtask test: all passed");
    Ok(())
}
