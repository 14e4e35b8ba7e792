//! `deploy/`: it renders with `kubectl kustomize`, passes `kubernetes-validate --strict` for
//! Kubernetes 1.29, and a real API server accepts it in a server-side dry run (through
//! tests/deploy-1.20, which drops only what 1.20 lacks). The CRD in it is the one the daemon's
//! types generate (a unit test in mesh-daemon checks that).

use std::process::{Command, Stdio};

use nodemesh_tests::kube::KubeServer;

const DEPLOY: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy");
const OVERLAY: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy-1.20");

fn kustomize(dir: &str) -> String {
    let out = Command::new("kubectl")
        .args(["kustomize", dir])
        .output()
        .expect("kubectl (on these machines; `cargo xtask setup` checks)");
    assert!(
        out.status.success(),
        "kubectl kustomize {dir}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `kubernetes-validate --strict` on `yaml`: (passed, output).
fn validate(yaml: &str, version: &str) -> (bool, String) {
    let dir = std::env::temp_dir().join(format!("nm-validate-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let file = dir.join("manifests.yaml");
    std::fs::write(&file, yaml).expect("write");
    let out = Command::new("kubernetes-validate")
        .args(["--strict", "-k", version])
        .arg(&file)
        .stdin(Stdio::null())
        .output()
        .expect("kubernetes-validate (PyPI; `cargo xtask setup` installs it)");
    let _ = std::fs::remove_dir_all(&dir);
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

#[test]
fn deploy_renders_validates_and_a_real_api_server_accepts_it() {
    let rendered = kustomize(DEPLOY);
    for kind in [
        "DaemonSet",
        "Deployment",
        "CustomResourceDefinition",
        "ClusterRole",
        "ServiceAccount",
        "Service",
    ] {
        assert!(
            rendered.contains(&format!("kind: {kind}\n")),
            "deploy/ renders no {kind}"
        );
    }
    let (ok, out) = validate(&rendered, "1.29.0");
    assert!(
        ok,
        "kubernetes-validate --strict (1.29) refused deploy/:\n{out}"
    );
    println!(
        "deploy/: {} objects pass kubernetes-validate --strict for 1.29",
        out.matches("passed").count()
    );
    // The check is real: a misspelt field fails it.
    let (ok, out) = validate(
        &rendered.replacen("hostNetwork: true", "hostNetwrk: true", 1),
        "1.29.0",
    );
    assert!(!ok, "a misspelt field must fail strict validation:\n{out}");

    // A real API server: the namespace for real, then everything in a server-side dry run.
    let kube = KubeServer::start("deploy");
    kube.kubectl(&["create", "namespace", "nodemesh"]);
    let overlay = kustomize(OVERLAY);
    let out = kube.kubectl_stdin(&["apply", "--dry-run=server", "-f", "-"], &overlay);
    println!("kubectl apply --dry-run=server (Kubernetes 1.20):\n{out}");
    assert!(
        out.contains("daemonset.apps/nodemesh-daemon created (server dry run)"),
        "{out}"
    );
    assert!(out.contains("customresourcedefinition.apiextensions.k8s.io/authorizationpolicies.nodemesh.io created (server dry run)"), "{out}");
}
