//! Loads the embedded kernel object, attaches its programs under the cgroup root, and owns the
//! maps the daemon reads and writes. Dropping the [`Datapath`] detaches every program (aya's
//! links are owned by the programs), which is the clean-exit half of uninstall.

use std::{
    fs::File,
    net::SocketAddrV4,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, MapData, PerCpuArray, SockHash},
    programs::{CgroupAttachMode, CgroupSockAddr, ProgramError, SkMsg, SockOps},
};
use mesh_common::{
    ConnKey, Counter, Enrollment, FLAG_REDIRECT, FLAG_SOCKMAP, OrigDst, ProxyConfig, SockKey,
    map_names, prog_names,
};

use super::{OBJECT, cgroup, explain_os_error};

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
    /// Put sockets in the SOCKHASH for the sk_msg fast path.
    pub sockmap: bool,
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

/// The loaded and attached programs and their maps.
pub struct Datapath {
    // Owns the programs and their links; dropping it detaches everything.
    _ebpf: Ebpf,
    enrolled: HashMap<MapData, u64, Enrollment>,
    counters: PerCpuArray<MapData, u64>,
    orig: Arc<OrigDstTable>,
    cgroup_root: PathBuf,
    program_names: Vec<&'static str>,
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
        if cfg.sockmap {
            flags |= FLAG_SOCKMAP;
        }
        let pc = ProxyConfig {
            proxy_ip4: u32::from(*cfg.proxy_addr.ip()).to_be(),
            proxy_port: u32::from(cfg.proxy_addr.port()),
            proxy_ip6: [0; 4],
            proxy_mark: cfg.proxy_mark,
            flags,
        };
        config.set(0, pc, 0).map_err(|source| LoaderError::Map {
            name: map_names::CONFIG,
            source,
        })?;

        let mut names = Vec::new();
        for name in SOCK_ADDR_PROGRAMS {
            let prog: &mut CgroupSockAddr = program(&mut ebpf, name)?;
            prog.load()
                .map_err(|e| program_error("loading", name, &e))?;
            prog.attach(&cgroup_file, CgroupAttachMode::Single)
                .map_err(|e| program_error("attaching", name, &e))?;
            names.push(name);
        }
        let sockops: &mut SockOps = program(&mut ebpf, prog_names::SOCKOPS)?;
        sockops
            .load()
            .map_err(|e| program_error("loading", prog_names::SOCKOPS, &e))?;
        sockops
            .attach(&cgroup_file, CgroupAttachMode::Single)
            .map_err(|e| program_error("attaching", prog_names::SOCKOPS, &e))?;
        names.push(prog_names::SOCKOPS);

        let sockhash: SockHash<MapData, SockKey> = take_map(&mut ebpf, map_names::SOCKHASH)?;
        let sk_msg: &mut SkMsg = program(&mut ebpf, prog_names::SK_MSG)?;
        sk_msg
            .load()
            .map_err(|e| program_error("loading", prog_names::SK_MSG, &e))?;
        sk_msg
            .attach(sockhash.fd())
            .map_err(|e| program_error("attaching", prog_names::SK_MSG, &e))?;
        names.push(prog_names::SK_MSG);

        Ok(Self {
            enrolled: take_map(&mut ebpf, map_names::ENROLLED)?,
            counters: take_map(&mut ebpf, map_names::COUNTERS)?,
            orig: Arc::new(OrigDstTable {
                map: Mutex::new(take_map(&mut ebpf, map_names::ORIG_BY_ADDR)?),
            }),
            _ebpf: ebpf,
            cgroup_root: cfg.cgroup_root.clone(),
            program_names: names,
        })
    }

    /// Captures connections from this pod-level cgroup (and everything below it) as `workload_id`.
    pub fn enroll(&mut self, cgroup_path: &Path, workload_id: u32) -> Result<u64, LoaderError> {
        if !cgroup_path.starts_with(&self.cgroup_root) {
            return Err(LoaderError::Program(format!(
                "cgroup {} is not under the attach root {}; the hooks would never see it \
                 (pass a --cgroup-root that contains it)",
                cgroup_path.display(),
                self.cgroup_root.display()
            )));
        }
        let id = cgroup::cgroup_id(cgroup_path)?;
        let e = Enrollment {
            workload_id,
            flags: 0,
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
    out.push(probe_one(&mut ebpf, prog_names::SK_MSG, SkMsg::load));
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
