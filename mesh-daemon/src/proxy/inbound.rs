//! Inbound: the HBONE listener (:15008) that other nodes' proxies tunnel to, and the last hop to a
//! local pod shared with same-node traffic.
//!
//! A tunnel is accepted only to a meshed pod scheduled on this node: never to the node's own
//! addresses or ports, loopback, or a pod elsewhere (no confused deputy). The proxy connects to
//! the pod from the node's mesh source address, the one source STRICT pods accept.

use std::{convert::Infallible, net::SocketAddr, sync::Arc, time::Duration};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Empty;
use hyper::{body::Incoming, service::service_fn};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, info, warn};

use super::{Inputs, hbone};
use crate::state::{Snapshot, Workload};

#[derive(Debug, thiserror::Error)]
pub enum InboundError {
    #[error(
        "cannot listen on {addr} for HBONE from other nodes: {source}; free the port, or fix the \
         node's address in the mesh file"
    )]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

pub struct Inbound {
    listener: TcpListener,
    inputs: Arc<Inputs>,
}

impl Inbound {
    pub async fn bind(addr: SocketAddr) -> Result<TcpListener, InboundError> {
        TcpListener::bind(addr)
            .await
            .map_err(|source| InboundError::Bind { addr, source })
    }

    pub fn new(listener: TcpListener, inputs: Arc<Inputs>) -> Self {
        Self { listener, inputs }
    }

    pub async fn run(self) {
        loop {
            match self.listener.accept().await {
                Ok((stream, peer)) => {
                    let inputs = self.inputs.clone();
                    tokio::spawn(async move { serve_connection(inputs, stream, peer).await });
                }
                Err(e) => {
                    warn!(error = %e, "HBONE accept failed");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        }
    }
}

async fn serve_connection(inputs: Arc<Inputs>, stream: TcpStream, peer: SocketAddr) {
    let _ = stream.set_nodelay(true);
    let svc_inputs = inputs.clone();
    let svc = service_fn(move |req| {
        let inputs = svc_inputs.clone();
        async move { Ok::<_, Infallible>(tunnel(inputs, req).await) }
    });
    let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .initial_stream_window_size(hbone::STREAM_WINDOW)
        .initial_connection_window_size(hbone::CONNECTION_WINDOW)
        .max_concurrent_streams(10_000)
        .serve_connection(TokioIo::new(stream), svc);
    if let Err(e) = conn.await {
        // Garbage, a TLS hello, or HTTP/1 on the HBONE port: that peer is told nothing more, and
        // everyone else is unaffected.
        warn!(%peer, error = %e, "HBONE connection failed: the peer did not speak HTTP/2 HBONE");
        inputs
            .metrics
            .tcp_failed
            .with_label_values(&["inbound", "hbone_protocol"])
            .inc();
    }
}

fn reply(status: StatusCode, reason: &str) -> Response<Empty<Bytes>> {
    let mut r = Response::new(Empty::new());
    *r.status_mut() = status;
    if let Ok(v) = http::HeaderValue::from_str(reason) {
        r.headers_mut().insert(hbone::ERROR_HEADER, v);
    }
    r
}

/// Handles one CONNECT stream.
async fn tunnel(inputs: Arc<Inputs>, mut req: Request<Incoming>) -> Response<Empty<Bytes>> {
    let refuse = |status: StatusCode, label: &str, reason: String| {
        warn!(reason = %reason, "HBONE tunnel refused");
        inputs
            .metrics
            .tcp_failed
            .with_label_values(&["inbound", label])
            .inc();
        reply(status, &reason)
    };
    if req.method() != Method::CONNECT {
        return refuse(
            StatusCode::METHOD_NOT_ALLOWED,
            "hbone_bad_request",
            format!("{} is not CONNECT; HBONE carries only CONNECT", req.method()),
        );
    }
    let Some(target) = req
        .uri()
        .authority()
        .and_then(|a| a.as_str().parse::<SocketAddr>().ok())
    else {
        return refuse(
            StatusCode::BAD_REQUEST,
            "hbone_bad_request",
            format!("authority {:?} is not ip:port", req.uri().to_string()),
        );
    };
    let snap = inputs.state.snapshot();
    let Some(dst) = local_target(&snap, target) else {
        return refuse(
            StatusCode::FORBIDDEN,
            "not_local_pod",
            format!("{target} is not a meshed pod on this node"),
        );
    };
    let source = req
        .headers()
        .get(hbone::SOURCE_HEADER)
        .and_then(|v| v.to_str().ok())
        .and_then(|s| known_workload(&snap, s))
        .unwrap_or_else(|| ("unknown".into(), "unknown".into()));
    let mut pod = match connect_local_pod(&inputs, &snap, target).await {
        Ok(s) => s,
        Err(e) => {
            return refuse(
                StatusCode::BAD_GATEWAY,
                "upstream_refused",
                format!("connect to {target}: {e}"),
            );
        }
    };
    let upgrade = hyper::upgrade::on(&mut req);
    let labels = [
        "inbound".to_string(),
        source.1,
        source.0,
        dst.name.clone(),
        dst.namespace.clone(),
    ];
    tokio::spawn(async move {
        let mut tunnel = match upgrade.await {
            Ok(u) => TokioIo::new(u),
            Err(e) => {
                debug!(%target, error = %e, "HBONE stream ended before the upgrade");
                let _ = pod.set_zero_linger();
                return;
            }
        };
        info!(%target, workload = %dst.display(), source = %format!("{}/{}", labels[2], labels[1]), "inbound tunnel");
        inputs.metrics.opened(&labels);
        // Counted from the source's side: what it sent arrived through the tunnel.
        let r = super::relay(&mut pod, &mut tunnel).await.map(|(to_src, from_src)| (from_src, to_src));
        inputs.metrics.finished(&labels, &r);
    });
    reply(StatusCode::OK, "")
}

/// The meshed pod on this node that `target` names, if any.
pub fn local_target(snap: &Snapshot, target: SocketAddr) -> Option<Arc<Workload>> {
    snap.workloads_by_ip
        .get(&target.ip())
        .filter(|w| snap.is_local(w))
        .cloned()
}

fn known_workload(snap: &Snapshot, s: &str) -> Option<(String, String)> {
    let (ns, name) = s.split_once('/')?;
    snap.workloads_by_id
        .values()
        .find(|w| w.namespace == ns && w.name == name)
        .map(|w| (w.namespace.clone(), w.name.clone()))
}

/// Connects to a local pod from the node's mesh source address.
pub async fn connect_local_pod(
    inputs: &Inputs,
    snap: &Snapshot,
    target: SocketAddr,
) -> std::io::Result<TcpStream> {
    let source = snap
        .node
        .as_ref()
        .map(|n| std::net::IpAddr::V4(n.mesh_source));
    super::connect_marked(target, inputs.proxy_mark, source).await
}
