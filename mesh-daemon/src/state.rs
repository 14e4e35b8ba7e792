//! The daemon's one in-memory picture of the mesh. Today it is fed by command-line enrollment; the
//! mesh file and Kubernetes discovery feed the same structure.

use std::{path::PathBuf, sync::RwLock};

/// A meshed workload instance (a pod) on this node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Workload {
    pub namespace: String,
    pub name: String,
    pub service_account: String,
    /// The pod-level cgroup whose sockets are this workload's.
    pub cgroup: PathBuf,
}

/// Workloads by the id the kernel carries in its records (an index; ids are never reused while
/// the daemon runs, so a stale record can never name a different workload).
#[derive(Default)]
pub struct State {
    workloads: RwLock<Vec<Workload>>,
}

impl State {
    pub fn add_workload(&self, w: Workload) -> u32 {
        let mut ws = self.workloads.write().unwrap_or_else(|p| p.into_inner());
        ws.push(w);
        (ws.len() - 1) as u32
    }

    pub fn workload(&self, id: u32) -> Option<Workload> {
        let ws = self.workloads.read().unwrap_or_else(|p| p.into_inner());
        ws.get(id as usize).cloned()
    }
}
