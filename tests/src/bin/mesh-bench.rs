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

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use nodemesh_tests::{
    bin,
    cgroup::join_on_exec,
    process::Proc,
    require_root,
    topology::{DaemonOpts, PodSpec, Topology},
};
use serde_json::{Value, json};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Mode {
    Baseline,
    Sidecar,
    Node,
    BaselineLocal,
    NodeLocal,
    NodeLocalSockmap,
}

const MODES: [Mode; 6] = [
    Mode::Baseline,
    Mode::Sidecar,
    Mode::Node,
    Mode::BaselineLocal,
    Mode::NodeLocal,
    Mode::NodeLocalSockmap,
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
        }
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

const HTTP_PORT: u16 = 8080;
const IPERF_PORT: u16 = 5201;
const ECHO_PORT: u16 = 7000;
/// The Istio method: 1000 req/s over 16 connections, 1 KB responses.
const LATENCY_RPS: f64 = 1000.0;
const LATENCY_CONNS: u32 = 16;
const MAX_CONNS: u32 = 64;
const H2_STREAMS: u32 = 10;

/// One mode's topology with its upstreams running.
struct Bed {
    mode: Mode,
    t: Topology,
    server_ip: String,
}

type Sample = BTreeMap<String, f64>;
type Outcome = Result<Sample, String>;
type Scenario = fn(&mut Bed, &Plan) -> Outcome;
/// A scale topology with its clients holding connections.
type ScaleBed = (Topology, Vec<Proc>);

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
    let scenarios: [(&str, Scenario); 5] = [
        ("latency_http1_1000rps", latency),
        ("max_rps_http1", |b, p| max_rps(b, p, false)),
        ("max_rps_http2", |b, p| max_rps(b, p, true)),
        ("tcp_single_stream", iperf),
        ("new_connections", conn_rate),
    ];
    let mut runs: BTreeMap<&str, BTreeMap<Mode, Vec<Outcome>>> = BTreeMap::new();
    for r in 0..plan.rounds {
        for (name, f) in &scenarios {
            for m in MODES {
                if stopped() {
                    break;
                }
                let outcome = match beds.get_mut(&m) {
                    Some(Ok(bed)) => {
                        let o = guarded(|| f(bed, &plan)).and_then(|o| o);
                        // A proxy that died fails this and every later run of its mode.
                        match proxies_alive(bed) {
                            Ok(()) => o,
                            Err(e) => Err(e),
                        }
                    }
                    Some(Err(e)) => Err(e.clone()),
                    None => Err("not built".into()),
                };
                eprintln!(
                    "  round {} {name} {}: {}",
                    r + 1,
                    m.name(),
                    match &outcome {
                        Ok(s) => format!("{s:?}"),
                        Err(e) => format!("FAILED: {e}"),
                    }
                );
                runs.entry(name)
                    .or_default()
                    .entry(m)
                    .or_default()
                    .push(outcome);
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
    let mut scale: Vec<(usize, BTreeMap<Mode, Vec<Outcome>>)> = Vec::new();
    for &n in &plan.scale_pods {
        if stopped() {
            break;
        }
        eprintln!("mesh-bench: scale with {n} pod(s) per node");
        scale.push((n, scale_point(n, &plan)));
    }

    if stopped() {
        eprintln!("mesh-bench: interrupted; everything it set up is removed, no report written");
        std::process::exit(130);
    }
    let machine = machine();
    let report = Report {
        plan: &plan,
        runs: &runs,
        scale: &scale,
        proxy_memory: &proxy_memory,
        machine: &machine,
        elapsed: started.elapsed(),
    };
    std::fs::create_dir_all(&out_dir).expect("create the output folder");
    let json = report.json();
    std::fs::write(
        out_dir.join("results.json"),
        serde_json::to_string_pretty(&json).expect("json") + "\n",
    )
    .expect("write results.json");
    std::fs::write(out_dir.join("latency.svg"), report.latency_svg()).expect("write latency.svg");
    std::fs::write(out_dir.join("scale.svg"), report.scale_svg()).expect("write scale.svg");
    std::fs::write(out_dir.join("RESULTS.md"), report.markdown()).expect("write RESULTS.md");
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

/// The daemon's own defaults where the test topology speeds things up (bundle refresh).
fn defaults() -> DaemonOpts {
    DaemonOpts {
        bundle_refresh: "5s",
        ..DaemonOpts::default()
    }
}

fn build_bed(mode: Mode) -> Result<Bed, String> {
    let meshed = !mode.is_baseline();
    let server_node = if mode.same_node() { 0 } else { 1 };
    let pods = [
        PodSpec {
            meshed,
            ..PodSpec::meshed("client", 0, "client")
        },
        PodSpec {
            meshed,
            ..PodSpec::meshed("server", server_node, "server")
        },
    ];
    let mut t = Topology::build(mode.tag(), 2, &pods, &[]);
    match mode {
        Mode::Baseline | Mode::BaselineLocal => {}
        Mode::Sidecar => t.start(DaemonOpts {
            sidecar: true,
            ..defaults()
        }),
        Mode::Node | Mode::NodeLocal => t.start(defaults()),
        Mode::NodeLocalSockmap => t.start(DaemonOpts {
            sockmap: true,
            ..defaults()
        }),
    }
    let server_ip = t.pod("server").ip.clone();
    tune(&t);
    let upstreams: [(&str, Vec<String>, &str); 3] = [
        (
            "bench-http",
            vec![
                format!("{server_ip}:{HTTP_PORT}"),
                "--body".into(),
                "1024".into(),
            ],
            "listening",
        ),
        (
            "iperf3",
            vec![
                "-s".into(),
                // Without it iperf3 buffers stdout when it is not a terminal.
                "--forceflush".into(),
                "-B".into(),
                server_ip.clone(),
                "-p".into(),
                IPERF_PORT.to_string(),
            ],
            "Server listening",
        ),
        (
            "mesh-app",
            vec!["echo-server".into(), format!("{server_ip}:{ECHO_PORT}")],
            "listening",
        ),
    ];
    for (prog, args, ready) in upstreams {
        let path = if prog == "iperf3" {
            PathBuf::from("iperf3")
        } else {
            bin(prog)
        };
        let mut cmd = resident_in_pod(&t, "server", &path);
        cmd.args(&args);
        let mut p = Proc::spawn(&format!("{prog} in server"), cmd);
        p.wait_for(ready, Duration::from_secs(10));
        t.servers.push(p);
    }
    Ok(Bed { mode, t, server_ip })
}

/// Load generators reuse TIME_WAIT ports, and a per-node proxy reaching one pod from one mesh
/// source needs the same (ARCHITECTURE.md: "one mesh source address per node"); applied to every
/// mode alike.
fn tune(t: &Topology) {
    let mut names: Vec<String> = t.nodes.iter().map(|n| n.ns.name().to_string()).collect();
    names.extend(t.pods.iter().map(|p| p.ns.name().to_string()));
    for ns in names {
        for sysctl in [
            "net.ipv4.tcp_tw_reuse=1",
            "net.ipv4.ip_local_port_range=10000 65000",
        ] {
            nodemesh_tests::sh("ip", &["netns", "exec", &ns, "sysctl", "-qw", sysctl]);
        }
    }
}

/// `prog` in pod `pod`: its network namespace and its cgroup (so the mesh captures it). A load
/// tool runs under `timeout` so a wedged one cannot hang the run; see [`resident_in_pod`].
fn in_pod(t: &Topology, pod: &str, prog: &Path) -> Command {
    let p = t.pod(pod);
    let mut c = Command::new("nsenter");
    c.arg(format!("--net={}", p.ns.path().display()))
        .args(["timeout", "--kill-after=5", "300"])
        .arg(prog);
    join_on_exec(&mut c, &p.cgroup);
    c
}

/// A long-lived process in pod `pod` (an upstream, a holding client): no time limit; it ends with
/// its topology's guard or its own `--secs`.
fn resident_in_pod(t: &Topology, pod: &str, prog: &Path) -> Command {
    let p = t.pod(pod);
    let mut c = Command::new("nsenter");
    c.arg(format!("--net={}", p.ns.path().display())).arg(prog);
    join_on_exec(&mut c, &p.cgroup);
    c
}

/// Every proxy of a topology: (node index, pid).
fn proxies(t: &Topology) -> Vec<(usize, u32)> {
    let mut v: Vec<(usize, u32)> = t
        .daemons
        .iter()
        .enumerate()
        .filter_map(|(i, d)| d.as_ref().map(|p| (i, p.pid())))
        .collect();
    v.extend(t.sidecars.iter().map(|(k, p)| (t.pods[*k].node, p.pid())));
    v
}

fn proxies_alive(bed: &mut Bed) -> Result<(), String> {
    for (i, d) in bed.t.daemons.iter_mut().enumerate() {
        if let Some(p) = d
            && p.has_exited()
        {
            return Err(format!("the node-{} daemon exited", i + 1));
        }
    }
    for (k, p) in bed.t.sidecars.iter_mut() {
        if p.has_exited() {
            return Err(format!("the sidecar of pod {} exited", bed.t.pods[*k].name));
        }
    }
    Ok(())
}

/// CPU time of a process, all threads, in seconds (schedstat's nanoseconds: ticks are too coarse
/// for an idle proxy over a few seconds).
fn cpu_seconds(pid: u32) -> f64 {
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
fn pss_kib(pid: u32) -> f64 {
    status_kib(pid, "smaps_rollup", "Pss:")
}

fn rss_kib(pid: u32) -> f64 {
    status_kib(pid, "status", "VmRSS:")
}

/// Kernel memory of the BPF maps the given processes hold open (`memlock` in each map fd's
/// fdinfo; a map held by several of them counts once).
fn map_kib(pids: &[u32]) -> f64 {
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
fn h2load_summary(out: &str) -> Result<(f64, f64), String> {
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

fn tail(s: &str) -> String {
    let l: Vec<&str> = s.lines().rev().take(4).collect();
    l.into_iter().rev().collect::<Vec<_>>().join(" | ")
}

fn run(cmd: &mut Command) -> Result<String, String> {
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

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

/// HTTP/1.1 at a fixed 1000 req/s over 16 connections, 1 KB responses; per-request latencies
/// from h2load's log; the proxies' CPU over the run.
fn latency(bed: &mut Bed, plan: &Plan) -> Outcome {
    let log = std::env::temp_dir().join(format!("mesh-bench-{}.log", bed.mode.tag()));
    let _ = std::fs::remove_file(&log);
    let pids: Vec<u32> = proxies(&bed.t).iter().map(|(_, p)| *p).collect();
    let cpu0: f64 = pids.iter().map(|p| cpu_seconds(*p)).sum();
    let mut cmd = in_pod(&bed.t, "client", Path::new("h2load"));
    cmd.args(["--h1", "-t", "1"])
        .args(["-c", &LATENCY_CONNS.to_string()])
        .arg(format!("--rps={}", LATENCY_RPS / f64::from(LATENCY_CONNS)))
        .args(["-D", &plan.latency_secs.to_string(), "--warm-up-time", "1"])
        .arg("--log-file")
        .arg(&log)
        .arg(format!("http://{}:{HTTP_PORT}/", bed.server_ip));
    let out = run(&mut cmd)?;
    let cpu1: f64 = pids.iter().map(|p| cpu_seconds(*p)).sum();
    let (ok, rps) = h2load_summary(&out)?;
    let text = std::fs::read_to_string(&log).map_err(|e| format!("h2load's log: {e}"))?;
    let _ = std::fs::remove_file(&log);
    let mut us: Vec<f64> = text
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split('\t').collect();
            (f.get(1) == Some(&"200")).then(|| f.get(2)?.parse::<f64>().ok())?
        })
        .collect();
    if us.len() < 100 {
        return Err(format!("only {} requests in h2load's log", us.len()));
    }
    us.sort_by(f64::total_cmp);
    let mut s = Sample::new();
    s.insert("p50_us".into(), percentile(&us, 0.50));
    s.insert("p90_us".into(), percentile(&us, 0.90));
    s.insert("p99_us".into(), percentile(&us, 0.99));
    s.insert("p99.9_us".into(), percentile(&us, 0.999));
    s.insert("rps".into(), rps);
    if !pids.is_empty() {
        s.insert(
            "proxy_cpu_s_per_1000_req".into(),
            (cpu1 - cpu0) / ok * 1000.0,
        );
    }
    Ok(s)
}

/// Flat out for `max_secs`, 64 connections: HTTP/1.1, or HTTP/2 with 10 streams per connection.
fn max_rps(bed: &mut Bed, plan: &Plan, h2: bool) -> Outcome {
    let mut cmd = in_pod(&bed.t, "client", Path::new("h2load"));
    if h2 {
        cmd.args(["-m", &H2_STREAMS.to_string()]);
    } else {
        cmd.arg("--h1");
    }
    cmd.args(["-t", "1", "-c", &MAX_CONNS.to_string()])
        .args(["-D", &plan.max_secs.to_string(), "--warm-up-time", "1"])
        .arg(format!("http://{}:{HTTP_PORT}/", bed.server_ip));
    let out = run(&mut cmd)?;
    let (_, rps) = h2load_summary(&out)?;
    Ok(Sample::from([("rps".to_string(), rps)]))
}

/// One TCP stream, client → server, iperf3.
fn iperf(bed: &mut Bed, plan: &Plan) -> Outcome {
    let mut cmd = in_pod(&bed.t, "client", Path::new("iperf3"));
    cmd.args(["-c", &bed.server_ip, "-p", &IPERF_PORT.to_string()])
        .args(["-t", &plan.iperf_secs.to_string(), "-J"]);
    let out = cmd.output().map_err(|e| format!("iperf3: {e}"))?;
    let v: Value = serde_json::from_slice(&out.stdout).map_err(|e| {
        format!(
            "iperf3's JSON: {e}: {}",
            tail(&String::from_utf8_lossy(&out.stderr))
        )
    })?;
    if let Some(e) = v["error"].as_str() {
        return Err(format!("iperf3: {e}"));
    }
    let bps = v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .ok_or("iperf3 reported no received rate")?;
    Ok(Sample::from([("gbit_s".to_string(), bps / 1e9)]))
}

/// New connections per second, one after the other: connect, 100 B each way, close.
fn conn_rate(bed: &mut Bed, plan: &Plan) -> Outcome {
    let mut cmd = in_pod(&bed.t, "client", &bin("mesh-app"));
    cmd.args(["connect", &format!("{}:{ECHO_PORT}", bed.server_ip)])
        .args([
            "--send",
            "100",
            "--repeat",
            &plan.connections.to_string(),
            "--stats",
        ]);
    let start = Instant::now();
    let out = run(&mut cmd)?;
    let secs = start.elapsed().as_secs_f64();
    if !out.contains("echo=ok") {
        return Err(format!("mesh-app: {}", tail(&out)));
    }
    let field = |k: &str| {
        out.split_whitespace()
            .find_map(|w| w.strip_prefix(&format!("{k}=")))
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(f64::NAN)
    };
    Ok(Sample::from([
        ("conn_per_s".to_string(), f64::from(plan.connections) / secs),
        ("p50_us".to_string(), field("p50_us")),
        ("p99_us".to_string(), field("p99_us")),
    ]))
}

/// One scale point: `n` client pods on node 1, each holding 4 connections to its own server pod
/// on node 2 and sending a 100 B request on one of them every 250 ms. Node and sidecar mode are
/// up side by side; each round samples both, alternating.
fn scale_point(n: usize, plan: &Plan) -> BTreeMap<Mode, Vec<Outcome>> {
    let mut res: BTreeMap<Mode, Vec<Outcome>> = BTreeMap::new();
    let modes = [Mode::Node, Mode::Sidecar];
    // The holders run until the topology's guard stops them; the limit is only a backstop.
    let hold_secs = 3600;
    let mut beds: Vec<(Mode, Result<ScaleBed, String>)> = Vec::new();
    for m in modes {
        let bed = guarded(|| scale_bed(m, n, hold_secs));
        if let Err(e) = &bed {
            eprintln!("  scale {n} {}: FAILED to build: {e}", m.name());
        }
        beds.push((m, bed));
    }
    for r in 0..plan.scale_rounds {
        if stopped() {
            break;
        }
        for (m, bed) in &mut beds {
            let o = match bed {
                Ok((t, _)) => scale_sample(t, plan.scale_secs),
                Err(e) => Err(e.clone()),
            };
            eprintln!(
                "  scale {n} round {} {}: {}",
                r + 1,
                m.name(),
                match &o {
                    Ok(s) => format!("{s:?}"),
                    Err(e) => format!("FAILED: {e}"),
                }
            );
            res.entry(*m).or_default().push(o);
        }
    }
    // The trickle must have kept flowing: a client with errors fails the point.
    for (m, bed) in &mut beds {
        if let Ok((_, holders)) = bed {
            let bad: Vec<String> = holders
                .iter()
                .map(|h| h.output())
                .filter(|o| !o.contains("held=4") || o.contains("error="))
                .collect();
            if let Some(b) = bad.first() {
                let why = format!(
                    "{} pod(s) lost their connections, e.g. {}",
                    bad.len(),
                    tail(b)
                );
                res.insert(*m, vec![Err(why)]);
            }
        }
    }
    res
}

fn scale_bed(mode: Mode, n: usize, hold_secs: u64) -> ScaleBed {
    let mut pods = Vec::new();
    for i in 0..n {
        pods.push(PodSpec::meshed(&format!("c{i}"), 0, "client"));
        pods.push(PodSpec::meshed(&format!("s{i}"), 1, "server"));
    }
    let tag = if mode == Mode::Sidecar { "ss" } else { "sn" };
    let mut t = Topology::build(tag, 2, &pods, &[]);
    t.start(DaemonOpts {
        sidecar: mode == Mode::Sidecar,
        ..defaults()
    });
    for i in 0..n {
        t.serve(&format!("s{i}"), "echo-server", ECHO_PORT);
    }
    let mut holders = Vec::new();
    for i in 0..n {
        let server = format!("{}:{ECHO_PORT}", t.pod(&format!("s{i}")).ip);
        let mut cmd = resident_in_pod(&t, &format!("c{i}"), &bin("mesh-app"));
        cmd.args(["hold", &server, "--conns", "4", "--every-ms", "250"])
            .args(["--secs", &hold_secs.to_string()]);
        holders.push(Proc::spawn(&format!("hold in c{i}"), cmd));
    }
    for h in &mut holders {
        h.wait_for("held=4", Duration::from_secs(30));
    }
    (t, holders)
}

/// Memory (PSS, RSS, BPF maps) and CPU seconds over `secs`, per node, summed over its proxies.
fn scale_sample(t: &Topology, secs: u64) -> Outcome {
    let ps = proxies(t);
    if ps.is_empty() {
        return Err("no proxies running".into());
    }
    let cpu0: Vec<f64> = ps.iter().map(|(_, p)| cpu_seconds(*p)).collect();
    std::thread::sleep(Duration::from_secs(secs));
    let mut s = Sample::new();
    for node in 0..t.nodes.len() {
        let mine: Vec<(usize, u32)> = ps.iter().copied().filter(|(n, _)| *n == node).collect();
        let pids: Vec<u32> = mine.iter().map(|(_, p)| *p).collect();
        let cpu: f64 = ps
            .iter()
            .zip(&cpu0)
            .filter(|((n, _), _)| *n == node)
            .map(|((_, p), c0)| cpu_seconds(*p) - c0)
            .sum();
        let k = node + 1;
        s.insert(format!("node{k}_proxies"), pids.len() as f64);
        s.insert(
            format!("node{k}_pss_mib"),
            pids.iter().map(|p| pss_kib(*p)).sum::<f64>() / 1024.0,
        );
        s.insert(
            format!("node{k}_rss_mib"),
            pids.iter().map(|p| rss_kib(*p)).sum::<f64>() / 1024.0,
        );
        s.insert(format!("node{k}_bpf_map_mib"), map_kib(&pids) / 1024.0);
        s.insert(format!("node{k}_cpu_s"), cpu);
    }
    let mean = |key: &str| (s[&format!("node1_{key}")] + s[&format!("node2_{key}")]) / 2.0;
    let (pss, rss, maps, cpu) = (
        mean("pss_mib"),
        mean("rss_mib"),
        mean("bpf_map_mib"),
        mean("cpu_s"),
    );
    s.insert("per_node_pss_mib".into(), pss);
    s.insert("per_node_rss_mib".into(), rss);
    s.insert("per_node_bpf_map_mib".into(), maps);
    s.insert("per_node_total_mib".into(), pss + maps);
    s.insert("per_node_cpu_s_per_min".into(), cpu / secs as f64 * 60.0);
    Ok(s)
}

fn machine() -> Value {
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
    let model = cpuinfo
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
    json!({
        "cpu": model,
        "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "memory": std::fs::read_to_string("/proc/meminfo").unwrap_or_default()
            .lines().next().unwrap_or_default().trim_start_matches("MemTotal:").trim().to_string(),
        "kernel": cmd("uname", &["-r"]),
        "os": os,
        "h2load": cmd("h2load", &["--version"]),
        "iperf3": cmd("iperf3", &["--version"]),
        "nodemesh": cmd("git", &["describe", "--always", "--dirty"]),
        "date": cmd("date", &["-u", "+%Y-%m-%dT%H:%M:%SZ"]),
    })
}

// ---------------------------------------------------------------------------------------------
// The report: JSON (everything raw), Markdown (tables with ratios), two SVG plots.

struct Report<'a> {
    plan: &'a Plan,
    runs: &'a BTreeMap<&'a str, BTreeMap<Mode, Vec<Outcome>>>,
    scale: &'a [(usize, BTreeMap<Mode, Vec<Outcome>>)],
    proxy_memory: &'a BTreeMap<Mode, Option<f64>>,
    machine: &'a Value,
    elapsed: Duration,
}

/// Median, min and max of one key over a mode's rounds; `None` if any round failed.
#[derive(Clone, Copy, Debug)]
struct Stat {
    median: f64,
    min: f64,
    max: f64,
}

fn stat(values: impl IntoIterator<Item = f64>) -> Option<Stat> {
    let mut v: Vec<f64> = values.into_iter().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let mid = v.len() / 2;
    let median = if v.len() % 2 == 1 {
        v[mid]
    } else {
        (v[mid - 1] + v[mid]) / 2.0
    };
    Some(Stat {
        median,
        min: v[0],
        max: v[v.len() - 1],
    })
}

/// The first failure among the rounds, if any.
fn failure(rounds: &[Outcome]) -> Option<&str> {
    rounds
        .iter()
        .find_map(|o| o.as_ref().err().map(String::as_str))
}

impl Report<'_> {
    fn rounds(&self, scenario: &str, mode: Mode) -> &[Outcome] {
        self.runs
            .get(scenario)
            .and_then(|m| m.get(&mode))
            .map(Vec::as_slice)
            .unwrap_or(&[])
    }

    /// A key's statistics for a mode, or the reason it failed.
    fn get(&self, scenario: &str, mode: Mode, key: &str) -> Result<Stat, String> {
        let r = self.rounds(scenario, mode);
        if let Some(e) = failure(r) {
            return Err(e.to_string());
        }
        stat(r.iter().filter_map(|o| o.as_ref().ok()?.get(key).copied()))
            .ok_or_else(|| "no data".to_string())
    }

    /// Per-round difference mode − baseline (rounds ran back to back), summarised.
    fn added(&self, scenario: &str, mode: Mode, key: &str) -> Result<Stat, String> {
        let (m, b) = (
            self.rounds(scenario, mode),
            self.rounds(scenario, mode.baseline()),
        );
        if let Some(e) = failure(m) {
            return Err(e.to_string());
        }
        if let Some(e) = failure(b) {
            return Err(format!("baseline failed: {e}"));
        }
        stat(
            m.iter()
                .zip(b)
                .filter_map(|(m, b)| Some(m.as_ref().ok()?.get(key)? - b.as_ref().ok()?.get(key)?)),
        )
        .ok_or_else(|| "no data".to_string())
    }

    fn scale_stat(&self, n: usize, mode: Mode, key: &str) -> Result<Stat, String> {
        let rounds = self
            .scale
            .iter()
            .find(|(k, _)| *k == n)
            .and_then(|(_, m)| m.get(&mode))
            .map(Vec::as_slice)
            .unwrap_or(&[]);
        if let Some(e) = failure(rounds) {
            return Err(e.to_string());
        }
        stat(
            rounds
                .iter()
                .filter_map(|o| o.as_ref().ok()?.get(key).copied()),
        )
        .ok_or_else(|| "no data".to_string())
    }

    fn json(&self) -> Value {
        // Each mode's rounds, as they came: a sample, or why it failed.
        let by_mode = |modes: &BTreeMap<Mode, Vec<Outcome>>| -> Value {
            modes
                .iter()
                .map(|(m, rounds)| {
                    let rounds = rounds
                        .iter()
                        .map(|o| match o {
                            Ok(s) => json!({ "ok": s }),
                            Err(e) => json!({ "failed": e }),
                        })
                        .collect();
                    (m.name().to_string(), Value::Array(rounds))
                })
                .collect::<serde_json::Map<_, _>>()
                .into()
        };
        let runs: serde_json::Map<String, Value> = self
            .runs
            .iter()
            .map(|(scenario, modes)| (scenario.to_string(), by_mode(modes)))
            .collect();
        let scale: Vec<Value> = self
            .scale
            .iter()
            .map(|(n, modes)| json!({ "pods_per_node": n, "modes": by_mode(modes) }))
            .collect();
        json!({
            "machine": self.machine,
            "plan": {
                "quick": self.plan.quick,
                "rounds": self.plan.rounds,
                "latency": { "tool": "h2load --h1", "rps": LATENCY_RPS, "connections": LATENCY_CONNS,
                             "response_bytes": 1024, "seconds": self.plan.latency_secs, "warm_up_seconds": 1 },
                "max_rps": { "tool": "h2load", "connections": MAX_CONNS, "http2_streams_per_connection": H2_STREAMS,
                             "response_bytes": 1024, "seconds": self.plan.max_secs },
                "tcp_single_stream": { "tool": "iperf3", "seconds": self.plan.iperf_secs },
                "new_connections": { "tool": "mesh-app connect --repeat", "connections": self.plan.connections,
                                     "bytes_each_way": 100 },
                "scale": { "pods_per_node": self.plan.scale_pods, "rounds": self.plan.scale_rounds,
                           "window_seconds": self.plan.scale_secs, "connections_per_pod": 4,
                           "request_every_ms": 250 },
            },
            "runs": runs,
            "proxy_pss_mib_two_pods": self.proxy_memory.iter()
                .map(|(m, v)| (m.name().to_string(), json!(v))).collect::<serde_json::Map<_, _>>(),
            "scale": scale,
            "elapsed_seconds": self.elapsed.as_secs(),
        })
    }

    fn markdown(&self) -> String {
        let mut md = String::new();
        let m = self.machine;
        let _ = writeln!(
            md,
            "# nodemesh benchmark: per-node versus sidecar\n\n\
             {} run of `cargo xtask bench{}` on {} ({} CPUs, {}), kernel {}, {}; nodemesh {}, \
             {}, {}. {} rounds per scenario, modes interleaved; medians with [min–max] over \
             rounds. Raw numbers: `results.json`. Took {:.0} min.\n",
            if self.plan.quick {
                "A **quick**"
            } else {
                "A full"
            },
            if self.plan.quick { " --quick" } else { "" },
            m["date"].as_str().unwrap_or(""),
            m["cpus"],
            m["cpu"].as_str().unwrap_or(""),
            m["kernel"].as_str().unwrap_or(""),
            m["os"].as_str().unwrap_or(""),
            m["nodemesh"].as_str().unwrap_or(""),
            m["h2load"].as_str().unwrap_or(""),
            m["iperf3"].as_str().unwrap_or(""),
            self.plan.rounds,
            self.elapsed.as_secs_f64() / 60.0,
        );
        let fmt = |s: &Result<Stat, String>, digits: usize| match s {
            Ok(s) => format!("{:.d$} [{:.d$}–{:.d$}]", s.median, s.min, s.max, d = digits),
            Err(_) => "failed".into(),
        };
        let failures = |md: &mut String, scenarios: &[&str]| {
            for mode in MODES {
                for sc in scenarios {
                    if let Some(e) = failure(self.rounds(sc, mode)) {
                        let _ = writeln!(md, "\n- **{}** failed in `{sc}`: {e}", mode.name());
                        break;
                    }
                }
            }
        };

        // Targets first: what the project holds itself to.
        let _ = writeln!(md, "## Targets\n\n| target | measured | |\n|---|---|---|");
        let p99 = |mode| self.added("latency_http1_1000rps", mode, "p99_us");
        match (p99(Mode::Node), p99(Mode::Sidecar)) {
            (Ok(n), Ok(s)) => {
                let ok = n.median <= s.median / 2.0;
                let _ = writeln!(
                    md,
                    "| node mode adds at most half of what sidecar mode adds at p99 | node +{:.0} µs, sidecar +{:.0} µs (ratio {:.2}) | {} |",
                    n.median,
                    s.median,
                    n.median / s.median,
                    if ok { "met" } else { "**not met**" }
                );
            }
            (n, s) => {
                let _ = writeln!(
                    md,
                    "| node mode adds at most half of what sidecar mode adds at p99 | {} | failed |",
                    n.err().or(s.err()).unwrap_or_default()
                );
            }
        }
        let mem = |mode, k| self.scale_stat(50, mode, k);
        match (
            mem(Mode::Node, "per_node_pss_mib"),
            mem(Mode::Sidecar, "per_node_pss_mib"),
            mem(Mode::Node, "per_node_total_mib"),
            mem(Mode::Sidecar, "per_node_total_mib"),
        ) {
            (Ok(n), Ok(s), Ok(nt), Ok(st)) => {
                let met = n.median <= s.median / 3.0 && nt.median <= st.median / 3.0;
                let _ = writeln!(
                    md,
                    "| node mode uses at most ⅓ of sidecar memory at 50 pods per node | proxies' PSS: node {:.1} MiB, sidecars {:.1} MiB (ratio {:.3}); with their BPF maps: {:.1} vs {:.1} MiB (ratio {:.3}) | {} |",
                    n.median,
                    s.median,
                    n.median / s.median,
                    nt.median,
                    st.median,
                    nt.median / st.median,
                    if met { "met" } else { "**not met**" }
                );
            }
            _ => {
                let _ = writeln!(
                    md,
                    "| node mode uses at most ⅓ of sidecar memory at 50 pods per node | not measured in this run{} | — |",
                    if self.plan.quick {
                        " (--quick stops at 10 pods)"
                    } else {
                        ""
                    }
                );
            }
        }
        let tput = |mode| self.get("tcp_single_stream", mode, "gbit_s");
        match (tput(Mode::Node), tput(Mode::Baseline)) {
            (Ok(n), Ok(b)) => {
                let _ = writeln!(
                    md,
                    "| node+mTLS single-stream throughput ≥ 70 % of baseline | {:.2} of {:.2} Gbit/s ({:.0} %) | {} |",
                    n.median,
                    b.median,
                    n.median / b.median * 100.0,
                    if n.median >= 0.7 * b.median {
                        "met"
                    } else {
                        "**not met**"
                    }
                );
            }
            (n, b) => {
                let _ = writeln!(
                    md,
                    "| node+mTLS single-stream throughput ≥ 70 % of baseline | {} | failed |",
                    n.err().or(b.err()).unwrap_or_default()
                );
            }
        }
        // Not a target: what the same-node fast path changes, beside the relay it replaces.
        let cmp = |sc: &str, k: &str, what: &str, d: usize| match (
            self.get(sc, Mode::NodeLocalSockmap, k),
            self.get(sc, Mode::NodeLocal, k),
        ) {
            (Ok(on), Ok(off)) => format!(
                "{what}: {:.d$} with --sockmap on vs {:.d$} off (×{:.2})",
                on.median,
                off.median,
                on.median / off.median
            ),
            (on, off) => format!("{what}: {}", on.err().or(off.err()).unwrap_or_default()),
        };
        let _ = writeln!(
            md,
            "| (same node, informational) the kernel splice against the user-space relay | {}; {}; {} | — |",
            cmp("tcp_single_stream", "gbit_s", "one stream Gbit/s", 2),
            cmp("latency_http1_1000rps", "p99_us", "p99 µs at 1000 req/s", 0),
            cmp(
                "latency_http1_1000rps",
                "proxy_cpu_s_per_1000_req",
                "proxy CPU s/1000 req",
                3
            ),
        );

        let _ = writeln!(
            md,
            "\n## Latency at a fixed {LATENCY_RPS} req/s (HTTP/1.1, {LATENCY_CONNS} connections, 1 KB responses)\n\n\
             Client pod on node 1 → server pod on node 2 (on node 1 for the `(same node)` modes), h2load \
             `--rps`, per-request latencies from its `--log-file`. \"Added\" is the mode minus the \
             baseline with the same placement, in the same round.\n\n\
             ![latency percentiles per mode](latency.svg)\n\n\
             | mode | p50 µs | p90 µs | p99 µs | p99.9 µs | added p50 | added p99 | added p99.9 | proxy CPU s / 1000 req |\n\
             |---|---|---|---|---|---|---|---|---|"
        );
        let sc = "latency_http1_1000rps";
        for mode in MODES {
            let g = |k| fmt(&self.get(sc, mode, k), 0);
            let a = |k| {
                if mode.is_baseline() {
                    "—".to_string()
                } else {
                    fmt(&self.added(sc, mode, k), 0)
                }
            };
            let cpu = if mode.is_baseline() {
                "—".into()
            } else {
                fmt(&self.get(sc, mode, "proxy_cpu_s_per_1000_req"), 3)
            };
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                mode.name(),
                g("p50_us"),
                g("p90_us"),
                g("p99_us"),
                g("p99.9_us"),
                a("p50_us"),
                a("p99_us"),
                a("p99.9_us"),
                cpu
            );
        }
        if let (Ok(n), Ok(s)) = (
            self.added(sc, Mode::Node, "p99_us"),
            self.added(sc, Mode::Sidecar, "p99_us"),
        ) {
            let _ = writeln!(
                md,
                "\nsidecar → node: added p99 {:.0} µs → {:.0} µs (×{:.2}).",
                s.median,
                n.median,
                n.median / s.median
            );
        }
        failures(&mut md, &[sc]);

        let _ = writeln!(
            md,
            "\n## Throughput\n\n\
             h2load flat out with {MAX_CONNS} connections (HTTP/2: {H2_STREAMS} streams each), iperf3 one \
             stream, and new connections per second one after the other (connect, 100 B each way, close; the \
             project's own client: no Debian tool has that mode). Ratio = mode / baseline (medians).\n\n\
             | mode | HTTP/1.1 req/s | HTTP/2 req/s | TCP Gbit/s | new conn/s | ratios (h1, h2, tcp, conn) |\n\
             |---|---|---|---|---|---|"
        );
        let keys = [
            ("max_rps_http1", "rps", 0),
            ("max_rps_http2", "rps", 0),
            ("tcp_single_stream", "gbit_s", 2),
            ("new_connections", "conn_per_s", 0),
        ];
        for mode in MODES {
            let cells: Vec<String> = keys
                .iter()
                .map(|(sc, k, d)| fmt(&self.get(sc, mode, k), *d))
                .collect();
            let ratios: Vec<String> = keys
                .iter()
                .map(
                    |(sc, k, _)| match (self.get(sc, mode, k), self.get(sc, mode.baseline(), k)) {
                        (Ok(m), Ok(b)) => format!("{:.2}", m.median / b.median),
                        _ => "—".into(),
                    },
                )
                .collect();
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} | {} | {} |",
                mode.name(),
                cells[0],
                cells[1],
                cells[2],
                cells[3],
                ratios.join(", ")
            );
        }
        failures(
            &mut md,
            &[
                "max_rps_http1",
                "max_rps_http2",
                "tcp_single_stream",
                "new_connections",
            ],
        );
        let _ = writeln!(
            md,
            "\nProxy memory (PSS, summed over the topology's proxies) after these runs:"
        );
        for (mode, v) in self.proxy_memory {
            if let Some(v) = v {
                let _ = writeln!(md, "- {}: {v:.1} MiB", mode.name());
            }
        }

        let _ = writeln!(
            md,
            "\n## Scale: proxy memory and CPU per node versus pods per node\n\n\
             n client pods on node 1 and n server pods on node 2; every client holds 4 connections to its \
             server and sends 100 B on one of them every 250 ms. Per node = mean of the two nodes, summed \
             over that node's proxies (one node daemon, or n sidecars). Memory is PSS (shared pages such as \
             the binary's text split between the processes that map them; RSS is in `results.json`); BPF \
             maps are kernel memory the proxies' maps hold (bpftool `bytes_memlock`); CPU over a \
             {}-second window, scaled to a minute.\n\n\
             ![memory and CPU versus pods per node](scale.svg)\n\n\
             | pods/node | node PSS MiB | sidecars PSS MiB | node/sidecar | node BPF maps MiB | sidecars BPF maps MiB | node/sidecar, PSS + maps | node CPU s/min | sidecars CPU s/min | node/sidecar |\n\
             |---|---|---|---|---|---|---|---|---|---|",
            self.plan.scale_secs
        );
        for (n, _) in self.scale {
            let g = |mode, k, d| fmt(&self.scale_stat(*n, mode, k), d);
            let ratio = |k| match (
                self.scale_stat(*n, Mode::Node, k),
                self.scale_stat(*n, Mode::Sidecar, k),
            ) {
                (Ok(a), Ok(b)) => format!("{:.3}", a.median / b.median),
                _ => "—".into(),
            };
            let _ = writeln!(
                md,
                "| {n} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                g(Mode::Node, "per_node_pss_mib", 1),
                g(Mode::Sidecar, "per_node_pss_mib", 1),
                ratio("per_node_pss_mib"),
                g(Mode::Node, "per_node_bpf_map_mib", 1),
                g(Mode::Sidecar, "per_node_bpf_map_mib", 1),
                ratio("per_node_total_mib"),
                g(Mode::Node, "per_node_cpu_s_per_min", 2),
                g(Mode::Sidecar, "per_node_cpu_s_per_min", 2),
                ratio("per_node_cpu_s_per_min"),
            );
        }
        for (n, modes) in self.scale {
            for (mode, rounds) in modes {
                if let Some(e) = failure(rounds) {
                    let _ = writeln!(md, "- **{}** at {n} pods failed: {e}", mode.name());
                }
            }
        }
        md.push_str(HOW_TO_READ);
        md
    }

    fn latency_svg(&self) -> String {
        let sc = "latency_http1_1000rps";
        let keys = [
            ("p50_us", "p50"),
            ("p90_us", "p90"),
            ("p99_us", "p99"),
            ("p99.9_us", "p99.9"),
        ];
        let colors = [
            "#888888", "#d95f02", "#1b9e77", "#bbbbbb", "#66a61e", "#7570b3",
        ];
        let data: Vec<Vec<Option<Stat>>> = MODES
            .iter()
            .map(|m| keys.iter().map(|(k, _)| self.get(sc, *m, k).ok()).collect())
            .collect();
        let top = data
            .iter()
            .flatten()
            .flatten()
            .map(|s| s.max)
            .fold(1.0f64, f64::max)
            * 1.1;
        let (w, h, left, bottom, plot_h) = (760.0, 420.0, 70.0, 360.0, 300.0);
        let group_w = (w - left - 20.0) / keys.len() as f64;
        let bar_w = group_w / (MODES.len() as f64 + 1.0);
        let y = |v: f64| bottom - v / top * plot_h;
        let mut s = svg_open(
            w,
            h,
            "Latency at 1000 req/s, HTTP/1.1, 1 KB (median, min–max whiskers)",
        );
        axis(&mut s, left, bottom, w - 20.0, plot_h, top, "µs");
        for (gi, (_, label)) in keys.iter().enumerate() {
            let gx = left + gi as f64 * group_w;
            let _ = writeln!(
                s,
                r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{label}</text>"#,
                gx + group_w / 2.0,
                bottom + 18.0
            );
            for (mi, mode) in MODES.iter().enumerate() {
                let x = gx + bar_w * (mi as f64 + 0.5);
                match data[mi][gi] {
                    Some(st) => {
                        let _ = writeln!(
                            s,
                            r#"<rect x="{x:.1}" y="{:.1}" width="{:.1}" height="{:.1}" fill="{}"><title>{} {label}: {:.0} µs</title></rect>"#,
                            y(st.median),
                            bar_w * 0.9,
                            bottom - y(st.median),
                            colors[mi],
                            mode.name(),
                            st.median
                        );
                        let cx = x + bar_w * 0.45;
                        let _ = writeln!(
                            s,
                            r#"<line x1="{cx:.1}" x2="{cx:.1}" y1="{:.1}" y2="{:.1}" stroke="black"/>"#,
                            y(st.min),
                            y(st.max)
                        );
                    }
                    None => {
                        let _ = writeln!(
                            s,
                            r#"<text x="{:.1}" y="{:.1}" font-size="10" transform="rotate(-90 {:.1} {:.1})">failed</text>"#,
                            x + bar_w * 0.6,
                            bottom - 4.0,
                            x + bar_w * 0.6,
                            bottom - 4.0
                        );
                    }
                }
            }
        }
        legend(
            &mut s,
            w - 200.0,
            44.0,
            &MODES
                .iter()
                .enumerate()
                .map(|(i, m)| {
                    let failed = failure(self.rounds(sc, *m)).is_some();
                    (
                        colors[i],
                        format!("{}{}", m.name(), if failed { " (failed)" } else { "" }),
                    )
                })
                .collect::<Vec<_>>(),
        );
        s.push_str("</svg>\n");
        s
    }

    fn scale_svg(&self) -> String {
        let pods: Vec<usize> = self.scale.iter().map(|(n, _)| *n).collect();
        let (w, h) = (860.0, 400.0);
        let mut s = svg_open(
            w,
            h,
            "Proxies per node versus pods per node (median, min–max)",
        );
        let panels: [(&[&str], &str, f64); 2] = [
            (
                &["per_node_pss_mib", "per_node_total_mib"],
                "memory, MiB: PSS (solid), PSS + BPF maps (dashed)",
                30.0,
            ),
            (&["per_node_cpu_s_per_min"], "CPU seconds per minute", 450.0),
        ];
        let modes = [
            (Mode::Node, "#1b9e77", "node (1 daemon per node)"),
            (Mode::Sidecar, "#d95f02", "sidecars (sum per node)"),
        ];
        let max_pods = pods.iter().copied().max().unwrap_or(1).max(1) as f64;
        for (keys, title, x0) in panels {
            let (left, bottom, pw, ph) = (x0 + 50.0, 340.0, 340.0, 250.0);
            let mut top = 1e-9f64;
            for (m, _, _) in modes {
                for k in keys {
                    for n in &pods {
                        if let Ok(st) = self.scale_stat(*n, m, k) {
                            top = top.max(st.max * 1.1);
                        }
                    }
                }
            }
            axis(&mut s, left, bottom, left + pw, ph, top, title);
            let x = |n: usize| left + n as f64 / max_pods * (pw - 10.0);
            let y = |v: f64| bottom - v / top * ph;
            for n in &pods {
                let _ = writeln!(
                    s,
                    r#"<text x="{:.1}" y="{:.1}" text-anchor="middle" font-size="11">{n}</text>"#,
                    x(*n),
                    bottom + 16.0
                );
            }
            let _ = writeln!(
                s,
                r#"<text x="{:.1}" y="{:.1}" text-anchor="middle" font-size="12">pods per node</text>"#,
                left + pw / 2.0,
                bottom + 34.0
            );
            for (m, color, _) in modes {
                for (ki, key) in keys.iter().enumerate() {
                    let pts: Vec<(usize, Stat)> = pods
                        .iter()
                        .filter_map(|n| Some((*n, self.scale_stat(*n, m, key).ok()?)))
                        .collect();
                    let path: Vec<String> = pts
                        .iter()
                        .map(|(n, st)| format!("{:.1},{:.1}", x(*n), y(st.median)))
                        .collect();
                    let dash = if ki == 0 {
                        ""
                    } else {
                        r#" stroke-dasharray="6 4""#
                    };
                    let _ = writeln!(
                        s,
                        r#"<polyline points="{}" fill="none" stroke="{color}" stroke-width="2"{dash}/>"#,
                        path.join(" ")
                    );
                    for (n, st) in &pts {
                        let _ = writeln!(
                            s,
                            r#"<circle cx="{:.1}" cy="{:.1}" r="3" fill="{color}"><title>{} {key} at {n} pods: {:.2}</title></circle><line x1="{:.1}" x2="{:.1}" y1="{:.1}" y2="{:.1}" stroke="{color}"/>"#,
                            x(*n),
                            y(st.median),
                            m.name(),
                            st.median,
                            x(*n),
                            x(*n),
                            y(st.min),
                            y(st.max)
                        );
                    }
                }
            }
        }
        legend(
            &mut s,
            90.0,
            40.0,
            &modes
                .iter()
                .map(|(_, c, l)| (*c, l.to_string()))
                .collect::<Vec<_>>(),
        );
        s.push_str("</svg>\n");
        s
    }
}

fn svg_open(w: f64, h: f64, title: &str) -> String {
    format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" viewBox=\"0 0 {w} {h}\" \
         font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"{:.1}\" y=\"20\" text-anchor=\"middle\" font-size=\"14\">{title}</text>\n",
        w / 2.0
    )
}

fn axis(s: &mut String, left: f64, bottom: f64, right: f64, height: f64, top: f64, unit: &str) {
    let _ = writeln!(
        s,
        r#"<line x1="{left}" y1="{bottom}" x2="{right}" y2="{bottom}" stroke="black"/><line x1="{left}" y1="{bottom}" x2="{left}" y2="{:.1}" stroke="black"/>"#,
        bottom - height
    );
    for i in 0..=4 {
        let v = top * f64::from(i) / 4.0;
        let y = bottom - height * f64::from(i) / 4.0;
        let label = if top >= 10.0 {
            format!("{v:.0}")
        } else {
            format!("{v:.2}")
        };
        let _ = writeln!(
            s,
            r##"<line x1="{:.1}" x2="{right}" y1="{y:.1}" y2="{y:.1}" stroke="#ddd"/><text x="{:.1}" y="{:.1}" text-anchor="end" font-size="11">{label}</text>"##,
            left,
            left - 4.0,
            y + 4.0
        );
    }
    let _ = writeln!(
        s,
        r#"<text x="{:.1}" y="{:.1}" font-size="11">{unit}</text>"#,
        left - 40.0,
        bottom - height - 10.0
    );
}

fn legend(s: &mut String, x: f64, y: f64, items: &[(&str, String)]) {
    for (i, (color, label)) in items.iter().enumerate() {
        let yy = y + i as f64 * 16.0;
        let _ = writeln!(
            s,
            r#"<rect x="{x:.1}" y="{:.1}" width="10" height="10" fill="{color}"/><text x="{:.1}" y="{:.1}">{label}</text>"#,
            yy - 9.0,
            x + 14.0,
            yy
        );
    }
}

const HOW_TO_READ: &str = "
## How to read these numbers

- **What is measured.** The same `mesh-daemon` binary in each mode, with the same kernel hooks,
  the same HBONE over mutual TLS 1.3 (aws-lc-rs) and the same relay code; only where it runs and
  how many run differs. `baseline` is the same two pods with no mesh at all. Latency percentiles
  are per request, measured by h2load in the client pod; \"added\" is mode minus baseline within
  the same round, so drift between rounds cancels. Proxy CPU is utime+stime of every proxy process
  (both nodes' daemons, or both pods' sidecars) over the fixed-rate run, per 1000 requests.
- **What is not.** One machine with 2 shared cores runs the load generator, every proxy, the
  upstream and the \"network\": the proxies compete with the client for CPU, which makes every
  mesh number worse than on separate hosts and makes throughput ratios pessimistic. The links are
  veth pairs and a bridge, not NICs: no real wire latency, no NIC offloads. The mesh is L4 today
  (HTTP is relayed as bytes; per-request routing is a later issue), so HTTP numbers measure
  tunnelling, not L7 processing. The three `(same node)` modes put the server pod on the client's
  node: there the node daemon relays between the two pods itself (no HBONE, no TLS), in user
  space or, with `--sockmap on`, by splicing its two sockets in the kernel; their \"added\" and
  ratios are against `baseline (same node)`.
  Memory is userspace PSS of the proxy processes plus, separately, the kernel memory of their BPF
  maps; each sidecar loads its own programs and maps, which the per-node design does once.
- **Noise.** Medians over rounds with min–max; treat differences inside the min–max spread as
  ties. A quick run (`--quick`) uses short windows and stops at 10 pods per node: use it to check
  the harness, not to quote.
- **Reproduce.** `cargo xtask bench` (about 25 minutes) or `cargo xtask bench --quick` (about 6)
  as root from a fresh clone; both install h2load (nghttp2-client) and iperf3 from Debian if they
  are missing, build in release mode, and write `bench/results.json`, `bench/RESULTS.md`,
  `bench/latency.svg` and `bench/scale.svg`.
";
