//! Types shared by nodemesh's kernel programs and its daemon: map names, keys, values, constants.
//!
//! Every map type is `#[repr(C)]`, `Copy`, fixed-width and free of implicit padding, so the byte
//! layout the verifier sees equals the one user space writes. Flags are `u32`, never `bool`.
//! The layout tests at the bottom are the contract; change them only with both sides.
#![no_std]

/// Names of the maps in the kernel object, as user space looks them up.
pub mod map_names {
    /// `HashMap<u64 cgroup id, Enrollment>`: pod-level cgroups whose sockets the mesh captures.
    pub const ENROLLED: &str = "NM_ENROLLED";
    /// `LruHashMap<u64 socket cookie, OrigDst>`: written at connect, moved by sockops.
    pub const ORIG_BY_COOKIE: &str = "NM_ORIG_BY_COOKIE";
    /// `LruHashMap<ConnKey, OrigDst>`: what the proxy reads for an accepted connection.
    pub const ORIG_BY_ADDR: &str = "NM_ORIG_BY_ADDR";
    /// `HashMap<DestKey, u8>`: the mesh's destinations (service VIP:port, meshed pod IP with
    /// port 0 for every port); a connection elsewhere is left alone unless `FLAG_CAPTURE_ALL`.
    pub const DESTINATIONS: &str = "NM_DESTINATIONS";
    /// `Array<ProxyConfig>` with one element: where to redirect, which flags apply.
    pub const CONFIG: &str = "NM_CONFIG";
    /// `PerCpuArray<u64>` indexed by [`Counter`](crate::Counter).
    pub const COUNTERS: &str = "NM_COUNTERS";
    /// `SockHash<u64 socket cookie>`: the proxy's spliced sockets, each under its own cookie;
    /// `nm_splice` (the stream verdict) is attached to this map.
    pub const SPLICE: &str = "NM_SPLICE";
    /// `SockHash<u64 socket cookie>`: under a spliced socket's cookie, the socket its bytes go to.
    pub const SPLICE_PEER: &str = "NM_SPLICE_PEER";
    /// `HashMap<u64 socket cookie, SpliceCount>`: what `nm_splice` did with that socket's bytes.
    pub const SPLICE_BYTES: &str = "NM_SPLICE_BYTES";
    /// `HashMap<u64 socket cookie, SpliceControl>`: what the daemon tells `nm_splice` about that
    /// socket (pause, what it has relayed itself, when to send an event).
    pub const SPLICE_CONTROL: &str = "NM_SPLICE_CONTROL";
    /// `RingBuf` of `u64` socket cookies: "this splice reached its limit; look at it".
    pub const SPLICE_EVENTS: &str = "NM_SPLICE_EVENTS";
    /// `RingBuf` of [`DenyEvent`](super::DenyEvent)s: SYNs `nm_ingress` dropped for a STRICT pod,
    /// at most [`DENY_EVENTS_PER_SECOND`](super::DENY_EVENTS_PER_SECOND) per CPU.
    pub const DENY_EVENTS: &str = "NM_DENY_EVENTS";
    /// `PerCpuArray<[u64; 2]>` of one slot: the deny events' rate window (start, sent in it).
    pub const DENY_RATE: &str = "NM_DENY_RATE";
}

/// A SYN `nm_ingress` dropped: which pod (its enrolled cgroup) and who knocked, on which port.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct DenyEvent {
    /// The enrolled pod-level cgroup of the receiving socket.
    pub cgroup_id: u64,
    /// Source address, network byte order.
    pub saddr: u32,
    /// Source and destination ports, host order.
    pub sport: u16,
    pub dport: u16,
}

/// Deny events each CPU may send per second; a flood of SYNs beyond it is still dropped and
/// counted (`inbound_denied`), its events only counted (`deny_event_dropped`).
pub const DENY_EVENTS_PER_SECOND: u64 = 64;

/// Names of the programs in the kernel object (function names, which differ from the sections).
pub mod prog_names {
    pub const CONNECT4: &str = "nm_connect4";
    pub const CONNECT6: &str = "nm_connect6";
    pub const GETPEERNAME4: &str = "nm_getpeername4";
    pub const GETPEERNAME6: &str = "nm_getpeername6";
    pub const SOCKOPS: &str = "nm_sockops";
    pub const SPLICE: &str = "nm_splice";
    pub const INGRESS: &str = "nm_ingress";
}

/// Capacity of the per-connection maps. LRU maps evict the oldest entry instead of failing, so a
/// burst of connections never blocks a pod; evictions that hit a live record show up as
/// `Counter::SockopsNoRecord` and as "no record" closes in the proxy.
pub const ORIG_MAP_CAPACITY: u32 = 65_536;
/// Capacity of the enrollment map: pods per node, with room to spare (kubelet's default is 110).
pub const ENROLLED_CAPACITY: u32 = 4_096;
/// Capacity of the splice maps: sockets of same-node connections spliced at once (two per
/// connection); when full, a connection is relayed in user space instead, and counted.
pub const SPLICE_CAPACITY: u32 = 16_384;

/// Deepest cgroup level the hooks search for an enrolled ancestor. Kubelet puts Guaranteed pods
/// at `kubepods/pod<uid>` and the others one level lower, under whatever slice the node uses;
/// ten levels covers both with nested test roots on top.
pub const MAX_CGROUP_LEVEL: u32 = 10;

pub const AF_INET: u32 = 2;
pub const AF_INET6: u32 = 10;

/// `ProxyConfig::flags`: rewrite enrolled connections to the proxy (otherwise only record them).
pub const FLAG_REDIRECT: u32 = 1 << 0;
/// `ProxyConfig::flags`: the capture hooks log each decision for an enrolled pod's connection
/// (aya-log, read by the daemon as target `nodemesh::ebpf` at debug). Set and cleared at run time
/// as that target's level changes; off, a decision costs one test of this bit.
pub const FLAG_LOG_DECISIONS: u32 = 1 << 1;
/// `ProxyConfig::flags`: capture every TCP connection of an enrolled pod, not only those to the
/// mesh's destinations (`NM_DESTINATIONS`): egress metrics and passthrough for all traffic.
pub const FLAG_CAPTURE_ALL: u32 = 1 << 2;

/// Capacity of `NM_DESTINATIONS` (service ports and meshed pods of the whole mesh).
pub const DESTINATIONS_CAPACITY: u32 = 65_536;

/// `NM_DESTINATIONS`' key: an IPv4 address (network byte order) and a port (host order); port 0
/// stands for every port of the address (a meshed pod).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DestKey {
    pub ip4: u32,
    pub port: u16,
    pub _pad: u16,
}

/// `Enrollment::flags`: inbound STRICT — the pod accepts TCP only from the node proxy's mesh source
/// address and on its probe ports; other SYNs are dropped and counted.
pub const ENROLL_STRICT: u32 = 1 << 0;
/// Probe ports per pod that stay reachable from outside the mesh in STRICT mode (kubelet probes).
pub const MAX_PROBE_PORTS: usize = 4;

/// A pod-level cgroup the mesh captures.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Enrollment {
    /// Index of the workload in the daemon's state; carried into every record.
    pub workload_id: u32,
    /// `ENROLL_*` bits.
    pub flags: u32,
    /// Host byte order; 0 = unused slot.
    pub probe_ports: [u16; MAX_PROBE_PORTS],
}

/// The original destination of a captured connection, and who made it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct OrigDst {
    /// The enrolled pod-level cgroup the connecting task belonged to: the source identity.
    pub cgroup_id: u64,
    /// Destination address in network byte order; IPv4 uses `ip[0]`.
    pub ip: [u32; 4],
    /// Destination port in host byte order.
    pub port: u32,
    /// `AF_INET` or `AF_INET6`.
    pub family: u32,
    pub workload_id: u32,
    pub flags: u32,
    /// `bpf_ktime_get_ns` (CLOCK_MONOTONIC) when sockops re-keyed the record; the proxy refuses
    /// records older than a few seconds, so a leftover record can never lend its identity to a
    /// later connection that reuses the address and port.
    pub established_ns: u64,
}

/// How the proxy finds a record: the client's address as the accepted socket's peer.
///
/// `netns_cookie` is zero except for loopback clients, whose addresses repeat in every network
/// namespace (sidecar mode redirects to 127.0.0.1 inside each pod); there the namespace tells them
/// apart, and proxy and pod share it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct ConnKey {
    pub netns_cookie: u64,
    /// Network byte order; IPv4 uses `ip[0]`.
    pub ip: [u32; 4],
    /// Host byte order: the client's port, and in the upper 16 bits the proxy port it reached
    /// ([`conn_port`]): with the outbound listener's further ports, two live connections of one
    /// pod may share a client port toward two proxy ports.
    pub port: u32,
    pub family: u32,
}

/// [`ConnKey::port`] for a client port and the proxy port it connected to.
#[inline(always)]
pub const fn conn_port(client_port: u16, proxy_port: u16) -> u32 {
    client_port as u32 | (proxy_port as u32) << 16
}

/// Where and how to redirect; element 0 of the `CONFIG` array. All zero means "not configured":
/// the hooks then let every connection through untouched.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ProxyConfig {
    /// Outbound listener, IPv4, network byte order.
    pub proxy_ip4: u32,
    /// Outbound listener port, host byte order.
    pub proxy_port: u32,
    /// Outbound listener, IPv6, network byte order (all zero: IPv6 is not redirected).
    pub proxy_ip6: [u32; 4],
    /// `SO_MARK` of the proxy's own sockets: never captured, even inside an enrolled cgroup.
    pub proxy_mark: u32,
    /// `FLAG_*` bits.
    pub flags: u32,
    /// The node proxy's dedicated source address toward local pods (IPv4, network byte order):
    /// the only source STRICT pods accept TCP from, besides their probe ports.
    pub mesh_source4: u32,
    /// The mesh source block's mask, network byte order; 0 (what an older daemon wrote in this
    /// once-reserved field) means one address.
    pub mesh_source4_mask: u32,
    /// More outbound listener ports on `proxy_ip4`, `[spread_port, spread_port + spread)` (host
    /// byte order; `spread` 0: only `proxy_port`). A captured IPv4 connection is sent to the one
    /// its original destination hashes to, so one pod's connections to different destinations
    /// do not all share one (pod, proxy port) tuple and its TIME_WAIT limit.
    pub spread_port: u32,
    pub spread: u32,
}

impl ProxyConfig {
    /// The outbound port (host byte order) a captured IPv4 connection to `ip_be:port` goes to.
    #[inline(always)]
    pub fn outbound_port(&self, ip_be: u32, port: u32) -> u32 {
        if self.spread == 0 {
            return self.proxy_port;
        }
        // Fibonacci hashing of the destination: even over the ports for any address plan.
        let h = (u32::from_be(ip_be) ^ port.rotate_left(16)).wrapping_mul(0x9e37_79b1);
        self.spread_port + (h >> 16) % self.spread
    }

    /// Whether `port` (host byte order) is one of the outbound listener's ports.
    #[inline(always)]
    pub fn is_outbound_port(&self, port: u32) -> bool {
        port == self.proxy_port
            || (self.spread != 0
                && port >= self.spread_port
                && port < self.spread_port + self.spread)
    }
}

/// What `nm_splice` did with one socket's bytes; written only by the kernel program.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct SpliceCount {
    /// Bytes moved to the peer socket in the kernel.
    pub moved: u64,
    /// Bytes passed to the socket itself, for the daemon to read and relay.
    pub passed: u64,
    /// The [`SpliceControl::limit`] an event was last sent for (each limit is announced once).
    pub announced: u64,
}

/// What the daemon tells `nm_splice` about one spliced socket; written only by the daemon, always
/// whole (a hash map update swaps the element, so the program never sees half of one).
///
/// The verdict moves a segment to the peer only when the direction is not paused and the daemon
/// has relayed every byte passed to it before (`SpliceCount::passed == relayed`): bytes reach the
/// peer in order whichever way each one went.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct SpliceControl {
    /// Send the cookie on `SPLICE_EVENTS` once `moved + passed` reaches this.
    pub limit: u64,
    /// Bytes passed to the socket that the daemon has read and written to the peer.
    pub relayed: u64,
    /// Non-zero: pass every segment to the socket (the receiver is behind).
    pub paused: u32,
    pub _reserved: u32,
}

/// Per-CPU counters kept by the kernel programs; the daemon sums them for `/metrics`.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Counter {
    /// connect() calls seen from any cgroup under the attach root.
    ConnectSeen = 0,
    /// connect() from an enrolled cgroup (the source identity was found).
    ConnectEnrolled,
    /// Enrolled connections rewritten to the proxy.
    Redirected,
    /// Enrolled sockets skipped because they carry the proxy's mark.
    ProxyExempt,
    /// A record could not be stored (map full or kernel error); the connection was not captured.
    RecordStoreFailed,
    /// sockops moved a record to the address key the proxy looks up.
    SockopsRekeyed,
    /// An established connection from an enrolled socket had no record (evicted).
    SockopsNoRecord,
    /// getpeername() answered with the original destination.
    PeernameRestored,
    /// Segments `nm_splice` moved from a spliced proxy socket to its peer.
    SpliceRedirected,
    /// Segments `nm_splice` left to the proxy because the peer socket was gone.
    SpliceNoPeer,
    /// Limit events `nm_splice` could not queue (ring buffer full); the daemon's once-a-second
    /// look catches up.
    SpliceEventLost,
    /// Native IPv6 connect() from an enrolled pod refused (EPERM): the proxy has no IPv6 listener,
    /// and going direct would leave the mesh unencrypted (fail closed).
    Ipv6Refused,
    /// TCP SYNs to enrolled pods from outside the mesh, accepted (PERMISSIVE, or a probe port).
    InboundPlaintext,
    /// TCP SYNs to STRICT pods from outside the mesh, dropped.
    InboundDenied,
    /// Segments `nm_splice` passed to the proxy: the direction was paused for a slow receiver, or
    /// the proxy was still relaying bytes passed before.
    SplicePassed,
    /// Deny events not sent: over the per-CPU rate, or the ring buffer was full.
    DenyEventDropped,
    /// Capture records freed when their socket closed (sockops' state callback).
    RecordFreed,
    /// A captured socket whose close could not be watched (its record stays until the map's
    /// LRU evicts it).
    CloseWatchFailed,
    /// Connections of enrolled pods to an address that is not the mesh's, left alone in the
    /// kernel (without `FLAG_CAPTURE_ALL`).
    LeftOutsideMesh,
}

impl Counter {
    pub const COUNT: u32 = 19;
    pub const ALL: [Counter; Self::COUNT as usize] = [
        Counter::ConnectSeen,
        Counter::ConnectEnrolled,
        Counter::Redirected,
        Counter::ProxyExempt,
        Counter::RecordStoreFailed,
        Counter::SockopsRekeyed,
        Counter::SockopsNoRecord,
        Counter::PeernameRestored,
        Counter::SpliceRedirected,
        Counter::SpliceNoPeer,
        Counter::SpliceEventLost,
        Counter::Ipv6Refused,
        Counter::InboundPlaintext,
        Counter::InboundDenied,
        Counter::SplicePassed,
        Counter::DenyEventDropped,
        Counter::RecordFreed,
        Counter::CloseWatchFailed,
        Counter::LeftOutsideMesh,
    ];

    /// Stable snake_case name, used as a metric label.
    pub const fn name(self) -> &'static str {
        match self {
            Counter::ConnectSeen => "connect_seen",
            Counter::ConnectEnrolled => "connect_enrolled",
            Counter::Redirected => "redirected",
            Counter::ProxyExempt => "proxy_exempt",
            Counter::RecordStoreFailed => "record_store_failed",
            Counter::SockopsRekeyed => "sockops_rekeyed",
            Counter::SockopsNoRecord => "sockops_no_record",
            Counter::PeernameRestored => "peername_restored",
            Counter::SpliceRedirected => "splice_redirected",
            Counter::SpliceNoPeer => "splice_no_peer",
            Counter::SpliceEventLost => "splice_event_lost",
            Counter::Ipv6Refused => "ipv6_refused",
            Counter::InboundPlaintext => "inbound_plaintext",
            Counter::InboundDenied => "inbound_denied",
            Counter::SplicePassed => "splice_passed",
            Counter::DenyEventDropped => "deny_event_dropped",
            Counter::RecordFreed => "record_freed",
            Counter::CloseWatchFailed => "close_watch_failed",
            Counter::LeftOutsideMesh => "left_outside_mesh",
        }
    }
}

/// Is this network-byte-order IPv4 address in 127.0.0.0/8?
pub const fn is_loopback4(ip_be: u32) -> bool {
    u32::from_be(ip_be) >> 24 == 127
}

/// Is this network-byte-order IPv6 address `::1`?
pub const fn is_loopback6(ip: [u32; 4]) -> bool {
    ip[0] == 0 && ip[1] == 0 && ip[2] == 0 && u32::from_be(ip[3]) == 1
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: each type is #[repr(C)], Copy, made only of integers, and has no implicit padding
    // (checked by the layout tests below), so any byte pattern is a valid value.
    unsafe impl aya::Pod for super::Enrollment {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::OrigDst {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::ConnKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::DestKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::ProxyConfig {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::SpliceCount {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::SpliceControl {}
    // SAFETY: repr(C), plain integers, no padding (8 + 4 + 2 + 2 bytes).
    unsafe impl aya::Pod for super::DenyEvent {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::{align_of, size_of};

    // Sizes equal the sum of the fields: no implicit padding anywhere.
    #[test]
    fn layouts_have_no_padding() {
        assert_eq!(size_of::<Enrollment>(), 4 + 4 + 2 * MAX_PROBE_PORTS);
        assert_eq!(size_of::<OrigDst>(), 8 + 16 + 4 + 4 + 4 + 4 + 8);
        assert_eq!(size_of::<ConnKey>(), 8 + 16 + 4 + 4);
        assert_eq!(size_of::<ProxyConfig>(), 4 + 4 + 16 + 4 + 4 + 4 + 4 + 4 + 4);
        assert_eq!(size_of::<SpliceCount>(), 8 + 8 + 8);
        assert_eq!(size_of::<SpliceControl>(), 8 + 8 + 4 + 4);
        assert_eq!(align_of::<OrigDst>(), 8);
        assert_eq!(align_of::<ConnKey>(), 8);
    }

    #[test]
    fn counters_are_dense_and_named() {
        for (i, c) in Counter::ALL.iter().enumerate() {
            assert_eq!(*c as usize, i, "Counter::ALL must be in discriminant order");
            assert!(!c.name().is_empty());
        }
    }

    #[test]
    fn outbound_ports_spread_destinations_and_stay_in_range() {
        let mut cfg = ProxyConfig {
            proxy_port: 15001,
            ..Default::default()
        };
        let ip = |d: u8| u32::from_be_bytes([10, 210, 2, d]).to_be();
        assert_eq!(
            cfg.outbound_port(ip(2), 7000),
            15001,
            "no spread: the one port"
        );
        assert!(cfg.is_outbound_port(15001) && !cfg.is_outbound_port(15100));
        cfg.spread_port = 15100;
        cfg.spread = 16;
        let mut used = [0u32; 16];
        for d in 1..=64u8 {
            for port in [80, 7000, 7001, 8443] {
                let p = cfg.outbound_port(ip(d), port);
                assert!(cfg.is_outbound_port(p), "{p}");
                assert_eq!(p, cfg.outbound_port(ip(d), port), "the same each time");
                used[(p - 15100) as usize] += 1;
            }
        }
        // 256 destinations over 16 ports: every port used, none with more than twice its share.
        assert!(used.iter().all(|&n| n > 0 && n <= 32), "{used:?}");
        // Ports of one address spread too.
        let mut one = [false; 16];
        for p in 7000..7008 {
            one[(cfg.outbound_port(ip(2), p) - 15100) as usize] = true;
        }
        assert!(one.iter().filter(|&&b| b).count() >= 5, "{one:?}");
        assert!(!cfg.is_outbound_port(15116) && cfg.is_outbound_port(15115));
    }

    #[test]
    fn loopback_checks() {
        assert!(is_loopback4(u32::from_be_bytes([127, 0, 0, 1]).to_be()));
        assert!(is_loopback4(u32::from_be_bytes([127, 9, 9, 9]).to_be()));
        assert!(!is_loopback4(u32::from_be_bytes([10, 0, 0, 1]).to_be()));
        assert!(is_loopback6([0, 0, 0, 1u32.to_be()]));
        assert!(!is_loopback6([0, 0, 0, 2u32.to_be()]));
    }
}
