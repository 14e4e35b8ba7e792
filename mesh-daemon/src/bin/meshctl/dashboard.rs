//! `meshctl dashboard`: the mesh's live service graph in a browser (the Linkerd viz / Hubble UI
//! experience). A small web server on loopback serves one page and `/graph.json`: the nodes'
//! metrics scraped at each request, with rates since the previous one. The page draws workloads
//! and the edges between them (requests and connections per second, success rate, and how each
//! crossed: mTLS, same node, plaintext, or refused in red) and refreshes itself.
//!
//! The graph is served without authentication, so the listener must be a loopback address;
//! reach it from elsewhere through `ssh -L` or `kubectl port-forward`.

use std::{
    collections::BTreeMap,
    convert::Infallible,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode, body::Incoming, header};

use super::{Nodes, Row, edge_key, edge_list, fetch_text, node_samples, rows, runtime};

const PAGE: &str = include_str!("dashboard.html");

/// The previous scrape's per-edge counts, for rates.
type Previous = Mutex<Option<(Instant, BTreeMap<String, Row>)>>;

pub fn run(nodes: &Nodes, listen: SocketAddr) -> Result<(), String> {
    if !listen.ip().is_loopback() {
        return Err(format!(
            "--listen {listen}: the dashboard serves the mesh's graph without authentication, so \
             it listens on loopback only (127.0.0.1 or ::1); reach it from elsewhere with \
             `ssh -L` or `kubectl port-forward`"
        ));
    }
    let nodes = Arc::new(nodes.nodes.clone());
    let prev: Arc<Previous> = Arc::new(Mutex::new(None));
    runtime()?.block_on(async move {
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .map_err(|e| format!("--listen {listen}: {e}"))?;
        let at = listener.local_addr().map_err(|e| e.to_string())?;
        println!(
            "meshctl dashboard: http://{at}/ — the graph of {} (Ctrl-C to stop)",
            nodes.join(", ")
        );
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            };
            let (nodes, prev) = (nodes.clone(), prev.clone());
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let (nodes, prev) = (nodes.clone(), prev.clone());
                    async move { Ok::<_, Infallible>(serve(&nodes, &prev, req).await) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                    .await;
            });
        }
    })
}

async fn serve(nodes: &[String], prev: &Previous, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let reply = |status, kind: &'static str, body: String| {
        let mut r = Response::new(Full::new(Bytes::from(body)));
        *r.status_mut() = status;
        r.headers_mut()
            .insert(header::CONTENT_TYPE, header::HeaderValue::from_static(kind));
        r.headers_mut().insert(
            header::CACHE_CONTROL,
            header::HeaderValue::from_static("no-store"),
        );
        r
    };
    match req.uri().path() {
        "/" => reply(StatusCode::OK, "text/html; charset=utf-8", PAGE.to_string()),
        "/graph.json" => reply(
            StatusCode::OK,
            "application/json",
            graph(nodes, prev).await.to_string(),
        ),
        _ => reply(
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found; the dashboard serves / and /graph.json\n".into(),
        ),
    }
}

/// The graph now: every edge with its totals and its rates since the previous call.
async fn graph(nodes: &[String], prev: &Previous) -> serde_json::Value {
    let mut samples = Vec::new();
    let mut errors = Vec::new();
    for n in nodes {
        match fetch_text(n, "/metrics")
            .await
            .and_then(|t| node_samples(n, &t))
        {
            Ok(s) => samples.extend(s),
            Err(e) => errors.push(e),
        }
    }
    let now = rows(&samples, edge_key);
    let at = Instant::now();
    let before = {
        let mut p = prev.lock().unwrap_or_else(|p| p.into_inner());
        p.replace((at, now.clone()))
    };
    let edges: Vec<serde_json::Value> = edge_list(&samples)
        .into_iter()
        .map(|e| {
            let key = format!("{} -> {}", e.source, e.destination);
            let total = now.get(&key).cloned().unwrap_or_default();
            let (d, secs) = match &before {
                Some((t, b)) => (
                    total.since(&b.get(&key).cloned().unwrap_or_default()),
                    Some(at.duration_since(*t).as_secs_f64().max(0.001)),
                ),
                None => (Row::default(), None),
            };
            let rate = |n: u64| secs.map(|s| n as f64 / s);
            // Refused: nothing of this edge ever got through, or only failures lately.
            let refused =
                e.transport == "refused" || (d.failed > 0 && d.connections == 0 && d.success == 0);
            serde_json::json!({
                "source": e.source,
                "destination": e.destination,
                "source_principal": e.source_principal,
                "destination_principal": e.destination_principal,
                "transport": e.transport,
                "mtls": e.transport == "mtls",
                "state": if refused { "refused" } else { e.transport },
                "connections": e.connections,
                "requests": e.requests,
                "failed": e.failed,
                "connections_per_second": rate(d.connections),
                "requests_per_second": rate(d.requests),
                "failed_per_second": rate(d.failed),
                "success_rate": d.success_rate().or(total.success_rate()),
            })
        })
        .collect();
    let mut workloads: Vec<&str> = edges
        .iter()
        .flat_map(|e| [e["source"].as_str(), e["destination"].as_str()])
        .flatten()
        .collect();
    workloads.sort_unstable();
    workloads.dedup();
    serde_json::json!({
        "nodes": nodes,
        "errors": errors,
        "workloads": workloads,
        "edges": edges,
    })
}
