//! The Kubernetes tests' API server: etcd from Debian, and kube-apiserver built once from Debian's
//! own source package and cached outside the repository (never committed).
//!
//! No newer API server can be fetched on these machines: bookworm's `kubernetes` source package
//! (1.20.5+really1.20.2) carries the full tree with `vendor/`, and bullseye's Go 1.15 builds it
//! offline. A private apt configuration adds the two `deb-src`/`deb` entries it needs, for the
//! same mirror the system uses, and leaves the system's sources untouched. `ETCD_BIN` and
//! `KUBE_APISERVER_BIN` skip all of it.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};

use crate::run;

/// Where the built API server is kept (tests/src/kube.rs looks there too).
pub const APISERVER_CACHE: &str = "/var/cache/nodemesh/kube-apiserver-v1.20.2/kube-apiserver";
const KUBE_VERSION: &str = "v1.20.2";

/// The two binaries, installed or built when missing; sets ETCD_BIN and KUBE_APISERVER_BIN for
/// what runs next (the suites).
pub fn binaries() -> anyhow::Result<(PathBuf, PathBuf)> {
    let etcd = match std::env::var_os("ETCD_BIN") {
        Some(p) => PathBuf::from(p),
        None => {
            crate::setup::apt_packages(&[("etcd", "etcd-server")])?;
            PathBuf::from("/usr/bin/etcd")
        }
    };
    let apiserver = match std::env::var_os("KUBE_APISERVER_BIN") {
        Some(p) => PathBuf::from(p),
        None => {
            let p = PathBuf::from(APISERVER_CACHE);
            if !p.is_file() {
                build_apiserver(&p)?;
            }
            p
        }
    };
    for (what, p) in [("etcd", &etcd), ("kube-apiserver", &apiserver)] {
        if !p.is_file() {
            bail!("{what} not found at {}", p.display());
        }
    }
    // SAFETY: set before any thread of ours starts (xtask is single-threaded).
    unsafe {
        std::env::set_var("ETCD_BIN", &etcd);
        std::env::set_var("KUBE_APISERVER_BIN", &apiserver);
    }
    Ok((etcd, apiserver))
}

/// `kubernetes-validate` (PyPI; offline schemas for Kubernetes 1.25-1.37), for the deploy suite.
pub fn validator() -> anyhow::Result<()> {
    let ok = Command::new("kubernetes-validate")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        run(Command::new("python3").args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--root-user-action=ignore",
            "kubernetes-validate==1.37.0",
        ]))
        .context("cannot install kubernetes-validate from PyPI")?;
    }
    Ok(())
}

/// The Debian mirror the system's own sources name (deb822 or one-line form).
fn system_mirror() -> String {
    let mut texts = vec![std::fs::read_to_string("/etc/apt/sources.list").unwrap_or_default()];
    if let Ok(dir) = std::fs::read_dir("/etc/apt/sources.list.d") {
        texts.extend(
            dir.flatten()
                .filter_map(|e| std::fs::read_to_string(e.path()).ok()),
        );
    }
    texts
        .iter()
        .flat_map(|t| t.lines())
        .filter_map(|l| {
            let l = l.trim();
            let url = l.strip_prefix("URIs:").map(str::trim).or_else(|| {
                l.strip_prefix("deb ")
                    .and_then(|r| r.split_whitespace().find(|w| w.starts_with("http")))
            })?;
            Some(url.trim_end_matches('/').to_string())
        })
        .find(|u| u.ends_with("/debian"))
        .unwrap_or_else(|| "http://deb.debian.org/debian".into())
}

fn build_apiserver(dest: &Path) -> anyhow::Result<()> {
    eprintln!(
        "xtask setup: building kube-apiserver {KUBE_VERSION} from Debian's source package for \
         the Kubernetes tests (about 5 minutes on 2 cores, once; cached in {})",
        dest.parent()
            .map(Path::display)
            .map(|d| d.to_string())
            .unwrap_or_default()
    );
    crate::setup::apt_packages(&[("rsync", "rsync"), ("make", "make")])?;
    let work = PathBuf::from("/var/cache/nodemesh/build-kube-apiserver");
    let _ = std::fs::remove_dir_all(&work);
    let apt = work.join("apt");
    for d in ["lists/partial", "cache/archives/partial"] {
        std::fs::create_dir_all(apt.join(d))?;
    }
    let mirror = system_mirror();
    let keyring = "/usr/share/keyrings/debian-archive-keyring.gpg";
    std::fs::write(
        apt.join("sources.list"),
        format!(
            "deb-src [signed-by={keyring}] {mirror} bookworm main\n\
             deb [signed-by={keyring}] {mirror} bullseye main\n"
        ),
    )?;
    let apt_get = || {
        let mut c = Command::new("apt-get");
        c.current_dir(&work)
            .arg("-q")
            .arg("-o")
            .arg(format!(
                "Dir::Etc::SourceList={}",
                apt.join("sources.list").display()
            ))
            .args(["-o", "Dir::Etc::SourceParts=/dev/null"])
            .arg("-o")
            .arg(format!("Dir::State::Lists={}", apt.join("lists").display()))
            .arg("-o")
            .arg(format!("Dir::Cache={}", apt.join("cache").display()))
            // Downloads land in a root-owned folder the _apt user cannot write.
            .args(["-o", "APT::Sandbox::User=root"]);
        c
    };
    run(apt_get().arg("update"))?;
    run(apt_get().args(["source", "--download-only", "kubernetes"]))?;
    run(apt_get().args(["download", "golang-1.15-go", "golang-1.15-src"]))?;
    let find = |prefix: &str, suffix: &str| -> anyhow::Result<PathBuf> {
        std::fs::read_dir(&work)?
            .flatten()
            .map(|e| e.path())
            .find(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with(prefix) && n.ends_with(suffix))
            })
            .with_context(|| format!("no {prefix}*{suffix} was downloaded to {}", work.display()))
    };
    let go = work.join("go");
    std::fs::create_dir_all(&go)?;
    for deb in [
        find("golang-1.15-go_", ".deb")?,
        find("golang-1.15-src_", ".deb")?,
    ] {
        run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&go))?;
    }
    let src = work.join("src");
    std::fs::create_dir_all(&src)?;
    run(Command::new("tar")
        .arg("-xzf")
        .arg(find("kubernetes_", ".orig.tar.gz")?)
        .arg("-C")
        .arg(&src)
        .arg("--strip-components=1"))?;
    let goroot = go.join("usr/lib/go-1.15");
    let path = format!(
        "{}:{}",
        goroot.join("bin").display(),
        std::env::var("PATH").unwrap_or_default()
    );
    run(Command::new("make")
        .current_dir(&src)
        .arg("WHAT=cmd/kube-apiserver")
        .env("GOROOT", &goroot)
        .env("PATH", path)
        .env("GOPATH", work.join("gopath"))
        .env("GOCACHE", work.join("gocache"))
        .env("GOPROXY", "off")
        .env("GOFLAGS", "-mod=vendor")
        .env("CGO_ENABLED", "0")
        .env("KUBE_GIT_VERSION", KUBE_VERSION)
        .env("KUBE_GIT_TREE_STATE", "clean"))
    .context("building kube-apiserver failed")?;
    let built = src.join("_output/bin/kube-apiserver");
    let dir = dest.parent().context("cache folder")?;
    std::fs::create_dir_all(dir)?;
    // Copy under a temporary name and rename: an interrupted copy never looks like a binary.
    let tmp = dir.join("kube-apiserver.partial");
    std::fs::copy(&built, &tmp)
        .with_context(|| format!("cannot copy {} to {}", built.display(), tmp.display()))?;
    std::fs::rename(&tmp, dest)?;
    let _ = std::fs::remove_dir_all(&work);
    eprintln!("xtask setup: kube-apiserver cached at {}", dest.display());
    Ok(())
}
