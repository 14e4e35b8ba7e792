//! `meshctl`: the operator CLI. It reads the nodes' endpoints — `/metrics` (:15020) for `stat`,
//! `top` and `edges`, the admin port (127.0.0.1:15000, so run it on the node) for `tap` and
//! `identity` — and runs the node preflight (`check`) or, with a kubeconfig, the cluster's
//! (`check --kube`).

use std::{
    collections::BTreeMap,
    io::{IsTerminal, Write},
    process::ExitCode,
    time::{Duration, Instant},
};

use clap::{Parser, Subcommand, ValueEnum};

#[path = "meshctl/dashboard.rs"]
mod dashboard;
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
    /// Read nodes from outside them, over their operator port (mutual TLS): the folder
    /// `mesh-daemon ca issue-operator --out` wrote (operator.pem, operator.key, bundle.pem). Give
    /// nodes as `https://<node address>` (port 15010) to `--node` and `--admin`.
    #[arg(long, global = true, env = "NODEMESH_OPERATOR", value_name = "DIR")]
    operator: Option<std::path::PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Output {
    Table,
    /// The table with more columns (rates of bytes and failures, principals, serials).
    Wide,
    Json,
}

#[derive(clap::Args, Clone)]
struct Nodes {
    /// Metrics endpoints of the nodes to read, comma-separated or repeated: `host`, `host:port`
    /// or `http://host:port` (port 15020 when none is given), or a node's operator port from
    /// outside it, `https://host[:port]` (15010; needs --operator).
    #[arg(
        long = "node",
        env = "NODEMESH_NODES",
        value_delimiter = ',',
        default_value = "127.0.0.1:15020",
        value_parser = metrics_endpoint
    )]
    nodes: Vec<String>,
}

#[derive(Subcommand)]
enum Command {
    /// Check that this node can run the mesh (kernel, BTF, cgroup v2, bpffs, capabilities), or
    /// with --kube that the cluster runs it (CRDs, the CA, the trust bundle, the DaemonSet on
    /// every node, enrolled namespaces).
    Check {
        #[arg(long, env = "NODEMESH_CGROUP_ROOT")]
        cgroup_root: Option<std::path::PathBuf>,
        /// Check the Kubernetes installation instead of this node.
        #[arg(long)]
        kube: bool,
        /// --kube: the kubeconfig (default: $KUBECONFIG, ~/.kube/config, or in-cluster).
        #[arg(long, env = "KUBECONFIG", requires = "kube")]
        kubeconfig: Option<std::path::PathBuf>,
        /// --kube: the namespace nodemesh is installed in.
        #[arg(long, default_value = "nodemesh", requires = "kube")]
        namespace: String,
    },
    /// Golden metrics per workload (as a destination), per edge or per route, summed over the
    /// nodes: connections, bytes, requests, success rate and latency percentiles.
    Stat {
        #[command(flatten)]
        nodes: Nodes,
        /// Group by destination workload, (source, destination) edge, destination service, or
        /// service and route.
        #[arg(long, value_enum, default_value = "workload")]
        by: By,
        /// How long to watch (`30s`, `1m`): rates and percentiles of that window (default:
        /// totals since each daemon started).
        #[arg(long, value_parser = mesh_daemon::identity::parse_duration)]
        window: Option<Duration>,
        #[arg(short, long, value_enum, default_value = "table")]
        output: Output,
    },
    /// The busiest edges, workloads or routes right now (requests per second, success rate and
    /// latency between two scrapes), refreshing.
    Top {
        #[command(flatten)]
        nodes: Nodes,
        #[arg(long, value_enum, default_value = "edge")]
        by: By,
        /// Seconds between refreshes.
        #[arg(long, default_value_t = 2)]
        interval: u64,
        /// Stop after this many refreshes (default: until interrupted).
        #[arg(long)]
        count: Option<u64>,
        /// `json`: one JSON object per refresh (a line each), for scripts.
        #[arg(short, long, value_enum, default_value = "table")]
        output: Output,
    },
    /// The live service graph in a browser: a local web page (loopback only) that scrapes the
    /// nodes and draws workloads and edges with their rates, success and mTLS, refused edges in
    /// red, refreshing every 2 s.
    Dashboard {
        #[command(flatten)]
        nodes: Nodes,
        /// Where the page is served (a loopback address: it has no authentication).
        #[arg(long, default_value = "127.0.0.1:15080")]
        listen: std::net::SocketAddr,
    },
    /// Who talks to whom: each edge with both ends' identities and whether it crossed as mTLS.
    Edges {
        #[command(flatten)]
        nodes: Nodes,
        #[arg(short, long, value_enum, default_value = "table")]
        output: Output,
    },
    /// Follow live connection and request events from a node's admin port.
    Tap {
        /// The node's admin endpoint: 127.0.0.1:15000 on the node, or from outside it its
        /// operator port, `https://<node address>` (needs --operator).
        #[arg(long, env = "NODEMESH_ADMIN", default_value = "127.0.0.1:15000", value_parser = admin_endpoint)]
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
        #[arg(long, env = "NODEMESH_ADMIN", default_value = "127.0.0.1:15000", value_parser = admin_endpoint)]
        admin: String,
        #[arg(short, long, value_enum, default_value = "table")]
        output: Output,
    },
    /// What a node's proxy holds (as `istioctl ztunnel-config`): workloads and their enrollment,
    /// services and endpoints, policies, routes, certificates (chain, serial, issuer, validity,
    /// renewal) and the trust bundle.
    Config {
        #[arg(value_enum, default_value = "all")]
        what: ConfigPart,
        #[arg(long, env = "NODEMESH_ADMIN", default_value = "127.0.0.1:15000", value_parser = admin_endpoint)]
        admin: String,
        #[arg(short, long, value_enum, default_value = "table")]
        output: ConfigOutput,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum ConfigPart {
    All,
    Workloads,
    Services,
    Policies,
    Routes,
    Certificates,
    Bundle,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum ConfigOutput {
    Table,
    Json,
    Yaml,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum By {
    Workload,
    Edge,
    /// The service the client dialled (`namespace/name`); direct pod traffic has none.
    Service,
    Route,
}

/// `host`, `host:port`, `[v6]:port` or `http://host:port[/]` as `host:port`, `default_port` when
/// none is given; `https://host[:port][/]` (a node's operator port, mutual TLS) as
/// `https://host:port`, port 15010 when none is given.
fn endpoint(s: &str, default_port: u16) -> Result<String, String> {
    let s = s.trim();
    if let Some(rest) = s.strip_prefix("https://") {
        return host_port(s, rest, mesh_daemon::config::OPERATOR_PORT)
            .map(|hp| format!("https://{hp}"));
    }
    host_port(s, s.strip_prefix("http://").unwrap_or(s), default_port)
}

/// `rest` (what follows the scheme of `s`) as `host:port`.
fn host_port(s: &str, rest: &str, default_port: u16) -> Result<String, String> {
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    if rest.is_empty() || rest.contains('/') || rest.contains("://") {
        return Err(format!(
            "{s}: give host, host:port or http://host:port (no path): e.g. 10.0.0.5 or \
             10.0.0.5:{default_port}"
        ));
    }
    let has_port = if let Some(v6) = rest.strip_prefix('[') {
        // [v6] or [v6]:port
        let (_, after) = v6
            .split_once(']')
            .ok_or_else(|| format!("{s}: an IPv6 address needs its closing ']'"))?;
        if !after.is_empty() && !after.starts_with(':') {
            return Err(format!("{s}: expected :port after ']'"));
        }
        !after.is_empty()
    } else {
        match rest.matches(':').count() {
            0 => false,
            1 => true,
            _ => {
                return Err(format!(
                    "{s}: an IPv6 address goes in brackets: [{rest}]:{default_port}"
                ));
            }
        }
    };
    if !has_port {
        return Ok(format!("{rest}:{default_port}"));
    }
    let port = rest.rsplit_once(':').map_or("", |(_, p)| p);
    match port.parse::<u16>() {
        Ok(p) if p > 0 => Ok(rest.to_string()),
        _ => Err(format!("{s}: {port:?} is not a port")),
    }
}

fn metrics_endpoint(s: &str) -> Result<String, String> {
    endpoint(s, 15020)
}

fn admin_endpoint(s: &str) -> Result<String, String> {
    endpoint(s, 15000)
}

fn main() -> ExitCode {
    // A closed pipe (`meshctl tap | head -1`) ends meshctl quietly, as it ends any Unix filter,
    // instead of a panic in println!.
    // SAFETY: setting a signal's disposition to its default at start, before any thread exists.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let cli = Cli::parse();
    let _ = OPERATOR.set(cli.operator);
    let r = match cli.command {
        Command::Check {
            cgroup_root,
            kube,
            kubeconfig,
            namespace,
        } => {
            let outcomes = if kube {
                match cluster_check(kubeconfig.as_deref(), &namespace) {
                    Ok(o) => o,
                    Err(e) => {
                        eprintln!("meshctl check --kube: {e}");
                        return ExitCode::FAILURE;
                    }
                }
            } else {
                check::run(cgroup_root.as_deref())
            };
            let again = if kube {
                "meshctl check --kube"
            } else {
                "meshctl check"
            };
            let (text, ok) = check::render(&outcomes, again);
            print!("{text}");
            return if ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            };
        }
        Command::Stat {
            nodes,
            by,
            window,
            output,
        } => stat(&nodes, by, window, output),
        Command::Top {
            nodes,
            by,
            interval,
            count,
            output,
        } => top(&nodes, by, interval, count, output),
        Command::Edges { nodes, output } => edges(&nodes, output),
        Command::Dashboard { nodes, listen } => dashboard::run(&nodes, listen),
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
        Command::Config {
            what,
            admin,
            output,
        } => config(&admin, what, output),
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

/// `check --kube`: the installation's checks against the kubeconfig's cluster.
fn cluster_check(
    kubeconfig: Option<&std::path::Path>,
    namespace: &str,
) -> Result<Vec<check::Outcome>, String> {
    use mesh_daemon::discovery::kube::{self as k, check::Install};
    runtime()?.block_on(async {
        let client = k::client(kubeconfig).await?;
        let install = Install {
            namespace,
            ..Install::default()
        };
        let checks = k::check::run(&client, &install);
        tokio::time::timeout(Duration::from_secs(30), checks)
            .await
            .map_err(|_| "the API server did not answer within 30 s".to_string())
    })
}

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

/// The operator's credentials (`--operator`), read once.
static OPERATOR: std::sync::OnceLock<Option<std::path::PathBuf>> = std::sync::OnceLock::new();

/// The TLS configuration for operator ports, from `--operator`'s folder.
fn operator_tls() -> Result<std::sync::Arc<rustls::ClientConfig>, String> {
    static TLS: std::sync::OnceLock<Result<std::sync::Arc<rustls::ClientConfig>, String>> =
        std::sync::OnceLock::new();
    TLS.get_or_init(|| {
        let Some(dir) = OPERATOR.get().cloned().flatten() else {
            return Err(
                "an https:// node is its operator port (mutual TLS): pass --operator \
                        <dir> with the folder `mesh-daemon ca issue-operator --out <dir>` wrote"
                    .into(),
            );
        };
        load_operator(&dir)
    })
    .clone()
}

fn load_operator(dir: &std::path::Path) -> Result<std::sync::Arc<rustls::ClientConfig>, String> {
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject as _};
    let read = |f: &str| {
        let p = dir.join(f);
        mesh_daemon::meshfile::read_file(&p).map_err(|e| {
            format!(
                "--operator {}: cannot read {f}: {e}; it holds what `mesh-daemon ca \
                 issue-operator --out` writes (operator.pem, operator.key, bundle.pem)",
                dir.display()
            )
        })
    };
    let chain: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(read("operator.pem")?.as_bytes())
            .collect::<Result<_, _>>()
            .map_err(|e| format!("{}/operator.pem is not PEM: {e}", dir.display()))?;
    let leaf = chain
        .first()
        .ok_or_else(|| format!("{}/operator.pem holds no certificate", dir.display()))?;
    let uri = mesh_daemon::identity::spiffe_uri(leaf)
        .map_err(|e| format!("{}/operator.pem: {e}", dir.display()))?;
    let Some((td, _)) = mesh_daemon::identity::Role::Operator.parse(&uri) else {
        return Err(format!(
            "{}/operator.pem names {uri}, not an operator (spiffe://<trust domain>/operator/\
             <name>); use the certificate `mesh-daemon ca issue-operator` writes",
            dir.display()
        ));
    };
    let td = td.to_string();
    if let Ok((_, c)) = x509_parser::parse_x509_certificate(leaf) {
        let now = x509_parser::time::ASN1Time::now();
        if c.validity().not_after < now {
            return Err(format!(
                "{}/operator.pem expired at {}; issue a new one with `mesh-daemon ca \
                 issue-operator`",
                dir.display(),
                c.validity().not_after
            ));
        }
    }
    let key = PrivateKeyDer::from_pem_slice(read("operator.key")?.as_bytes()).map_err(|e| {
        format!(
            "{}/operator.key is not a PEM private key: {e}",
            dir.display()
        )
    })?;
    let bundle = mesh_daemon::identity::Bundle::new(vec![read("bundle.pem")?], String::new())
        .map_err(|e| format!("{}/bundle.pem: {e}", dir.display()))?;
    mesh_daemon::identity::tls::operator_client_config(&bundle, &td, chain, key).map_err(|e| {
        format!(
            "{}: the certificate and key do not go together: {e}",
            dir.display()
        )
    })
}

/// What a failed handshake with a node's operator port means, and what to do.
fn operator_tls_error(addr: &str, e: &std::io::Error) -> String {
    use rustls::{AlertDescription as A, CertificateError as C, Error as E};
    let dir = OPERATOR
        .get()
        .cloned()
        .flatten()
        .map(|d| d.display().to_string())
        .unwrap_or_default();
    let tls = e.get_ref().and_then(|i| i.downcast_ref::<E>());
    match tls {
        Some(E::InvalidCertificate(C::UnknownIssuer | C::BadSignature)) => format!(
            "{addr}: the node's certificate is not signed by {dir}/bundle.pem (another mesh's \
             CA, or a root rotated since the operator certificate was issued: issue it again)"
        ),
        Some(E::InvalidCertificate(C::ApplicationVerificationFailure)) => format!(
            "{addr}: the server's certificate names no node of this mesh \
             (spiffe://<trust domain>/node/<name>); is this a node's operator port (15010)?"
        ),
        Some(E::InvalidCertificate(C::Expired | C::ExpiredContext { .. })) => {
            format!("{addr}: the node's certificate has expired; is its clock right?")
        }
        Some(E::AlertReceived(
            A::UnknownCA
            | A::BadCertificate
            | A::CertificateRequired
            | A::CertificateExpired
            | A::AccessDenied
            | A::DecryptError,
        )) => format!(
            "{addr}: the node refused the operator certificate in {dir} ({e}): it is not from \
             this mesh's CA, or no longer valid; issue a new one with `mesh-daemon ca \
             issue-operator`"
        ),
        Some(E::AlertReceived(A::HandshakeFailure | A::InternalError)) | None
            if e.kind() != std::io::ErrorKind::InvalidData =>
        {
            format!(
                "{addr}: the TLS handshake failed ({e}); the node may have no node certificate \
                 from the CA yet (see its /ready and log), or this is not its operator port"
            )
        }
        _ => format!("{addr}: the TLS handshake failed: {e}; is this a node's operator port?"),
    }
}

/// An HTTP/1.1 client connection over `io` (TCP, or TLS to an operator port), driven in the
/// background.
async fn http1<IO>(
    addr: &str,
    io: IO,
) -> Result<hyper::client::conn::http1::SendRequest<http_body_util::Empty<bytes::Bytes>>, String>
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (sender, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(io))
        .await
        .map_err(|e| format!("{addr}: {e}"))?;
    tokio::spawn(conn);
    Ok(sender)
}

/// A GET to `addr` (`host:port`, or `https://host:port` for an operator port) with hyper over
/// one connection; the response once its status is 200 (anything else is an error with the
/// status and the body's reason).
async fn get(addr: &str, path: &str) -> Result<hyper::Response<hyper::body::Incoming>, String> {
    use http_body_util::BodyExt as _;
    let (addr, tls) = match addr.strip_prefix("https://") {
        Some(a) => (a, Some(operator_tls()?)),
        None => (addr, None),
    };
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
    let mut sender = match tls {
        None => http1(addr, tcp).await?,
        Some(tls) => {
            let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h);
            let host = host.trim_start_matches('[').trim_end_matches(']');
            let name = rustls::pki_types::ServerName::try_from(host.to_string())
                .map_err(|e| format!("{addr}: {e}"))?;
            let stream = tokio::time::timeout(
                Duration::from_secs(10),
                tokio_rustls::TlsConnector::from(tls).connect(name, tcp),
            )
            .await
            .map_err(|_| format!("{addr}: no TLS handshake within 10 s"))?
            .map_err(|e| operator_tls_error(addr, &e))?;
            http1(addr, stream).await?
        }
    };
    let req = hyper::Request::get(path)
        .header(hyper::header::HOST, addr)
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .map_err(|e| format!("{addr}{path}: {e}"))?;
    let resp = sender.send_request(req).await.map_err(|e| {
        // TLS 1.3: the server checks the client's certificate after the client's handshake has
        // finished, so its refusal (an alert) arrives with the first answer.
        let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(&e);
        while let Some(c) = cause {
            if let Some(io) = c.downcast_ref::<std::io::Error>()
                && io.get_ref().is_some_and(|i| i.is::<rustls::Error>())
            {
                return operator_tls_error(addr, io);
            }
            cause = c.source();
        }
        format!("{addr}{path}: {e}")
    })?;
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
    runtime()?.block_on(fetch_text(addr, path))
}

/// A GET's whole answer as text, within 10 s.
async fn fetch_text(addr: &str, path: &str) -> Result<String, String> {
    use http_body_util::BodyExt as _;
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

/// Every node's samples. A node that cannot be read is reported on its own line and left out;
/// only when none can be read is it an error.
fn scrape(nodes: &Nodes) -> Result<Vec<Sample>, String> {
    let mut all = Vec::new();
    let mut errors = Vec::new();
    for n in &nodes.nodes {
        match scrape_one(n) {
            Ok(samples) => all.extend(samples),
            Err(e) => errors.push(e),
        }
    }
    if errors.len() == nodes.nodes.len() {
        return Err(errors.join("\n"));
    }
    for e in errors {
        eprintln!("meshctl: left out: {e}");
    }
    Ok(all)
}

fn scrape_one(n: &str) -> Result<Vec<Sample>, String> {
    node_samples(n, &get_text(n, "/metrics")?)
}

/// A node's `/metrics` answer read; an endpoint without nodemesh families is an error.
fn node_samples(n: &str, text: &str) -> Result<Vec<Sample>, String> {
    let (samples, bad) = promtext::parse(text);
    if bad > 0 {
        eprintln!("meshctl: {n}/metrics: skipped {bad} unreadable lines");
    }
    if !samples.iter().any(|s| s.name.starts_with("nodemesh_")) {
        return Err(format!(
            "{n}/metrics answered, but with no nodemesh_ metrics: is {n} a nodemesh daemon's \
             metrics port (15020 by default)?"
        ));
    }
    Ok(samples)
}

// === stat, top, edges ===

#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
struct Row {
    connections: u64,
    closed: u64,
    /// Connections refused or not completed (`tcp_connections_failed_total`, any reason).
    failed: u64,
    bytes_sent: u64,
    bytes_received: u64,
    requests: u64,
    success: u64,
    /// `request_duration_seconds` buckets: upper bound in seconds (f64 bits, +Inf last) ->
    /// cumulative count.
    #[serde(skip)]
    latency: BTreeMap<u64, u64>,
}

impl Row {
    fn success_rate(&self) -> Option<f64> {
        (self.requests > 0).then(|| self.success as f64 / self.requests as f64)
    }

    /// What happened between `prev` and `self` (two scrapes of the same counters).
    fn since(&self, prev: &Row) -> Row {
        Row {
            connections: self.connections.saturating_sub(prev.connections),
            // open connections are a level, not a count
            closed: self.closed,
            failed: self.failed.saturating_sub(prev.failed),
            bytes_sent: self.bytes_sent.saturating_sub(prev.bytes_sent),
            bytes_received: self.bytes_received.saturating_sub(prev.bytes_received),
            requests: self.requests.saturating_sub(prev.requests),
            success: self.success.saturating_sub(prev.success),
            latency: self
                .latency
                .iter()
                .map(|(le, n)| {
                    (
                        *le,
                        n.saturating_sub(prev.latency.get(le).copied().unwrap_or(0)),
                    )
                })
                .collect(),
        }
    }

    /// The latency quantile `q` in milliseconds, as Prometheus' `histogram_quantile` estimates
    /// it from the buckets (linear within a bucket).
    fn quantile_ms(&self, q: f64) -> Option<f64> {
        let buckets: Vec<(f64, u64)> = self
            .latency
            .iter()
            .map(|(le, n)| (f64::from_bits(*le), *n))
            .collect();
        quantile(&buckets, q).map(|s| s * 1000.0)
    }
}

/// `histogram_quantile` over cumulative buckets sorted by upper bound (the last +Inf).
fn quantile(buckets: &[(f64, u64)], q: f64) -> Option<f64> {
    let total = buckets.last()?.1;
    if total == 0 {
        return None;
    }
    let rank = q * total as f64;
    let (mut lower, mut below) = (0.0, 0u64);
    for (le, n) in buckets {
        if *n as f64 >= rank {
            if le.is_infinite() {
                return Some(lower);
            }
            let inside = (*n - below) as f64;
            let frac = if inside > 0.0 {
                (rank - below as f64) / inside
            } else {
                0.0
            };
            return Some(lower + (le - lower) * frac);
        }
        (lower, below) = (*le, *n);
    }
    Some(lower)
}

/// Per key, from the source side (`reporter="outbound"`): every meshed connection and request
/// is captured and counted exactly once there, same node or not.
fn rows(samples: &[Sample], key: impl Fn(&Sample) -> Option<String>) -> BTreeMap<String, Row> {
    let mut out: BTreeMap<String, Row> = BTreeMap::new();
    for s in samples.iter().filter(|s| s.label("reporter") == "outbound") {
        let v = s.value as u64;
        let field = match s.name.as_str() {
            "nodemesh_tcp_connections_opened_total" => {
                |r: &mut Row, v, _: &Sample| r.connections += v
            }
            "nodemesh_tcp_connections_closed_total" => |r: &mut Row, v, _: &Sample| r.closed += v,
            "nodemesh_tcp_connections_failed_total" => |r: &mut Row, v, _: &Sample| r.failed += v,
            "nodemesh_tcp_sent_bytes_total" => |r: &mut Row, v, _: &Sample| r.bytes_sent += v,
            "nodemesh_tcp_received_bytes_total" => {
                |r: &mut Row, v, _: &Sample| r.bytes_received += v
            }
            "nodemesh_requests_total" => |r: &mut Row, v, s: &Sample| {
                r.requests += v;
                // linkerd's classification: a 5xx, a gRPC status other than OK, a broken stream
                let failed = match s.label("classification") {
                    "" => s.label("response_code").starts_with('5'),
                    c => c == "failure",
                };
                if !failed {
                    r.success += v;
                }
            },
            "nodemesh_request_duration_seconds_bucket" => |r: &mut Row, v, s: &Sample| {
                let le = match s.label("le") {
                    "+Inf" => f64::INFINITY,
                    le => le.parse().unwrap_or(f64::INFINITY),
                };
                *r.latency.entry(le.to_bits()).or_default() += v;
            },
            _ => continue,
        };
        let Some(k) = key(s) else { continue };
        field(out.entry(k).or_default(), v, s);
    }
    out
}

fn workload_key(s: &Sample) -> Option<String> {
    Some(format!(
        "{}/{}",
        s.label("destination_namespace"),
        s.label("destination_workload")
    ))
}

fn edge_key(s: &Sample) -> Option<String> {
    Some(format!(
        "{}/{} -> {}/{}",
        s.label("source_namespace"),
        s.label("source_workload"),
        s.label("destination_namespace"),
        s.label("destination_workload")
    ))
}

/// Requests only: `service route` (`[default]` for requests no route matched).
fn route_key(s: &Sample) -> Option<String> {
    s.name.starts_with("nodemesh_request").then(|| {
        let route = match s.label("route") {
            "" => "[default]",
            r => r,
        };
        format!("{} {route}", s.label("destination_service"))
    })
}

/// The dialled service (`destination_service`); none for traffic straight to a pod.
fn service_key(s: &Sample) -> Option<String> {
    match s.label("destination_service") {
        "" | "unknown" => None,
        svc => Some(svc.to_string()),
    }
}

fn key_of(by: By) -> fn(&Sample) -> Option<String> {
    match by {
        By::Workload => workload_key,
        By::Edge => edge_key,
        By::Service => service_key,
        By::Route => route_key,
    }
}

fn by_head(by: By) -> &'static str {
    match by {
        By::Workload => "WORKLOAD",
        By::Edge => "EDGE",
        By::Service => "SERVICE",
        By::Route => "SERVICE ROUTE",
    }
}

/// `n` per second over `secs`, or `-` without a window.
fn per_sec(n: u64, secs: Option<f64>) -> String {
    secs.map_or("-".into(), |s| format!("{:.1}", n as f64 / s))
}

fn bytes_per_sec(n: u64, secs: Option<f64>) -> String {
    secs.map_or("-".into(), |s| human_bytes((n as f64 / s) as u64) + "/s")
}

fn human_bytes(b: u64) -> String {
    match b {
        b if b >= 1 << 30 => format!("{:.1}GiB", b as f64 / (1u64 << 30) as f64),
        b if b >= 1 << 20 => format!("{:.1}MiB", b as f64 / (1u64 << 20) as f64),
        b if b >= 1 << 10 => format!("{:.1}KiB", b as f64 / 1024.0),
        b => format!("{b}B"),
    }
}

fn ms(v: Option<f64>) -> String {
    v.map_or("-".into(), |v| {
        if v < 10.0 {
            format!("{v:.2}ms")
        } else {
            format!("{v:.0}ms")
        }
    })
}

fn stat(nodes: &Nodes, by: By, window: Option<Duration>, output: Output) -> Result<(), String> {
    // With a window: what happened during it (two scrapes); without: since each daemon started.
    let (rows, secs) = match window {
        Some(w) => {
            let before = rows(&scrape(nodes)?, key_of(by));
            let started = Instant::now();
            std::thread::sleep(w.max(Duration::from_secs(1)));
            let after = rows(&scrape(nodes)?, key_of(by));
            let secs = started.elapsed().as_secs_f64();
            let delta = after
                .iter()
                .map(|(k, r)| {
                    (
                        k.clone(),
                        r.since(&before.get(k).cloned().unwrap_or_default()),
                    )
                })
                .collect::<BTreeMap<_, _>>();
            (delta, Some(secs))
        }
        None => (rows(&scrape(nodes)?, key_of(by)), None),
    };
    if output == Output::Json {
        let v: Vec<_> = rows
            .iter()
            .map(|(k, r)| {
                serde_json::json!({
                    "name": k,
                    "stats": r,
                    "success_rate": r.success_rate(),
                    "window_seconds": secs,
                    "requests_per_second": secs.map(|s| r.requests as f64 / s),
                    "connections_per_second": secs.map(|s| r.connections as f64 / s),
                    "failed_per_second": secs.map(|s| r.failed as f64 / s),
                    "latency_ms_p50": r.quantile_ms(0.5),
                    "latency_ms_p95": r.quantile_ms(0.95),
                    "latency_ms_p99": r.quantile_ms(0.99),
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
        return Ok(());
    }
    let head = by_head(by);
    let wide = output == Output::Wide;
    let reqs = if secs.is_some() { "RPS" } else { "REQS" };
    print!(
        "{head:<44} {:>6} {:>6} {:>10} {:>10} {:>8} {:>8} {:>8} {:>8} {:>8} {:>6}",
        "CONNS", "OPEN", "SENT", "RECEIVED", reqs, "SUCCESS", "P50", "P95", "P99", "FAILED"
    );
    if wide {
        print!(
            " {:>8} {:>9} {:>12} {:>12}",
            "CONN/s", "FAILED/s", "SENT/s", "RECEIVED/s"
        );
    }
    println!();
    for (k, r) in &rows {
        let requests = match (r.requests, secs) {
            (0, _) => "-".to_string(),
            (n, Some(s)) => format!("{:.1}", n as f64 / s),
            (n, None) => n.to_string(),
        };
        print!(
            "{k:<44} {:>6} {:>6} {:>10} {:>10} {:>8} {:>8} {:>8} {:>8} {:>8} {:>6}",
            r.connections,
            r.connections.saturating_sub(r.closed),
            human_bytes(r.bytes_sent),
            human_bytes(r.bytes_received),
            requests,
            r.success_rate()
                .map_or("-".into(), |s| format!("{:.1}%", s * 100.0)),
            ms(r.quantile_ms(0.5)),
            ms(r.quantile_ms(0.95)),
            ms(r.quantile_ms(0.99)),
            r.failed,
        );
        if wide {
            print!(
                " {:>8} {:>9} {:>12} {:>12}",
                per_sec(r.connections, secs),
                per_sec(r.failed, secs),
                bytes_per_sec(r.bytes_sent, secs),
                bytes_per_sec(r.bytes_received, secs),
            );
        }
        println!();
    }
    if rows.is_empty() {
        println!("(no traffic seen yet on {})", nodes.nodes.join(", "));
    }
    Ok(())
}

fn top(
    nodes: &Nodes,
    by: By,
    interval: u64,
    count: Option<u64>,
    output: Output,
) -> Result<(), String> {
    let tty = std::io::stdout().is_terminal() && output != Output::Json;
    let wide = output == Output::Wide;
    let key = key_of(by);
    let mut prev = rows(&scrape(nodes)?, key);
    let mut last = Instant::now();
    let mut n = 0;
    loop {
        std::thread::sleep(Duration::from_secs(interval.max(1)));
        let now = rows(&scrape(nodes)?, key);
        let secs = last.elapsed().as_secs_f64();
        last = Instant::now();
        let mut ranked: Vec<(f64, f64, &String, Row)> = now
            .iter()
            .map(|(k, r)| {
                let d = r.since(&prev.get(k).cloned().unwrap_or_default());
                let rps = d.requests as f64 / secs;
                let bytes = (d.bytes_sent + d.bytes_received) as f64 / secs;
                (rps, bytes, k, d)
            })
            .collect();
        // busiest first: requests, then bytes
        ranked.sort_by(|a, b| b.0.total_cmp(&a.0).then(b.1.total_cmp(&a.1)));
        n += 1;
        let done = count.is_some_and(|c| n >= c);
        if output == Output::Json {
            let rows: Vec<_> = ranked
                .iter()
                .map(|(rps, bytes, k, d)| {
                    serde_json::json!({
                        "name": k,
                        "requests_per_second": rps,
                        "bytes_per_second": bytes,
                        "connections_per_second": d.connections as f64 / secs,
                        "failed_per_second": d.failed as f64 / secs,
                        "success_rate": d.success_rate(),
                        "latency_ms_p50": d.quantile_ms(0.5),
                        "latency_ms_p99": d.quantile_ms(0.99),
                        "open": now.get(*k).map_or(0, |r| r.connections.saturating_sub(r.closed)),
                    })
                })
                .collect();
            println!(
                "{}",
                serde_json::json!({ "interval_seconds": secs, "rows": rows })
            );
            let _ = std::io::stdout().flush();
            prev = now;
            if done {
                return Ok(());
            }
            continue;
        }
        if tty {
            print!("\x1b[2J\x1b[H");
        }
        print!(
            "meshctl top — {} node(s), every {interval}s (Ctrl-C to stop)\n{:<52} {:>8} {:>8} {:>8} {:>8} {:>9} {:>12} {:>6}",
            nodes.nodes.len(),
            by_head(by),
            "RPS",
            "SUCCESS",
            "P50",
            "P99",
            "CONNS/s",
            "BYTES/s",
            "OPEN"
        );
        if wide {
            print!(" {:>9} {:>8}", "FAILED/s", "P95");
        }
        println!();
        for (rps, b, k, d) in ranked.iter().take(20) {
            let open = now
                .get(*k)
                .map_or(0, |r| r.connections.saturating_sub(r.closed));
            print!(
                "{k:<52} {rps:>8.1} {:>8} {:>8} {:>8} {:>9.1} {:>12} {:>6}",
                d.success_rate()
                    .map_or("-".into(), |s| format!("{:.1}%", s * 100.0)),
                ms(d.quantile_ms(0.5)),
                ms(d.quantile_ms(0.99)),
                d.connections as f64 / secs,
                human_bytes(*b as u64) + "/s",
                open
            );
            if wide {
                print!(
                    " {:>9.1} {:>8}",
                    d.failed as f64 / secs,
                    ms(d.quantile_ms(0.95))
                );
            }
            println!();
        }
        let _ = std::io::stdout().flush();
        prev = now;
        if done {
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
    /// network), `plaintext` (a destination outside the mesh), or `refused` (no connection of
    /// this edge ever opened; see `failed`).
    transport: &'static str,
    connections: u64,
    /// HTTP and gRPC requests (an L7 edge has requests and no TCP connections of its own).
    requests: u64,
    /// Bytes from the source and to it, over the edge's connections (source side).
    bytes_sent: u64,
    bytes_received: u64,
    /// Connections of this edge refused or not completed, as the source's proxy counted them.
    failed: u64,
}

/// Every edge the nodes' metrics show, from the source's side: TCP connections and L7 requests
/// (with how each crossed), bytes, and refusals beside them or as edges of their own.
fn edge_list(samples: &[Sample]) -> Vec<Edge> {
    let opened: Vec<&Sample> = samples
        .iter()
        .filter(|s| {
            s.name == "nodemesh_tcp_connections_opened_total" || s.name == "nodemesh_requests_total"
        })
        .collect();
    let mut list: Vec<Edge> = Vec::new();
    for s in opened.iter().filter(|s| s.label("reporter") == "outbound") {
        // The destination's own report, with the identity it verified.
        let verified = opened.iter().find(|i| {
            i.name == s.name
                && i.label("reporter") == "inbound"
                && i.label("source_principal") == s.label("source_principal")
                && i.label("destination_workload") == s.label("destination_workload")
                && i.label("destination_namespace") == s.label("destination_namespace")
        });
        let transport = match verified {
            Some(_) => "mtls",
            None if s.label("destination_workload") != "unknown" => "same-node",
            None => "plaintext",
        };
        let e = Edge {
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
            connections: 0,
            requests: 0,
            bytes_sent: 0,
            bytes_received: 0,
            failed: 0,
        };
        // One row per edge: its series differ by the service dialled (which `stat --by service`
        // shows), by status, by route.
        let x = match list.iter_mut().find(|x: &&mut Edge| {
            x.source == e.source
                && x.destination == e.destination
                && x.source_principal == e.source_principal
                && x.transport == e.transport
        }) {
            Some(x) => x,
            None => {
                list.push(e);
                list.last_mut().expect("just pushed")
            }
        };
        if s.name == "nodemesh_requests_total" {
            x.requests += s.value as u64;
        } else {
            x.connections += s.value as u64;
        }
    }
    for s in samples.iter().filter(|s| s.label("reporter") == "outbound") {
        let sent = match s.name.as_str() {
            "nodemesh_tcp_sent_bytes_total" => true,
            "nodemesh_tcp_received_bytes_total" => false,
            _ => continue,
        };
        let (src, dst) = (
            format!(
                "{}/{}",
                s.label("source_namespace"),
                s.label("source_workload")
            ),
            format!(
                "{}/{}",
                s.label("destination_namespace"),
                s.label("destination_workload")
            ),
        );
        if let Some(e) = list
            .iter_mut()
            .find(|e| e.source == src && e.destination == dst)
        {
            if sent {
                e.bytes_sent += s.value as u64;
            } else {
                e.bytes_received += s.value as u64;
            }
        }
    }
    // Refusals, from the source's side: beside the edge's successes, or as an edge of their own.
    for s in samples.iter().filter(|s| {
        s.name == "nodemesh_tcp_connections_failed_total" && s.label("reporter") == "outbound"
    }) {
        let source = format!(
            "{}/{}",
            s.label("source_namespace"),
            s.label("source_workload")
        );
        let destination = format!(
            "{}/{}",
            s.label("destination_namespace"),
            s.label("destination_workload")
        );
        match list
            .iter_mut()
            .find(|e| e.source == source && e.destination == destination)
        {
            Some(e) => e.failed += s.value as u64,
            None => list.push(Edge {
                source,
                destination,
                source_principal: String::new(),
                destination_principal: String::new(),
                transport: "refused",
                connections: 0,
                requests: 0,
                bytes_sent: 0,
                bytes_received: 0,
                failed: s.value as u64,
            }),
        }
    }
    list
}

fn edges(nodes: &Nodes, output: Output) -> Result<(), String> {
    let list = edge_list(&scrape(nodes)?);
    if output == Output::Json {
        println!(
            "{}",
            serde_json::to_string_pretty(&list).unwrap_or_default()
        );
        return Ok(());
    }
    let wide = output == Output::Wide;
    print!(
        "{:<22} {:<22} {:<48} {:<48} {:<10} {:>6} {:>6}",
        "SOURCE",
        "DESTINATION",
        "SOURCE IDENTITY",
        "DESTINATION IDENTITY",
        "TRANSPORT",
        "CONNS",
        "FAILED"
    );
    if wide {
        print!(" {:>8} {:>10} {:>10}", "REQS", "SENT", "RECEIVED");
    }
    println!();
    for e in &list {
        print!(
            "{:<22} {:<22} {:<48} {:<48} {:<10} {:>6} {:>6}",
            e.source,
            e.destination,
            e.source_principal,
            e.destination_principal,
            e.transport,
            e.connections,
            e.failed
        );
        if wide {
            print!(
                " {:>8} {:>10} {:>10}",
                e.requests,
                human_bytes(e.bytes_sent),
                human_bytes(e.bytes_received)
            );
        }
        println!();
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
            if f("event") == "request" {
                let grpc = v
                    .get("grpc_status")
                    .map(|g| format!(" grpc-status={g}"))
                    .unwrap_or_default();
                let route = match f("http_route").as_str() {
                    "" => String::new(),
                    r => format!(" route={r}"),
                };
                println!(
                    "request {:<8} {}/{} -> {}/{} {} {}{} {} {:.2}ms{grpc} service={}{route} ({}){reason}",
                    f("reporter"),
                    f("source_namespace"),
                    f("source_workload"),
                    f("destination_namespace"),
                    f("destination_workload"),
                    f("method"),
                    f("authority"),
                    f("path"),
                    v.get("status").and_then(|s| s.as_u64()).unwrap_or(0),
                    v.get("latency_ms").and_then(|s| s.as_f64()).unwrap_or(0.0),
                    f("service"),
                    f("protocol"),
                );
                let _ = std::io::stdout().flush();
                n += 1;
                return Ok(count.is_none_or(|c| n < c));
            }
            let principals = if output == Output::Wide {
                format!(
                    " {} -> {} at={:.3}",
                    f("source_principal"),
                    f("destination_principal"),
                    v.get("ts").and_then(|t| t.as_f64()).unwrap_or(0.0)
                )
            } else {
                String::new()
            };
            println!(
                "{:<7} {:<8} {}/{} -> {}/{} ({}) route={} mtls={}{bytes}{reason}{principals}",
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

/// `meshctl config`: the node's `/config_dump`, one part or all, as tables, JSON or YAML.
fn config(admin: &str, what: ConfigPart, output: ConfigOutput) -> Result<(), String> {
    use serde_json::Value;
    let dump: Value = serde_json::from_str(&get_text(admin, "/config_dump")?)
        .map_err(|e| format!("{admin}/config_dump is not JSON: {e}"))?;
    let part = |key: &str| dump.get(key).cloned().unwrap_or(Value::Null);
    let chosen = match what {
        ConfigPart::All => dump.clone(),
        ConfigPart::Workloads => part("workloads"),
        ConfigPart::Services => part("services"),
        ConfigPart::Policies => part("policies"),
        ConfigPart::Routes => part("routes"),
        ConfigPart::Certificates => part("certificates"),
        ConfigPart::Bundle => part("trustBundle"),
    };
    match output {
        ConfigOutput::Json => {
            println!(
                "{}",
                serde_json::to_string_pretty(&chosen).unwrap_or_default()
            );
            return Ok(());
        }
        ConfigOutput::Yaml => {
            print!(
                "{}",
                serde_norway::to_string(&chosen).map_err(|e| e.to_string())?
            );
            return Ok(());
        }
        ConfigOutput::Table => {}
    }
    let list = |v: &Value| v.as_array().cloned().unwrap_or_default();
    let s = |v: &Value, k: &str| match v.get(k) {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Null) | None => "-".into(),
        Some(other) => other.to_string(),
    };
    let when = |secs: &Value| {
        secs.as_u64().map_or("-".to_string(), |s| {
            let (d, h, m) = (s / 86400, s % 86400 / 3600, s % 3600 / 60);
            match (d, h) {
                (0, 0) => format!("{m}m{}s", s % 60),
                (0, _) => format!("{h}h{m}m"),
                _ => format!("{d}d{h}h"),
            }
        })
    };
    let show = |p: ConfigPart| what == ConfigPart::All || what == p;
    if what == ConfigPart::All {
        let node = dump.get("node").cloned().unwrap_or_default();
        println!(
            "node {} (address {}, mesh source {})\n",
            s(&node, "name"),
            s(&node, "address"),
            s(&node, "meshSource")
        );
    }
    if show(ConfigPart::Workloads) {
        println!(
            "{:<32} {:<15} {:<10} {:<8} {:<52} ENROLLMENT",
            "WORKLOAD", "IP", "NODE", "MODE", "IDENTITY"
        );
        for w in list(&part("workloads")) {
            println!(
                "{:<32} {:<15} {:<10} {:<8} {:<52} {}",
                format!("{}/{}", s(&w, "namespace"), s(&w, "name")),
                s(&w, "ip"),
                s(&w, "node"),
                s(&w, "mode"),
                s(&w, "identity"),
                s(&w, "enrollment"),
            );
        }
        println!();
    }
    if show(ConfigPart::Services) {
        println!(
            "{:<32} {:<21} {:<10} ENDPOINTS",
            "SERVICE", "ADDRESS", "PROTOCOL"
        );
        for svc in list(&part("services")) {
            let eps: Vec<String> = list(&svc["endpoints"])
                .iter()
                .map(|e| format!("{} ({})", s(e, "address"), s(e, "workload")))
                .collect();
            println!(
                "{:<32} {:<21} {:<10} {}",
                format!("{}/{}", s(&svc, "namespace"), s(&svc, "name")),
                s(&svc, "address"),
                s(&svc, "appProtocol"),
                if eps.is_empty() {
                    "none (no ready pod matches the selector)".to_string()
                } else {
                    eps.join(", ")
                },
            );
        }
        println!();
    }
    if show(ConfigPart::Policies) {
        println!(
            "{:<32} {:<6} {:<24} {:<12} FROM",
            "POLICY", "ACTION", "SELECTOR", "PORTS"
        );
        for p in list(&part("policies")) {
            println!(
                "{:<32} {:<6} {:<24} {:<12} {}",
                format!("{}/{}", s(&p, "namespace"), s(&p, "name")),
                s(&p, "action"),
                s(&p, "selector"),
                s(&p, "ports"),
                s(&p, "from"),
            );
        }
        println!();
    }
    if show(ConfigPart::Routes) {
        println!("{:<32} {:<10} {:<28} RULES", "ROUTE", "KIND", "PARENTS");
        for r in list(&part("routes")) {
            // `kind` is the upstream type by name: {"HTTPRoute": <spec>}.
            let (kind, spec) = r
                .get("kind")
                .and_then(|k| k.as_object())
                .and_then(|o| o.iter().next())
                .map_or(("-".to_string(), Value::Null), |(k, v)| {
                    (k.clone(), v.clone())
                });
            let parents: Vec<String> = list(&spec["parentRefs"])
                .iter()
                .map(|p| match p.get("port").and_then(|x| x.as_u64()) {
                    Some(port) => format!("{}:{port}", s(p, "name")),
                    None => s(p, "name"),
                })
                .collect();
            println!(
                "{:<32} {:<10} {:<28} {}",
                format!("{}/{}", s(&r, "namespace"), s(&r, "name")),
                kind,
                parents.join(","),
                list(&spec["rules"]).len(),
            );
        }
        println!();
    }
    if show(ConfigPart::Certificates) {
        println!(
            "{:<52} {:<59} {:>10} {:>10} {:<6} ISSUER",
            "IDENTITY", "SERIAL", "EXPIRES IN", "RENEWS IN", "CHAIN"
        );
        for c in list(&part("certificates")) {
            println!(
                "{:<52} {:<59} {:>10} {:>10} {:<6} {}",
                s(&c, "identity"),
                s(&c, "serial"),
                when(&c["expiresInSeconds"]),
                when(&c["renewsInSeconds"]),
                s(&c, "chainLength"),
                s(&c, "issuer"),
            );
        }
        println!();
    }
    if show(ConfigPart::Bundle) {
        let b = part("trustBundle");
        println!("trust bundle: CA signer {}", s(&b, "signer"));
        println!("{:<18} {:<12} SUBJECT", "FINGERPRINT", "NOT AFTER");
        for c in list(&b["certificates"]) {
            let not_after = c["notAfter"].as_i64().map_or("-".to_string(), |t| {
                let days = (t - now_unix()) / 86400;
                format!("in {days}d")
            });
            println!(
                "{:<18} {:<12} {}",
                s(&c, "fingerprint"),
                not_after,
                s(&c, "subject")
            );
        }
    }
    Ok(())
}

fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
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
    let wide = output == Output::Wide;
    let hms = |secs: u64| format!("{}h{:02}m{:02}s", secs / 3600, secs / 60 % 60, secs % 60);
    print!("{:<56} {:>12} {:<18}", "IDENTITY", "EXPIRES IN", "SIGNER");
    if wide {
        print!(" {:>12} {:<42}", "RENEWS IN", "SERIAL");
    }
    println!();
    for c in &certs {
        let secs = |k: &str| c.get(k).and_then(|s| s.as_u64()).unwrap_or(0);
        print!(
            "{:<56} {:>12} {:<18}",
            c.get("identity").and_then(|s| s.as_str()).unwrap_or("?"),
            hms(secs("expiresInSeconds")),
            c.get("signer").and_then(|s| s.as_str()).unwrap_or("?"),
        );
        if wide {
            print!(
                " {:>12} {:<42}",
                hms(secs("renewsInSeconds")),
                c.get("serial").and_then(|s| s.as_str()).unwrap_or("?"),
            );
        }
        println!();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_take_host_host_port_and_http_urls() {
        for (given, want) in [
            ("10.0.0.5", "10.0.0.5:15020"),
            ("10.0.0.5:9090", "10.0.0.5:9090"),
            ("http://10.0.0.5:15020", "10.0.0.5:15020"),
            ("http://node-1/", "node-1:15020"),
            ("[fd00::5]", "[fd00::5]:15020"),
            ("[fd00::5]:15020", "[fd00::5]:15020"),
        ] {
            assert_eq!(
                super::metrics_endpoint(given).as_deref(),
                Ok(want),
                "{given}"
            );
        }
        for (given, want) in [
            ("https://10.0.0.5", "https://10.0.0.5:15010"),
            ("https://node-1:9443/", "https://node-1:9443"),
        ] {
            assert_eq!(super::admin_endpoint(given).as_deref(), Ok(want), "{given}");
            assert_eq!(
                super::metrics_endpoint(given).as_deref(),
                Ok(want),
                "{given}"
            );
        }
        for (given, says) in [
            ("https://10.0.0.5:15010/config_dump", "no path"),
            ("http://10.0.0.5:15020/metrics", "no path"),
            ("10.0.0.5:http", "is not a port"),
            ("10.0.0.5:0", "is not a port"),
            ("fd00::5", "in brackets"),
            ("[fd00::5", "closing"),
            ("", "give host"),
        ] {
            let e = super::metrics_endpoint(given).expect_err(given);
            assert!(e.contains(says), "{given}: {e}");
        }
        assert_eq!(
            super::admin_endpoint("127.0.0.1").as_deref(),
            Ok("127.0.0.1:15000")
        );
    }

    #[test]
    fn quantiles_follow_histogram_quantile() {
        // 10 under 1 ms, 80 more under 10 ms, 10 more under 100 ms
        let b = [(0.001, 10), (0.01, 90), (0.1, 100), (f64::INFINITY, 100)];
        let p50 = quantile(&b, 0.5).expect("p50");
        assert!((p50 - 0.0055).abs() < 1e-9, "{p50}");
        let p99 = quantile(&b, 0.99).expect("p99");
        assert!((p99 - 0.091).abs() < 1e-9, "{p99}");
        // beyond the last finite bucket: its bound
        let over = [(0.001, 0), (f64::INFINITY, 5)];
        assert_eq!(quantile(&over, 0.5), Some(0.001));
        assert_eq!(quantile(&[(0.001, 0), (f64::INFINITY, 0)], 0.5), None);
    }

    #[test]
    fn windows_subtract_counters_and_buckets() {
        let mut a = Row {
            requests: 10,
            success: 9,
            ..Row::default()
        };
        a.latency.insert(0.01f64.to_bits(), 10);
        let mut b = a.clone();
        b.requests = 30;
        b.success = 19;
        b.latency.insert(0.01f64.to_bits(), 30);
        let d = b.since(&a);
        assert_eq!((d.requests, d.success), (20, 10));
        assert_eq!(d.success_rate(), Some(0.5));
        assert_eq!(d.latency[&0.01f64.to_bits()], 20);
    }
}
