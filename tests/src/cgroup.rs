//! cgroup v2 folders for test pods.

use std::path::{Path, PathBuf};

/// A cgroup folder created for a test (under the host's cgroup v2 mount, found from
/// /proc/mounts) and removed on drop, killing anything still inside.
pub struct TestCgroup {
    path: PathBuf,
    children: Vec<PathBuf>,
}

impl TestCgroup {
    pub fn new(name: &str) -> Self {
        let mount = mesh_daemon::ebpf::cgroup::cgroup2_mount()
            .unwrap_or_else(|e| panic!("test needs cgroup v2: {e}"));
        let path = mount.join(name);
        if path.exists() {
            // Left over from a killed run: clear it first.
            drop(Self {
                path: path.clone(),
                children: list_children(&path),
            });
        }
        std::fs::create_dir(&path)
            .unwrap_or_else(|e| panic!("cannot create cgroup {}: {e}", path.display()));
        Self {
            path,
            children: Vec::new(),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A cgroup below this one, at any depth (`"kubepods/burstable/pod-x"`, or a container folder
    /// below a pod, as kubelet lays them out); every folder made is removed on drop.
    pub fn child(&mut self, rel: &str) -> PathBuf {
        let p = self.path.join(rel);
        std::fs::create_dir_all(&p)
            .unwrap_or_else(|e| panic!("cannot create cgroup {}: {e}", p.display()));
        let mut cur = p.clone();
        while cur != self.path {
            if !self.children.contains(&cur) {
                self.children.push(cur.clone());
            }
            cur = cur.parent().expect("child is below root").to_path_buf();
        }
        p
    }

    pub fn id_of(path: &Path) -> u64 {
        mesh_daemon::ebpf::cgroup::cgroup_id(path).expect("cgroup id")
    }
}

fn list_children(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        if let Ok(rd) = std::fs::read_dir(&d) {
            for e in rd.flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    out.push(e.path());
                    stack.push(e.path());
                }
            }
        }
    }
    out
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        // cgroup.kill (5.14+) ends every process in the subtree; then remove deepest first.
        let _ = std::fs::write(self.path.join("cgroup.kill"), "1");
        let mut all = self.children.clone();
        all.extend(list_children(&self.path));
        all.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
        all.dedup();
        for p in all.iter().chain(std::iter::once(&self.path)) {
            for _ in 0..50 {
                match std::fs::remove_dir(p) {
                    Ok(()) => break,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => break,
                    // EBUSY while killed processes are still exiting.
                    Err(_) => std::thread::sleep(std::time::Duration::from_millis(20)),
                }
            }
        }
    }
}

/// Makes `cmd`'s process join `cgroup` between fork and exec, so it is inside from its first
/// instruction (as a container's processes are).
pub fn join_on_exec(cmd: &mut std::process::Command, cgroup: &Path) {
    use std::os::{unix::ffi::OsStrExt, unix::process::CommandExt};
    let procs = std::ffi::CString::new(cgroup.join("cgroup.procs").as_os_str().as_bytes())
        .expect("cgroup path without NUL");
    // SAFETY: between fork and exec only async-signal-safe calls run: open, write, close on a
    // path prepared before the fork.
    unsafe {
        cmd.pre_exec(move || {
            let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            // "0": the writing process itself.
            let n = libc::write(fd, b"0".as_ptr().cast(), 1);
            let err = std::io::Error::last_os_error();
            libc::close(fd);
            if n != 1 {
                return Err(err);
            }
            Ok(())
        });
    }
}
