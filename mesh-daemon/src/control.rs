//! The control loop for the mesh file: load it, turn it into the state snapshot, enroll the pods
//! this daemon serves (its node's, or a sidecar's one pod) in the kernel, and reload when the
//! file changes. A bad file is reported with its line and counted, and the last good state stays
//! in force.

use std::{
    collections::HashMap,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Duration,
};

use tracing::{info, warn};

use crate::{
    ebpf::loader::{Datapath, EnrollSpec},
    identity::manager::Manager,
    meshfile,
    metrics::Metrics,
    state::{Scope, State},
};

/// How often the mesh file is checked for changes.
pub const POLL: Duration = Duration::from_secs(1);

/// What the control loop reads and how it enrolls.
pub struct ControlConfig {
    /// The mesh file.
    pub path: PathBuf,
    /// Which workloads this daemon serves (a node's, or one pod's as its sidecar).
    pub scope: Scope,
    /// Relative workload cgroups are resolved against it.
    pub cgroup_root: PathBuf,
    /// STRICT inbound enforcement for every enrolled pod.
    pub strict: bool,
}

pub struct Control {
    path: PathBuf,
    scope: Scope,
    cgroup_root: PathBuf,
    strict: bool,
    state: Arc<State>,
    datapath: Arc<Mutex<Datapath>>,
    metrics: Arc<Metrics>,
    identity: Arc<Manager>,
    /// Text of the last file seen (good or bad), to notice changes.
    last_text: Option<String>,
    /// What the kernel's enrollment map holds: workload id → (cgroup id, spec).
    enrolled: HashMap<u32, (u64, EnrollSpec)>,
    /// Workloads whose enrollment failed, with the reason last reported (retried every tick).
    failed: HashMap<u32, String>,
}

impl Control {
    pub fn new(
        cfg: ControlConfig,
        state: Arc<State>,
        datapath: Arc<Mutex<Datapath>>,
        metrics: Arc<Metrics>,
        identity: Arc<Manager>,
    ) -> Self {
        Self {
            path: cfg.path,
            scope: cfg.scope,
            cgroup_root: cfg.cgroup_root,
            strict: cfg.strict,
            state,
            datapath,
            metrics,
            identity,
            last_text: None,
            enrolled: HashMap::new(),
            failed: HashMap::new(),
        }
    }

    /// The first load: without a good file there is no state to keep, so this is an error.
    pub fn load_initial(&mut self) -> Result<(), String> {
        let text = std::fs::read_to_string(&self.path).map_err(|e| {
            format!(
                "cannot read mesh file {}: {e}; pass --mesh-file with a readable file",
                self.path.display()
            )
        })?;
        self.apply(text)
    }

    /// One tick: reload if the file changed, retry enrollments that failed.
    pub fn poll(&mut self) {
        match std::fs::read_to_string(&self.path) {
            Ok(text) if self.last_text.as_deref() != Some(text.as_str()) => {
                if let Err(e) = self.apply(text) {
                    warn!(error = %e, "mesh file rejected; keeping the last good state");
                }
            }
            Ok(_) => self.reconcile(),
            Err(e) => {
                if self.last_text.is_some() {
                    warn!(path = %self.path.display(), error = %e, "cannot read the mesh file; keeping the last good state");
                    self.metrics
                        .config_reloads
                        .with_label_values(&["error"])
                        .inc();
                    self.last_text = None;
                }
            }
        }
    }

    fn apply(&mut self, text: String) -> Result<(), String> {
        self.last_text = Some(text.clone());
        let result = meshfile::parse(&self.path, &text)
            .map_err(|e| e.to_string())
            .and_then(|file| self.state.build(&file, &self.scope, &self.cgroup_root));
        let snap = match result {
            Ok(s) => s,
            Err(e) => {
                self.metrics
                    .config_reloads
                    .with_label_values(&["error"])
                    .inc();
                return Err(e);
            }
        };
        let (w, s) = (snap.workloads_by_id.len(), snap.services.len());
        // Certificates follow placement: an identity with a pod here gets an SVID, one whose last
        // pod left loses it.
        let td = self.identity.trust_domain().to_string();
        self.identity
            .set_wanted(snap.local_workloads().map(|w| w.identity(&td)));
        self.state.replace(snap);
        self.metrics.config_reloads.with_label_values(&["ok"]).inc();
        info!(path = %self.path.display(), workloads = w, service_ports = s, "mesh file loaded");
        self.reconcile();
        Ok(())
    }

    /// Makes the kernel's enrollment map match this node's workloads in the current snapshot.
    fn reconcile(&mut self) {
        let snap = self.state.snapshot();
        let desired: HashMap<u32, (PathBuf, EnrollSpec, String)> = snap
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
                        w.display(),
                    ),
                )
            })
            .collect();
        let mut dp = self.datapath.lock().unwrap_or_else(|p| p.into_inner());
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
        for (id, (cgroup, spec, name)) in desired {
            if self.enrolled.get(&id).is_some_and(|(_, s)| *s == spec) {
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
                    if self.failed.get(&id) != Some(&msg) {
                        warn!(workload = %name, error = %msg, "cannot enroll this pod; its connections are not captured (retrying every second)");
                        self.metrics
                            .enroll_failures
                            .with_label_values(&[reason_label(&msg)])
                            .inc();
                        self.failed.insert(id, msg);
                    }
                }
            }
        }
        self.metrics.enrolled.set(self.enrolled.len() as i64);
    }
}

fn reason_label(msg: &str) -> &'static str {
    if msg.contains("not under the attach root") {
        "outside_cgroup_root"
    } else if msg.contains("No such file") || msg.contains("not found") {
        "cgroup_missing"
    } else if msg.contains("map") {
        "map_full_or_error"
    } else {
        "other"
    }
}
