//! The scenarios: what one run of each measures on a bed, and the typed rounds they record —
//! latency at a fixed rate, requests per second flat out (HTTP/1.1, HTTP/2), one TCP stream, new
//! connections per second, and the scale points.

use std::{
    collections::BTreeMap,
    fmt,
    path::Path,
    time::{Duration, Instant},
};

use nodemesh_tests::{bin, topology::Topology};
use serde::Serialize;

use crate::{
    Mode, Plan, guarded,
    measurement::{
        cpu_seconds, h2load_latencies, h2load_summary, iperf_bits_per_second, map_kib,
        mesh_app_field, pss_kib, rss_kib, run, tail,
    },
    statistics::percentile,
    stopped,
    topology::{
        Bed, ECHO_PORT, IPERF_PORT, ScaleBed, held, in_pod, proxies, proxies_alive, scale_bed,
    },
};

/// The Istio method: 1000 req/s over 16 connections, 1 KB responses.
pub const LATENCY_RPS: f64 = 1000.0;
pub const LATENCY_CONNS: u32 = 16;
/// The HTTP/2 (h2c, as gRPC rides) latency run: 1000 req/s over 4 connections of 8 streams.
pub const LATENCY_H2_CONNS: u32 = 4;
pub const LATENCY_H2_STREAMS: u32 = 8;
pub const MAX_CONNS: u32 = 64;
pub const H2_STREAMS: u32 = 10;
/// h2load's warm-up before it starts counting, in the latency and max-rate runs.
pub const WARM_UP_SECS: u64 = 1;
/// What each new connection sends and gets back.
pub const CONNECT_BYTES: usize = 100;

/// One round's result: the numbers, or why the run does not count.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome<T> {
    Ok(T),
    Failed(String),
}

impl<T> Outcome<T> {
    pub fn ok(&self) -> Option<&T> {
        match self {
            Self::Ok(v) => Some(v),
            Self::Failed(_) => None,
        }
    }

    pub fn failure(&self) -> Option<&str> {
        match self {
            Self::Ok(_) => None,
            Self::Failed(e) => Some(e),
        }
    }
}

impl<T> From<Result<T, String>> for Outcome<T> {
    fn from(r: Result<T, String>) -> Self {
        match r {
            Ok(v) => Self::Ok(v),
            Err(e) => Self::Failed(e),
        }
    }
}

/// As the progress log shows it.
impl<T: fmt::Debug> fmt::Display for Outcome<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Ok(v) => write!(f, "{v:?}"),
            Self::Failed(e) => write!(f, "FAILED: {e}"),
        }
    }
}

/// One number of a round, read from it (for a table column, a plot's bars or line).
pub type Measure<T> = fn(&T) -> f64;

/// `latency_http1_1000rps`: per-request latency percentiles (µs) of one fixed-rate run.
#[derive(Clone, Debug, Serialize)]
pub struct LatencyRound {
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    #[serde(rename = "p99.9_us")]
    pub p999_us: f64,
    /// The rate h2load kept.
    pub rps: f64,
    /// CPU seconds of every proxy over the run, per 1000 requests; none without proxies.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub proxy_cpu_s_per_1000_req: Option<f64>,
}

impl LatencyRound {
    /// The four percentiles with their labels, in the order the table and the plot show them.
    pub const PERCENTILES: [(&str, Measure<Self>); 4] = [
        ("p50", |r| r.p50_us),
        ("p90", |r| r.p90_us),
        ("p99", |r| r.p99_us),
        ("p99.9", |r| r.p999_us),
    ];
}

/// `max_rps_http1`, `max_rps_http2`: requests per second, flat out.
#[derive(Clone, Debug, Serialize)]
pub struct MaxRpsRound {
    pub rps: f64,
}

/// `tcp_single_stream`: iperf3's received rate.
#[derive(Clone, Debug, Serialize)]
pub struct StreamRound {
    pub gbit_s: f64,
}

/// `new_connections`: connections per second one after the other, and the client's own
/// per-connection latency percentiles (µs: connect, send, echo back) when it printed them.
#[derive(Clone, Debug, Serialize)]
pub struct ConnRateRound {
    pub conn_per_s: f64,
    pub p50_us: Option<f64>,
    pub p99_us: Option<f64>,
}

/// One scale round: each node's proxies, and the mean over the nodes ("per node").
#[derive(Clone, Debug, Serialize)]
pub struct ScaleRound {
    /// Node 1, then node 2.
    pub nodes: Vec<NodeUsage>,
    pub per_node_pss_mib: f64,
    pub per_node_rss_mib: f64,
    pub per_node_bpf_map_mib: f64,
    /// PSS plus BPF maps.
    pub per_node_total_mib: f64,
    /// CPU seconds over the window, scaled to a minute.
    pub per_node_cpu_s_per_min: f64,
}

/// One node's proxies in a scale round, summed over them.
#[derive(Clone, Debug, Serialize)]
pub struct NodeUsage {
    pub proxies: usize,
    pub pss_mib: f64,
    pub rss_mib: f64,
    pub bpf_map_mib: f64,
    /// CPU seconds over the window.
    pub cpu_s: f64,
}

/// Each mode's rounds of one scenario, in the order they ran.
#[derive(Debug, Serialize)]
#[serde(transparent)]
pub struct ByMode<T>(BTreeMap<Mode, Vec<Outcome<T>>>);

impl<T> Default for ByMode<T> {
    fn default() -> Self {
        Self(BTreeMap::new())
    }
}

impl<T> ByMode<T> {
    pub fn rounds(&self, mode: Mode) -> &[Outcome<T>] {
        self.0.get(&mode).map(Vec::as_slice).unwrap_or(&[])
    }

    /// The first failure among a mode's rounds, if any.
    pub fn failure(&self, mode: Mode) -> Option<&str> {
        self.rounds(mode).iter().find_map(Outcome::failure)
    }

    /// The modes that have rounds.
    pub fn modes(&self) -> impl Iterator<Item = Mode> + '_ {
        self.0.keys().copied()
    }
}

impl<T: fmt::Debug> ByMode<T> {
    /// Appends a round of `mode`; returns it as the progress log shows it.
    fn record(&mut self, mode: Mode, outcome: Outcome<T>) -> String {
        let log = outcome.to_string();
        self.0.entry(mode).or_default().push(outcome);
        log
    }
}

/// The two-pod scenarios, in the order each round runs them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scenario {
    Latency,
    LatencyH2,
    MaxRpsHttp1,
    MaxRpsHttp2,
    TcpSingleStream,
    NewConnections,
}

impl Scenario {
    pub const ALL: [Self; 6] = [
        Self::Latency,
        Self::LatencyH2,
        Self::MaxRpsHttp1,
        Self::MaxRpsHttp2,
        Self::TcpSingleStream,
        Self::NewConnections,
    ];

    /// The name the log, RESULTS.md and `results.json` use.
    pub fn name(self) -> &'static str {
        match self {
            Self::Latency => "latency_http1_1000rps",
            Self::LatencyH2 => "latency_h2c_1000rps",
            Self::MaxRpsHttp1 => "max_rps_http1",
            Self::MaxRpsHttp2 => "max_rps_http2",
            Self::TcpSingleStream => "tcp_single_stream",
            Self::NewConnections => "new_connections",
        }
    }
}

/// Every round of the two-pod scenarios, per scenario and mode (the fields are named as
/// [`Scenario::name`]).
#[derive(Debug, Default, Serialize)]
pub struct Runs {
    pub latency_http1_1000rps: ByMode<LatencyRound>,
    pub latency_h2c_1000rps: ByMode<LatencyRound>,
    pub max_rps_http1: ByMode<MaxRpsRound>,
    pub max_rps_http2: ByMode<MaxRpsRound>,
    pub new_connections: ByMode<ConnRateRound>,
    pub tcp_single_stream: ByMode<StreamRound>,
}

impl Runs {
    /// Runs `scenario` once on `mode`'s bed (`None`: not built) and records the outcome;
    /// returns it as the progress log shows it.
    pub fn run(
        &mut self,
        scenario: Scenario,
        mode: Mode,
        bed: Option<&mut Result<Bed, String>>,
        plan: &Plan,
    ) -> String {
        // The L7 modes differ from node/sidecar only in what they do with requests.
        if mode.is_l7()
            && matches!(
                scenario,
                Scenario::TcpSingleStream | Scenario::NewConnections
            )
        {
            return "not an L7 scenario".into();
        }
        match scenario {
            Scenario::Latency => self
                .latency_http1_1000rps
                .record(mode, attempt(bed, |b| latency(b, plan, false))),
            Scenario::LatencyH2 => self
                .latency_h2c_1000rps
                .record(mode, attempt(bed, |b| latency(b, plan, true))),
            Scenario::MaxRpsHttp1 => self
                .max_rps_http1
                .record(mode, attempt(bed, |b| max_rps(b, plan, false))),
            Scenario::MaxRpsHttp2 => self
                .max_rps_http2
                .record(mode, attempt(bed, |b| max_rps(b, plan, true))),
            Scenario::TcpSingleStream => self
                .tcp_single_stream
                .record(mode, attempt(bed, |b| iperf(b, plan))),
            Scenario::NewConnections => self
                .new_connections
                .record(mode, attempt(bed, |b| conn_rate(b, plan))),
        }
    }

    /// The first failure of `mode` in `scenario`, if any.
    pub fn failure(&self, scenario: Scenario, mode: Mode) -> Option<&str> {
        match scenario {
            Scenario::Latency => self.latency_http1_1000rps.failure(mode),
            Scenario::LatencyH2 => self.latency_h2c_1000rps.failure(mode),
            Scenario::MaxRpsHttp1 => self.max_rps_http1.failure(mode),
            Scenario::MaxRpsHttp2 => self.max_rps_http2.failure(mode),
            Scenario::TcpSingleStream => self.tcp_single_stream.failure(mode),
            Scenario::NewConnections => self.new_connections.failure(mode),
        }
    }
}

/// One run of a scenario on a bed. It fails if the bed could not be built, the scenario panicked
/// or reported an error, or a proxy died: a proxy that died fails this and every later run of its
/// mode.
fn attempt<T>(
    bed: Option<&mut Result<Bed, String>>,
    f: impl FnOnce(&mut Bed) -> Result<T, String>,
) -> Outcome<T> {
    match bed {
        Some(Ok(bed)) => {
            let o = guarded(|| f(&mut *bed)).and_then(|o| o);
            match proxies_alive(bed) {
                Ok(()) => o.into(),
                Err(e) => Outcome::Failed(e),
            }
        }
        Some(Err(e)) => Outcome::Failed(e.clone()),
        None => Outcome::Failed("not built".into()),
    }
}

/// A fixed 1000 req/s, 1 KB responses: HTTP/1.1 over 16 connections, or (`h2`) HTTP/2 with prior
/// knowledge (as gRPC rides) over 4 connections of 8 streams; per-request latencies from
/// h2load's log; the proxies' CPU over the run.
fn latency(bed: &mut Bed, plan: &Plan, h2: bool) -> Result<LatencyRound, String> {
    let log = std::env::temp_dir().join(format!("mesh-bench-{}.log", bed.mode.tag()));
    let _ = std::fs::remove_file(&log);
    let pids: Vec<u32> = proxies(&bed.t).iter().map(|(_, p)| *p).collect();
    let cpu0: f64 = pids.iter().map(|p| cpu_seconds(*p)).sum();
    let mut cmd = in_pod(&bed.t, "client", Path::new("h2load"));
    let conns = if h2 { LATENCY_H2_CONNS } else { LATENCY_CONNS };
    if h2 {
        cmd.args(["-m", &LATENCY_H2_STREAMS.to_string()]);
    } else {
        cmd.arg("--h1");
    }
    cmd.args(["-t", "1"])
        .args(["-c", &conns.to_string()])
        .arg(format!("--rps={}", LATENCY_RPS / f64::from(conns)))
        .args(["-D", &plan.latency_secs.to_string()])
        .args(["--warm-up-time", &WARM_UP_SECS.to_string()])
        .arg("--log-file")
        .arg(&log)
        .arg(format!("http://{}/", bed.http_addr));
    let out = run(&mut cmd)?;
    let cpu1: f64 = pids.iter().map(|p| cpu_seconds(*p)).sum();
    let (ok, rps) = h2load_summary(&out)?;
    let text = std::fs::read_to_string(&log).map_err(|e| format!("h2load's log: {e}"))?;
    let _ = std::fs::remove_file(&log);
    let mut us = h2load_latencies(&text);
    if us.len() < 100 {
        return Err(format!("only {} requests in h2load's log", us.len()));
    }
    us.sort_by(f64::total_cmp);
    Ok(LatencyRound {
        p50_us: percentile(&us, 0.50),
        p90_us: percentile(&us, 0.90),
        p99_us: percentile(&us, 0.99),
        p999_us: percentile(&us, 0.999),
        rps,
        proxy_cpu_s_per_1000_req: (!pids.is_empty()).then(|| (cpu1 - cpu0) / ok * 1000.0),
    })
}

/// Flat out for `max_secs`, 64 connections: HTTP/1.1, or HTTP/2 with 10 streams per connection.
fn max_rps(bed: &mut Bed, plan: &Plan, h2: bool) -> Result<MaxRpsRound, String> {
    let mut cmd = in_pod(&bed.t, "client", Path::new("h2load"));
    if h2 {
        cmd.args(["-m", &H2_STREAMS.to_string()]);
    } else {
        cmd.arg("--h1");
    }
    cmd.args(["-t", "1", "-c", &MAX_CONNS.to_string()])
        .args(["-D", &plan.max_secs.to_string()])
        .args(["--warm-up-time", &WARM_UP_SECS.to_string()])
        .arg(format!("http://{}/", bed.http_addr));
    let out = run(&mut cmd)?;
    let (_, rps) = h2load_summary(&out)?;
    Ok(MaxRpsRound { rps })
}

/// One TCP stream, client → server, iperf3.
fn iperf(bed: &mut Bed, plan: &Plan) -> Result<StreamRound, String> {
    let mut cmd = in_pod(&bed.t, "client", Path::new("iperf3"));
    cmd.args(["-c", &bed.server_ip, "-p", &IPERF_PORT.to_string()])
        .args(["-t", &plan.iperf_secs.to_string(), "-J"]);
    let out = cmd.output().map_err(|e| format!("iperf3: {e}"))?;
    let bps = iperf_bits_per_second(&out.stdout, &out.stderr)?;
    Ok(StreamRound { gbit_s: bps / 1e9 })
}

/// New connections per second, one after the other: connect, 100 B each way, close.
fn conn_rate(bed: &mut Bed, plan: &Plan) -> Result<ConnRateRound, String> {
    let mut cmd = in_pod(&bed.t, "client", &bin("mesh-app"));
    cmd.args(["connect", &format!("{}:{ECHO_PORT}", bed.server_ip)])
        .args(["--send", &CONNECT_BYTES.to_string()])
        .args(["--repeat", &plan.connections.to_string(), "--stats"]);
    let start = Instant::now();
    let out = run(&mut cmd)?;
    let secs = start.elapsed().as_secs_f64();
    if !out.contains("echo=ok") {
        return Err(format!("mesh-app: {}", tail(&out)));
    }
    Ok(ConnRateRound {
        conn_per_s: f64::from(plan.connections) / secs,
        p50_us: mesh_app_field(&out, "p50_us"),
        p99_us: mesh_app_field(&out, "p99_us"),
    })
}

/// One point of the scale scenario: its pods per node and each mode's rounds.
#[derive(Debug, Serialize)]
pub struct ScalePoint {
    pub pods_per_node: usize,
    pub modes: ByMode<ScaleRound>,
}

/// One scale point: `n` client pods on node 1, each holding 4 connections to its own server pod
/// on node 2 and sending a 100 B request on one of them every 250 ms. Node and sidecar mode are
/// up side by side; each round samples both, alternating.
pub fn scale_point(n: usize, plan: &Plan) -> ScalePoint {
    let mut res: ByMode<ScaleRound> = ByMode::default();
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
                Ok((t, _)) => scale_sample(t, plan.scale_secs).into(),
                Err(e) => Outcome::Failed(e.clone()),
            };
            let log = res.record(*m, o);
            eprintln!("  scale {n} round {} {}: {log}", r + 1, m.name());
        }
    }
    // The trickle must have kept flowing: a client with errors fails the point.
    for (m, bed) in &mut beds {
        if let Ok((_, holders)) = bed {
            let bad: Vec<String> = holders
                .iter()
                .map(|h| h.output())
                .filter(|o| !o.contains(&held()) || o.contains("error="))
                .collect();
            if let Some(b) = bad.first() {
                let why = format!(
                    "{} pod(s) lost their connections, e.g. {}",
                    bad.len(),
                    tail(b)
                );
                res.0.insert(*m, vec![Outcome::Failed(why)]);
            }
        }
    }
    ScalePoint {
        pods_per_node: n,
        modes: res,
    }
}

/// Memory (PSS, RSS, BPF maps) and CPU seconds over `secs`, per node, summed over its proxies.
fn scale_sample(t: &Topology, secs: u64) -> Result<ScaleRound, String> {
    let ps = proxies(t);
    if ps.is_empty() {
        return Err("no proxies running".into());
    }
    let cpu0: Vec<f64> = ps.iter().map(|(_, p)| cpu_seconds(*p)).collect();
    std::thread::sleep(Duration::from_secs(secs));
    let mut nodes = Vec::new();
    for node in 0..t.nodes.len() {
        let pids: Vec<u32> = ps
            .iter()
            .filter(|(n, _)| *n == node)
            .map(|(_, p)| *p)
            .collect();
        let cpu: f64 = ps
            .iter()
            .zip(&cpu0)
            .filter(|((n, _), _)| *n == node)
            .map(|((_, p), c0)| cpu_seconds(*p) - c0)
            .sum();
        nodes.push(NodeUsage {
            proxies: pids.len(),
            pss_mib: pids.iter().map(|p| pss_kib(*p)).sum::<f64>() / 1024.0,
            rss_mib: pids.iter().map(|p| rss_kib(*p)).sum::<f64>() / 1024.0,
            bpf_map_mib: map_kib(&pids) / 1024.0,
            cpu_s: cpu,
        });
    }
    let mean = |f: fn(&NodeUsage) -> f64| nodes.iter().map(f).sum::<f64>() / nodes.len() as f64;
    let (pss, rss, maps, cpu) = (
        mean(|u| u.pss_mib),
        mean(|u| u.rss_mib),
        mean(|u| u.bpf_map_mib),
        mean(|u| u.cpu_s),
    );
    Ok(ScaleRound {
        nodes,
        per_node_pss_mib: pss,
        per_node_rss_mib: rss,
        per_node_bpf_map_mib: maps,
        per_node_total_mib: pss + maps,
        per_node_cpu_s_per_min: cpu / secs as f64 * 60.0,
    })
}
