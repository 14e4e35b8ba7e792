//! Kubernetes as a source of the desired model (`mesh-daemon run --discovery kube`): kube-rs
//! watchers feed reflector stores (one per kind); after every burst of events the stores are
//! turned into the neutral model ([`model::build`], a pure function) and applied. A watch that
//! fails (API server restarted, 410 Gone, network) is resumed by the watcher with backoff and
//! relisted; the stores, and so the mesh, keep their last state meanwhile — mTLS and enrollment
//! go on without the API server.
//!
//! Memory follows what the node needs: objects are stripped to the fields the model reads as
//! they arrive (a pod keeps its identity, placement, IP and probe ports; a node its addresses).
//! Pods of the whole cluster are watched, stripped so: a node proxy must know the service account
//! of every endpoint it sends to (the SPIFFE ID it checks), as kube-proxy and Cilium's agent keep
//! every endpoint of the cluster.

pub mod check;
pub mod crd;
pub mod model;

use std::{
    collections::{BTreeSet, HashMap},
    fmt::Debug,
    path::Path,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use futures_util::{StreamExt as _, TryStreamExt as _};
use gateway_api::{experimental::httproutes::HttpRoute, grpcroutes::GrpcRoute};
use k8s_openapi::api::{
    core::v1::{Namespace, Node, NodeStatus, Pod, Service},
    discovery::v1::EndpointSlice,
};
use kube::{
    Api, Client, Resource,
    api::{ApiResource, DynamicObject},
    runtime::{
        WatchStreamExt as _,
        reflector::{self, Store},
        watcher::{self, Event},
    },
};
use serde::de::DeserializeOwned;
use tokio::sync::Notify;
use tracing::{info, warn};

use self::{
    crd::AuthorizationPolicy,
    model::{Built, Objects, View},
};
use crate::{metrics::Metrics, state::State};

/// Events that arrive together (a relist, a rollout) are applied once: the model is rebuilt this
/// long after the first of them.
const DEBOUNCE: Duration = Duration::from_millis(100);
/// How soon pods that are meshed but not complete (no cgroup yet) are looked at again (doubling
/// while nothing changes).
const PENDING_RETRY: Duration = Duration::from_secs(1);

/// A client from `kubeconfig`, or else the usual places (in-cluster service account,
/// `$KUBECONFIG`, `~/.kube/config`).
pub async fn client(kubeconfig: Option<&Path>) -> Result<Client, String> {
    Client::try_from(config(kubeconfig).await?)
        .map_err(|e| format!("cannot build the Kubernetes client: {e}"))
}

/// The client configuration from `kubeconfig`, or else the usual places (see [`client`]).
pub async fn config(kubeconfig: Option<&Path>) -> Result<kube::Config, String> {
    Ok(match kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path).map_err(|e| {
                format!(
                    "cannot read kubeconfig {}: {e}; pass --kubeconfig with a readable file",
                    path.display()
                )
            })?;
            kube::Config::from_custom_kubeconfig(kc, &Default::default())
                .await
                .map_err(|e| format!("kubeconfig {}: {e}", path.display()))?
        }
        None => kube::Config::infer().await.map_err(|e| {
            format!(
                "no Kubernetes configuration: {e}; run in a pod with a service account, or pass \
                 --kubeconfig"
            )
        })?,
    })
}

/// The reflectors' stores; a kind whose API the server does not serve has none.
struct Stores {
    nodes: Store<Node>,
    namespaces: Store<Namespace>,
    pods: Store<Pod>,
    services: Store<Service>,
    slices: Store<EndpointSlice>,
    http_routes: Option<Store<HttpRoute>>,
    grpc_routes: Option<Store<GrpcRoute>>,
    policies: Option<Store<AuthorizationPolicy>>,
}

impl Stores {
    fn objects(&self) -> Objects {
        Objects {
            nodes: self.nodes.state(),
            namespaces: self.namespaces.state(),
            pods: self.pods.state(),
            services: self.services.state(),
            slices: self.slices.state(),
            http_routes: self
                .http_routes
                .as_ref()
                .map(Store::state)
                .unwrap_or_default(),
            grpc_routes: self
                .grpc_routes
                .as_ref()
                .map(Store::state)
                .unwrap_or_default(),
            policies: self.policies.as_ref().map(Store::state).unwrap_or_default(),
        }
    }
}

/// Which of the kinds discovery reads the API server serves.
struct Apis {
    slices_v1: bool,
    http_routes: bool,
    grpc_routes: bool,
    policies: bool,
}

/// An API error as an operator reads it: the server's message and reason (e.g. RBAC's "secrets is
/// forbidden: User ... cannot create ..." (403 Forbidden)), not the whole status object.
pub fn api_error(e: &kube::Error) -> String {
    match e {
        kube::Error::Api(s) => format!("{} ({} {})", s.message, s.code, s.reason),
        other => with_causes(other),
    }
}

/// An error with its chain of causes ("client error (Connect): tcp connect error: Connection
/// refused"), each said once: kube's own message alone often hides the one that matters.
fn with_causes(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let m = c.to_string();
        if !s.contains(&m) {
            s.push_str(": ");
            s.push_str(&m);
        }
        cause = c.source();
    }
    s
}

/// Whether the API server serves `plural` in `group_version` (API discovery: any user may ask).
pub async fn served(client: &Client, group_version: &str, plural: &str) -> Result<bool, String> {
    match client.list_api_group_resources(group_version).await {
        Ok(list) => Ok(list.resources.iter().any(|r| r.name == plural)),
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(false),
        Err(e) => Err(format!(
            "cannot ask the API server which APIs it serves ({group_version}): {}",
            api_error(&e)
        )),
    }
}

impl Apis {
    async fn probe(client: &Client) -> Result<Self, String> {
        let served = |group_version: &'static str, plural: &'static str| {
            served(client, group_version, plural)
        };
        Ok(Self {
            slices_v1: served("discovery.k8s.io/v1", "endpointslices").await?,
            http_routes: served("gateway.networking.k8s.io/v1", "httproutes").await?,
            grpc_routes: served("gateway.networking.k8s.io/v1", "grpcroutes").await?,
            policies: served("nodemesh.io/v1alpha1", "authorizationpolicies").await?,
        })
    }
}

/// Each kind whose watch is failing now: since when, and its last error as an operator reads it.
/// Read by the start-up wait's messages and by `/ready` (degraded while a watch fails).
pub type WatchErrors = Arc<Mutex<HashMap<&'static str, (Instant, String)>>>;

fn lock(
    errors: &WatchErrors,
) -> std::sync::MutexGuard<'_, HashMap<&'static str, (Instant, String)>> {
    errors.lock().unwrap_or_else(|p| p.into_inner())
}

/// A watch error as an operator reads it: what failed, then the server's message and reason.
pub fn watch_error(e: &watcher::Error) -> String {
    match e {
        watcher::Error::InitialListFailed(e) => format!("cannot list: {}", api_error(e)),
        watcher::Error::WatchStartFailed(e) => format!("cannot watch: {}", api_error(e)),
        watcher::Error::WatchFailed(e) => format!("the watch broke: {}", api_error(e)),
        watcher::Error::WatchError(s) => format!(
            "the server ended the watch: {} ({} {})",
            s.message, s.code, s.reason
        ),
        other => with_causes(other),
    }
}

/// `/ready`'s degraded lines for the failing watches: which kinds, for how long, and why —
/// one line per cause (an API server away fails every watch the same way).
pub fn describe_watch_errors(errors: &WatchErrors) -> Vec<String> {
    by_cause(errors)
        .into_iter()
        .map(|(why, since, kinds)| {
            format!(
                "Kubernetes {} of {} failing for {}s, retried with backoff (the last state \
                 stays in force): {why}",
                if kinds.len() == 1 { "watch" } else { "watches" },
                kinds.join(", "),
                since.elapsed().as_secs()
            )
        })
        .collect()
}

/// `/ready`'s reasons while the daemon waits for its first listing (there is no last state yet).
pub fn describe_start_errors(errors: &WatchErrors) -> Vec<String> {
    by_cause(errors)
        .into_iter()
        .map(|(why, since, kinds)| {
            format!(
                "waiting for the API server ({} failing for {}s, retried with backoff): {why}",
                kinds.join(", "),
                since.elapsed().as_secs()
            )
        })
        .collect()
}

/// The failing kinds grouped by cause: (cause, first failure, kinds sorted).
fn by_cause(errors: &WatchErrors) -> Vec<(String, Instant, Vec<&'static str>)> {
    let errors = errors.lock().unwrap_or_else(|p| p.into_inner());
    let mut by_cause: std::collections::BTreeMap<&str, (Instant, Vec<&'static str>)> =
        Default::default();
    for (kind, (since, why)) in errors.iter() {
        let entry = by_cause.entry(why).or_insert((*since, Vec::new()));
        entry.0 = entry.0.min(*since);
        entry.1.push(kind);
    }
    by_cause
        .into_iter()
        .map(|(why, (since, mut kinds))| {
            kinds.sort_unstable();
            (why.to_string(), since, kinds)
        })
        .collect()
}

/// Kubernetes, followed.
pub struct KubeSource {
    stores: Stores,
    view: View,
    changed: Arc<Notify>,
    errors: WatchErrors,
    metrics: Arc<Metrics>,
    /// The last model applied, the rejections and pending pods already reported (each is said
    /// once), and whether any pod is still pending.
    last: Option<crate::state::desired::Desired>,
    reported: BTreeSet<String>,
    pending: bool,
}

impl KubeSource {
    /// Starts a watcher per kind. Which kinds exist is asked of the server once: EndpointSlice
    /// `discovery.k8s.io/v1` (or `v1beta1` on servers before 1.21), and the optional route and
    /// policy CRDs (absent ones are reported with the command that installs them).
    /// `errors` is where the watches say what fails (`/ready` reads it from the start).
    pub async fn start(
        config: kube::Config,
        view: View,
        metrics: Arc<Metrics>,
        errors: WatchErrors,
    ) -> Result<Self, String> {
        let changed = Arc::new(Notify::new());
        let client = kube::client::ClientBuilder::try_from(config)
            .map_err(|e| format!("cannot build the Kubernetes client: {e}"))?
            .with_layer(&WatchAccepted {
                errors: errors.clone(),
                metrics: metrics.clone(),
            })
            .build();
        let w = Watch {
            changed: changed.clone(),
            errors: errors.clone(),
            metrics: metrics.clone(),
        };
        // Which APIs exist; an unreachable server is retried with backoff (nothing can be
        // served before a first listing), saying why each time.
        let mut delay = Duration::from_millis(500);
        let apis = loop {
            match Apis::probe(&client).await {
                Ok(a) => {
                    lock(&errors).remove("discovery");
                    break a;
                }
                Err(e) => {
                    warn!(error = %e, retry_in = ?delay, "the API server cannot be asked yet; retrying");
                    lock(&errors)
                        .entry("discovery")
                        .and_modify(|(_, why)| why.clone_from(&e))
                        .or_insert_with(|| (Instant::now(), e.clone()));
                    metrics
                        .kube_watch_errors
                        .with_label_values(&["discovery"])
                        .inc();
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(30));
                }
            }
        };
        let slices = if apis.slices_v1 {
            w.spawn(
                Api::<EndpointSlice>::all(client.clone()),
                "EndpointSlice",
                strip_meta,
            )
        } else {
            info!("the API server has no discovery.k8s.io/v1; watching EndpointSlice v1beta1");
            w.spawn_v1beta1_slices(client.clone())
        };
        let optional = |found: bool, kind: &str, fix: &str| {
            if !found {
                warn!(
                    kind,
                    "the API server has no {kind} API; {kind} objects are not read until the daemon restarts after {fix}"
                );
            }
            found
        };
        const GATEWAY_FIX: &str = "the Gateway API CRDs are installed (see deploy/README.md)";
        let http_routes = optional(apis.http_routes, "HTTPRoute", GATEWAY_FIX).then(|| {
            w.spawn(
                Api::<HttpRoute>::all(client.clone()),
                "HTTPRoute",
                strip_meta,
            )
        });
        let grpc_routes = optional(apis.grpc_routes, "GRPCRoute", GATEWAY_FIX).then(|| {
            w.spawn(
                Api::<GrpcRoute>::all(client.clone()),
                "GRPCRoute",
                strip_meta,
            )
        });
        let policies = optional(
            apis.policies,
            "AuthorizationPolicy",
            "`kubectl apply -f deploy/crds/authorizationpolicies.yaml`",
        )
        .then(|| {
            w.spawn(
                Api::<AuthorizationPolicy>::all(client.clone()),
                "AuthorizationPolicy",
                strip_meta,
            )
        });
        let stores = Stores {
            nodes: w.spawn(Api::<Node>::all(client.clone()), "Node", strip_node),
            namespaces: w.spawn(
                Api::<Namespace>::all(client.clone()),
                "Namespace",
                strip_meta,
            ),
            pods: w.spawn(Api::<Pod>::all(client.clone()), "Pod", strip_pod),
            services: w.spawn(Api::<Service>::all(client.clone()), "Service", strip_meta),
            slices,
            http_routes,
            grpc_routes,
            policies,
        };
        Ok(Self {
            stores,
            view,
            changed,
            errors,
            metrics,
            last: None,
            reported: BTreeSet::new(),
            pending: false,
        })
    }

    /// The watches failing now, kept current by the watch tasks (for `/ready`).
    pub fn watch_errors(&self) -> WatchErrors {
        self.errors.clone()
    }

    /// Waits until every kind has been listed once (retrying, and saying every 5 s which kinds
    /// are still missing and why), then returns the first model.
    pub async fn initial(&mut self) -> Built {
        let s = &self.stores;
        let pending = || {
            let mut missing = Vec::new();
            let mut check = |kind: &'static str, ready: bool| {
                if !ready {
                    missing.push(kind);
                }
            };
            check("Node", is_ready(&s.nodes));
            check("Namespace", is_ready(&s.namespaces));
            check("Pod", is_ready(&s.pods));
            check("Service", is_ready(&s.services));
            check("EndpointSlice", is_ready(&s.slices));
            check("HTTPRoute", s.http_routes.as_ref().is_none_or(is_ready));
            check("GRPCRoute", s.grpc_routes.as_ref().is_none_or(is_ready));
            check(
                "AuthorizationPolicy",
                s.policies.as_ref().is_none_or(is_ready),
            );
            missing
        };
        let started = std::time::Instant::now();
        let mut said = std::time::Instant::now();
        loop {
            let missing = pending();
            if missing.is_empty() {
                break;
            }
            if said.elapsed() >= Duration::from_secs(5) {
                said = std::time::Instant::now();
                let errors = self.errors.lock().unwrap_or_else(|p| p.into_inner());
                let why: Vec<String> = missing
                    .iter()
                    .map(|k| match errors.get(k) {
                        Some((_, e)) => format!("{k} ({e})"),
                        None => (*k).to_string(),
                    })
                    .collect();
                warn!(waited = ?started.elapsed(), missing = %why.join(", "), "waiting for the API server to list every kind once; retrying with backoff");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        info!(waited = ?started.elapsed(), "every kind listed");
        model::build(&self.stores.objects(), &self.view)
    }

    /// Applies `built` (the first model, or a rebuilt one) when it differs from the last one.
    pub fn apply(&mut self, state: &State, built: Built) -> Result<(), String> {
        let now: BTreeSet<String> = built
            .rejected
            .iter()
            .map(|r| format!("rejected: {r}"))
            .chain(built.pending.iter().map(|p| format!("pending: {p}")))
            .collect();
        for r in built
            .rejected
            .iter()
            .filter(|r| !self.reported.contains(&format!("rejected: {r}")))
        {
            warn!(object = %r, "Kubernetes object left out of the mesh; fix the object (the rest of the mesh is unaffected)");
        }
        for p in built
            .pending
            .iter()
            .filter(|p| !self.reported.contains(&format!("pending: {p}")))
        {
            info!(pod = %p, "meshed pod not enrolled yet; looked at again soon");
        }
        self.pending = !built.pending.is_empty();
        self.metrics
            .kube_rejected_objects
            .set(built.rejected.len() as i64);
        self.reported = now;
        if self.last.as_ref() == Some(&built.desired) {
            return Ok(());
        }
        match state.apply(&built.desired) {
            Ok(snap) => {
                self.metrics.config_reloads.with_label_values(&["ok"]).inc();
                info!(
                    workloads = snap.workloads_by_id.len(),
                    local = snap.local_workloads().count(),
                    service_ports = snap.services.len(),
                    routes = built.desired.routes.len(),
                    policies = built.desired.policies.len(),
                    "state from Kubernetes applied"
                );
                self.last = Some(built.desired);
                Ok(())
            }
            Err(e) => {
                self.metrics
                    .config_reloads
                    .with_label_values(&["error"])
                    .inc();
                Err(e)
            }
        }
    }

    /// Follows every change until the process ends.
    pub async fn run(mut self, state: Arc<State>) {
        // Pods waiting for their cgroup are looked at again, at once and then less often (up to
        // every 5 s) while nothing else changes: a pod that never completes (a static pod)
        // does not rebuild the model every second for ever.
        let mut retry = PENDING_RETRY;
        loop {
            let pending = self.pending;
            tokio::select! {
                () = self.changed.notified() => retry = PENDING_RETRY,
                () = tokio::time::sleep(retry), if pending => {
                    retry = (retry * 2).min(Duration::from_secs(5));
                }
            }
            tokio::time::sleep(DEBOUNCE).await;
            let built = model::build(&self.stores.objects(), &self.view);
            if let Err(e) = self.apply(&state, built) {
                warn!(error = %e, "state from Kubernetes rejected; keeping the last good state");
            }
        }
    }
}

fn is_ready<K: Resource<DynamicType = ()> + Clone + 'static>(s: &Store<K>) -> bool {
    use futures_util::FutureExt as _;
    s.wait_until_ready().now_or_never().is_some()
}

/// The kinds discovery watches, by the resource name in their API paths.
const WATCHED: [(&str, &str); 8] = [
    ("nodes", "Node"),
    ("namespaces", "Namespace"),
    ("pods", "Pod"),
    ("services", "Service"),
    ("endpointslices", "EndpointSlice"),
    ("httproutes", "HTTPRoute"),
    ("grpcroutes", "GRPCRoute"),
    ("authorizationpolicies", "AuthorizationPolicy"),
];

/// The kind a request watches (`GET …/<plural>?watch=true`), if it is a watch of one of ours.
fn watched_kind(uri: &http::Uri) -> Option<&'static str> {
    let watch = uri
        .query()?
        .split('&')
        .any(|kv| kv == "watch=true" || kv == "watch=1");
    let plural = uri.path().rsplit('/').next()?;
    watch
        .then(|| WATCHED.iter().find(|(p, _)| *p == plural).map(|(_, k)| *k))
        .flatten()
}

/// A layer on the Kubernetes client that marks a kind's watch current when the API server
/// accepts it. A watch resumed after a failure says nothing until an object changes, so without
/// this a quiet kind (namespaces rarely change) would stay "failing" on `/ready` and in
/// `nodemesh_kube_watch_up` long after it is current again.
#[derive(Clone)]
struct WatchAccepted {
    errors: WatchErrors,
    metrics: Arc<Metrics>,
}

impl WatchAccepted {
    fn current(&self, kind: &'static str) {
        let recovered = self
            .errors
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(kind);
        if let Some((since, _)) = recovered {
            info!(kind, failed_for = ?since.elapsed(), "Kubernetes watch current again");
        }
        self.metrics.kube_watch_up.with_label_values(&[kind]).set(1);
    }
}

impl<S> tower::Layer<S> for WatchAccepted {
    type Service = WatchAcceptedService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        WatchAcceptedService {
            inner,
            seen: self.clone(),
        }
    }
}

#[derive(Clone)]
struct WatchAcceptedService<S> {
    inner: S,
    seen: WatchAccepted,
}

impl<S, B> tower::Service<http::Request<kube::client::Body>> for WatchAcceptedService<S>
where
    S: tower::Service<http::Request<kube::client::Body>, Response = http::Response<B>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = futures_util::future::BoxFuture<'static, Result<S::Response, S::Error>>;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<kube::client::Body>) -> Self::Future {
        let kind = watched_kind(req.uri());
        let answer = self.inner.call(req);
        let seen = self.seen.clone();
        Box::pin(async move {
            let resp = answer.await?;
            if let Some(kind) = kind
                && resp.status().is_success()
            {
                seen.current(kind);
            }
            Ok(resp)
        })
    }
}

/// What every watch task shares.
struct Watch {
    changed: Arc<Notify>,
    errors: WatchErrors,
    metrics: Arc<Metrics>,
}

impl Watch {
    /// A watcher (with backoff) into a reflector; every event wakes the rebuild.
    fn spawn<K>(&self, api: Api<K>, kind: &'static str, strip: fn(&mut K)) -> Store<K>
    where
        K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    {
        let stream = watcher::watcher(api, watcher::Config::default())
            .default_backoff()
            .map_ok(move |ev| ev.modify(strip));
        self.reflect(stream, kind)
    }

    /// EndpointSlice `discovery.k8s.io/v1beta1` (Kubernetes before 1.21) read as v1: the fields
    /// the model uses (addresses, conditions, ports, the service label) have one shape in both.
    fn spawn_v1beta1_slices(&self, client: Client) -> Store<EndpointSlice> {
        let ar = ApiResource {
            group: "discovery.k8s.io".into(),
            version: "v1beta1".into(),
            api_version: "discovery.k8s.io/v1beta1".into(),
            kind: "EndpointSlice".into(),
            plural: "endpointslices".into(),
        };
        let api = Api::<DynamicObject>::all_with(client, &ar);
        let stream = watcher::watcher(api, watcher::Config::default())
            .default_backoff()
            .try_filter_map(|ev| async move { Ok(v1beta1_event(ev)) });
        self.reflect(stream, "EndpointSlice")
    }

    fn reflect<K, S>(&self, stream: S, kind: &'static str) -> Store<K>
    where
        K: Resource<DynamicType = ()> + Clone + Debug + Send + Sync + 'static,
        S: futures_util::Stream<Item = Result<Event<K>, watcher::Error>> + Send + 'static,
    {
        let (reader, writer) = reflector::store();
        let stream = reflector::reflector(writer, stream);
        let (changed, errors, metrics) = (
            self.changed.clone(),
            self.errors.clone(),
            self.metrics.clone(),
        );
        let up = metrics.kube_watch_up.with_label_values(&[kind]);
        up.set(0);
        let seen = WatchAccepted {
            errors: errors.clone(),
            metrics: metrics.clone(),
        };
        tokio::spawn(async move {
            let mut stream = std::pin::pin!(stream);
            while let Some(ev) = stream.next().await {
                match ev {
                    // A (re)listing under way: current only once it is done.
                    Ok(Event::Init | Event::InitApply(_)) => {}
                    Ok(_) => {
                        seen.current(kind);
                        changed.notify_one();
                    }
                    Err(e) => {
                        let why = watch_error(&e);
                        metrics.kube_watch_errors.with_label_values(&[kind]).inc();
                        up.set(0);
                        warn!(kind, error = %why, "Kubernetes watch failed; resuming with backoff (the last state stays in force)");
                        errors
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .entry(kind)
                            .and_modify(|(_, last)| last.clone_from(&why))
                            .or_insert((Instant::now(), why));
                    }
                }
            }
        });
        reader
    }
}

fn v1beta1_event(ev: Event<DynamicObject>) -> Option<Event<EndpointSlice>> {
    let conv = |o: DynamicObject| -> Option<EndpointSlice> {
        let name = o.metadata.name.clone().unwrap_or_default();
        let mut v = serde_json::to_value(o).ok()?;
        if let Some(m) = v.as_object_mut() {
            m.insert("apiVersion".into(), "discovery.k8s.io/v1".into());
        }
        match serde_json::from_value::<EndpointSlice>(v) {
            Ok(mut s) => {
                strip_meta(&mut s);
                Some(s)
            }
            Err(e) => {
                warn!(name, error = %e, "EndpointSlice v1beta1 not readable; left out");
                None
            }
        }
    };
    Some(match ev {
        Event::Apply(o) => Event::Apply(conv(o)?),
        Event::Delete(o) => Event::Delete(conv(o)?),
        Event::InitApply(o) => Event::InitApply(conv(o)?),
        Event::Init => Event::Init,
        Event::InitDone => Event::InitDone,
    })
}

/// Managed fields are the largest part of most objects and never read.
fn strip_meta<K: Resource>(o: &mut K) {
    o.meta_mut().managed_fields = None;
}

/// A node keeps its name, addresses and the nodemesh annotations (not its images, conditions or
/// capacity).
fn strip_node(n: &mut Node) {
    n.metadata.managed_fields = None;
    n.metadata.labels = None;
    if let Some(a) = &mut n.metadata.annotations {
        a.retain(|k, _| k.starts_with("nodemesh.io/"));
    }
    n.spec = None;
    n.status = n.status.take().map(|s| NodeStatus {
        addresses: s.addresses,
        ..Default::default()
    });
}

/// A pod keeps what the model reads: identity, labels, placement, IP, phase, QoS class and its
/// containers' probes and ports.
fn strip_pod(p: &mut Pod) {
    let m = &mut p.metadata;
    m.managed_fields = None;
    m.annotations = None;
    m.owner_references = None;
    m.finalizers = None;
    if let Some(spec) = &mut p.spec {
        spec.volumes = None;
        spec.init_containers = None;
        spec.ephemeral_containers = None;
        spec.affinity = None;
        spec.tolerations = None;
        for c in &mut spec.containers {
            *c = k8s_openapi::api::core::v1::Container {
                name: std::mem::take(&mut c.name),
                ports: c.ports.take(),
                liveness_probe: c.liveness_probe.take(),
                readiness_probe: c.readiness_probe.take(),
                startup_probe: c.startup_probe.take(),
                ..Default::default()
            };
        }
    }
    if let Some(status) = &mut p.status {
        status.conditions = None;
        status.container_statuses = None;
        status.init_container_statuses = None;
        status.ephemeral_container_statuses = None;
    }
}

#[cfg(test)]
mod tests {
    //! Discovery driven by synthetic watch events through the same reflector stores the daemon
    //! uses: applied, deleted, a relist after a restart or 410 Gone (Init → InitApply → InitDone).
    use std::path::PathBuf;

    use kube::{ResourceExt as _, runtime::reflector::store::Writer};
    use serde_json::json;

    use super::*;
    use crate::state::desired::{Endpoints, ProxyMode};

    #[test]
    fn watch_requests_are_told_by_path_and_query() {
        let kind = |u: &str| watched_kind(&u.parse().expect("test uri"));
        assert_eq!(
            kind("/api/v1/pods?allowWatchBookmarks=true&watch=true&resourceVersion=5"),
            Some("Pod")
        );
        assert_eq!(
            kind("/apis/discovery.k8s.io/v1/endpointslices?watch=1"),
            Some("EndpointSlice")
        );
        assert_eq!(
            kind("/apis/nodemesh.io/v1alpha1/namespaces/demo/authorizationpolicies?watch=true"),
            Some("AuthorizationPolicy")
        );
        // Lists, other resources and look-alike parameters are not watches of ours.
        assert_eq!(kind("/api/v1/pods?limit=500"), None);
        assert_eq!(kind("/api/v1/pods"), None);
        assert_eq!(kind("/api/v1/secrets?watch=true"), None);
        assert_eq!(kind("/api/v1/pods?nowatch=true"), None);
        assert_eq!(kind("/api/v1/pods?watch=false"), None);
    }

    fn obj<K: DeserializeOwned>(v: serde_json::Value) -> K {
        serde_json::from_value(v).expect("test object")
    }

    fn node(name: &str, ip: &str) -> Node {
        // n1 → 10.210.1.254: each node a mesh source of its own.
        let src = format!("10.210.{}.254", name.trim_start_matches('n'));
        obj(
            json!({"metadata": {"name": name, "annotations": {"nodemesh.io/mesh-source": src, "other": "x"}},
                   "status": {"addresses": [{"type": "Hostname", "address": name}, {"type": "InternalIP", "address": ip}],
                              "images": [{"names": ["big"], "sizeBytes": 1}]}}),
        )
    }

    fn ns(name: &str, mode: Option<&str>) -> Namespace {
        let labels = mode.map_or_else(|| json!({}), |m| json!({"nodemesh.io/mode": m}));
        obj(json!({"metadata": {"name": name, "labels": labels}}))
    }

    fn pod(ns: &str, name: &str, node: &str, ip: Option<&str>, labels: serde_json::Value) -> Pod {
        obj(
            json!({"metadata": {"name": name, "namespace": ns, "uid": format!("uid-{name}"), "labels": labels,
                                "annotations": {"big": "x"}},
                   "spec": {"nodeName": node, "serviceAccountName": format!("{name}-sa"),
                            "containers": [{"name": "app", "image": "app:1", "env": [{"name": "A", "value": "b"}],
                                            "ports": [{"name": "health", "containerPort": 8081}],
                                            "readinessProbe": {"httpGet": {"port": "health"}}}]},
                   "status": {"phase": "Running", "podIP": ip, "qosClass": "BestEffort"}}),
        )
    }

    fn svc(ns: &str, name: &str, vip: &str) -> Service {
        obj(json!({"metadata": {"name": name, "namespace": ns},
                   "spec": {"clusterIP": vip, "selector": {"app": name},
                            "ports": [{"name": "http", "port": 80, "targetPort": "web", "appProtocol": "http"}]}}))
    }

    fn slice(ns: &str, name: &str, svc: &str, ips: &[&str], ready: bool) -> EndpointSlice {
        obj(
            json!({"metadata": {"name": name, "namespace": ns, "labels": {"kubernetes.io/service-name": svc}},
                   "addressType": "IPv4",
                   "ports": [{"name": "http", "port": 8080}],
                   "endpoints": ips.iter().map(|ip| json!({"addresses": [ip], "conditions": {"ready": ready}})).collect::<Vec<_>>()}),
        )
    }

    /// The stores and their writers, as `KubeSource::start` makes them (without the watches).
    struct Fixture {
        nodes: Writer<Node>,
        namespaces: Writer<Namespace>,
        pods: Writer<Pod>,
        services: Writer<Service>,
        slices: Writer<EndpointSlice>,
        routes: Writer<HttpRoute>,
        grpc: Writer<GrpcRoute>,
        policies: Writer<AuthorizationPolicy>,
        stores: Stores,
        view: View,
        _root: CgroupDir,
    }

    /// A temporary folder standing in for the cgroup root, with kubelet-layout pod folders.
    struct CgroupDir(PathBuf);
    impl Drop for CgroupDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn fixture(tag: &str) -> Fixture {
        let root = std::env::temp_dir().join(format!("nm-kube-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&root).expect("root");
        let (nodes_r, nodes) = reflector::store();
        let (ns_r, namespaces) = reflector::store();
        let (pods_r, pods) = reflector::store();
        let (svc_r, services) = reflector::store();
        let (sl_r, slices) = reflector::store();
        let (rt_r, routes) = reflector::store();
        let (grpc_r, grpc) = reflector::store();
        let (pol_r, policies) = reflector::store();
        let mut f = Fixture {
            nodes,
            namespaces,
            pods,
            services,
            slices,
            routes,
            grpc,
            policies,
            stores: Stores {
                nodes: nodes_r,
                namespaces: ns_r,
                pods: pods_r,
                services: svc_r,
                slices: sl_r,
                http_routes: Some(rt_r),
                grpc_routes: Some(grpc_r),
                policies: Some(pol_r),
            },
            view: View {
                node: "n1".into(),
                cgroup_root: root.clone(),
            },
            _root: CgroupDir(root),
        };
        // The first listing of every kind (what `initial` waits for).
        for_each_init(&mut f);
        f
    }

    fn for_each_init(f: &mut Fixture) {
        fn init<K: Resource<DynamicType = ()> + Clone>(w: &mut Writer<K>) {
            w.apply_watcher_event(&Event::Init);
            w.apply_watcher_event(&Event::InitDone);
        }
        init(&mut f.nodes);
        init(&mut f.namespaces);
        init(&mut f.pods);
        init(&mut f.services);
        init(&mut f.slices);
        init(&mut f.routes);
        init(&mut f.grpc);
        init(&mut f.policies);
    }

    fn apply<K: Resource<DynamicType = ()> + Clone>(
        w: &mut Writer<K>,
        mut o: K,
        strip: fn(&mut K),
    ) {
        strip(&mut o);
        w.apply_watcher_event(&Event::Apply(o));
    }

    fn mkcgroup(f: &Fixture, rel: &str) {
        std::fs::create_dir_all(f.view.cgroup_root.join(rel)).expect("cgroup dir");
    }

    fn build(f: &Fixture) -> Built {
        model::build(&f.stores.objects(), &f.view)
    }

    /// Two nodes, an enrolled namespace with a local and a remote pod, a service over both.
    fn populated(tag: &str) -> Fixture {
        let mut f = fixture(tag);
        apply(&mut f.nodes, node("n1", "10.203.0.1"), strip_node);
        apply(&mut f.nodes, node("n2", "10.203.0.2"), strip_node);
        apply(&mut f.namespaces, ns("demo", Some("node")), strip_meta);
        apply(&mut f.namespaces, ns("other", None), strip_meta);
        apply(
            &mut f.pods,
            pod("demo", "a", "n1", Some("10.210.1.2"), json!({"app": "web"})),
            strip_pod,
        );
        apply(
            &mut f.pods,
            pod("demo", "b", "n2", Some("10.210.2.2"), json!({"app": "web"})),
            strip_pod,
        );
        apply(
            &mut f.pods,
            pod("other", "c", "n1", Some("10.210.1.9"), json!({})),
            strip_pod,
        );
        apply(
            &mut f.services,
            svc("demo", "web", "10.96.0.10"),
            strip_meta,
        );
        apply(
            &mut f.slices,
            slice("demo", "web-1", "web", &["10.210.1.2", "10.210.2.2"], true),
            strip_meta,
        );
        mkcgroup(&f, "kubepods/besteffort/poduid-a");
        f
    }

    #[test]
    fn a_mesh_source_block_holding_a_pod_is_refused_and_named() {
        let mut f = populated("msclash");
        let mut n2 = node("n2", "10.203.0.2");
        n2.annotations_mut()
            .insert(model::MESH_SOURCE_ANNOTATION.into(), "10.210.2.0/24".into());
        apply(&mut f.nodes, n2, strip_node);
        let b = build(&f);
        assert_eq!(
            b.desired.nodes[1].mesh_source.to_string(),
            model::DEFAULT_MESH_SOURCE.to_string(),
            "{b:?}"
        );
        assert!(
            b.rejected
                .iter()
                .any(|r| r.contains("Node n2") && r.contains("holds pod address 10.210.2.2")),
            "{:?}",
            b.rejected
        );
    }

    #[test]
    fn proxy_protocol_ports_annotation_parses_or_is_refused() {
        assert_eq!(model::parse_ports("7000, 8443,"), Ok(vec![7000, 8443]));
        assert_eq!(model::parse_ports(""), Ok(vec![]));
        for bad in ["0", "http", "70000", "7000;8443"] {
            let e = model::parse_ports(bad).expect_err(bad);
            assert!(e.contains("is not a port"), "{bad}: {e}");
        }
    }

    #[test]
    fn applied_objects_become_the_neutral_model() {
        let f = populated("applied");
        let b = build(&f);
        assert!(b.rejected.is_empty() && b.pending.is_empty(), "{b:?}");
        let d = &b.desired;
        assert_eq!(d.nodes.len(), 2);
        assert_eq!(d.nodes[0].address.to_string(), "10.203.0.1");
        assert_eq!(d.nodes[0].mesh_source.to_string(), "10.210.1.254");
        assert_eq!(d.nodes[1].mesh_source.to_string(), "10.210.2.254");
        let names: Vec<&str> = d.workloads.iter().map(|w| w.name.as_str()).collect();
        assert_eq!(
            names,
            ["a", "b"],
            "the unlabelled namespace's pod is not meshed"
        );
        let a = &d.workloads[0];
        assert_eq!(a.cgroup, PathBuf::from("kubepods/besteffort/poduid-a"));
        assert_eq!(a.service_account, "a-sa");
        assert_eq!(
            a.probe_ports,
            [8081],
            "the named readiness probe port, resolved"
        );
        assert_eq!(a.mode, ProxyMode::Node);
        assert_eq!(d.workloads[1].node, "n2");
        assert_eq!(d.services.len(), 1);
        let s = &d.services[0];
        assert_eq!(
            s.ports[0].target_port, 8080,
            "the slice resolves the named targetPort"
        );
        assert_eq!(
            s.ports[0].protocol,
            Some(crate::state::desired::AppProtocol::Http)
        );
        assert_eq!(
            s.endpoints,
            Endpoints::Addresses(vec![
                "10.210.1.2".parse().expect("ip"),
                "10.210.2.2".parse().expect("ip")
            ])
        );
        // It compiles into a state for node n1.
        let state = State::new(
            crate::state::Scope::Node("n1".into()),
            f.view.cgroup_root.clone(),
        );
        let snap = state.apply(d).expect("state");
        assert_eq!(snap.local_workloads().count(), 1);
    }

    #[test]
    fn objects_are_stripped_to_what_the_model_reads() {
        let f = populated("strip");
        let p = f
            .stores
            .pods
            .state()
            .into_iter()
            .find(|p| p.name_any() == "a")
            .expect("pod a");
        assert!(p.metadata.annotations.is_none());
        let c = &p.spec.as_ref().expect("spec").containers[0];
        assert!(c.image.is_none() && c.env.is_none(), "{c:?}");
        assert!(c.readiness_probe.is_some());
        let n = f.stores.nodes.state().into_iter().next().expect("node");
        assert!(n.status.as_ref().expect("status").images.is_none());
        assert_eq!(
            n.annotations().len(),
            1,
            "only nodemesh.io/ annotations stay"
        );
    }

    #[test]
    fn deleted_pods_and_labels_un_enroll_and_a_pod_label_overrides() {
        let mut f = populated("deleted");
        f.pods.apply_watcher_event(&Event::Delete(pod(
            "demo",
            "b",
            "n2",
            Some("10.210.2.2"),
            json!({}),
        )));
        let names = |f: &Fixture| -> Vec<String> {
            build(f)
                .desired
                .workloads
                .iter()
                .map(|w| w.name.clone())
                .collect()
        };
        assert_eq!(names(&f), ["a"]);
        // A pod label opts one pod out of an enrolled namespace ...
        apply(
            &mut f.pods,
            pod(
                "demo",
                "a",
                "n1",
                Some("10.210.1.2"),
                json!({"nodemesh.io/mode": "disabled"}),
            ),
            strip_pod,
        );
        assert!(names(&f).is_empty());
        // ... or one pod of an unlabelled namespace in (as a sidecar it is refused: no injector).
        apply(
            &mut f.pods,
            pod(
                "other",
                "c",
                "n1",
                Some("10.210.1.9"),
                json!({"nodemesh.io/mode": "sidecar"}),
            ),
            strip_pod,
        );
        mkcgroup(&f, "kubepods/besteffort/poduid-c");
        let b = build(&f);
        assert!(b.desired.workloads.is_empty(), "no injector: refused {b:?}");
        assert!(
            b.rejected
                .iter()
                .any(|r| r.contains("other/c") && r.contains("sidecar")),
            "{b:?}"
        );
        apply(
            &mut f.pods,
            pod(
                "other",
                "c",
                "n1",
                Some("10.210.1.9"),
                json!({"nodemesh.io/mode": "node"}),
            ),
            strip_pod,
        );
        let b = build(&f);
        assert_eq!(b.desired.workloads.len(), 1);
        assert_eq!(b.desired.workloads[0].mode, ProxyMode::Node);
        // Removing the namespace's label un-enrolls the rest of it.
        apply(
            &mut f.pods,
            pod("demo", "a", "n1", Some("10.210.1.2"), json!({})),
            strip_pod,
        );
        assert_eq!(names(&f), ["a", "c"]);
        apply(&mut f.namespaces, ns("demo", None), strip_meta);
        assert_eq!(names(&f), ["c"]);
        assert!(
            build(&f).desired.services.is_empty(),
            "services of an un-enrolled namespace go too"
        );
    }

    #[test]
    fn a_local_pod_waits_for_its_ip_and_cgroup_then_enrolls() {
        let mut f = populated("pending");
        apply(
            &mut f.pods,
            pod("demo", "d", "n1", None, json!({})),
            strip_pod,
        );
        let b = build(&f);
        assert!(
            b.pending
                .iter()
                .any(|p| p.contains("demo/d") && p.contains("no IPv4 pod IP")),
            "{b:?}"
        );
        apply(
            &mut f.pods,
            pod("demo", "d", "n1", Some("10.210.1.3"), json!({})),
            strip_pod,
        );
        let b = build(&f);
        assert!(
            b.pending
                .iter()
                .any(|p| p.contains("demo/d") && p.contains("cgroup")),
            "{b:?}"
        );
        assert!(!b.desired.workloads.iter().any(|w| w.name == "d"));
        // The kubelet's systemd layout, found by looking.
        mkcgroup(
            &f,
            "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-poduid_d.slice",
        );
        let b = build(&f);
        assert!(b.pending.is_empty(), "{b:?}");
        let d = b
            .desired
            .workloads
            .iter()
            .find(|w| w.name == "d")
            .expect("d enrolled");
        assert_eq!(
            d.cgroup,
            PathBuf::from(
                "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-poduid_d.slice"
            )
        );
        // A remote pod without an IP is simply not an endpoint yet (nothing to wait for here).
        apply(
            &mut f.pods,
            pod("demo", "e", "n2", None, json!({})),
            strip_pod,
        );
        assert!(build(&f).pending.is_empty());
    }

    #[test]
    fn a_relist_after_410_gone_replaces_the_store_atomically() {
        let mut f = populated("relist");
        let before = build(&f).desired;
        // The watch failed (API server restarted, 410 Gone): nothing arrives, the state stays.
        assert_eq!(build(&f).desired, before);
        // The watcher relists: until InitDone, the old objects stay in force ...
        f.pods.apply_watcher_event(&Event::Init);
        let mut a = pod("demo", "a", "n1", Some("10.210.1.2"), json!({"app": "web"}));
        strip_pod(&mut a);
        f.pods.apply_watcher_event(&Event::InitApply(a));
        assert_eq!(
            build(&f).desired,
            before,
            "a relist in progress changes nothing"
        );
        // ... and at InitDone, what was not listed again (b, deleted while the watch was down)
        // is gone, what was listed stays.
        f.pods.apply_watcher_event(&Event::InitDone);
        let names: Vec<String> = build(&f)
            .desired
            .workloads
            .iter()
            .map(|w| w.name.clone())
            .collect();
        assert_eq!(names, ["a"]);
    }

    #[test]
    fn endpoint_slices_follow_readiness_and_a_bad_service_is_left_out_alone() {
        let mut f = populated("slices");
        apply(
            &mut f.slices,
            slice("demo", "web-1", "web", &["10.210.1.2"], true),
            strip_meta,
        );
        apply(
            &mut f.slices,
            slice("demo", "web-2", "web", &["10.210.2.2"], false),
            strip_meta,
        );
        let d = build(&f).desired;
        assert_eq!(
            d.services[0].endpoints,
            Endpoints::Addresses(vec!["10.210.1.2".parse().expect("ip")])
        );
        let mut bad = svc("demo", "bad", "10.96.0.11");
        bad.spec
            .as_mut()
            .expect("spec")
            .ports
            .as_mut()
            .expect("ports")[0]
            .app_protocol = Some("HTTP2".into());
        apply(&mut f.services, bad, strip_meta);
        let b = build(&f);
        assert_eq!(b.desired.services.len(), 1, "web stays");
        assert!(
            b.rejected
                .iter()
                .any(|r| r.contains("demo/bad") && r.contains("HTTP2")),
            "{b:?}"
        );
        // A headless service has no VIP to capture.
        let mut headless = svc("demo", "headless", "None");
        headless.metadata.name = Some("headless".into());
        apply(&mut f.services, headless, strip_meta);
        assert_eq!(build(&f).desired.services.len(), 1);
    }

    #[test]
    fn routes_and_policies_from_their_objects() {
        let mut f = populated("routes");
        let route: HttpRoute = obj(
            json!({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
            "metadata": {"name": "split", "namespace": "demo", "annotations": {"nodemesh.io/rate-limit": "{requestsPerSecond: 5, burst: 2}"}},
            "spec": {"parentRefs": [{"kind": "Service", "name": "web", "port": 80}],
                     "rules": [{"backendRefs": [{"name": "web", "port": 80, "weight": 50}]}]}}),
        );
        apply(&mut f.routes, route, strip_meta);
        // A route for a service that does not exist is left out, named, and the rest stays.
        let orphan: HttpRoute = obj(
            json!({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
            "metadata": {"name": "orphan", "namespace": "demo"},
            "spec": {"parentRefs": [{"kind": "Service", "name": "nope", "port": 80}]}}),
        );
        apply(&mut f.routes, orphan, strip_meta);
        // A Gateway's route (north-south) is not the mesh's: ignored without complaint.
        let gw: HttpRoute = obj(
            json!({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
            "metadata": {"name": "ingress", "namespace": "demo"},
            "spec": {"parentRefs": [{"name": "public-gw"}]}}),
        );
        apply(&mut f.routes, gw, strip_meta);
        let policy: AuthorizationPolicy = obj(
            json!({"apiVersion": "nodemesh.io/v1alpha1", "kind": "AuthorizationPolicy",
            "metadata": {"name": "deny-b", "namespace": "demo"},
            "spec": {"action": "DENY", "from": [{"principals": ["spiffe://cluster.local/ns/demo/sa/b-sa"]}]}}),
        );
        apply(&mut f.policies, policy, strip_meta);
        let b = build(&f);
        let routes: Vec<&str> = b.desired.routes.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(routes, ["split"]);
        assert_eq!(
            b.desired.routes[0].rate_limit.map(|r| r.burst.get()),
            Some(2)
        );
        assert_eq!(b.rejected.len(), 1, "{b:?}");
        assert!(b.rejected[0].contains("orphan"), "{b:?}");
        assert_eq!(b.desired.policies.len(), 1);
        assert_eq!(b.desired.policies[0].name, "deny-b");
        assert_eq!(
            b.desired.policies[0].action,
            crate::state::desired::PolicyAction::Deny
        );
        // Deleted: gone.
        let mut p: AuthorizationPolicy = obj(
            json!({"apiVersion": "nodemesh.io/v1alpha1", "kind": "AuthorizationPolicy",
            "metadata": {"name": "deny-b", "namespace": "demo"}, "spec": {"action": "DENY"}}),
        );
        strip_meta(&mut p);
        f.policies.apply_watcher_event(&Event::Delete(p));
        assert!(build(&f).desired.policies.is_empty());
    }

    /// One kind's object through every watch event: applied (in the model), deleted (gone),
    /// applied again, a relist that no longer lists it (gone at InitDone, not before), and a relist
    /// that does (stays). `seen` says whether the model shows the object.
    fn cycle<K: Resource<DynamicType = ()> + Clone>(
        f: &mut Fixture,
        writer: fn(&mut Fixture) -> &mut Writer<K>,
        mut o: K,
        strip: fn(&mut K),
        seen: fn(&Built) -> bool,
        kind: &str,
    ) {
        strip(&mut o);
        assert!(!seen(&build(f)), "{kind}: not there before it is applied");
        writer(f).apply_watcher_event(&Event::Apply(o.clone()));
        assert!(seen(&build(f)), "{kind}: applied");
        writer(f).apply_watcher_event(&Event::Delete(o.clone()));
        assert!(!seen(&build(f)), "{kind}: deleted");
        writer(f).apply_watcher_event(&Event::Apply(o.clone()));
        assert!(seen(&build(f)), "{kind}: applied again");
        // A restart or 410 Gone: the relist lists the others but not it (deleted while the watch
        // was down).
        let me = reflector::ObjectRef::from_obj(&o);
        let others: Vec<K> = writer(f)
            .as_reader()
            .state()
            .iter()
            .filter(|x| reflector::ObjectRef::from_obj(&***x) != me)
            .map(|x| (**x).clone())
            .collect();
        writer(f).apply_watcher_event(&Event::Init);
        for x in &others {
            writer(f).apply_watcher_event(&Event::InitApply(x.clone()));
        }
        assert!(seen(&build(f)), "{kind}: stays while the relist runs");
        writer(f).apply_watcher_event(&Event::InitDone);
        assert!(!seen(&build(f)), "{kind}: gone after a relist without it");
        // A relist that lists it again.
        writer(f).apply_watcher_event(&Event::Init);
        for x in others {
            writer(f).apply_watcher_event(&Event::InitApply(x));
        }
        writer(f).apply_watcher_event(&Event::InitApply(o));
        writer(f).apply_watcher_event(&Event::InitDone);
        assert!(seen(&build(f)), "{kind}: back after a relist with it");
    }

    #[test]
    fn every_kind_follows_apply_delete_and_relist() {
        let mut f = populated("kinds");
        cycle(
            &mut f,
            |f| &mut f.nodes,
            node("n3", "10.203.0.3"),
            strip_node,
            |b| b.desired.nodes.iter().any(|n| n.name == "n3"),
            "Node",
        );
        // A namespace shows in the model through its pods.
        apply(
            &mut f.pods,
            pod("extra", "e", "n2", Some("10.210.2.8"), json!({})),
            strip_pod,
        );
        cycle(
            &mut f,
            |f| &mut f.namespaces,
            ns("extra", Some("node")),
            strip_meta,
            |b| b.desired.workloads.iter().any(|w| w.name == "e"),
            "Namespace",
        );
        cycle(
            &mut f,
            |f| &mut f.pods,
            pod("demo", "d", "n2", Some("10.210.2.7"), json!({"app": "web"})),
            strip_pod,
            |b| b.desired.workloads.iter().any(|w| w.name == "d"),
            "Pod",
        );
        cycle(
            &mut f,
            |f| &mut f.services,
            svc("demo", "api", "10.96.0.12"),
            strip_meta,
            |b| b.desired.services.iter().any(|s| s.name == "api"),
            "Service",
        );
        cycle(
            &mut f,
            |f| &mut f.slices,
            slice("demo", "web-2", "web", &["10.210.2.9"], true),
            strip_meta,
            |b| {
                b.desired.services.iter().any(|s| {
                    s.name == "web"
                        && matches!(&s.endpoints, Endpoints::Addresses(a)
                            if a.contains(&"10.210.2.9".parse().expect("ip")))
                })
            },
            "EndpointSlice",
        );
        cycle(
            &mut f,
            |f| &mut f.routes,
            obj(
                json!({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
                "metadata": {"name": "split", "namespace": "demo"},
                "spec": {"parentRefs": [{"kind": "Service", "name": "web", "port": 80}],
                         "rules": [{"backendRefs": [{"name": "web", "port": 80}]}]}}),
            ),
            strip_meta,
            |b| b.desired.routes.iter().any(|r| r.name == "split"),
            "HTTPRoute",
        );
        cycle(
            &mut f,
            |f| &mut f.grpc,
            obj(
                json!({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "GRPCRoute",
                "metadata": {"name": "rpc", "namespace": "demo"},
                "spec": {"parentRefs": [{"kind": "Service", "name": "web", "port": 80}],
                         "rules": [{"matches": [{"method": {"service": "pkg.Echo", "method": "Say"}}],
                                    "backendRefs": [{"name": "web", "port": 80}]}]}}),
            ),
            strip_meta,
            |b| b.desired.routes.iter().any(|r| r.name == "rpc"),
            "GRPCRoute",
        );
        cycle(
            &mut f,
            |f| &mut f.policies,
            obj(
                json!({"apiVersion": "nodemesh.io/v1alpha1", "kind": "AuthorizationPolicy",
                "metadata": {"name": "deny-b", "namespace": "demo"},
                "spec": {"action": "DENY", "from": [{"principals": ["spiffe://cluster.local/ns/demo/sa/b-sa"]}]}}),
            ),
            strip_meta,
            |b| b.desired.policies.iter().any(|p| p.name == "deny-b"),
            "AuthorizationPolicy",
        );
        // The rest of the model is what it was.
        let b = build(&f);
        assert!(b.rejected.is_empty(), "{b:?}");
        let names: Vec<&str> = b
            .desired
            .workloads
            .iter()
            .map(|w| w.name.as_str())
            .collect();
        assert_eq!(names, ["a", "b", "d", "e"]);
    }

    #[test]
    fn a_v1beta1_slice_reads_as_v1() {
        let o: DynamicObject = obj(
            json!({"apiVersion": "discovery.k8s.io/v1beta1", "kind": "EndpointSlice",
            "metadata": {"name": "web-1", "namespace": "demo", "labels": {"kubernetes.io/service-name": "web"}},
            "addressType": "IPv4", "ports": [{"name": "http", "port": 8080}],
            "endpoints": [{"addresses": ["10.210.1.2"], "conditions": {"ready": true}, "topology": {"kubernetes.io/hostname": "n1"}}]}),
        );
        let Some(Event::Apply(s)) = v1beta1_event(Event::Apply(o)) else {
            panic!("not converted");
        };
        assert_eq!(s.endpoints[0].addresses, ["10.210.1.2"]);
        assert_eq!(s.ports.as_ref().expect("ports")[0].port, Some(8080));
        assert!(matches!(
            v1beta1_event(Event::InitDone),
            Some(Event::InitDone)
        ));
    }

    #[test]
    fn pod_cgroups_under_every_kubelet_layout() {
        let f = fixture("layouts");
        let root = &f.view.cgroup_root;
        let cases = [
            ("u-1", Some("Guaranteed"), "kubepods/podu-1"),
            ("u-2", Some("Burstable"), "kubepods/burstable/podu-2"),
            (
                "u-3",
                Some("Guaranteed"),
                "kubepods.slice/kubepods-podu_3.slice",
            ),
            (
                "u-4",
                None,
                "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-podu_4.slice",
            ),
            (
                "u-5",
                Some("BestEffort"),
                "kubelet.slice/kubepods/besteffort/podu-5",
            ),
        ];
        for (uid, _, rel) in &cases {
            mkcgroup(&f, rel);
            let _ = uid;
        }
        for (uid, qos, rel) in cases {
            let found = model::find_pod_cgroup(root, uid, qos);
            assert_eq!(found, Some(PathBuf::from(rel)), "{uid} {qos:?}");
        }
        assert_eq!(model::find_pod_cgroup(root, "u-9", None), None);
        assert_eq!(
            model::find_pod_cgroup(root, "../x", None),
            None,
            "a uid is never a path"
        );
    }
}
