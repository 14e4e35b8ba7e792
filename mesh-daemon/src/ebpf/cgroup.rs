//! cgroup v2: finding the unified hierarchy and naming cgroups by id.
//!
//! The mount point differs between machines (`/sys/fs/cgroup` on most nodes, a `unified` folder
//! below it on hybrid hosts), so it is read from the mount table, never assumed.

use std::{
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error(
        "cgroup v2 is not mounted (no cgroup2 entry in /proc/mounts); mount it with \
         `mount -t cgroup2 none /sys/fs/cgroup` or pass --cgroup-root"
    )]
    NotMounted,
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "{0} is not on a cgroup v2 file system; pass a folder of the unified hierarchy \
         (see `grep cgroup2 /proc/mounts`)"
    )]
    NotCgroup2(PathBuf),
}

/// The first cgroup2 mount point in a `/proc/mounts` text.
pub fn find_cgroup2_mount(mounts: &str) -> Option<PathBuf> {
    mounts.lines().find_map(|line| {
        let mut fields = line.split_whitespace();
        let (_dev, dir, fstype) = (fields.next()?, fields.next()?, fields.next()?);
        (fstype == "cgroup2").then(|| PathBuf::from(unescape_mount_path(dir)))
    })
}

/// `/proc/mounts` escapes space, tab, newline and backslash as three octal digits.
fn unescape_mount_path(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let octal = b
            .get(i + 1..i + 4)
            .filter(|d| d.iter().all(|c| (b'0'..=b'7').contains(c)));
        match octal {
            Some(d) if b[i] == b'\\' => {
                // Three octal digits fit in nine bits; /proc only ever emits values below 0o400.
                let v = d.iter().fold(0u32, |acc, c| acc * 8 + u32::from(c - b'0'));
                out.push(v as u8);
                i += 4;
            }
            _ => {
                out.push(b[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The cgroup v2 mount of this host, from `/proc/mounts`.
pub fn cgroup2_mount() -> Result<PathBuf, CgroupError> {
    let path = PathBuf::from("/proc/mounts");
    let text =
        std::fs::read_to_string(&path).map_err(|source| CgroupError::Read { path, source })?;
    find_cgroup2_mount(&text).ok_or(CgroupError::NotMounted)
}

/// The folder to attach under: `--cgroup-root` when given (checked to be cgroup v2), else the
/// host's cgroup v2 mount.
pub fn resolve_root(explicit: Option<&Path>) -> Result<PathBuf, CgroupError> {
    match explicit {
        Some(p) => {
            ensure_cgroup2(p)?;
            Ok(p.to_path_buf())
        }
        None => cgroup2_mount(),
    }
}

/// Fails unless `path` is a folder on a cgroup2 file system.
pub fn ensure_cgroup2(path: &Path) -> Result<(), CgroupError> {
    const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| CgroupError::NotCgroup2(path.to_path_buf()))?;
    // SAFETY: statfs writes into the zeroed struct we own; the path is NUL-terminated.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    let rc = unsafe { libc::statfs(c.as_ptr(), &mut st) };
    if rc != 0 {
        return Err(CgroupError::Read {
            path: path.to_path_buf(),
            source: std::io::Error::last_os_error(),
        });
    }
    #[allow(clippy::unnecessary_cast)] // f_type's width differs between libc targets
    if st.f_type as i64 != CGROUP2_SUPER_MAGIC {
        return Err(CgroupError::NotCgroup2(path.to_path_buf()));
    }
    Ok(())
}

/// A cgroup's id is the inode number of its folder on the cgroup2 file system (what
/// `bpf_get_current_ancestor_cgroup_id` returns).
pub fn cgroup_id(path: &Path) -> Result<u64, CgroupError> {
    std::fs::metadata(path)
        .map(|m| m.ino())
        .map_err(|source| CgroupError::Read {
            path: path.to_path_buf(),
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_unified_mount_on_hybrid_hosts() {
        let m = "tmpfs /sys/fs/cgroup tmpfs rw 0 0\n\
                 cgroup /sys/fs/cgroup/cpu cgroup rw,cpu 0 0\n\
                 cgroup2 /sys/fs/cgroup/unified cgroup2 rw 0 0\n";
        assert_eq!(
            find_cgroup2_mount(m),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
    }

    #[test]
    fn finds_plain_mount() {
        let m = "cgroup2 /sys/fs/cgroup cgroup2 rw,nsdelegate 0 0\n";
        assert_eq!(find_cgroup2_mount(m), Some(PathBuf::from("/sys/fs/cgroup")));
    }

    #[test]
    fn no_cgroup2_is_none() {
        let m = "cgroup /sys/fs/cgroup/cpu cgroup rw,cpu 0 0\nproc /proc proc rw 0 0\n";
        assert_eq!(find_cgroup2_mount(m), None);
        assert_eq!(find_cgroup2_mount(""), None);
        assert_eq!(find_cgroup2_mount("garbage\n\n  \n"), None);
    }

    #[test]
    fn octal_escapes_are_decoded() {
        let m = "none /mnt/my\\040cgroups cgroup2 rw 0 0\n";
        assert_eq!(
            find_cgroup2_mount(m),
            Some(PathBuf::from("/mnt/my cgroups"))
        );
        assert_eq!(unescape_mount_path("a\\134b"), "a\\b");
        assert_eq!(unescape_mount_path("trailing\\04"), "trailing\\04");
    }

    #[test]
    fn non_cgroup_folder_is_refused() {
        let err = ensure_cgroup2(Path::new("/proc")).expect_err("/proc is not cgroup2");
        assert!(err.to_string().contains("not on a cgroup v2"), "{err}");
    }
}
