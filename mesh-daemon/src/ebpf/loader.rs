//! Loads the embedded kernel object, attaches its programs under the cgroup root, and owns the
//! maps the daemon reads and writes.
//!
//! Fail closed (the default): the capture and inbound-enforcement links are pinned on bpffs, so
//! they outlive the daemon — while it is down, enrolled pods' connections go to a port nobody
//! listens on and are refused at once. [`Datapath::uninstall`] (clean exit) and [`uninstall`]
//! (`mesh-daemon uninstall`) remove the pins; the kernel then frees programs and maps. Fail open:
//! nothing is pinned and everything detaches when the daemon ends.

use std::{
    fs::File,
    net::SocketAddrV4,
    os::fd::BorrowedFd,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use crate::state::desired::MeshSource;
use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, MapData, PerCpuArray, RingBuf, SockHash},
    programs::{
        CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, CgroupSockAddr, ProgramError, SkSkb,
        SockOps,
        links::{FdLink, PinnedLink},
    },
};
use mesh_common::{
    ConnKey, Counter, ENROLL_STRICT, Enrollment, FLAG_LOG_DECISIONS, FLAG_REDIRECT,
    MAX_PROBE_PORTS, OrigDst, ProxyConfig, SpliceControl, SpliceCount, map_names, prog_names,
};

use super::{OBJECT, cgroup, explain_os_error, kernel_log::KernelLog};

#[derive(Debug, thiserror::Error)]
pub enum LoaderError {
    #[error(
        "this binary carries no eBPF object (it was built with AYA_BUILD_SKIP=1); rebuild \
         without it, e.g. `cargo build -p mesh-daemon`"
    )]
    EmptyObject,
    #[error("the embedded eBPF object could not be parsed: {0}")]
    Parse(#[source] aya::EbpfError),
    #[error("the eBPF object has no {kind} named {name}; the build is inconsistent")]
    Missing {
        kind: &'static str,
        name: &'static str,
    },
    #[error("{0}")]
    Program(String),
    #[error(
        "cgroup {} is not under the attach root {}; the hooks would never see it (pass a \
         --cgroup-root that contains it)",
        cgroup.display(),
        root.display()
    )]
    OutsideRoot { cgroup: PathBuf, root: PathBuf },
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        source: aya::maps::MapError,
    },
    #[error(transparent)]
    Cgroup(#[from] cgroup::CgroupError),
    #[error("cannot open cgroup folder {path}: {source}")]
    OpenCgroup {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "cannot pin the mesh's links under {path} ({reason}); fail-closed needs a bpffs there: \
         `mount -t bpf bpf /sys/fs/bpf` (`cargo xtask setup` does it), or run with --fail-open"
    )]
    Pin { path: PathBuf, reason: String },
}

impl LoaderError {
    /// Why a pod could not be enrolled, as a bounded label (`enroll_failures_total{reason}`).
    pub fn enroll_reason(&self) -> &'static str {
        match self {
            LoaderError::OutsideRoot { .. } => "outside_cgroup_root",
            LoaderError::Cgroup(cgroup::CgroupError::Read { .. }) => "cgroup_missing",
            LoaderError::Map { .. } => "map_full_or_error",
            _ => "other",
        }
    }
}

/// What the kernel side needs to know.
#[derive(Clone, Debug)]
pub struct DatapathConfig {
    /// cgroup v2 folder the programs attach to; every enrolled pod cgroup must be below it.
    pub cgroup_root: PathBuf,
    /// The outbound listener, as pods reach it.
    pub proxy_addr: SocketAddrV4,
    /// `SO_MARK` of the proxy's own sockets, exempt from capture.
    pub proxy_mark: u32,
    /// Rewrite captured connections to the proxy (off: record only).
    pub redirect: bool,
    /// Capture every connection of an enrolled pod, not only those to the mesh's destinations
    /// ([`Datapath::set_destinations`]).
    pub capture_all: bool,
    /// The same-node fast path: splice the proxy's two sockets of a same-node connection in the
    /// kernel (`nm_splice` on `NM_SPLICE`).
    pub sockmap: bool,
    /// Bytes the kernel may hold for a spliced direction's slow receiver before it pauses.
    pub splice_window: u64,
    /// The proxy's source addresses toward local pods (what STRICT pods accept).
    pub mesh_source: MeshSource,
    /// The outbound listener's further ports on `proxy_addr`'s address (empty: none): IPv4
    /// captures go to the one their destination hashes to.
    pub spread_ports: std::ops::Range<u16>,
    /// Fail closed: pin the capture links here so they outlive the daemon (connections from
    /// enrolled pods are then refused while it is down). `None`: fail open, links die with it.
    pub pin_dir: Option<PathBuf>,
}

/// How the daemon enrolls one pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EnrollSpec {
    pub workload_id: u32,
    pub strict: bool,
    pub probe_ports: Vec<u16>,
}

/// Records the kernel wrote for connections the proxy is about to accept, shared by the proxy's
/// tasks. Each record is taken (read and deleted) exactly once, so a later connection from the
/// same address and port can never inherit it.
pub struct OrigDstTable {
    map: Mutex<HashMap<MapData, ConnKey, OrigDst>>,
}

impl OrigDstTable {
    pub fn take(&self, key: &ConnKey) -> Option<OrigDst> {
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        let rec = map.get(key, 0).ok()?;
        // A failed delete leaves the entry to the LRU; the record was still read only once here.
        let _ = map.remove(key);
        Some(rec)
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Why two sockets could not be spliced; nothing was changed, so the connection can be relayed in
/// user space instead.
#[derive(Debug, thiserror::Error)]
#[error("cannot splice ({what})")]
pub struct SpliceError {
    what: String,
    /// A socket was no longer established (its peer had already closed): expected, not a fault.
    pub not_established: bool,
}

/// The maps of the same-node fast path (see `mesh-ebpf/src/splice.rs`).
pub struct SpliceMaps {
    splice: Mutex<SockHash<MapData, u64>>,
    peer: Mutex<SockHash<MapData, u64>>,
    bytes: Mutex<HashMap<MapData, u64, SpliceCount>>,
    control: Mutex<HashMap<MapData, u64, SpliceControl>>,
    /// Taken once by the task that reads it ([`SpliceMaps::take_events`]).
    events: Mutex<Option<RingBuf<MapData>>>,
    /// Who to wake for a socket's limit event, by cookie.
    waiters: Mutex<std::collections::HashMap<u64, Arc<tokio::sync::Notify>>>,
    window: u64,
}

impl SpliceMaps {
    /// Splices two established sockets, given with their cookies: from now on the kernel moves
    /// the bytes arriving on either one to the other's send queue. The peers and byte counters go
    /// in first, so the verdict — active from each socket's insertion into `NM_SPLICE` — always
    /// finds where to send. A socket leaves the maps when it is closed.
    ///
    /// Only established sockets can enter a socket map. If `a` is not (its client already sent
    /// its FIN), nothing is changed and this fails. If `b` is not (its server already closed),
    /// the splice is one-way: `a`'s bytes still move in the kernel, and `b`'s stay in its receive
    /// queue for the caller to read and relay (returns `false`).
    ///
    /// Both start moving in the kernel, with an event once `limit` bytes have arrived on either
    /// ([`Self::control`]); `wake` is notified on their events.
    pub fn join(
        &self,
        a: (BorrowedFd<'_>, u64),
        b: (BorrowedFd<'_>, u64),
        limit: u64,
        wake: &Arc<tokio::sync::Notify>,
    ) -> Result<bool, SpliceError> {
        let fail = |what: &str, e: aya::maps::MapError| {
            let _ = lock(&self.peer).remove(&a.1);
            let _ = lock(&self.peer).remove(&b.1);
            self.forget(a.1, b.1);
            // A socket map refuses a TCP socket that is not established with EOPNOTSUPP.
            let not_established = matches!(
                &e,
                aya::maps::MapError::SyscallError(aya::sys::SyscallError { io_error, .. })
                    if io_error.raw_os_error() == Some(libc::EOPNOTSUPP)
            );
            SpliceError {
                what: format!("{what}: {e}"),
                not_established,
            }
        };
        for cookie in [a.1, b.1] {
            lock(&self.waiters).insert(cookie, wake.clone());
            let r = lock(&self.bytes).insert(cookie, SpliceCount::default(), 0);
            r.map_err(|e| fail(map_names::SPLICE_BYTES, e))?;
            let ctl = SpliceControl {
                limit: limit.max(1),
                ..SpliceControl::default()
            };
            let r = lock(&self.control).insert(cookie, ctl, 0);
            r.map_err(|e| fail(map_names::SPLICE_CONTROL, e))?;
        }
        for (key, target) in [(a.1, b.0), (b.1, a.0)] {
            let r = lock(&self.peer).insert(key, target, 0);
            r.map_err(|e| fail(map_names::SPLICE_PEER, e))?;
        }
        let r = lock(&self.splice).insert(a.1, a.0, 0);
        r.map_err(|e| fail(map_names::SPLICE, e))?;
        // From here `a`'s bytes may already be on their way to `b`: no undoing.
        let r = lock(&self.splice).insert(b.1, b.0, 0);
        Ok(r.is_ok())
    }

    /// Bytes the kernel may hold for one direction's receiver before the splice pauses.
    pub fn window(&self) -> u64 {
        self.window
    }

    /// What the kernel did with the bytes that arrived on the socket with this cookie.
    pub fn count(&self, cookie: u64) -> SpliceCount {
        lock(&self.bytes).get(&cookie, 0).unwrap_or_default()
    }

    /// Bytes the kernel moved from the socket with this cookie to its peer.
    pub fn moved(&self, cookie: u64) -> u64 {
        self.count(cookie).moved
    }

    /// Tells `nm_splice` how to treat the socket with this cookie from its next segment on
    /// (pause, what the caller has relayed, when to send an event). False if it could not: the
    /// kernel goes on with what it had.
    pub fn control(&self, cookie: u64, ctl: SpliceControl) -> bool {
        lock(&self.control).insert(cookie, ctl, 0).is_ok()
    }

    /// Drops everything kept for a finished pair (the sockets leave the socket maps on close).
    pub fn forget(&self, a: u64, b: u64) {
        for cookie in [a, b] {
            let _ = lock(&self.bytes).remove(&cookie);
            let _ = lock(&self.control).remove(&cookie);
            lock(&self.waiters).remove(&cookie);
        }
    }

    /// The ring buffer of limit events, for the one task that reads it.
    pub fn take_events(&self) -> Option<RingBuf<MapData>> {
        lock(&self.events).take()
    }

    /// Wakes whoever serves the splice of this socket.
    pub fn wake(&self, cookie: u64) {
        if let Some(w) = lock(&self.waiters).get(&cookie) {
            w.notify_one();
        }
    }
}

/// The loaded and attached programs and their maps.
pub struct Datapath {
    // Owns the programs and their links; dropping it detaches everything.
    _ebpf: Ebpf,
    enrolled: HashMap<MapData, u64, Enrollment>,
    /// `NM_DESTINATIONS` and what it holds.
    destinations: (
        HashMap<MapData, mesh_common::DestKey, u8>,
        std::collections::BTreeSet<mesh_common::DestKey>,
    ),
    /// `--capture all`: `FLAG_CAPTURE_ALL` stays set (else it is cleared once the destinations
    /// are stored).
    capture_all: bool,
    counters: PerCpuArray<MapData, u64>,
    orig: Arc<OrigDstTable>,
    splice: Option<Arc<SpliceMaps>>,
    /// `nm_ingress`'s deny events, taken once by the task that reads them.
    deny_events: Option<RingBuf<MapData>>,
    /// `NM_CONFIG` and what it holds (the decision-log flag changes at run time).
    config: (Array<MapData, ProxyConfig>, ProxyConfig),
    /// The capture hooks' decision log (aya-log), taken once by the task that reads it.
    kernel_log: Option<aya_log::EbpfLogger<KernelLog>>,
    kernel_log_sink: KernelLog,
    cgroup_root: PathBuf,
    program_names: Vec<&'static str>,
    /// Links that outlive the daemon (fail closed), in this generation's pin folder.
    pinned: Vec<PinnedLink>,
    pin_generation: Option<PathBuf>,
    /// Fail open: links owned by the daemon alone, detached when it ends however it ends.
    _owned_links: Vec<FdLink>,
}

/// The cgroup/sock_addr programs and where each attaches.
const SOCK_ADDR_PROGRAMS: [&str; 4] = [
    prog_names::CONNECT4,
    prog_names::CONNECT6,
    prog_names::GETPEERNAME4,
    prog_names::GETPEERNAME6,
];

impl Datapath {
    /// Loads, configures and attaches everything; on error nothing stays attached.
    pub fn load(cfg: &DatapathConfig) -> Result<Self, LoaderError> {
        cgroup::ensure_cgroup2(&cfg.cgroup_root)?;
        let cgroup_file =
            File::open(&cfg.cgroup_root).map_err(|source| LoaderError::OpenCgroup {
                path: cfg.cgroup_root.clone(),
                source,
            })?;
        let mut ebpf = parse()?;

        let mut config: Array<MapData, ProxyConfig> = take_map(&mut ebpf, map_names::CONFIG)?;
        let mut flags = 0;
        if cfg.redirect {
            flags |= FLAG_REDIRECT;
        }
        // Everything is captured until the mesh's destinations are in NM_DESTINATIONS (the
        // first `set_destinations`): between attaching and the first state, an empty map would
        // let mesh traffic go direct, in plaintext.
        flags |= mesh_common::FLAG_CAPTURE_ALL;
        let pc = ProxyConfig {
            proxy_ip4: u32::from(*cfg.proxy_addr.ip()).to_be(),
            proxy_port: u32::from(cfg.proxy_addr.port()),
            proxy_ip6: [0; 4],
            proxy_mark: cfg.proxy_mark,
            flags,
            mesh_source4: u32::from(cfg.mesh_source.first()).to_be(),
            mesh_source4_mask: cfg.mesh_source.mask().to_be(),
            spread_port: u32::from(cfg.spread_ports.start),
            spread: cfg.spread_ports.len() as u32,
        };
        config.set(0, pc, 0).map_err(|source| LoaderError::Map {
            name: map_names::CONFIG,
            source,
        })?;
        let kernel_log_sink = KernelLog::default();
        let kernel_log = aya_log::EbpfLogger::init_with_logger(&mut ebpf, kernel_log_sink.clone())
            .map_err(|_| LoaderError::Missing {
                kind: "map",
                name: "AYA_LOGS",
            })?;

        let mut names = Vec::new();
        // Links that must survive the daemon to keep it fail-closed: capture and inbound
        // enforcement. (sockops and the splice only serve a running proxy.)
        let mut keep: Vec<(&'static str, FdLink)> = Vec::new();
        for name in SOCK_ADDR_PROGRAMS {
            let prog: &mut CgroupSockAddr = program(&mut ebpf, name)?;
            prog.load()
                .map_err(|e| program_error("loading", name, &e))?;
            let id = prog
                .attach(&cgroup_file, CgroupAttachMode::Single)
                .map_err(|e| program_error("attaching", name, &e))?;
            let link = prog
                .take_link(id)
                .map_err(|e| program_error("owning the link of", name, &e))?;
            keep.push((name, link_to_fd(name, link)?));
            names.push(name);
        }
        let ingress: &mut CgroupSkb = program(&mut ebpf, prog_names::INGRESS)?;
        ingress
            .load()
            .map_err(|e| program_error("loading", prog_names::INGRESS, &e))?;
        let id = ingress
            .attach(
                &cgroup_file,
                CgroupSkbAttachType::Ingress,
                CgroupAttachMode::Single,
            )
            .map_err(|e| program_error("attaching", prog_names::INGRESS, &e))?;
        let link = ingress
            .take_link(id)
            .map_err(|e| program_error("owning the link of", prog_names::INGRESS, &e))?;
        keep.push((prog_names::INGRESS, link_to_fd(prog_names::INGRESS, link)?));
        names.push(prog_names::INGRESS);
        let sockops: &mut SockOps = program(&mut ebpf, prog_names::SOCKOPS)?;
        sockops
            .load()
            .map_err(|e| program_error("loading", prog_names::SOCKOPS, &e))?;
        sockops
            .attach(&cgroup_file, CgroupAttachMode::Single)
            .map_err(|e| program_error("attaching", prog_names::SOCKOPS, &e))?;
        names.push(prog_names::SOCKOPS);

        let splice = if cfg.sockmap {
            let maps = SpliceMaps {
                splice: Mutex::new(take_map(&mut ebpf, map_names::SPLICE)?),
                peer: Mutex::new(take_map(&mut ebpf, map_names::SPLICE_PEER)?),
                bytes: Mutex::new(take_map(&mut ebpf, map_names::SPLICE_BYTES)?),
                control: Mutex::new(take_map(&mut ebpf, map_names::SPLICE_CONTROL)?),
                events: Mutex::new(Some(take_map(&mut ebpf, map_names::SPLICE_EVENTS)?)),
                waiters: Mutex::new(std::collections::HashMap::new()),
                window: cfg.splice_window,
            };
            let verdict: &mut SkSkb = program(&mut ebpf, prog_names::SPLICE)?;
            verdict
                .load()
                .map_err(|e| program_error("loading", prog_names::SPLICE, &e))?;
            verdict
                .attach(lock(&maps.splice).fd())
                .map_err(|e| program_error("attaching", prog_names::SPLICE, &e))?;
            names.push(prog_names::SPLICE);
            Some(Arc::new(maps))
        } else {
            None
        };

        let (pinned, pin_generation, owned_links) = match &cfg.pin_dir {
            Some(dir) => {
                let (p, g) = pin_links(dir, keep)?;
                (p, Some(g), Vec::new())
            }
            // Fail open: the links stay owned here and detach when the daemon ends.
            None => (Vec::new(), None, keep.into_iter().map(|(_, l)| l).collect()),
        };
        Ok(Self {
            enrolled: take_map(&mut ebpf, map_names::ENROLLED)?,
            destinations: (
                take_map(&mut ebpf, map_names::DESTINATIONS)?,
                Default::default(),
            ),
            capture_all: cfg.capture_all,
            counters: take_map(&mut ebpf, map_names::COUNTERS)?,
            orig: Arc::new(OrigDstTable {
                map: Mutex::new(take_map(&mut ebpf, map_names::ORIG_BY_ADDR)?),
            }),
            splice,
            deny_events: Some(take_map(&mut ebpf, map_names::DENY_EVENTS)?),
            config: (config, pc),
            kernel_log: Some(kernel_log),
            kernel_log_sink,
            _ebpf: ebpf,
            cgroup_root: cfg.cgroup_root.clone(),
            program_names: names,
            pinned,
            pin_generation,
            _owned_links: owned_links,
        })
    }

    /// Clean exit: removes this daemon's pins, so every program, link and map goes away when the
    /// [`Datapath`] drops.
    pub fn uninstall(mut self) -> Result<(), std::io::Error> {
        for link in self.pinned.drain(..) {
            drop(link.unpin()?);
        }
        if let Some(g) = self.pin_generation.take() {
            remove_dir_quiet(&g);
            if let Some(parent) = g.parent() {
                // Only when empty: another generation may still be in use.
                let _ = std::fs::remove_dir(parent);
            }
        }
        Ok(())
    }

    /// Makes `NM_DESTINATIONS` hold exactly `want` (the mesh's service ports and meshed pods):
    /// what is gone is deleted first, then what is new inserted, and then (without
    /// `--capture all`) the programs capture only those. On a failed insert (the map is full) the
    /// rest are still tried and everything is captured until a later call stores them all.
    pub fn set_destinations(
        &mut self,
        want: &std::collections::BTreeSet<mesh_common::DestKey>,
    ) -> Result<(), LoaderError> {
        let (map, held) = &mut self.destinations;
        let gone: Vec<_> = held.difference(want).copied().collect();
        for k in gone {
            let _ = map.remove(&k);
            held.remove(&k);
        }
        let mut failed = None;
        for k in want.difference(&held.clone()) {
            match map.insert(*k, 1, 0) {
                Ok(()) => {
                    held.insert(*k);
                }
                Err(source) => failed = Some(source),
            }
        }
        if let Some(source) = failed {
            // Until every destination is stored, everything is captured again: a mesh
            // destination missing from the map must go through the proxy, never direct.
            self.set_flag(mesh_common::FLAG_CAPTURE_ALL, true)?;
            return Err(LoaderError::Map {
                name: map_names::DESTINATIONS,
                source,
            });
        }
        if !self.capture_all {
            self.set_flag(mesh_common::FLAG_CAPTURE_ALL, false)?;
        }
        Ok(())
    }

    /// Captures connections from this pod-level cgroup (and everything below it) as `workload_id`.
    pub fn enroll(&mut self, cgroup_path: &Path, spec: &EnrollSpec) -> Result<u64, LoaderError> {
        if !cgroup_path.starts_with(&self.cgroup_root) {
            return Err(LoaderError::OutsideRoot {
                cgroup: cgroup_path.to_path_buf(),
                root: self.cgroup_root.clone(),
            });
        }
        let id = cgroup::cgroup_id(cgroup_path)?;
        let mut probe_ports = [0u16; MAX_PROBE_PORTS];
        for (slot, p) in probe_ports.iter_mut().zip(&spec.probe_ports) {
            *slot = *p;
        }
        let e = Enrollment {
            workload_id: spec.workload_id,
            flags: if spec.strict { ENROLL_STRICT } else { 0 },
            probe_ports,
        };
        self.enrolled
            .insert(id, e, 0)
            .map_err(|source| LoaderError::Map {
                name: map_names::ENROLLED,
                source,
            })?;
        Ok(id)
    }

    /// Stops capturing a cgroup; existing connections are unaffected.
    pub fn unenroll(&mut self, cgroup_id: u64) -> Result<(), LoaderError> {
        self.enrolled
            .remove(&cgroup_id)
            .map_err(|source| LoaderError::Map {
                name: map_names::ENROLLED,
                source,
            })
    }

    pub fn orig_dst_table(&self) -> Arc<OrigDstTable> {
        self.orig.clone()
    }

    /// The splice maps, when the same-node fast path is on.
    pub fn splice_maps(&self) -> Option<Arc<SpliceMaps>> {
        self.splice.clone()
    }

    /// The ring buffer of SYNs dropped for STRICT pods ([`mesh_common::DenyEvent`]), for the one
    /// task that reads it.
    pub fn take_deny_events(&mut self) -> Option<RingBuf<MapData>> {
        self.deny_events.take()
    }

    /// The capture hooks' decision log, for the one task that reads it, and the sink it writes
    /// to (to name pods once the state exists).
    pub fn take_kernel_log(&mut self) -> (Option<aya_log::EbpfLogger<KernelLog>>, KernelLog) {
        (self.kernel_log.take(), self.kernel_log_sink.clone())
    }

    /// Turns the capture hooks' decision log on or off (`FLAG_LOG_DECISIONS` in `NM_CONFIG`).
    pub fn log_decisions(&mut self, on: bool) -> Result<(), LoaderError> {
        self.set_flag(FLAG_LOG_DECISIONS, on)
    }

    /// Sets or clears one of `NM_CONFIG`'s flags (the programs read it at every run).
    fn set_flag(&mut self, flag: u32, on: bool) -> Result<(), LoaderError> {
        let (map, pc) = &mut self.config;
        let flags = if on {
            pc.flags | flag
        } else {
            pc.flags & !flag
        };
        if flags == pc.flags {
            return Ok(());
        }
        let next = ProxyConfig { flags, ..*pc };
        map.set(0, next, 0).map_err(|source| LoaderError::Map {
            name: map_names::CONFIG,
            source,
        })?;
        *pc = next;
        Ok(())
    }

    /// Entries per map, for `ebpf_map_entries{map}` and `/debug/ebpf`. Only the enrollment
    /// map: walking the capture-record map takes one syscall per entry under the lock the
    /// proxy's accepts need, which a once-a-second metric must not cost the data plane.
    /// Entries per map: `NM_ENROLLED` walked (one per local pod), `NM_ORIG_BY_COOKIE` from the
    /// kernel's counters — records stored, minus those that could not be, minus those freed with
    /// their socket — never by walking a 65 536-slot map once a second. (An LRU map's own
    /// evictions are not counted by the kernel; with records freed on close, they happen only
    /// past 65 536 live captured connections.)
    pub fn map_occupancy(&self) -> Vec<(&'static str, usize)> {
        let counters = self.counters();
        let get = |k: Counter| {
            counters
                .iter()
                .find(|(c, _)| *c == k)
                .map_or(0, |(_, v)| *v)
        };
        let live = get(Counter::Redirected)
            .saturating_sub(get(Counter::RecordStoreFailed))
            .saturating_sub(get(Counter::RecordFreed));
        vec![
            (
                map_names::ENROLLED,
                self.enrolled.keys().filter(Result::is_ok).count(),
            ),
            (
                map_names::ORIG_BY_COOKIE,
                usize::try_from(live).unwrap_or(usize::MAX),
            ),
            (map_names::DESTINATIONS, self.destinations.1.len()),
        ]
    }

    pub fn program_names(&self) -> &[&'static str] {
        &self.program_names
    }

    /// The kernel's counters, summed over CPUs, in `Counter::ALL` order.
    pub fn counters(&self) -> Vec<(Counter, u64)> {
        Counter::ALL
            .iter()
            .map(|&c| {
                let sum = self
                    .counters
                    .get(&(c as u32), 0)
                    .map(|v| v.iter().copied().sum())
                    .unwrap_or(0);
                (c, sum)
            })
            .collect()
    }
}

/// The owned link of a program, as a plain link fd that can be pinned.
fn link_to_fd<L>(name: &'static str, link: L) -> Result<FdLink, LoaderError>
where
    FdLink: TryFrom<L, Error = aya::programs::links::LinkError>,
{
    FdLink::try_from(link).map_err(|e| {
        LoaderError::Program(format!(
            "eBPF program {name} is not attached with a bpf_link ({e}); this kernel is too old \
             for nodemesh"
        ))
    })
}

/// The magic number of a bpffs (linux/magic.h).
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// Pins `links` in a new generation folder below `dir`, then removes older generations (links a
/// crashed or replaced daemon left pinned); the new links are attached before the old ones go, so
/// the cgroups are never without capture.
fn pin_links(
    dir: &Path,
    links: Vec<(&'static str, FdLink)>,
) -> Result<(Vec<PinnedLink>, PathBuf), LoaderError> {
    let pin_err = |reason: String| LoaderError::Pin {
        path: dir.to_path_buf(),
        reason,
    };
    std::fs::create_dir_all(dir).map_err(|e| pin_err(e.to_string()))?;
    let cdir = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes())
        .map_err(|e| pin_err(e.to_string()))?;
    // SAFETY: statfs writes into a zeroed local; the path is a valid C string.
    let magic = unsafe {
        let mut st: libc::statfs = std::mem::zeroed();
        if libc::statfs(cdir.as_ptr(), &mut st) != 0 {
            return Err(pin_err(std::io::Error::last_os_error().to_string()));
        }
        st.f_type as i64
    };
    if magic != BPF_FS_MAGIC {
        return Err(pin_err("it is not on a bpf filesystem".into()));
    }
    let old: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| pin_err(e.to_string()))?
        .flatten()
        .map(|e| e.path())
        .collect();
    let generation = dir.join(format!(
        "gen-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis())
            .unwrap_or(0)
    ));
    std::fs::create_dir(&generation).map_err(|e| pin_err(e.to_string()))?;
    let mut pinned = Vec::new();
    for (name, link) in links {
        match link.pin(generation.join(name)) {
            Ok(p) => pinned.push(p),
            Err(e) => {
                for p in pinned {
                    let _ = p.unpin();
                }
                remove_dir_quiet(&generation);
                return Err(pin_err(format!("pinning {name}: {e}")));
            }
        }
    }
    for o in old {
        tracing::info!(path = %o.display(), "removing links left pinned by an earlier daemon");
        remove_dir_quiet(&o);
    }
    Ok((pinned, generation))
}

fn remove_dir_quiet(p: &Path) {
    let _ = std::fs::remove_dir_all(p);
}

/// `mesh-daemon uninstall`: removes every link the mesh pinned under `dir` (all generations), so
/// the kernel detaches and frees the programs and maps once no daemon holds them. Returns the
/// pins removed.
pub fn uninstall(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut removed = Vec::new();
    if !dir.exists() {
        return Ok(removed);
    }
    let mut stack = vec![dir.to_path_buf()];
    let mut dirs = Vec::new();
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d)?.flatten() {
            let p = e.path();
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                stack.push(p);
            } else {
                std::fs::remove_file(&p)?;
                removed.push(p);
            }
        }
        dirs.push(d);
    }
    for d in dirs.iter().rev() {
        std::fs::remove_dir(d)?;
    }
    Ok(removed)
}

fn parse() -> Result<Ebpf, LoaderError> {
    if OBJECT.is_empty() {
        return Err(LoaderError::EmptyObject);
    }
    EbpfLoader::new().load(OBJECT).map_err(|e| match &e {
        aya::EbpfError::MapError(aya::maps::MapError::CreateError { name, io_error }) => {
            LoaderError::Program(explain_os_error(&format!("creating map {name}"), io_error))
        }
        _ => LoaderError::Parse(e),
    })
}

fn take_map<M>(ebpf: &mut Ebpf, name: &'static str) -> Result<M, LoaderError>
where
    M: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let map = ebpf
        .take_map(name)
        .ok_or(LoaderError::Missing { kind: "map", name })?;
    M::try_from(map).map_err(|source| LoaderError::Map { name, source })
}

fn program<'a, P>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut P, LoaderError>
where
    &'a mut P: TryFrom<&'a mut aya::programs::Program, Error = ProgramError>,
{
    let p = ebpf.program_mut(name).ok_or(LoaderError::Missing {
        kind: "program",
        name,
    })?;
    p.try_into()
        .map_err(|e: ProgramError| program_error("preparing", name, &e))
}

/// One sentence for a failed load or attach, with the verifier's last lines when it refused.
pub fn program_error(action: &str, name: &str, err: &ProgramError) -> LoaderError {
    LoaderError::Program(describe_program_error(action, name, err))
}

pub fn describe_program_error(action: &str, name: &str, err: &ProgramError) -> String {
    let what = format!("{action} eBPF program {name}");
    match err {
        ProgramError::LoadError {
            io_error,
            verifier_log,
        } => {
            let log = verifier_log.to_string();
            // EACCES with a verifier log is the verifier refusing the program, not a permission
            // problem; EPERM (or an empty log) is the missing capability.
            if io_error.raw_os_error() == Some(libc::EPERM) || log.trim().is_empty() {
                explain_os_error(&what, io_error)
            } else {
                let tail: Vec<&str> = log.lines().rev().take(8).collect();
                let tail: Vec<&str> = tail.into_iter().rev().collect();
                format!(
                    "{what}: the verifier refused it ({io_error}); last lines:\n{}",
                    tail.join("\n")
                )
            }
        }
        ProgramError::SyscallError(aya::sys::SyscallError { call, io_error }) => {
            explain_os_error(&format!("{what} ({call})"), io_error)
        }
        other => format!("{what} failed: {other}"),
    }
}

/// A program's name and whether this kernel accepted it (the reason when not).
pub type ProbeResult = (&'static str, Result<(), String>);

/// Loads (without attaching) every program of the object and reports each result: the preflight's
/// proof that this kernel accepts what the mesh uses.
pub fn probe_programs() -> Result<Vec<ProbeResult>, LoaderError> {
    let mut ebpf = parse()?;
    let mut out: Vec<ProbeResult> = SOCK_ADDR_PROGRAMS
        .iter()
        .map(|&name| probe_one(&mut ebpf, name, CgroupSockAddr::load))
        .collect();
    out.push(probe_one(&mut ebpf, prog_names::SOCKOPS, SockOps::load));
    out.push(probe_one(&mut ebpf, prog_names::SPLICE, SkSkb::load));
    out.push(probe_one(&mut ebpf, prog_names::INGRESS, CgroupSkb::load));
    Ok(out)
}

/// Loads one program of type `P` (aya's program types share no `load` trait, so it is passed in).
fn probe_one<'a, P: 'a>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
    load: impl FnOnce(&mut P) -> Result<(), ProgramError>,
) -> ProbeResult
where
    &'a mut P: TryFrom<&'a mut aya::programs::Program, Error = ProgramError>,
{
    let r = program::<P>(ebpf, name)
        .map_err(|e| e.to_string())
        .and_then(|p| load(p).map_err(|e| describe_program_error("loading", name, &e)));
    (name, r)
}
