//! `mesh-daemon check`: the preflight, in the spirit of `linkerd check`. One line per check; every
//! failure names its cause and the fix; the exit status is non-zero when any check fails.

use std::path::{Path, PathBuf};

use crate::ebpf::{cgroup, loader};

/// Kernel features the mesh needs: `bpf_get_netns_cookie` in sock_ops (5.15) and link-based
/// cgroup attachment (5.7) are the newest.
pub const MIN_KERNEL: (u32, u32) = (5, 15);
const BPFFS: &str = "/sys/fs/bpf";
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// Capabilities the daemon uses, by number (linux/capability.h).
const CAPS: [(u32, &str, &str); 4] = [
    (39, "CAP_BPF", "load programs and create maps"),
    (12, "CAP_NET_ADMIN", "attach cgroup and sockops programs"),
    (
        38,
        "CAP_PERFMON",
        "let the verifier accept pointer arithmetic in programs",
    ),
    (
        21,
        "CAP_SYS_ADMIN",
        "mount bpffs and read BPF objects of other programs",
    ),
];

/// The outcome of one check.
#[derive(Debug)]
pub struct Outcome {
    pub name: String,
    /// `Ok(detail)` or `Err(cause and fix)`.
    pub result: Result<String, String>,
}

/// Runs every check; the caller prints them.
pub fn run(cgroup_root: Option<&Path>) -> Vec<Outcome> {
    let mut out = vec![
        outcome("kernel version", kernel()),
        outcome("kernel BTF", btf()),
        outcome("cgroup v2", cgroup_v2(cgroup_root)),
        outcome("bpffs", bpffs()),
    ];
    let caps = capabilities();
    let caps_ok = caps.is_ok();
    out.push(outcome("capabilities", caps));
    match loader::probe_programs() {
        Ok(progs) => {
            for (name, r) in progs {
                out.push(outcome(
                    &format!("program {name} loads"),
                    r.map(|()| "ok".into()),
                ));
            }
        }
        Err(e) => out.push(outcome("eBPF object", Err(e.to_string()))),
    }
    if !caps_ok {
        // Say once why the loads failed, instead of leaving the reader to match errnos.
        out.push(outcome(
            "hint",
            Err(
                "program loads need the capabilities above; run as root or under a \
                 DaemonSet securityContext that grants them"
                    .into(),
            ),
        ));
    }
    out
}

fn outcome(name: &str, result: Result<String, String>) -> Outcome {
    Outcome {
        name: name.to_string(),
        result,
    }
}

/// Formats outcomes as `[ok]`/`[FAIL]` lines; returns the text and whether all passed.
/// The outcomes as `[ok]`/`[FAIL]` lines; `again` is the command to run after fixing.
pub fn render(outcomes: &[Outcome], again: &str) -> (String, bool) {
    let mut s = String::new();
    let mut all = true;
    for o in outcomes {
        match &o.result {
            Ok(detail) => s.push_str(&format!("[ok]   {}: {detail}\n", o.name)),
            Err(why) => {
                all = false;
                s.push_str(&format!("[FAIL] {}: {why}\n", o.name));
            }
        }
    }
    s.push_str(&if all {
        "all checks passed\n".to_string()
    } else {
        format!("some checks failed; fix the lines marked [FAIL] and run `{again}` again\n")
    });
    (s, all)
}

fn kernel() -> Result<String, String> {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map_err(|e| format!("cannot read /proc/sys/kernel/osrelease: {e}"))?;
    let release = release.trim();
    let v = parse_kernel_version(release)
        .ok_or_else(|| format!("cannot parse kernel release {release:?}"))?;
    if v >= MIN_KERNEL {
        Ok(format!(
            "{release} (>= {}.{} needed)",
            MIN_KERNEL.0, MIN_KERNEL.1
        ))
    } else {
        Err(format!(
            "kernel {release} is older than {}.{}; upgrade the node's kernel",
            MIN_KERNEL.0, MIN_KERNEL.1
        ))
    }
}

/// `6.18.44-fc-v445` → (6, 18).
pub fn parse_kernel_version(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

fn btf() -> Result<String, String> {
    let p = Path::new("/sys/kernel/btf/vmlinux");
    if p.exists() {
        Ok(format!("{} present", p.display()))
    } else {
        Err(
            "no /sys/kernel/btf/vmlinux: the kernel was built without CONFIG_DEBUG_INFO_BTF; \
             use a kernel with BTF (all major distributions ship it)"
                .into(),
        )
    }
}

fn cgroup_v2(explicit: Option<&Path>) -> Result<String, String> {
    let root = cgroup::resolve_root(explicit).map_err(|e| e.to_string())?;
    cgroup::ensure_cgroup2(&root).map_err(|e| e.to_string())?;
    Ok(format!("{} (override with --cgroup-root)", root.display()))
}

fn bpffs() -> Result<String, String> {
    let p = PathBuf::from(BPFFS);
    if fs_magic(&p) == Some(BPF_FS_MAGIC) {
        return Ok(format!("mounted at {BPFFS}"));
    }
    mount_bpffs(&p).map_err(|e| {
        format!(
            "bpffs is not mounted at {BPFFS} and mounting it failed ({e}); run \
             `mount -t bpf bpf {BPFFS}` as root"
        )
    })?;
    Ok(format!("was missing; mounted at {BPFFS}"))
}

/// Mounts bpffs at `path` (creating the folder); pinned maps and links live there.
pub fn mount_bpffs(path: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(path)?;
    let target = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: all pointers are NUL-terminated strings that outlive the call.
    let rc = unsafe {
        libc::mount(
            c"bpf".as_ptr(),
            target.as_ptr(),
            c"bpf".as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

fn fs_magic(path: &Path) -> Option<i64> {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).ok()?;
    // SAFETY: statfs fills the zeroed struct we own; the path is NUL-terminated.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    let rc = unsafe { libc::statfs(c.as_ptr(), &mut st) };
    #[allow(clippy::unnecessary_cast)] // f_type's width differs between libc targets
    (rc == 0).then_some(st.f_type as i64)
}

fn capabilities() -> Result<String, String> {
    let status = std::fs::read_to_string("/proc/self/status")
        .map_err(|e| format!("cannot read /proc/self/status: {e}"))?;
    let eff = parse_cap_eff(&status).ok_or("no CapEff line in /proc/self/status")?;
    let missing: Vec<String> = CAPS
        .iter()
        .filter(|(bit, _, _)| eff & (1u64 << bit) == 0)
        .map(|(_, name, why)| format!("{name} (to {why})"))
        .collect();
    if missing.is_empty() {
        Ok(CAPS.iter().map(|c| c.1).collect::<Vec<_>>().join(", "))
    } else {
        Err(format!(
            "missing {}; run as root or grant them in the DaemonSet's securityContext",
            missing.join(", ")
        ))
    }
}

/// The effective capability mask from a `/proc/<pid>/status` text.
pub fn parse_cap_eff(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("CapEff:"))?;
    u64::from_str_radix(line.trim_start_matches("CapEff:").trim(), 16).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_versions() {
        assert_eq!(parse_kernel_version("6.18.44-fc-v445"), Some((6, 18)));
        assert_eq!(parse_kernel_version("5.15.0-91-generic"), Some((5, 15)));
        assert_eq!(parse_kernel_version("6.1"), Some((6, 1)));
        assert_eq!(parse_kernel_version("garbage"), None);
        assert_eq!(parse_kernel_version(""), None);
        assert!(parse_kernel_version("5.4.0").expect("parses") < MIN_KERNEL);
    }

    #[test]
    fn cap_eff() {
        let s = "Name:\tx\nCapInh:\t0000000000000000\nCapEff:\t000001ffffffffff\n";
        assert_eq!(parse_cap_eff(s), Some(0x1ff_ffff_ffff));
        assert_eq!(parse_cap_eff("CapEff:\tzz\n"), None);
        assert_eq!(parse_cap_eff(""), None);
    }

    #[test]
    fn render_marks_failures() {
        let (text, ok) = render(
            &[
                outcome("a", Ok("fine".into())),
                outcome("b", Err("broken; fix it".into())),
            ],
            "mesh-daemon check",
        );
        assert!(!ok);
        assert!(text.contains("[ok]   a: fine"));
        assert!(text.contains("[FAIL] b: broken; fix it"));
        let (_, ok) = render(&[outcome("a", Ok("fine".into()))], "mesh-daemon check");
        assert!(ok);
    }
}
