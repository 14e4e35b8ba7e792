//! What the API server sends, as the reflectors hold it: JSON lists of Nodes, Namespaces, Pods,
//! Services, EndpointSlices, HTTPRoutes, GRPCRoutes and AuthorizationPolicies, deserialized into
//! the same kube-rs/k8s-openapi types the watchers decode into, then turned into the neutral model
//! (`discovery::kube::model::build`) and applied to a state, as the daemon does on every change.
//! Local pods find their cgroups under a real folder with both kubelet layouts (pod UIDs `u1`,
//! `u2`, `u3`). Any input is either a decode error or a model; nothing panics.
#![no_main]

use std::{path::PathBuf, sync::Arc, sync::OnceLock};

use gateway_api::{experimental::httproutes::HttpRoute, grpcroutes::GrpcRoute};
use k8s_openapi::api::{
    core::v1::{Namespace, Node, Pod, Service},
    discovery::v1::EndpointSlice,
};
use libfuzzer_sys::fuzz_target;
use mesh_daemon::{
    discovery::kube::{
        crd::AuthorizationPolicy,
        model::{self, Objects, View},
    },
    state::{Scope, State},
};
use serde::Deserialize;

#[derive(Deserialize)]
#[serde(default)]
#[derive(Default)]
struct Lists {
    nodes: Vec<Node>,
    namespaces: Vec<Namespace>,
    pods: Vec<Pod>,
    services: Vec<Service>,
    slices: Vec<EndpointSlice>,
    http_routes: Vec<HttpRoute>,
    grpc_routes: Vec<GrpcRoute>,
    policies: Vec<AuthorizationPolicy>,
}

fn arcs<T>(v: Vec<T>) -> Vec<Arc<T>> {
    v.into_iter().map(Arc::new).collect()
}

/// A cgroup root with one pod of each layout: cgroupfs Guaranteed (u1), cgroupfs Burstable (u2),
/// systemd BestEffort (u3).
fn cgroup_root() -> &'static PathBuf {
    static ROOT: OnceLock<PathBuf> = OnceLock::new();
    ROOT.get_or_init(|| {
        let root = std::env::temp_dir().join(format!("nodemesh-fuzz-cg-{}", std::process::id()));
        for d in [
            "kubepods/podu1",
            "kubepods/burstable/podu2",
            "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-podu3.slice",
        ] {
            std::fs::create_dir_all(root.join(d)).expect("cgroup folders");
        }
        root
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(lists) = serde_json::from_slice::<Lists>(data) else {
        return;
    };
    let objects = Objects {
        nodes: arcs(lists.nodes),
        namespaces: arcs(lists.namespaces),
        pods: arcs(lists.pods),
        services: arcs(lists.services),
        slices: arcs(lists.slices),
        http_routes: arcs(lists.http_routes),
        grpc_routes: arcs(lists.grpc_routes),
        policies: arcs(lists.policies),
    };
    let view = View {
        node: "n1".into(),
        cgroup_root: cgroup_root().clone(),
    };
    let built = model::build(&objects, &view);
    let _ = State::new(Scope::Node("n1".into()), "/".into()).apply(&built.desired);
});
