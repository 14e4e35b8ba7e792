//! The single-node scenario shared by the daemon suite and `cargo xtask demo`: one namespace as the
//! node, an enrolled client pod, a pod that is not enrolled, an echo server, and the real daemon.

use std::{path::PathBuf, process::Command, time::Duration};

use crate::{bin, cgroup::TestCgroup, netns::Netns, process::Proc, unique};

pub const NODE_IP: &str = "10.203.9.1";
pub const ECHO_PORT: u16 = 7000;
pub const OUTBOUND_PORT: u16 = 15001;

/// Everything the scenario made; dropping it stops the processes and removes the rest
/// (fields drop in order: processes first, then cgroups, then the namespace).
pub struct Scenario {
    pub daemon: Proc,
    pub echo: Proc,
    pub client_pod: PathBuf,
    pub stranger_pod: PathBuf,
    pub cgroups: TestCgroup,
    pub ns: Netns,
}

impl Scenario {
    pub fn start(tag: &str, sockmap: bool) -> Self {
        let ns = Netns::new(&unique(tag));
        ns.add_local_addr("nm0", &format!("{NODE_IP}/24"));
        let mut cgroups = TestCgroup::new(&unique(tag));
        let client_pod = cgroups.child("kubepods/burstable/pod-client");
        let stranger_pod = cgroups.child("kubepods/burstable/pod-stranger");

        let mut echo_cmd = Command::new(bin("mesh-app"));
        echo_cmd
            .args(["--netns", ns.name(), "echo-server"])
            .arg(format!("{NODE_IP}:{ECHO_PORT}"));
        let mut echo = Proc::spawn("echo server", echo_cmd);
        echo.wait_for("listening", Duration::from_secs(5));

        // nsenter --net changes only the network namespace, so /sys (and cgroup v2) stay visible.
        let mut d = Command::new("nsenter");
        d.arg(format!("--net={}", ns.path().display()))
            .arg(bin("mesh-daemon"))
            .arg("run")
            .arg("--cgroup-root")
            .arg(cgroups.path())
            .args(["--outbound", &format!("{NODE_IP}:{OUTBOUND_PORT}")])
            .args(["--sockmap", if sockmap { "on" } else { "off" }])
            .arg("--enroll")
            .arg(format!("{}=demo/client/client-sa", client_pod.display()))
            .env("NODEMESH_LOG", "info");
        let mut daemon = Proc::spawn("mesh-daemon", d);
        daemon.wait_for("ready", Duration::from_secs(20));
        Self {
            daemon,
            echo,
            client_pod,
            stranger_pod,
            cgroups,
            ns,
        }
    }

    /// Runs mesh-app `connect` from a pod cgroup; returns (success, its output line).
    pub fn connect_from(&self, pod: &std::path::Path, addr: &str, send: usize) -> (bool, String) {
        let send = send.to_string();
        let out = crate::mesh_app(pod, self.ns.name(), &["connect", addr, "--send", &send]);
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).trim().to_string(),
        )
    }
}
