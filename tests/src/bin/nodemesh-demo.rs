//! `cargo xtask demo`: nodemesh's main job on the embedded default, step by step.
//!
//! One network namespace is the node; cgroups under a fresh root are its pods. The real daemon
//! attaches the real kernel hooks, an enrolled pod's connection is captured in the kernel and
//! carried by the proxy, a pod that is not enrolled goes direct, and on exit nothing stays
//! attached. Everything is removed at the end, also on failure.

use std::{process::Command, time::Duration};

use nodemesh_tests::{
    require_root,
    scenario::{ECHO_PORT, NODE_IP, OUTBOUND_PORT, Scenario},
};

fn step(n: u32, what: &str) {
    println!("\n=== {n}. {what}");
}

fn bpftool(args: &[&str]) -> String {
    match Command::new("bpftool").args(args).output() {
        Ok(o) => String::from_utf8_lossy(&o.stdout).into_owned(),
        Err(e) => format!("(bpftool unavailable: {e}; `cargo xtask setup` installs it)"),
    }
}

fn main() {
    require_root("nodemesh-demo");
    step(
        1,
        "build the node: a network namespace, a pod cgroup tree, an echo server, the daemon",
    );
    let mut s = Scenario::start("demo", false);
    println!(
        "node namespace {} with {NODE_IP}; cgroup root {}",
        s.ns.name(),
        s.cgroups.path().display()
    );
    println!("enrolled pod cgroup: {}", s.client_pod.display());
    println!("not enrolled:        {}", s.stranger_pod.display());

    step(
        2,
        "the daemon's kernel hooks, attached to the cgroup root (bpftool cgroup show)",
    );
    print!(
        "{}",
        bpftool(&["cgroup", "show", &s.cgroups.path().display().to_string()])
    );

    let echo = format!("{NODE_IP}:{ECHO_PORT}");
    step(
        3,
        &format!("the enrolled pod connects to {echo} and sends 256 KiB"),
    );
    let (ok, out) = s.connect_from(&s.client_pod.clone(), &echo, 256 * 1024);
    println!("client: {out}");
    let line = s
        .daemon
        .wait_for("captured connection", Duration::from_secs(5));
    println!("daemon: {}", line.trim());
    assert!(
        ok && out.contains("echo=ok"),
        "the meshed connection failed: {out}"
    );
    println!(
        "→ the kernel redirected it to the proxy on :{OUTBOUND_PORT}; getpeername() still shows {echo}"
    );

    step(4, "a pod that is not enrolled connects to the same server");
    let (ok, out) = s.connect_from(&s.stranger_pod.clone(), &echo, 1024);
    println!("client: {out}");
    assert!(
        ok && out.contains("echo=ok"),
        "the direct connection failed: {out}"
    );
    let local = out
        .split_whitespace()
        .next()
        .unwrap_or("")
        .trim_start_matches("local=");
    let seen = s
        .echo
        .wait_for(&format!("accepted peer={local}"), Duration::from_secs(5));
    println!("server: {seen}");
    println!("→ untouched: the server saw the client's own address, not the proxy's");

    step(
        5,
        "bad input: a connection straight to the outbound port (no kernel record)",
    );
    let (_, out) = s.connect_from(
        &s.stranger_pod.clone(),
        &format!("{NODE_IP}:{OUTBOUND_PORT}"),
        16,
    );
    println!("client: {out}");
    let line = s
        .daemon
        .wait_for("no capture record", Duration::from_secs(5));
    println!("daemon: {}", line.trim());

    step(6, "stop the daemon: counters, then a clean detach");
    let st = s.daemon.terminate(Duration::from_secs(10));
    for l in s.daemon.lines() {
        if l.contains("kernel counters") || l.contains("metric ") || l.contains("detached") {
            println!("daemon: {}", l.trim());
        }
    }
    assert!(st.success(), "daemon exited with {st}");
    std::thread::sleep(Duration::from_millis(200));
    let left = bpftool(&["cgroup", "show", &s.cgroups.path().display().to_string()]);
    let progs: Vec<String> = bpftool(&["prog", "show"])
        .lines()
        .filter(|l| l.contains("nm_"))
        .map(str::to_string)
        .collect();
    println!(
        "bpftool cgroup show after exit: {}",
        if left.trim().is_empty() {
            "(nothing attached)"
        } else {
            left.trim()
        }
    );
    println!(
        "nm_* programs still loaded: {}",
        if progs.is_empty() {
            "none".into()
        } else {
            progs.join("\n")
        }
    );
    assert!(
        left.trim().is_empty() && progs.is_empty(),
        "programs left behind"
    );
    println!("\ndemo complete: namespace and cgroups are removed now.");
}
