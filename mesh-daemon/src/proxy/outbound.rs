//! Outbound: connections the kernel captured from local pods arrive here. The kernel's record
//! (original destination and source workload, keyed by the client's address) decides everything;
//! without a record the connection is refused, never guessed.
//!
//! Today a captured connection is carried straight to its original destination (the same-node
//! case); routing to services and HBONE to other nodes branch off `decide`.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use mesh_common::{AF_INET, ConnKey, OrigDst};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tracing::{debug, info, warn};

use crate::{ebpf::loader::OrigDstTable, metrics::Metrics, state::State};

/// What outbound needs, shared by every connection task.
pub struct Inputs {
    pub orig: Arc<OrigDstTable>,
    pub state: Arc<State>,
    pub metrics: Arc<Metrics>,
    pub proxy_mark: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum OutboundError {
    #[error(
        "cannot listen on {addr} for captured connections: {source}; free the port or pass \
         --outbound with another address"
    )]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

pub struct Outbound {
    listener: TcpListener,
    inputs: Arc<Inputs>,
}

/// Where a captured connection goes.
#[derive(Debug, PartialEq, Eq)]
pub enum Decision {
    /// Straight to this address (same node, or a destination outside the mesh).
    Direct(SocketAddr),
}

impl Outbound {
    /// Binds the listener. The daemon does this before it attaches anything to the kernel, so a
    /// port conflict fails start-up without ever capturing a connection.
    pub async fn bind(addr: SocketAddr) -> Result<TcpListener, OutboundError> {
        TcpListener::bind(addr)
            .await
            .map_err(|source| OutboundError::Bind { addr, source })
    }

    pub fn new(listener: TcpListener, inputs: Arc<Inputs>) -> Self {
        Self { listener, inputs }
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    pub async fn run(self) {
        loop {
            match self.listener.accept().await {
                Ok((stream, peer)) => {
                    let inputs = self.inputs.clone();
                    tokio::spawn(async move { handle(inputs, stream, peer).await });
                }
                // Accept errors (EMFILE, ECONNABORTED) concern one connection; keep serving.
                Err(e) => {
                    warn!(error = %e, "outbound accept failed");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        }
    }
}

/// The key sockops stored the record under, computed from the accepted socket's peer.
pub fn conn_key(peer: SocketAddr, netns_cookie: impl FnOnce() -> u64) -> ConnKey {
    let (ip, family, loopback) = match peer {
        SocketAddr::V4(a) => (
            [u32::from(*a.ip()).to_be(), 0, 0, 0],
            AF_INET,
            a.ip().is_loopback(),
        ),
        SocketAddr::V6(a) => match a.ip().to_ipv4_mapped() {
            Some(v4) => ([u32::from(v4).to_be(), 0, 0, 0], AF_INET, v4.is_loopback()),
            None => (
                ipv6_words(a.ip()),
                mesh_common::AF_INET6,
                a.ip().is_loopback(),
            ),
        },
    };
    ConnKey {
        netns_cookie: if loopback { netns_cookie() } else { 0 },
        ip,
        port: u32::from(peer.port()),
        family,
    }
}

fn ipv6_words(ip: &Ipv6Addr) -> [u32; 4] {
    let o = ip.octets();
    // Each word keeps the network byte order the kernel uses.
    std::array::from_fn(|i| {
        u32::from_ne_bytes([o[4 * i], o[4 * i + 1], o[4 * i + 2], o[4 * i + 3]])
    })
}

/// The original destination a record names.
pub fn orig_dst_addr(rec: &OrigDst) -> SocketAddr {
    let port = rec.port as u16;
    if rec.family == AF_INET {
        SocketAddr::new(IpAddr::V4(Ipv4Addr::from(u32::from_be(rec.ip[0]))), port)
    } else {
        let mut o = [0u8; 16];
        for (i, w) in rec.ip.iter().enumerate() {
            o[4 * i..4 * i + 4].copy_from_slice(&w.to_ne_bytes());
        }
        SocketAddr::new(IpAddr::V6(Ipv6Addr::from(o)), port)
    }
}

/// Pure routing decision for a captured connection.
pub fn decide(_state: &State, rec: &OrigDst) -> Decision {
    Decision::Direct(orig_dst_addr(rec))
}

async fn handle(inputs: Arc<Inputs>, client: TcpStream, peer: SocketAddr) {
    let key = conn_key(peer, || super::netns_cookie(&client).unwrap_or(0));
    let Some(rec) = inputs.orig.take(&key) else {
        warn!(%peer, "no capture record for this connection: refusing it (the proxy never guesses a destination; a direct connection to the outbound port is not allowed)");
        refuse(&inputs, client, "no_record");
        return;
    };
    let (src_name, src_ns) = match inputs.state.workload(rec.workload_id) {
        Some(w) => (w.name, w.namespace),
        None => ("unknown".to_string(), "unknown".to_string()),
    };
    let labels = ["outbound", src_name.as_str(), src_ns.as_str()];
    let Decision::Direct(dst) = decide(&inputs.state, &rec);
    info!(%peer, %dst, workload = %format!("{src_ns}/{src_name}"), cgroup_id = rec.cgroup_id, "captured connection");
    let upstream = match connect_marked(dst, inputs.proxy_mark).await {
        Ok(s) => s,
        Err(e) => {
            warn!(%dst, error = %e, "upstream connect failed");
            refuse(&inputs, client, "connect");
            return;
        }
    };
    inputs.metrics.tcp_opened.with_label_values(&labels).inc();
    let (mut c, mut u) = (client, upstream);
    match tokio::io::copy_bidirectional(&mut c, &mut u).await {
        Ok((sent, received)) => {
            inputs
                .metrics
                .tcp_sent_bytes
                .with_label_values(&labels)
                .inc_by(sent);
            inputs
                .metrics
                .tcp_received_bytes
                .with_label_values(&labels)
                .inc_by(received);
            debug!(%peer, %dst, sent, received, "connection closed");
        }
        Err(e) => debug!(%peer, %dst, error = %e, "connection ended with an error"),
    }
    inputs.metrics.tcp_closed.with_label_values(&labels).inc();
}

/// Counts a refused connection and resets it, so the client fails at once (a refusal, not an EOF
/// it might take for a clean end).
fn refuse(inputs: &Inputs, client: TcpStream, reason: &str) {
    inputs
        .metrics
        .tcp_failed
        .with_label_values(&["outbound", reason])
        .inc();
    let _ = client.set_zero_linger();
}

async fn connect_marked(dst: SocketAddr, mark: u32) -> std::io::Result<TcpStream> {
    let sock = if dst.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    super::set_mark(&sock, mark)?;
    tokio::time::timeout(Duration::from_secs(5), sock.connect(dst))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"))?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn port_conflict_fails_bind_with_the_fix() {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = taken.local_addr().expect("addr");
        let err = Outbound::bind(addr).await.expect_err("port is taken");
        let msg = err.to_string();
        assert!(
            msg.contains(&addr.to_string()) && msg.contains("--outbound"),
            "{msg}"
        );
    }

    #[test]
    fn key_for_ipv4_peer_has_no_netns() {
        let k = conn_key("10.1.2.3:40000".parse().expect("addr"), || {
            panic!("not loopback")
        });
        assert_eq!(k.ip[0], u32::from(Ipv4Addr::new(10, 1, 2, 3)).to_be());
        assert_eq!(k.port, 40000);
        assert_eq!(k.family, AF_INET);
        assert_eq!(k.netns_cookie, 0);
    }

    #[test]
    fn key_for_loopback_peer_carries_netns() {
        let k = conn_key("127.0.0.1:5555".parse().expect("addr"), || 77);
        assert_eq!(k.netns_cookie, 77);
    }

    #[test]
    fn v4_mapped_peer_folds_to_ipv4() {
        let a = conn_key("[::ffff:10.0.0.9]:1234".parse().expect("addr"), || 0);
        let b = conn_key("10.0.0.9:1234".parse().expect("addr"), || 0);
        assert_eq!(a, b);
    }

    #[test]
    fn orig_dst_round_trips() {
        for s in ["10.96.0.10:80", "[fd00::1]:8080", "192.168.1.254:65535"] {
            let addr: SocketAddr = s.parse().expect("addr");
            let k = conn_key(addr, || 0);
            let rec = OrigDst {
                ip: k.ip,
                port: k.port,
                family: k.family,
                ..Default::default()
            };
            assert_eq!(orig_dst_addr(&rec), addr);
        }
    }

    #[test]
    fn decision_is_direct_to_original_destination() {
        let rec = OrigDst {
            ip: [u32::from(Ipv4Addr::new(10, 0, 0, 2)).to_be(), 0, 0, 0],
            port: 8080,
            family: AF_INET,
            ..Default::default()
        };
        assert_eq!(
            decide(&State::default(), &rec),
            Decision::Direct("10.0.0.2:8080".parse().expect("addr"))
        );
    }
}
