//! The one relay: copies between any two byte streams — TCP, TLS, an HBONE tunnel
//! ([`super::h2::H2Stream`]) — until both directions end, carrying a half-close as a half-close
//! and a reset as a reset end to end.
//!
//! An error on either side (a peer's reset, a stream reset) or `stop` resolving (the drain's
//! deadline) resets *both* ends, so each peer sees a reset rather than a clean end it might take
//! for a complete response.

use std::io;

use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::TcpStream,
};

use super::h2::H2Stream;

/// Read buffer per direction, allocated for the connection's whole life (so two per connection):
/// HTTP/2's default frame size, so a tunnel sends whole DATA frames, at 32 KiB per connection
/// (tokio's default would be 16 KiB, the old tunnel relay held 64 KiB).
const BUF: usize = 16 << 10;

/// A stream that can be ended with a reset instead of a clean close.
pub trait Reset {
    /// Makes the coming close (or drop) a reset.
    fn reset(&mut self);
}

impl Reset for TcpStream {
    fn reset(&mut self) {
        // SO_LINGER 0: the close sends RST instead of FIN.
        let _ = self.set_zero_linger();
    }
}

impl Reset for H2Stream {
    fn reset(&mut self) {
        H2Stream::reset(self);
    }
}

/// Relays until both directions end or `stop` resolves; returns (bytes a→b, bytes b→a).
pub async fn relay<A, B>(
    a: &mut A,
    b: &mut B,
    stop: impl Future<Output = ()>,
) -> io::Result<(u64, u64)>
where
    A: AsyncRead + AsyncWrite + Reset + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Reset + Unpin + ?Sized,
{
    let r = tokio::select! {
        r = tokio::io::copy_bidirectional_with_sizes(a, b, BUF, BUF) => r,
        () = stop => Err(crate::drain::deadline_error()),
    };
    if r.is_err() {
        a.reset();
        b.reset();
    }
    r
}

#[cfg(test)]
mod tests {
    use tokio::{
        io::{AsyncReadExt, AsyncWriteExt},
        net::TcpListener,
    };

    use super::*;

    /// A connected pair of loopback TCP streams.
    async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = l.local_addr().expect("addr");
        let (c, s) = tokio::join!(TcpStream::connect(addr), l.accept());
        (c.expect("connect"), s.expect("accept").0)
    }

    #[tokio::test]
    async fn half_close_and_bytes_pass_both_ways() {
        let (mut client, mut a) = pair().await;
        let (mut b, mut server) = pair().await;
        let relay =
            tokio::spawn(async move { relay(&mut a, &mut b, std::future::pending()).await });
        client.write_all(&[7u8; 100_000]).await.expect("write");
        client.shutdown().await.expect("half-close");
        let mut got = Vec::new();
        server
            .read_to_end(&mut got)
            .await
            .expect("server reads to EOF");
        assert_eq!(
            got.len(),
            100_000,
            "the half-close arrives after every byte"
        );
        server.write_all(b"answer").await.expect("write back");
        drop(server);
        let mut back = Vec::new();
        client.read_to_end(&mut back).await.expect("client reads");
        assert_eq!(back, b"answer");
        assert_eq!(relay.await.expect("join").expect("clean"), (100_000, 6));
    }

    #[tokio::test]
    async fn a_reset_on_one_side_resets_the_other() {
        let (mut client, mut a) = pair().await;
        let (mut b, server) = pair().await;
        let relay =
            tokio::spawn(async move { relay(&mut a, &mut b, std::future::pending()).await });
        client.write_all(b"x").await.expect("write");
        server.set_zero_linger().expect("linger");
        drop(server);
        let mut buf = [0u8; 8];
        let err = loop {
            match client.read(&mut buf).await {
                Ok(0) => panic!("a reset must not arrive as a clean end"),
                Ok(_) => continue,
                Err(e) => break e,
            }
        };
        assert_eq!(err.kind(), io::ErrorKind::ConnectionReset);
        assert!(relay.await.expect("join").is_err());
    }

    #[tokio::test]
    async fn stop_resets_both_ends() {
        let (mut client, mut a) = pair().await;
        let (mut b, mut server) = pair().await;
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let relay = tokio::spawn(async move {
            relay(&mut a, &mut b, async {
                let _ = rx.await;
            })
            .await
        });
        client.write_all(b"hello").await.expect("write");
        let mut buf = [0u8; 5];
        server.read_exact(&mut buf).await.expect("through");
        tx.send(()).expect("relay alive");
        let e = relay.await.expect("join").expect_err("stopped");
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        for s in [&mut client, &mut server] {
            let r = s.read(&mut buf).await;
            assert!(
                matches!(&r, Err(e) if e.kind() == io::ErrorKind::ConnectionReset),
                "{r:?}"
            );
        }
    }
}
