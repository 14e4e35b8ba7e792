//! Reading what was measured: a process's CPU time and memory from `/proc`, the BPF map memory
//! it holds, the tools' output (h2load, iperf3, mesh-app), running a tool, and the machine the
//! run is on.

use std::{collections::BTreeMap, process::Command};

use serde::{Deserialize, Serialize};

/// CPU time of a process, all threads, in seconds (schedstat's nanoseconds: ticks are too coarse
/// for an idle proxy over a few seconds).
pub fn cpu_seconds(pid: u32) -> f64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0.0;
    };
    tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<f64>().ok())
        .sum::<f64>()
        / 1e9
}

fn status_kib(pid: u32, file: &str, key: &str) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/{file}"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

/// Proportional set size: shared pages (the binary's text) split among the processes using
/// them, so summing over 100 sidecars does not count the binary 100 times.
pub fn pss_kib(pid: u32) -> f64 {
    status_kib(pid, "smaps_rollup", "Pss:")
}

pub fn rss_kib(pid: u32) -> f64 {
    status_kib(pid, "status", "VmRSS:")
}

/// Kernel memory of the BPF maps the given processes hold open (`memlock` in each map fd's
/// fdinfo; a map held by several of them counts once).
pub fn map_kib(pids: &[u32]) -> f64 {
    let mut maps: BTreeMap<u64, f64> = BTreeMap::new();
    for pid in pids {
        let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fdinfo")) else {
            continue;
        };
        for fd in fds.flatten() {
            let info = std::fs::read_to_string(fd.path()).unwrap_or_default();
            let field = |k: &str| {
                info.lines()
                    .find_map(|l| l.strip_prefix(k))
                    .and_then(|v| v.trim().parse::<u64>().ok())
            };
            if let (Some(id), Some(bytes)) = (field("map_id:"), field("memlock:")) {
                maps.insert(id, bytes as f64);
            }
        }
    }
    maps.values().sum::<f64>() / 1024.0
}

/// h2load's summary: (succeeded, req/s), or why the run does not count.
pub fn h2load_summary(out: &str) -> Result<(f64, f64), String> {
    let reqs = out
        .lines()
        .find(|l| l.starts_with("requests:"))
        .ok_or_else(|| format!("no summary in h2load's output: {}", tail(out)))?;
    let num = |key: &str| -> f64 {
        reqs.split(',')
            .find(|p| p.trim().ends_with(key))
            .and_then(|p| p.split_whitespace().rev().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(f64::NAN)
    };
    let (ok, failed, errored, timeout) = (
        num("succeeded"),
        num("failed"),
        num("errored"),
        num("timeout"),
    );
    if ok.is_nan() || ok <= 0.0 || failed > 0.0 || errored > 0.0 || timeout > 0.0 {
        return Err(format!("h2load reported errors: {}", reqs.trim()));
    }
    let rps = out
        .lines()
        .find(|l| l.starts_with("finished in"))
        .and_then(|l| l.split(',').nth(1))
        .and_then(|p| p.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| format!("no rate in h2load's output: {}", tail(out)))?;
    Ok((ok, rps))
}

/// The latencies (µs) of the requests answered 200 in h2load's `--log-file`, in log order.
pub fn h2load_latencies(log: &str) -> Vec<f64> {
    log.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split('\t').collect();
            (f.get(1) == Some(&"200")).then(|| f.get(2)?.parse::<f64>().ok())?
        })
        .collect()
}

/// The part of `iperf3 -J`'s report the bench reads.
#[derive(Deserialize)]
struct IperfReport {
    error: Option<String>,
    end: Option<IperfEnd>,
}

#[derive(Deserialize)]
struct IperfEnd {
    sum_received: Option<IperfSum>,
}

#[derive(Deserialize)]
struct IperfSum {
    bits_per_second: Option<f64>,
}

/// The received rate (bits/s) from `iperf3 -J`'s stdout, or why there is none (`stderr` for
/// context when the JSON is unreadable).
pub fn iperf_bits_per_second(stdout: &[u8], stderr: &[u8]) -> Result<f64, String> {
    let report: IperfReport = serde_json::from_slice(stdout).map_err(|e| {
        format!(
            "iperf3's JSON: {e}: {}",
            tail(&String::from_utf8_lossy(stderr))
        )
    })?;
    if let Some(e) = report.error {
        return Err(format!("iperf3: {e}"));
    }
    report
        .end
        .and_then(|e| e.sum_received?.bits_per_second)
        .ok_or_else(|| "iperf3 reported no received rate".to_string())
}

/// A `key=value` number in `mesh-app`'s output (`--stats`), if it printed one.
pub fn mesh_app_field(out: &str, key: &str) -> Option<f64> {
    out.split_whitespace()
        .find_map(|w| w.strip_prefix(&format!("{key}=")))
        .and_then(|v| v.parse::<f64>().ok())
}

/// The last four lines of a tool's output, on one line, for an error message.
pub fn tail(s: &str) -> String {
    let l: Vec<&str> = s.lines().rev().take(4).collect();
    l.into_iter().rev().collect::<Vec<_>>().join(" | ")
}

/// Runs a tool to its end: its stdout and stderr together, or why it failed.
pub fn run(cmd: &mut Command) -> Result<String, String> {
    let out = cmd.output().map_err(|e| format!("cannot start: {e}"))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if !out.status.success() {
        return Err(format!("exited with {}: {}", out.status, tail(&text)));
    }
    Ok(text)
}

/// The machine, kernel and tool versions a run was measured with.
#[derive(Clone, Debug, Serialize)]
pub struct Machine {
    pub cpu: String,
    pub cpus: usize,
    pub memory: String,
    pub kernel: String,
    pub os: String,
    pub h2load: String,
    pub iperf3: String,
    /// `git describe --always --dirty` of the tree.
    pub nodemesh: String,
    /// When the measurements ended (UTC), just before the report was written.
    pub date: String,
}

pub fn machine() -> Machine {
    let cmd = |c: &str, a: &[&str]| {
        Command::new(c)
            .args(a)
            .output()
            .ok()
            .map(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .lines()
                    .next()
                    .unwrap_or_default()
                    .trim()
                    .to_string()
            })
            .unwrap_or_default()
    };
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_string())
        .unwrap_or_default();
    let os = std::fs::read_to_string("/etc/os-release")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("PRETTY_NAME="))
        .unwrap_or_default()
        .trim_matches('"')
        .to_string();
    let memory = std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .next()
        .unwrap_or_default()
        .trim_start_matches("MemTotal:")
        .trim()
        .to_string();
    Machine {
        cpu,
        cpus: std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0),
        memory,
        kernel: cmd("uname", &["-r"]),
        os,
        h2load: cmd("h2load", &["--version"]),
        iperf3: cmd("iperf3", &["--version"]),
        nodemesh: cmd("git", &["describe", "--always", "--dirty"]),
        date: cmd("date", &["-u", "+%Y-%m-%dT%H:%M:%SZ"]),
    }
}
