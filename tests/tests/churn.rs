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
/// socket closes — a normal close and a refused connection alike — so after 200 000 connections
/// from one pod the map holds only live connections' records (before, its 65 536 slots wrapped
/// and a live connection's record could be evicted), and another pod's connection held open
/// through the churn keeps its record: its getpeername() still names the service it dialled.
#[test]
fn capture_records_are_freed_with_their_sockets() {
    require_root("capture_records_freed");
    let pods = [
        PodSpec::meshed("client", 0, "client"),
        PodSpec::meshed("churner", 0, "churner"),
        PodSpec::meshed("local", 0, "local"),
        PodSpec::meshed("server", 1, "echo"),
    ];
    let services = [
        ServiceSpec::new("echo", "10.96.0.10", 80, 7000, "echo"),
        ServiceSpec::new("local", "10.96.0.11", 80, 7000, "local"),
    ];
    let mut t = Topology::build("cr", 2, &pods, &services);
    t.start(DaemonOpts::default());
    t.serve("server", "echo-server", 7000);
    t.serve("local", "echo-server", 7000);
    // Closed connections wait in TIME_WAIT on the side that closed first: the churner's, and
    // the proxy's toward the pod. The churner may reuse such ports after a second (in its test
    // namespace only: one pod making 200 000 connections in a minute is the point here); the
    // proxy needs no such help, its mesh source block has 16 addresses.
    nodemesh_tests::sh(
        "ip",
        &[
            "netns",
            "exec",
            t.pod("churner").ns.name(),
            "sysctl",
            "-qw",
            "net.ipv4.tcp_tw_reuse=1",
        ],
    );
    let counter =
        |t: &Topology, e: &str| t.metric(0, "nodemesh_ebpf_events_total", &[("event", e)]);
    let records = |t: &Topology| {
        t.metric(
            0,
            "nodemesh_ebpf_map_entries",
            &[("map", "NM_ORIG_BY_COOKIE")],
        )
    };
    // The client holds one connection open throughout, a piece every 200 ms, saying what
    // getpeername() answers after each.
    let mut held = t.connect_in_background(
        "client",
        VIP,
        &[
            "--send",
            "1000000",
            "--piece-bytes",
            "100",
            "--pace-ms",
            "200",
            "--report-peer",
        ],
    );
    held.wait_for(&format!("peer_now={VIP}"), Duration::from_secs(5));
    std::thread::sleep(Duration::from_millis(1200));
    let (freed_before, base) = (counter(&t, "record_freed"), records(&t));
    println!("before the churn: {base} record(s), {freed_before} freed so far");
    assert!(base >= 1, "the held connection's record is counted");
    // 200 000 connections from the churner: four processes of 50 000, one connection after
    // the other each, to a service whose endpoint is on this node.
    let started = Instant::now();
    let churn: Vec<_> = (0..4)
        .map(|_| {
            t.connect_in_background(
                "churner",
                "10.96.0.11:80",
                &["--send", "10", "--repeat", "50000"],
            )
        })
        .collect();
    for mut c in churn {
        let status = c
            .wait_exit(Duration::from_secs(900))
            .expect("a churn process ends within 15 minutes");
        let out = c.output();
        assert!(status.success() && out.contains("repeated=50000"), "{out}");
    }
    println!(
        "200 000 connections in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    // A refused one: a port nothing listens on, through the mesh.
    let (_, refused) = t.connect(
        "churner",
        &format!("{}:7999", t.pod("server").ip),
        &["--send", "1"],
    );
    println!("a refused connection: {refused}");
    let start = Instant::now();
    let (freed, left) = loop {
        let (freed, left) = (counter(&t, "record_freed"), records(&t));
        if (freed >= freed_before + 200_001 && left <= base)
            || start.elapsed() > Duration::from_secs(10)
        {
            break (freed, left);
        }
        std::thread::sleep(Duration::from_millis(250));
    };
    println!(
        "after 200 001 more: {left} record(s), {} freed",
        freed - freed_before
    );
    assert!(
        freed - freed_before >= 200_001,
        "every closed connection's record is freed: {}",
        freed - freed_before
    );
    assert_eq!(
        left, base,
        "the map holds the live connection's record and no closed one's"
    );
    assert_eq!(counter(&t, "close_watch_failed"), 0);
    // The held connection's getpeername() after the churn: still the service, not the proxy.
    let n = held.lines().len();
    let start = Instant::now();
    let now = loop {
        let lines = held.lines();
        if let Some(l) = lines[n..].iter().find(|l| l.starts_with("peer_now=")) {
            break l.clone();
        }
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "the held connection is gone: {}",
            held.output()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    println!("held connection after the churn: {now}");
    assert_eq!(now, format!("peer_now={VIP}"), "getpeername() unchanged");
}

/// Issue 16's port cliff: every connection the proxy makes to a local pod leaves from its mesh
/// source, and each closed one holds its (source, port, pod, port) tuple in TIME_WAIT for 60 s,
/// so one source address allows about 28 000 / 60 ≈ 470 new connections a second to one pod
/// port. With a block of 16 (the topology's `10.210.1.240/28`) that is 16 times as many: four
/// client pods make 2000 new connections a second to one pod port for 18 s (36 000, more than
/// one address's whole port range), and every one succeeds.
#[test]
fn new_connections_to_one_pod_port_sustain_2000_a_second() {
    require_root("conn_rate_one_port");
    const CLIENTS: usize = 4;
    const SECS: u32 = 18;
    const RATE: u32 = 2000;
    let names: Vec<String> = (1..=CLIENTS).map(|i| format!("client-{i}")).collect();
    let mut pods: Vec<PodSpec> = names
        .iter()
        .map(|n| PodSpec::meshed(n, 0, "client"))
        .collect();
    pods.push(PodSpec::meshed("server", 0, "echo"));
    let mut t = Topology::build("cw", 1, &pods, &[]);
    t.start(DaemonOpts::default());
    t.serve("server", "quiet-echo-server", 7000);
    let server = format!("{}:7000", t.pod("server").ip);
    let node_ns = t.nodes[0].ns.name().to_string();
    let one_address = ephemeral_ports(&node_ns);
    let per_client = (RATE / CLIENTS as u32).to_string();
    let secs = SECS.to_string();
    let started = Instant::now();
    let runs: Vec<_> = names
        .iter()
        .map(|n| {
            t.app_in_background(
                n,
                &["conn-rate", &server, "--rate", &per_client, "--secs", &secs],
            )
        })
        .collect();
    let (mut ok, mut rate) = (0u64, 0f64);
    for mut r in runs {
        let (_, field) = paced_result(&mut r);
        ok += field("ok").parse::<u64>().expect("ok=N");
        rate += field("started_per_s")
            .parse::<f64>()
            .expect("started_per_s=R");
    }
    println!(
        "{ok} connections in {:.1} s, started at {rate:.0}/s",
        started.elapsed().as_secs_f64()
    );
    assert_eq!(ok, u64::from(RATE * SECS));
    // Where they wait now: the proxy's closed connections to the pod, in TIME_WAIT.
    let waiting = nodemesh_tests::sh(
        "ip",
        &[
            "netns",
            "exec",
            &node_ns,
            "ss",
            "-Htn",
            "state",
            "time-wait",
            "dst",
            &server,
        ],
    );
    let mut by_source: BTreeMap<String, u32> = BTreeMap::new();
    for line in waiting.lines() {
        if let Some(src) = line
            .split_whitespace()
            .find_map(|w| {
                w.rsplit_once(':')
                    .filter(|(ip, _)| ip.starts_with("10.210.1."))
            })
            .map(|(ip, _)| ip.to_string())
        {
            *by_source.entry(src).or_default() += 1;
        }
    }
    let held: u32 = by_source.values().sum();
    println!(
        "TIME_WAIT toward {server}: {held} from {} sources: {by_source:?}",
        by_source.len()
    );
    assert!(
        held > one_address,
        "more connections wait toward one pod port ({held}) than one source address has ports \
         ({one_address}): only the block makes room for them"
    );
    assert_eq!(by_source.len(), 16, "every address of the block is used");
    assert!(
        by_source
            .keys()
            .all(|ip| nodemesh_tests::topology::in_mesh_source(1, ip.parse().expect("an address"))),
        "{by_source:?}"
    );
    // The pace: the clients started (nearly) what they were asked to. On this debug build the
    // two cores are saturated at about 1850-2000 a second (the daemon, four clients and the
    // server share them), so this allows 20 %; the cliff itself would show above, as failed or
    // stalled connections and fewer in TIME_WAIT than one address's ports.
    assert!(
        rate >= f64::from(RATE) * 0.8,
        "the clients started {rate:.0} connections a second, asked for {RATE}"
    );
}

/// The same limit on the client's side: a captured `connect()` is rewritten to the node's
/// outbound listener, so without more ports every new connection of one pod, to any destination,
/// would share one (pod, proxy port) pair and its TIME_WAIT (one pod paced at 1000/s fell to
/// 479/s, worst second 62). The kernel sends each destination to one of 16 further ports by its
/// hash: one pod makes 1000 new connections a second to 8 destinations for 35 s (35 000, more
/// than one pair's whole port range), and keeps the pace.
#[test]
fn one_pod_keeps_its_pace_to_many_destinations_past_one_ports_worth() {
    require_root("conn_rate_many_destinations");
    const SECS: u32 = 35;
    const RATE: u32 = 1000;
    let pods = [
        PodSpec::meshed("client", 0, "client"),
        PodSpec::meshed("server", 0, "echo"),
    ];
    let mut t = Topology::build("cm", 1, &pods, &[]);
    t.start(DaemonOpts::default());
    let ports: Vec<u16> = (7000..7008).collect();
    for p in &ports {
        t.serve_with("server", "quiet-echo-server", *p, &["--announce"]);
    }
    let server_ip = t.pod("server").ip.clone();
    let targets: Vec<String> = ports.iter().map(|p| format!("{server_ip}:{p}")).collect();
    let client_ns = t.pod("client").ns.name().to_string();
    let one_pair = ephemeral_ports(&client_ns);
    let (rate, secs) = (RATE.to_string(), SECS.to_string());
    let mut args = vec!["conn-rate"];
    args.extend(targets.iter().map(String::as_str));
    // Each server says which port it is: a connection delivered to the wrong destination (two
    // capture records mixed up) fails.
    args.extend(["--rate", &rate, "--secs", &secs, "--announced"]);
    let mut run = t.app_in_background("client", &args);
    let (out, field) = paced_result(&mut run);
    assert_eq!(field("ok"), (RATE * SECS).to_string(), "{out}");
    // The client's closed connections wait in its own namespace, toward the proxy's ports.
    let waiting = nodemesh_tests::sh(
        "ip",
        &[
            "netns",
            "exec",
            &client_ns,
            "ss",
            "-Htn",
            "state",
            "time-wait",
        ],
    );
    let mut by_port: BTreeMap<u16, u32> = BTreeMap::new();
    for line in waiting.lines() {
        if let Some(port) = line
            .split_whitespace()
            .filter_map(|w| w.rsplit_once(':'))
            .nth(1)
            .and_then(|(_, p)| p.parse::<u16>().ok())
        {
            *by_port.entry(port).or_default() += 1;
        }
    }
    let held: u32 = by_port.values().sum();
    println!("TIME_WAIT in the client: {held} toward proxy ports {by_port:?}");
    assert!(
        held > one_pair,
        "more of the client's connections wait ({held}) than one (pod, proxy port) pair has \
         ports ({one_pair}): only the further ports make room for them"
    );
    assert!(
        by_port.len() >= 4 && by_port.keys().all(|p| (15100..15116).contains(p)),
        "the 8 destinations spread over the further ports: {by_port:?}"
    );
    let started: f64 = field("started_per_s").parse().expect("started_per_s=R");
    let worst: u32 = field("worst_second").parse().expect("worst_second=N");
    assert!(
        started >= f64::from(RATE) * 0.85 && worst >= RATE / 2,
        "the client kept its pace: {started:.0}/s started, worst second {worst} (asked {RATE}/s)"
    );
}

/// How many ephemeral ports a network namespace's `connect()`s pick from.
fn ephemeral_ports(ns: &str) -> u32 {
    let range = nodemesh_tests::sh(
        "ip",
        &[
            "netns",
            "exec",
            ns,
            "sysctl",
            "-n",
            "net.ipv4.ip_local_port_range",
        ],
    );
    let b: Vec<u32> = range
        .split_whitespace()
        .map(|p| p.parse().expect("a port"))
        .collect();
    b[1] - b[0] + 1
}

/// Waits for a `mesh-app conn-rate` run, which must succeed with no failed connection; returns
/// its output and a reader of its `key=value` fields.
fn paced_result(
    run: &mut nodemesh_tests::process::Proc,
) -> (String, impl Fn(&str) -> String + use<>) {
    let status = run
        .wait_exit(Duration::from_secs(120))
        .expect("a paced client ends within two minutes");
    let out = run.output();
    println!("{out}");
    assert!(status.success(), "{out}");
    let text = out.clone();
    let field = move |k: &str| {
        text.split_whitespace()
            .find_map(|w| w.strip_prefix(&format!("{k}=")))
            .unwrap_or_else(|| panic!("no {k}= in {text}"))
            .to_string()
    };
    assert_eq!(field("errors"), "0", "every connection succeeds: {out}");
    (out, field)
}
