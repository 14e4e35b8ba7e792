//! Protocol detection on a captured connection's first bytes: an HTTP/1.x request line, the
//! HTTP/2 prior-knowledge preface (h2c, gRPC), or anything else (opaque TCP).
//!
//! [`classify`] is pure. [`Detector`] reads what the client sends, bounded in bytes and in time;
//! the caller races it against the upstream when the client is silent (server-speaks-first
//! protocols — MySQL, SMTP, a Redis reply — so their greeting is never held back for the whole
//! timeout, unlike Linkerd's 10 s detection stall).

use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt};

/// The HTTP/2 connection preface (RFC 9113 §3.4).
pub const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// At most this much is read while detecting; a request line longer than this (a huge URL) is
/// taken as HTTP/1 if it looked like one so far.
pub const MAX_PEEK: usize = 16 << 10;
/// How long the client gets to send its first bytes before the upstream is connected in parallel
/// (most HTTP clients write their request at once; a silent client may be a server-first
/// protocol's).
pub const GRACE: Duration = Duration::from_millis(5);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    Http1,
    Http2,
    Opaque,
}

impl Protocol {
    pub fn label(self) -> &'static str {
        match self {
            Protocol::Http1 => "http1",
            Protocol::Http2 => "h2",
            Protocol::Opaque => "opaque",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Known(Protocol),
    /// Consistent with HTTP so far; more bytes decide.
    NeedMore,
}

/// RFC 9110 token characters (a method).
fn tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// What the first bytes of a connection are.
pub fn classify(buf: &[u8]) -> Verdict {
    if buf.is_empty() {
        return Verdict::NeedMore;
    }
    if buf.len() < H2_PREFACE.len() && H2_PREFACE.starts_with(buf) {
        return Verdict::NeedMore;
    }
    if buf.starts_with(H2_PREFACE) {
        return Verdict::Known(Protocol::Http2);
    }
    // method SP request-target SP HTTP/1.x CRLF
    let line_end = buf.iter().position(|&b| b == b'\n');
    let line = match line_end {
        Some(i) => &buf[..i],
        None => buf,
    };
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let method_len = line.iter().take_while(|&&b| tchar(b)).count();
    if method_len == 0 || method_len > 32 {
        return Verdict::Known(Protocol::Opaque);
    }
    let rest = &line[method_len..];
    if rest.is_empty() {
        return if line_end.is_some() {
            Verdict::Known(Protocol::Opaque)
        } else {
            Verdict::NeedMore
        };
    }
    if rest[0] != b' ' {
        return Verdict::Known(Protocol::Opaque);
    }
    let rest = &rest[1..];
    // The target has no spaces or control bytes.
    let target_len = rest.iter().take_while(|&&b| b > b' ' && b != 0x7f).count();
    let after = &rest[target_len..];
    if line_end.is_none() {
        // Still on the first line: anything but the version bytes so far means opaque.
        if after.is_empty() {
            return if buf.len() >= MAX_PEEK && target_len > 0 {
                Verdict::Known(Protocol::Http1)
            } else {
                Verdict::NeedMore
            };
        }
        let version = &after[1.min(after.len())..];
        let ok = after[0] == b' '
            && (b"HTTP/1.".starts_with(version) || version.starts_with(b"HTTP/1."));
        return if ok && version.len() <= 8 {
            Verdict::NeedMore
        } else {
            Verdict::Known(Protocol::Opaque)
        };
    }
    let is_http1 = target_len > 0
        && after.len() == 9
        && after.starts_with(b" HTTP/1.")
        && after[8].is_ascii_digit();
    Verdict::Known(if is_http1 {
        Protocol::Http1
    } else {
        Protocol::Opaque
    })
}

/// How a detection ended, for `protocol_detections_total{protocol, how}`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum How {
    /// The client's bytes decided.
    Detected,
    /// The client sent nothing (or not enough) within the timeout.
    Timeout,
    /// The upstream spoke before the client did.
    ServerFirst,
    /// The client closed (or half-closed) before its bytes decided.
    Closed,
    /// The service port's `appProtocol` said.
    AppProtocol,
}

impl How {
    pub fn label(self) -> &'static str {
        match self {
            How::Detected => "detected",
            How::Timeout => "timeout",
            How::ServerFirst => "server_first",
            How::Closed => "closed",
            How::AppProtocol => "app_protocol",
        }
    }
}

/// Reads a client's first bytes into `buf` until they decide, the client closes, or it errs.
/// Cancel-safe: bytes read stay in `buf`, so it can sit in a `select!` against a timer or the
/// upstream. Returns the verdict once known (`Closed` as `(Opaque, Closed)`).
pub async fn read_until_known<R: AsyncRead + Unpin>(
    client: &mut R,
    buf: &mut BytesMut,
) -> std::io::Result<(Protocol, How)> {
    loop {
        if let Verdict::Known(p) = classify(buf) {
            return Ok((p, How::Detected));
        }
        if buf.len() >= MAX_PEEK {
            return Ok((Protocol::Opaque, How::Detected));
        }
        buf.reserve(1024.min(MAX_PEEK - buf.len()));
        // read_buf is cancel-safe: it either read (and appended) or did nothing.
        let n = client.read_buf(buf).await?;
        if n == 0 {
            return Ok((Protocol::Opaque, How::Closed));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_bytes_decide() {
        use Protocol::*;
        let cases: [(&[u8], Verdict); 20] = [
            (b"", Verdict::NeedMore),
            (b"G", Verdict::NeedMore),
            (b"GET", Verdict::NeedMore),
            (b"GET ", Verdict::NeedMore),
            (b"GET /index.html", Verdict::NeedMore),
            (b"GET / HTTP/1.1\r\n", Verdict::Known(Http1)),
            (b"GET / HTTP/1.0\n", Verdict::Known(Http1)),
            (
                b"POST /x?y=1 HTTP/1.1\r\nHost: a\r\n\r\n",
                Verdict::Known(Http1),
            ),
            (b"GET / HTTP/1.", Verdict::NeedMore),
            // Redis inline commands look like a method, but their line is not a request line.
            (b"GET key\r\n", Verdict::Known(Opaque)),
            (b"SET k v\r\n", Verdict::Known(Opaque)),
            (b"GET / HTTP/2.0\r\n", Verdict::Known(Opaque)),
            (b"GET / XTTP", Verdict::Known(Opaque)),
            (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", Verdict::Known(Http2)),
            (b"PRI * HTTP/2.0\r\n", Verdict::NeedMore),
            (b"PRI * HTTP/2.0\r\n\r\nXX\r\n\r\n", Verdict::Known(Opaque)),
            (b"\x16\x03\x01\x02\x00", Verdict::Known(Opaque)),
            (b"\x00\x00\x00", Verdict::Known(Opaque)),
            (b"EHLO mail\r\n", Verdict::Known(Opaque)),
            (b"GET\r\n", Verdict::Known(Opaque)),
        ];
        for (bytes, want) in cases {
            assert_eq!(
                classify(bytes),
                want,
                "{:?}",
                String::from_utf8_lossy(bytes)
            );
        }
    }

    #[test]
    fn a_long_request_line_is_http1_at_the_cap() {
        let mut line = b"GET /".to_vec();
        line.resize(MAX_PEEK, b'a');
        assert_eq!(classify(&line), Verdict::Known(Protocol::Http1));
    }

    #[tokio::test]
    async fn reading_stops_at_the_verdict_or_the_close() {
        let (mut a, mut b) = tokio::io::duplex(64);
        use tokio::io::AsyncWriteExt;
        b.write_all(b"GET / HT").await.expect("write");
        let mut buf = BytesMut::new();
        let read = tokio::spawn(async move {
            let r = read_until_known(&mut a, &mut buf).await;
            (r.expect("read"), buf)
        });
        b.write_all(b"TP/1.1\r\n").await.expect("write");
        let ((p, how), buf) = read.await.expect("join");
        assert_eq!((p, how), (Protocol::Http1, How::Detected));
        assert_eq!(&buf[..], b"GET / HTTP/1.1\r\n");

        let (mut a, b) = tokio::io::duplex(64);
        drop(b);
        let mut buf = BytesMut::new();
        let r = read_until_known(&mut a, &mut buf).await.expect("read");
        assert_eq!(r, (Protocol::Opaque, How::Closed));
    }
}
