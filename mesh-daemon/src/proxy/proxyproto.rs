//! PROXY protocol v2 toward pods that ask for it (`proxyProtocolPorts`, the
//! `nodemesh.io/proxy-protocol-ports` annotation): the destination's proxy connects to the pod
//! from its mesh source, so at L4 the pod's TCP peer is never the client; a server that reads
//! this header (HAProxy, nginx `proxy_protocol`, Envoy's listener filter, most databases' proxy
//! modes) learns the client pod's address and port instead. Every connection the proxy makes to
//! a pod carries one client pod's traffic (L4 relays one connection; L7 pools are per source
//! workload and endpoint), so the header is true for the whole connection.

use std::net::SocketAddr;

use ppp::v2::{Addresses, Builder, Command, IPv4, IPv6, Protocol, Version};
use tokio::{io::AsyncWriteExt as _, net::TcpStream};

use crate::state::Workload;

/// The header for a connection from `client` to `pod`: the PROXY command with both addresses,
/// or LOCAL ("use the connection's own addresses") when the client's address is unknown or of
/// another family than the pod's.
pub fn header(client: Option<SocketAddr>, pod: SocketAddr) -> Vec<u8> {
    let addresses = match (client, pod) {
        (Some(SocketAddr::V4(c)), SocketAddr::V4(p)) => Some(Addresses::from(IPv4::new(
            *c.ip(),
            *p.ip(),
            c.port(),
            p.port(),
        ))),
        (Some(SocketAddr::V6(c)), SocketAddr::V6(p)) => Some(Addresses::from(IPv6::new(
            *c.ip(),
            *p.ip(),
            c.port(),
            p.port(),
        ))),
        _ => None,
    };
    let built = match addresses {
        Some(a) => Builder::with_addresses(Version::Two | Command::Proxy, Protocol::Stream, a),
        None => Builder::with_addresses(
            Version::Two | Command::Local,
            Protocol::Unspecified,
            Addresses::Unspecified,
        ),
    }
    .build();
    // Building fails only past 64 KiB of TLVs; these headers have none.
    built.unwrap_or_default()
}

/// Connects to a local pod the way every path does (the proxy mark, from the mesh source) and,
/// when the workload asks for it on that port, writes the header before anything else.
pub async fn connect_pod(
    pod: SocketAddr,
    mark: u32,
    source: Option<std::net::IpAddr>,
    workload: &Workload,
    client: Option<SocketAddr>,
) -> std::io::Result<TcpStream> {
    let mut stream = crate::socket::connect_marked(pod, mark, source).await?;
    if workload.proxy_protocol_ports.contains(&pod.port()) {
        stream.write_all(&header(client, pod)).await?;
    }
    Ok(stream)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sa(s: &str) -> SocketAddr {
        s.parse().expect("a socket address")
    }

    #[test]
    fn headers_read_back_as_written() {
        let h = header(Some(sa("10.210.1.2:43210")), sa("10.210.2.3:7000"));
        let parsed = ppp::v2::Header::try_from(h.as_slice()).expect("a v2 header");
        assert_eq!(parsed.command, Command::Proxy);
        assert_eq!(
            parsed.addresses,
            Addresses::from(IPv4::new([10, 210, 1, 2], [10, 210, 2, 3], 43210, 7000))
        );
        assert_eq!(parsed.len(), h.len(), "nothing after the header");
        // Unknown client, or families that differ: LOCAL, no addresses.
        for client in [None, Some(sa("[fd00::1]:5"))] {
            let h = header(client, sa("10.210.2.3:7000"));
            let parsed = ppp::v2::Header::try_from(h.as_slice()).expect("a v2 header");
            assert_eq!(parsed.command, Command::Local, "{client:?}");
        }
    }
}
