//! The CA's placement in Kubernetes (`mesh-daemon ca serve --discovery kube`): who is asking,
//! and which identities run on its node, both from the API server.
//!
//! A node daemon presents its projected, audience-bound service-account token. The CA asks the
//! TokenReview API whether it is valid for the CA's audience; the token must belong to the
//! daemon's service account and be bound to a pod (Kubernetes puts the pod's name and uid in the
//! review's `extra`). That pod must exist with the same uid, run as the daemon's service account
//! and be scheduled on a node: that node is the caller. It may then get SVIDs only for
//! identities (namespace, service account) of pods scheduled on that same node, read from the
//! API server at each request — never from what the caller says.

use std::collections::{BTreeMap, HashSet};

use hyper::StatusCode;
use k8s_openapi::{
    ByteString,
    api::{
        authentication::v1::{TokenReview, TokenReviewSpec},
        core::v1::{Pod, Secret},
    },
};

use kube::{
    Api, Client,
    api::{ListParams, PostParams},
};

const POD_NAME: &str = "authentication.kubernetes.io/pod-name";
const POD_UID: &str = "authentication.kubernetes.io/pod-uid";

#[derive(Clone)]
pub struct KubePlacement {
    client: Client,
    /// The audience daemon tokens must be issued for (the projected volume's `audience`).
    audience: String,
    /// The daemon's service account, `namespace/name`.
    daemon_namespace: String,
    daemon_account: String,
}

impl std::fmt::Debug for KubePlacement {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubePlacement")
            .field("audience", &self.audience)
            .field(
                "daemon",
                &format!("{}/{}", self.daemon_namespace, self.daemon_account),
            )
            .finish()
    }
}

use super::Refusal;
use crate::discovery::kube::api_error;

fn key_secret(name: &str, material: &BTreeMap<String, String>) -> Secret {
    Secret {
        metadata: kube::api::ObjectMeta {
            name: Some(name.into()),
            labels: Some([("app.kubernetes.io/part-of".into(), "nodemesh".into())].into()),
            ..Default::default()
        },
        type_: Some("Opaque".into()),
        data: Some(
            material
                .iter()
                .map(|(k, v)| (k.clone(), ByteString(v.clone().into_bytes())))
                .collect(),
        ),
        ..Default::default()
    }
}

fn refuse(status: StatusCode, label: &'static str, reason: String) -> Refusal {
    Refusal {
        status,
        label,
        reason,
    }
}

impl KubePlacement {
    /// `daemon_account` is `namespace/name`.
    pub fn new(client: Client, audience: String, daemon_account: &str) -> Result<Self, String> {
        let (ns, name) = daemon_account
            .split_once('/')
            .filter(|(n, a)| !n.is_empty() && !a.is_empty() && !a.contains('/'))
            .ok_or_else(|| {
                format!(
                    "--daemon-service-account {daemon_account:?} is not namespace/name (e.g. \
                     nodemesh/nodemesh-daemon)"
                )
            })?;
        Ok(Self {
            client,
            audience,
            daemon_namespace: ns.into(),
            daemon_account: name.into(),
        })
    }

    /// Publishes the trust bundle (PEM) in ConfigMap `name` of the daemons' namespace, key
    /// `bundle.pem`, by server-side apply: daemons mount it as their `--ca-bundle`.
    pub async fn publish_bundle(&self, name: &str, pem: &str) -> Result<(), String> {
        use k8s_openapi::api::core::v1::ConfigMap;
        let cm = ConfigMap {
            metadata: kube::api::ObjectMeta {
                name: Some(name.into()),
                namespace: Some(self.daemon_namespace.clone()),
                ..Default::default()
            },
            data: Some([("bundle.pem".to_string(), pem.to_string())].into()),
            ..Default::default()
        };
        Api::<ConfigMap>::namespaced(self.client.clone(), &self.daemon_namespace)
            .patch(
                name,
                &kube::api::PatchParams::apply("nodemesh-ca").force(),
                &kube::api::Patch::Apply(&cm),
            )
            .await
            .map(drop)
            .map_err(|e| {
                format!(
                    "cannot publish the trust bundle in ConfigMap {}/{name}: {}",
                    self.daemon_namespace,
                    api_error(&e)
                )
            })
    }

    /// The key material kept in Secret `name` (in the CA's namespace), by key; None when the
    /// Secret does not exist.
    pub async fn read_keys(&self, name: &str) -> Result<Option<BTreeMap<String, String>>, String> {
        let what = format!("Secret {}/{name}", self.daemon_namespace);
        let Some(secret) = Api::<Secret>::namespaced(self.client.clone(), &self.daemon_namespace)
            .get_opt(name)
            .await
            .map_err(|e| format!("cannot read {what}: {}", api_error(&e)))?
        else {
            return Ok(None);
        };
        let mut material = BTreeMap::new();
        for (k, v) in secret.data.unwrap_or_default() {
            let text =
                String::from_utf8(v.0).map_err(|_| format!("{what}: key {k} is not PEM text"))?;
            material.insert(k, text);
        }
        Ok(Some(material))
    }

    /// Creates Secret `name` with `material`; Ok(false) when it exists already (another CA
    /// replica stored its keys first).
    pub async fn create_keys(
        &self,
        name: &str,
        material: &BTreeMap<String, String>,
    ) -> Result<bool, String> {
        match Api::<Secret>::namespaced(self.client.clone(), &self.daemon_namespace)
            .create(&PostParams::default(), &key_secret(name, material))
            .await
        {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
            Err(e) => Err(format!(
                "cannot create Secret {}/{name}: {}",
                self.daemon_namespace,
                api_error(&e)
            )),
        }
    }

    /// Stores the folder's key material in Secret `name` (after a root rotation in the folder).
    pub async fn store_keys(
        &self,
        name: &str,
        material: &BTreeMap<String, String>,
    ) -> Result<(), String> {
        Api::<Secret>::namespaced(self.client.clone(), &self.daemon_namespace)
            .patch(
                name,
                &kube::api::PatchParams::apply("nodemesh-ca").force(),
                &kube::api::Patch::Apply(&key_secret(name, material)),
            )
            .await
            .map(drop)
            .map_err(|e| {
                format!(
                    "cannot store the CA's keys in Secret {}/{name}: {}",
                    self.daemon_namespace,
                    api_error(&e)
                )
            })
    }

    /// The node whose daemon holds `token`.
    pub async fn node_of(&self, token: &str) -> Result<String, Refusal> {
        let unauth = |reason: String| refuse(StatusCode::UNAUTHORIZED, "unauthenticated", reason);
        let unavailable = |reason: String| refuse(StatusCode::SERVICE_UNAVAILABLE, "error", reason);
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.to_string()),
                audiences: Some(vec![self.audience.clone()]),
            },
            ..Default::default()
        };
        let answer = Api::<TokenReview>::all(self.client.clone())
            .create(&PostParams::default(), &review)
            .await
            .map_err(|e| {
                unavailable(format!(
                    "TokenReview failed: {}; is the API server up?",
                    api_error(&e)
                ))
            })?;
        let status = answer.status.unwrap_or_default();
        // An authenticator that ignores the requested audiences (a webhook, an old server) may
        // say yes for any token: the answer must name the CA's audience itself.
        let audience_ok = status
            .audiences
            .as_ref()
            .is_some_and(|a| a.contains(&self.audience));
        if status.authenticated == Some(true) && !audience_ok {
            return Err(unauth(format!(
                "the token is not issued for audience {:?} (the review names {:?}); mount a \
                 projected token with that audience",
                self.audience,
                status.audiences.unwrap_or_default()
            )));
        }
        if status.authenticated != Some(true) {
            return Err(unauth(format!(
                "the token is not valid for audience {:?}: {}",
                self.audience,
                status
                    .error
                    .unwrap_or_else(|| "expired, revoked or for another audience".into())
            )));
        }
        let user = status.user.unwrap_or_default();
        let want = format!(
            "system:serviceaccount:{}:{}",
            self.daemon_namespace, self.daemon_account
        );
        let username = user.username.unwrap_or_default();
        if username != want {
            return Err(unauth(format!(
                "the token is {username:?}'s; only the node daemon's service account ({want}) \
                 may ask for SVIDs"
            )));
        }
        let extra = user.extra.unwrap_or_default();
        let first = |k: &str| extra.get(k).and_then(|v| v.first()).cloned();
        let (Some(pod_name), Some(pod_uid)) = (first(POD_NAME), first(POD_UID)) else {
            return Err(unauth(
                "the token is not bound to a pod; mount a projected service-account token in \
                 the daemon's pod (deploy/ does)"
                    .into(),
            ));
        };
        let pod = Api::<Pod>::namespaced(self.client.clone(), &self.daemon_namespace)
            .get_opt(&pod_name)
            .await
            .map_err(|e| unavailable(format!("cannot read pod {pod_name}: {}", api_error(&e))))?
            .ok_or_else(|| unauth(format!("the token's pod {pod_name} no longer exists")))?;
        let ended = matches!(
            pod.status.as_ref().and_then(|s| s.phase.as_deref()),
            Some("Succeeded" | "Failed")
        );
        if pod.metadata.deletion_timestamp.is_some() || ended {
            return Err(unauth(format!(
                "the token's pod {pod_name} is terminating or has ended; its token no longer \
                 speaks for a node"
            )));
        }
        if pod.metadata.uid.as_deref() != Some(pod_uid.as_str()) {
            return Err(unauth(format!(
                "the token's pod {pod_name} was replaced (uid differs); the token is stale"
            )));
        }
        let spec = pod.spec.unwrap_or_default();
        if spec.service_account_name.as_deref() != Some(self.daemon_account.as_str()) {
            return Err(unauth(format!(
                "pod {pod_name} does not run as {}",
                self.daemon_account
            )));
        }
        spec.node_name.filter(|n| !n.is_empty()).ok_or_else(|| {
            unauth(format!(
                "the token's pod {pod_name} is not scheduled on a node"
            ))
        })
    }

    /// (namespace, service account) of every pod scheduled on `node` that has not ended.
    pub async fn identities_on(&self, node: &str) -> Result<HashSet<(String, String)>, Refusal> {
        let pods = Api::<Pod>::all(self.client.clone())
            .list(&ListParams::default().fields(&format!("spec.nodeName={node}")))
            .await
            .map_err(|e| {
                refuse(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "error",
                    format!("cannot list the pods of node {node}: {}", api_error(&e)),
                )
            })?;
        Ok(pods
            .items
            .into_iter()
            .filter(|p| {
                !matches!(
                    p.status.as_ref().and_then(|s| s.phase.as_deref()),
                    Some("Succeeded" | "Failed")
                )
            })
            // A mirror (static) pod is the kubelet's own say-so and runs with no service
            // account: a compromised node could make one in any namespace. It earns no SVID.
            .filter(|p| {
                !p.metadata
                    .annotations
                    .as_ref()
                    .is_some_and(|a| a.contains_key("kubernetes.io/config.mirror"))
            })
            .filter_map(|p| {
                let ns = p.metadata.namespace?;
                let sa = p.spec?.service_account_name.filter(|s| !s.is_empty())?;
                Some((ns, sa))
            })
            .collect())
    }
}
