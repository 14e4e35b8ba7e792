//! `meshctl check --kube`: is nodemesh installed and healthy in this cluster (what `linkerd check`
//! answers). Each check says what it found, or the cause and the command that fixes it. It reads
//! only what an operator's kubeconfig can (API discovery, Deployments, DaemonSets, ConfigMaps,
//! Namespaces), never Secrets.

use k8s_openapi::api::{
    apps::v1::{DaemonSet, Deployment},
    core::v1::{ConfigMap, Namespace},
};
use kube::{Api, Client, api::ListParams};
use rustls::pki_types::{CertificateDer, pem::PemObject as _};

use crate::check::Outcome;

/// Names in the installation (deploy/ uses these).
pub struct Install<'a> {
    pub namespace: &'a str,
    pub ca: &'a str,
    pub daemonset: &'a str,
    pub bundle: &'a str,
}

impl Default for Install<'static> {
    fn default() -> Self {
        Self {
            namespace: "nodemesh",
            ca: "nodemesh-ca",
            daemonset: "nodemesh-daemon",
            bundle: "nodemesh-trust-bundle",
        }
    }
}

fn outcome(name: &str, result: Result<String, String>) -> Outcome {
    Outcome {
        name: name.into(),
        result,
    }
}

/// Runs every check against the cluster `client` talks to.
pub async fn run(client: &Client, i: &Install<'_>) -> Vec<Outcome> {
    let mut out = Vec::new();
    match client.apiserver_version().await {
        Ok(v) => out.push(outcome(
            "API server",
            Ok(format!("Kubernetes {}", v.git_version)),
        )),
        Err(e) => {
            out.push(outcome(
                "API server",
                Err(format!(
                    "cannot reach it: {e}; check the kubeconfig (--kubeconfig, $KUBECONFIG) and \
                     that the cluster is up"
                )),
            ));
            // Nothing else can be answered.
            return out;
        }
    }
    out.push(outcome(
        "AuthorizationPolicy CRD",
        match super::served(client, "nodemesh.io/v1alpha1", "authorizationpolicies").await {
            Ok(true) => Ok("nodemesh.io/v1alpha1 served".into()),
            Ok(false) => Err("not installed; run `kubectl apply -k deploy/`".into()),
            Err(e) => Err(e),
        },
    ));
    let route = |gv: &'static str, plural: &'static str| super::served(client, gv, plural);
    out.push(outcome(
        "Gateway API routes",
        match (
            route("gateway.networking.k8s.io/v1", "httproutes").await,
            route("gateway.networking.k8s.io/v1", "grpcroutes").await,
        ) {
            (Ok(true), Ok(true)) => Ok("HTTPRoute and GRPCRoute served".into()),
            (Ok(h), Ok(g)) => {
                let missing: Vec<&str> = [(h, "HTTPRoute"), (g, "GRPCRoute")]
                    .into_iter()
                    .filter(|(served, _)| !served)
                    .map(|(_, k)| k)
                    .collect();
                // Optional: the mesh runs without routes. Said, but not a failure.
                Ok(format!(
                    "{} not installed: the daemons read no such routes (install the Gateway API \
                     CRDs, deploy/README.md; then restart the daemons)",
                    missing.join(" and ")
                ))
            }
            (Err(e), _) | (_, Err(e)) => Err(e),
        },
    ));
    let namespaces = Api::<Namespace>::all(client.clone());
    match namespaces.get_opt(i.namespace).await {
        Ok(Some(_)) => out.push(outcome(
            &format!("namespace {}", i.namespace),
            Ok("exists".into()),
        )),
        Ok(None) => {
            out.push(outcome(
                &format!("namespace {}", i.namespace),
                Err("not found; run `kubectl apply -k deploy/` (or pass --namespace)".into()),
            ));
            return out;
        }
        Err(e) => out.push(outcome(
            &format!("namespace {}", i.namespace),
            Err(format!("cannot read it: {e}")),
        )),
    }
    out.push(outcome(&format!("CA {}", i.ca), ca(client, i).await));
    out.push(outcome("trust bundle", bundle(client, i).await));
    out.push(outcome(
        &format!("DaemonSet {}", i.daemonset),
        daemonset(client, i).await,
    ));
    out.push(outcome(
        "enrolled namespaces",
        match namespaces
            .list(&ListParams::default().labels(super::model::MODE_LABEL))
            .await
        {
            Ok(list) => {
                let mut names: Vec<String> = list
                    .items
                    .iter()
                    .filter_map(|n| {
                        let mode = n.metadata.labels.as_ref()?.get(super::model::MODE_LABEL)?;
                        let name = n.metadata.name.as_deref()?;
                        (mode != "disabled").then(|| format!("{name} ({mode})"))
                    })
                    .collect();
                names.sort();
                if names.is_empty() {
                    Ok(format!(
                        "none yet: `kubectl label namespace <ns> {}=node` meshes its pods from \
                         their next connection",
                        super::model::MODE_LABEL
                    ))
                } else {
                    Ok(names.join(", "))
                }
            }
            Err(e) => Err(format!("cannot list namespaces: {e}")),
        },
    ));
    out
}

async fn ca(client: &Client, i: &Install<'_>) -> Result<String, String> {
    let d = Api::<Deployment>::namespaced(client.clone(), i.namespace)
        .get_opt(i.ca)
        .await
        .map_err(|e| format!("cannot read Deployment {}/{}: {e}", i.namespace, i.ca))?
        .ok_or_else(|| {
            format!(
                "Deployment {}/{} not found; run `kubectl apply -k deploy/`",
                i.namespace, i.ca
            )
        })?;
    let want = d.spec.and_then(|s| s.replicas).unwrap_or(1);
    let available = d.status.and_then(|s| s.available_replicas).unwrap_or(0);
    if available < 1 {
        return Err(format!(
            "0 of {want} replicas available: no daemon can get an SVID; see `kubectl -n {0} \
             describe deploy/{1}` and `kubectl -n {0} logs deploy/{1}`",
            i.namespace, i.ca
        ));
    }
    Ok(format!("{available} of {want} replicas available"))
}

async fn bundle(client: &Client, i: &Install<'_>) -> Result<String, String> {
    let cm = Api::<ConfigMap>::namespaced(client.clone(), i.namespace)
        .get_opt(i.bundle)
        .await
        .map_err(|e| format!("cannot read ConfigMap {}/{}: {e}", i.namespace, i.bundle))?
        .ok_or_else(|| {
            format!(
                "ConfigMap {}/{} not found: the CA publishes it at start; is the CA running (see \
                 above)?",
                i.namespace, i.bundle
            )
        })?;
    let pem = cm
        .data
        .and_then(|d| d.get("bundle.pem").cloned())
        .unwrap_or_default();
    let roots = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| {
            format!(
                "ConfigMap {}/{} key bundle.pem is not PEM ({e}); delete it and the CA \
                 republishes it",
                i.namespace, i.bundle
            )
        })?;
    if roots.is_empty() {
        return Err(format!(
            "ConfigMap {}/{} holds no certificate under bundle.pem; delete it and the CA \
             republishes it",
            i.namespace, i.bundle
        ));
    }
    Ok(format!(
        "{} root{} in ConfigMap {}",
        roots.len(),
        if roots.len() == 1 { "" } else { "s" },
        i.bundle
    ))
}

async fn daemonset(client: &Client, i: &Install<'_>) -> Result<String, String> {
    let ds = Api::<DaemonSet>::namespaced(client.clone(), i.namespace)
        .get_opt(i.daemonset)
        .await
        .map_err(|e| format!("cannot read DaemonSet {}/{}: {e}", i.namespace, i.daemonset))?
        .ok_or_else(|| {
            format!(
                "DaemonSet {}/{} not found; run `kubectl apply -k deploy/`",
                i.namespace, i.daemonset
            )
        })?;
    let s = ds.status.unwrap_or_default();
    let (want, ready) = (s.desired_number_scheduled, s.number_ready);
    let updated = s.updated_number_scheduled.unwrap_or(0);
    if want == 0 {
        return Err(format!(
            "scheduled on no node: check its nodeSelector and tolerations (`kubectl -n {} \
             describe ds/{}`)",
            i.namespace, i.daemonset
        ));
    }
    if ready < want {
        return Err(format!(
            "{ready} of {want} nodes ready: the others' pods are not meshed; `kubectl -n {0} get \
             pods -l app=nodemesh-daemon -o wide` shows which, and `mesh-daemon check` in the \
             init container's log says why a node cannot run it",
            i.namespace
        ));
    }
    let rolling = if updated < want {
        format!(", {updated} updated (a rollout is in progress)")
    } else {
        String::new()
    };
    Ok(format!("{ready} of {want} nodes ready{rolling}"))
}
