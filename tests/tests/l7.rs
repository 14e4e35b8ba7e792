//! Privileged: L7 in the proxy itself — real HTTP clients (curl, HTTP/1.1 keep-alive and h2c
//! multiplexed on one connection) and real hyper servers in pod namespaces, through the node
//! proxy and, in the second test, through sidecars.
//!
//! Node 1 holds the client; node 2 holds every server, so each endpoint of a service is as far
//! from the client as the others (peak-EWMA then has only the servers' own speed to go by).
//! - `rpc` (3 gRPC endpoints, tonic): one channel's 900 calls spread over all three; unary,
//!   server, client and bidirectional streaming RPCs, and a status in the trailers;
//! - `web` (3 endpoints) and `web-v2` (1, the canary): an HTTPRoute splits `web` 90/10;
//! - `limited` and `rpc-limited`: routes with a local rate limit (429 / RESOURCE_EXHAUSTED), a
//!   bucket per client workload;
//! - `lag` (2 fast endpoints and one 200 ms slower): the slow one gets the smallest share;
//! - `greet` (a server that speaks first, no appProtocol) and `raw` (the same with
//!   `appProtocol: tcp`): the greeting arrives within the detection timeout, and a tcp port is
//!   never detected.

use std::{collections::HashMap, time::Duration};

use nodemesh_tests::{
    require_root,
    topology::{DaemonOpts, PodSpec, ServiceSpec, Topology, sample, wait_sample},
};

const WEB: &str = "10.96.0.20";
const LAG: &str = "10.96.0.22";
const GREET: &str = "10.96.0.23:25";
const RAW: &str = "10.96.0.24:25";
const CHAT: &str = "10.96.0.25:80";
const HALF: &str = "10.96.0.26:80";
const WEB_DIRECT: &str = "10.96.0.28";
const FLAKY: &str = "10.96.0.27:80";
const RPC: &str = "10.96.0.30:80";
const LIMITED: &str = "10.96.0.31";
const RPC_LIMITED: &str = "10.96.0.32:80";
const IDLE: &str = "10.96.0.33";

#[test]
fn node_proxy_routes_and_balances_each_request() {
    require_root("node_proxy_routes_and_balances_each_request");
    l7(false);
}

#[test]
fn sidecars_route_and_balance_each_request_the_same_way() {
    require_root("sidecars_route_and_balance_each_request_the_same_way");
    l7(true);
}

fn pods() -> Vec<PodSpec> {
    let mut p = vec![
        PodSpec::meshed("client", 0, "client"),
        PodSpec::meshed("client2", 0, "client2"),
    ];
    for (name, app) in [
        ("web-1", "web"),
        ("web-2", "web"),
        ("web-3", "web"),
        ("canary", "canary"),
        ("lag-1", "lag"),
        ("lag-2", "lag"),
        ("lag-slow", "lag"),
        ("greeter", "greet"),
        ("chat", "chat"),
        ("half-1", "half"),
        ("half-2", "half"),
        ("half-3", "half"),
        ("half-bad", "half"),
        ("flaky-1", "flaky"),
        ("flaky-2", "flaky"),
        ("flaky-3", "flaky"),
        ("rpc-1", "rpc"),
        ("rpc-2", "rpc"),
        ("rpc-3", "rpc"),
        ("idler", "idle"),
    ] {
        p.push(PodSpec::meshed(name, 1, app));
    }
    p
}

fn services() -> Vec<ServiceSpec> {
    vec![
        ServiceSpec::new("web", WEB, 80, 8080, "web"),
        ServiceSpec::new("web-v2", "10.96.0.21", 80, 8080, "canary"),
        ServiceSpec::new("lag", LAG, 80, 8080, "lag"),
        ServiceSpec::new("greet", "10.96.0.23", 25, 2525, "greet"),
        ServiceSpec::new("raw", "10.96.0.24", 25, 2525, "greet").app_protocol("tcp"),
        ServiceSpec::new("chat", "10.96.0.25", 80, 8080, "chat"),
        ServiceSpec::new("half", "10.96.0.26", 80, 8080, "half"),
        ServiceSpec::new("flaky", "10.96.0.27", 80, 8080, "flaky"),
        // web's pods again, without the canary route (the authorization phase)
        ServiceSpec::new("web-direct", "10.96.0.28", 80, 8080, "web"),
        ServiceSpec::new("rpc", "10.96.0.30", 80, 8080, "rpc"),
        ServiceSpec::new("limited", "10.96.0.31", 80, 8080, "web"),
        ServiceSpec::new("rpc-limited", "10.96.0.32", 80, 8080, "rpc").app_protocol("grpc"),
        ServiceSpec::new("idle", "10.96.0.33", 80, 8080, "idle"),
    ]
}

const SPLIT: &str = "\
httpRoutes:
  - name: canary
    namespace: demo
    spec:
      parentRefs: [{ kind: Service, name: web, port: 80 }]
      rules:
        - backendRefs: [{ name: web, port: 80, weight: 90 }, { name: web-v2, port: 80, weight: 10 }]
  - name: retry-half
    namespace: demo
    spec:
      parentRefs: [{ kind: Service, name: half, port: 80 }]
      rules:
        - backendRefs: [{ name: half, port: 80 }]
          retry: { attempts: 3, codes: [503], backoff: 5ms }
  - name: limit-web
    namespace: demo
    spec:
      parentRefs: [{ kind: Service, name: limited, port: 80 }]
      rules:
        - backendRefs: [{ name: limited, port: 80 }]
    rateLimit: { requestsPerSecond: 2, burst: 5 }
grpcRoutes:
  - name: limit-rpc
    namespace: demo
    spec:
      parentRefs: [{ kind: Service, name: rpc-limited, port: 80 }]
      rules:
        - matches: [{ method: { service: nodemesh.test.Echo, method: Who } }]
          backendRefs: [{ name: rpc-limited, port: 80 }]
    rateLimit: { requestsPerSecond: 2, burst: 5 }
authorizationPolicies:
  - name: no-admin-posts-from-client
    namespace: demo
    selector: { app: web }
    action: DENY
    from: [{ principals: [spiffe://cluster.local/ns/demo/sa/client-sa] }]
    to: [{ methods: [POST], paths: [/admin, /admin/*] }]
";

/// Removes a file when dropped (the broken endpoint's switch).
struct RemoveOnDrop(std::path::PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Runs curl in the client pod; returns how many responses each server gave.
fn curl(t: &Topology, args: &[&str]) -> HashMap<String, u32> {
    t.curl_by_server("client", args)
}

fn l7(sidecar: bool) {
    let pods = pods();
    let services = services();
    let tag = if sidecar { "l7s" } else { "l7n" };
    let mut t = Topology::build(tag, 2, &pods, &services);
    t.start(DaemonOpts {
        sidecar,
        access_log: true,
        ..DaemonOpts::default()
    });
    for (pod, delay) in [
        ("web-1", "0"),
        ("web-2", "0"),
        ("web-3", "0"),
        ("canary", "0"),
        ("lag-1", "0"),
        ("lag-2", "0"),
        ("lag-slow", "200"),
    ] {
        t.serve_with(
            pod,
            "http-server",
            8080,
            &["--name", pod, "--delay-ms", delay],
        );
    }
    t.serve_with("greeter", "greet-server", 2525, &["--name", "greeter"]);
    t.serve_with("chat", "ws-server", 8080, &["--name", "chat"]);
    // closes its idle keep-alive connections after 300 ms, without a word
    t.serve_with(
        "idler",
        "http-server",
        8080,
        &["--name", "idler", "--idle-close-ms", "300"],
    );
    for pod in ["rpc-1", "rpc-2", "rpc-3"] {
        t.serve_with(pod, "grpc-server", 8080, &["--name", pod]);
    }
    for pod in ["half-1", "half-2", "half-3", "flaky-2", "flaky-3"] {
        t.serve_with(pod, "http-server", 8080, &["--name", pod]);
    }
    // half the time 503
    t.serve_with(
        "half-bad",
        "http-server",
        8080,
        &["--name", "half-bad", "--fail-every", "2"],
    );
    // 500 while the file exists
    let broken =
        RemoveOnDrop(std::env::temp_dir().join(format!("nm-{tag}-{}-broken", std::process::id())));
    let broken_path = broken.0.to_string_lossy().to_string();
    t.serve_with(
        "flaky-1",
        "http-server",
        8080,
        &["--name", "flaky-1", "--fail-file", &broken_path],
    );
    // The destination's proxy for `web`'s pods: node 2's daemon, or (sidecars) every web pod's.
    let scrape_dst = |t: &Topology| {
        if sidecar {
            ["web-1", "web-2", "web-3", "canary"]
                .iter()
                .map(|p| t.scrape_pod(p))
                .collect::<Vec<_>>()
                .join("\n")
        } else {
            t.scrape(1)
        }
    };
    // The client's proxy: its node's daemon, or its own sidecar.
    let scrape = |t: &Topology| {
        if sidecar {
            t.scrape_pod("client")
        } else {
            t.scrape(0)
        }
    };

    // 1. A gRPC client (tonic) on one channel — one HTTP/2 connection — makes 900 calls: every
    //    endpoint serves a third (no one-connection imbalance).
    let (_, out) = run(
        &t,
        &["grpc-load", RPC, "--calls", "900", "--concurrency", "8"],
    );
    println!("gRPC, one channel, 900 calls: {out}");
    let by = served_by(&out);
    let metrics = scrape(&t);
    let h2_conns = sample(
        &metrics,
        "nodemesh_protocol_detections_total",
        &[("protocol", "h2")],
    );
    assert_eq!(
        h2_conns, 1,
        "the client must have used one connection\n{metrics}"
    );
    assert!(out.starts_with("ok=900 errors=0 "), "{out}");
    for pod in ["rpc-1", "rpc-2", "rpc-3"] {
        let n = by.get(pod).copied().unwrap_or(0);
        assert!(
            (255..=345).contains(&n),
            "{pod} served {n} of 900 (want 33% ± 5%): {by:?}"
        );
    }
    // Counted when each response ended, with the status from its trailers.
    let ok_calls = [
        ("reporter", "outbound"),
        ("destination_service", "demo/rpc"),
        ("response_code", "200"),
        ("grpc_status", "0"),
        ("classification", "success"),
    ];
    let served = wait_sample(|| scrape(&t), "nodemesh_requests_total", &ok_calls, 900);
    assert_eq!(served, 900, "request metrics count every call\n{metrics}");
    // The JSON access log has a line per call, on both sides.
    let client_log = t.access_log(if sidecar { "client" } else { &t.nodes[0].name });
    let who_lines = || {
        std::fs::read_to_string(&client_log)
            .expect("the client side's access log")
            .lines()
            .filter(|l| l.contains("\"path\":\"/nodemesh.test.Echo/Who\""))
            .map(str::to_string)
            .collect::<Vec<String>>()
    };
    // written by the log's own thread, a moment after the request was counted
    let waited = std::time::Instant::now();
    let mut calls = who_lines();
    while calls.len() < 900 && waited.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(100));
        calls = who_lines();
    }
    println!(
        "access log: {} calls, e.g. {}",
        calls.len(),
        calls.first().map_or("", String::as_str)
    );
    assert_eq!(calls.len(), 900, "one access-log line per call");
    let line: serde_json::Value = serde_json::from_str(&calls[0]).expect("JSON lines");
    assert_eq!(line["event"], "request");
    assert_eq!(line["method"], "POST");
    assert_eq!(line["grpc_status"], 0);
    assert_eq!(line["source_workload"], "client");
    assert_eq!(line["mtls"], true, "it crossed to node 2 inside HBONE");
    assert!(
        line["latency_ms"].as_f64().is_some_and(|ms| ms > 0.0),
        "{line}"
    );

    // 1a. A pod that closes idle keep-alive connections (as most servers do after a while): the
    //     proxies' pooled connection to it ends with it, and the next request is served, not
    //     answered 502 by a tunnel whose pod connection is gone.
    for i in 0..3 {
        assert_eq!(
            curl_status(&t, "client", "GET", &format!("http://{IDLE}/idle{i}")),
            "200",
            "request {i} after the pod closed its idle connection"
        );
        std::thread::sleep(Duration::from_millis(800));
    }

    // 1b. /tap shows each request when its response ends: method, authority, path, status,
    //     latency, both ends.
    let tap_ns = if sidecar {
        t.pod("client").ns.path()
    } else {
        t.nodes[0].ns.path()
    };
    let mut tap = {
        let mut c = std::process::Command::new("nsenter");
        c.arg(format!("--net={}", tap_ns.display()))
            .arg(nodemesh_tests::bin("meshctl"))
            .args(["tap", "--path", "/tapped", "--count", "1"]);
        nodemesh_tests::process::Proc::spawn("meshctl tap", c)
    };
    tap.wait_for("following", Duration::from_secs(5));
    assert_eq!(
        curl_status(&t, "client", "GET", &format!("http://{WEB}/tapped?x=1")),
        "200"
    );
    let line = tap.wait_for("request ", Duration::from_secs(5));
    println!("meshctl tap: {line}");
    for want in [
        "demo/client -> demo/web-",
        &format!("GET {WEB}/tapped 200 "),
        "service=demo/web",
        "(http1)",
    ] {
        assert!(line.contains(want), "want {want:?} in {line}");
    }

    // 2. An HTTPRoute splits web 90/10 with the canary: 1000 HTTP/1.1 requests on keep-alive.
    let reloads = sample(
        &scrape(&t),
        "nodemesh_config_reloads_total",
        &[("result", "ok")],
    );
    t.rewrite_mesh_file(&format!("{}{SPLIT}", t.mesh_yaml(&pods, &services)));
    let wait = std::time::Instant::now();
    while sample(
        &scrape(&t),
        "nodemesh_config_reloads_total",
        &[("result", "ok")],
    ) <= reloads
    {
        assert!(
            wait.elapsed() < Duration::from_secs(10),
            "the route was never loaded"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // What the pod learns of its client: the proven identity (x-forwarded-client-cert) and the
    // client pod's address (x-forwarded-for, forwarded) — whatever the client claimed instead —
    // from another node (through HBONE) and from its own (web-1 calling its service).
    for (from, sa) in [("client", "client-sa"), ("web-1", "web-1-sa")] {
        let pod = t.pod(from);
        let out = nodemesh_tests::mesh_app(
            &pod.cgroup,
            pod.ns.name(),
            &[
                "exec",
                "--",
                "curl",
                "-s",
                "--max-time",
                "10",
                "-H",
                "x-forwarded-client-cert: By=spiffe://evil;URI=spiffe://cluster.local/ns/demo/sa/admin",
                "-H",
                "x-forwarded-for: 192.0.2.7",
                &format!("http://{WEB_DIRECT}/headers"),
            ],
        );
        let seen = String::from_utf8_lossy(&out.stdout).to_lowercase();
        println!("the pod's view of its client {from}:\n{}", seen.trim());
        let line = |prefix: &str| {
            seen.lines()
                .map(str::trim)
                .find(|l| l.starts_with(prefix))
                .unwrap_or_else(|| panic!("no {prefix} header reached the pod:\n{seen}"))
                .to_string()
        };
        // any of web's pods answers: By= is the one that did
        let xfcc = line("x-forwarded-client-cert: ");
        assert!(
            xfcc.starts_with("x-forwarded-client-cert: by=spiffe://cluster.local/ns/demo/sa/")
                && xfcc.ends_with(&format!(";uri=spiffe://cluster.local/ns/demo/sa/{sa}")),
            "{xfcc}"
        );
        assert_eq!(
            line("x-forwarded-for: "),
            format!("x-forwarded-for: 192.0.2.7, {}", pod.ip)
        );
        assert_eq!(line("forwarded: "), format!("forwarded: for={}", pod.ip));
        assert!(
            !seen.contains("evil"),
            "a client's own XFCC never reaches the pod:\n{seen}"
        );
    }
    let by = curl(&t, &[&format!("http://{WEB}/s[1-1000]")]);
    println!("HTTP/1.1, 90/10 split, 1000 requests: {by:?}");
    let canary = by.get("canary").copied().unwrap_or(0);
    let stable: u32 = ["web-1", "web-2", "web-3"]
        .iter()
        .map(|p| by.get(*p).copied().unwrap_or(0))
        .sum();
    assert_eq!(canary + stable, 1000, "every request succeeds: {by:?}");
    assert!(
        (70..=130).contains(&canary),
        "the canary got {canary} of 1000 (want 10% ± 3): {by:?}"
    );
    let routed = sample(
        &scrape(&t),
        "nodemesh_requests_total",
        &[("route", "demo/canary")],
    );
    assert_eq!(routed, 1000, "the route names its requests");
    // meshctl stat --by route: the route's requests, success rate and latency percentiles.
    let (ns, metrics_addr) = if sidecar {
        let p = t.pod("client");
        (p.ns.path(), format!("{}:15020", p.ip))
    } else {
        (t.nodes[0].ns.path(), format!("{}:15020", t.nodes[0].ip))
    };
    let out = std::process::Command::new("nsenter")
        .arg(format!("--net={}", ns.display()))
        .arg(nodemesh_tests::bin("meshctl"))
        .args(["stat", "--by", "route", "--node", &metrics_addr])
        .output()
        .expect("meshctl runs");
    let table = String::from_utf8_lossy(&out.stdout).to_string();
    println!("meshctl stat --by route:\n{table}");
    // meshctl config routes: the routes this proxy holds, by upstream kind and parent.
    if !sidecar {
        let out = std::process::Command::new("nsenter")
            .arg(format!("--net={}", ns.display()))
            .arg(nodemesh_tests::bin("meshctl"))
            .args(["config", "routes"])
            .output()
            .expect("meshctl runs");
        let routes = String::from_utf8_lossy(&out.stdout).to_string();
        println!("meshctl config routes:\n{routes}");
        let canary = routes
            .lines()
            .find(|l| l.starts_with("demo/canary "))
            .unwrap_or_else(|| panic!("no canary route:\n{routes}"));
        let cols: Vec<&str> = canary.split_whitespace().collect();
        assert_eq!(cols[1..3], ["HTTPRoute", "web:80"], "{canary}");
    }
    let row = table
        .lines()
        .find(|l| l.starts_with("demo/web demo/canary "))
        .unwrap_or_else(|| panic!("no row for the canary route:\n{table}"));
    let cols: Vec<&str> = row.split_whitespace().collect();
    // SERVICE ROUTE CONNS OPEN SENT RECEIVED REQS SUCCESS P50 P95 P99
    assert_eq!(cols[6], "1000", "{row}");
    assert_eq!(cols[7], "100.0%", "{row}");
    assert!(cols[10].ends_with("ms"), "a p99 from the histogram: {row}");

    // 2b. Local rate limits (2/s, burst 5), a bucket per client workload: 20 requests at once
    //     from `client` get 5 to 9 answers and 429s with retry-after; `client2` keeps its own.
    let codes = |pod: &str, n: usize| {
        let p = t.pod(pod);
        let script = format!(
            "for i in $(seq {n}); do curl -s -o /dev/null -w '%{{http_code}} ' http://{LIMITED}/r$i; done; \
             curl -s -D - -o /dev/null http://{LIMITED}/last | tr -d '\\r' | grep -i '^retry-after' || true"
        );
        let out =
            nodemesh_tests::mesh_app(&p.cgroup, p.ns.name(), &["exec", "--", "sh", "-c", &script]);
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    let out = codes("client", 20);
    println!("client, 20 requests at a 2/s limit: {out}");
    let ok = out.matches("200").count();
    let limited = out.matches("429").count();
    // the burst of 5, plus 2 a second for as long as the 20 take
    assert!((5..=9).contains(&ok) && ok + limited == 20, "{out}");
    assert!(
        out.to_lowercase().contains("retry-after: "),
        "429 says when: {out}"
    );
    let out2 = codes("client2", 1);
    println!("client2 meanwhile: {out2}");
    assert!(
        out2.starts_with("200"),
        "client2 has its own bucket: {out2}"
    );
    let counted = sample(
        &scrape(&t),
        "nodemesh_requests_rate_limited_total",
        &[("route", "demo/limit-web"), ("source_workload", "client")],
    );
    assert!(
        (limited..=limited + 1).contains(&(counted as usize)),
        "each refusal is counted ({counted}; {limited} and perhaps the last probe)"
    );
    // gRPC: RESOURCE_EXHAUSTED (8), a status rather than an HTTP code.
    let (_, out) = run(
        &t,
        &[
            "grpc-load",
            RPC_LIMITED,
            "--calls",
            "20",
            "--concurrency",
            "1",
        ],
    );
    println!("gRPC, 20 calls at a 2/s limit: {out}");
    let ok: u32 = out
        .split("codes=")
        .nth(1)
        .unwrap_or_default()
        .split(',')
        .filter_map(|kv| kv.split_once(':'))
        .filter(|(k, _)| *k == "0")
        .map(|(_, v)| v.parse().unwrap_or(0))
        .sum();
    assert!(
        (5..=9).contains(&ok) && out.contains(",8:"),
        "some calls pass, the rest get RESOURCE_EXHAUSTED: {out}"
    );

    // 3. Peak-EWMA: an endpoint 200 ms slower than its peers gets the smallest share.
    let by = h2_load(&t, &format!("{LAG}:80"), 300, 4);
    println!("h2c, one endpoint 200 ms slower, 300 requests: {by:?}");
    let slow = by.get("lag-slow").copied().unwrap_or(0);
    for fast in ["lag-1", "lag-2"] {
        let n = by.get(fast).copied().unwrap_or(0);
        assert!(
            slow < n,
            "the slow endpoint served {slow}, {fast} only {n}: {by:?}"
        );
    }
    assert_eq!(by.values().sum::<u32>(), 300, "{by:?}");

    // 4. A server that speaks first, without appProtocol: the greeting comes through within
    //    the detection timeout (100 ms), and the connection is plain TCP after it.
    let (ok, out) = run(&t, &["await-greeting", GREET]);
    println!("server-first through detection: {out}");
    assert!(
        ok && out.contains("greeting=220_greeter_ready") && out.contains("echo=ok"),
        "{out}"
    );
    let ms: f64 = out
        .split_whitespace()
        .find_map(|w| w.strip_prefix("first_byte_ms="))
        .and_then(|v| v.parse().ok())
        .expect("first_byte_ms");
    assert!(
        ms < 100.0,
        "the greeting took {ms} ms: detection held it back"
    );
    let server_first = [("protocol", "opaque"), ("how", "server_first")];
    assert_eq!(
        sample(
            &scrape(&t),
            "nodemesh_protocol_detections_total",
            &server_first
        ),
        1
    );

    // 5. appProtocol: tcp is never detected: the same server through `raw`.
    let (ok, out) = run(&t, &["await-greeting", RAW]);
    println!("server-first with appProtocol tcp: {out}");
    assert!(ok && out.contains("echo=ok"), "{out}");
    let metrics = scrape(&t);
    assert_eq!(
        sample(
            &metrics,
            "nodemesh_protocol_detections_total",
            &[("protocol", "opaque"), ("how", "app_protocol")]
        ),
        1
    );
    assert_eq!(
        sample(
            &metrics,
            "nodemesh_protocol_detections_total",
            &server_first
        ),
        1,
        "the tcp port was detected\n{metrics}"
    );

    // 6. WebSocket: the upgrade passes through L7 (detected as HTTP/1.1), then the connection is
    //    bytes between a real client and server.
    let (ok, out) = run(&t, &["ws-client", CHAT, "--messages", "20"]);
    println!("WebSocket through L7: {out}");
    assert!(
        ok && out.contains("ws=ok status=101") && out.contains("served_by=chat"),
        "{out}"
    );
    assert_eq!(
        sample(
            &scrape(&t),
            "nodemesh_requests_total",
            &[
                ("destination_service", "demo/chat"),
                ("response_code", "101")
            ]
        ),
        1
    );

    // 6b. gRPC streaming through L7: server, client and bidirectional streams of 20 messages,
    //     and a status that arrives in the trailers after a stream's messages.
    let (ok, out) = run(&t, &["grpc-streams", RPC, "--messages", "20"]);
    println!("gRPC streams: {out}");
    for want in [
        "server_stream=ok",
        "client_stream=ok",
        "bidi=ok round_trips=20",
        "trailer_status=14",
    ] {
        assert!(ok && out.contains(want), "want {want}: {out}");
    }
    let unavailable = [
        ("reporter", "outbound"),
        ("destination_service", "demo/rpc"),
        ("grpc_status", "14"),
        ("classification", "failure"),
    ];
    assert_eq!(
        wait_sample(|| scrape(&t), "nodemesh_requests_total", &unavailable, 1),
        1,
        "the trailers' status is the request's"
    );

    // 7. Bad input, each while a good HTTP/2 client keeps calling the same service.
    let p = t.pod("client");
    let mut good = {
        let mut cmd = std::process::Command::new(nodemesh_tests::bin("mesh-app"));
        cmd.arg("--cgroup")
            .arg(&p.cgroup)
            .args(["--netns", p.ns.name(), "h2-load", &format!("{WEB}:80")])
            .args(["--requests", "3000", "--concurrency", "2"]);
        nodemesh_tests::process::Proc::spawn("good client", cmd)
    };
    let web = format!("{WEB}:80");
    let errors = |t: &Topology, reason: &str| {
        sample(
            &scrape(t),
            "nodemesh_http_errors_total",
            &[("reporter", "outbound"), ("reason", reason)],
        )
    };
    // The connection's task counts once it has ended, just after the client saw the answer.
    let counted = |t: &Topology, reason: &str, before: u64| {
        wait_sample(
            || scrape(t),
            "nodemesh_http_errors_total",
            &[("reporter", "outbound"), ("reason", reason)],
            before + 1,
        ) > before
    };
    let cases: [(&str, &str, usize, &str, &str); 3] = [
        (
            "malformed header",
            "GET / HTTP/1.1\\r\\nHost: web\\r\\nBad Header\\r\\n\\r\\n",
            0,
            "status=400",
            "malformed",
        ),
        (
            "70 KiB header",
            "GET / HTTP/1.1\\r\\nHost: web\\r\\n\\r\\n",
            70_000,
            "status=431",
            "headers_too_large",
        ),
        (
            "two Content-Lengths",
            "POST / HTTP/1.1\\r\\nHost: web\\r\\nContent-Length: 5\\r\\nContent-Length: 6\\r\\n\\r\\nhello!",
            0,
            "status=400",
            "malformed",
        ),
    ];
    for (what, send, big, want, reason) in cases {
        let before = errors(&t, reason);
        let big = big.to_string();
        let (_, out) = run(
            &t,
            &[
                "raw",
                &web,
                "--send",
                send,
                "--big-header",
                &big,
                "--wait-ms",
                "3000",
            ],
        );
        println!("{what}: {out}");
        assert!(
            out.contains(want) && out.contains("served_by=none"),
            "{what}: want {want}, never forwarded: {out}"
        );
        assert!(
            counted(&t, reason, before),
            "{what}: http_errors_total{{reason={reason}}} must count it"
        );
    }
    // Content-Length with Transfer-Encoding: hyper's parser drops the Content-Length (RFC 9112
    // §6.3), so the request reaches the server framed one way only (chunked), and the client's
    // connection is closed after the answer: nothing can be smuggled behind it.
    let (_, out) = run(
        &t,
        &[
            "raw",
            &web,
            "--send",
            "POST / HTTP/1.1\\r\\nHost: web\\r\\nContent-Length: 5\\r\\nTransfer-Encoding: chunked\\r\\n\\r\\n5\\r\\nhello\\r\\n0\\r\\n\\r\\nGET /smuggled HTTP/1.1\\r\\nHost: web\\r\\n\\r\\n",
            "--wait-ms",
            "3000",
        ],
    );
    println!("Content-Length with Transfer-Encoding: {out}");
    assert!(
        out.contains("framing=chunked") && out.contains("closed=true"),
        "{out}"
    );
    assert!(
        out.contains("responses=1"),
        "the request behind it must never be answered: {out}"
    );
    for (kind, count) in [("rapid-reset", "5000"), ("continuation", "20000")] {
        let before = errors(&t, "h2_flood");
        let (_, out) = run(&t, &["h2-flood", &web, "--kind", kind, "--count", count]);
        println!("HTTP/2 {kind} flood: {out}");
        // GOAWAY with ENHANCE_YOUR_CALM (0xb), for this connection only.
        assert!(
            out.starts_with("goaway=11 "),
            "{kind}: the connection must get GOAWAY: {out}"
        );
        assert!(
            counted(&t, "h2_flood", before),
            "{kind}: http_errors_total{{reason=h2_flood}} must count it"
        );
    }
    let before = errors(&t, "header_timeout");
    let (_, out) = run(
        &t,
        &[
            "raw",
            &web,
            "--send",
            "GET / HTTP/1.1\\r\\nHost: web\\r\\n",
            "--wait-ms",
            "15000",
        ],
    );
    println!("slowloris (headers never end): {out}");
    assert!(
        out.contains("closed=true") && out.contains("served_by=none"),
        "{out}"
    );
    let ms: u64 = out
        .split_whitespace()
        .find_map(|w| w.strip_prefix("after_ms="))
        .and_then(|v| v.parse().ok())
        .expect("after_ms");
    assert!(
        (9_000..14_000).contains(&ms),
        "closed after {ms} ms, want about 10 s"
    );
    assert!(
        counted(&t, "header_timeout", before),
        "slowloris must be counted"
    );
    let status = good
        .wait_exit(Duration::from_secs(60))
        .expect("the good client finishes");
    let out = good.output();
    println!("good client meanwhile: {}", out.trim());
    assert!(
        status.success() && out.contains("ok=3000 errors=0"),
        "{out}"
    );

    // 10. L7 authorization at the destination: a DENY for the client's POSTs to /admin of web's
    //     pods. (Its opaque TCP to them would be refused: a DENY about requests fails closed.)
    let url = |path: &str| format!("http://{WEB_DIRECT}{path}");
    let denied_before = sample(
        &scrape_dst(&t),
        "nodemesh_authorization_decisions_total",
        &[
            ("result", "deny"),
            ("policy", "demo/no-admin-posts-from-client"),
        ],
    );
    // The destination's tap shows each denied request with its reason (node mode: the web pods'
    // node; a sidecar's tap shows its own pod's the same way).
    let mut deny_tap = (!sidecar).then(|| {
        let mut c = std::process::Command::new("nsenter");
        c.arg(format!("--net={}", t.nodes[1].ns.path().display()))
            .arg(nodemesh_tests::bin("meshctl"))
            .args(["tap", "--path", "/admin/users", "--count", "1"]);
        let mut p = nodemesh_tests::process::Proc::spawn("meshctl tap (denies)", c);
        p.wait_for("following", Duration::from_secs(5));
        p
    });
    let cases = [
        ("client", "POST", "/admin", "403"),
        ("client", "POST", "/admin/users", "403"),
        ("client", "GET", "/admin", "200"),
        ("client", "GET", "/", "200"),
        ("client", "POST", "/", "200"),
        ("client2", "POST", "/admin", "200"),
    ];
    for (pod, method, path, want) in cases {
        let got = curl_status(&t, pod, method, &url(path));
        println!("{pod}: {method} {path} -> {got}");
        assert_eq!(got, want, "{pod}: {method} {path}");
    }
    let denied = sample(
        &scrape_dst(&t),
        "nodemesh_authorization_decisions_total",
        &[
            ("result", "deny"),
            ("policy", "demo/no-admin-posts-from-client"),
        ],
    );
    assert_eq!(
        denied - denied_before,
        2,
        "each denied request is counted where it was decided"
    );
    // The destination's request metrics (reporter="inbound") saw the same.
    let inbound_403 = sample(
        &scrape_dst(&t),
        "nodemesh_requests_total",
        &[
            ("reporter", "inbound"),
            ("source_workload", "client"),
            ("response_code", "403"),
        ],
    );
    assert_eq!(inbound_403, 2, "inbound request metrics");
    if let Some(tap) = deny_tap.as_mut() {
        let line = tap.wait_for("request ", Duration::from_secs(5));
        println!("destination's tap of a denied request: {line}");
        for want in [
            "inbound",
            "demo/client -> demo/web",
            "POST",
            " 403 ",
            "reason=\"denied\"",
        ] {
            assert!(line.contains(want), "want {want:?} in {line}");
        }
        // The destination names a service the pod is an endpoint of (request families carry
        // destination_service on both sides).
        assert!(!line.contains("service=unknown"), "{line}");
    }

    // 11. Bodies stream both ways: 100 MiB up and 100 MiB down through L7 (and the tunnel),
    //     with the proxies' peak memory growing by less than 32 MiB.
    let pids: Vec<u32> = t
        .daemons
        .iter()
        .flatten()
        .map(|p| p.pid())
        .chain(t.sidecars.iter().map(|(_, p)| p.pid()))
        .collect();
    let rss0: Vec<u64> = pids
        .iter()
        .map(|pid| {
            // "5" resets the peak (VmHWM) to the current RSS.
            std::fs::write(format!("/proc/{pid}/clear_refs"), "5").expect("reset the peak RSS");
            proc_kib(*pid, "VmRSS:")
        })
        .collect();
    const HUNDRED_MIB: u64 = 100 << 20;
    let p = t.pod("client");
    let upload = format!(
        "head -c {HUNDRED_MIB} /dev/zero | curl -sS --max-time 120 -T - -w ' status=%{{http_code}}' http://{WEB_DIRECT}/upload"
    );
    let out =
        nodemesh_tests::mesh_app(&p.cgroup, p.ns.name(), &["exec", "--", "sh", "-c", &upload]);
    let up = String::from_utf8_lossy(&out.stdout).trim().to_string();
    println!("100 MiB upload: {up}");
    assert!(
        up.contains(&format!("received={HUNDRED_MIB}")) && up.contains("status=200"),
        "{up}"
    );
    let out = nodemesh_tests::mesh_app(
        &p.cgroup,
        p.ns.name(),
        &[
            "exec",
            "--",
            "curl",
            "-sS",
            "--max-time",
            "120",
            "-o",
            "/dev/null",
            "-w",
            "%{size_download} %{http_code}",
            &format!("http://{WEB_DIRECT}/download?bytes={HUNDRED_MIB}"),
        ],
    );
    let down = String::from_utf8_lossy(&out.stdout).trim().to_string();
    println!("100 MiB download: {down}");
    assert_eq!(down, format!("{HUNDRED_MIB} 200"));
    for (pid, rss) in pids.iter().zip(&rss0) {
        let growth = proc_kib(*pid, "VmHWM:").saturating_sub(*rss);
        println!("  proxy {pid}: peak RSS grew by {} KiB", growth);
        assert!(
            growth < 32 << 10,
            "proxy {pid}'s peak RSS grew by {growth} KiB streaming 100 MiB"
        );
    }

    // 8. Retries within a budget: one of four endpoints answers 503 every other time; the route
    //    retries 503 up to 3 times.
    let started = std::time::Instant::now();
    let (by, errors, out) = h2_load_counts(&t, HALF, 1000, 4);
    let secs = started.elapsed().as_secs_f64();
    let retried = sample(
        &scrape(&t),
        "nodemesh_request_retries_total",
        &[("route", "demo/retry-half"), ("result", "retried")],
    );
    let refused = sample(
        &scrape(&t),
        "nodemesh_request_retries_total",
        &[("route", "demo/retry-half"), ("result", "budget_exhausted")],
    );
    println!("retries: {out} in {secs:.1} s; retried={retried} budget_exhausted={refused}; {by:?}");
    let ok = 1000 - errors;
    assert!(ok >= 995, "success rate {ok}/1000 is under 99.5 %: {out}");
    assert!(retried > 0, "the failures must have been retried");
    // The budget: 20 % of requests plus 10 per second over its 10 s window.
    assert!(
        retried as f64 <= 0.2 * 1000.0 + 10.0 * 10.0,
        "{retried} retries for 1000 requests is over the budget"
    );

    // 9. Circuit breaking: an endpoint that fails every request is ejected after 5 in a row;
    //    within 1 s its traffic is on the healthy ones; after it recovers it is probed and
    //    served again.
    let _ = h2_load(&t, FLAKY, 30, 1);
    std::fs::write(&broken.0, b"broken").expect("break flaky-1");
    let (by, errors, _) = h2_load_counts(&t, FLAKY, 200, 2);
    println!("flaky-1 breaks: {errors} failed of 200 before its ejection: {by:?}");
    let ejections = sample(
        &scrape(&t),
        "nodemesh_endpoint_ejections_total",
        &[("destination_workload", "flaky-1")],
    );
    assert!(ejections >= 1, "flaky-1 must be ejected");
    assert!(
        errors <= 10,
        "{errors} failures: the breaker must eject after 5 in a row (plus those in flight)"
    );
    let (by, errors, _) = h2_load_counts(&t, FLAKY, 300, 2);
    println!("while ejected: {by:?}");
    let to_broken = by.get("flaky-1!").copied().unwrap_or(0);
    assert!(
        errors <= 2 && to_broken <= 2,
        "an ejected endpoint gets at most a probe: {by:?}"
    );
    std::fs::remove_file(&broken.0).expect("repair flaky-1");
    let repaired = std::time::Instant::now();
    let back = loop {
        let (by, _, _) = h2_load_counts(&t, FLAKY, 90, 2);
        let n = by.get("flaky-1").copied().unwrap_or(0);
        if n >= 15 {
            break by;
        }
        assert!(
            repaired.elapsed() < Duration::from_secs(20),
            "flaky-1 never got traffic again: {by:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    println!(
        "flaky-1 repaired, probed and back after {:.1} s: {back:?}",
        repaired.elapsed().as_secs_f64()
    );

    // Every family the Grafana dashboard queries is emitted by these daemons after this traffic
    // (retries, rate limits, ejections, denies, floods, detection): no panel stays empty for
    // want of a family. The splice's families need --sockmap on; the datapath suite checks them
    // on a spliced connection.
    if !sidecar {
        // The traffic so far failed only requests; one refused connection (straight to the
        // capture port, so without a capture record) gives the connection-failure panel its own.
        let (ok, out) = t.connect(
            "client",
            &format!("{}:15001", t.nodes[0].ip),
            &["--send", "1"],
        );
        assert!(!ok || !out.contains("echo=ok"), "{out}");
        std::thread::sleep(Duration::from_millis(200));
        let scraped = format!("{}\n{}", t.scrape(0), t.scrape(1));
        let emitted = |fam: &str| {
            scraped
                .lines()
                .any(|l| !l.starts_with('#') && l.split(['{', ' ']).next() == Some(fam))
        };
        let mut missing = Vec::new();
        for (panel, fam) in nodemesh_tests::dashboard_families() {
            if fam.starts_with("nodemesh_splice_") {
                continue;
            }
            if !emitted(&fam) {
                missing.push(format!("{fam} (panel {panel:?})"));
            }
        }
        assert!(
            missing.is_empty(),
            "dashboard families no daemon emitted under traffic: {missing:?}"
        );
    }
}

/// A `/proc/PID/status` field in KiB.
fn proc_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}

/// An HTTP/1.1 request with curl from `pod`; its status code.
fn curl_status(t: &Topology, pod: &str, method: &str, url: &str) -> String {
    let p = t.pod(pod);
    let args = [
        "exec",
        "--",
        "curl",
        "-s",
        "-o",
        "/dev/null",
        "--max-time",
        "10",
        "-X",
        method,
        "-w",
        "%{http_code}",
        url,
    ];
    let out = nodemesh_tests::mesh_app(&p.cgroup, p.ns.name(), &args);
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Runs mesh-app's HTTP/2 client (one connection) in the client pod; responses by server, which
/// must all succeed.
fn h2_load(t: &Topology, addr: &str, requests: usize, concurrency: usize) -> HashMap<String, u32> {
    let (by, errors, out) = h2_load_counts(t, addr, requests, concurrency);
    assert_eq!(errors, 0, "h2-load failed: {out}");
    by
}

/// [`h2_load`] where requests may fail: (good answers by server, with `name!` for a server's
/// failed answers; failures; the output line).
fn h2_load_counts(
    t: &Topology,
    addr: &str,
    requests: usize,
    concurrency: usize,
) -> (HashMap<String, u32>, u32, String) {
    let (_, out) = run(
        t,
        &[
            "h2-load",
            addr,
            "--requests",
            &requests.to_string(),
            "--concurrency",
            &concurrency.to_string(),
        ],
    );
    assert!(out.starts_with("ok="), "h2-load did not run: {out}");
    let errors = out
        .split_whitespace()
        .find_map(|w| w.strip_prefix("errors="))
        .and_then(|v| v.parse().ok())
        .unwrap_or(u32::MAX);
    let by = out
        .split("served=")
        .nth(1)
        .unwrap_or_default()
        .split(',')
        .filter_map(|kv| kv.split_once(':'))
        .map(|(k, v)| (k.to_string(), v.parse().unwrap_or(0)))
        .collect();
    (by, errors, out)
}

/// `served=a:1,b:2` of a mesh-app client's output.
fn served_by(out: &str) -> HashMap<String, u32> {
    out.split("served=")
        .nth(1)
        .unwrap_or_default()
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .split(',')
        .filter_map(|kv| kv.split_once(':'))
        .map(|(k, v)| (k.to_string(), v.parse().unwrap_or(0)))
        .collect()
}

fn run(t: &Topology, args: &[&str]) -> (bool, String) {
    let p = t.pod("client");
    let out = nodemesh_tests::mesh_app(&p.cgroup, p.ns.name(), args);
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).trim().to_string(),
    )
}
