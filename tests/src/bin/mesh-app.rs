//! `mesh-app`: a stand-in application pod for tests and the demo. It first joins a cgroup and a
//! network namespace (in that order: entering the namespace with `ip netns exec` would remount
//! /sys and hide the cgroup v2 mount), then connects or serves.

use std::{
    io::{Read, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    path::PathBuf,
    process::ExitCode,
    time::Duration,
};

use clap::{Parser, Subcommand};

#[path = "mesh-app/grpc.rs"]
mod grpc;

#[derive(Parser)]
struct Cli {
    /// cgroup v2 folder to join before anything else (the "pod").
    #[arg(long)]
    cgroup: Option<PathBuf>,
    /// Network namespace (name under /run/netns) to enter after joining the cgroup.
    #[arg(long)]
    netns: Option<String>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Connect, send N bytes, half-close, read everything back and compare.
    Connect(ConnectOpts),
    /// Echo every connection back until EOF; prints each peer.
    EchoServer { addr: SocketAddr },
    /// Echo every connection back until EOF on one async worker, without a line per connection
    /// (for connection-rate tests, where a thread and two lines per connection would cost more
    /// than the mesh does).
    QuietEchoServer {
        addr: SocketAddr,
        /// Send the port the connection arrived on (2 bytes, big-endian) before the echo, so a
        /// client can tell a connection delivered to the wrong server.
        #[arg(long)]
        announce: bool,
    },
    /// Reads a PROXY protocol v2 header from each connection, prints `proxied peer=TCP_PEER
    /// command=Proxy|Local from=SRC to=DST` (or `header=missing`), then echoes the rest.
    ProxyEchoServer { addr: SocketAddr },
    /// Read each connection to EOF (the client's half-close), then answer `received=N` and close.
    CountServer { addr: SocketAddr },
    /// Read a little from each connection, then reset it.
    RstServer { addr: SocketAddr },
    /// Read nothing from each connection for `--delay-ms` (a stalled server), then read it to EOF
    /// and check the bytes are the client's pattern; prints `bytes=N pattern=ok|MISMATCH`.
    SinkServer {
        addr: SocketAddr,
        #[arg(long, default_value_t = 5000)]
        delay_ms: u64,
    },
    /// HTTP/1.1 and h2c on one port: every response says who served it (`x-served-by: NAME` and
    /// the body), after `--delay-ms`.
    HttpServer {
        addr: SocketAddr,
        #[arg(long)]
        name: String,
        #[arg(long, default_value_t = 0)]
        delay_ms: u64,
        /// Every Nth request is answered 503 (0: never).
        #[arg(long, default_value_t = 0)]
        fail_every: u64,
        /// While this file exists, every request is answered 500 (a broken endpoint).
        #[arg(long)]
        fail_file: Option<PathBuf>,
        /// Closes an HTTP/1.1 keep-alive connection idle this long (as servers do), silently.
        #[arg(long)]
        idle_close_ms: Option<u64>,
    },
    /// A server-speaks-first protocol (as SMTP or MySQL): greets each connection with
    /// `220 NAME ready`, then echoes.
    GreetServer {
        addr: SocketAddr,
        #[arg(long, default_value = "server")]
        name: String,
    },
    /// Connects and waits for the server's greeting without sending anything; prints
    /// `first_byte_ms=N greeting=...`.
    AwaitGreeting { addr: SocketAddr },
    /// HTTP/2 (h2c, prior knowledge) client on ONE connection: `--requests` GETs of
    /// `/PREFIX<i>`, `--concurrency` at a time (hyper's client; curl 7.88 cannot multiplex against
    /// hyper servers). Prints `ok=N errors=E served=name:count,...`.
    H2Load {
        addr: SocketAddr,
        #[arg(long, default_value_t = 100)]
        requests: usize,
        #[arg(long, default_value_t = 8)]
        concurrency: usize,
        #[arg(long, default_value = "/r")]
        prefix: String,
    },
    /// A WebSocket echo server (tokio-tungstenite): every text message comes back as
    /// `NAME: message`.
    WsServer {
        addr: SocketAddr,
        #[arg(long, default_value = "server")]
        name: String,
    },
    /// A WebSocket client: opens `ws://ADDR/`, sends `--messages` texts, checks each echo.
    /// Prints `ws=ok messages=N served_by=NAME` or the failure.
    WsClient {
        addr: SocketAddr,
        #[arg(long, default_value_t = 10)]
        messages: usize,
    },
    /// Sends raw bytes (`\r` and `\n` escapes understood), optionally a header of `--big-header`
    /// bytes before the final blank line, then reads until the peer closes or `--wait-ms`.
    /// Prints `status=CODE|none closed=true|false after_ms=N served_by=NAME|none framing=...
    /// responses=N`.
    Raw {
        addr: SocketAddr,
        #[arg(long)]
        send: String,
        #[arg(long, default_value_t = 0)]
        big_header: usize,
        #[arg(long, default_value_t = 5000)]
        wait_ms: u64,
    },
    /// An HTTP/2 attacker on one connection: `rapid-reset` opens and cancels `--count` streams
    /// (CVE-2023-44487); `continuation` sends one HEADERS and `--count` CONTINUATION frames that
    /// never end it. Prints `goaway=CODE` or `closed` (or `open` if the server took it all) and
    /// `after_ms`.
    H2Flood {
        addr: SocketAddr,
        #[arg(long)]
        kind: String,
        #[arg(long, default_value_t = 5000)]
        count: usize,
    },
    /// A gRPC server (tonic), service `nodemesh.test.Echo`: unary `Who`, server-streaming
    /// `Count`, client-streaming `Sum`, bidirectional `Chat` (see mesh-app/grpc.rs).
    GrpcServer {
        addr: SocketAddr,
        #[arg(long)]
        name: String,
    },
    /// gRPC unary calls on ONE channel (one HTTP/2 connection), `--concurrency` at a time.
    /// Prints `ok=N errors=E served=NAME:count,... codes=CODE:count,...`.
    GrpcLoad {
        addr: SocketAddr,
        #[arg(long, default_value_t = 100)]
        calls: usize,
        #[arg(long, default_value_t = 8)]
        concurrency: usize,
        /// The request message (`fail:N` asks for status N).
        #[arg(long, default_value = "who")]
        ask: String,
    },
    /// Server, client and bidirectional streaming RPCs of `--messages` messages each, and a
    /// server stream ending in status 14 after its messages. Prints each kind's result.
    GrpcStreams {
        addr: SocketAddr,
        #[arg(long, default_value_t = 20)]
        messages: usize,
    },
    /// Runs a program inside the pod (a real client: curl, h2load).
    Exec {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true, required = true)]
        argv: Vec<String>,
    },
    /// Hold `--conns` connections open to an echo server and send a small request on one of them
    /// every `--every-ms` (round robin) for `--secs`: an idle pod with a trickle of traffic.
    Hold(HoldOpts),
    /// New connections at a fixed pace: `--rate` a second for `--secs` (to the addresses in
    /// turn), each sending `--send` bytes, half-closing and checking the echo (a client that churns connections). Prints
    /// `ok=N errors=E started_per_s=R worst_second=N p50_us= p99_us= max_us= first_error=…`.
    ConnRate(ConnRateOpts),
}

#[derive(clap::Args)]
struct ConnRateOpts {
    /// Where to connect, in turn.
    #[arg(required = true, num_args = 1..)]
    addrs: Vec<SocketAddr>,
    #[arg(long)]
    rate: u32,
    #[arg(long)]
    secs: u32,
    #[arg(long, default_value_t = 100)]
    send: usize,
    /// Connections open at once at most; the pace waits for one to end beyond it.
    #[arg(long, default_value_t = 256)]
    max_in_flight: usize,
    /// The servers announce their port first (`quiet-echo-server --announce`): check it is the
    /// one this connection was made to.
    #[arg(long)]
    announced: bool,
}

/// One paced connection: connect, send, half-close, read the echo to EOF and compare.
async fn paced_connection(addr: SocketAddr, msg: &[u8], announced: bool) -> std::io::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let t = Duration::from_secs(10);
    let mut s = tokio::time::timeout(t, tokio::net::TcpStream::connect(addr))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"))??;
    s.write_all(msg).await?;
    s.shutdown().await?;
    let mut back = Vec::with_capacity(msg.len());
    tokio::time::timeout(t, s.read_to_end(&mut back))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "echo timed out"))??;
    let echo = if announced {
        let port = back.get(..2).map(|p| u16::from_be_bytes([p[0], p[1]]));
        if port != Some(addr.port()) {
            return Err(std::io::Error::other(format!(
                "misdelivered: made to {addr}, answered by port {port:?}"
            )));
        }
        &back[2..]
    } else {
        &back[..]
    };
    if echo != msg {
        return Err(std::io::Error::other(format!(
            "echo mismatch: {} of {} bytes",
            echo.len(),
            msg.len()
        )));
    }
    Ok(())
}

fn proxy_echo(addr: SocketAddr) -> std::io::Result<String> {
    let l = TcpListener::bind(addr)?;
    println!("listening {}", l.local_addr()?);
    for s in l.incoming() {
        let mut s = s?;
        let peer = s.peer_addr()?;
        std::thread::spawn(move || {
            s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
            // The fixed part (signature, version and command, family, length), then the rest.
            let mut head = vec![0u8; 16];
            s.read_exact(&mut head).ok()?;
            let len = usize::from(u16::from_be_bytes([head[14], head[15]]));
            if !head.starts_with(ppp::v2::PROTOCOL_PREFIX) {
                println!("proxied peer={peer} header=missing");
                return None;
            }
            head.resize(16 + len, 0);
            s.read_exact(&mut head[16..]).ok()?;
            match ppp::v2::Header::try_from(head.as_slice()) {
                Ok(h) => {
                    let (from, to) = match h.addresses {
                        ppp::v2::Addresses::IPv4(a) => (
                            SocketAddr::from((a.source_address, a.source_port)).to_string(),
                            SocketAddr::from((a.destination_address, a.destination_port))
                                .to_string(),
                        ),
                        _ => ("none".into(), "none".into()),
                    };
                    println!(
                        "proxied peer={peer} command={:?} from={from} to={to}",
                        h.command
                    );
                }
                Err(e) => {
                    println!("proxied peer={peer} header=invalid {e}");
                    return None;
                }
            }
            let mut r = s.try_clone().ok()?;
            let _ = std::io::copy(&mut r, &mut s);
            let _ = s.shutdown(Shutdown::Write);
            Some(())
        });
    }
    Ok(String::new())
}

fn quiet_echo(addr: SocketAddr, announce: bool) -> std::io::Result<String> {
    runtime()?.block_on(async {
        let l = tokio::net::TcpListener::bind(addr).await?;
        println!("listening {}", l.local_addr()?);
        let port = l.local_addr()?.port().to_be_bytes();
        loop {
            let (mut s, _) = l.accept().await?;
            tokio::spawn(async move {
                if announce
                    && tokio::io::AsyncWriteExt::write_all(&mut s, &port)
                        .await
                        .is_err()
                {
                    return;
                }
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = tokio::io::AsyncWriteExt::shutdown(&mut w).await;
            });
        }
    })
}

fn conn_rate(o: &ConnRateOpts) -> std::io::Result<String> {
    use std::{sync::Arc, time::Instant};
    type Done = (Instant, Duration, std::io::Result<()>);
    let rt = runtime()?;
    rt.block_on(async {
        let msg: Arc<[u8]> = pattern(o.send).into();
        let gate = Arc::new(tokio::sync::Semaphore::new(o.max_in_flight.max(1)));
        let mut tasks = tokio::task::JoinSet::<Done>::new();
        let mut finished: Vec<Done> = Vec::new();
        // Starts in slices of 10 ms (the timer's grain is 1 ms; a slice keeps the pace even).
        let per_slice = (o.rate / 100).max(1);
        let slices = o.secs * 100;
        let start = Instant::now();
        let mut next = o.addrs.iter().cycle();
        for k in 0..slices {
            tokio::time::sleep_until((start + Duration::from_millis(u64::from(k) * 10)).into())
                .await;
            for _ in 0..per_slice {
                let permit = Arc::clone(&gate)
                    .acquire_owned()
                    .await
                    .map_err(std::io::Error::other)?;
                let addr = *next.next().expect("at least one address");
                let (msg, announced) = (Arc::clone(&msg), o.announced);
                tasks.spawn(async move {
                    let began = Instant::now();
                    let r = paced_connection(addr, &msg, announced).await;
                    drop(permit);
                    (began, began.elapsed(), r)
                });
            }
            // Reap as we go, so the set does not grow with the run.
            while let Some(done) = tasks.try_join_next() {
                finished.push(done.map_err(std::io::Error::other)?);
            }
        }
        let launched = start.elapsed().as_secs_f64();
        while let Some(done) = tasks.join_next().await {
            finished.push(done.map_err(std::io::Error::other)?);
        }
        let started = finished.len();
        let mut took: Vec<u64> = Vec::with_capacity(started);
        let mut per_second = vec![0u64; o.secs as usize + 1];
        let (mut errors, mut first_error) = (0u64, String::from("none"));
        for (began, d, r) in &finished {
            match r {
                Ok(()) => {
                    took.push(d.as_micros() as u64);
                    let sec = (*began + *d).duration_since(start).as_secs() as usize;
                    if let Some(c) = per_second.get_mut(sec) {
                        *c += 1;
                    }
                }
                Err(e) => {
                    if errors == 0 {
                        first_error = format!("{:?}:{e}", e.kind()).replace(' ', "_");
                    }
                    errors += 1;
                }
            }
        }
        took.sort_unstable();
        let pct = |p: f64| {
            took.get(((took.len().max(1) - 1) as f64 * p).round() as usize)
                .copied()
                .unwrap_or(0)
        };
        // The fewest connections completed in any whole second but the first and the last.
        let inner = per_second.len().saturating_sub(1);
        let worst = per_second
            .get(1..inner)
            .and_then(|s| s.iter().min().copied())
            .unwrap_or(0);
        Ok(format!(
            "ok={} errors={errors} started_per_s={:.0} worst_second={worst} p50_us={} p99_us={} \
             max_us={} first_error={first_error}",
            took.len(),
            started as f64 / launched,
            pct(0.5),
            pct(0.99),
            pct(1.0),
        ))
    })
}

#[derive(clap::Args)]
struct HoldOpts {
    addr: SocketAddr,
    #[arg(long, default_value_t = 4)]
    conns: usize,
    #[arg(long, default_value_t = 250)]
    every_ms: u64,
    #[arg(long, default_value_t = 30)]
    secs: u64,
}

/// Prints `held=N` once connected, `request_error=…` at once for each failed request, and
/// `requests=N errors=E` at the end.
fn hold(o: &HoldOpts) -> std::io::Result<String> {
    let mut conns = (0..o.conns)
        .map(|_| {
            let s = TcpStream::connect_timeout(&o.addr, Duration::from_secs(5))?;
            s.set_read_timeout(Some(Duration::from_secs(5)))?;
            s.set_nodelay(true)?;
            Ok(s)
        })
        .collect::<std::io::Result<Vec<_>>>()?;
    println!("held={}", conns.len());
    let end = std::time::Instant::now() + Duration::from_secs(o.secs);
    let msg = pattern(100);
    let (mut requests, mut errors) = (0u64, 0u64);
    let mut i = 0;
    while std::time::Instant::now() < end && !conns.is_empty() {
        std::thread::sleep(Duration::from_millis(o.every_ms));
        let k = i % conns.len();
        i += 1;
        let mut back = vec![0u8; msg.len()];
        let r = conns[k]
            .write_all(&msg)
            .and_then(|()| conns[k].read_exact(&mut back));
        match r {
            Ok(()) if back == msg => requests += 1,
            Ok(()) => {
                errors += 1;
                println!("request_error=mismatch conn={k}");
            }
            Err(e) => {
                errors += 1;
                println!("request_error={:?} conn={k} {e}", e.kind());
            }
        }
    }
    Ok(format!("requests={requests} errors={errors}"))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(cg) = &cli.cgroup {
        // "0" means the writing process itself; we are still single-threaded here.
        if let Err(e) = std::fs::write(cg.join("cgroup.procs"), "0") {
            println!("error=cgroup cannot join {}: {e}", cg.display());
            return ExitCode::FAILURE;
        }
    }
    if let Some(ns) = &cli.netns {
        nodemesh_tests::netns::enter(&PathBuf::from("/run/netns").join(ns));
    }
    match cli.cmd {
        Cmd::HttpServer {
            addr,
            name,
            delay_ms,
            fail_every,
            fail_file,
            idle_close_ms,
        } => report(http_server(
            addr,
            name,
            Duration::from_millis(delay_ms),
            fail_every,
            fail_file,
            idle_close_ms.map(Duration::from_millis),
        )),
        Cmd::GreetServer { addr, name } => report(greet_server(addr, &name)),
        Cmd::AwaitGreeting { addr } => report(await_greeting(addr)),
        Cmd::Raw {
            addr,
            send,
            big_header,
            wait_ms,
        } => report(raw(addr, &send, big_header, Duration::from_millis(wait_ms))),
        Cmd::H2Flood { addr, kind, count } => report(h2_flood(addr, &kind, count)),
        Cmd::WsServer { addr, name } => report(ws_server(addr, name)),
        Cmd::WsClient { addr, messages } => report(ws_client(addr, messages)),
        Cmd::H2Load {
            addr,
            requests,
            concurrency,
            prefix,
        } => report(h2_load(addr, requests, concurrency, &prefix)),
        Cmd::GrpcServer { addr, name } => report(grpc::server(addr, name)),
        Cmd::GrpcLoad {
            addr,
            calls,
            concurrency,
            ask,
        } => report(grpc::load(addr, calls, concurrency, ask)),
        Cmd::GrpcStreams { addr, messages } => report(grpc::streams(addr, messages)),
        Cmd::Exec { argv } => {
            use std::os::unix::process::CommandExt;
            let e = std::process::Command::new(&argv[0]).args(&argv[1..]).exec();
            println!("error=exec {}: {e}", argv[0]);
            ExitCode::FAILURE
        }
        Cmd::Connect(o) => report(repeat_connect(&o)),
        Cmd::Hold(o) => report(hold(&o)),
        Cmd::ConnRate(o) => report(conn_rate(&o)),
        Cmd::QuietEchoServer { addr, announce } => report(quiet_echo(addr, announce)),
        Cmd::ProxyEchoServer { addr } => report(proxy_echo(addr)),
        Cmd::EchoServer { addr }
        | Cmd::CountServer { addr }
        | Cmd::RstServer { addr }
        | Cmd::SinkServer { addr, .. } => {
            match serve(
                addr,
                match cli.cmd {
                    Cmd::EchoServer { .. } => Mode::Echo,
                    Cmd::CountServer { .. } => Mode::Count,
                    Cmd::SinkServer { delay_ms, .. } => Mode::Sink(Duration::from_millis(delay_ms)),
                    _ => Mode::Rst,
                },
            ) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    println!("error={:?} {e}", e.kind());
                    ExitCode::FAILURE
                }
            }
        }
    }
}

/// The runtime of mesh-app's async servers and clients: one worker, like a small pod.
fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
}

fn http_server(
    addr: SocketAddr,
    name: String,
    delay: Duration,
    fail_every: u64,
    fail_file: Option<PathBuf>,
    idle_close: Option<Duration>,
) -> std::io::Result<String> {
    let served = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let fail_file = std::sync::Arc::new(fail_file);
    use http_body_util::Full;
    use hyper_util::rt::{TokioExecutor, TokioIo};
    let rt = runtime()?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        println!("listening on {addr}");
        loop {
            let (stream, _) = listener.accept().await?;
            let _ = stream.set_nodelay(true);
            let name = name.clone();
            let (served, fail_file) = (served.clone(), fail_file.clone());
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(
                    move |req: hyper::Request<hyper::body::Incoming>| {
                        let name = name.clone();
                        let n = served.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
                        let status = if fail_file.as_ref().as_ref().is_some_and(|f| f.exists()) {
                            500
                        } else if fail_every > 0 && n % fail_every == 0 {
                            503
                        } else {
                            200
                        };
                        // How the request was framed when it reached the server (the smuggling
                        // test): one way only, whatever the client sent.
                        let framing = if req.headers().contains_key("content-length") {
                            "content-length"
                        } else if req.headers().contains_key("transfer-encoding") {
                            "chunked"
                        } else {
                            "none"
                        };
                        async move {
                            use http_body_util::BodyExt;
                            if !delay.is_zero() {
                                tokio::time::sleep(delay).await;
                            }
                            // /upload: read the body to its end, answer `received=N`;
                            // /download?bytes=N: stream N bytes in 64 KiB chunks.
                            // /headers: the request's headers as the server got them.
                            let path = req.uri().path().to_string();
                            let query = req.uri().query().unwrap_or_default().to_string();
                            let body = if path == "/headers" {
                                let text: String = req
                                    .headers()
                                    .iter()
                                    .map(|(k, v)| {
                                        format!("{k}: {}\n", String::from_utf8_lossy(v.as_bytes()))
                                    })
                                    .collect();
                                Full::new(bytes::Bytes::from(text))
                                    .map_err(|never| match never {})
                                    .boxed()
                            } else if path == "/upload" {
                                let mut body = req.into_body();
                                let mut n = 0u64;
                                while let Some(frame) = body.frame().await {
                                    match frame {
                                        Ok(f) => n += f.data_ref().map_or(0, |d| d.len() as u64),
                                        Err(_) => break,
                                    }
                                }
                                Full::new(bytes::Bytes::from(format!("received={n}\n")))
                                    .map_err(|never| match never {})
                                    .boxed()
                            } else if let Some(n) = path
                                .eq("/download")
                                .then(|| {
                                    query
                                        .strip_prefix("bytes=")
                                        .and_then(|v| v.parse::<u64>().ok())
                                })
                                .flatten()
                            {
                                let chunk = bytes::Bytes::from(vec![b'x'; 64 << 10]);
                                let chunks = futures_util::stream::unfold(n, move |left| {
                                    let chunk = chunk.clone();
                                    async move {
                                        (left > 0).then(|| {
                                            let take = left.min(chunk.len() as u64);
                                            let frame = hyper::body::Frame::data(
                                                chunk.slice(..take as usize),
                                            );
                                            (Ok::<_, std::convert::Infallible>(frame), left - take)
                                        })
                                    }
                                });
                                http_body_util::StreamBody::new(chunks).boxed()
                            } else {
                                Full::new(bytes::Bytes::from(format!("{name}\n")))
                                    .map_err(|never| match never {})
                                    .boxed()
                            };
                            let mut resp = hyper::Response::new(body);
                            *resp.status_mut() =
                                hyper::StatusCode::from_u16(status).expect("a status");
                            if let Ok(v) = name.parse() {
                                resp.headers_mut().insert("x-served-by", v);
                            }
                            resp.headers_mut().insert(
                                "x-framing",
                                hyper::header::HeaderValue::from_static(framing),
                            );
                            Ok::<_, std::convert::Infallible>(resp)
                        }
                    },
                );
                let mut b = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                if let Some(idle) = idle_close {
                    // hyper's header timer runs while a keep-alive connection waits for its
                    // next request: an idle connection is closed, without a word, after it.
                    b.http1()
                        .timer(hyper_util::rt::TokioTimer::new())
                        .header_read_timeout(idle);
                }
                let _ = b.serve_connection(TokioIo::new(stream), svc).await;
            });
        }
    })
}

fn h2_load(
    addr: SocketAddr,
    requests: usize,
    concurrency: usize,
    prefix: &str,
) -> std::io::Result<String> {
    use http_body_util::{BodyExt, Empty};
    use hyper_util::rt::{TokioExecutor, TokioIo};
    let rt = runtime()?;
    rt.block_on(async move {
        let stream = tokio::net::TcpStream::connect(addr).await?;
        let _ = stream.set_nodelay(true);
        let (sender, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
                .await
                .map_err(std::io::Error::other)?;
        tokio::spawn(conn);
        let next = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for _ in 0..concurrency.max(1) {
            let (mut sender, next, prefix) = (sender.clone(), next.clone(), prefix.to_string());
            tasks.push(tokio::spawn(async move {
                let mut served: std::collections::BTreeMap<String, u32> = Default::default();
                let mut errors = 0u32;
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if i >= requests {
                        break;
                    }
                    let req = hyper::Request::get(format!("http://{addr}{prefix}{i}"))
                        .body(Empty::<bytes::Bytes>::new())
                        .expect("request");
                    let r = async {
                        sender.ready().await?;
                        let resp = sender.send_request(req).await?;
                        let ok = resp.status().is_success();
                        let who = resp
                            .headers()
                            .get("x-served-by")
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or("unknown")
                            .to_string();
                        resp.into_body().collect().await?;
                        Ok::<_, hyper::Error>((ok, who))
                    }
                    .await;
                    match r {
                        Ok((true, who)) => *served.entry(who).or_default() += 1,
                        Ok((false, who)) => {
                            errors += 1;
                            *served.entry(format!("{who}!")).or_default() += 1;
                        }
                        Err(_) => errors += 1,
                    }
                }
                (served, errors)
            }));
        }
        let mut served: std::collections::BTreeMap<String, u32> = Default::default();
        let mut errors = 0;
        for t in tasks {
            let (s, e) = t.await.map_err(std::io::Error::other)?;
            for (k, v) in s {
                *served.entry(k).or_default() += v;
            }
            errors += e;
        }
        // `name!` counts a server's failed answers; `ok` only the good ones.
        let ok: u32 = served
            .iter()
            .filter(|(k, _)| !k.ends_with('!'))
            .map(|(_, v)| v)
            .sum();
        let list: Vec<String> = served.iter().map(|(k, v)| format!("{k}:{v}")).collect();
        Ok(format!("ok={ok} errors={errors} served={}", list.join(",")))
    })
}

fn raw(addr: SocketAddr, send: &str, big_header: usize, wait: Duration) -> std::io::Result<String> {
    let mut bytes = send.replace("\\r", "\r").replace("\\n", "\n").into_bytes();
    if big_header > 0 {
        // before the blank line that ends the header section
        let at = bytes.len().saturating_sub(2);
        let mut h = b"x-big: ".to_vec();
        h.resize(7 + big_header, b'a');
        h.extend_from_slice(b"\r\n");
        bytes.splice(at..at, h);
    }
    let start = std::time::Instant::now();
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    // A big request may be refused before it is all written: keep what the server said.
    let _ = s.write_all(&bytes);
    s.set_read_timeout(Some(Duration::from_millis(100)))?;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let closed = loop {
        match s.read(&mut buf) {
            Ok(0) => break true,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break true,
            Err(_) => {}
        }
        if start.elapsed() > wait {
            break false;
        }
    };
    let text = String::from_utf8_lossy(&got);
    let status = text
        .lines()
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .unwrap_or("none")
        .to_string();
    let header = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .unwrap_or("none")
            .to_string()
    };
    let responses = text.lines().filter(|l| l.starts_with("HTTP/1.")).count();
    Ok(format!(
        "status={status} closed={closed} after_ms={} served_by={} framing={} responses={responses}",
        start.elapsed().as_millis(),
        header("x-served-by: "),
        header("x-framing: "),
    ))
}

fn h2_flood(addr: SocketAddr, kind: &str, count: usize) -> std::io::Result<String> {
    fn frame(out: &mut Vec<u8>, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
        let len = payload.len() as u32;
        out.extend_from_slice(&len.to_be_bytes()[1..]);
        out.push(kind);
        out.push(flags);
        out.extend_from_slice(&stream.to_be_bytes());
        out.extend_from_slice(payload);
    }
    const HEADERS: u8 = 1;
    const RST_STREAM: u8 = 3;
    const SETTINGS: u8 = 4;
    const GOAWAY: u8 = 7;
    const CONTINUATION: u8 = 9;
    // :method GET, :scheme http, :path /, :authority x (HPACK static indexes and one literal)
    let block = [0x82u8, 0x86, 0x84, 0x41, 0x01, b'x'];
    let start = std::time::Instant::now();
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_nodelay(true)?;
    let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    frame(&mut out, SETTINGS, 0, 0, &[]);
    frame(&mut out, SETTINGS, 1, 0, &[]);
    s.write_all(&out)?;
    out.clear();
    match kind {
        "rapid-reset" => {
            for i in 0..count as u32 {
                let id = 2 * i + 1;
                frame(&mut out, HEADERS, 0x5, id, &block);
                frame(&mut out, RST_STREAM, 0, id, &8u32.to_be_bytes());
            }
        }
        "continuation" => {
            frame(&mut out, HEADERS, 0, 1, &block);
            // a literal header (new name) per frame: 0x00, name, value
            let mut lit = vec![0x00, 3, b'x', b'-', b'a', 100];
            lit.resize(lit.len() + 100, b'a');
            for _ in 0..count {
                frame(&mut out, CONTINUATION, 0, 1, &lit);
            }
        }
        other => return Err(std::io::Error::other(format!("unknown flood {other:?}"))),
    }
    // Written from a thread: the server may stop reading, and its GOAWAY must still be seen.
    let mut w = s.try_clone()?;
    std::thread::spawn(move || {
        let _ = w.write_all(&out);
    });
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut head = [0u8; 9];
    loop {
        if let Err(e) = s.read_exact(&mut head) {
            let outcome = if e.kind() == std::io::ErrorKind::WouldBlock
                || e.kind() == std::io::ErrorKind::TimedOut
            {
                "open"
            } else {
                "closed"
            };
            return Ok(format!(
                "{outcome} after_ms={}",
                start.elapsed().as_millis()
            ));
        }
        let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
        let mut payload = vec![0u8; len];
        s.read_exact(&mut payload)?;
        if head[3] == GOAWAY && payload.len() >= 8 {
            let code = u32::from_be_bytes([payload[4], payload[5], payload[6], payload[7]]);
            return Ok(format!(
                "goaway={code} after_ms={}",
                start.elapsed().as_millis()
            ));
        }
    }
}

fn ws_server(addr: SocketAddr, name: String) -> std::io::Result<String> {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let rt = runtime()?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        println!("listening on {addr}");
        loop {
            let (stream, _) = listener.accept().await?;
            let name = name.clone();
            tokio::spawn(async move {
                let Ok(mut ws) = tokio_tungstenite::accept_async(stream).await else {
                    return;
                };
                while let Some(Ok(msg)) = ws.next().await {
                    let reply = match msg {
                        Message::Text(t) => Message::text(format!("{name}: {t}")),
                        Message::Close(_) => break,
                        other => other,
                    };
                    if ws.send(reply).await.is_err() {
                        break;
                    }
                }
            });
        }
    })
}

fn ws_client(addr: SocketAddr, messages: usize) -> std::io::Result<String> {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let (mut ws, resp) = tokio_tungstenite::connect_async(format!("ws://{addr}/chat"))
            .await
            .map_err(std::io::Error::other)?;
        let status = resp.status().as_u16();
        let mut served_by = String::new();
        for i in 0..messages {
            let text = format!("message {i}");
            ws.send(Message::text(text.clone()))
                .await
                .map_err(std::io::Error::other)?;
            let back = tokio::time::timeout(Duration::from_secs(5), ws.next())
                .await
                .map_err(|_| std::io::Error::other("no echo within 5 s"))?
                .ok_or_else(|| std::io::Error::other("closed before the echo"))?
                .map_err(std::io::Error::other)?;
            let back = back.into_text().map_err(std::io::Error::other)?.to_string();
            let (who, said) = back.split_once(": ").unwrap_or(("", back.as_str()));
            if said != text {
                return Err(std::io::Error::other(format!("echo mismatch: {back:?}")));
            }
            served_by = who.to_string();
        }
        let _ = ws.close(None).await;
        Ok(format!(
            "ws=ok status={status} messages={messages} served_by={served_by}"
        ))
    })
}

fn greet_server(addr: SocketAddr, name: &str) -> std::io::Result<String> {
    let listener = TcpListener::bind(addr)?;
    println!("listening on {addr}");
    for conn in listener.incoming() {
        let mut s = conn?;
        let greeting = format!("220 {name} ready\r\n");
        std::thread::spawn(move || {
            let _ = s.write_all(greeting.as_bytes());
            let mut buf = [0u8; 4096];
            while let Ok(n) = s.read(&mut buf) {
                if n == 0 || s.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        });
    }
    Ok(String::new())
}

fn await_greeting(addr: SocketAddr) -> std::io::Result<String> {
    let start = std::time::Instant::now();
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut buf = [0u8; 256];
    let n = s.read(&mut buf)?;
    let ms = start.elapsed().as_secs_f64() * 1000.0;
    let greeting = String::from_utf8_lossy(&buf[..n]).trim().replace(' ', "_");
    // Then it is an echo: the connection is a plain TCP one end to end.
    s.write_all(b"ping")?;
    let mut back = [0u8; 4];
    s.read_exact(&mut back)?;
    Ok(format!(
        "first_byte_ms={ms:.1} greeting={greeting} echo={}",
        if &back == b"ping" { "ok" } else { "MISMATCH" }
    ))
}

/// Prints the result line (or `error=<kind> <cause>`) and exits accordingly.
fn report(r: std::io::Result<String>) -> ExitCode {
    match r {
        Ok(line) => {
            println!("{line}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            println!("error={:?} {e}", e.kind());
            ExitCode::FAILURE
        }
    }
}

/// A deterministic payload, so corruption anywhere shows up as a mismatch.
fn pattern(n: usize) -> Vec<u8> {
    (0..n)
        .map(|i| (i.wrapping_mul(31) ^ (i >> 8)) as u8)
        .collect()
}

#[derive(clap::Args)]
struct ConnectOpts {
    addr: SocketAddr,
    #[arg(long, default_value_t = 0)]
    send: usize,
    #[arg(long, default_value_t = 5000)]
    connect_timeout_ms: u64,
    /// Source address to bind first (an address the pod added to its interface).
    #[arg(long)]
    bind: Option<std::net::IpAddr>,
    /// Print what the server answers as text instead of comparing it with what was sent.
    #[arg(long)]
    reply: bool,
    /// Send the bytes, then abort the connection with a reset instead of a half-close.
    #[arg(long)]
    rst: bool,
    /// Send in pieces (`--piece-bytes`) this many milliseconds apart (a long, slow connection).
    #[arg(long, default_value_t = 0)]
    pace_ms: u64,
    /// The size of each paced piece.
    #[arg(long, default_value_t = 4096)]
    piece_bytes: usize,
    /// Start reading what comes back only this many milliseconds after the first write (a client
    /// that sends ahead of its responses).
    #[arg(long, default_value_t = 0)]
    read_after_ms: u64,
    /// Make this many connections one after the other (each from a new client port); prints
    /// the last line and how many succeeded.
    #[arg(long, default_value_t = 1)]
    repeat: u32,
    /// With --repeat: print per-connection latency percentiles (connect, send, echo back).
    #[arg(long)]
    stats: bool,
    /// With --pace-ms: print what getpeername() answers after each piece (`peer_now=`) and at
    /// the end (`peer_end=`).
    #[arg(long)]
    report_peer: bool,
}

fn set_linger_zero(s: &TcpStream) -> std::io::Result<()> {
    let l = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: setsockopt reads a live local of the given size.
    let rc = unsafe {
        libc::setsockopt(
            std::os::fd::AsRawFd::as_raw_fd(s),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&l as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

fn open(o: &ConnectOpts) -> std::io::Result<TcpStream> {
    let Some(ip) = o.bind else {
        return TcpStream::connect_timeout(&o.addr, Duration::from_millis(o.connect_timeout_ms));
    };
    // std has no bind-then-connect; a blocking libc socket keeps this small.
    // SAFETY: plain socket calls on a descriptor this function owns.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let s = <TcpStream as std::os::fd::FromRawFd>::from_raw_fd(fd);
        let (std::net::IpAddr::V4(src), SocketAddr::V4(dst)) = (ip, o.addr) else {
            return Err(std::io::Error::other("--bind supports IPv4 only"));
        };
        let sin = |ip: std::net::Ipv4Addr, port: u16| libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: port.to_be(),
            sin_addr: libc::in_addr {
                s_addr: u32::from(ip).to_be(),
            },
            sin_zero: [0; 8],
        };
        let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
        let a = sin(src, 0);
        if libc::bind(fd, (&a as *const libc::sockaddr_in).cast(), len) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let b = sin(*dst.ip(), dst.port());
        if libc::connect(fd, (&b as *const libc::sockaddr_in).cast(), len) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(s)
    }
}

fn repeat_connect(o: &ConnectOpts) -> std::io::Result<String> {
    let (n, stats) = (o.repeat, o.stats);
    if n <= 1 && !stats {
        return connect(o);
    }
    let mut last = String::new();
    let mut took = Vec::with_capacity(n as usize);
    for i in 0..n.max(1) {
        let start = std::time::Instant::now();
        last = connect(o)
            .map_err(|e| std::io::Error::new(e.kind(), format!("connection {i}: {e}")))?;
        took.push(start.elapsed().as_micros() as u64);
    }
    if !stats {
        return Ok(format!("{last} repeated={n}"));
    }
    took.sort_unstable();
    let pct = |p: f64| took[((took.len() as f64 - 1.0) * p).round() as usize];
    Ok(format!(
        "{last} repeated={n} p50_us={} p90_us={} p99_us={} max_us={}",
        pct(0.5),
        pct(0.9),
        pct(0.99),
        pct(1.0)
    ))
}

fn connect(o: &ConnectOpts) -> std::io::Result<String> {
    let (addr, send) = (o.addr, o.send);
    let mut s = open(o)?;
    s.set_read_timeout(Some(Duration::from_secs(20)))?;
    let local = s.local_addr()?;
    let peer = s.peer_addr()?;
    let _ = addr;
    if o.rst {
        s.write_all(&pattern(send))?;
        std::thread::sleep(Duration::from_millis(300));
        set_linger_zero(&s)?;
        drop(s);
        return Ok(format!("local={local} peer={peer} sent={send} reset=sent"));
    }
    let data = pattern(send);
    let pace = Duration::from_millis(o.pace_ms);
    let piece = o.piece_bytes.max(1);
    let report_peer = o.report_peer;
    let writer = {
        let mut w = s.try_clone()?;
        std::thread::spawn(move || -> std::io::Result<Option<SocketAddr>> {
            if pace.is_zero() {
                w.write_all(&data)?;
                w.shutdown(Shutdown::Write)?;
                return Ok(None);
            }
            for piece in data.chunks(piece) {
                w.write_all(piece)?;
                // What getpeername() answers now, after each piece (a test follows it while
                // something else happens to the node).
                if report_peer && let Ok(p) = w.peer_addr() {
                    println!("peer_now={p}");
                    let _ = std::io::Write::flush(&mut std::io::stdout());
                }
                std::thread::sleep(pace);
            }
            // A long, paced connection also says what getpeername() answers at its end.
            let at_end = w.peer_addr().ok().filter(|_| report_peer);
            w.shutdown(Shutdown::Write)?;
            Ok(at_end)
        })
    };
    std::thread::sleep(Duration::from_millis(o.read_after_ms));
    let mut got = Vec::with_capacity(send);
    s.read_to_end(&mut got)?;
    let peer_end = writer
        .join()
        .map_err(|_| std::io::Error::other("writer panicked"))??
        .map(|p| format!(" peer_end={p}"))
        .unwrap_or_default();
    let peer = format!("{peer}{peer_end}");
    if o.reply {
        return Ok(format!(
            "local={local} peer={peer} sent={send} reply={}",
            String::from_utf8_lossy(&got).trim()
        ));
    }
    let echo = if send == 0 {
        "none"
    } else if got == pattern(send) {
        "ok"
    } else {
        "MISMATCH"
    };
    Ok(format!(
        "local={local} peer={peer} sent={send} received={} echo={echo}",
        got.len()
    ))
}

#[derive(Clone, Copy)]
enum Mode {
    Echo,
    Count,
    Rst,
    Sink(Duration),
}

fn serve(addr: SocketAddr, mode: Mode) -> std::io::Result<()> {
    let l = TcpListener::bind(addr)?;
    println!("listening {}", l.local_addr()?);
    for s in l.incoming() {
        let mut s = s?;
        let peer = s.peer_addr()?;
        println!("accepted peer={peer}");
        std::thread::spawn(move || {
            let mut r = match s.try_clone() {
                Ok(r) => r,
                Err(_) => return,
            };
            match mode {
                Mode::Echo => match std::io::copy(&mut r, &mut s) {
                    Ok(n) => {
                        let _ = s.shutdown(Shutdown::Write);
                        println!("closed peer={peer} bytes={n}");
                    }
                    Err(e) => println!("closed peer={peer} error={:?}", e.kind()),
                },
                Mode::Count => {
                    let mut buf = Vec::new();
                    match r.read_to_end(&mut buf) {
                        Ok(n) => {
                            // The client's half-close arrived; this direction is still open.
                            let _ = writeln!(s, "received={n}");
                            let _ = s.shutdown(Shutdown::Write);
                            println!("closed peer={peer} bytes={n} half-close=seen");
                        }
                        Err(e) => println!("closed peer={peer} error={:?}", e.kind()),
                    }
                }
                Mode::Rst => {
                    let mut buf = [0u8; 16];
                    let _ = r.read(&mut buf);
                    let _ = set_linger_zero(&s);
                    println!("reset peer={peer}");
                }
                Mode::Sink(delay) => {
                    std::thread::sleep(delay);
                    let mut got = Vec::new();
                    match r.read_to_end(&mut got) {
                        Ok(n) => {
                            let ok = got == pattern(n);
                            let _ = s.shutdown(Shutdown::Write);
                            println!(
                                "closed peer={peer} bytes={n} pattern={}",
                                if ok { "ok" } else { "MISMATCH" }
                            );
                        }
                        Err(e) => println!("closed peer={peer} error={:?}", e.kind()),
                    }
                }
            }
        });
    }
    Ok(())
}
