//! `mesh-app`'s gRPC server and clients: tonic (a real gRPC implementation — framing, trailers,
//! deadlines, streaming), with a codec for raw bytes so no protoc or generated code is needed.
//! Service `nodemesh.test.Echo`:
//! - `Who` (unary): answers the server's name; a request `fail:N` answers status N instead;
//! - `Count` (server streaming): a request `N` or `N:CODE` gets N messages `NAME:i`, then OK or
//!   status CODE in the trailers (after the messages);
//! - `Sum` (client streaming): answers `NAME count=N bytes=B` once the client's stream ends;
//! - `Chat` (bidirectional): each message comes back at once as `NAME: message`.

use std::{
    collections::BTreeMap,
    convert::Infallible,
    net::SocketAddr,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::{Duration, Instant},
};

use bytes::{Buf, BufMut, Bytes};
use tokio_stream::{Stream, StreamExt};
use tonic::{
    Code, Request, Response, Status, Streaming,
    codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder},
    codegen::{BoxFuture, Service, http},
    transport::{Channel, Endpoint},
};

const SERVICE: &str = "nodemesh.test.Echo";

/// Messages are the bytes as they are.
#[derive(Clone, Copy, Default)]
pub struct Raw;

impl Codec for Raw {
    type Encode = Bytes;
    type Decode = Bytes;
    type Encoder = Raw;
    type Decoder = Raw;
    fn encoder(&mut self) -> Raw {
        Raw
    }
    fn decoder(&mut self) -> Raw {
        Raw
    }
}

impl Encoder for Raw {
    type Item = Bytes;
    type Error = Status;
    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put(item);
        Ok(())
    }
}

impl Decoder for Raw {
    type Item = Bytes;
    type Error = Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, Status> {
        let n = src.remaining();
        Ok(Some(src.copy_to_bytes(n)))
    }
}

type Messages = Pin<Box<dyn Stream<Item = Result<Bytes, Status>> + Send>>;

#[derive(Clone)]
struct Echo {
    name: Arc<str>,
}

impl tonic::server::NamedService for Echo {
    const NAME: &'static str = SERVICE;
}

/// One method's handler, as tonic's server calls it.
#[derive(Clone)]
struct Method(Arc<str>);

impl Service<Request<Bytes>> for Method {
    type Response = Response<Bytes>;
    type Error = Status;
    type Future = BoxFuture<Response<Bytes>, Status>;
    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Status>> {
        Poll::Ready(Ok(()))
    }
    fn call(&mut self, req: Request<Bytes>) -> Self::Future {
        let name = self.0.clone();
        Box::pin(async move {
            let msg = req.into_inner();
            if let Some(code) = msg
                .strip_prefix(b"fail:")
                .and_then(|c| std::str::from_utf8(c).ok())
                .and_then(|c| c.parse::<i32>().ok())
            {
                return Err(Status::new(
                    Code::from_i32(code),
                    format!("{name} failed as asked"),
                ));
            }
            Ok(Response::new(Bytes::from(name.to_string())))
        })
    }
}

impl Service<Request<Bytes>> for Counting {
    type Response = Response<Messages>;
    type Error = Status;
    type Future = BoxFuture<Response<Messages>, Status>;
    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Status>> {
        Poll::Ready(Ok(()))
    }
    fn call(&mut self, req: Request<Bytes>) -> Self::Future {
        let name = self.0.clone();
        Box::pin(async move {
            let ask = String::from_utf8_lossy(req.get_ref()).to_string();
            let (n, end) = ask.split_once(':').unwrap_or((&ask, "0"));
            let n: usize = n.parse().unwrap_or(1);
            let end: i32 = end.parse().unwrap_or(0);
            let items: Vec<Result<Bytes, Status>> = (0..n)
                .map(|i| Ok(Bytes::from(format!("{name}:{i}"))))
                .chain((end != 0).then(|| {
                    Err(Status::new(
                        Code::from_i32(end),
                        "ended with the status asked for",
                    ))
                }))
                .collect();
            // Spaced out, so the messages cross the proxy one by one (a stream, not one body).
            let stream = tokio_stream::iter(items).throttle(Duration::from_millis(5));
            Ok(Response::new(Box::pin(stream) as Messages))
        })
    }
}

#[derive(Clone)]
struct Counting(Arc<str>);
#[derive(Clone)]
struct Summing(Arc<str>);
#[derive(Clone)]
struct Chatting(Arc<str>);

impl Service<Request<Streaming<Bytes>>> for Summing {
    type Response = Response<Bytes>;
    type Error = Status;
    type Future = BoxFuture<Response<Bytes>, Status>;
    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Status>> {
        Poll::Ready(Ok(()))
    }
    fn call(&mut self, req: Request<Streaming<Bytes>>) -> Self::Future {
        let name = self.0.clone();
        Box::pin(async move {
            let mut s = req.into_inner();
            let (mut count, mut bytes) = (0usize, 0usize);
            while let Some(m) = s.message().await? {
                count += 1;
                bytes += m.len();
            }
            Ok(Response::new(Bytes::from(format!(
                "{name} count={count} bytes={bytes}"
            ))))
        })
    }
}

impl Service<Request<Streaming<Bytes>>> for Chatting {
    type Response = Response<Messages>;
    type Error = Status;
    type Future = BoxFuture<Response<Messages>, Status>;
    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Status>> {
        Poll::Ready(Ok(()))
    }
    fn call(&mut self, req: Request<Streaming<Bytes>>) -> Self::Future {
        let name = self.0.clone();
        Box::pin(async move {
            let s = req.into_inner();
            let out = s.map(move |m| {
                m.map(|m| Bytes::from(format!("{name}: {}", String::from_utf8_lossy(&m))))
            });
            Ok(Response::new(Box::pin(out) as Messages))
        })
    }
}

impl Service<http::Request<tonic::body::Body>> for Echo {
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Infallible>;
    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }
    fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
        let name = self.name.clone();
        Box::pin(async move {
            let mut g = tonic::server::Grpc::new(Raw);
            let method = req
                .uri()
                .path()
                .strip_prefix(&format!("/{SERVICE}/"))
                .unwrap_or("")
                .to_string();
            let mut resp = match method.as_str() {
                "Who" => g.unary(Method(name.clone()), req).await,
                "Count" => g.server_streaming(Counting(name.clone()), req).await,
                "Sum" => g.client_streaming(Summing(name.clone()), req).await,
                "Chat" => g.streaming(Chatting(name.clone()), req).await,
                _ => {
                    Status::unimplemented(format!("{SERVICE} has no method {method:?}")).into_http()
                }
            };
            if let Ok(v) = http::HeaderValue::from_str(&name) {
                resp.headers_mut().insert("x-served-by", v);
            }
            Ok(resp)
        })
    }
}

/// Serves `nodemesh.test.Echo` on `addr` until killed.
pub fn server(addr: SocketAddr, name: String) -> std::io::Result<String> {
    let rt = super::runtime()?;
    rt.block_on(async move {
        let incoming = tonic::transport::server::TcpIncoming::bind(addr)?.with_nodelay(Some(true));
        println!("listening={addr}");
        tonic::transport::Server::builder()
            .serve_with_incoming(Echo { name: name.into() }, incoming)
            .await
            .map_err(std::io::Error::other)?;
        Ok("server=stopped".into())
    })
}

async fn channel(addr: SocketAddr) -> std::io::Result<tonic::client::Grpc<Channel>> {
    let ch = Endpoint::from_shared(format!("http://{addr}"))
        .map_err(std::io::Error::other)?
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(10))
        .connect()
        .await
        .map_err(|e| std::io::Error::other(format!("connect: {e:?}")))?;
    Ok(tonic::client::Grpc::new(ch))
}

fn path(method: &str) -> http::uri::PathAndQuery {
    format!("/{SERVICE}/{method}")
        .parse()
        .expect("a valid path")
}

/// `--calls` unary `Who` calls on ONE channel (one HTTP/2 connection), `--concurrency` at a
/// time. Prints `ok=N errors=E served=NAME:count,... codes=CODE:count,...`.
pub fn load(
    addr: SocketAddr,
    calls: usize,
    concurrency: usize,
    ask: String,
) -> std::io::Result<String> {
    let rt = super::runtime()?;
    rt.block_on(async move {
        let grpc = channel(addr).await?;
        let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for _ in 0..concurrency.max(1) {
            let (mut grpc, next, ask) = (grpc.clone(), next.clone(), ask.clone());
            tasks.push(tokio::spawn(async move {
                let mut served: BTreeMap<String, u32> = BTreeMap::new();
                let mut codes: BTreeMap<i32, u32> = BTreeMap::new();
                while next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < calls {
                    let r = async {
                        grpc.ready()
                            .await
                            .map_err(|e| Status::unavailable(e.to_string()))?;
                        grpc.unary(Request::new(Bytes::from(ask.clone())), path("Who"), Raw)
                            .await
                    }
                    .await;
                    match r {
                        Ok(resp) => {
                            *codes.entry(0).or_default() += 1;
                            let who = String::from_utf8_lossy(resp.get_ref()).to_string();
                            *served.entry(who).or_default() += 1;
                        }
                        Err(s) => *codes.entry(s.code() as i32).or_default() += 1,
                    }
                }
                (served, codes)
            }));
        }
        let mut served: BTreeMap<String, u32> = BTreeMap::new();
        let mut codes: BTreeMap<i32, u32> = BTreeMap::new();
        for t in tasks {
            let (s, c) = t.await.map_err(std::io::Error::other)?;
            for (k, v) in s {
                *served.entry(k).or_default() += v;
            }
            for (k, v) in c {
                *codes.entry(k).or_default() += v;
            }
        }
        let ok = codes.get(&0).copied().unwrap_or(0);
        let errors: u32 = codes.iter().filter(|(k, _)| **k != 0).map(|(_, v)| v).sum();
        let list = |m: Vec<String>| m.join(",");
        Ok(format!(
            "ok={ok} errors={errors} served={} codes={}",
            list(served.iter().map(|(k, v)| format!("{k}:{v}")).collect()),
            list(codes.iter().map(|(k, v)| format!("{k}:{v}")).collect()),
        ))
    })
}

/// The three streaming kinds on one channel, each checked: prints `server_stream=ok|...
/// client_stream=ok|... bidi=ok|... trailer_status=CODE served_by=NAME` (`trailer_status`: the
/// status a server stream ended with after its messages, 14 asked for).
pub fn streams(addr: SocketAddr, messages: usize) -> std::io::Result<String> {
    let rt = super::runtime()?;
    rt.block_on(async move {
        let mut grpc = channel(addr).await?;
        let mut out = Vec::new();
        let mut served_by = String::from("none");

        // Server streaming: N messages, each arriving on its own.
        grpc.ready().await.map_err(std::io::Error::other)?;
        let r = grpc
            .server_streaming(
                Request::new(Bytes::from(messages.to_string())),
                path("Count"),
                Raw,
            )
            .await;
        out.push(match r {
            Ok(resp) => {
                let mut s = resp.into_inner();
                let mut got = Vec::new();
                let end = loop {
                    match s.message().await {
                        Ok(Some(m)) => got.push(String::from_utf8_lossy(&m).to_string()),
                        Ok(None) => break None,
                        Err(e) => break Some(e),
                    }
                };
                if let Some(first) = got.first() {
                    served_by = first.split(':').next().unwrap_or("none").to_string();
                }
                let in_order = got
                    .iter()
                    .enumerate()
                    .all(|(i, m)| m.ends_with(&format!(":{i}")));
                match end {
                    None if got.len() == messages && in_order => "server_stream=ok".to_string(),
                    None => format!("server_stream=got_{}_of_{messages}", got.len()),
                    Some(e) => format!("server_stream=status_{}", e.code() as i32),
                }
            }
            Err(e) => format!("server_stream=status_{}", e.code() as i32),
        });

        // Client streaming: N messages of 1 KiB, one answer when the stream ends.
        grpc.ready().await.map_err(std::io::Error::other)?;
        let upload = tokio_stream::iter((0..messages).map(|_| Bytes::from(vec![b'x'; 1024])))
            .throttle(Duration::from_millis(2));
        let r = grpc
            .client_streaming(Request::new(upload), path("Sum"), Raw)
            .await;
        let want = format!("count={messages} bytes={}", messages * 1024);
        out.push(match r {
            Ok(resp) if String::from_utf8_lossy(resp.get_ref()).ends_with(&want) => {
                "client_stream=ok".to_string()
            }
            Ok(resp) => format!(
                "client_stream=wrong_answer_{:?}",
                String::from_utf8_lossy(resp.get_ref())
            ),
            Err(e) => format!("client_stream=status_{}", e.code() as i32),
        });

        // Bidirectional: send one, wait for its echo, send the next (a real conversation, which
        // a proxy that buffered either direction would deadlock).
        grpc.ready().await.map_err(std::io::Error::other)?;
        let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(1);
        let outgoing = tokio_stream::wrappers::ReceiverStream::new(rx);
        let first = Bytes::from_static(b"ping-0");
        tx.send(first).await.map_err(std::io::Error::other)?;
        let r = grpc
            .streaming(Request::new(outgoing), path("Chat"), Raw)
            .await;
        out.push(match r {
            Ok(resp) => {
                let mut s = resp.into_inner();
                let started = Instant::now();
                let mut ok = 0;
                let mut bad = None;
                for i in 0..messages {
                    match tokio::time::timeout(Duration::from_secs(5), s.message()).await {
                        Ok(Ok(Some(m))) if m.ends_with(format!(": ping-{i}").as_bytes()) => {
                            ok += 1;
                            if i + 1 < messages
                                && tx
                                    .send(Bytes::from(format!("ping-{}", i + 1)))
                                    .await
                                    .is_err()
                            {
                                bad = Some("send_failed".to_string());
                                break;
                            }
                        }
                        Ok(Ok(Some(m))) => {
                            bad = Some(format!("wrong_echo_{:?}", String::from_utf8_lossy(&m)));
                            break;
                        }
                        Ok(Ok(None)) => {
                            bad = Some("ended_early".into());
                            break;
                        }
                        Ok(Err(e)) => {
                            bad = Some(format!("status_{}", e.code() as i32));
                            break;
                        }
                        Err(_) => {
                            bad = Some("echo_timed_out".into());
                            break;
                        }
                    }
                }
                drop(tx);
                // The server ends its side once ours ended.
                let ended = matches!(
                    tokio::time::timeout(Duration::from_secs(5), s.message()).await,
                    Ok(Ok(None))
                );
                match bad {
                    None if ended => format!(
                        "bidi=ok round_trips={ok} bidi_ms={}",
                        started.elapsed().as_millis()
                    ),
                    None => "bidi=no_end".to_string(),
                    Some(b) => format!("bidi={b}"),
                }
            }
            Err(e) => format!("bidi=status_{}", e.code() as i32),
        });

        // A server stream that ends in an error after its messages: the status travels in the
        // trailers.
        grpc.ready().await.map_err(std::io::Error::other)?;
        let r = grpc
            .server_streaming(Request::new(Bytes::from("3:14")), path("Count"), Raw)
            .await;
        let code = match r {
            Ok(resp) => {
                let mut s = resp.into_inner();
                loop {
                    match s.message().await {
                        Ok(Some(_)) => continue,
                        Ok(None) => break 0,
                        Err(e) => break e.code() as i32,
                    }
                }
            }
            Err(e) => e.code() as i32,
        };
        out.push(format!("trailer_status={code}"));
        out.push(format!("served_by={served_by}"));
        Ok(out.join(" "))
    })
}
