//! Privileged: workloads come and go through the mesh file, and the daemons' tables follow.
//! 200 workloads (100 on the client's node, enrolled with their own cgroups and certificates;
//! 100 on the other node behind a service the client calls) are added, used, and removed; every
//! table each daemon keeps — workload ids, the kernel's enrollment map, SVIDs and their renewal
//! workers, balancer statistics, pooled HBONE connections, TLS client configurations — grows
//! with them and returns to its starting size. Connection churn leaves the capture records at
//! the number of live connections.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    time::{Duration, Instant},
};

use nodemesh_tests::{
    require_root,
    topology::{DaemonOpts, PodSpec, ServiceSpec, Topology},
};

const VIP: &str = "10.96.0.10:80";
const CHURN_VIP: &str = "10.96.0.20:80";
const PER_NODE: usize = 100;
const TABLES: [&str; 6] = [
    "workload_ids",
    "svids",
    "identity_workers",
    "balancer_endpoints",
    "hbone_connections",
    "tls_client_configs",
];

/// Node `i`'s table sizes, with the kernel's enrollment map.
fn sizes(t: &Topology, i: usize) -> BTreeMap<&'static str, u64> {
    let text = t.scrape(i);
    let mut m: BTreeMap<&'static str, u64> = TABLES
        .iter()
        .map(|table| {
            (
                *table,
                nodemesh_tests::topology::sample(
                    &text,
                    "nodemesh_state_entries",
                    &[("table", table)],
                ),
            )
        })
        .collect();
    m.insert(
        "NM_ENROLLED",
        nodemesh_tests::topology::sample(
            &text,
            "nodemesh_ebpf_map_entries",
            &[("map", "NM_ENROLLED")],
        ),
    );
    m
}

/// Waits (up to `limit`) until `ok` holds for node `i`'s sizes; returns the last sizes.
fn wait_sizes(
    t: &Topology,
    i: usize,
    limit: Duration,
    ok: impl Fn(&BTreeMap<&'static str, u64>) -> bool,
) -> BTreeMap<&'static str, u64> {
    let start = Instant::now();
    loop {
        let s = sizes(t, i);
        if ok(&s) || start.elapsed() > limit {
            return s;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

#[test]
fn workloads_added_and_removed_leave_the_tables_at_their_starting_sizes() {
    require_root("churn");
    let pods = [
        PodSpec::meshed("client", 0, "client"),
        PodSpec::meshed("server", 1, "echo"),
    ];
    let services = [ServiceSpec::new("echo", "10.96.0.10", 80, 7000, "echo")];
    let mut t = Topology::build("ch", 2, &pods, &services);
    t.start(DaemonOpts::default());
    t.serve("server", "echo-server", 7000);
    let (ok, out) = t.connect("client", VIP, &["--send", "1000"]);
    assert!(ok && out.contains("echo=ok"), "{out}");
    // The tables as they stand with the base mesh in use (published once a second).
    std::thread::sleep(Duration::from_millis(1500));
    let base = [sizes(&t, 0), sizes(&t, 1)];
    println!(
        "starting sizes: node-1 {:?}\n                node-2 {:?}",
        base[0], base[1]
    );
    assert_eq!(base[0]["workload_ids"], 2, "{:?}", base[0]);
    assert_eq!(base[0]["NM_ENROLLED"], 1, "{:?}", base[0]);
    assert!(base[0]["hbone_connections"] >= 1 && base[0]["balancer_endpoints"] >= 1);

    // 200 more workloads: 100 on node 1 with real cgroups, 100 on node 2 behind a service.
    let good = std::fs::read_to_string(&t.mesh_file).expect("mesh file");
    let (n1, n2) = (t.nodes[0].name.clone(), t.nodes[1].name.clone());
    let mut workloads = String::new();
    for k in 0..PER_NODE {
        let cg = t.cgroups.child(&format!("{n1}/churn-{k}"));
        let _ = write!(
            workloads,
            "  - {{ name: local-{k}, namespace: churn, serviceAccount: local-{k}, node: {n1}, \
             ip: 10.210.1.{}, cgroup: {} }}\n\
             \x20 - {{ name: remote-{k}, namespace: churn, serviceAccount: remote-{k}, node: {n2}, \
             ip: 10.210.2.{}, cgroup: churn-{k}, labels: {{ app: churn }} }}\n",
            100 + k,
            cg.display(),
            100 + k
        );
    }
    let churned = good.replacen("services:\n", &format!("{workloads}services:\n"), 1)
        + "  - { name: churn, namespace: churn, vip: 10.96.0.20, ports: [{ port: 80, targetPort: 8080 }], selector: { app: churn } }\n";
    t.rewrite_mesh_file(&churned);
    let limit = Duration::from_secs(60);
    let grown = wait_sizes(&t, 0, limit, |s| {
        s["workload_ids"] == base[0]["workload_ids"] + 2 * PER_NODE as u64
            && s["NM_ENROLLED"] == base[0]["NM_ENROLLED"] + PER_NODE as u64
            && s["svids"] == base[0]["svids"] + PER_NODE as u64
    });
    assert_eq!(
        grown["svids"],
        base[0]["svids"] + PER_NODE as u64,
        "node 1 enrolls its 100 new pods and holds their certificates: {grown:?}"
    );
    assert_eq!(
        grown["NM_ENROLLED"],
        base[0]["NM_ENROLLED"] + PER_NODE as u64
    );
    let far = wait_sizes(&t, 1, limit, |s| {
        s["svids"] == base[1]["svids"] + PER_NODE as u64
    });
    assert_eq!(far["svids"], base[1]["svids"] + PER_NODE as u64, "{far:?}");
    // The client calls the churned service: each call picks an endpoint (balancer statistics)
    // and opens a tunnel to its identity (a pooled connection); the endpoint pods do not exist,
    // so node 2 refuses each tunnel and the client is reset.
    let mut calls: Vec<_> = (0..24)
        .map(|_| t.connect_in_background("client", CHURN_VIP, &["--send", "100"]))
        .collect();
    for c in &mut calls {
        let st = c
            .wait_exit(Duration::from_secs(20))
            .expect("each call ends");
        assert!(!st.success(), "no such pod answers: {}", c.output());
    }
    let used = wait_sizes(&t, 0, Duration::from_secs(3), |s| {
        s["balancer_endpoints"] > base[0]["balancer_endpoints"]
            && s["hbone_connections"] > base[0]["hbone_connections"]
    });
    println!(
        "with 200 more workloads in use: node-1 {used:?}\n                               node-2 {far:?}"
    );
    assert!(
        used["balancer_endpoints"] > base[0]["balancer_endpoints"]
            && used["hbone_connections"] > base[0]["hbone_connections"],
        "the calls grew the balancer and the pool: {used:?}"
    );

    // Removed again: every table returns to its starting size.
    t.rewrite_mesh_file(&good);
    for (i, start) in base.iter().enumerate() {
        let after = wait_sizes(&t, i, Duration::from_secs(30), |s| s == start);
        println!("after removing them: node-{} {after:?}", i + 1);
        assert_eq!(
            &after,
            start,
            "node {}'s tables are back at their starting sizes",
            i + 1
        );
    }
    let (ok, out) = t.connect("client", VIP, &["--send", "1000"]);
    assert!(
        ok && out.contains("echo=ok"),
        "the base mesh still serves: {out}"
    );
}

/// Connection churn: each captured connection's record (`NM_ORIG_BY_COOKIE`) is freed when its
/// socket closes — a normal close and a refused connection alike — so the map holds only live
/// connections' records, and a connection held open through the churn keeps its record (its
/// getpeername() still names the service it dialled, not the proxy).
#[test]
fn capture_records_are_freed_with_their_sockets() {
    require_root("capture_records_freed");
    let pods = [
        PodSpec::meshed("client", 0, "client"),
        PodSpec::meshed("server", 1, "echo"),
    ];
    let services = [ServiceSpec::new("echo", "10.96.0.10", 80, 7000, "echo")];
    let mut t = Topology::build("cr", 2, &pods, &services);
    t.start(DaemonOpts::default());
    t.serve("server", "echo-server", 7000);
    let counter =
        |t: &Topology, e: &str| t.metric(0, "nodemesh_ebpf_events_total", &[("event", e)]);
    let records = |t: &Topology| {
        t.metric(
            0,
            "nodemesh_ebpf_map_entries",
            &[("map", "NM_ORIG_BY_COOKIE")],
        )
    };
    // One connection held open throughout: 3000 bytes in 30 pieces 500 ms apart (it stays
    // established for 15 s; a half-closed one would leave TCP_CLOSE, and its record, once the
    // server's FIN came back).
    let mut held = t.connect_in_background(
        "client",
        VIP,
        &["--send", "3000", "--piece-bytes", "100", "--pace-ms", "500"],
    );
    let started = Instant::now();
    std::thread::sleep(Duration::from_millis(1500));
    let (freed_before, base) = (counter(&t, "record_freed"), records(&t));
    println!("before the churn: {base} record(s), {freed_before} freed so far");
    assert!(
        base >= 1,
        "the held connection's record is counted; it said: {}",
        held.output()
    );
    // 2000 connections, one after the other, each closed at once.
    let (ok, out) = t.connect("client", VIP, &["--send", "10", "--repeat", "2000"]);
    assert!(ok && out.contains("repeated=2000"), "{out}");
    // A refused one: a port nothing listens on, through the mesh.
    let (_, refused) = t.connect(
        "client",
        &format!("{}:7999", t.pod("server").ip),
        &["--send", "1"],
    );
    println!("a refused connection: {refused}");
    let start = Instant::now();
    let (freed, left) = loop {
        let (freed, left) = (counter(&t, "record_freed"), records(&t));
        if (freed >= freed_before + 2001 && left <= base)
            || start.elapsed() > Duration::from_secs(5)
        {
            break (freed, left);
        }
        std::thread::sleep(Duration::from_millis(250));
    };
    println!(
        "after 2001 more: {left} record(s), {} freed",
        freed - freed_before
    );
    assert!(
        freed - freed_before >= 2001,
        "every closed connection's record is freed: {}",
        freed - freed_before
    );
    assert!(
        started.elapsed() < Duration::from_secs(14),
        "the churn outlasted the held connection; this check needs it open"
    );
    assert_eq!(
        left, base,
        "the map holds the live connection's record and no closed one's"
    );
    assert_eq!(counter(&t, "close_watch_failed"), 0);
    let status = held
        .wait_exit(Duration::from_secs(10))
        .expect("held connection ends");
    let line = held.output();
    println!("held connection: {}", line.trim());
    assert!(
        status.success() && line.contains(&format!("peer={VIP}")) && line.contains("echo=ok"),
        "the held connection kept its record: {line}"
    );
}
