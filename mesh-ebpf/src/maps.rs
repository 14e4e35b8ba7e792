//! Every map of the kernel object, and the small helpers the hooks share.

use aya_ebpf::{
    bindings::BPF_F_NO_PREALLOC,
    helpers::bpf_get_current_ancestor_cgroup_id,
    macros::map,
    maps::{Array, HashMap, LruHashMap, PerCpuArray, RingBuf, SockHash},
};
use mesh_common::{
    ConnKey, Counter, DENY_EVENTS_PER_SECOND, DESTINATIONS_CAPACITY, DenyEvent, DestKey,
    ENROLLED_CAPACITY, Enrollment, MAX_CGROUP_LEVEL, ORIG_MAP_CAPACITY, OrigDst, ProxyConfig,
    SPLICE_CAPACITY, SpliceControl, SpliceCount,
};

#[map(name = "NM_ENROLLED")]
pub static ENROLLED: HashMap<u64, Enrollment> = HashMap::with_max_entries(ENROLLED_CAPACITY, 0);

#[map(name = "NM_ORIG_BY_COOKIE")]
pub static ORIG_BY_COOKIE: LruHashMap<u64, OrigDst> =
    LruHashMap::with_max_entries(ORIG_MAP_CAPACITY, 0);

#[map(name = "NM_ORIG_BY_ADDR")]
pub static ORIG_BY_ADDR: LruHashMap<ConnKey, OrigDst> =
    LruHashMap::with_max_entries(ORIG_MAP_CAPACITY, 0);

#[map(name = "NM_DESTINATIONS")]
pub static DESTINATIONS: HashMap<DestKey, u8> =
    HashMap::with_max_entries(DESTINATIONS_CAPACITY, BPF_F_NO_PREALLOC);

/// Whether an IPv4 destination (network byte order; port in host order) is the mesh's: a
/// service's port, or any port of a meshed pod.
#[inline(always)]
pub fn is_mesh_destination(ip4: u32, port: u16) -> bool {
    let exact = DestKey { ip4, port, _pad: 0 };
    let pod = DestKey {
        ip4,
        port: 0,
        _pad: 0,
    };
    // SAFETY: only whether an entry exists is read.
    unsafe { DESTINATIONS.get(exact).is_some() || DESTINATIONS.get(pod).is_some() }
}

#[map(name = "NM_CONFIG")]
pub static CONFIG: Array<ProxyConfig> = Array::with_max_entries(1, 0);

#[map(name = "NM_COUNTERS")]
pub static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(Counter::COUNT, 0);

#[map(name = "NM_SPLICE")]
pub static SPLICE: SockHash<u64> = SockHash::with_max_entries(SPLICE_CAPACITY, 0);

#[map(name = "NM_SPLICE_PEER")]
pub static SPLICE_PEER: SockHash<u64> = SockHash::with_max_entries(SPLICE_CAPACITY, 0);

#[map(name = "NM_SPLICE_BYTES")]
pub static SPLICE_BYTES: HashMap<u64, SpliceCount> =
    HashMap::with_max_entries(SPLICE_CAPACITY, BPF_F_NO_PREALLOC);

#[map(name = "NM_SPLICE_CONTROL")]
pub static SPLICE_CONTROL: HashMap<u64, SpliceControl> =
    HashMap::with_max_entries(SPLICE_CAPACITY, BPF_F_NO_PREALLOC);

/// 4096 events of 16 bytes; the daemon drains it as events come.
#[map(name = "NM_SPLICE_EVENTS")]
pub static SPLICE_EVENTS: RingBuf = RingBuf::with_byte_size(64 * 1024, 0);

/// 1024 slots of 24 bytes (16 of event, 8 of ring header); the daemon drains it as events come.
#[map(name = "NM_DENY_EVENTS")]
pub static DENY_EVENTS: RingBuf = RingBuf::with_byte_size(24 * 1024, 0);

#[map(name = "NM_DENY_RATE")]
pub static DENY_RATE: PerCpuArray<[u64; 2]> = PerCpuArray::with_max_entries(1, 0);

/// Sends a deny event, at most `DENY_EVENTS_PER_SECOND` per CPU (a SYN flood must not turn into
/// an event flood); the rest are counted.
#[inline(always)]
pub fn deny_event(event: &DenyEvent) {
    // SAFETY: a helper without arguments.
    let now = unsafe { aya_ebpf::helpers::bpf_ktime_get_ns() };
    let Some(slot) = DENY_RATE.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: this CPU's slot, valid for the program's run and written by no other CPU.
    let allowed = unsafe {
        if now.wrapping_sub((*slot)[0]) > 1_000_000_000 {
            (*slot)[0] = now;
            (*slot)[1] = 0;
        }
        (*slot)[1] += 1;
        (*slot)[1] <= DENY_EVENTS_PER_SECOND
    };
    if !allowed || DENY_EVENTS.output::<DenyEvent>(event, 0).is_err() {
        count(Counter::DenyEventDropped);
    }
}

/// Adds one to a per-CPU counter (no atomics needed: the slot belongs to this CPU).
#[inline(always)]
pub fn count(c: Counter) {
    if let Some(slot) = COUNTERS.get_ptr_mut(c as u32) {
        // SAFETY: the pointer comes from the kernel's lookup of this CPU's slot and is valid for
        // the duration of the program; no other CPU writes it.
        unsafe { *slot += 1 };
    }
}

/// The proxy configuration, or `None` while the daemon has not written it yet.
#[inline(always)]
pub fn config() -> Option<&'static ProxyConfig> {
    let cfg = CONFIG.get(0)?;
    (cfg.proxy_port != 0).then_some(cfg)
}

/// The enrolled pod-level cgroup of the current task, searching ancestor levels from the top.
#[inline(always)]
pub fn enrolled_ancestor() -> Option<(u64, Enrollment)> {
    // SAFETY: a plain helper call with a scalar argument.
    enrolled_ancestor_by(|level| unsafe { bpf_get_current_ancestor_cgroup_id(level) })
}

/// The first enrolled cgroup among the ancestors `id_at(level)` names, levels 1..=MAX_CGROUP_LEVEL.
///
/// Pods sit at different depths (kubelet: Guaranteed pods one level higher than the others), so a
/// bounded range of levels is searched instead of one fixed level; a level deeper than the
/// cgroup itself returns 0 and ends the search.
#[inline(always)]
pub fn enrolled_ancestor_by(id_at: impl Fn(i32) -> u64) -> Option<(u64, Enrollment)> {
    let mut level = 1;
    while level <= MAX_CGROUP_LEVEL {
        let id = id_at(level as i32);
        if id == 0 {
            return None;
        }
        // SAFETY: the value is copied out before the map could change it.
        if let Some(e) = unsafe { ENROLLED.get(id) } {
            return Some((id, *e));
        }
        level += 1;
    }
    None
}
