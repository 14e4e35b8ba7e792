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
    /// Hold `--conns` connections open to an echo server and send a small request on one of them
    /// every `--every-ms` (round robin) for `--secs`: an idle pod with a trickle of traffic.
    Hold(HoldOpts),
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
        Cmd::Connect(o) => report(repeat_connect(&o)),
        Cmd::Hold(o) => report(hold(&o)),
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
    let writer = {
        let mut w = s.try_clone()?;
        std::thread::spawn(move || -> std::io::Result<()> {
            if pace.is_zero() {
                w.write_all(&data)?;
            } else {
                for piece in data.chunks(piece) {
                    w.write_all(piece)?;
                    std::thread::sleep(pace);
                }
            }
            w.shutdown(Shutdown::Write)
        })
    };
    std::thread::sleep(Duration::from_millis(o.read_after_ms));
    let mut got = Vec::with_capacity(send);
    s.read_to_end(&mut got)?;
    writer
        .join()
        .map_err(|_| std::io::Error::other("writer panicked"))??;
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
