//! A real Kubernetes API server for the tests: etcd and kube-apiserver on 127.0.0.1 with a static
//! admin token, service-account signing keys and an issuer (so TokenRequest and TokenReview work),
//! and a kubeconfig. Both processes stop, and their folder is removed, when the guard drops.
//!
//! The binaries come from `ETCD_BIN` / `KUBE_APISERVER_BIN`, else from where `cargo xtask setup`
//! put them (etcd from Debian; kube-apiserver built once from Debian's source package and cached
//! outside the repository). No kubelet, scheduler or controller-manager runs: the tests play
//! kubelet themselves (Node objects, pod status, namespaces and cgroups).

use std::{
    net::TcpListener,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use crate::process::Proc;

/// Where `cargo xtask setup` caches the API server it builds (xtask/src/kube.rs has the same).
pub const APISERVER_CACHE: &str = "/var/cache/nodemesh/kube-apiserver-v1.20.2/kube-apiserver";
/// The admin's static bearer token (the token file's only entry).
pub const ADMIN_TOKEN: &str = "nodemesh-test-admin";
/// The audience the API server accepts for itself (the CA's, `nodemesh-ca`, is not one: a token
/// for the CA is no API credential, and the CA asks TokenReview for its own audience).
pub const AUDIENCES: &str = "https://kubernetes.default.svc";

fn binary(env: &str, default: &str) -> PathBuf {
    let p = std::env::var_os(env).map_or_else(|| PathBuf::from(default), PathBuf::from);
    assert!(
        p.is_file(),
        "{} not found; run `cargo xtask setup` (it installs etcd and builds kube-apiserver once), \
         or point {env} at one",
        p.display()
    );
    p
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

/// A running etcd + kube-apiserver.
pub struct KubeServer {
    dir: PathBuf,
    /// The network namespace both run in (None: this process's), and the API server's address.
    netns: Option<PathBuf>,
    addr: String,
    etcd: Option<Proc>,
    apiserver: Option<Proc>,
    port: u16,
    etcd_port: u16,
    pub kubeconfig: PathBuf,
}

impl KubeServer {
    /// Starts both on 127.0.0.1 and waits (up to 60 s) until the API server is ready.
    pub fn start(tag: &str) -> Self {
        Self::start_in(tag, None, "127.0.0.1")
    }

    /// Starts both inside network namespace `netns` (a test topology's fabric, so its nodes reach
    /// the API server), the API server on `addr`.
    pub fn start_in(tag: &str, netns: Option<&Path>, addr: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("nodemesh-kube-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("kube dir");
        // The service-account signing key (ECDSA P-256) and its public half.
        let key = rcgen::KeyPair::generate().expect("key");
        std::fs::write(dir.join("sa.key"), key.serialize_pem()).expect("sa.key");
        std::fs::write(dir.join("sa.pub"), key.public_key_pem()).expect("sa.pub");
        std::fs::write(
            dir.join("tokens.csv"),
            format!("{ADMIN_TOKEN},admin,admin-uid,\"system:masters\"\n"),
        )
        .expect("tokens.csv");
        let mut s = Self {
            kubeconfig: dir.join("kubeconfig"),
            dir,
            netns: netns.map(Path::to_path_buf),
            addr: addr.to_string(),
            etcd: None,
            apiserver: None,
            port: free_port(),
            etcd_port: free_port(),
        };
        s.start_etcd();
        s.start_apiserver();
        s.write_kubeconfig();
        s
    }

    pub fn url(&self) -> String {
        format!("https://{}:{}", self.addr, self.port)
    }

    /// `program`, run in the server's network namespace.
    fn command(&self, program: &Path) -> Command {
        match &self.netns {
            Some(ns) => {
                let mut c = Command::new("nsenter");
                c.arg(format!("--net={}", ns.display())).arg(program);
                c
            }
            None => Command::new(program),
        }
    }

    fn start_etcd(&mut self) {
        let etcd = binary("ETCD_BIN", "/usr/bin/etcd");
        let client = format!("http://127.0.0.1:{}", self.etcd_port);
        let mut cmd = self.command(&etcd);
        cmd.arg("--data-dir")
            .arg(self.dir.join("etcd"))
            .args([
                "--listen-client-urls",
                &client,
                "--advertise-client-urls",
                &client,
            ])
            .args([
                "--listen-peer-urls",
                &format!("http://127.0.0.1:{}", free_port()),
            ])
            .args(["--log-level", "warn"]);
        self.etcd = Some(Proc::spawn("etcd", cmd));
    }

    /// Starts the API server and waits until it serves.
    pub fn start_apiserver(&mut self) {
        let bin = binary("KUBE_APISERVER_BIN", APISERVER_CACHE);
        let key = self.dir.join("sa.key");
        let mut cmd = self.command(&bin);
        cmd.args([
            "--etcd-servers",
            &format!("http://127.0.0.1:{}", self.etcd_port),
        ])
        .args([
            "--bind-address",
            &self.addr,
            "--advertise-address",
            &self.addr,
        ])
        .args([
            "--secure-port",
            &self.port.to_string(),
            "--insecure-port",
            "0",
        ])
        .arg("--cert-dir")
        .arg(self.dir.join("certs"))
        .arg("--token-auth-file")
        .arg(self.dir.join("tokens.csv"))
        .arg("--service-account-key-file")
        .arg(self.dir.join("sa.pub"))
        .arg("--service-account-signing-key-file")
        .arg(&key)
        .args(["--service-account-issuer", "https://kubernetes.default.svc"])
        .args(["--api-audiences", AUDIENCES])
        .args(["--authorization-mode", "RBAC"])
        // No controller-manager creates service-account tokens for pods here.
        .args(["--disable-admission-plugins", "ServiceAccount"])
        .args(["--endpoint-reconciler-type", "none"])
        .args(["--service-cluster-ip-range", "10.96.0.0/16"])
        .args(["-v", "0"]);
        self.apiserver = Some(Proc::spawn("kube-apiserver", cmd));
        self.wait_ready();
    }

    /// Until `/readyz` answers 200 (60 s at most; panics with the server's last lines).
    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let ok = self
                .command(Path::new("curl"))
                .args(["-skf", "-o", "/dev/null", "-H"])
                .arg(format!("Authorization: Bearer {ADMIN_TOKEN}"))
                .arg(format!("{}/readyz", self.url()))
                .status()
                .is_ok_and(|s| s.success());
            if ok {
                return;
            }
            let exited = self.apiserver.as_mut().is_none_or(Proc::has_exited);
            if exited || Instant::now() > deadline {
                let lines = self
                    .apiserver
                    .as_ref()
                    .map(|p| p.lines().join("\n"))
                    .unwrap_or_default();
                let tail: Vec<&str> = lines.lines().rev().take(30).collect();
                panic!(
                    "kube-apiserver did not become ready (exited: {exited}); its last lines:\n{}",
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn write_kubeconfig(&self) {
        self.write_kubeconfig_with(&self.kubeconfig, ADMIN_TOKEN);
    }

    fn write_kubeconfig_with(&self, path: &Path, token: &str) {
        // The server's self-signed serving certificate (written at its start) is the CA to trust.
        let cert = std::fs::read(self.dir.join("certs/apiserver.crt")).expect("apiserver.crt");
        let ca = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, cert);
        std::fs::write(
            path,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster:\n    server: {}\n    \
                 certificate-authority-data: {ca}\nusers:\n- name: user\n  user:\n    token: {token}\n\
                 contexts:\n- name: test\n  context: {{cluster: test, user: user}}\ncurrent-context: test\n",
                self.url()
            ),
        )
        .expect("kubeconfig");
    }

    /// A kubeconfig that speaks as service account `namespace/name` (a TokenRequest token for
    /// the API server's audience, as a pod's own token is): what it may do is what RBAC grants
    /// that account.
    pub fn kubeconfig_as(&self, namespace: &str, name: &str) -> PathBuf {
        let token = self.kubectl(&["create", "token", name, "-n", namespace, "--duration", "2h"]);
        let path = self.dir.join(format!("kubeconfig-{namespace}-{name}"));
        self.write_kubeconfig_with(&path, token.trim());
        path
    }

    /// Stops the API server (etcd keeps the data) and starts it again on the same port.
    pub fn restart_apiserver(&mut self, down_for: Duration) {
        self.apiserver = None;
        std::thread::sleep(down_for);
        self.start_apiserver();
    }

    /// Stops the API server (etcd keeps the objects); `start_apiserver` brings it back.
    pub fn stop_apiserver(&mut self) {
        self.apiserver = None;
    }

    /// `kubectl` against this server; panics with its output unless it succeeds.
    pub fn kubectl(&self, args: &[&str]) -> String {
        self.kubectl_stdin(args, "")
    }

    /// `kubectl` with `input` on standard input (`apply -f -`).
    pub fn kubectl_stdin(&self, args: &[&str], input: &str) -> String {
        use std::io::Write as _;
        let mut child = self
            .command(Path::new("kubectl"))
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .args(args)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("kubectl (installed on these machines; `apt-get install kubectl` elsewhere)");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(input.as_bytes())
            .expect("kubectl stdin");
        let out = child.wait_with_output().expect("kubectl");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success(),
            "kubectl {} failed: {}{err}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Sets an object's status in namespace `nodemesh` (the controllers' part, played).
    pub fn patch_status(&self, kind: &str, name: &str, json: &str) {
        self.kubectl(&[
            "patch",
            kind,
            "-n",
            "nodemesh",
            name,
            "--subresource=status",
            "--type=merge",
            "-p",
            json,
        ]);
    }

    /// `meshctl check --kube` with the admin kubeconfig, from where the server listens:
    /// (passed, output).
    pub fn meshctl_check(&self) -> (bool, String) {
        let out = self
            .command(&crate::bin("meshctl"))
            .args(["check", "--kube", "--kubeconfig"])
            .arg(&self.kubeconfig)
            .output()
            .expect("meshctl runs");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr),
        )
    }

    /// `kubectl` that may fail (`auth can-i` answers "no" with exit 1): (success, stdout).
    pub fn kubectl_try(&self, args: &[&str]) -> (bool, String) {
        let out = self
            .command(Path::new("kubectl"))
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .args(args)
            .output()
            .expect("kubectl");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).trim().to_string(),
        )
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for KubeServer {
    fn drop(&mut self) {
        self.apiserver = None;
        self.etcd = None;
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
