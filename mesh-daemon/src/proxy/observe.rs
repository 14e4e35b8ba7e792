//! One L7 request's observation, made when its response ends: `nodemesh_requests_total` with the
//! status code, its class, the classification and (gRPC) the status from the trailers;
//! `nodemesh_request_duration_seconds` from the request's headers to the response's end (what
//! linkerd2-proxy's `response_latency` measures); a `request` event for `/tap` followers and the
//! JSON access log. The response body is wrapped so its end is seen without buffering it.

use std::{
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Instant,
};

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::BodyExt as _;
use hyper::body::{Body, Frame, SizeHint};

use super::{Inputs, detect::Protocol};
use crate::{
    identity::Identity,
    state::Workload,
    tap::{HttpEvent, TapEvent},
};

pub type RespBody = http_body_util::combinators::BoxBody<Bytes, hyper::Error>;

/// Who sent a request, for its metrics: workload name, namespace, principal.
pub struct Source<'a> {
    pub workload: &'a str,
    pub namespace: &'a str,
    pub principal: &'a Identity,
}

/// What a request asked for, kept only while someone taps or the access log is on.
struct Asked {
    method: String,
    authority: String,
    path: String,
    protocol: &'static str,
}

/// Captures, at the request's start, what the observation will need at the response's end.
pub struct Start {
    at: Instant,
    grpc: bool,
    asked: Option<Box<Asked>>,
}

impl Start {
    pub fn of<B>(inputs: &Inputs, req: &Request<B>, protocol: Protocol) -> Self {
        let grpc = is_grpc(req.headers());
        let asked = (inputs.tap.active() || inputs.access_log.enabled()).then(|| {
            let authority = req
                .uri()
                .authority()
                .map(|a| a.as_str())
                .or_else(|| {
                    req.headers()
                        .get(http::header::HOST)
                        .and_then(|h| h.to_str().ok())
                })
                .unwrap_or_default();
            Box::new(Asked {
                method: req.method().as_str().to_string(),
                authority: authority.to_string(),
                path: req.uri().path().to_string(),
                protocol: protocol.label(),
            })
        });
        Self {
            at: Instant::now(),
            grpc,
            asked,
        }
    }

    pub fn grpc(&self) -> bool {
        self.grpc
    }

    /// Whether a `/tap` follower or the access log will see this request (then the event's
    /// details are worth working out).
    pub fn published(&self) -> bool {
        self.asked.is_some()
    }
}

pub fn is_grpc(h: &HeaderMap) -> bool {
    h.get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"))
}

/// A gRPC status code as sent (`grpc-status: 14`), if it is one.
fn grpc_code(h: &HeaderMap) -> Option<u8> {
    h.get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u8>().ok())
        .filter(|c| *c <= 16)
}

/// Wraps `resp`'s body so the request is counted, timed and published when it ends.
#[allow(clippy::too_many_arguments)] // each is one label group of the request families
pub fn observe(
    inputs: &Arc<Inputs>,
    reporter: &'static str,
    src: &Source<'_>,
    service: &str,
    route: &str,
    dst: Option<&Workload>,
    mtls: bool,
    start: Start,
    resp: Response<RespBody>,
) -> Response<RespBody> {
    let td = inputs.identity.trust_domain();
    let labels = [
        reporter.to_string(),
        src.workload.to_string(),
        src.namespace.to_string(),
        src.principal.to_string(),
        dst.map_or("unknown".into(), |w| w.name.clone()),
        dst.map_or("unknown".into(), |w| w.namespace.clone()),
        dst.map_or("unknown".into(), |w| w.identity(td).to_string()),
        service.to_string(),
        route.to_string(),
    ];
    let status = resp.status();
    // A trailers-only gRPC response has its status in the headers.
    let grpc_status = if start.grpc {
        grpc_code(resp.headers())
    } else {
        None
    };
    let destination = dst.map(|w| w.ip.to_string()).unwrap_or_default();
    // The proxy's own answer (a policy's deny, a rate limit, no endpoint) says why on tap.
    let refused = resp
        .headers()
        .get(super::hbone::ERROR_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let ends = Ends {
        refused,
        inputs: inputs.clone(),
        labels,
        status,
        grpc_status,
        start,
        destination,
        mtls,
    };
    resp.map(|body| {
        Observed {
            inner: body,
            ends: Some(ends),
        }
        .boxed()
    })
}

/// What is recorded when the response ends.
struct Ends {
    inputs: Arc<Inputs>,
    labels: [String; 9],
    status: StatusCode,
    grpc_status: Option<u8>,
    start: Start,
    destination: String,
    mtls: bool,
    /// Why the proxy answered itself (`x-nodemesh-error`), if it did.
    refused: Option<String>,
}

impl Ends {
    fn finish(self, broken: bool) {
        let elapsed = self.start.at.elapsed();
        let code = self.status.as_u16();
        let failure = code >= 500 || broken || self.grpc_status.is_some_and(|c| c != 0);
        let grpc_status = self.grpc_status.map(|c| c.to_string()).unwrap_or_default();
        let code_s = code.to_string();
        let class = format!("{}xx", code / 100);
        let l = &self.labels;
        let all: [&str; 13] = [
            &l[0],
            &l[1],
            &l[2],
            &l[3],
            &l[4],
            &l[5],
            &l[6],
            &l[7],
            &l[8],
            &code_s,
            &class,
            if failure { "failure" } else { "success" },
            &grpc_status,
        ];
        let m = &self.inputs.metrics;
        m.requests.with_label_values(&all).inc();
        m.request_duration
            .with_label_values(&all[..9])
            .observe(elapsed.as_secs_f64());
        let Some(asked) = self.start.asked else {
            return;
        };
        let event = Arc::new(TapEvent {
            ts: crate::tap::now_ts(),
            event: "request",
            reporter: l[0].clone(),
            source_workload: l[1].clone(),
            source_namespace: l[2].clone(),
            source_principal: l[3].clone(),
            destination_workload: l[4].clone(),
            destination_namespace: l[5].clone(),
            destination_principal: l[6].clone(),
            destination: self.destination,
            route: if l[0] == "inbound" { "inbound" } else { "l7" },
            mtls: self.mtls,
            bytes_sent: None,
            bytes_received: None,
            reason: self
                .refused
                .or_else(|| broken.then(|| "the response stream broke".to_string())),
            http: Some(Box::new(HttpEvent {
                method: asked.method,
                authority: asked.authority,
                path: asked.path,
                status: code,
                grpc_status: self.grpc_status,
                latency_ms: elapsed.as_secs_f64() * 1000.0,
                http_route: l[8].clone(),
                service: l[7].clone(),
                protocol: asked.protocol,
            })),
        });
        if self.inputs.access_log.enabled() && !self.inputs.access_log.log(event.clone()) {
            m.access_log_dropped.inc();
        }
        self.inputs.tap.emit(|| (*event).clone());
    }
}

/// A response body that records its request when it ends (or is dropped unfinished: the client
/// went away).
struct Observed {
    inner: RespBody,
    ends: Option<Ends>,
}

impl Body for Observed {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let (Some(t), Some(ends)) = (frame.trailers_ref(), this.ends.as_mut())
                    && ends.start.grpc
                {
                    ends.grpc_status = grpc_code(t).or(ends.grpc_status);
                }
                if this.inner.is_end_stream()
                    && let Some(e) = this.ends.take()
                {
                    e.finish(false);
                }
            }
            Poll::Ready(Some(Err(_))) => {
                if let Some(e) = this.ends.take() {
                    e.finish(true);
                }
            }
            Poll::Ready(None) => {
                if let Some(e) = this.ends.take() {
                    e.finish(false);
                }
            }
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Observed {
    fn drop(&mut self) {
        if let Some(e) = self.ends.take() {
            // An empty body is never polled; one dropped half-read: the client left (its own
            // doing, not the server's failure).
            e.finish(false);
        }
    }
}
