//! `cargo xtask bench`: per-node versus sidecar, measured on this machine.
//!
//! Every mode gets the same two-node topology (network namespaces, real kernel hooks, mTLS
//! between proxies): `baseline` (no mesh), `sidecar` (one `mesh-daemon run --mode sidecar` per
//! pod) and `node` (one daemon per node) put the server pod on the other node; `baseline (same
//! node)`, `node (same node)` and `node+sockmap (same node)` put it next to the client, where the
//! node daemon relays in user space or, with `--sockmap on`, splices in the kernel.
//! A client pod on node 1 drives the server pod with well-known tools: h2load (HTTP/1.1
//! at a fixed 1000 req/s for latency; HTTP/1.1 and HTTP/2 flat out for throughput), iperf3 (one
//! TCP stream) and the project's own client for new connections per second. Rounds interleave
//! the modes so drift on a shared machine hits all alike; the report gives medians with min–max.
//! The scale scenario builds 1…100 pods per node in node and sidecar mode side by side and sums
//! the proxies' memory and CPU per node while every pod holds idle connections and a trickle of
//! requests.
//!
//! A mode whose proxy crashes, or a run with errors in the tool's output, is marked failed with
//! the reason; no number is printed for it.
//!
//! The parts: [`topology`] builds the test beds, [`scenarios`] runs the measurements and records
//! each round as a typed value, [`measurement`] reads the processes and the tools' output,
//! [`statistics`] summarises rounds (medians, min–max, differences), [`report`] writes
//! `results.json` and `RESULTS.md` (keeping the hand-written notes below its marker line) and
//! [`plot`] draws `latency.svg` and `scale.svg`.

mod measurement;
mod plot;
mod report;
mod scenarios;
mod statistics;
mod topology;

use std::{collections::BTreeMap, path::PathBuf, time::Instant};

use nodemesh_tests::require_root;

use crate::{
    measurement::pss_kib,
    report::Results,
    scenarios::{Runs, ScalePoint, Scenario, scale_point},
    topology::{Bed, build_bed, proxies},
};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Mode {
    Baseline,
    Sidecar,
    Node,
    BaselineLocal,
    NodeLocal,
    NodeLocalSockmap,
    /// Node mode with L7: the client calls a service VIP whose HTTPRoute is in force.
    NodeL7,
    /// Sidecar mode with L7, the same way.
    SidecarL7,
}

const MODES: [Mode; 8] = [
    Mode::Baseline,
    Mode::Sidecar,
    Mode::Node,
    Mode::BaselineLocal,
    Mode::NodeLocal,
    Mode::NodeLocalSockmap,
    Mode::NodeL7,
    Mode::SidecarL7,
];

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Self::Baseline => "baseline",
            Self::Sidecar => "sidecar",
            Self::Node => "node",
            Self::BaselineLocal => "baseline (same node)",
            Self::NodeLocal => "node (same node)",
            Self::NodeLocalSockmap => "node+sockmap (same node)",
            Self::NodeL7 => "node L7",
            Self::SidecarL7 => "sidecar L7",
        }
    }
    fn tag(self) -> &'static str {
        match self {
            Self::Baseline => "bb",
            Self::Sidecar => "bs",
            Self::Node => "bn",
            Self::BaselineLocal => "bl",
            Self::NodeLocal => "bo",
            Self::NodeLocalSockmap => "bk",
            Self::NodeL7 => "b7",
            Self::SidecarL7 => "bz",
        }
    }
    /// Requests go to a service VIP with a route, served per request (the other modes call the
    /// server pod's address: L4).
    fn is_l7(self) -> bool {
        matches!(self, Self::NodeL7 | Self::SidecarL7)
    }
    /// No mesh at all.
    fn is_baseline(self) -> bool {
        matches!(self, Self::Baseline | Self::BaselineLocal)
    }
    /// Client and server pod on the same node.
    fn same_node(self) -> bool {
        matches!(
            self,
            Self::BaselineLocal | Self::NodeLocal | Self::NodeLocalSockmap
        )
    }
    /// What this mode's "added" and ratios are measured against: the baseline with the same
    /// placement.
    fn baseline(self) -> Self {
        if self.same_node() {
            Self::BaselineLocal
        } else {
            Self::Baseline
        }
    }
}

/// A mode is written as its name (the keys of `results.json`'s per-mode maps).
impl serde::Serialize for Mode {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

/// What a run measures, and for how long.
#[derive(Clone, Debug)]
struct Plan {
    quick: bool,
    rounds: usize,
    latency_secs: u64,
    max_secs: u64,
    iperf_secs: u64,
    connections: u32,
    scale_pods: Vec<usize>,
    scale_rounds: usize,
    scale_secs: u64,
}

impl Plan {
    fn new(quick: bool) -> Self {
        if quick {
            Self {
                quick,
                rounds: 3,
                latency_secs: 4,
                max_secs: 3,
                iperf_secs: 3,
                connections: 300,
                scale_pods: vec![1, 10],
                scale_rounds: 3,
                scale_secs: 4,
            }
        } else {
            Self {
                quick,
                rounds: 5,
                latency_secs: 15,
                max_secs: 8,
                iperf_secs: 8,
                connections: 1500,
                scale_pods: vec![1, 10, 50, 100],
                scale_rounds: 3,
                scale_secs: 10,
            }
        }
    }
}

/// Set by SIGINT/SIGTERM: the run stops at the next boundary and the guards remove every
/// namespace, cgroup, pin and process it made (a signal's default action would leave them).
static STOP: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, std::sync::atomic::Ordering::Relaxed);
}

fn stopped() -> bool {
    STOP.load(std::sync::atomic::Ordering::Relaxed)
}

fn main() {
    require_root("mesh-bench");
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        unsafe { libc::signal(sig, on_signal as *const () as libc::sighandler_t) };
    }
    let args: Vec<String> = std::env::args().skip(1).collect();
    let quick = args.iter().any(|a| a == "--quick");
    let out_dir = args
        .iter()
        .position(|a| a == "--out")
        .and_then(|i| args.get(i + 1))
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("bench"));
    let plan = Plan::new(quick);
    let started = Instant::now();
    eprintln!("mesh-bench: {plan:?}");

    // --- the two-pod scenarios, all modes up side by side, interleaved per round ---
    let mut beds: BTreeMap<Mode, Result<Bed, String>> = BTreeMap::new();
    for m in MODES {
        if stopped() {
            break;
        }
        eprintln!("mesh-bench: building {}", m.name());
        let bed = guarded(|| build_bed(m)).and_then(|b| b);
        if let Err(e) = &bed {
            eprintln!("mesh-bench: {} is marked failed: {e}", m.name());
        }
        beds.insert(m, bed);
    }
    let mut runs = Runs::default();
    for r in 0..plan.rounds {
        for scenario in Scenario::ALL {
            for m in MODES {
                if stopped() {
                    break;
                }
                let outcome = runs.run(scenario, m, beds.get_mut(&m), &plan);
                eprintln!(
                    "  round {} {} {}: {outcome}",
                    r + 1,
                    scenario.name(),
                    m.name()
                );
            }
        }
    }
    let proxy_memory: BTreeMap<Mode, Option<f64>> = beds
        .iter()
        .map(|(m, b)| {
            let v = b.as_ref().ok().filter(|b| !b.mode.is_baseline()).map(|b| {
                proxies(&b.t)
                    .iter()
                    .map(|(_, pid)| pss_kib(*pid))
                    .sum::<f64>()
                    / 1024.0
            });
            (*m, v)
        })
        .collect();
    drop(beds);

    // --- scale: node vs the sum of sidecars, per node, 1…100 pods per node ---
    let mut scale: Vec<ScalePoint> = Vec::new();
    for &n in &plan.scale_pods {
        if stopped() {
            break;
        }
        eprintln!("mesh-bench: scale with {n} pod(s) per node");
        scale.push(scale_point(n, &plan));
    }

    if stopped() {
        eprintln!("mesh-bench: interrupted; everything it set up is removed, no report written");
        std::process::exit(130);
    }
    let results = Results {
        machine: measurement::machine(),
        plan,
        runs,
        proxy_pss_mib_two_pods: proxy_memory,
        scale,
        elapsed: started.elapsed(),
    };
    report::write(&results, &out_dir);
    println!(
        "mesh-bench: wrote {}/results.json, RESULTS.md, latency.svg, scale.svg in {:.0?}",
        out_dir.display(),
        started.elapsed()
    );
}

/// Runs `f`, turning a panic (a topology that could not be built, a daemon that never became
/// ready) into an error that names it.
fn guarded<T>(f: impl FnOnce() -> T) -> Result<T, String> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).map_err(|p| {
        p.downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "panicked".into())
            .lines()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    })
}
