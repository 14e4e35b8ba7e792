//! Refusals the kernel makes on its own: `nm_ingress` drops a plaintext SYN to a STRICT pod and
//! says so on `NM_DENY_EVENTS` (at most `DENY_EVENTS_PER_SECOND` per CPU). Each event becomes a
//! `refused` event on `/tap` and a `tcp_connections_failed_total{reporter="inbound",
//! reason="strict_plaintext"}` with the pod's workload, like any refusal the proxy makes; every
//! drop, over the rate too, is in `ebpf_events_total{event="inbound_denied"}`.

use std::{
    collections::HashMap,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    sync::Arc,
};

use aya::maps::{MapData, RingBuf};
use mesh_common::DenyEvent;
use tokio::io::{Interest, unix::AsyncFd};
use tracing::{info, warn};

use super::Inputs;
use crate::{metrics::unknown_edge, state::Snapshot};

/// The bounded reason of a STRICT drop.
pub const STRICT_PLAINTEXT: &str = "strict_plaintext";

/// Reads the deny events for as long as the daemon runs.
pub async fn run(events: RingBuf<MapData>, inputs: Arc<Inputs>) {
    // SAFETY: the ring buffer owns its map fd, which stays open and unchanged for as long as the
    // `AsyncFd` holds it.
    let registered = unsafe { AsyncFd::register_with_interest(events, Interest::READABLE) };
    let mut events = match registered {
        Ok(e) => e,
        Err(e) => {
            warn!(error = %e, "cannot watch the kernel's deny events; STRICT drops are only counted");
            return;
        }
    };
    // cgroup id → pod, rebuilt when the snapshot changes.
    let mut pods = Pods::default();
    loop {
        let mut guard = match events.readable_mut().await {
            Ok(g) => g,
            Err(e) => {
                warn!(error = %e, "the kernel's deny events stopped; STRICT drops are only counted");
                return;
            }
        };
        let snap = inputs.state.snapshot();
        while let Some(item) = guard.get_inner_mut().next() {
            let Some(event) = parse(&item) else { continue };
            report(&inputs, &snap, &mut pods, &event);
        }
        guard.clear_ready();
    }
}

/// A deny event as the kernel wrote it (at least its size; the rest is ignored).
pub fn parse(bytes: &[u8]) -> Option<DenyEvent> {
    let b = bytes.get(..std::mem::size_of::<DenyEvent>())?;
    let u64_at = |i: usize| u64::from_ne_bytes(b[i..i + 8].try_into().unwrap_or_default());
    let u32_at = |i: usize| u32::from_ne_bytes(b[i..i + 4].try_into().unwrap_or_default());
    let u16_at = |i: usize| u16::from_ne_bytes(b[i..i + 2].try_into().unwrap_or_default());
    Some(DenyEvent {
        cgroup_id: u64_at(0),
        saddr: u32_at(8),
        sport: u16_at(12),
        dport: u16_at(14),
    })
}

/// Local pods by cgroup id, for the snapshot they were read from (held weakly: a table must not
/// keep an old snapshot alive).
#[derive(Default)]
struct Pods {
    version: std::sync::Weak<Snapshot>,
    by_cgroup: HashMap<u64, (String, String, String, Ipv4Addr)>,
}

impl Pods {
    fn get(
        &mut self,
        snap: &Arc<Snapshot>,
        td: &str,
        id: u64,
    ) -> Option<&(String, String, String, Ipv4Addr)> {
        let version = Arc::downgrade(snap);
        if !self.version.ptr_eq(&version) {
            self.by_cgroup = snap
                .local_workloads()
                .filter_map(|w| {
                    let cg = crate::ebpf::cgroup::cgroup_id(&w.cgroup).ok()?;
                    let id = w.identity(td).to_string();
                    Some((cg, (w.name.clone(), w.namespace.clone(), id, w.ip)))
                })
                .collect();
            self.version = version;
        }
        self.by_cgroup.get(&id)
    }
}

fn report(inputs: &Inputs, snap: &Arc<Snapshot>, pods: &mut Pods, e: &DenyEvent) {
    let td = inputs.identity.trust_domain().to_string();
    let source = SocketAddr::V4(SocketAddrV4::new(
        Ipv4Addr::from(u32::from_be(e.saddr)),
        e.sport,
    ));
    let mut edge = unknown_edge("inbound");
    let (pod, destination) = match pods.get(snap, &td, e.cgroup_id) {
        Some((name, ns, id, ip)) => {
            edge[4].clone_from(name);
            edge[5].clone_from(ns);
            edge[6].clone_from(id);
            (
                format!("{ns}/{name}"),
                SocketAddr::V4(SocketAddrV4::new(*ip, e.dport)),
            )
        }
        // Un-enrolled since: still worth showing, by cgroup.
        None => (
            format!("the pod of cgroup {}", e.cgroup_id),
            SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, e.dport)),
        ),
    };
    let detail = format!(
        "plaintext SYN from {source} to {pod} port {} dropped in the kernel: the pod is STRICT \
         (only mesh traffic, and its probe ports from the node)",
        e.dport
    );
    info!(%source, %pod, port = e.dport, "STRICT: plaintext connection attempt dropped");
    inputs.refused(&edge, destination, "none", STRICT_PLAINTEXT, &detail);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_event_reads_as_the_kernel_wrote_it() {
        let e = DenyEvent {
            cgroup_id: 0x1122_3344_5566_7788,
            saddr: u32::from(Ipv4Addr::new(10, 210, 1, 3)).to_be(),
            sport: 40_000,
            dport: 7000,
        };
        // SAFETY: DenyEvent is repr(C) plain integers without padding.
        let bytes: [u8; 16] = unsafe { std::mem::transmute(e) };
        assert_eq!(parse(&bytes), Some(e));
        assert_eq!(parse(&bytes[..15]), None, "a short record is skipped");
    }
}
