//! The capture hooks' decision log: records `aya-log-ebpf` writes in the kernel (only while
//! `FLAG_LOG_DECISIONS` is set), read by `aya-log` into [`KernelLog`], which names the pod and
//! hands each record to tracing as target `nodemesh::ebpf` at debug level. The flag follows that
//! target's level: `/logging?level=info,nodemesh::ebpf=debug` turns it on at run time, any filter
//! without it turns it off again, so a daemon that does not log decisions pays one bit test per
//! connect.

use std::sync::{Arc, OnceLock};

/// The tracing target of the kernel's records.
pub const TARGET: &str = "nodemesh::ebpf";

/// A workload id → `namespace/name`.
pub type Namer = Box<dyn Fn(u32) -> Option<String> + Send + Sync>;

/// The `log::Log` that aya-log writes the kernel's records to.
#[derive(Clone, Default)]
pub struct KernelLog {
    namer: Arc<OnceLock<Namer>>,
}

impl KernelLog {
    /// How pods are named from here on (set once the state exists).
    pub fn name_pods_with(&self, namer: Namer) {
        let _ = self.namer.set(namer);
    }

    fn pod(&self, message: &str) -> Option<String> {
        let id = workload_id(message)?;
        self.namer.get().and_then(|n| n(id))
    }
}

/// The workload id a record names (`... workload 17 ...`).
pub fn workload_id(message: &str) -> Option<u32> {
    let rest = &message[message.find("workload ")? + "workload ".len()..];
    let digits = rest
        .find(|c: char| !c.is_ascii_digit())
        .map_or(rest, |end| &rest[..end]);
    digits.parse().ok()
}

impl log::Log for KernelLog {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        tracing::enabled!(target: TARGET, tracing::Level::DEBUG)
    }

    fn log(&self, record: &log::Record<'_>) {
        let message = record.args().to_string();
        let pod = self.pod(&message);
        tracing::debug!(
            target: TARGET,
            pod = pod.as_deref().unwrap_or("unknown"),
            "kernel: {message}"
        );
    }

    fn flush(&self) {}
}

/// Whether the running filter wants the kernel's decisions.
pub fn wanted() -> bool {
    tracing::enabled!(target: TARGET, tracing::Level::DEBUG)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_name_their_workload() {
        assert_eq!(
            workload_id("connect of workload 17 to 10.0.0.1:80 captured"),
            Some(17)
        );
        assert_eq!(
            workload_id("connect of workload 4294967295"),
            Some(u32::MAX)
        );
        assert_eq!(workload_id("no id here"), None);
        assert_eq!(workload_id("workload x"), None);
        let log = KernelLog::default();
        log.name_pods_with(Box::new(|id| (id == 3).then(|| "demo/client".to_string())));
        assert_eq!(
            log.pod("connect of workload 3 to 10.0.0.1:80").as_deref(),
            Some("demo/client")
        );
        assert_eq!(log.pod("connect of workload 4 to 10.0.0.1:80"), None);
    }
}
