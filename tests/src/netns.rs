//! Network namespaces for test nodes and pods.

use std::{fs::File, os::fd::AsRawFd, path::PathBuf};

use crate::sh;

/// A named network namespace (`ip netns add`), deleted on drop with everything inside it.
pub struct Netns {
    name: String,
}

impl Netns {
    pub fn new(name: &str) -> Self {
        if PathBuf::from("/run/netns").join(name).exists() {
            let _ = std::process::Command::new("ip")
                .args(["netns", "del", name])
                .status();
        }
        sh("ip", &["netns", "add", name]);
        let ns = Self {
            name: name.to_string(),
        };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.name)
    }

    /// `ip -n <ns> …`
    pub fn ip(&self, args: &[&str]) -> String {
        let mut a = vec!["-n", self.name.as_str()];
        a.extend_from_slice(args);
        sh("ip", &a)
    }

    /// Adds an interface holding `cidr` (e.g. "10.203.0.1/24"). It is a veth pair with both ends
    /// in this namespace, because some kernels (this project's CI among them) lack the dummy
    /// driver.
    pub fn add_local_addr(&self, ifname: &str, cidr: &str) {
        let peer = format!("{ifname}p");
        self.ip(&["link", "add", ifname, "type", "veth", "peer", "name", &peer]);
        self.ip(&["addr", "add", cidr, "dev", ifname]);
        self.ip(&["link", "set", ifname, "up"]);
        self.ip(&["link", "set", &peer, "up"]);
    }

    /// Runs `f` on a new thread inside this namespace (sockets it creates live here).
    pub fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> std::thread::JoinHandle<T> {
        let path = self.path();
        std::thread::spawn(move || {
            enter(&path);
            f()
        })
    }
}

/// Moves the calling thread into the network namespace at `path`.
pub fn enter(path: &std::path::Path) {
    let f = File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    // SAFETY: setns on a valid namespace fd; affects only the calling thread.
    let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(
        rc,
        0,
        "setns {}: {}",
        path.display(),
        std::io::Error::last_os_error()
    );
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}
