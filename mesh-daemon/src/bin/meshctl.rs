//! `meshctl`: the operator CLI. It reads the nodes' endpoints — `/metrics` (:15020) for `stat`,
//! `top` and `edges`, the admin port (127.0.0.1:15000, so run it on the node) for `tap` and
//! `identity` — and runs the preflight (`check`).

use std::{
    collections::BTreeMap,
    io::{IsTerminal, Write},
    process::ExitCode,
    time::{Duration, Instant},
};

use clap::{Parser, Subcommand, ValueEnum};
use mesh_daemon::{
    check,
    promtext::{self, Sample},
};

#[derive(Parser)]
#[command(
    name = "meshctl",
    version,
    about = "Inspect a nodemesh mesh from its nodes' endpoints"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Output {
    Table,
    Json,
}

#[derive(clap::Args, Clone)]
struct Nodes {
    /// Metrics endpoints of the nodes to read (`ip:port`), comma-separated or repeated.
    #[arg(
        long = "node",
        env = "NODEMESH_NODES",
        value_delimiter = ',',
        default_value = "127.0.0.1:15020"
    )]
    nodes: Vec<String>,
}

#[derive(Subcommand)]
enum Command {
    /// Check that this node can run the mesh (kernel, BTF, cgroup v2, bpffs, capabilities).
    Check {
        #[arg(long, env = "NODEMESH_CGROUP_ROOT")]
        cgroup_root: Option<std::path::PathBuf>,
    },
    /// Golden metrics per workload (as a destination) or per edge, summed over the nodes.
    Stat {
        #[command(flatten)]
        nodes: Nodes,
        /// Group by destination workload, or by (source, destination) edge.
        #[arg(long, value_enum, default_value = "workload")]
        by: By,
        #[arg(short, long, value_enum, default_value = "table")]
        output: Output,
    },
    /// The busiest edges right now (rates between two scrapes), refreshing.
    Top {
        #[command(flatten)]
        nodes: Nodes,
        /// Seconds between refreshes.
        #[arg(long, default_value_t = 2)]
        interval: u64,
        /// Stop after this many refreshes (default: until interrupted).
        #[arg(long)]
        count: Option<u64>,
    },
    /// Who talks to whom: each edge with both ends' identities and whether it crossed as mTLS.
    Edges {
        #[command(flatten)]
        nodes: Nodes,
        #[arg(short, long, value_enum, default_value = "table")]
        output: Output,
    },
    /// Follow live connection events from a node's admin port.
    Tap {
        /// The node's admin endpoint (loopback only: run meshctl on the node).
        #[arg(long, env = "NODEMESH_ADMIN", default_value = "127.0.0.1:15000")]
        admin: String,
        #[arg(long)]
        workload: Option<String>,
        #[arg(long)]
        namespace: Option<String>,
        #[arg(long)]
        path: Option<String>,
        #[arg(long)]
        status: Option<u16>,
        /// Stop after this many events.
        #[arg(long)]
        count: Option<u64>,
        #[arg(short, long, value_enum, default_value = "table")]
        output: Output,
    },
    /// The certificates a node holds and when they expire.
    Identity {
        #[arg(long, env = "NODEMESH_ADMIN", default_value = "127.0.0.1:15000")]
        admin: String,
        #[arg(short, long, value_enum, default_value = "table")]
        output: Output,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum By {
    Workload,
    Edge,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let r = match cli.command {
        Command::Check { cgroup_root } => {
            let outcomes = check::run(cgroup_root.as_deref());
            let (text, ok) = check::render(&outcomes);
            print!("{text}");
            return if ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            };
        }
        Command::Stat { nodes, by, output } => stat(&nodes, by, output),
        Command::Top {
            nodes,
            interval,
            count,
        } => top(&nodes, interval, count),
        Command::Edges { nodes, output } => edges(&nodes, output),
        Command::Tap {
            admin,
            workload,
            namespace,
            path,
            status,
            count,
            output,
        } => {
            let mut q = Vec::new();
            for (k, v) in [
                ("workload", workload),
                ("namespace", namespace),
                ("path", path),
                ("status", status.map(|s| s.to_string())),
            ] {
                if let Some(v) = v {
                    q.push(format!("{k}={}", encode(&v)));
                }
            }
            tap(&admin, &q.join("&"), count, output)
        }
        Command::Identity { admin, output } => identity(&admin, output),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("meshctl: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Percent-encodes a query value: everything but letters, digits and `-_./`.
fn encode(s: &str) -> String {
    const KEEP: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
        .remove(b'-')
        .remove(b'_')
        .remove(b'.')
        .remove(b'/');
    percent_encoding::utf8_percent_encode(s, KEEP).to_string()
}

// === HTTP ===

/// meshctl's one runtime: each command makes a few HTTP/1.1 requests with hyper's client.
fn runtime() -> Result<&'static tokio::runtime::Runtime, String> {
    static RT: std::sync::OnceLock<tokio::runtime::Runtime> = std::sync::OnceLock::new();
    if let Some(rt) = RT.get() {
        return Ok(rt);
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start a runtime: {e}"))?;
    Ok(RT.get_or_init(|| rt))
}

/// A GET to `addr` (host:port) with hyper over one connection; the response once its status is
/// 200 (anything else is an error with the status and the body's reason).
async fn get(addr: &str, path: &str) -> Result<hyper::Response<hyper::body::Incoming>, String> {
    use http_body_util::BodyExt as _;
    let sa = tokio::net::lookup_host(addr)
        .await
        .map_err(|e| format!("{addr}: {e}"))?
        .next()
        .ok_or_else(|| format!("{addr}: no address"))?;
    let tcp = tokio::time::timeout(Duration::from_secs(5), tokio::net::TcpStream::connect(sa))
        .await
        .map_err(|_| format!("cannot reach {addr}: no answer within 5 s"))?
        .map_err(|e| {
            format!("cannot reach {addr}: {e}; is the node daemon running and is this its address?")
        })?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
            .await
            .map_err(|e| format!("{addr}: {e}"))?;
    tokio::spawn(conn);
    let req = hyper::Request::get(path)
        .header(hyper::header::HOST, addr)
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .map_err(|e| format!("{addr}{path}: {e}"))?;
    let resp = sender
        .send_request(req)
        .await
        .map_err(|e| format!("{addr}{path}: {e}"))?;
    if resp.status() != hyper::StatusCode::OK {
        let status = resp.status();
        let body = resp
            .into_body()
            .collect()
            .await
            .map(|b| String::from_utf8_lossy(&b.to_bytes()).trim().to_string())
            .unwrap_or_default();
        return Err(format!("{addr}{path}: {status} {body}"));
    }
    Ok(resp)
}

fn get_text(addr: &str, path: &str) -> Result<String, String> {
    use http_body_util::BodyExt as _;
    runtime()?.block_on(async {
        let fetch = async {
            let body = get(addr, path)
                .await?
                .into_body()
                .collect()
                .await
                .map_err(|e| format!("{addr}{path}: {e}"))?;
            String::from_utf8(body.to_bytes().to_vec())
                .map_err(|_| format!("{addr}{path}: the answer is not UTF-8"))
        };
        tokio::time::timeout(Duration::from_secs(10), fetch)
            .await
            .map_err(|_| format!("{addr}{path}: no complete answer within 10 s"))?
    })
}

/// Follows a streamed answer line by line until it ends or `each` returns false.
fn follow_lines(
    addr: &str,
    path: &str,
    mut each: impl FnMut(&str) -> Result<bool, String>,
) -> Result<(), String> {
    use http_body_util::BodyExt as _;
    runtime()?.block_on(async {
        let mut body = get(addr, path).await?.into_body();
        let mut pending: Vec<u8> = Vec::new();
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| format!("{addr}{path}: {e}"))?;
            let Ok(data) = frame.into_data() else {
                continue;
            };
            pending.extend_from_slice(&data);
            while let Some(end) = pending.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = pending.drain(..=end).collect();
                if !each(String::from_utf8_lossy(&line).trim_end())? {
                    return Ok(());
                }
            }
        }
        Ok(())
    })
}

fn scrape(nodes: &Nodes) -> Result<Vec<Sample>, String> {
    let mut all = Vec::new();
    for n in &nodes.nodes {
        let (samples, bad) = promtext::parse(&get_text(n, "/metrics")?);
        if bad > 0 {
            eprintln!("meshctl: {n}/metrics: skipped {bad} unreadable lines");
        }
        all.extend(samples);
    }
    Ok(all)
}

// === stat, top, edges ===

#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
struct Row {
    connections: u64,
    closed: u64,
    bytes_sent: u64,
    bytes_received: u64,
    requests: u64,
    success: u64,
}

impl Row {
    fn success_rate(&self) -> Option<f64> {
        (self.requests > 0).then(|| self.success as f64 / self.requests as f64)
    }
}

/// Per key, from the source side (`reporter="outbound"`): every meshed connection is captured
/// and counted exactly once there, same node or not.
fn rows(samples: &[Sample], key: impl Fn(&Sample) -> String) -> BTreeMap<String, Row> {
    let mut out: BTreeMap<String, Row> = BTreeMap::new();
    for s in samples.iter().filter(|s| s.label("reporter") == "outbound") {
        let v = s.value as u64;
        let field = match s.name.as_str() {
            "nodemesh_tcp_connections_opened_total" => |r: &mut Row, v| r.connections += v,
            "nodemesh_tcp_connections_closed_total" => |r: &mut Row, v| r.closed += v,
            "nodemesh_tcp_sent_bytes_total" => |r: &mut Row, v| r.bytes_sent += v,
            "nodemesh_tcp_received_bytes_total" => |r: &mut Row, v| r.bytes_received += v,
            "nodemesh_requests_total" => |r: &mut Row, v| r.requests += v,
            _ => continue,
        };
        let row = out.entry(key(s)).or_default();
        field(row, v);
        if s.name == "nodemesh_requests_total" && !s.label("response_code").starts_with('5') {
            row.success += v;
        }
    }
    out
}

fn workload_key(s: &Sample) -> String {
    format!(
        "{}/{}",
        s.label("destination_namespace"),
        s.label("destination_workload")
    )
}

fn edge_key(s: &Sample) -> String {
    format!(
        "{}/{} -> {}/{}",
        s.label("source_namespace"),
        s.label("source_workload"),
        s.label("destination_namespace"),
        s.label("destination_workload")
    )
}

fn human_bytes(b: u64) -> String {
    match b {
        b if b >= 1 << 30 => format!("{:.1}GiB", b as f64 / (1u64 << 30) as f64),
        b if b >= 1 << 20 => format!("{:.1}MiB", b as f64 / (1u64 << 20) as f64),
        b if b >= 1 << 10 => format!("{:.1}KiB", b as f64 / 1024.0),
        b => format!("{b}B"),
    }
}

fn stat(nodes: &Nodes, by: By, output: Output) -> Result<(), String> {
    let samples = scrape(nodes)?;
    let rows = match by {
        By::Workload => rows(&samples, workload_key),
        By::Edge => rows(&samples, edge_key),
    };
    if output == Output::Json {
        let v: Vec<_> = rows
            .iter()
            .map(|(k, r)| serde_json::json!({ "name": k, "stats": r, "success_rate": r.success_rate() }))
            .collect();
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
        return Ok(());
    }
    let head = if by == By::Workload {
        "WORKLOAD"
    } else {
        "EDGE"
    };
    println!(
        "{head:<44} {:>6} {:>6} {:>10} {:>10} {:>8} {:>8}",
        "CONNS", "OPEN", "SENT", "RECEIVED", "REQS", "SUCCESS"
    );
    for (k, r) in &rows {
        println!(
            "{k:<44} {:>6} {:>6} {:>10} {:>10} {:>8} {:>8}",
            r.connections,
            r.connections.saturating_sub(r.closed),
            human_bytes(r.bytes_sent),
            human_bytes(r.bytes_received),
            if r.requests > 0 {
                r.requests.to_string()
            } else {
                "-".into()
            },
            r.success_rate()
                .map_or("-".into(), |s| format!("{:.1}%", s * 100.0)),
        );
    }
    if rows.is_empty() {
        println!("(no traffic seen yet on {})", nodes.nodes.join(", "));
    }
    Ok(())
}

fn top(nodes: &Nodes, interval: u64, count: Option<u64>) -> Result<(), String> {
    let tty = std::io::stdout().is_terminal();
    let mut prev = rows(&scrape(nodes)?, edge_key);
    let mut last = Instant::now();
    let mut n = 0;
    loop {
        std::thread::sleep(Duration::from_secs(interval.max(1)));
        let now = rows(&scrape(nodes)?, edge_key);
        let secs = last.elapsed().as_secs_f64();
        last = Instant::now();
        let mut ranked: Vec<(f64, f64, &String, &Row)> = now
            .iter()
            .map(|(k, r)| {
                let p = prev.get(k).cloned().unwrap_or_default();
                let conns = (r.connections.saturating_sub(p.connections)) as f64 / secs;
                let bytes = ((r.bytes_sent + r.bytes_received)
                    .saturating_sub(p.bytes_sent + p.bytes_received))
                    as f64
                    / secs;
                (conns, bytes, k, r)
            })
            .collect();
        ranked.sort_by(|a, b| b.1.total_cmp(&a.1).then(b.0.total_cmp(&a.0)));
        if tty {
            print!("\x1b[2J\x1b[H");
        }
        println!(
            "meshctl top — {} node(s), every {interval}s (Ctrl-C to stop)\n{:<52} {:>9} {:>12} {:>6}",
            nodes.nodes.len(),
            "EDGE",
            "CONNS/s",
            "BYTES/s",
            "OPEN"
        );
        for (c, b, k, r) in ranked.iter().take(20) {
            println!(
                "{k:<52} {c:>9.1} {:>12} {:>6}",
                human_bytes(*b as u64) + "/s",
                r.connections.saturating_sub(r.closed)
            );
        }
        let _ = std::io::stdout().flush();
        prev = now;
        n += 1;
        if count.is_some_and(|c| n >= c) {
            return Ok(());
        }
    }
}

#[derive(Debug, serde::Serialize)]
struct Edge {
    source: String,
    destination: String,
    source_principal: String,
    destination_principal: String,
    /// `mtls` (the destination verified the source's certificate), `same-node` (in-process, no
    /// network), or `plaintext` (a destination outside the mesh).
    transport: &'static str,
    connections: u64,
}

fn edges(nodes: &Nodes, output: Output) -> Result<(), String> {
    let samples = scrape(nodes)?;
    let opened: Vec<&Sample> = samples
        .iter()
        .filter(|s| s.name == "nodemesh_tcp_connections_opened_total")
        .collect();
    let mut list = Vec::new();
    for s in opened.iter().filter(|s| s.label("reporter") == "outbound") {
        // The destination's own report, with the identity it verified.
        let verified = opened.iter().find(|i| {
            i.label("reporter") == "inbound"
                && i.label("source_principal") == s.label("source_principal")
                && i.label("destination_workload") == s.label("destination_workload")
                && i.label("destination_namespace") == s.label("destination_namespace")
        });
        let transport = match verified {
            Some(_) => "mtls",
            None if s.label("destination_workload") != "unknown" => "same-node",
            None => "plaintext",
        };
        list.push(Edge {
            source: format!(
                "{}/{}",
                s.label("source_namespace"),
                s.label("source_workload")
            ),
            destination: format!(
                "{}/{}",
                s.label("destination_namespace"),
                s.label("destination_workload")
            ),
            source_principal: verified
                .map_or(s.label("source_principal"), |v| v.label("source_principal"))
                .to_string(),
            destination_principal: s.label("destination_principal").to_string(),
            transport,
            connections: s.value as u64,
        });
    }
    if output == Output::Json {
        println!(
            "{}",
            serde_json::to_string_pretty(&list).unwrap_or_default()
        );
        return Ok(());
    }
    println!(
        "{:<22} {:<22} {:<48} {:<48} {:<10} {:>6}",
        "SOURCE", "DESTINATION", "SOURCE IDENTITY", "DESTINATION IDENTITY", "TRANSPORT", "CONNS"
    );
    for e in &list {
        println!(
            "{:<22} {:<22} {:<48} {:<48} {:<10} {:>6}",
            e.source,
            e.destination,
            e.source_principal,
            e.destination_principal,
            e.transport,
            e.connections
        );
    }
    Ok(())
}

// === tap, identity ===

fn tap(admin: &str, query: &str, count: Option<u64>, output: Output) -> Result<(), String> {
    let path = if query.is_empty() {
        "/tap".to_string()
    } else {
        format!("/tap?{query}")
    };
    eprintln!("meshctl: following {admin}{path} (Ctrl-C to stop)");
    let mut n = 0;
    follow_lines(admin, &path, |line| {
        if line.trim().is_empty() {
            return Ok(true);
        }
        if output == Output::Json {
            println!("{line}");
        } else {
            let v: serde_json::Value = serde_json::from_str(line).unwrap_or_default();
            let f = |k: &str| v.get(k).and_then(|x| x.as_str()).unwrap_or("").to_string();
            let bytes = match (v.get("bytes_sent"), v.get("bytes_received")) {
                (Some(s), Some(r)) => format!(" sent={s} received={r}"),
                _ => String::new(),
            };
            let reason = v
                .get("reason")
                .and_then(|r| r.as_str())
                .map(|r| format!(" reason={r:?}"))
                .unwrap_or_default();
            println!(
                "{:<7} {:<8} {}/{} -> {}/{} ({}) route={} mtls={}{bytes}{reason}",
                f("event"),
                f("reporter"),
                f("source_namespace"),
                f("source_workload"),
                f("destination_namespace"),
                f("destination_workload"),
                f("destination"),
                f("route"),
                v.get("mtls").and_then(|m| m.as_bool()).unwrap_or(false),
            );
        }
        let _ = std::io::stdout().flush();
        n += 1;
        Ok(count.is_none_or(|c| n < c))
    })
}

fn identity(admin: &str, output: Output) -> Result<(), String> {
    let dump: serde_json::Value = serde_json::from_str(&get_text(admin, "/config_dump")?)
        .map_err(|e| format!("{admin}/config_dump is not JSON: {e}"))?;
    let certs = dump
        .get("certificates")
        .and_then(|c| c.as_array())
        .cloned()
        .unwrap_or_default();
    if output == Output::Json {
        println!(
            "{}",
            serde_json::to_string_pretty(&certs).unwrap_or_default()
        );
        return Ok(());
    }
    let node = dump
        .pointer("/node/name")
        .and_then(|n| n.as_str())
        .unwrap_or("?");
    let bundle = dump.get("trustBundle").cloned().unwrap_or_default();
    println!(
        "node {node}: trust bundle with {} root(s), CA signer {}",
        bundle.get("roots").and_then(|r| r.as_u64()).unwrap_or(0),
        bundle.get("signer").and_then(|s| s.as_str()).unwrap_or("?")
    );
    println!("{:<56} {:>12} {:<18}", "IDENTITY", "EXPIRES IN", "SIGNER");
    for c in &certs {
        let secs = c
            .get("expiresInSeconds")
            .and_then(|s| s.as_u64())
            .unwrap_or(0);
        println!(
            "{:<56} {:>12} {:<18}",
            c.get("identity").and_then(|s| s.as_str()).unwrap_or("?"),
            format!("{}h{:02}m{:02}s", secs / 3600, secs / 60 % 60, secs % 60),
            c.get("signer").and_then(|s| s.as_str()).unwrap_or("?"),
        );
    }
    Ok(())
}
