//! `cargo xtask bench kernel-log`: what the capture hooks' decision log costs in the kernel, off
//! (the default) and on (`/logging?level=info,nodemesh::ebpf=debug`).
//!
//! With `kernel.bpf_stats_enabled` the kernel times every run of every program. A pod on one
//! node makes short connections to a pod beside it; each round reads `nm_connect4`'s run time
//! per run (nanoseconds, the kernel's own clock) over 2000 connects, alternating off and on so
//! drift on a shared machine hits both alike. The report gives the medians over rounds, the
//! min–max, and on/off. Numbers, not assertions: the machine is shared and noisy.

use std::{path::Path, process::Command, time::Duration};

use nodemesh_tests::{
    require_root,
    topology::{DaemonOpts, PodSpec, Topology, http_request},
};

const ROUNDS: usize = 9;
const CONNECTS: &str = "2000";
const STATS: &str = "/proc/sys/kernel/bpf_stats_enabled";

/// Turns the kernel's program statistics on, and back to what they were when dropped.
struct BpfStats(String);

impl BpfStats {
    fn enable() -> Self {
        let was = std::fs::read_to_string(STATS).expect("read bpf_stats_enabled");
        std::fs::write(STATS, "1").expect("enable bpf_stats_enabled");
        Self(was.trim().to_string())
    }
}

impl Drop for BpfStats {
    fn drop(&mut self) {
        let _ = std::fs::write(STATS, &self.0);
    }
}

/// (run_time_ns, run_cnt) of program `id`, from bpftool.
fn run_stats(id: u32) -> (u64, u64) {
    let out = Command::new("bpftool")
        .args(["prog", "show", "id", &id.to_string(), "-j"])
        .output()
        .expect("run bpftool");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("bpftool JSON");
    (
        v["run_time_ns"].as_u64().unwrap_or(0),
        v["run_cnt"].as_u64().unwrap_or(0),
    )
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    require_root("cargo xtask bench kernel-log");
    let pods = [
        PodSpec::meshed("client", 0, "client"),
        PodSpec::meshed("server", 0, "echo"),
    ];
    let mut t = Topology::build("bkl", 1, &pods, &[]);
    t.start(DaemonOpts::default());
    t.serve("server", "echo-server", 7000);
    let server = format!("{}:7000", t.pod("server").ip);
    // This topology's nm_connect4: among the programs attached under its cgroup, the one of that
    // name.
    let connect4 = t
        .footprint()
        .progs
        .into_iter()
        .find(|id| {
            Command::new("bpftool")
                .args(["prog", "show", "id", &id.to_string(), "-j"])
                .output()
                .ok()
                .and_then(|o| serde_json::from_slice::<serde_json::Value>(&o.stdout).ok())
                .is_some_and(|v| v["name"] == "nm_connect4")
        })
        .expect("this topology's nm_connect4");
    let _stats = BpfStats::enable();
    let set = |t: &Topology, filter: &str| {
        let r = http_request(
            &t.nodes[0].ns,
            "127.0.0.1:15000",
            &format!("POST /logging?level={filter}"),
        );
        assert!(r.contains(" 200 "), "{filter}: {r}");
    };
    let (mut off, mut on) = (Vec::new(), Vec::new());
    for round in 0..ROUNDS {
        for (label, filter) in [("off", "info"), ("on", "info,nodemesh::ebpf=debug")] {
            set(&t, filter);
            std::thread::sleep(Duration::from_millis(100));
            let (t0, c0) = run_stats(connect4);
            let (ok, out) = t.connect("client", &server, &["--send", "10", "--repeat", CONNECTS]);
            assert!(ok, "round {round} {label}: {out}");
            let (t1, c1) = run_stats(connect4);
            let ns = (t1 - t0) as f64 / (c1 - c0).max(1) as f64;
            println!(
                "round {round} log {label}: nm_connect4 {ns:.0} ns per run over {} runs",
                c1 - c0
            );
            if label == "off" {
                off.push(ns);
            } else {
                on.push(ns);
            }
        }
    }
    set(&t, "info");
    let range = |v: &[f64]| {
        let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = v.iter().copied().fold(0.0, f64::max);
        format!("{lo:.0}–{hi:.0}")
    };
    let (m_off, m_on) = (median(off.clone()), median(on.clone()));
    println!(
        "\nnm_connect4, ns per run (median of {ROUNDS} rounds of {CONNECTS} connects, min–max):\n  \
         decision log off: {m_off:.0} ({})\n  decision log on:  {m_on:.0} ({})\n  on/off: {:.2}",
        range(&off),
        range(&on),
        m_on / m_off
    );
    let out = Path::new(env!("CARGO_MANIFEST_DIR")).join("../bench/kernel-log.json");
    let json = serde_json::json!({
        "program": "nm_connect4",
        "connects_per_round": CONNECTS,
        "rounds": ROUNDS,
        "ns_per_run_off": off,
        "ns_per_run_on": on,
        "median_off": m_off,
        "median_on": m_on,
        "on_over_off": m_on / m_off,
    });
    std::fs::write(&out, format!("{json:#}\n")).expect("write bench/kernel-log.json");
    println!("written to {}", out.display());
}
