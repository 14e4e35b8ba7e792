//! An HTTP/2 CONNECT stream as a byte stream: [`H2Stream`] implements `AsyncRead + AsyncWrite`,
//! so the one relay ([`super::relay`]) — and hyper, for L7 — work over a tunnel exactly as over
//! TCP or TLS (ztunnel's `proxy/h2.rs` is the model).
//!
//! A tunnel mirrors TCP (RFC 9113 §8.5): END_STREAM is a half-close (EOF to the reader,
//! `shutdown()` to the writer), and a reset travels as one — a peer's RST_STREAM is a
//! `ConnectionReset` error from a read or write, and [`super::relay::Reset::reset`] sends
//! RST_STREAM(CONNECT_ERROR). That is why HBONE uses h2 directly: hyper's upgraded streams turn a
//! peer's RST_STREAM into a clean EOF.

use std::{
    io,
    pin::Pin,
    task::{Context, Poll, ready},
};

use bytes::Bytes;
use h2::{Reason, RecvStream, SendStream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// One CONNECT stream, both directions.
pub struct H2Stream {
    send: SendStream<Bytes>,
    recv: RecvStream,
    /// Received but not yet read.
    pending: Bytes,
    /// END_STREAM sent.
    shut: bool,
}

impl std::fmt::Debug for H2Stream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("H2Stream")
            .field("pending", &self.pending.len())
            .field("shut", &self.shut)
            .finish()
    }
}

impl H2Stream {
    pub fn new(send: SendStream<Bytes>, recv: RecvStream) -> Self {
        Self {
            send,
            recv,
            pending: Bytes::new(),
            shut: false,
        }
    }

    /// Resets the stream: the peer sees RST_STREAM(CONNECT_ERROR), which its side passes on as
    /// a TCP reset.
    pub fn reset(&mut self) {
        self.send.send_reset(Reason::CONNECT_ERROR);
    }
}

/// An h2 error as I/O: a reset of the stream (by the peer, or of the whole connection) reads as
/// `ConnectionReset`, which the relay passes on as a reset.
pub fn h2_io(e: h2::Error) -> io::Error {
    if e.is_io() {
        e.into_io()
            .unwrap_or_else(|| io::Error::other("HTTP/2 I/O error"))
    } else {
        io::Error::new(io::ErrorKind::ConnectionReset, e)
    }
}

impl AsyncRead for H2Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let me = self.get_mut();
        while me.pending.is_empty() {
            match ready!(me.recv.poll_data(cx)) {
                Some(Ok(chunk)) => {
                    // Released on receipt: at most one chunk waits here beyond the window, and
                    // it is taken before the next is polled.
                    let _ = me.recv.flow_control().release_capacity(chunk.len());
                    me.pending = chunk;
                }
                Some(Err(e)) => return Poll::Ready(Err(h2_io(e))),
                // END_STREAM: the peer half-closed.
                None => return Poll::Ready(Ok(())),
            }
        }
        let n = me.pending.len().min(buf.remaining());
        buf.put_slice(&me.pending.split_to(n));
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for H2Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let me = self.get_mut();
        // Ask for room for the whole buffer; send what the peer's window allows now.
        me.send.reserve_capacity(buf.len());
        loop {
            let cap = me.send.capacity();
            if cap > 0 {
                let n = cap.min(buf.len());
                me.send
                    .send_data(Bytes::copy_from_slice(&buf[..n]), false)
                    .map_err(h2_io)?;
                return Poll::Ready(Ok(n));
            }
            match ready!(me.send.poll_capacity(cx)) {
                Some(Ok(_)) => continue,
                Some(Err(e)) => return Poll::Ready(Err(h2_io(e))),
                // The stream is no longer open for sending: a peer's reset reads as one.
                None => {
                    return Poll::Ready(Err(match me.send.poll_reset(cx) {
                        Poll::Ready(Ok(reason)) => io::Error::new(
                            io::ErrorKind::ConnectionReset,
                            format!("the peer reset the stream ({reason:?})"),
                        ),
                        Poll::Ready(Err(e)) => h2_io(e),
                        Poll::Pending => io::ErrorKind::BrokenPipe.into(),
                    }));
                }
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        // The connection task writes frames as they are queued.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        let me = self.get_mut();
        if !me.shut {
            me.shut = true;
            // Release what was reserved and not used, then END_STREAM.
            me.send.reserve_capacity(0);
            me.send.send_data(Bytes::new(), true).map_err(h2_io)?;
        }
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use http::{Method, Request, Response};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    /// A client and server `H2Stream` for each of `n` CONNECT streams over an in-memory h2
    /// connection (with a small window, so writes wait for flow control).
    async fn streams(n: usize) -> Vec<(H2Stream, H2Stream)> {
        let (c, s) = tokio::io::duplex(64 << 10);
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut conn = h2::server::Builder::new()
                .initial_window_size(16 << 10)
                .handshake::<_, Bytes>(s)
                .await
                .expect("server handshake");
            while let Some(Ok((req, mut respond))) = conn.accept().await {
                let send = respond
                    .send_response(Response::new(()), false)
                    .expect("respond");
                let _ = tx.send(H2Stream::new(send, req.into_body()));
            }
        });
        let (mut sender, conn) = h2::client::handshake(c).await.expect("client handshake");
        tokio::spawn(conn);
        let mut out = Vec::new();
        for _ in 0..n {
            let req = Request::builder()
                .method(Method::CONNECT)
                .uri("10.0.0.1:80")
                .body(())
                .expect("request");
            let (resp, send) = sender.send_request(req, false).expect("send");
            let resp = resp.await.expect("response");
            let client = H2Stream::new(send, resp.into_body());
            out.push((client, rx.recv().await.expect("server stream")));
        }
        out
    }

    #[tokio::test]
    async fn bytes_and_half_close_cross_a_stream_both_ways() {
        let (mut client, mut server) = streams(1).await.pop().expect("one");
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let sent = data.clone();
        let writer = tokio::spawn(async move {
            client.write_all(&sent).await.expect("write");
            client.shutdown().await.expect("END_STREAM");
            client
        });
        let mut got = Vec::new();
        server
            .read_to_end(&mut got)
            .await
            .expect("EOF after END_STREAM");
        assert!(got == data, "every byte, in order");
        let mut client = writer.await.expect("join");
        server.write_all(b"done").await.expect("answer");
        server.shutdown().await.expect("END_STREAM back");
        let mut back = Vec::new();
        client.read_to_end(&mut back).await.expect("EOF");
        assert_eq!(back, b"done");
    }

    #[tokio::test]
    async fn a_reset_reads_as_a_reset_not_an_end() {
        let (mut client, mut server) = streams(1).await.pop().expect("one");
        client.write_all(b"x").await.expect("write");
        let mut one = [0u8; 1];
        server.read_exact(&mut one).await.expect("read");
        server.reset();
        let mut buf = [0u8; 8];
        let e = client
            .read(&mut buf)
            .await
            .expect_err("a reset is an error");
        assert_eq!(e.kind(), io::ErrorKind::ConnectionReset, "{e}");
    }
}
