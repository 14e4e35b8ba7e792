//! `meshctl check --kube`: is nodemesh installed and healthy in this cluster (what `linkerd check`
//! answers). Each check says what it found, or the cause and the command that fixes it. It reads
//! only what an operator's kubeconfig can (API discovery, Deployments, DaemonSets, ConfigMaps,
//! Namespaces, Pods), never Secrets; asks the API server whether each of nodemesh's accounts may
//! do what its code does (SubjectAccessReview); and reads each node daemon's `/ready` and
//! `/metrics` through the API server (`pods/proxy`, as `kubectl get --raw` would).

use std::time::{Duration, SystemTime};

use http_body_util::BodyExt as _;
use k8s_openapi::api::{
    apps::v1::{DaemonSet, Deployment},
    authorization::v1::{ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec},
    core::v1::{ConfigMap, Namespace, Pod},
};
use kube::{
    Api, Client,
    api::{ListParams, PostParams},
};
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
    out.push(outcome("RBAC", rbac(client, i).await));
    out.push(outcome(
        &format!("DaemonSet {}", i.daemonset),
        daemonset(client, i).await,
    ));
    out.extend(daemons(client, i).await);
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

/// One permission an account's code uses: `deploy/base/rbac.yaml` grants exactly these (its
/// comments name the same code), and the kube suite runs the daemons and the CA under it.
struct Need {
    account: &'static str,
    verb: &'static str,
    group: &'static str,
    resource: &'static str,
    /// Asked in the installation's namespace (else cluster-wide).
    in_install_namespace: bool,
    name: Option<&'static str>,
    why: &'static str,
}

const fn need(
    account: &'static str,
    verb: &'static str,
    group: &'static str,
    resource: &'static str,
    why: &'static str,
) -> Need {
    Need {
        account,
        verb,
        group,
        resource,
        in_install_namespace: false,
        name: None,
        why,
    }
}

const fn named(
    account: &'static str,
    verb: &'static str,
    resource: &'static str,
    name: Option<&'static str>,
    why: &'static str,
) -> Need {
    Need {
        account,
        verb,
        group: "",
        resource,
        in_install_namespace: true,
        name,
        why,
    }
}

const DAEMON: &str = "nodemesh-daemon";
const CA: &str = "nodemesh-ca";

/// What each account's code asks of the API server.
const NEEDS: &[Need] = &[
    need(DAEMON, "list", "", "nodes", "discovery: node addresses"),
    need(DAEMON, "watch", "", "nodes", "discovery: node addresses"),
    need(
        DAEMON,
        "list",
        "",
        "namespaces",
        "discovery: the enrollment label",
    ),
    need(
        DAEMON,
        "watch",
        "",
        "namespaces",
        "discovery: the enrollment label",
    ),
    need(
        DAEMON,
        "list",
        "",
        "pods",
        "discovery: identities and placement",
    ),
    need(
        DAEMON,
        "watch",
        "",
        "pods",
        "discovery: identities and placement",
    ),
    need(DAEMON, "list", "", "services", "discovery: VIPs and ports"),
    need(DAEMON, "watch", "", "services", "discovery: VIPs and ports"),
    need(
        DAEMON,
        "list",
        "discovery.k8s.io",
        "endpointslices",
        "discovery: endpoints",
    ),
    need(
        DAEMON,
        "watch",
        "discovery.k8s.io",
        "endpointslices",
        "discovery: endpoints",
    ),
    need(
        DAEMON,
        "list",
        "gateway.networking.k8s.io",
        "httproutes",
        "discovery: routes",
    ),
    need(
        DAEMON,
        "watch",
        "gateway.networking.k8s.io",
        "httproutes",
        "discovery: routes",
    ),
    need(
        DAEMON,
        "list",
        "gateway.networking.k8s.io",
        "grpcroutes",
        "discovery: routes",
    ),
    need(
        DAEMON,
        "watch",
        "gateway.networking.k8s.io",
        "grpcroutes",
        "discovery: routes",
    ),
    need(
        DAEMON,
        "list",
        "nodemesh.io",
        "authorizationpolicies",
        "discovery: policies",
    ),
    need(
        DAEMON,
        "watch",
        "nodemesh.io",
        "authorizationpolicies",
        "discovery: policies",
    ),
    need(
        CA,
        "create",
        "authentication.k8s.io",
        "tokenreviews",
        "whose token a node holds",
    ),
    named(CA, "get", "pods", None, "the token's daemon pod"),
    need(
        CA,
        "list",
        "",
        "pods",
        "the pods scheduled on the asking node",
    ),
    named(
        CA,
        "patch",
        "configmaps",
        Some("nodemesh-trust-bundle"),
        "publishing the trust bundle",
    ),
    // Server-side apply of a ConfigMap not there yet is authorized as create.
    named(
        CA,
        "create",
        "configmaps",
        Some("nodemesh-trust-bundle"),
        "publishing the trust bundle the first time",
    ),
    named(
        CA,
        "get",
        "secrets",
        Some("nodemesh-ca-keys"),
        "restoring its keys",
    ),
    named(
        CA,
        "patch",
        "secrets",
        Some("nodemesh-ca-keys"),
        "storing its keys after a rotation",
    ),
    named(
        CA,
        "create",
        "secrets",
        None,
        "storing its keys at first start",
    ),
];

/// Whether each of nodemesh's accounts may do what its code does, as the API server's
/// authorizer answers (SubjectAccessReview: asks, changes nothing).
async fn rbac(client: &Client, i: &Install<'_>) -> Result<String, String> {
    let reviews = Api::<SubjectAccessReview>::all(client.clone());
    let mut denied = Vec::new();
    for n in NEEDS {
        let review = SubjectAccessReview {
            spec: SubjectAccessReviewSpec {
                user: Some(format!(
                    "system:serviceaccount:{}:{}",
                    i.namespace, n.account
                )),
                groups: Some(vec![
                    "system:serviceaccounts".into(),
                    format!("system:serviceaccounts:{}", i.namespace),
                    "system:authenticated".into(),
                ]),
                resource_attributes: Some(ResourceAttributes {
                    verb: Some(n.verb.into()),
                    group: Some(n.group.into()),
                    resource: Some(n.resource.into()),
                    namespace: n.in_install_namespace.then(|| i.namespace.to_string()),
                    name: n.name.map(Into::into),
                    ..Default::default()
                }),
                ..Default::default()
            },
            ..Default::default()
        };
        let answer = reviews
            .create(&PostParams::default(), &review)
            .await
            .map_err(|e| {
                format!(
                    "cannot ask the API server (SubjectAccessReview): {}; run the check as an \
                     account that may create subjectaccessreviews (a cluster admin)",
                    super::api_error(&e)
                )
            })?;
        if !answer.status.is_some_and(|s| s.allowed) {
            let what = match n.name {
                Some(name) => format!("{} {}/{name}", n.verb, n.resource),
                None => format!("{} {}", n.verb, n.resource),
            };
            denied.push(format!("{} may not {what} ({})", n.account, n.why));
        }
    }
    if !denied.is_empty() {
        return Err(format!(
            "{}; `kubectl apply -k deploy/` restores the rules (deploy/base/rbac.yaml)",
            denied.join("; ")
        ));
    }
    let count = |a: &str| NEEDS.iter().filter(|n| n.account == a).count();
    Ok(format!(
        "{DAEMON} may do all {} things its code does, {CA} all {}",
        count(DAEMON),
        count(CA)
    ))
}

/// How far a node's clock may be from this machine's before the check fails: certificates are
/// checked against both (a few seconds is network and rounding; HTTP dates have 1 s steps).
const MAX_SKEW: Duration = Duration::from_secs(5);
/// An SVID this close to its end means renewal is failing (renewal starts at half its life).
const EXPIRY_MARGIN: Duration = Duration::from_secs(600);

/// Each node daemon, one line per node: ready (or why not), the SVIDs it holds and when the
/// first expires, its clock against this machine's — read through the API server.
async fn daemons(client: &Client, i: &Install<'_>) -> Vec<Outcome> {
    let name = "node daemons";
    let ds = match Api::<DaemonSet>::namespaced(client.clone(), i.namespace)
        .get_opt(i.daemonset)
        .await
    {
        Ok(Some(ds)) => ds,
        // The DaemonSet check above has said why.
        Ok(None) | Err(_) => return Vec::new(),
    };
    let spec = ds.spec.unwrap_or_default();
    let selector = spec
        .selector
        .match_labels
        .unwrap_or_default()
        .into_iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",");
    let port = |want: &str, default: u16| {
        spec.template
            .spec
            .as_ref()
            .into_iter()
            .flat_map(|p| &p.containers)
            .flat_map(|c| c.ports.iter().flatten())
            .find(|p| p.name.as_deref() == Some(want))
            .and_then(|p| u16::try_from(p.container_port).ok())
            .unwrap_or(default)
    };
    let (health, metrics) = (port("health", 15021), port("metrics", 15020));
    let pods = match Api::<Pod>::namespaced(client.clone(), i.namespace)
        .list(&ListParams::default().labels(&selector))
        .await
    {
        Ok(list) => list.items,
        Err(e) => {
            return vec![outcome(
                name,
                Err(format!(
                    "cannot list the DaemonSet's pods: {}",
                    super::api_error(&e)
                )),
            )];
        }
    };
    if pods.is_empty() {
        return vec![outcome(
            name,
            Err(format!(
                "no pod of DaemonSet {}/{} ({selector}) exists; `kubectl -n {0} describe \
                 ds/{1}` says why",
                i.namespace, i.daemonset
            )),
        )];
    }
    let mut out = Vec::new();
    // Pods on their way out (deleted, evicted, ended) are not the node's daemon any more.
    let pods = pods.into_iter().filter(|p| {
        p.metadata.deletion_timestamp.is_none()
            && !matches!(
                p.status.as_ref().and_then(|s| s.phase.as_deref()),
                Some("Succeeded" | "Failed")
            )
    });
    for pod in pods {
        let pod_name = pod.metadata.name.clone().unwrap_or_default();
        let node = pod
            .spec
            .as_ref()
            .and_then(|s| s.node_name.clone())
            .unwrap_or_else(|| "(not scheduled)".into());
        let check = daemon(client, i.namespace, &pod, health, metrics).await;
        out.push(outcome(
            &format!("node {node}"),
            check.map_err(|e| {
                format!(
                    "{e} (pod {0}/{pod_name}; `kubectl -n {0} logs {pod_name}`)",
                    i.namespace
                )
            }),
        ));
    }
    out
}

/// One daemon pod through `pods/proxy`.
async fn daemon(
    client: &Client,
    namespace: &str,
    pod: &Pod,
    health: u16,
    metrics: u16,
) -> Result<String, String> {
    let name = pod.metadata.name.as_deref().unwrap_or_default();
    if pod
        .status
        .as_ref()
        .and_then(|s| s.pod_ip.as_ref())
        .is_none()
    {
        return Err("the pod has no IP yet (not started)".into());
    }
    let (status, date, ready) = proxied(client, namespace, name, health, "ready").await?;
    let ready = ready.trim().to_string();
    if status != 200 {
        return Err(format!("{ready} (/ready answered {status})"));
    }
    let mut parts = vec![ready];
    if let Some(date) = date {
        let skew = skew(SystemTime::now(), date);
        if skew.abs() > MAX_SKEW.as_secs_f64() {
            return Err(format!(
                "its clock is {:.0} s {} this machine's: SVIDs and peers' certificates are \
                 checked against it; synchronise the node's clock (NTP, chrony)",
                skew.abs(),
                if skew > 0.0 { "ahead of" } else { "behind" }
            ));
        }
        parts.push(format!("clock within {:.0} s", skew.abs().max(1.0)));
    }
    let (status, _, text) = proxied(client, namespace, name, metrics, "metrics").await?;
    if status != 200 {
        return Err(format!("/metrics answered {status}: {}", text.trim()));
    }
    let (samples, _) = crate::promtext::parse(&text);
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64();
    let mut expiries: Vec<(f64, &str)> = samples
        .iter()
        .filter(|s| s.name == "nodemesh_svid_expiry_timestamp_seconds")
        .map(|s| (s.value, s.label("identity")))
        .collect();
    expiries.sort_by(|a, b| a.0.total_cmp(&b.0));
    match expiries.first() {
        None => parts.push("no SVID (no meshed pod on the node)".into()),
        Some((at, who)) if *at - now < EXPIRY_MARGIN.as_secs_f64() => {
            return Err(format!(
                "the SVID of {who} {}: renewal is failing; `meshctl identity` on the node and the \
                 CA's log say why",
                if *at <= now {
                    format!("expired {} ago", human(now - at))
                } else {
                    format!("expires in {}", human(at - now))
                }
            ));
        }
        Some((at, who)) => {
            // The node's own certificate (the operator port's) is counted apart.
            let node = expiries.iter().any(|(_, id)| id.contains("/node/"));
            let svids = expiries.len() - usize::from(node);
            parts.push(format!(
                "{svids} SVID{}{}, the first to expire in {} ({who})",
                if svids == 1 { "" } else { "s" },
                if node {
                    " and the node certificate"
                } else {
                    ""
                },
                human(at - now)
            ));
        }
    }
    Ok(parts.join("; "))
}

/// GET `/<path>` on `port` of pod `name`, through the API server: (status, the answer's Date
/// header, body). The API server's own failures (the pod cannot be reached) read as its message.
async fn proxied(
    client: &Client,
    namespace: &str,
    name: &str,
    port: u16,
    path: &str,
) -> Result<(u16, Option<SystemTime>, String), String> {
    let uri = format!("/api/v1/namespaces/{namespace}/pods/{name}:{port}/proxy/{path}");
    let req = http::Request::get(&uri)
        .body(kube::client::Body::from(Vec::new()))
        .map_err(|e| format!("bad request {uri}: {e}"))?;
    let res = tokio::time::timeout(Duration::from_secs(5), client.send(req))
        .await
        .map_err(|_| format!("no answer from port {port} within 5 s through the API server"))?
        .map_err(|e| {
            format!(
                "cannot reach port {port} through the API server: {}",
                super::api_error(&e)
            )
        })?;
    let status = res.status().as_u16();
    let date = res
        .headers()
        .get(http::header::DATE)
        .and_then(|d| d.to_str().ok())
        .and_then(|d| httpdate::parse_http_date(d).ok());
    let body = tokio::time::timeout(Duration::from_secs(5), res.into_body().collect())
        .await
        .map_err(|_| format!("port {port}'s answer did not end within 5 s"))?
        .map_err(|e| format!("port {port}'s answer broke: {e}"))?
        .to_bytes();
    // The daemon answers in text; a Status object is the API server's own failure (it cannot
    // reach the pod, or the operator may not use pods/proxy).
    if let Ok(s) =
        serde_json::from_slice::<k8s_openapi::apimachinery::pkg::apis::meta::v1::Status>(&body)
        && s.status.is_some()
    {
        let fix = if status == 403 {
            format!("run the check as an account that may get pods/proxy in {namespace}")
        } else {
            "is the daemon running?".into()
        };
        return Err(format!(
            "cannot reach its port {port} through the API server ({status}): {}; {fix}",
            s.message.unwrap_or_default()
        ));
    }
    Ok((status, date, String::from_utf8_lossy(&body).into_owned()))
}

/// How far `theirs` is ahead of `ours`, in seconds (negative: behind).
fn skew(ours: SystemTime, theirs: SystemTime) -> f64 {
    match theirs.duration_since(ours) {
        Ok(ahead) => ahead.as_secs_f64(),
        Err(behind) => -behind.duration().as_secs_f64(),
    }
}

/// A duration as an operator reads it: 23h59m, 9m30s, 12s.
fn human(secs: f64) -> String {
    let s = secs.max(0.0) as u64;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_and_skew_read_as_operators_say_them() {
        assert_eq!(human(12.4), "12s");
        assert_eq!(human(570.0), "9m30s");
        assert_eq!(human(86_340.0), "23h59m");
        assert_eq!(human(-3.0), "0s");
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000);
        assert_eq!(skew(t, t + Duration::from_secs(7)), 7.0);
        assert_eq!(skew(t, t - Duration::from_secs(7)), -7.0);
    }

    #[test]
    fn every_permission_is_one_deploy_grants() {
        // The rules file names each resource the code needs (the kube suite proves they suffice,
        // the deploy suite that the check reads them).
        let rbac = include_str!("../../../../deploy/base/rbac.yaml");
        for n in NEEDS {
            assert!(rbac.contains(n.resource), "{} not in rbac.yaml", n.resource);
            if let Some(name) = n.name {
                assert!(rbac.contains(name), "{name} not in rbac.yaml");
            }
        }
    }
}
