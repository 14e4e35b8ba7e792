//! The proxy: outbound (connections the kernel captured from local pods), inbound (HBONE from
//! other nodes), and what both share — marked sockets, connecting to a local pod from the mesh
//! source address, and relaying bytes with half-close and reset carried end to end.

pub mod balance;
pub mod hbone;
pub mod inbound;
pub mod outbound;
pub mod splice;

use std::{
    net::{IpAddr, SocketAddr},
    os::fd::AsRawFd,
    sync::Arc,
    time::Duration,
};

use tokio::net::{TcpListener, TcpSocket, TcpStream};

/// What the proxy's tasks share.
pub struct Inputs {
    pub orig: Arc<crate::ebpf::loader::OrigDstTable>,
    pub state: Arc<crate::state::State>,
    pub metrics: Arc<crate::metrics::Metrics>,
    pub proxy_mark: u32,
    pub balancer: balance::Balancer,
    pub hbone: hbone::Client,
    /// SVIDs and the trust bundle.
    pub identity: Arc<crate::identity::manager::Manager>,
    /// The HBONE listener's mTLS acceptor.
    pub tls: tokio_rustls::TlsAcceptor,
    /// Live connection events for `/tap`.
    pub tap: crate::admin::Tap,
    /// The same-node fast path's maps (`--sockmap on`).
    pub splice: Option<Arc<crate::ebpf::loader::SpliceMaps>>,
}

impl Inputs {
    /// Applies the destination's authorization policies to a source identity, and counts the
    /// decision (`authorization_decisions_total{result,policy}`). Both places that enforce them —
    /// the HBONE server, and the outbound path for a same-node destination — go through here.
    pub fn authorize(
        &self,
        snap: &crate::state::Snapshot,
        source: &crate::identity::Identity,
        dst: &crate::state::Workload,
        port: u16,
    ) -> crate::authz::Verdict {
        let verdict = crate::authz::authorize(&snap.policies, source, dst, port);
        self.metrics
            .authz
            .with_label_values(&[verdict.result(), verdict.policy()])
            .inc();
        verdict
    }

    /// Publishes a connection event to `/tap` followers (built only when there are any).
    pub fn tap(&self, event: &'static str, edge: &crate::metrics::Edge, hop: Hop<'_>) {
        self.tap.emit(|| crate::admin::TapEvent {
            ts: crate::admin::now_ts(),
            event,
            reporter: edge[0].clone(),
            source_workload: edge[1].clone(),
            source_namespace: edge[2].clone(),
            source_principal: edge[3].clone(),
            destination_workload: edge[4].clone(),
            destination_namespace: edge[5].clone(),
            destination_principal: edge[6].clone(),
            destination: hop.destination.to_string(),
            route: hop.route,
            mtls: hop.route == "hbone" || hop.route == "inbound",
            bytes_sent: hop.bytes.map(|b| b.0),
            bytes_received: hop.bytes.map(|b| b.1),
            reason: hop.reason.map(str::to_string),
            path: None,
            status: None,
        });
    }
}

/// Where a tapped connection went and how it ended.
#[derive(Clone, Copy)]
pub struct Hop<'a> {
    pub destination: SocketAddr,
    pub route: &'static str,
    pub bytes: Option<(u64, u64)>,
    pub reason: Option<&'a str>,
}

/// How long a connection attempt to a pod or a node may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// `SO_NETNS_COOKIE` (linux/socket.h); not yet in every libc release.
const SO_NETNS_COOKIE: libc::c_int = 71;

/// Puts the proxy's mark on a socket so the kernel hooks never capture it.
pub fn set_mark(fd: &impl AsRawFd, mark: u32) -> std::io::Result<()> {
    if mark == 0 {
        return Ok(());
    }
    set_sockopt_u32(fd, libc::SOL_SOCKET, libc::SO_MARK, mark)
}

/// `IP_BIND_ADDRESS_NO_PORT`: defer the source port choice from bind() to connect().
fn set_bind_no_port(fd: &impl AsRawFd) -> std::io::Result<()> {
    set_sockopt_u32(fd, libc::IPPROTO_IP, libc::IP_BIND_ADDRESS_NO_PORT, 1)
}

/// Sets a socket option whose value is one 32-bit integer (`int` or `u32` in the kernel).
fn set_sockopt_u32(
    fd: &impl AsRawFd,
    level: libc::c_int,
    name: libc::c_int,
    value: u32,
) -> std::io::Result<()> {
    // SAFETY: setsockopt reads `size_of::<u32>()` bytes from a live local.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (&value as *const u32).cast(),
            std::mem::size_of::<u32>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// The network namespace cookie of a socket (what `bpf_get_netns_cookie` returns for it).
pub fn netns_cookie(fd: &impl AsRawFd) -> std::io::Result<u64> {
    sockopt_u64(fd, libc::SOL_SOCKET, SO_NETNS_COOKIE)
}

/// The socket's cookie (`SO_COOKIE`, what `bpf_get_socket_cookie` returns for it).
pub fn socket_cookie(fd: &impl AsRawFd) -> std::io::Result<u64> {
    sockopt_u64(fd, libc::SOL_SOCKET, libc::SO_COOKIE)
}

/// A socket option whose value is one unsigned integer: a `u64` (cookies) or an `int` (buffer
/// sizes), told apart by the length the kernel writes back.
pub(crate) fn sockopt_u64(
    fd: &impl AsRawFd,
    level: libc::c_int,
    name: libc::c_int,
) -> std::io::Result<u64> {
    let mut v = [0u8; 8];
    let mut len = v.len() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into a live local.
    let rc =
        unsafe { libc::getsockopt(fd.as_raw_fd(), level, name, v.as_mut_ptr().cast(), &mut len) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    match len {
        8 => Ok(u64::from_ne_bytes(v)),
        4 => Ok(u64::from(u32::from_ne_bytes([v[0], v[1], v[2], v[3]]))),
        n => Err(std::io::Error::other(format!(
            "socket option {level}/{name}: {n} bytes, expected 4 or 8"
        ))),
    }
}

/// Connects with the proxy's mark (never captured), optionally from a given source address.
pub async fn connect_marked(
    dst: SocketAddr,
    mark: u32,
    source: Option<IpAddr>,
) -> std::io::Result<TcpStream> {
    let sock = if dst.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    set_mark(&sock, mark)?;
    if let Some(ip) = source {
        // Every connection to a local pod leaves from the one mesh source address. Binding port
        // 0 would pick the port at bind time, blind to the destination, so ports held (or in
        // TIME_WAIT) toward any pod would count against all of them; with this option connect()
        // picks it per destination (what Envoy and HAProxy do for source binding).
        set_bind_no_port(&sock)?;
        sock.bind(SocketAddr::new(ip, 0)).map_err(|e| {
            std::io::Error::new(
                e.kind(),
                format!(
                    "cannot use {ip} as source address ({e}); the node's meshSource must be an \
                     address of this node"
                ),
            )
        })?;
    }
    sock.set_nodelay(true)?;
    tokio::time::timeout(CONNECT_TIMEOUT, sock.connect(dst))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"))?
}

/// Relays between two TCP sockets until both directions end; returns (bytes a→b, bytes b→a).
/// A half-close is passed on as a half-close. An error on either side (a reset) resets both
/// sockets, so each peer sees a reset rather than a clean end.
pub async fn relay_tcp(a: &mut TcpStream, b: &mut TcpStream) -> std::io::Result<(u64, u64)> {
    let r = tokio::io::copy_bidirectional(a, b).await;
    if r.is_err() {
        let _ = a.set_zero_linger();
        let _ = b.set_zero_linger();
    }
    r
}

/// Accepts connections forever, one task per connection. Accept errors (EMFILE, ECONNABORTED)
/// concern one connection: they are logged and the listener keeps serving.
pub async fn accept_loop<F, Fut>(
    listener: TcpListener,
    what: &'static str,
    inputs: Arc<Inputs>,
    handle: F,
) where
    F: Fn(Arc<Inputs>, TcpStream, SocketAddr) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                tokio::spawn(handle(inputs.clone(), stream, peer));
            }
            Err(e) => {
                tracing::warn!(listener = what, error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sockopt_reads_int_and_u64_options() {
        let s = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
        let cookie = socket_cookie(&s).expect("SO_COOKIE");
        assert!(cookie > 0);
        assert_eq!(socket_cookie(&s).expect("SO_COOKIE"), cookie);
        // An int option: the kernel doubles what was set (socket(7)).
        set_sockopt_u32(&s, libc::SOL_SOCKET, libc::SO_RCVBUF, 8192).expect("SO_RCVBUF");
        assert_eq!(
            sockopt_u64(&s, libc::SOL_SOCKET, libc::SO_RCVBUF).expect("SO_RCVBUF"),
            2 * 8192
        );
    }
}
