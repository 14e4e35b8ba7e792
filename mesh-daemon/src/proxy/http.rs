//! L7 on the source side: a captured connection to a service port that speaks HTTP/1.1 or
//! HTTP/2 (h2c, gRPC) is served here instead of relayed. Each request is routed on its own:
//! the service's HTTPRoute/GRPCRoute rules ([`crate::state::routes`]) pick a rule, the rule's
//! weighted backendRefs a backend service, and that service's balancer — power of two choices
//! over peak-EWMA latency (tower's `p2c` over `PeakEwma`, as in linkerd2-proxy) — an endpoint.
//! Requests of one client connection therefore spread over every endpoint (no gRPC
//! one-connection imbalance).
//!
//! Endpoint connections are pooled per (source workload, endpoint) and reused: an HTTP/2
//! connection multiplexes, HTTP/1.1 keeps idle connections. A remote endpoint's connection is an
//! HBONE tunnel (mTLS with the source workload's SVID, as for L4); a local one is a TCP
//! connection from the mesh source, authorized per request with the same policy check as L4.
//! The request's version is kept end to end (HTTP/1.1 stays HTTP/1.1), so `Host`/`:authority`,
//! trailers and streaming bodies pass unchanged; bodies stream, never buffered whole.

use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::Arc,
    task::{Context, Poll},
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper::body::{Body as _, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;
use tower::{
    Service, ServiceExt, balance::p2c::Balance, buffer::Buffer, discover::ServiceList,
    load::PeakEwma,
};
use tracing::{debug, warn};

use super::{
    Inputs,
    detect::Protocol,
    h2::H2Stream,
    hbone,
    observe::{self, Source},
    route::{self, Route},
    upstream::{Prefixed, Upstream},
};
use crate::{
    identity::Identity,
    state::{Service as MeshService, Workload, routes},
};

use super::l7cache::{
    Backend, Balanced, BalancerKey, BoxError, BoxFuture, Pool, PoolKey, ReqBody, lock,
};
pub use observe::RespBody;
use tower::retry::budget::{Budget, TpsBudget};

use super::hbone::ERROR_HEADER;
/// Largest request or response header section (a bigger one: 431).
pub const MAX_HEADERS: usize = 64 << 10;
/// A client has this long to send a request's headers (slowloris).
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Idle HTTP/1.1 connections kept per endpoint and source.
const IDLE_PER_ENDPOINT: usize = 16;
/// Peak-EWMA: the latency assumed for an endpoint before it has answered, and how fast old
/// samples fade.
const DEFAULT_RTT: Duration = Duration::from_millis(30);
const DECAY: Duration = Duration::from_millis(250);

/// Who sent a connection and which service port it was for.
pub struct Client {
    pub source: Arc<Workload>,
    pub source_id: Identity,
    /// The service's VIP:port (the connection's original destination).
    pub service: SocketAddr,
    pub protocol: Protocol,
}

/// Serves one client connection as HTTP until it ends. `io` replays the bytes detection read.
pub async fn serve(inputs: Arc<Inputs>, io: Prefixed<TcpStream>, client: Client) {
    let client = Arc::new(client);
    let svc = {
        let (inputs, client) = (inputs.clone(), client.clone());
        hyper::service::service_fn(move |req| request(inputs.clone(), client.clone(), req))
    };
    let who = client.source.display();
    let stop = std::future::pending();
    serve_connection(&inputs, io, client.protocol, svc, "outbound", &who, stop).await;
}

/// Serves one connection as HTTP of the given version until it ends or the drain's deadline;
/// the drain — or `stop` — sends GOAWAY (HTTP/2) or `Connection: close` (HTTP/1.1). Protocol
/// errors are counted by reason.
async fn serve_connection<I, S>(
    inputs: &Inputs,
    io: I,
    protocol: Protocol,
    svc: S,
    reporter: &'static str,
    who: &str,
    stop: impl Future<Output = ()>,
) where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    S: hyper::service::Service<
            Request<Incoming>,
            Response = Response<RespBody>,
            Error = Infallible,
        > + Send
        + 'static,
    S::Future: Send + 'static,
{
    let drain = inputs.drain.clone();
    // One builder for both versions (hyper-util's `auto`), told the version detection found.
    let mut b = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    b.http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .max_buf_size(MAX_HEADERS.max(8192))
        .keep_alive(true);
    b.http2()
        .timer(TokioTimer::new())
        .max_header_list_size(MAX_HEADERS as u32)
        .max_concurrent_streams(1000)
        // RFC 9113 rapid reset (CVE-2023-44487): hyper's bound on streams reset before they were
        // served; past it the connection gets GOAWAY.
        .max_pending_accept_reset_streams(50)
        .max_local_error_reset_streams(1024)
        .initial_stream_window_size(hbone::STREAM_WINDOW)
        .initial_connection_window_size(hbone::CONNECTION_WINDOW);
    let b = if protocol == Protocol::Http2 {
        b.http2_only()
    } else {
        b.http1_only()
    };
    let conn = b.serve_connection_with_upgrades(TokioIo::new(io), svc);
    tokio::pin!(conn);
    let result = tokio::select! {
        r = conn.as_mut() => r,
        () = drain.draining() => {
            conn.as_mut().graceful_shutdown();
            tokio::select! {
                r = conn => r,
                () = drain.deadline() => Ok(()),
            }
        }
        () = stop => {
            conn.as_mut().graceful_shutdown();
            tokio::select! {
                r = conn => r,
                () = drain.deadline() => Ok(()),
            }
        }
    };
    if let Err(e) = result {
        debug!(peer = who, reporter, error = %e, "HTTP connection ended with an error");
        // auto's errors are boxed; hyper's own say which limit was hit.
        let reason = e
            .downcast_ref::<hyper::Error>()
            .map_or("protocol", http_error_reason);
        inputs
            .metrics
            .http_errors
            .with_label_values(&[reporter, reason])
            .inc();
    }
}

/// A tunnel of requests the HBONE server admitted: who proved to send it, and the pod it is for.
pub struct Tunnel {
    pub source_id: Identity,
    /// The source workload's name, when its claim checked out (else `unknown`).
    pub source_workload: String,
    pub dst: Arc<Workload>,
    pub target: SocketAddr,
    pub protocol: Protocol,
    /// The local service whose endpoint the target is (`destination_service`), or `unknown`.
    pub service: String,
    /// The client pod's address, when the source proxy named it and it checked out.
    pub source_ip: Option<std::net::IpAddr>,
    /// The destination pod's identity (`By=` of `x-forwarded-client-cert`).
    pub dst_id: Identity,
}

/// The pod's side of a tunnel of requests: one connection carries them all.
enum PodSender {
    H1(tokio::sync::Mutex<hyper::client::conn::http1::SendRequest<Incoming>>),
    H2(hyper::client::conn::http2::SendRequest<Incoming>),
}

/// The destination side of L7: serves a tunnel's requests to its pod over one connection, each
/// checked against the pod's policies with its method, path and headers (L7 authorization; 403
/// when denied) and counted with `reporter="inbound"`.
pub async fn serve_inbound(inputs: Arc<Inputs>, tunnel: H2Stream, pod: TcpStream, t: Tunnel) {
    let _ = pod.set_nodelay(true);
    let io = TokioIo::new(pod);
    // When the pod ends its connection (an idle keep-alive closed, a GOAWAY), the tunnel ends
    // too, gracefully, so the source proxy opens a new one — a tunnel must never outlive the
    // pod connection behind it and answer 502 for ever.
    let (pod_gone, pod_gone_rx) = tokio::sync::oneshot::channel::<()>();
    let sender = if t.protocol == Protocol::Http2 {
        let hs = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .initial_stream_window_size(hbone::STREAM_WINDOW)
            .initial_connection_window_size(hbone::CONNECTION_WINDOW)
            .max_header_list_size(MAX_HEADERS as u32)
            .handshake(io)
            .await;
        match hs {
            Ok((s, conn)) => {
                inputs.drain.spawn(async move {
                    let _ = conn.await;
                    let _ = pod_gone.send(());
                });
                PodSender::H2(s)
            }
            Err(e) => {
                warn!(target = %t.target, error = %e, "HTTP/2 to the pod failed");
                return;
            }
        }
    } else {
        let hs = hyper::client::conn::http1::Builder::new()
            .max_buf_size(MAX_HEADERS.max(8192))
            .handshake(io)
            .await;
        match hs {
            Ok((s, conn)) => {
                inputs.drain.spawn(async move {
                    let _ = conn.with_upgrades().await;
                    let _ = pod_gone.send(());
                });
                PodSender::H1(tokio::sync::Mutex::new(s))
            }
            Err(e) => {
                warn!(target = %t.target, error = %e, "HTTP/1.1 to the pod failed");
                return;
            }
        }
    };
    let protocol = t.protocol;
    let who = t.source_id.to_string();
    let ctx = Arc::new((t, sender));
    let svc = {
        let inputs = inputs.clone();
        hyper::service::service_fn(move |req| inbound_request(inputs.clone(), ctx.clone(), req))
    };
    let stop = async move {
        // sent, or its sender dropped: either way the pod's connection is over
        let _ = pod_gone_rx.await;
    };
    serve_connection(&inputs, tunnel, protocol, svc, "inbound", &who, stop).await;
}

async fn inbound_request(
    inputs: Arc<Inputs>,
    ctx: Arc<(Tunnel, PodSender)>,
    mut req: Request<Incoming>,
) -> Result<Response<RespBody>, Infallible> {
    let (t, sender) = (&ctx.0, &ctx.1);
    let start = observe::Start::of(&inputs, &req, t.protocol);
    let grpc = start.grpc();
    let checked = {
        let snap = inputs.state.snapshot();
        let attrs = crate::authz::RequestAttrs {
            method: req.method().as_str(),
            path: req.uri().path(),
            headers: req.headers(),
        };
        route::authorize(
            &snap,
            &t.source_id,
            &t.dst,
            t.target.port(),
            crate::authz::Check::Request(&attrs),
        )
    };
    inputs.count_verdict(checked.as_ref().map_or_else(|r| r.verdict.as_ref(), Some));
    let resp = match checked {
        Err(r) => {
            warn!(source = %t.source_id, method = %req.method(), path = req.uri().path(), "{}", r.detail);
            local_response(StatusCode::FORBIDDEN, "denied", &r.detail)
        }
        Ok(_) => {
            client_headers(req.headers_mut(), &t.dst_id, &t.source_id, t.source_ip);
            let client_side = upgrade_of(req.headers()).map(|_| hyper::upgrade::on(&mut req));
            let sent = match sender {
                PodSender::H2(s) => {
                    let mut s = s.clone();
                    match s.ready().await {
                        Ok(()) => s.send_request(req).await,
                        Err(e) => Err(e),
                    }
                }
                PodSender::H1(m) => {
                    let mut s = m.lock().await;
                    match s.ready().await {
                        Ok(()) => s.send_request(req).await,
                        Err(e) => Err(e),
                    }
                }
            };
            match sent {
                Ok(mut resp) => {
                    if let (Some(c), true) = (
                        client_side,
                        resp.status() == StatusCode::SWITCHING_PROTOCOLS,
                    ) {
                        join_upgrade(&inputs, c, &mut resp);
                    }
                    resp.map(BodyExt::boxed)
                }
                Err(e) => {
                    warn!(target = %t.target, error = %e, "request to the pod failed");
                    local_response(StatusCode::BAD_GATEWAY, "upstream_failed", &e.to_string())
                }
            }
        }
    };
    let src = Source {
        workload: &t.source_workload,
        namespace: &t.source_id.namespace,
        principal: &t.source_id,
    };
    let resp = if grpc { for_grpc(resp) } else { resp };
    Ok(observe::observe(
        &inputs,
        "inbound",
        &src,
        &t.service,
        "",
        Some(&t.dst),
        true,
        start,
        resp,
    ))
}

/// What the pod learns of its client, as Istio's and Linkerd's inbound proxies tell it: the proven
/// identity in `x-forwarded-client-cert` (Envoy's `By=<pod>;URI=<client>` form) — any the client
/// sent is removed first, so only the mesh can set it — and the client pod's address appended to
/// `x-forwarded-for` and `forwarded` (the TCP connection comes from this node's mesh source).
fn client_headers(
    h: &mut HeaderMap,
    dst: &Identity,
    src: &Identity,
    client: Option<std::net::IpAddr>,
) {
    h.remove(XFCC);
    if let Ok(v) = HeaderValue::from_str(&format!("By={dst};URI={src}")) {
        h.insert(XFCC, v);
    }
    // Every value the client sent, joined (a header given twice is one list), then ours.
    let append = |h: &mut HeaderMap, name: &'static str, add: String| {
        let mut all: Vec<String> = h
            .get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .map(str::trim)
            .filter(|v| !v.is_empty())
            .map(str::to_string)
            .collect();
        all.push(add);
        if let Ok(v) = HeaderValue::from_str(&all.join(", ")) {
            h.insert(name, v);
        }
    };
    // An address the destination could not verify is said to be unknown (RFC 7239), so the
    // last `forwarded` element is always the mesh's, never one the client wrote.
    let Some(ip) = client else {
        append(h, "forwarded", "for=unknown".into());
        return;
    };
    append(h, "x-forwarded-for", ip.to_string());
    append(
        h,
        "forwarded",
        route::forwarded_value(SocketAddr::new(ip, 0)),
    );
}

/// The client's proven identity toward the pod (Envoy's name for it).
pub const XFCC: &str = "x-forwarded-client-cert";

/// A bounded reason for a client connection's protocol error.
fn http_error_reason(e: &hyper::Error) -> &'static str {
    if e.is_parse_too_large() {
        "headers_too_large"
    } else if e.is_parse() {
        "malformed"
    } else if e.is_timeout() {
        "header_timeout"
    } else if e.is_incomplete_message() {
        "incomplete"
    } else {
        // HTTP/2: h2 ends a connection that floods it (rapid reset, CONTINUATION, too many
        // errors) with GOAWAY(ENHANCE_YOUR_CALM).
        let h2 = std::error::Error::source(e).and_then(|s| s.downcast_ref::<h2::Error>());
        match h2.and_then(h2::Error::reason) {
            Some(h2::Reason::ENHANCE_YOUR_CALM) => "h2_flood",
            Some(_) => "h2_protocol",
            None => "protocol",
        }
    }
}

/// What a request was sent to, for its metrics.
#[derive(Clone)]
struct Picked(Arc<Workload>);

async fn request(
    inputs: Arc<Inputs>,
    client: Arc<Client>,
    req: Request<Incoming>,
) -> Result<Response<RespBody>, Infallible> {
    let start = observe::Start::of(&inputs, &req, client.protocol);
    let grpc = start.grpc();
    let snap = inputs.state.snapshot();
    let service_label = snap.services.get(&client.service).map_or_else(
        || "unknown".to_string(),
        |s| format!("{}/{}", s.namespace, s.name),
    );
    // The rule, its rate limit, the backend and its balancer, all from one snapshot.
    let decided = decide(&snap, &client, &req)
        .and_then(|d| admit(&inputs, &client, &service_label, &d).map(|()| d))
        .and_then(|d| balancer(&inputs, &client, &snap, d.backend).map(|b| (d, b)));
    drop(snap);
    let route_label = decided
        .as_ref()
        .map_or_else(|_| "".to_string(), |(d, _)| d.route_label());
    let (resp, dst) = match decided {
        Err(resp) => (*resp, None),
        Ok((d, backend)) => {
            forward(
                &inputs,
                &client,
                d,
                backend,
                (&service_label, &route_label),
                req,
            )
            .await
        }
    };
    let src = Source {
        workload: &client.source.name,
        namespace: &client.source.namespace,
        principal: &client.source_id,
    };
    let resp = if grpc { for_grpc(resp) } else { resp };
    // Whether the request crossed to another node inside HBONE (for the tap event only).
    let mtls = start.published()
        && dst
            .as_deref()
            .is_some_and(|w| !inputs.state.snapshot().is_local(w));
    Ok(observe::observe(
        &inputs,
        "outbound",
        &src,
        &service_label,
        &route_label,
        dst.as_deref(),
        mtls,
        start,
        resp,
    ))
}

/// A route's local rate limit, per source workload: over it, 429 with `retry-after`.
fn admit(
    inputs: &Inputs,
    client: &Client,
    service_label: &str,
    d: &Decision,
) -> Result<(), Answer> {
    let Some((rule, limit)) = d.rule.as_ref().and_then(|r| r.rate_limit.map(|l| (r, l))) else {
        return Ok(());
    };
    let limiter = inputs.l7.limiter(&rule.route, limit);
    let Err(not_until) = limiter.check_key(&client.source.id) else {
        return Ok(());
    };
    use governor::clock::Clock as _;
    let wait = not_until.wait_time_from(limiter.clock().now());
    inputs
        .metrics
        .rate_limited
        .with_label_values(&[service_label, &rule.route, &client.source.name])
        .inc();
    let mut resp = local_response(
        StatusCode::TOO_MANY_REQUESTS,
        "rate_limited",
        &format!(
            "route {} allows {}/{} {} requests a second (burst {}); retry after {wait:?}",
            rule.route,
            client.source.namespace,
            client.source.name,
            limit.requests_per_second,
            limit.burst
        ),
    );
    // Whole seconds, rounded up (RFC 9110 §10.2.3).
    let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    resp.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from(secs.max(1)));
    Err(Box::new(resp))
}

/// A gRPC client reads a status, not an HTTP code: the proxy's own answers (those carrying
/// `x-nodemesh-error`) become trailers-only gRPC responses with the matching status (RESOURCE_EXHAUSTED
/// for a rate limit, PERMISSION_DENIED for a policy, UNAVAILABLE when no endpoint can answer).
/// An app's responses pass as they are.
fn for_grpc(resp: Response<RespBody>) -> Response<RespBody> {
    let Some(reason) = resp.headers().get(ERROR_HEADER).cloned() else {
        return resp;
    };
    if observe::is_grpc(resp.headers()) {
        // Already a gRPC answer (the destination's proxy made it).
        return resp;
    }
    let code: u8 = match resp.status() {
        StatusCode::BAD_REQUEST => 3,            // INVALID_ARGUMENT
        StatusCode::FORBIDDEN => 7,              // PERMISSION_DENIED
        StatusCode::NOT_FOUND => 12,             // UNIMPLEMENTED
        StatusCode::TOO_MANY_REQUESTS => 8,      // RESOURCE_EXHAUSTED
        StatusCode::GATEWAY_TIMEOUT => 4,        // DEADLINE_EXCEEDED
        StatusCode::INTERNAL_SERVER_ERROR => 13, // INTERNAL
        StatusCode::BAD_GATEWAY | StatusCode::SERVICE_UNAVAILABLE => 14, // UNAVAILABLE
        _ => 2,                                  // UNKNOWN
    };
    let mut out = local_response(StatusCode::OK, "", "");
    let h = out.headers_mut();
    h.insert(ERROR_HEADER, reason.clone());
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    h.insert("grpc-status", HeaderValue::from(u16::from(code)));
    // grpc-message is percent-encoded; the reason is a bounded token (`rate_limited`).
    h.insert("grpc-message", reason);
    if let Some(ra) = resp.headers().get(header::RETRY_AFTER) {
        h.insert(header::RETRY_AFTER, ra.clone());
    }
    out
}

/// The routing decision for one request.
struct Decision {
    rule: Option<Arc<routes::Rule>>,
    backend: SocketAddr,
    /// The request, rewritten.
    parts_uri: Option<http::Uri>,
    headers_modified: Option<HeaderMap>,
}

impl Decision {
    fn route_label(&self) -> String {
        self.rule
            .as_ref()
            .map_or_else(String::new, |r| r.route.clone())
    }
}

fn decide(
    snap: &crate::state::Snapshot,
    client: &Client,
    req: &Request<Incoming>,
) -> Result<Decision, Answer> {
    let Some(table) = snap
        .route_tables
        .get(&client.service)
        .filter(|t| !t.is_empty_for(&client.source.namespace))
    else {
        // No route: the service itself.
        return Ok(Decision {
            rule: None,
            backend: client.service,
            parts_uri: None,
            headers_modified: None,
        });
    };
    let view = routes::RequestView {
        method: req.method(),
        path: req.uri().path(),
        query: req.uri().query(),
        headers: req.headers(),
    };
    let Some(sel) = table.select(&client.source.namespace, &view) else {
        // GAMMA: with routes attached, a request none matches is not the service's.
        return Err(answer(
            StatusCode::NOT_FOUND,
            "no_route",
            "no route of this service matches the request",
        ));
    };
    if let Some(rd) = &sel.rule.redirect {
        let host = req
            .headers()
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .or_else(|| req.uri().authority().map(|a| a.as_str()))
            .unwrap_or_default();
        let location = routes::redirect_location(rd, sel.matched, req.uri(), host);
        let mut resp = local_response(rd.status, "", "");
        if let Ok(v) = HeaderValue::from_str(&location) {
            resp.headers_mut().insert(header::LOCATION, v);
        }
        return Err(Box::new(resp));
    }
    let total = routes::total_weight(&sel.rule.backends);
    let backend = if total == 0 {
        None
    } else {
        routes::pick_backend(&sel.rule.backends, rand::random_range(0..total))
    };
    let Some(backend) = backend else {
        // The spec: a rule without usable backends answers 500.
        return Err(answer(
            StatusCode::INTERNAL_SERVER_ERROR,
            "no_backend",
            "the matching route rule has no backend with weight",
        ));
    };
    let mut headers = None;
    let mut uri = None;
    if sel.rule.rewrite.is_some() || !sel.rule.request_headers.is_empty() {
        let mut h = req.headers().clone();
        if let Some(rw) = &sel.rule.rewrite {
            uri = Some(routes::apply_rewrite(rw, sel.matched, req.uri(), &mut h));
        }
        sel.rule.request_headers.apply(&mut h);
        headers = Some(h);
    }
    Ok(Decision {
        rule: Some(sel.rule.clone()),
        backend: backend.addr,
        parts_uri: uri,
        headers_modified: headers,
    })
}

async fn forward(
    inputs: &Arc<Inputs>,
    client: &Arc<Client>,
    d: Decision,
    backend: Arc<BackendRef>,
    labels: (&str, &str),
    mut req: Request<Incoming>,
) -> (Response<RespBody>, Option<Arc<Workload>>) {
    let (service_label, route_label) = labels;
    // An HTTP/1.1 upgrade (WebSocket, ...): the two hop-by-hop headers that ask for it go on to
    // the endpoint, and after its 101 the two connections are joined as bytes.
    let upgrade = upgrade_of(req.headers());
    let client_side = upgrade.is_some().then(|| hyper::upgrade::on(&mut req));
    let (mut parts, body) = req.into_parts();
    if let Some(u) = d.parts_uri {
        parts.uri = u;
    }
    if let Some(h) = d.headers_modified {
        parts.headers = h;
    }
    strip_hop_by_hop(&mut parts.headers);
    keep_upgrade(&mut parts.headers, upgrade.as_ref());
    let timeouts = d.rule.as_ref().map(|r| r.timeouts).unwrap_or_default();
    let policy = d.rule.as_ref().and_then(|r| r.retry.as_ref());
    // What may be sent again: a body kept in memory. Without a route's retry policy only a
    // request without a body is, and only when no connection could be made (it never reached
    // the app); with one, an idempotent request whose body is at most MAX_REPLAY is kept and
    // retried on the policy's status codes too. Upgrades and bigger bodies stream, once.
    let idempotent = matches!(
        parts.method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE | Method::TRACE
    );
    let keep = upgrade.is_none()
        && (body.is_end_stream() || (policy.is_some() && idempotent && small(&parts.headers)));
    let (replay, mut stream) = if !keep {
        (None, Some(body.boxed()))
    } else if body.is_end_stream() {
        (Some(Bytes::new()), None)
    } else {
        match http_body_util::Limited::new(body, MAX_REPLAY)
            .collect()
            .await
        {
            Ok(c) => (Some(c.to_bytes()), None),
            Err(e) => {
                return (
                    local_response(
                        StatusCode::BAD_REQUEST,
                        "bad_body",
                        &format!("the request body could not be read: {e}"),
                    ),
                    None,
                );
            }
        }
    };
    let status_retries = policy.is_some() && idempotent;
    let (max_retries, codes, backoff) = match policy {
        Some(p) => (
            p.attempts,
            p.codes.as_slice(),
            p.backoff.unwrap_or(RETRY_BACKOFF),
        ),
        None => (1, &[][..], RETRY_BACKOFF),
    };
    let budget = backend.budget.clone();
    let run = async {
        budget.deposit();
        let body = |stream: &mut Option<ReqBody>| match &replay {
            Some(b) => Full::new(b.clone()).map_err(|never| match never {}).boxed(),
            None => stream.take().unwrap_or_else(|| {
                Full::new(Bytes::new())
                    .map_err(|never| match never {})
                    .boxed()
            }),
        };
        let mut outcome = attempt(
            &backend.balancer,
            &parts,
            body(&mut stream),
            timeouts.backend_request,
        )
        .await;
        let mut retried = 0;
        while replay.is_some() && retried < max_retries && outcome.retryable(status_retries, codes)
        {
            if !budget.withdraw() {
                inputs
                    .metrics
                    .retries
                    .with_label_values(&[service_label, route_label, "budget_exhausted"])
                    .inc();
                break;
            }
            inputs
                .metrics
                .retries
                .with_label_values(&[service_label, route_label, "retried"])
                .inc();
            tokio::time::sleep((backoff * 2u32.pow(retried.min(6))).min(MAX_RETRY_BACKOFF)).await;
            retried += 1;
            outcome = attempt(
                &backend.balancer,
                &parts,
                body(&mut stream),
                timeouts.backend_request,
            )
            .await;
        }
        outcome
    };
    let outcome = match timeouts.request {
        Some(t) => tokio::time::timeout(t, run)
            .await
            .unwrap_or(Attempt::TimedOut),
        None => run.await,
    };
    let result = match outcome {
        Attempt::Answered(r) => Ok(r),
        Attempt::Failed(e) => Err(e),
        Attempt::TimedOut => {
            return (
                local_response(
                    StatusCode::GATEWAY_TIMEOUT,
                    "timeout",
                    "the route's timeout passed before the backend answered",
                ),
                None,
            );
        }
    };
    match result {
        Ok(mut resp) => {
            let picked = resp.extensions().get::<Picked>().map(|p| p.0.clone());
            let switched = resp.status() == StatusCode::SWITCHING_PROTOCOLS;
            let response_upgrade = if switched {
                upgrade_of(resp.headers())
            } else {
                None
            };
            if let (Some(client_side), true) = (client_side, switched) {
                join_upgrade(inputs, client_side, &mut resp);
            }
            let (mut parts, body) = resp.into_parts();
            strip_hop_by_hop(&mut parts.headers);
            keep_upgrade(&mut parts.headers, response_upgrade.as_ref());
            if let Some(rule) = &d.rule {
                rule.response_headers.apply(&mut parts.headers);
            }
            (Response::from_parts(parts, body.boxed()), picked)
        }
        Err(e) => {
            let (status, reason) = match refusal(&e) {
                Some(r) => (r.status, r.reason),
                None => (StatusCode::BAD_GATEWAY, "upstream_failed"),
            };
            // The endpoint that failed, when one was picked: the request's destination workload.
            let at = e.downcast_ref::<AtEndpoint>().map(|a| a.workload.clone());
            warn!(source = %client.source.display(), backend = %d.backend, endpoint = ?at.as_ref().map(|w| w.display()), error = %e, "request failed");
            (local_response(status, reason, &e.to_string()), at)
        }
    }
}

/// Largest body kept in memory so a request can be retried.
const MAX_REPLAY: usize = 64 << 10;
/// First wait before a retry when the route gives no backoff; it doubles per retry.
const RETRY_BACKOFF: Duration = Duration::from_millis(10);
const MAX_RETRY_BACKOFF: Duration = Duration::from_secs(1);

/// Whether a body's declared length lets it be kept for a retry.
fn small(h: &HeaderMap) -> bool {
    h.get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok())
        .is_some_and(|n| n <= MAX_REPLAY)
}

/// One attempt's outcome.
enum Attempt {
    Answered(Response<Incoming>),
    Failed(BoxError),
    TimedOut,
}

impl Attempt {
    /// Worth another attempt: no connection could be made (the request never reached the app),
    /// or (`statuses`) the endpoint answered with one of the policy's codes.
    fn retryable(&self, statuses: bool, codes: &[u16]) -> bool {
        match self {
            Attempt::Answered(r) => statuses && codes.contains(&r.status().as_u16()),
            Attempt::Failed(e) => refusal(e).is_some_and(|r| r.retryable),
            Attempt::TimedOut => false,
        }
    }
}

async fn attempt(
    balancer: &Balanced,
    parts: &http::request::Parts,
    body: ReqBody,
    limit: Option<Duration>,
) -> Attempt {
    let req = Request::from_parts(parts.clone(), body);
    // Boxed with its concrete type: the buffer's future otherwise defeats the Send check of
    // hyper's HTTP/2 executor (a higher-ranked lifetime in the error conversion).
    let call: BoxFuture<Result<Response<Incoming>, BoxError>> =
        Box::pin(balancer.clone().oneshot(req));
    let r = match limit {
        Some(t) => match tokio::time::timeout(t, call).await {
            Ok(r) => r,
            Err(_) => return Attempt::TimedOut,
        },
        None => call.await,
    };
    match r {
        Ok(resp) => Attempt::Answered(resp),
        Err(e) => Attempt::Failed(e),
    }
}

/// A backend's balancer and retry budget, as one request uses them.
pub struct BackendRef {
    balancer: Balanced,
    budget: Arc<TpsBudget>,
}

/// The balancer for (source, backend), rebuilt when the backend's endpoints change.
fn balancer(
    inputs: &Arc<Inputs>,
    client: &Arc<Client>,
    snap: &crate::state::Snapshot,
    backend: SocketAddr,
) -> Result<Arc<BackendRef>, Answer> {
    let Some(svc) = snap.services.get(&backend).cloned() else {
        return Err(answer(
            StatusCode::SERVICE_UNAVAILABLE,
            "no_service",
            "the backend service is no longer in the mesh",
        ));
    };
    if svc.endpoints.is_empty() {
        return Err(answer(
            StatusCode::SERVICE_UNAVAILABLE,
            route::NO_ENDPOINTS,
            &format!("service {}/{} has no endpoints", svc.namespace, svc.name),
        ));
    }
    let h2 = client.protocol == Protocol::Http2;
    let key = BalancerKey {
        source: client.source.id,
        backend,
        h2,
    };
    let mut balancers = lock(&inputs.l7.balancers);
    // The common case, per request: the same endpoints as last time (compared, not collected).
    if let Some(b) = balancers.get(&key)
        && b.endpoints.len() == svc.endpoints.len()
        && b.endpoints
            .iter()
            .zip(&svc.endpoints)
            .all(|(a, e)| *a == e.addr)
    {
        if b.all_ejected(Instant::now()) {
            return Err(answer(
                StatusCode::SERVICE_UNAVAILABLE,
                "endpoints_ejected",
                &format!(
                    "every endpoint of {}/{} failed repeatedly and is ejected by its circuit \
                     breaker; they are probed again after their backoff",
                    svc.namespace, svc.name
                ),
            ));
        }
        return Ok(Arc::new(BackendRef {
            balancer: b.balancer.clone(),
            budget: b.budget.clone(),
        }));
    }
    let addrs: Vec<SocketAddr> = svc.endpoints.iter().map(|e| e.addr).collect();
    let pools: Vec<Arc<Pool>> = svc
        .endpoints
        .iter()
        .map(|e| pool(inputs, client, e.addr, h2))
        .collect();
    let endpoints: Vec<_> = svc
        .endpoints
        .iter()
        .zip(&pools)
        .map(|(e, pool)| {
            let pool = pool.clone();
            PeakEwma::new(
                Endpoint {
                    inner: Arc::new(EndpointInner {
                        inputs: inputs.clone(),
                        client: client.clone(),
                        service: svc.clone(),
                        target: e.addr,
                        workload: e.workload.clone(),
                        pool,
                    }),
                    warming: None,
                    ejected: None,
                },
                DEFAULT_RTT,
                DECAY.as_nanos() as f64,
                tower::load::CompleteOnResponse::default(),
            )
        })
        .collect();
    let balance = Balance::new(ServiceList::new(endpoints));
    let boxed = tower::util::BoxService::new(balance);
    // Buffer spawns the balancer's worker; it must run on the data-plane runtime (we are on it).
    let b = Buffer::new(boxed, 1024);
    // The budget outlives a rebuild of the balancer (a change of endpoints).
    let budget = balancers.get(&key).map_or_else(
        || Arc::new(TpsBudget::new(Duration::from_secs(10), 10, 0.2)),
        |old| old.budget.clone(),
    );
    balancers.insert(
        key,
        Backend {
            endpoints: addrs,
            pools,
            balancer: b.clone(),
            budget: budget.clone(),
        },
    );
    inputs
        .metrics
        .state_entries
        .with_label_values(&["l7_balancers"])
        .set(balancers.len() as i64);
    Ok(Arc::new(BackendRef {
        balancer: b,
        budget,
    }))
}

fn pool(inputs: &Arc<Inputs>, client: &Client, endpoint: SocketAddr, h2: bool) -> Arc<Pool> {
    let key = PoolKey {
        source: client.source.id,
        endpoint,
        h2,
    };
    let mut pools = lock(&inputs.l7.pools);
    let p = pools
        .entry(key)
        .or_insert_with(|| Arc::new(Pool::default()))
        .clone();
    inputs
        .metrics
        .state_entries
        .with_label_values(&["l7_pools"])
        .set(pools.len() as i64);
    p
}

/// An endpoint's error, with the endpoint: a failed request still names its destination.
#[derive(Debug)]
struct AtEndpoint {
    workload: Arc<Workload>,
    error: BoxError,
}

impl std::fmt::Display for AtEndpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.error.fmt(f)
    }
}

impl std::error::Error for AtEndpoint {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.error.source()
    }
}

/// The refusal `e` is, directly or from an endpoint.
fn refusal(e: &BoxError) -> Option<&Refused> {
    e.downcast_ref::<Refused>().or_else(|| {
        e.downcast_ref::<AtEndpoint>()
            .and_then(|a| a.error.downcast_ref::<Refused>())
    })
}

/// A refusal decided on the way to an endpoint (policy, no certificate, tunnel refused).
#[derive(Debug, thiserror::Error)]
#[error("{detail}")]
struct Refused {
    status: StatusCode,
    reason: &'static str,
    detail: String,
    /// No connection could be made, so the request never reached the app: safe to send again.
    retryable: bool,
}

/// A pooled connection that closed before it sent the request (the far end ended it while it
/// was idle): the request never left, so it may go again; not the endpoint's failure.
fn unsent(e: hyper::Error) -> BoxError {
    if e.is_canceled() || e.is_closed() {
        Box::new(Refused {
            status: StatusCode::BAD_GATEWAY,
            reason: UNSENT,
            detail: format!("the pooled connection closed before the request was sent: {e}"),
            retryable: true,
        })
    } else {
        Box::new(e)
    }
}

const UNSENT: &str = "connection_closed";

impl Refused {
    fn connect(e: impl std::fmt::Display) -> Box<Self> {
        Box::new(Refused {
            status: StatusCode::BAD_GATEWAY,
            reason: "connect_failed",
            detail: e.to_string(),
            retryable: true,
        })
    }
}

/// One endpoint, as a tower service the balancer picks among. An HTTP/2 endpoint connects in
/// `poll_ready` (as linkerd2-proxy's endpoint stacks do), so the balancer picks among endpoints
/// that can take a request now, and a connection's handshake never counts as a request's latency
/// in the peak-EWMA (one slow handshake would otherwise starve an endpoint for the decay time).
struct Endpoint {
    inner: Arc<EndpointInner>,
    warming: Option<BoxFuture<()>>,
    /// The end of the breaker's backoff, while ejected.
    ejected: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
}

struct EndpointInner {
    inputs: Arc<Inputs>,
    client: Arc<Client>,
    service: Arc<MeshService>,
    target: SocketAddr,
    workload: Arc<Workload>,
    pool: Arc<Pool>,
}

impl Service<Request<ReqBody>> for Endpoint {
    type Response = Response<Incoming>;
    type Error = BoxError;
    type Future = BoxFuture<Result<Response<Incoming>, BoxError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // Ejected by its breaker: not ready (the balancer picks among the others) until the
        // backoff ends; then it takes requests again and the next result decides.
        let ejected = lock(&self.inner.pool.breaker).ejected_until();
        if let Some(until) = ejected {
            let until = tokio::time::Instant::from_std(until);
            let sleep = match &mut self.ejected {
                Some(s) if s.deadline() == until => s,
                slot => slot.insert(Box::pin(tokio::time::sleep_until(until))),
            };
            if sleep.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            self.ejected = None;
            lock(&self.inner.pool.breaker).readmit();
        }
        if self.inner.client.protocol == Protocol::Http2 {
            if self.warming.is_none() && !self.inner.h2_live() {
                let inner = self.inner.clone();
                self.warming = Some(Box::pin(async move {
                    // A failure here is reported by the request that tries again in `call`.
                    let _ = inner.h2_sender().await;
                }));
            }
            if let Some(f) = self.warming.as_mut() {
                if f.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                self.warming = None;
            }
        }
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<ReqBody>) -> Self::Future {
        let ep = self.inner.clone();
        Box::pin(async move {
            let result = ep.send(req).await;
            // What the endpoint did: a 5xx, or no connection to it. A policy's refusal, or a stream
            // error on a live connection (a concurrency limit, a reset under load), is not its
            // failure; and a backend's only endpoint is never ejected (nobody would take its
            // requests, they would wait for the backoff instead).
            let failed = match &result {
                Ok(r) => Some(r.status().is_server_error()),
                Err(e) => e
                    .downcast_ref::<Refused>()
                    .filter(|r| r.retryable && r.reason != UNSENT)
                    .map(|_| true),
            };
            let ejected = match failed {
                Some(failed) if ep.service.endpoints.len() > 1 => {
                    lock(&ep.pool.breaker).record(!failed, Instant::now())
                }
                _ => None,
            };
            if let Some(backoff) = ejected {
                warn!(endpoint = %ep.target, workload = %ep.workload.display(), ?backoff, "endpoint ejected after consecutive failures; probing it again after the backoff");
                ep.inputs
                    .metrics
                    .ejections
                    .with_label_values(&[
                        &format!("{}/{}", ep.service.namespace, ep.service.name),
                        &ep.workload.name,
                    ])
                    .inc();
            }
            let mut resp = result.map_err(|error| {
                Box::new(AtEndpoint {
                    workload: ep.workload.clone(),
                    error,
                }) as BoxError
            })?;
            resp.extensions_mut().insert(Picked(ep.workload.clone()));
            Ok(resp)
        })
    }
}

impl EndpointInner {
    /// Whether a usable HTTP/2 connection is pooled (one being made counts as not yet).
    fn h2_live(&self) -> bool {
        self.pool
            .h2
            .try_lock()
            .is_ok_and(|g| g.as_ref().is_some_and(|s| !s.is_closed()))
    }

    /// The pooled HTTP/2 connection, made if there is none (one at a time).
    async fn h2_sender(
        &self,
    ) -> Result<hyper::client::conn::http2::SendRequest<ReqBody>, BoxError> {
        let mut guard = self.pool.h2.lock().await;
        if let Some(s) = guard.as_ref().filter(|s| !s.is_closed()) {
            return Ok(s.clone());
        }
        let (decision, source_ip) = {
            let snap = self.inputs.state.snapshot();
            (route::route(&snap, self.target), snap.mesh_source())
        };
        let io = self.open(&decision, source_ip).await?;
        let (s, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .initial_stream_window_size(hbone::STREAM_WINDOW)
            .initial_connection_window_size(hbone::CONNECTION_WINDOW)
            .max_header_list_size(MAX_HEADERS as u32)
            .handshake(TokioIo::new(io))
            .await
            .map_err(Refused::connect)?;
        self.inputs.drain.spawn(async move {
            if let Err(e) = conn.await {
                debug!(error = %e, "HTTP/2 endpoint connection ended");
            }
        });
        *guard = Some(s.clone());
        Ok(s)
    }

    async fn send(&self, mut req: Request<ReqBody>) -> Result<Response<Incoming>, BoxError> {
        let snap = self.inputs.state.snapshot();
        let decision = route::route(&snap, self.target);
        // Same node: this proxy is the destination's too, and enforces its policies per request.
        if let Route::Local { target, workload } = &decision {
            let attrs = crate::authz::RequestAttrs {
                method: req.method().as_str(),
                path: req.uri().path(),
                headers: req.headers(),
            };
            let checked = route::authorize(
                &snap,
                &self.client.source_id,
                workload,
                target.port(),
                crate::authz::Check::Request(&attrs),
            );
            self.inputs
                .count_verdict(checked.as_ref().map_or_else(|r| r.verdict.as_ref(), Some));
            if let Err(r) = checked {
                return Err(Box::new(Refused {
                    status: StatusCode::FORBIDDEN,
                    reason: "denied",
                    detail: r.detail,
                    retryable: false,
                }));
            }
            let dst_id = workload.identity(self.inputs.identity.trust_domain());
            client_headers(
                req.headers_mut(),
                &dst_id,
                &self.client.source_id,
                Some(self.client.source.ip.into()),
            );
        }
        let source_ip = snap.mesh_source();
        drop(snap);
        if self.client.protocol == Protocol::Http2 {
            let mut sender = self.h2_sender().await?;
            sender.ready().await.map_err(unsent)?;
            sender.send_request(req).await.map_err(unsent)
        } else {
            let idle = {
                let mut idle = lock(&self.pool.h1);
                let mut found = None;
                while let Some(s) = idle.pop() {
                    if s.is_ready() {
                        found = Some(s);
                        break;
                    }
                }
                found
            };
            let mut sender = match idle {
                Some(s) => s,
                None => {
                    let io = self.open(&decision, source_ip).await?;
                    let (s, conn) = hyper::client::conn::http1::Builder::new()
                        .max_buf_size(MAX_HEADERS.max(8192))
                        .handshake(TokioIo::new(io))
                        .await
                        .map_err(Refused::connect)?;
                    self.inputs.drain.spawn(async move {
                        if let Err(e) = conn.with_upgrades().await {
                            debug!(error = %e, "HTTP/1.1 endpoint connection ended");
                        }
                    });
                    s
                }
            };
            let resp = sender.send_request(req).await.map_err(unsent)?;
            // Back to the pool once the response's body is read (HTTP/1.1 carries one exchange
            // at a time).
            let pool = self.pool.clone();
            tokio::spawn(async move {
                if sender.ready().await.is_ok() {
                    let mut idle = lock(&pool.h1);
                    if idle.len() < IDLE_PER_ENDPOINT {
                        idle.push(sender);
                    }
                }
            });
            Ok(resp)
        }
    }

    /// A new connection to the endpoint: TCP to a local pod, an HBONE tunnel to a remote one.
    async fn open(
        &self,
        decision: &Route,
        source_ip: Option<std::net::IpAddr>,
    ) -> Result<Upstream, BoxError> {
        match decision {
            Route::Local { target, workload } => {
                // Pooled per source workload: the client is that pod, with no one port.
                let client = SocketAddr::new(self.client.source.ip.into(), 0);
                let s = super::proxyproto::connect_pod(
                    *target,
                    self.inputs.proxy_mark,
                    source_ip,
                    workload,
                    Some(client),
                )
                .await
                .map_err(Refused::connect)?;
                let _ = s.set_nodelay(true);
                Ok(Upstream::Tcp(s))
            }
            Route::Remote {
                via,
                target,
                workload,
            } => {
                let src_id = &self.client.source_id;
                if self
                    .inputs
                    .identity
                    .wait_for(src_id, hbone::SVID_WAIT)
                    .await
                    .is_none()
                {
                    return Err(Box::new(Refused {
                        status: StatusCode::SERVICE_UNAVAILABLE,
                        reason: "no_certificate",
                        detail: format!(
                            "no SVID for {src_id} yet (is the CA reachable?): not sending plaintext"
                        ),
                        retryable: false,
                    }));
                }
                let td = self.inputs.identity.trust_domain().to_string();
                let dst_id = workload.identity(&td);
                let ends = hbone::Ends {
                    source: src_id,
                    source_workload: &self.client.source.display(),
                    destination: &dst_id,
                    // The destination serves the tunnel as HTTP and checks each request.
                    protocol: Some(self.client.protocol.label()),
                    // Pooled: no one client connection, so no port.
                    client: Some(SocketAddr::new(self.client.source.ip.into(), 0)),
                };
                match self.inputs.hbone.connect(*via, *target, ends).await {
                    Ok(t) => Ok(Upstream::Tunnel(t)),
                    Err(e) => Err(Box::new(Refused {
                        status: StatusCode::BAD_GATEWAY,
                        reason: e.reason(),
                        detail: e.to_string(),
                        // The destination proxy's refusal (a policy, not a local pod) stands.
                        retryable: !matches!(e, hbone::HboneError::Refused { .. }),
                    })),
                }
            }
            Route::Passthrough(_) | Route::Refuse(_) => Err(Box::new(Refused {
                status: StatusCode::BAD_GATEWAY,
                reason: "not_meshed",
                detail: format!(
                    "endpoint {} of {}/{} is not a meshed pod",
                    self.target, self.service.namespace, self.service.name
                ),
                retryable: false,
            })),
        }
    }
}

/// After an endpoint's 101: the client's connection and the endpoint's are joined as bytes until
/// both end (or the drain's deadline).
fn join_upgrade(
    inputs: &Inputs,
    client_side: hyper::upgrade::OnUpgrade,
    resp: &mut Response<Incoming>,
) {
    let endpoint_side = hyper::upgrade::on(resp);
    let deadline = inputs.drain.clone();
    inputs.drain.spawn(async move {
        let joined = async {
            let (c, e) = tokio::try_join!(client_side, endpoint_side)?;
            let (mut c, mut e) = (TokioIo::new(c), TokioIo::new(e));
            tokio::io::copy_bidirectional(&mut c, &mut e)
                .await
                .map_err(BoxError::from)
        };
        tokio::select! {
            r = joined => {
                if let Err(e) = r {
                    debug!(error = %e, "upgraded connection ended with an error");
                }
            }
            () = deadline.deadline() => {}
        }
    });
}

/// The protocol an HTTP/1.1 message asks to upgrade to (`Connection: upgrade` with `Upgrade`).
fn upgrade_of(h: &HeaderMap) -> Option<HeaderValue> {
    let asked = h
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("upgrade"));
    asked
        .then(|| h.get(header::UPGRADE).cloned())
        .flatten()
        // An `h2c` upgrade is dropped (as linkerd2-proxy does): the connection stays HTTP/1.1 at
        // L7 rather than becoming opaque bytes after a 101.
        .filter(|u| !u.as_bytes().eq_ignore_ascii_case(b"h2c"))
}

/// Puts back the two hop-by-hop headers of an upgrade, which the next hop needs.
fn keep_upgrade(h: &mut HeaderMap, upgrade: Option<&HeaderValue>) {
    if let Some(u) = upgrade {
        h.insert(header::UPGRADE, u.clone());
        h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
}

/// RFC 9110 §7.6.1: headers for this hop only are not forwarded (`TE: trailers` is, for gRPC).
fn strip_hop_by_hop(h: &mut HeaderMap) {
    let listed: Vec<http::HeaderName> = h
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| http::HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for n in listed {
        if n != header::TE {
            h.remove(n);
        }
    }
    for n in [
        header::CONNECTION,
        header::PROXY_AUTHENTICATE,
        header::UPGRADE,
        header::TRAILER,
    ] {
        h.remove(n);
    }
    h.remove("keep-alive");
    h.remove("proxy-connection");
    if h.get(header::TE).is_some_and(|v| v != "trailers") {
        h.remove(header::TE);
    }
}

/// A response the proxy answers with instead of forwarding (boxed: it is the rare path).
type Answer = Box<Response<RespBody>>;

fn answer(status: StatusCode, reason: &str, detail: &str) -> Answer {
    Box::new(local_response(status, reason, detail))
}

/// A response the proxy makes itself, with its reason in `x-nodemesh-error`.
fn local_response(status: StatusCode, reason: &str, detail: &str) -> Response<RespBody> {
    let body = if detail.is_empty() {
        Bytes::new()
    } else {
        Bytes::from(format!("{detail}\n"))
    };
    let mut resp = Response::new(Full::new(body).map_err(|never| match never {}).boxed());
    *resp.status_mut() = status;
    if !reason.is_empty()
        && let Ok(v) = HeaderValue::from_str(reason)
    {
        resp.headers_mut().insert(ERROR_HEADER, v);
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_stay_on_their_hop() {
        let mut h = HeaderMap::new();
        for (n, v) in [
            ("connection", "keep-alive, x-private"),
            ("keep-alive", "timeout=5"),
            ("x-private", "1"),
            ("upgrade", "h2c"),
            ("te", "trailers"),
            ("host", "echo"),
            ("traceparent", "00-abc-def-01"),
        ] {
            h.append(n, v.parse().expect("value"));
        }
        strip_hop_by_hop(&mut h);
        let mut left: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        left.sort_unstable();
        assert_eq!(left, ["host", "te", "traceparent"]);
    }

    #[test]
    fn the_proxys_own_answers_reach_grpc_clients_as_statuses() {
        for (status, reason, code) in [
            (StatusCode::TOO_MANY_REQUESTS, "rate_limited", "8"),
            (StatusCode::FORBIDDEN, "denied", "7"),
            (StatusCode::SERVICE_UNAVAILABLE, "endpoints_ejected", "14"),
            (StatusCode::GATEWAY_TIMEOUT, "timeout", "4"),
            (StatusCode::NOT_FOUND, "no_route", "12"),
        ] {
            let mut resp = local_response(status, reason, "detail");
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            let g = for_grpc(resp);
            assert_eq!(g.status(), StatusCode::OK, "{reason}");
            assert_eq!(g.headers()["grpc-status"], code, "{reason}");
            assert_eq!(g.headers()["grpc-message"], reason);
            assert_eq!(g.headers()["content-type"], "application/grpc");
            assert!(g.body().is_end_stream(), "trailers-only: no body");
        }
        // Converted once: the destination proxy's answer passes the source's unchanged.
        let twice = for_grpc(for_grpc(local_response(
            StatusCode::FORBIDDEN,
            "denied",
            "",
        )));
        assert_eq!(twice.headers()["grpc-status"], "7");
        // An app's own response is the app's.
        let mut app = local_response(StatusCode::SERVICE_UNAVAILABLE, "", "");
        app.headers_mut().remove(ERROR_HEADER);
        assert_eq!(for_grpc(app).status(), StatusCode::SERVICE_UNAVAILABLE);
    }
}
