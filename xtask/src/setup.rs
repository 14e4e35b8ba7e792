//! `cargo xtask setup`: everything building and testing need, installed when missing.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};

use crate::{run, show};

/// Debian packages and the command each provides.
const APT: [(&str, &str); 7] = [
    ("ip", "iproute2"),
    ("bpftool", "bpftool"),
    ("nsenter", "util-linux"),
    ("capsh", "libcap2-bin"),
    ("tcpdump", "tcpdump"),
    // Real clients in the suites: curl (HTTP load, TLS clients), openssl (certificates the
    // mesh's CA did not issue, for the operator port's refusals).
    ("curl", "curl"),
    ("openssl", "openssl"),
];

/// What `cargo xtask bench` drives the topologies with (well-known tools, from Debian).
pub const BENCH_APT: [(&str, &str); 2] = [("h2load", "nghttp2-client"), ("iperf3", "iperf3")];

/// bpf-linker releases that have a cargo feature for nightly's LLVM major.
const BPF_LINKER_VERSION: &str = "0.13.0";
const BPF_LINKER_LLVM: [u32; 3] = [21, 22, 23];

pub fn all() -> anyhow::Result<()> {
    apt_packages(&APT)?;
    nightly()?;
    bpf_linker()?;
    bpffs();
    eprintln!("xtask setup: ready");
    Ok(())
}

fn have(cmd: &str) -> bool {
    which(cmd).is_ok()
}

/// Installs the Debian packages whose command is missing (nothing when all are there).
pub fn apt_packages(list: &[(&str, &str)]) -> anyhow::Result<()> {
    let missing: Vec<&str> = list
        .iter()
        .filter(|(cmd, _)| !have(cmd))
        .map(|(_, pkg)| *pkg)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("xtask setup: installing {}", missing.join(" "));
    let install = |update: bool| -> anyhow::Result<()> {
        if update {
            run(Command::new("apt-get").args(["update", "-q"]))?;
        }
        run(Command::new("apt-get")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(&missing))
    };
    // A fresh machine's index is often missing or weeks old: installing from it prints 404s for
    // package versions the mirror no longer has before the retry below refreshes it.
    install(apt_index_stale())
        .or_else(|_| install(true))
        .with_context(|| {
            format!(
                "cannot install {}; install them with apt-get as root",
                missing.join(" ")
            )
        })
}

/// The apt index is missing (no package list downloaded) or older than a day.
fn apt_index_stale() -> bool {
    let newest = std::fs::read_dir("/var/lib/apt/lists")
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().contains("Packages"))
        .filter_map(|e| e.metadata().ok()?.modified().ok())
        .max();
    newest.is_none_or(|t| {
        t.elapsed()
            .is_ok_and(|age| age > std::time::Duration::from_secs(24 * 3600))
    })
}

fn nightly_sysroot() -> anyhow::Result<PathBuf> {
    let out = Command::new("rustc")
        .args(["+nightly", "--print", "sysroot"])
        .output();
    match out {
        Ok(o) if o.status.success() => Ok(PathBuf::from(String::from_utf8_lossy(&o.stdout).trim())),
        _ => bail!(
            "the nightly toolchain is not usable; install it with `rustup toolchain install nightly`"
        ),
    }
}

fn nightly() -> anyhow::Result<()> {
    if nightly_sysroot().is_err() {
        run(Command::new("rustup").args([
            "toolchain",
            "install",
            "nightly",
            "--profile",
            "minimal",
        ]))
        .context("cannot install the nightly toolchain (needed for bpfel-unknown-none)")?;
    }
    let sysroot = nightly_sysroot()?;
    if !sysroot
        .join("lib/rustlib/src/rust/library/Cargo.lock")
        .exists()
    {
        run(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            "nightly",
        ]))
        .context("cannot add rust-src to nightly (needed for -Z build-std=core)")?;
    }
    Ok(())
}

/// The LLVM major version nightly rustc is built with.
fn nightly_llvm_major() -> anyhow::Result<u32> {
    let out = Command::new("rustc").args(["+nightly", "-vV"]).output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .and_then(|v| v.split('.').next()?.parse().ok())
        .context("`rustc +nightly -vV` names no LLVM version")
}

/// nightly's own shared LLVM library (`libLLVM.so.<ver>-rust-<ver>-nightly`). The sysroot also
/// holds `libLLVM-<major>-rust-….so`, a one-line linker script (`INPUT(…)`) whose relative name
/// the linker cannot resolve from another folder, so only a real ELF file qualifies.
fn nightly_libllvm(sysroot: &Path) -> anyhow::Result<PathBuf> {
    let lib = sysroot.join("lib");
    let is_elf = |p: &Path| {
        let mut magic = [0u8; 4];
        std::fs::File::open(p)
            .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut magic))
            .is_ok_and(|()| magic == *b"\x7fELF")
    };
    let mut found: Vec<PathBuf> = std::fs::read_dir(&lib)
        .with_context(|| format!("cannot list {}", lib.display()))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("libLLVM") && n.contains(".so"))
        })
        .filter(|p| is_elf(p))
        .collect();
    found.sort();
    found.into_iter().next().with_context(|| {
        format!(
            "no libLLVM shared library in {}; reinstall the nightly toolchain",
            lib.display()
        )
    })
}

/// Is an installed bpf-linker usable with nightly's LLVM? It links nightly's libLLVM
/// dynamically, so "it runs and names the same library" is the check.
fn bpf_linker_ok(libllvm: &Path) -> bool {
    let Ok(path) = which("bpf-linker") else {
        return false;
    };
    let Ok(out) = Command::new("ldd").arg(&path).output() else {
        return false;
    };
    let ldd = String::from_utf8_lossy(&out.stdout);
    let name = libllvm.file_name().and_then(|n| n.to_str()).unwrap_or("");
    let linked_ok = ldd
        .lines()
        .any(|l| l.contains(name) && !l.contains("not found"));
    linked_ok
        && Command::new(&path)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
}

fn which(cmd: &str) -> anyhow::Result<PathBuf> {
    let out = Command::new("sh")
        .args(["-c", &format!("command -v {cmd}")])
        .output()?;
    if !out.status.success() {
        bail!("{cmd} not found");
    }
    Ok(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
}

fn bpf_linker() -> anyhow::Result<()> {
    let sysroot = nightly_sysroot()?;
    let libllvm = nightly_libllvm(&sysroot)?;
    if bpf_linker_ok(&libllvm) {
        return Ok(());
    }
    let major = nightly_llvm_major()?;
    if !BPF_LINKER_LLVM.contains(&major) {
        bail!(
            "nightly rustc uses LLVM {major}, but bpf-linker {BPF_LINKER_VERSION} supports LLVM \
             {BPF_LINKER_LLVM:?}; update BPF_LINKER_VERSION in xtask/src/setup.rs"
        );
    }
    // bpf-linker's llvm-sys finds LLVM through LLVM_PREFIX/lib/libLLVM.so: point it at nightly's
    // own library, so the linker and rustc share one LLVM.
    let prefix = target_dir()?.join(format!("llvm-prefix-{major}"));
    let libdir = prefix.join("lib");
    std::fs::create_dir_all(&libdir)?;
    let link = libdir.join("libLLVM.so");
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(&libllvm, &link)
        .with_context(|| format!("cannot link {} to {}", link.display(), libllvm.display()))?;
    eprintln!(
        "xtask setup: building bpf-linker {BPF_LINKER_VERSION} against nightly's LLVM {major} \
         (about 5-8 minutes on 2 cores, once)"
    );
    let mut cmd = Command::new("cargo");
    cmd.env("LLVM_PREFIX", &prefix)
        // Find nightly's libLLVM at run time without LD_LIBRARY_PATH.
        .env(
            "RUSTFLAGS",
            format!("-C link-arg=-Wl,-rpath,{}", sysroot.join("lib").display()),
        )
        .args([
            "install",
            "bpf-linker",
            "--force",
            "--version",
            BPF_LINKER_VERSION,
        ])
        // A kept build folder makes an interrupted or failed install resume instead of restart.
        .arg("--target-dir")
        .arg(target_dir()?.join("bpf-linker-build"))
        .args([
            "--no-default-features",
            "--features",
            &format!("llvm-{major}"),
        ]);
    run(&mut cmd).with_context(|| format!("`{}` failed", show(&cmd)))?;
    if !bpf_linker_ok(&libllvm) {
        bail!(
            "bpf-linker was installed but does not run against {}",
            libllvm.display()
        );
    }
    Ok(())
}

/// cargo subcommands the test run uses, with the version each is pinned to and what it is for.
const CARGO_TOOLS: [(&str, &str, &str); 2] = [
    (
        "cargo-fuzz",
        crate::fuzz::CARGO_FUZZ_VERSION,
        "the fuzz targets",
    ),
    (
        "cargo-deny",
        "0.20.2",
        "the supply-chain policy in deny.toml",
    ),
];

/// Installs the cargo subcommands `cargo xtask test` and `fuzz` need, each at its pinned version
/// (nothing when they are there); the build folder is kept in /var/cache/nodemesh.
pub fn cargo_tools() -> anyhow::Result<()> {
    for (name, version, why) in CARGO_TOOLS {
        let sub = name.trim_start_matches("cargo-");
        let installed = Command::new("cargo")
            .args([sub, "--version"])
            .output()
            .is_ok_and(|o| {
                o.status.success()
                    && String::from_utf8_lossy(&o.stdout)
                        .split_whitespace()
                        .nth(1)
                        .is_some_and(|v| v == version)
            });
        if installed {
            continue;
        }
        eprintln!("xtask setup: installing {name} {version} ({why}; a few minutes, once)");
        let mut cmd = Command::new("cargo");
        cmd.args(["install", name, "--locked", "--force", "--version", version])
            .arg("--target-dir")
            .arg("/var/cache/nodemesh/tools-build");
        run(&mut cmd).with_context(|| {
            format!("cannot install {name} {version} from crates.io (needed for {why})")
        })?;
    }
    Ok(())
}

/// bpffs holds pinned maps and links; mount it when missing (non-fatal: `mesh-daemon check`
/// reports it with the fix if this fails).
fn bpffs() {
    let mounted = std::fs::read_to_string("/proc/mounts").is_ok_and(|m| {
        m.lines()
            .any(|l| l.split_whitespace().nth(2) == Some("bpf"))
    });
    if !mounted {
        let _ = std::fs::create_dir_all("/sys/fs/bpf");
        let _ = run(Command::new("mount").args(["-t", "bpf", "bpf", "/sys/fs/bpf"]));
    }
}

/// The workspace's target folder (honours CARGO_TARGET_DIR).
pub fn target_dir() -> anyhow::Result<PathBuf> {
    if let Ok(d) = std::env::var("CARGO_TARGET_DIR") {
        return Ok(PathBuf::from(d));
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("workspace root")?;
    Ok(root.join("target"))
}

/// What the dashboard's browser test drives: Debian's Chromium and Playwright's driver library
/// (`playwright-core` from npm, no browser download), pinned, in /var/cache/nodemesh. The
/// suites find the library through `NODEMESH_PLAYWRIGHT_CORE`.
pub const PLAYWRIGHT_CORE: &str = "1.65.2";

pub fn browser_tools() -> anyhow::Result<()> {
    apt_packages(&[("chromium", "chromium"), ("node", "nodejs"), ("npm", "npm")])?;
    let prefix = PathBuf::from(format!(
        "/var/cache/nodemesh/playwright-core-{PLAYWRIGHT_CORE}"
    ));
    let lib = prefix.join("node_modules/playwright-core");
    if !lib.join("package.json").exists() {
        eprintln!("xtask setup: installing playwright-core {PLAYWRIGHT_CORE} from npm (once)");
        std::fs::create_dir_all(&prefix)?;
        run(Command::new("npm")
            .args([
                "install",
                "--no-audit",
                "--no-fund",
                "--loglevel=error",
                "--prefix",
            ])
            .arg(&prefix)
            .arg(format!("playwright-core@{PLAYWRIGHT_CORE}"))
            // the browser is Debian's; never download one
            .env("PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD", "1"))
        .with_context(|| format!("cannot install playwright-core {PLAYWRIGHT_CORE} from npm"))?;
    }
    // SAFETY: xtask is single-threaded; the suites it starts inherit this.
    unsafe { std::env::set_var("NODEMESH_PLAYWRIGHT_CORE", &lib) };
    Ok(())
}
