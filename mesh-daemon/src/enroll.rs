//! Enrollment: keeps the kernel's `NM_ENROLLED` map equal to the pods this daemon serves in the
//! current snapshot. It subscribes to the state and reconciles on every snapshot; a pod whose
//! cgroup cannot be enrolled (not there yet, outside the attach root) is logged once, counted
//! (`enroll_failures_total{reason}`), retried every second, and the others are unaffected. A pod
//! that leaves is un-enrolled: its new connections go direct, its open ones are untouched.

use std::{
    collections::{BTreeMap, HashMap},
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::sync::watch;
use tracing::{info, warn};

use crate::{
    ebpf::loader::{Datapath, EnrollSpec},
    metrics::Metrics,
    state::Snapshot,
};

/// How often failed enrollments are retried.
pub const RETRY: Duration = Duration::from_secs(1);

/// The local pods that cannot be enrolled right now, by name (`namespace/name`), with the
/// reason: what `/ready` reports as degraded.
pub type Unenrolled = Arc<Mutex<BTreeMap<String, String>>>;

pub struct Enroller {
    datapath: Arc<Mutex<Datapath>>,
    metrics: Arc<Metrics>,
    /// STRICT inbound enforcement for every enrolled pod.
    strict: bool,
    /// What the kernel's enrollment map holds: workload id → (cgroup id, spec).
    enrolled: HashMap<u32, (u64, EnrollSpec)>,
    /// Workloads whose enrollment failed: (name, the reason last reported).
    failed: HashMap<u32, (String, String)>,
    /// `failed` by name, for `/ready`.
    report: Unenrolled,
    /// The last error storing the mesh's destinations, logged once.
    destinations_error: Option<String>,
    /// Where a new failure is shown (a `refused` event with the pod, its identity in this trust
    /// domain, and why).
    tap: Option<(crate::tap::Tap, String)>,
}

impl Enroller {
    pub fn new(datapath: Arc<Mutex<Datapath>>, metrics: Arc<Metrics>, strict: bool) -> Self {
        Self {
            datapath,
            metrics,
            strict,
            enrolled: HashMap::new(),
            failed: HashMap::new(),
            report: Unenrolled::default(),
            destinations_error: None,
            tap: None,
        }
    }

    /// Shows each new failure on `/tap`.
    pub fn with_tap(mut self, tap: crate::tap::Tap, trust_domain: &str) -> Self {
        self.tap = Some((tap, trust_domain.to_string()));
        self
    }

    /// The pods that cannot be enrolled, kept current by every reconcile.
    pub fn unenrolled(&self) -> Unenrolled {
        self.report.clone()
    }

    /// Follows the state until the process ends: a reconcile per snapshot, and a retry every
    /// second while some pod could not be enrolled.
    pub async fn run(mut self, mut snapshots: watch::Receiver<Arc<Snapshot>>) {
        let mut snap = snapshots.borrow_and_update().clone();
        loop {
            self.reconcile(&snap);
            let retry = !self.failed.is_empty() || self.destinations_error.is_some();
            tokio::select! {
                changed = snapshots.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    snap = snapshots.borrow_and_update().clone();
                }
                () = tokio::time::sleep(RETRY), if retry => {}
            }
        }
    }

    /// Makes the kernel's enrollment map match the workloads this daemon serves in `snap`.
    pub fn reconcile(&mut self, snap: &Snapshot) {
        let desired: HashMap<u32, (PathBuf, EnrollSpec, &crate::state::Workload)> = snap
            .local_workloads()
            .map(|w| {
                (
                    w.id,
                    (
                        w.cgroup.clone(),
                        EnrollSpec {
                            workload_id: w.id,
                            strict: self.strict,
                            probe_ports: w.probe_ports.clone(),
                        },
                        &**w,
                    ),
                )
            })
            .collect();
        let mut dp = self.datapath.lock().unwrap_or_else(|p| p.into_inner());
        // The mesh's destinations, for the kernel's "capture only what the mesh serves".
        match dp.set_destinations(&destinations(snap)) {
            Ok(()) => self.destinations_error = None,
            Err(e) => {
                let msg = e.to_string();
                if self.destinations_error.as_ref() != Some(&msg) {
                    warn!(error = %msg, "cannot store every mesh destination in the kernel; \
                        every connection is captured meanwhile (passthrough for the others), \
                        retrying every second");
                    self.destinations_error = Some(msg);
                }
            }
        }
        let gone: Vec<u32> = self
            .enrolled
            .keys()
            .filter(|id| !desired.contains_key(id))
            .copied()
            .collect();
        for id in gone {
            if let Some((cg, _)) = self.enrolled.remove(&id) {
                match dp.unenroll(cg) {
                    Ok(()) => info!(workload_id = id, cgroup_id = cg, "unenrolled"),
                    Err(e) => warn!(workload_id = id, error = %e, "unenroll failed"),
                }
            }
        }
        self.failed.retain(|id, _| desired.contains_key(id));
        for (id, (cgroup, spec, w)) in desired {
            let name = w.display();
            // Same spec and the same cgroup (a pod recreated under its name has a new one).
            let same_cgroup = |cg: u64| crate::ebpf::cgroup::cgroup_id(&cgroup).ok() == Some(cg);
            if self
                .enrolled
                .get(&id)
                .is_some_and(|(cg, s)| *s == spec && same_cgroup(*cg))
            {
                continue;
            }
            match dp.enroll(&cgroup, &spec) {
                Ok(cg) => {
                    if let Some((old, _)) = self.enrolled.insert(id, (cg, spec.clone()))
                        && old != cg
                    {
                        let _ = dp.unenroll(old);
                    }
                    self.failed.remove(&id);
                    info!(workload = %name, cgroup = %cgroup.display(), cgroup_id = cg, strict = spec.strict, "enrolled");
                }
                Err(e) => {
                    let msg = e.to_string();
                    if self.failed.get(&id).map(|(_, m)| m) != Some(&msg) {
                        warn!(workload = %name, error = %msg, "cannot enroll this pod; its connections are not captured (retrying every second)");
                        let reason = e.enroll_reason();
                        self.metrics
                            .enroll_failures
                            .with_label_values(&[reason, &w.name, &w.namespace])
                            .inc();
                        if let Some((tap, td)) = &self.tap {
                            tap.emit(|| {
                                crate::tap::TapEvent::refusal(
                                    "enroll",
                                    [&w.name, &w.namespace, &w.identity(td).to_string()],
                                    format!("cgroup {}", cgroup.display()),
                                    format!(
                                        "{reason}: cannot enroll this pod, its connections are \
                                         not captured (retried every second): {msg}"
                                    ),
                                )
                            });
                        }
                        self.failed.insert(id, (name, msg));
                    }
                }
            }
        }
        self.metrics.enrolled.set(self.enrolled.len() as i64);
        *self.report.lock().unwrap_or_else(|p| p.into_inner()) =
            self.failed.values().cloned().collect();
    }
}

/// The mesh's IPv4 destinations in `snap`: each service VIP on each of its ports, and every
/// meshed pod on every port (port 0).
pub fn destinations(snap: &Snapshot) -> std::collections::BTreeSet<mesh_common::DestKey> {
    let key = |ip: std::net::Ipv4Addr, port: u16| mesh_common::DestKey {
        ip4: u32::from(ip).to_be(),
        port,
        _pad: 0,
    };
    let services = snap.services.keys().filter_map(|a| match a {
        std::net::SocketAddr::V4(a) => Some(key(*a.ip(), a.port())),
        std::net::SocketAddr::V6(_) => None,
    });
    let pods = snap.workloads_by_ip.keys().filter_map(|ip| match ip {
        std::net::IpAddr::V4(ip) => Some(key(*ip, 0)),
        std::net::IpAddr::V6(_) => None,
    });
    services.chain(pods).collect()
}
