//! Live connection and request events for `/tap`: the event, the fan-out to followers, the
//! filter, and the JSON access log (the same events, one line per request, to a file).
//! A leaf: the proxy publishes here and the admin endpoint reads here, so neither imports the
//! other.

use std::{io::Write as _, path::Path, sync::Arc, time::SystemTime};

use serde::Serialize;
use tokio::sync::broadcast;

/// One connection or request event, as `/tap` streams it (one JSON object per line).
#[derive(Clone, Debug, Serialize)]
pub struct TapEvent {
    /// Unix time, seconds.
    pub ts: f64,
    /// `open`, `close` or `refused` (a connection), `request` (an L7 request, once its response
    /// ended).
    pub event: &'static str,
    pub reporter: String,
    pub source_workload: String,
    pub source_namespace: String,
    pub source_principal: String,
    pub destination_workload: String,
    pub destination_namespace: String,
    pub destination_principal: String,
    /// Where the connection went (pod `ip:port`, or the passthrough destination).
    pub destination: String,
    /// `local`, `hbone`, `passthrough` or `inbound`; `none` for a connection refused before it
    /// had a route (no capture record, a failed handshake).
    pub route: &'static str,
    /// Whether this hop was mutual TLS (HBONE).
    pub mtls: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bytes_sent: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bytes_received: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// A request's fields (`event: request`).
    #[serde(flatten)]
    pub http: Option<Box<HttpEvent>>,
}

/// What a request event adds.
#[derive(Clone, Debug, Serialize)]
pub struct HttpEvent {
    pub method: String,
    pub authority: String,
    pub path: String,
    pub status: u16,
    /// gRPC: the status from the trailers (or a trailers-only response).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub grpc_status: Option<u8>,
    /// From the request's headers to the response's end.
    pub latency_ms: f64,
    /// `namespace/name` of the HTTPRoute/GRPCRoute that matched, if one did.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub http_route: String,
    /// The destination service (`namespace/name`).
    pub service: String,
    /// `http1` or `h2`.
    pub protocol: &'static str,
}

/// Fan-out of connection events to `/tap` followers. Costs a check of the follower count (a short
/// lock) per connection when nobody follows.
#[derive(Clone)]
pub struct Tap {
    tx: broadcast::Sender<Arc<TapEvent>>,
}

impl Default for Tap {
    fn default() -> Self {
        // A follower that falls 4096 events behind loses the oldest (and is told how many).
        Self {
            tx: broadcast::Sender::new(4096),
        }
    }
}

impl Tap {
    pub fn active(&self) -> bool {
        self.tx.receiver_count() > 0
    }

    /// Publishes an event built only when someone follows.
    pub fn emit(&self, build: impl FnOnce() -> TapEvent) {
        if self.active() {
            let _ = self.tx.send(Arc::new(build()));
        }
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Arc<TapEvent>> {
        self.tx.subscribe()
    }
}

impl TapEvent {
    /// A refusal that is not a connection's: a pod that cannot be enrolled, an SVID the CA
    /// refused. `source` is who it befalls (workload, namespace, principal), `what` where it
    /// happened (a cgroup, the CA's URL), `reporter` the part of the daemon that saw it.
    pub fn refusal(reporter: &str, source: [&str; 3], what: String, reason: String) -> Self {
        let unknown = || "unknown".to_string();
        Self {
            ts: now_ts(),
            event: "refused",
            reporter: reporter.to_string(),
            source_workload: source[0].to_string(),
            source_namespace: source[1].to_string(),
            source_principal: source[2].to_string(),
            destination_workload: unknown(),
            destination_namespace: unknown(),
            destination_principal: unknown(),
            destination: what,
            route: "none",
            mtls: false,
            bytes_sent: None,
            bytes_received: None,
            reason: Some(reason),
            http: None,
        }
    }
}

pub fn now_ts() -> f64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64()
}

/// A `/tap` filter.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TapFilter {
    pub workload: Option<String>,
    pub namespace: Option<String>,
    pub path: Option<String>,
    pub status: Option<u16>,
}

impl TapFilter {
    /// Parses a query string; unknown keys and bad values are errors with the fix.
    pub fn parse(query: &str) -> Result<Self, String> {
        let mut f = Self::default();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let v = percent_decode(v).ok_or_else(|| format!("{k}: bad percent-encoding"))?;
            if v.is_empty() {
                return Err(format!("filter {k} has no value; write {k}=<value>"));
            }
            match k {
                "workload" => f.workload = Some(v),
                "namespace" => f.namespace = Some(v),
                "path" if v.starts_with('/') => f.path = Some(v),
                "path" => return Err(format!("path {v:?} must start with '/'")),
                "status" => {
                    f.status = Some(
                        v.parse::<u16>()
                            .ok()
                            .filter(|s| (100..=599).contains(s))
                            .ok_or_else(|| {
                                format!("status {v:?} is not an HTTP status (100 to 599)")
                            })?,
                    )
                }
                other => {
                    return Err(format!(
                        "unknown filter {other:?}; use workload, namespace, path or status"
                    ));
                }
            }
        }
        Ok(f)
    }

    /// A workload or namespace filter matches either end of the connection; path and status
    /// match only events that carry them (HTTP).
    pub fn matches(&self, e: &TapEvent) -> bool {
        let wl = self
            .workload
            .as_ref()
            .is_none_or(|w| *w == e.source_workload || *w == e.destination_workload);
        let ns = self
            .namespace
            .as_ref()
            .is_none_or(|n| *n == e.source_namespace || *n == e.destination_namespace);
        let path = self.path.as_ref().is_none_or(|p| {
            e.http
                .as_ref()
                .is_some_and(|h| h.path.starts_with(p.as_str()))
        });
        let status = self
            .status
            .is_none_or(|s| e.http.as_ref().is_some_and(|h| h.status == s));
        wl && ns && path && status
    }
}

/// The JSON access log: request events, one JSON object per line, written by a thread of its own
/// so no request waits on the disk. A full queue (the disk far behind) drops lines; each is
/// counted by the caller.
#[derive(Clone, Default)]
pub struct AccessLog {
    tx: Option<tokio::sync::mpsc::Sender<Arc<TapEvent>>>,
}

impl AccessLog {
    /// Opens (appends to) `path`, or standard output for `-`; the error names the file.
    pub fn open(path: &Path) -> Result<Self, String> {
        let out: Box<dyn std::io::Write + Send> = if path == Path::new("-") {
            Box::new(std::io::stdout())
        } else {
            Box::new(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .map_err(|e| {
                        format!(
                            "--access-log {}: cannot open it for appending: {e}; give a writable \
                             file, or - for standard output",
                            path.display()
                        )
                    })?,
            )
        };
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Arc<TapEvent>>(8192);
        std::thread::Builder::new()
            .name("access-log".into())
            .spawn(move || {
                let mut w = std::io::BufWriter::new(out);
                while let Some(e) = rx.blocking_recv() {
                    let _ = serde_json::to_writer(&mut w, &*e);
                    let _ = w.write_all(b"\n");
                    // Flush when caught up: lines reach the file promptly, in batches under load.
                    if rx.is_empty() {
                        let _ = w.flush();
                    }
                }
                let _ = w.flush();
            })
            .map_err(|e| format!("--access-log: cannot start its writer thread: {e}"))?;
        Ok(Self { tx: Some(tx) })
    }

    pub fn enabled(&self) -> bool {
        self.tx.is_some()
    }

    /// Queues a line; false when it was dropped (the writer is behind).
    pub fn log(&self, e: Arc<TapEvent>) -> bool {
        self.tx.as_ref().is_none_or(|tx| tx.try_send(e).is_ok())
    }
}

/// Decodes one query-string value (form encoding: `+` is a space); None when a `%` is not
/// followed by two hex digits or the result is not UTF-8 (`percent_decode_str` itself would
/// keep such a `%` as it is, and a filter must not silently match something else).
pub(crate) fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let escapes_ok = b.iter().enumerate().all(|(i, c)| {
        *c != b'%'
            || b.get(i + 1..i + 3)
                .is_some_and(|h| h.iter().all(u8::is_ascii_hexdigit))
    });
    if !escapes_ok {
        return None;
    }
    let spaced = s.replace('+', " ");
    percent_encoding::percent_decode_str(&spaced)
        .decode_utf8()
        .ok()
        .map(|c| c.into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(src: &str, dst: &str) -> TapEvent {
        TapEvent {
            ts: 0.0,
            event: "open",
            reporter: "outbound".into(),
            source_workload: src.into(),
            source_namespace: "demo".into(),
            source_principal: String::new(),
            destination_workload: dst.into(),
            destination_namespace: "prod".into(),
            destination_principal: String::new(),
            destination: "10.0.0.1:80".into(),
            route: "hbone",
            mtls: true,
            bytes_sent: None,
            bytes_received: None,
            reason: None,
            http: None,
        }
    }

    #[test]
    fn tap_filters_parse_and_match() {
        let f = TapFilter::parse("workload=client&namespace=prod").expect("valid");
        assert!(f.matches(&event("client", "server")));
        assert!(f.matches(&event("x", "client")));
        assert!(!f.matches(&event("x", "y")));
        assert!(
            TapFilter::parse("")
                .expect("empty")
                .matches(&event("a", "b"))
        );
        let http = TapFilter::parse("path=%2Fapi&status=200").expect("valid");
        assert_eq!(http.path.as_deref(), Some("/api"));
        assert!(!http.matches(&event("a", "b")), "L4 events carry no path");
        let mut e = event("a", "b");
        e.event = "request";
        e.http = Some(Box::new(HttpEvent {
            method: "GET".into(),
            authority: "web".into(),
            path: "/api/v1".into(),
            status: 200,
            grpc_status: None,
            latency_ms: 1.5,
            http_route: String::new(),
            service: "demo/web".into(),
            protocol: "http1",
        }));
        assert!(http.matches(&e));
        // one flat JSON object, the request's fields beside the connection's
        let v = serde_json::to_value(&e).expect("json");
        assert_eq!(v["path"], "/api/v1");
        assert_eq!(v["status"], 200);
        assert!(v.get("http").is_none() && v.get("grpc_status").is_none());
        e.http.as_mut().expect("http").path = "/other".into();
        assert!(!http.matches(&e));
    }

    #[test]
    fn query_values_decode_like_forms() {
        assert_eq!(percent_decode("a%2Fb+c").as_deref(), Some("a/b c"));
        assert_eq!(percent_decode("%e2%9c%93").as_deref(), Some("\u{2713}"));
        assert_eq!(percent_decode("100%"), None);
        assert_eq!(percent_decode("%ff"), None, "not UTF-8");
    }

    #[test]
    fn bad_tap_filters_say_why() {
        for (q, why) in [
            ("pod=x", "unknown filter"),
            ("status=abc", "not an HTTP status"),
            ("status=99", "not an HTTP status"),
            ("path=api", "must start with '/'"),
            ("workload=", "has no value"),
            ("workload=%zz", "percent-encoding"),
        ] {
            let e = TapFilter::parse(q).expect_err(q);
            assert!(e.contains(why), "{q}: {e}");
        }
    }
}
