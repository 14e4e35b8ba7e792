//! The report: `results.json` (everything raw), `RESULTS.md` (tables with ratios, then the
//! hand-written notes kept from the previous RESULTS.md) and the two plots ([`crate::plot`]).

use std::{collections::BTreeMap, fmt::Write as _, path::Path, time::Duration};

use serde::{Serialize, Serializer};

use crate::{
    MODES, Mode, Plan,
    measurement::Machine,
    plot,
    scenarios::{
        CONNECT_BYTES, H2_STREAMS, LATENCY_CONNS, LATENCY_H2_CONNS, LATENCY_H2_STREAMS,
        LATENCY_RPS, LatencyRound, MAX_CONNS, Measure, Runs, ScalePoint, ScaleRound, Scenario,
        WARM_UP_SECS,
    },
    statistics::{Stat, ratio},
    topology::{HOLD_CONNS, HOLD_EVERY_MS, RESPONSE_BYTES},
};

/// Everything a run measured, as `results.json` holds it; RESULTS.md and the plots read it.
#[derive(Serialize)]
pub struct Results {
    pub machine: Machine,
    #[serde(serialize_with = "parameters")]
    pub plan: Plan,
    pub runs: Runs,
    /// The proxies' PSS (MiB, summed over the bed) after the two-pod scenarios; none for the
    /// baselines and for a bed that was not built.
    pub proxy_pss_mib_two_pods: BTreeMap<Mode, Option<f64>>,
    pub scale: Vec<ScalePoint>,
    #[serde(rename = "elapsed_seconds", serialize_with = "whole_seconds")]
    pub elapsed: Duration,
}

impl Results {
    /// A measure's statistics for a mode at `n` pods per node, or the reason it failed.
    pub fn scale_stat(
        &self,
        n: usize,
        mode: Mode,
        measure: Measure<ScaleRound>,
    ) -> Result<Stat, String> {
        match self.scale.iter().find(|p| p.pods_per_node == n) {
            Some(p) => p.modes.stat(mode, |r| Some(measure(r))),
            None => Err("no data".to_string()),
        }
    }
}

/// RESULTS.md's line after which everything is written by hand; [`write`] keeps it across runs.
pub const NOTES_MARKER: &str = "<!-- notes below are written by hand and kept across runs -->";

/// Writes `results.json`, `RESULTS.md`, `latency.svg` and `scale.svg` to `out_dir`, the raw
/// numbers first. RESULTS.md keeps what followed [`NOTES_MARKER`] in the one it replaces; if that
/// one cannot be read, the run stops there and leaves it as it was.
pub fn write(results: &Results, out_dir: &Path) {
    std::fs::create_dir_all(out_dir).expect("create the output folder");
    std::fs::write(
        out_dir.join("results.json"),
        serde_json::to_string_pretty(results).expect("json") + "\n",
    )
    .expect("write results.json");
    let path = out_dir.join("RESULTS.md");
    let notes = match std::fs::read_to_string(&path) {
        Ok(old) => kept_notes(&old).to_string(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => panic!("read {} to keep its notes: {e}", path.display()),
    };
    std::fs::write(&path, markdown(results, &notes)).expect("write RESULTS.md");
    std::fs::write(
        out_dir.join("latency.svg"),
        plot::latency(results).expect("draw latency.svg"),
    )
    .expect("write latency.svg");
    std::fs::write(
        out_dir.join("scale.svg"),
        plot::scale(results).expect("draw scale.svg"),
    )
    .expect("write scale.svg");
}

/// What follows the marker line in an earlier RESULTS.md, verbatim; empty without one.
fn kept_notes(old: &str) -> &str {
    let mut end = 0;
    for line in old.split_inclusive('\n') {
        end += line.len();
        if line.trim_end() == NOTES_MARKER {
            return &old[end..];
        }
    }
    ""
}

// --- results.json's "plan": the run's parameters with the fixed loads and the tools ---

#[derive(Serialize)]
struct Parameters<'a> {
    quick: bool,
    rounds: usize,
    latency: LatencyParameters,
    max_rps: MaxRpsParameters,
    tcp_single_stream: StreamParameters,
    new_connections: ConnParameters,
    scale: ScaleParameters<'a>,
}

#[derive(Serialize)]
struct LatencyParameters {
    tool: &'static str,
    rps: f64,
    connections: u32,
    response_bytes: usize,
    seconds: u64,
    warm_up_seconds: u64,
}

#[derive(Serialize)]
struct MaxRpsParameters {
    tool: &'static str,
    connections: u32,
    http2_streams_per_connection: u32,
    response_bytes: usize,
    seconds: u64,
}

#[derive(Serialize)]
struct StreamParameters {
    tool: &'static str,
    seconds: u64,
}

#[derive(Serialize)]
struct ConnParameters {
    tool: &'static str,
    connections: u32,
    bytes_each_way: usize,
}

#[derive(Serialize)]
struct ScaleParameters<'a> {
    pods_per_node: &'a [usize],
    rounds: usize,
    window_seconds: u64,
    connections_per_pod: usize,
    request_every_ms: u64,
}

fn parameters<S: Serializer>(plan: &Plan, s: S) -> Result<S::Ok, S::Error> {
    Parameters {
        quick: plan.quick,
        rounds: plan.rounds,
        latency: LatencyParameters {
            tool: "h2load --h1",
            rps: LATENCY_RPS,
            connections: LATENCY_CONNS,
            response_bytes: RESPONSE_BYTES,
            seconds: plan.latency_secs,
            warm_up_seconds: WARM_UP_SECS,
        },
        max_rps: MaxRpsParameters {
            tool: "h2load",
            connections: MAX_CONNS,
            http2_streams_per_connection: H2_STREAMS,
            response_bytes: RESPONSE_BYTES,
            seconds: plan.max_secs,
        },
        tcp_single_stream: StreamParameters {
            tool: "iperf3",
            seconds: plan.iperf_secs,
        },
        new_connections: ConnParameters {
            tool: "mesh-app connect --repeat",
            connections: plan.connections,
            bytes_each_way: CONNECT_BYTES,
        },
        scale: ScaleParameters {
            pods_per_node: &plan.scale_pods,
            rounds: plan.scale_rounds,
            window_seconds: plan.scale_secs,
            connections_per_pod: HOLD_CONNS,
            request_every_ms: HOLD_EVERY_MS,
        },
    }
    .serialize(s)
}

fn whole_seconds<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u64(d.as_secs())
}

// --- RESULTS.md ---

/// `median [min–max]` with `digits` decimals, or "failed".
fn fmt(s: &Result<Stat, String>, digits: usize) -> String {
    match s {
        Ok(s) => format!("{:.d$} [{:.d$}–{:.d$}]", s.median, s.min, s.max, d = digits),
        Err(_) => "failed".into(),
    }
}

fn markdown(r: &Results, notes: &str) -> String {
    let mut md = String::new();
    let m = &r.machine;
    let plan = &r.plan;
    let runs = &r.runs;
    let lat = &runs.latency_http1_1000rps;
    let _ = writeln!(
        md,
        "# nodemesh benchmark: per-node versus sidecar\n\n\
         {} run of `cargo xtask bench{}` on {} ({} CPUs, {}), kernel {}, {}; nodemesh {}, \
         {}, {}. {} rounds per scenario, modes interleaved; medians with [min–max] over \
         rounds. Raw numbers: `results.json`. Took {:.0} min.\n",
        if plan.quick { "A **quick**" } else { "A full" },
        if plan.quick { " --quick" } else { "" },
        m.date,
        m.cpus,
        m.cpu,
        m.kernel,
        m.os,
        m.nodemesh,
        m.h2load,
        m.iperf3,
        plan.rounds,
        r.elapsed.as_secs_f64() / 60.0,
    );
    let failures = |md: &mut String, scenarios: &[Scenario]| {
        for mode in MODES {
            for sc in scenarios {
                if let Some(e) = runs.failure(*sc, mode) {
                    let _ = writeln!(md, "\n- **{}** failed in `{}`: {e}", mode.name(), sc.name());
                    break;
                }
            }
        }
    };

    // Targets first: what the project holds itself to.
    let _ = writeln!(md, "## Targets\n\n| target | measured | |\n|---|---|---|");
    let p99 = |mode| lat.added(mode, |x| Some(x.p99_us));
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
    let pss: Measure<ScaleRound> = |x| x.per_node_pss_mib;
    let total: Measure<ScaleRound> = |x| x.per_node_total_mib;
    let mem = |mode, f| r.scale_stat(50, mode, f);
    match (
        mem(Mode::Node, pss),
        mem(Mode::Sidecar, pss),
        mem(Mode::Node, total),
        mem(Mode::Sidecar, total),
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
                if plan.quick {
                    " (--quick stops at 10 pods)"
                } else {
                    ""
                }
            );
        }
    }
    let tput = |mode| runs.tcp_single_stream.stat(mode, |x| Some(x.gbit_s));
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
    // L7 in the node proxy: what a route in force adds, against node L4 and sidecar L7.
    for (what, runs_of) in [
        ("HTTP/1.1", &runs.latency_http1_1000rps),
        ("h2c", &runs.latency_h2c_1000rps),
    ] {
        let added = |mode| runs_of.added(mode, |x| Some(x.p99_us));
        match (
            added(Mode::NodeL7),
            added(Mode::Node),
            added(Mode::SidecarL7),
        ) {
            (Ok(l7), Ok(l4), Ok(s7)) => {
                let r = l7.median / l4.median;
                let _ = writeln!(
                    md,
                    "| node L7 adds at most 1.25× node L4's p99 ({what}, 1000 req/s) | node L7 +{:.0} µs, node L4 +{:.0} µs (ratio {r:.2}); against sidecar L7 +{:.0} µs: ratio {:.2} | {} |",
                    l7.median,
                    l4.median,
                    s7.median,
                    l7.median / s7.median,
                    if r <= 1.25 { "met" } else { "**not met**" }
                );
            }
            (a, b, c) => {
                let _ = writeln!(
                    md,
                    "| node L7 adds at most 1.25× node L4's p99 ({what}, 1000 req/s) | {} | failed |",
                    a.err().or(b.err()).or(c.err()).unwrap_or_default()
                );
            }
        }
    }
    // Not a target: what the same-node fast path changes, beside the relay it replaces.
    let cmp = |stat: &dyn Fn(Mode) -> Result<Stat, String>, what: &str, d: usize| match (
        stat(Mode::NodeLocalSockmap),
        stat(Mode::NodeLocal),
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
        cmp(&tput, "one stream Gbit/s", 2),
        cmp(
            &|mode| lat.stat(mode, |x| Some(x.p99_us)),
            "p99 µs at 1000 req/s",
            0
        ),
        cmp(
            &|mode| lat.stat(mode, |x| x.proxy_cpu_s_per_1000_req),
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
    // The percentiles as the table has them: all four, then the added p50, p99 and p99.9.
    let [p50, p90, p99, p999] = LatencyRound::PERCENTILES.map(|(_, f)| f);
    for mode in MODES {
        let g = |f: Measure<LatencyRound>| fmt(&lat.stat(mode, |x| Some(f(x))), 0);
        let a = |f: Measure<LatencyRound>| {
            if mode.is_baseline() {
                "—".to_string()
            } else {
                fmt(&lat.added(mode, |x| Some(f(x))), 0)
            }
        };
        let cpu = if mode.is_baseline() {
            "—".into()
        } else {
            fmt(&lat.stat(mode, |x| x.proxy_cpu_s_per_1000_req), 3)
        };
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            mode.name(),
            g(p50),
            g(p90),
            g(p99),
            g(p999),
            a(p50),
            a(p99),
            a(p999),
            cpu
        );
    }
    if let (Ok(n), Ok(s)) = (
        lat.added(Mode::Node, |x| Some(x.p99_us)),
        lat.added(Mode::Sidecar, |x| Some(x.p99_us)),
    ) {
        let _ = writeln!(
            md,
            "\nsidecar → node: added p99 {:.0} µs → {:.0} µs (×{:.2}).",
            s.median,
            n.median,
            n.median / s.median
        );
    }
    failures(&mut md, &[Scenario::Latency]);

    let h2lat = &runs.latency_h2c_1000rps;
    let _ = writeln!(
        md,
        "\n## Latency at a fixed {LATENCY_RPS} req/s (HTTP/2 with prior knowledge, as gRPC rides: \
         {LATENCY_H2_CONNS} connections × {LATENCY_H2_STREAMS} streams)\n\n\
         The L7 modes call a service VIP with an HTTPRoute in force, so every request is routed \
         and balanced by the proxy; `node` and `sidecar` call the pod's address (L4).\n\n\
         | mode | p50 µs | p99 µs | added p50 | added p99 | proxy CPU s / 1000 req |\n|---|---|---|---|---|---|"
    );
    for mode in MODES {
        let g = |f: Measure<LatencyRound>| fmt(&h2lat.stat(mode, |x| Some(f(x))), 0);
        let a = |f: Measure<LatencyRound>| {
            if mode.is_baseline() {
                "—".to_string()
            } else {
                fmt(&h2lat.added(mode, |x| Some(f(x))), 0)
            }
        };
        let cpu = if mode.is_baseline() {
            "—".into()
        } else {
            fmt(&h2lat.stat(mode, |x| x.proxy_cpu_s_per_1000_req), 3)
        };
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} |",
            mode.name(),
            g(p50),
            g(p99),
            a(p50),
            a(p99),
            cpu
        );
    }
    failures(&mut md, &[Scenario::LatencyH2]);

    let _ = writeln!(
        md,
        "\n## Throughput\n\n\
         h2load flat out with {MAX_CONNS} connections (HTTP/2: {H2_STREAMS} streams each), iperf3 one \
         stream, and new connections per second one after the other (connect, 100 B each way, close; the \
         project's own client: no Debian tool has that mode). Ratio = mode / baseline (medians).\n\n\
         | mode | HTTP/1.1 req/s | HTTP/2 req/s | TCP Gbit/s | new conn/s | ratios (h1, h2, tcp, conn) |\n\
         |---|---|---|---|---|---|"
    );
    // Each column: its statistics for a mode, and its decimals.
    type Column<'a> = (Box<dyn Fn(Mode) -> Result<Stat, String> + 'a>, usize);
    let columns: [Column; 4] = [
        (
            Box::new(|mode| runs.max_rps_http1.stat(mode, |x| Some(x.rps))),
            0,
        ),
        (
            Box::new(|mode| runs.max_rps_http2.stat(mode, |x| Some(x.rps))),
            0,
        ),
        (Box::new(tput), 2),
        (
            Box::new(|mode| runs.new_connections.stat(mode, |x| Some(x.conn_per_s))),
            0,
        ),
    ];
    for mode in MODES {
        let cells: Vec<String> = columns.iter().map(|(s, d)| fmt(&s(mode), *d)).collect();
        let ratios: Vec<String> = columns
            .iter()
            .map(|(s, _)| match ratio(&s(mode), &s(mode.baseline())) {
                Some(x) => format!("{x:.2}"),
                None => "—".into(),
            })
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
            Scenario::MaxRpsHttp1,
            Scenario::MaxRpsHttp2,
            Scenario::TcpSingleStream,
            Scenario::NewConnections,
        ],
    );
    let _ = writeln!(
        md,
        "\nProxy memory (PSS, summed over the topology's proxies) after these runs:"
    );
    for (mode, v) in &r.proxy_pss_mib_two_pods {
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
        plan.scale_secs
    );
    let maps: Measure<ScaleRound> = |x| x.per_node_bpf_map_mib;
    let cpu: Measure<ScaleRound> = |x| x.per_node_cpu_s_per_min;
    for p in &r.scale {
        let n = p.pods_per_node;
        let g = |mode, f, d| fmt(&r.scale_stat(n, mode, f), d);
        let node_over_sidecar = |f| match ratio(
            &r.scale_stat(n, Mode::Node, f),
            &r.scale_stat(n, Mode::Sidecar, f),
        ) {
            Some(x) => format!("{x:.3}"),
            None => "—".into(),
        };
        let _ = writeln!(
            md,
            "| {n} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            g(Mode::Node, pss, 1),
            g(Mode::Sidecar, pss, 1),
            node_over_sidecar(pss),
            g(Mode::Node, maps, 1),
            g(Mode::Sidecar, maps, 1),
            node_over_sidecar(total),
            g(Mode::Node, cpu, 2),
            g(Mode::Sidecar, cpu, 2),
            node_over_sidecar(cpu),
        );
    }
    for p in &r.scale {
        for mode in p.modes.modes() {
            if let Some(e) = p.modes.failure(mode) {
                let _ = writeln!(
                    md,
                    "- **{}** at {} pods failed: {e}",
                    mode.name(),
                    p.pods_per_node
                );
            }
        }
    }
    md.push_str(HOW_TO_READ);
    md.push('\n');
    md.push_str(NOTES_MARKER);
    md.push('\n');
    md.push_str(notes);
    md
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
