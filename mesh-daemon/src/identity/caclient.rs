//! The CA's wire types and the node's client for it: HTTPS/1.1 + JSON, one request per
//! connection (a node calls the CA a few times a day per identity, and once per bundle refresh).
//!
//! The CA (`ca.rs`) and the certificate manager (`manager.rs`) both use the wire types from here,
//! so neither imports the other.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use rustls::pki_types::ServerName;
use serde::{Deserialize, Serialize};

use super::{Bundle, tls};

/// The CA's default port.
pub const PORT: u16 = 15012;
/// How long one call to the CA may take.
const CA_TIMEOUT: Duration = Duration::from_secs(10);
/// The largest answer the node reads from the CA.
const MAX_RESPONSE: usize = 256 << 10;

/// What the CA hands back for a CSR.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Issued {
    /// Leaf first, then the signer.
    pub chain: Vec<String>,
    pub bundle: Vec<String>,
    pub signer: String,
}

/// `GET /v1/bundle`'s answer.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct BundleReply {
    pub bundle: Vec<String>,
    pub signer: String,
}

/// `POST /v1/svid`'s body.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SignRequest {
    pub csr: String,
}

#[derive(Debug, thiserror::Error)]
pub enum CaClientError {
    #[error("{0}")]
    Config(String),
    #[error("cannot reach the CA at {ca}: {reason}")]
    Unreachable { ca: String, reason: String },
    /// The CA answered, but its certificate does not check out: reaching it again will not help.
    #[error("the CA at {ca} is not trusted: {reason}")]
    Untrusted { ca: String, reason: String },
    #[error("the CA refused: {status} {reason}")]
    Refused { status: u16, reason: String },
}

/// Where the CA is, as `--ca` names it: `https://<host>[:port]`, the host an IP address or a DNS
/// name (in Kubernetes, the CA Service's). A DNS name is resolved at every call, so a CA that
/// moves is followed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CaUrl {
    pub host: String,
    pub port: u16,
    /// What the CA's serving certificate must name.
    pub server_name: ServerName<'static>,
}

impl CaUrl {
    pub fn parse(url: &str) -> Result<Self, String> {
        let rest = url
            .strip_prefix("https://")
            .ok_or_else(|| format!("CA URL {url:?} must start with https://"))?
            .trim_end_matches('/');
        let bad = || format!("CA URL {url:?} must be https://<ip or DNS name>[:port]");
        if rest.contains('/') || rest.contains('@') || rest.is_empty() {
            return Err(bad());
        }
        // `[v6]:port`, `[v6]`, a bare IP (v6 without brackets too), `v4:port`, `name:port`,
        // `name`.
        let (host, port) = if let Some(r) = rest.strip_prefix('[') {
            let (h, tail) = r.split_once(']').ok_or_else(bad)?;
            match tail.strip_prefix(':') {
                Some(p) => (h, Some(p)),
                None if tail.is_empty() => (h, None),
                None => return Err(bad()),
            }
        } else if rest.parse::<std::net::IpAddr>().is_ok() {
            (rest, None)
        } else if rest.matches(':').count() > 1 {
            return Err(format!(
                "CA URL {url:?}: write an IPv6 address with a port in brackets, \
                 https://[addr]:port"
            ));
        } else {
            match rest.rsplit_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (rest, None),
            }
        };
        let port = match port {
            Some(p) => p.parse::<u16>().ok().filter(|p| *p != 0).ok_or_else(bad)?,
            None => PORT,
        };
        let server_name = ServerName::try_from(host.to_string()).map_err(|_| bad())?;
        Ok(Self {
            host: host.to_string(),
            port,
            server_name,
        })
    }
}

impl std::fmt::Display for CaUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

/// A node's client for the CA: its address, its token, and the mark its connections carry so no
/// hook ever captures them.
pub struct CaClient {
    url: CaUrl,
    token: Token,
    mark: u32,
}

/// The credential the CA authenticates a node with.
pub enum Token {
    /// A fixed bootstrap token (the mesh file's CA).
    Fixed(String),
    /// A file read again at every request: a Kubernetes projected service-account token, which
    /// the kubelet rotates in place (the last good one is used if a read fails mid-rotation).
    File {
        path: std::path::PathBuf,
        last: std::sync::Mutex<String>,
    },
}

impl Token {
    fn current(&self) -> String {
        match self {
            Self::Fixed(t) => t.clone(),
            Self::File { path, last } => {
                let mut last = last.lock().unwrap_or_else(|p| p.into_inner());
                if let Ok(t) = crate::meshfile::read_file(path) {
                    let t = t.trim();
                    if !t.is_empty() {
                        *last = t.to_string();
                    }
                }
                last.clone()
            }
        }
    }
}

impl std::fmt::Debug for CaClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the token.
        f.debug_struct("CaClient").field("ca", &self.url).finish()
    }
}

impl CaClient {
    pub fn new(url: CaUrl, token: Token, mark: u32) -> Self {
        Self { url, token, mark }
    }

    pub fn url(&self) -> &CaUrl {
        &self.url
    }

    /// A failed handshake with the CA, with its real cause and fix.
    fn tls_error(&self, e: &std::io::Error) -> CaClientError {
        let ca = self.url.to_string();
        let untrusted = |reason: String| CaClientError::Untrusted {
            ca: ca.clone(),
            reason,
        };
        match tls::failure_label(e) {
            "untrusted" => untrusted(format!(
                "its certificate is not signed by --ca-bundle ({e}); the bundle is another CA's, \
                 or older than a root rotation: copy the CA's bundle.pem again (in Kubernetes, \
                 ConfigMap nodemesh-trust-bundle)"
            )),
            "wrong_identity" => untrusted(format!(
                "its certificate does not name {} ({e}); pass --ca with a name or address the \
                 CA's certificate holds (its --listen address and --san names)",
                self.url.host
            )),
            "expired" | "not_yet_valid" => untrusted(format!(
                "its certificate is outside its validity ({e}); check this node's clock"
            )),
            _ => CaClientError::Unreachable {
                ca,
                reason: format!("TLS: {e}"),
            },
        }
    }

    /// One HTTPS/1.1 request; the CA's certificate must chain to `bundle`. Returns the body of a
    /// 2xx answer; another status is `Refused` with the CA's reason.
    pub async fn call(
        &self,
        bundle: &Bundle,
        method: &str,
        path: &str,
        body: Option<String>,
    ) -> Result<Bytes, CaClientError> {
        let ca = self.url.to_string();
        let token = self.token.current();
        let unreachable = |reason: String| CaClientError::Unreachable {
            ca: ca.clone(),
            reason,
        };
        let cfg = tls::ca_client_config(bundle).map_err(|e| unreachable(e.to_string()))?;
        let attempt = async {
            let addrs: Vec<_> = tokio::net::lookup_host((self.url.host.as_str(), self.url.port))
                .await
                .map_err(|e| unreachable(format!("cannot resolve {}: {e}", self.url.host)))?
                .collect();
            // Every address the name resolves to, in order, until one answers.
            let mut tcp = Err(unreachable(format!("{} has no address", self.url.host)));
            for addr in addrs {
                tcp = crate::socket::connect_marked(addr, self.mark, None)
                    .await
                    .map_err(|e| unreachable(format!("{addr}: {e}")));
                if tcp.is_ok() {
                    break;
                }
            }
            let tcp = tcp?;
            let tls = tokio_rustls::TlsConnector::from(cfg)
                .connect(self.url.server_name.clone(), tcp)
                .await
                .map_err(|e| self.tls_error(&e))?;
            let (mut sender, conn) =
                hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
                    .await
                    .map_err(|e| unreachable(e.to_string()))?;
            tokio::spawn(conn);
            let req = hyper::Request::builder()
                .method(method)
                .uri(path)
                .header(hyper::header::HOST, ca.as_str())
                .header(hyper::header::AUTHORIZATION, format!("Bearer {token}"))
                .header(hyper::header::CONTENT_TYPE, "application/json")
                .body(Full::new(Bytes::from(body.unwrap_or_default())))
                .map_err(|e| CaClientError::Config(e.to_string()))?;
            let resp = sender
                .send_request(req)
                .await
                .map_err(|e| unreachable(e.to_string()))?;
            let status = resp.status();
            let bytes = Limited::new(resp.into_body(), MAX_RESPONSE)
                .collect()
                .await
                .map_err(|e| unreachable(e.to_string()))?
                .to_bytes();
            if !status.is_success() {
                let reason = serde_json::from_slice::<serde_json::Value>(&bytes)
                    .ok()
                    .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_string))
                    .unwrap_or_else(|| String::from_utf8_lossy(&bytes).into_owned());
                return Err(CaClientError::Refused {
                    status: status.as_u16(),
                    reason,
                });
            }
            Ok(bytes)
        };
        tokio::time::timeout(CA_TIMEOUT, attempt)
            .await
            .map_err(|_| unreachable(format!("no answer within {CA_TIMEOUT:?}")))?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ca_urls_take_ips_and_dns_names() {
        for (url, host, port) in [
            ("https://10.0.0.1:15012", "10.0.0.1", 15012),
            ("https://10.0.0.1", "10.0.0.1", PORT),
            ("https://10.0.0.1:9443/", "10.0.0.1", 9443),
            ("https://[fd00::1]:15012", "fd00::1", 15012),
            ("https://[fd00::1]", "fd00::1", PORT),
            ("https://fd00::1", "fd00::1", PORT),
            (
                "https://nodemesh-ca.nodemesh-system.svc:15012",
                "nodemesh-ca.nodemesh-system.svc",
                15012,
            ),
            ("https://ca.example", "ca.example", PORT),
        ] {
            let u = CaUrl::parse(url).unwrap_or_else(|e| panic!("{url}: {e}"));
            assert_eq!((u.host.as_str(), u.port), (host, port), "{url}");
        }
        let ip = CaUrl::parse("https://10.0.0.1").expect("ip");
        assert!(matches!(ip.server_name, ServerName::IpAddress(_)));
        let dns = CaUrl::parse("https://ca.example").expect("dns");
        assert!(matches!(dns.server_name, ServerName::DnsName(_)));
        assert_eq!(
            CaUrl::parse("https://[fd00::1]").expect("v6").to_string(),
            "[fd00::1]:15012"
        );
    }

    #[test]
    fn bad_ca_urls_say_what_is_expected() {
        for url in [
            "http://10.0.0.1:15012",
            "10.0.0.1:15012",
            "https://",
            "https://10.0.0.1:0",
            "https://10.0.0.1:99999",
            "https://10.0.0.1:15012/v1",
            "https://user@10.0.0.1",
            "https://bad_name!:15012",
            "https://[fd00::1",
            "https://fd00::1:15012:x",
        ] {
            let e = CaUrl::parse(url).expect_err(url);
            assert!(e.contains("https://"), "{url}: {e}");
        }
    }
}
