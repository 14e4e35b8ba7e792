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
    Connect {
        addr: SocketAddr,
        #[arg(long, default_value_t = 0)]
        send: usize,
    },
    /// Echo every connection back until EOF; prints each peer.
    EchoServer { addr: SocketAddr },
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
        Cmd::Connect { addr, send } => match connect(addr, send) {
            Ok(line) => {
                println!("{line}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                println!("error={:?} {e}", e.kind());
                ExitCode::FAILURE
            }
        },
        Cmd::EchoServer { addr } => match serve(addr) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                println!("error={:?} {e}", e.kind());
                ExitCode::FAILURE
            }
        },
    }
}

/// A deterministic payload, so corruption anywhere shows up as a mismatch.
fn pattern(n: usize) -> Vec<u8> {
    (0..n)
        .map(|i| (i.wrapping_mul(31) ^ (i >> 8)) as u8)
        .collect()
}

fn connect(addr: SocketAddr, send: usize) -> std::io::Result<String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(20)))?;
    let local = s.local_addr()?;
    let peer = s.peer_addr()?;
    let data = pattern(send);
    let writer = {
        let mut w = s.try_clone()?;
        std::thread::spawn(move || -> std::io::Result<()> {
            w.write_all(&data)?;
            w.shutdown(Shutdown::Write)
        })
    };
    let mut got = Vec::with_capacity(send);
    s.read_to_end(&mut got)?;
    writer
        .join()
        .map_err(|_| std::io::Error::other("writer panicked"))??;
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

fn serve(addr: SocketAddr) -> std::io::Result<()> {
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
            let n = std::io::copy(&mut r, &mut s).unwrap_or(0);
            let _ = s.shutdown(Shutdown::Write);
            println!("closed peer={peer} bytes={n}");
        });
    }
    Ok(())
}
