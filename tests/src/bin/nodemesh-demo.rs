//! `cargo xtask demo`: nodemesh's main job on the embedded default, step by step.
//!
//! Two network namespaces are the nodes, more namespaces and cgroups are their pods, a mesh file
//! describes them, and the real daemon runs on each node with the real kernel hooks. A client pod
//! on node 1 calls a server pod on node 2 through a service VIP: the kernel captures the
//! connection, node 1's proxy carries it over HBONE to node 2's proxy, and the bytes arrive
//! intact. Everything is removed at the end, also on failure.

use std::{process::Command, time::Duration};

use nodemesh_tests::{
    require_root,
    topology::{DaemonOpts, PodSpec, ServiceSpec, Topology, sample},
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

fn edge_counters(t: &Topology, node: usize, reporter: &str) -> String {
    let m = t.scrape(node);
    let l = [
        ("reporter", reporter),
        ("source_workload", "client"),
        ("destination_workload", "server"),
    ];
    format!(
        "{reporter}: connections opened={} closed={} bytes from client={} to client={}",
        sample(&m, "nodemesh_tcp_connections_opened_total", &l),
        sample(&m, "nodemesh_tcp_connections_closed_total", &l),
        sample(&m, "nodemesh_tcp_sent_bytes_total", &l),
        sample(&m, "nodemesh_tcp_received_bytes_total", &l),
    )
}

fn main() {
    require_root("nodemesh-demo");
    step(
        1,
        "build two nodes and their pods (network namespaces, veth, routes, cgroups) and a mesh file",
    );
    let pods = [
        PodSpec::meshed("client", 0, "client"),
        PodSpec::plain("outsider", 0),
        PodSpec::meshed("server", 1, "echo"),
    ];
    let services = [ServiceSpec::new("echo", "10.96.0.10", 80, 7000, "echo")];
    let mut t = Topology::build("demo", 2, &pods, &services);
    print!(
        "{}",
        std::fs::read_to_string(&t.mesh_file).unwrap_or_default()
    );

    step(
        2,
        "start the CA, then the daemon on each node; each gets SVIDs for its own pods only",
    );
    t.start(DaemonOpts::default());
    if let Some(ca) = t.ca.as_mut() {
        let l = ca.wait_for("CA ready", Duration::from_secs(1));
        println!("ca: {}", l.trim());
    }
    for i in 0..2 {
        let ready = t.daemon(i).wait_for("ready", Duration::from_secs(1));
        println!("{}: {}", t.nodes[i].name, ready.trim());
        let svid = t.daemon(i).wait_for("SVID in hand", Duration::from_secs(5));
        println!("{}: {}", t.nodes[i].name, svid.trim());
    }
    println!(
        "node-1's hooks on its pods' cgroup root (bpftool cgroup show):\n{}",
        bpftool(&[
            "cgroup",
            "show",
            &t.node_cgroup_root(0).display().to_string()
        ])
    );

    let srv = t.serve("server", "echo-server", 7000);
    step(
        3,
        "client pod (node-1) → service VIP 10.96.0.10:80 → server pod (node-2), 1 MiB each way",
    );
    let (ok, out) = t.connect(
        "client",
        "10.96.0.10:80",
        &["--send", &(1 << 20).to_string()],
    );
    println!("client: {out}");
    let line = t
        .daemon(0)
        .wait_for("captured connection", Duration::from_secs(5));
    println!("node-1: {}", line.trim());
    let inb = t
        .daemon(1)
        .wait_for("inbound tunnel", Duration::from_secs(5));
    println!("node-2: {}", inb.trim());
    let seen = t.servers[srv].wait_for("accepted peer=", Duration::from_secs(5));
    println!("server: {seen}  (an address of node-2's mesh source block)");
    assert!(
        ok && out.contains("echo=ok"),
        "the meshed connection failed: {out}"
    );
    println!("→ bytes intact; the app still sees the VIP as its peer (getpeername)");

    println!(
        "→ between the nodes: TLS 1.3, client-sa's SVID presented by node-1, server-sa's by node-2"
    );

    step(
        4,
        "both daemons' counters for the client → server edge (/metrics), with the proven identities",
    );
    println!("node-1 {}", edge_counters(&t, 0, "outbound"));
    println!("node-2 {}", edge_counters(&t, 1, "inbound"));
    let m = t.scrape(1);
    for l in m.lines().filter(|l| {
        l.starts_with("nodemesh_tcp_connections_opened_total{")
            || l.starts_with("nodemesh_tls_handshakes_total{")
            || l.starts_with("nodemesh_svid_expiry_timestamp_seconds{")
    }) {
        println!("node-2 {l}");
    }

    println!("\nmeshctl edges (from node-1, reading both nodes' /metrics):");
    let edges = Command::new("nsenter")
        .arg(format!("--net={}", t.nodes[0].ns.path().display()))
        .arg(nodemesh_tests::bin("meshctl"))
        .args(["edges", "--node", "10.203.0.1:15020,10.203.0.2:15020"])
        .output();
    match edges {
        Ok(o) => print!("{}", String::from_utf8_lossy(&o.stdout)),
        Err(e) => println!("(meshctl unavailable: {e})"),
    }

    step(5, "a pod outside the mesh calls the server directly");
    let server = format!("{}:7000", t.pod("server").ip);
    let (ok, out) = t.connect("outsider", &server, &["--send", "1024"]);
    println!("outsider: {out}");
    assert!(
        ok && out.contains("echo=ok"),
        "direct connection failed: {out}"
    );
    println!("→ untouched: the server saw the outsider's own address");

    step(
        6,
        "stop the daemons (SIGTERM: drain, stay fail-closed), then `mesh-daemon uninstall`",
    );
    for i in 0..2 {
        let st = t.daemon(i).terminate(Duration::from_secs(40));
        for l in t.daemon(i).lines() {
            if l.contains("kernel counters") || l.contains("drained") || l.contains("fail-closed") {
                println!("{}: {}", t.nodes[i].name, l.trim());
            }
        }
        assert!(st.success(), "daemon exited with {st}");
    }
    let (ok, out) = t.connect("client", "10.96.0.10:80", &["--send", "1024"]);
    println!("client, no daemon running: {out}");
    assert!(
        !ok && out.contains("ConnectionRefused"),
        "with the daemons stopped a meshed call must be refused, not sent direct: {out}"
    );
    println!("→ refused, not sent in plaintext: the hooks stay pinned while no daemon serves");
    // What this demo put in the kernel (by id: a daemon of the operator's own beside it is not
    // counted), then `mesh-daemon uninstall` takes it all out.
    let ours = t.footprint();
    let root = t.pin_dir(0).parent().expect("pin root").to_path_buf();
    print!("{}", nodemesh_tests::uninstall(&root));
    std::thread::sleep(Duration::from_millis(300));
    let left = ours.still_loaded();
    println!(
        "of the demo's {} programs and {} maps, still loaded: {}",
        ours.progs.len(),
        ours.maps.len(),
        if left.is_empty() {
            "none".to_string()
        } else {
            format!("programs {:?}, maps {:?}", left.progs, left.maps)
        }
    );
    assert!(
        !ours.progs.is_empty() && left.is_empty(),
        "programs left behind"
    );
    let (ok, out) = t.connect("client", &server, &["--send", "1024"]);
    println!("client after uninstall: {out}");
    assert!(
        ok && out.contains("echo=ok"),
        "uninstalled: direct again: {out}"
    );
    println!("\ndemo complete: namespaces, cgroups and pins are removed now.");
}
