//! `deploy/`: it renders with `kubectl kustomize`, passes `kubernetes-validate --strict` for
//! Kubernetes 1.29, and a real API server accepts it in a server-side dry run (through
//! tests/deploy-1.20, which drops only what 1.20 lacks). The CRD in it is the one the daemon's
//! types generate (a unit test in mesh-daemon checks that). Applied for real, `meshctl check
//! --kube` names what does not run, what passes once the controllers' part is played (all but
//! the daemons, which the kube suite runs), and a missing RBAC rule.

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

    // Applied for real, `meshctl check --kube` tells what is missing: this server has no
    // controllers or kubelets, so nothing runs yet.
    kube.kubectl_stdin(&["apply", "-f", "-"], &overlay);
    // Least privilege, as the API server's RBAC answers it: what each account may do, and what
    // it may not (the daemons read no Secrets and write nothing; the CA reads only its own).
    let sa = |name: &str| format!("--as=system:serviceaccount:nodemesh:{name}");
    for (who, verb, what, ns, want) in [
        ("nodemesh-daemon", "watch", "pods", "demo", true),
        (
            "nodemesh-daemon",
            "list",
            "endpointslices.discovery.k8s.io",
            "demo",
            true,
        ),
        (
            "nodemesh-daemon",
            "watch",
            "authorizationpolicies.nodemesh.io",
            "demo",
            true,
        ),
        ("nodemesh-daemon", "get", "secrets", "nodemesh", false),
        ("nodemesh-daemon", "update", "pods", "demo", false),
        (
            "nodemesh-daemon",
            "create",
            "tokenreviews.authentication.k8s.io",
            "",
            false,
        ),
        (
            "nodemesh-ca",
            "create",
            "tokenreviews.authentication.k8s.io",
            "",
            true,
        ),
        (
            "nodemesh-ca",
            "get",
            "secrets/nodemesh-ca-keys",
            "nodemesh",
            true,
        ),
        (
            "nodemesh-ca",
            "patch",
            "configmaps/nodemesh-trust-bundle",
            "nodemesh",
            true,
        ),
        ("nodemesh-ca", "get", "secrets/other", "nodemesh", false),
        ("nodemesh-ca", "list", "secrets", "nodemesh", false),
        (
            "nodemesh-ca",
            "patch",
            "configmaps/nodemesh-config",
            "nodemesh",
            false,
        ),
        ("nodemesh-ca", "watch", "pods", "demo", false),
    ] {
        let mut args = vec!["auth", "can-i", verb, what];
        let who_flag = sa(who);
        args.push(&who_flag);
        let ns_flag = format!("--namespace={ns}");
        if !ns.is_empty() {
            args.push(&ns_flag);
        }
        let (yes, said) = kube.kubectl_try(&args);
        assert_eq!(
            yes, want,
            "RBAC: may {who} {verb} {what} in {ns:?}? said {said:?}, want {want}"
        );
    }
    println!("RBAC: each account may do what its code needs and no more (13 answers checked)");
    let (ok, text) = kube.meshctl_check();
    println!("meshctl check --kube, nothing running:\n{text}");
    assert!(!ok, "fails while nothing runs:\n{text}");
    for want in [
        "[ok]   API server: Kubernetes v1.20",
        "[ok]   AuthorizationPolicy CRD: nodemesh.io/v1alpha1 served",
        "[ok]   Gateway API routes: HTTPRoute and GRPCRoute not installed",
        "[FAIL] CA nodemesh-ca: 0 of 1 replicas available",
        "[FAIL] trust bundle: ConfigMap nodemesh/nodemesh-trust-bundle not found",
        "[FAIL] DaemonSet nodemesh-daemon: scheduled on no node",
        "[ok]   enrolled namespaces: none yet",
        "run `meshctl check --kube` again",
    ] {
        assert!(text.contains(want), "want {want:?} in:\n{text}");
    }
    // The controllers' and the CA's part, played: the CA available and its bundle published,
    // the DaemonSet on two nodes of which one is ready, then both; a namespace enrolled.
    let status = |kind: &str, name: &str, json: &str| kube.patch_status(kind, name, json);
    status(
        "deployment",
        "nodemesh-ca",
        r#"{"status":{"replicas":1,"readyReplicas":1,"availableReplicas":1}}"#,
    );
    let root = rcgen::generate_simple_self_signed(vec!["nodemesh-ca".into()]).expect("cert");
    kube.kubectl(&[
        "create",
        "configmap",
        "-n",
        "nodemesh",
        "nodemesh-trust-bundle",
        &format!("--from-literal=bundle.pem={}", root.cert.pem()),
    ]);
    let ds = |ready: u32| {
        format!(
            r#"{{"status":{{"desiredNumberScheduled":2,"currentNumberScheduled":2,"numberMisscheduled":0,"numberReady":{ready},"updatedNumberScheduled":2,"numberAvailable":{ready}}}}}"#
        )
    };
    status("daemonset", "nodemesh-daemon", &ds(1));
    kube.kubectl(&["create", "namespace", "demo"]);
    kube.kubectl(&["label", "namespace", "demo", "nodemesh.io/mode=node"]);
    let (ok, text) = kube.meshctl_check();
    assert!(!ok, "one node not ready fails:\n{text}");
    assert!(
        text.contains("[FAIL] DaemonSet nodemesh-daemon: 1 of 2 nodes ready"),
        "{text}"
    );
    status("daemonset", "nodemesh-daemon", &ds(2));
    // Everything but the daemons themselves passes: no kubelet runs their pods here, and the
    // check reads each daemon (the kube suite runs real ones and sees the whole check pass).
    let (ok, text) = kube.meshctl_check();
    println!("meshctl check --kube, installed, controllers played:\n{text}");
    assert!(!ok, "no daemon pod, no pass:\n{text}");
    for want in [
        "[ok]   CA nodemesh-ca: 1 of 1 replicas available",
        "[ok]   trust bundle: 1 root in ConfigMap nodemesh-trust-bundle",
        "[ok]   RBAC: nodemesh-daemon may do all 16 things its code does, nodemesh-ca all 8",
        "[ok]   DaemonSet nodemesh-daemon: 2 of 2 nodes ready",
        "[FAIL] node daemons: no pod of DaemonSet nodemesh/nodemesh-daemon (app=nodemesh-daemon) exists",
        "[ok]   enrolled namespaces: demo (node)",
    ] {
        assert!(text.contains(want), "want {want:?} in:\n{text}");
    }
    assert_eq!(
        text.lines().filter(|l| l.starts_with("[FAIL]")).count(),
        1,
        "only the daemons:\n{text}"
    );
    // A rule taken away is named with the permission, the code that needs it and the fix.
    kube.kubectl(&[
        "patch",
        "clusterrole",
        "nodemesh-daemon",
        "--type=json",
        "-p",
        r#"[{"op":"remove","path":"/rules/1"}]"#,
    ]);
    let (_, text) = kube.meshctl_check();
    let want = "[FAIL] RBAC: nodemesh-daemon may not list endpointslices (discovery: endpoints); \
                nodemesh-daemon may not watch endpointslices (discovery: endpoints); `kubectl \
                apply -k deploy/` restores the rules";
    assert!(text.contains(want), "want {want:?} in:\n{text}");
    println!(
        "RBAC rule removed: {}",
        text.lines().find(|l| l.contains("RBAC")).unwrap_or("")
    );
    kube.kubectl_stdin(&["apply", "-f", "-"], &overlay);
    let (_, text) = kube.meshctl_check();
    assert!(
        text.contains("[ok]   RBAC"),
        "restored by applying deploy/:\n{text}"
    );
}
