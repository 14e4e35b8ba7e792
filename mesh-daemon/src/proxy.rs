//! The proxy: outbound (connections the kernel captured from local pods), inbound (HBONE from
//! other nodes), and what both share — marked sockets, connecting to a local pod from the mesh
//! source address, and relaying bytes with half-close and reset carried end to end.

pub mod balance;
pub mod detect;
pub mod h2;
pub mod hbone;
pub mod http;
pub mod inbound;
pub mod kernel_events;
pub mod l7cache;
pub mod observe;
pub mod outbound;
pub mod proxyproto;
pub mod relay;
pub mod route;
pub mod splice;
pub mod upstream;

use std::{net::SocketAddr, sync::Arc, time::Duration};

use tokio::net::{TcpListener, TcpStream};

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
    pub tap: crate::tap::Tap,
    /// The JSON access log of requests (`--access-log`), if on.
    pub access_log: crate::tap::AccessLog,
    /// The same-node fast path's maps (`--sockmap on`).
    pub splice: Option<Arc<crate::ebpf::loader::SpliceMaps>>,
    /// Connection tasks, and the signal to stop accepting and, later, to reset what is open.
    pub drain: crate::drain::Drain,
    /// L7: balancers and pooled endpoint connections.
    pub l7: l7cache::L7,
    /// Whether service ports are served at L7 (`--l7`); off: every connection is L4.
    pub l7_enabled: bool,
    /// How long detection waits for a client's first bytes (`--detect-timeout`).
    pub detect_timeout: Duration,
    /// How long an inbound HBONE peer may take to handshake (`--handshake-timeout`).
    pub handshake_timeout: Duration,
}

impl Inputs {
    /// Counts an authorization decision (`authorization_decisions_total{result,policy}`), allowed
    /// or refused; both places that enforce policies — the HBONE server, and the outbound path for
    /// a same-node destination — decide with [`route::authorize`] and count here.
    pub fn count_verdict(&self, verdict: Option<&crate::authz::Verdict>) {
        if let Some(v) = verdict {
            self.metrics
                .authz
                .with_label_values(&[v.result(), v.policy()])
                .inc();
        }
    }

    /// A connection refused on `edge` (as far as the reporter knows it): counted in
    /// `tcp_connections_failed_total` with both workloads and the bounded `reason`, and published
    /// to `/tap` as a `refused` event with the `detail` (why, and what to change).
    pub fn refused(
        &self,
        edge: &crate::metrics::Edge,
        destination: SocketAddr,
        route: &'static str,
        reason: &str,
        detail: &str,
    ) {
        self.metrics
            .tcp_failed
            .with_label_values(&[
                &edge[0], &edge[1], &edge[2], &edge[4], &edge[5], &edge[7], reason,
            ])
            .inc();
        let why = format!("{reason}: {detail}");
        self.tap(
            "refused",
            edge,
            Hop {
                destination,
                route,
                bytes: None,
                reason: Some(&why),
            },
        );
    }

    /// Publishes a connection event to `/tap` followers (built only when there are any).
    pub fn tap(&self, event: &'static str, edge: &crate::metrics::Edge, hop: Hop<'_>) {
        self.tap.emit(|| crate::tap::TapEvent {
            ts: crate::tap::now_ts(),
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
            // A refusal carried no bytes in either protocol.
            mtls: event != "refused" && (hop.route == "hbone" || hop.route == "inbound"),
            bytes_sent: hop.bytes.map(|b| b.0),
            bytes_received: hop.bytes.map(|b| b.1),
            reason: hop.reason.map(str::to_string),
            http: None,
        });
    }
}

/// Follows the state and drops what the proxy keeps per endpoint, peer and identity once the
/// mesh no longer has it (balancer statistics, pooled HBONE connections, TLS client
/// configurations), so those tables follow the workloads instead of only growing.
pub async fn prune_caches(
    inputs: Arc<Inputs>,
    mut snapshots: tokio::sync::watch::Receiver<Arc<crate::state::Snapshot>>,
) {
    // The L7 tables' gauges exist from the start (a series appearing at the first prune, seconds
    // later, would look like one that follows traffic).
    l7_sizes(&inputs);
    loop {
        // On every change, and every few seconds against the current snapshot: a connection
        // still deciding on an older one may re-add an entry just after a change.
        tokio::select! {
            changed = snapshots.changed() => {
                if changed.is_err() {
                    return;
                }
            }
            () = tokio::time::sleep(Duration::from_secs(5)) => {}
        }
        let snap = snapshots.borrow_and_update().clone();
        let td = inputs.identity.trust_domain().to_string();
        let live = snap
            .services
            .values()
            .flat_map(|s| s.endpoints.iter().map(|e| e.addr))
            .collect();
        inputs.balancer.retain(&live);
        let sources = snap.local_workloads().map(|w| w.identity(&td)).collect();
        let destinations = snap
            .workloads_by_id
            .values()
            .map(|w| w.identity(&td))
            .collect();
        let proxies = snap
            .workloads_by_id
            .values()
            .filter_map(|w| snap.proxy_for(w))
            .collect();
        inputs.hbone.retain(&sources, &destinations, &proxies);
        let local_ids = snap.local_workloads().map(|w| w.id).collect();
        inputs.l7.retain(&live, &local_ids);
        let limits = snap
            .route_tables
            .values()
            .flat_map(|t| t.rate_limits())
            .collect();
        inputs.l7.retain_limiters(&limits);
        l7_sizes(&inputs);
    }
}

fn l7_sizes(inputs: &Inputs) {
    let (balancers, pools) = inputs.l7.sizes();
    for (table, n) in [("l7_balancers", balancers), ("l7_pools", pools)] {
        inputs
            .metrics
            .state_entries
            .with_label_values(&[table])
            .set(n as i64);
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

impl Inputs {
    /// Counts how a connection that was still open when the drain began ended
    /// (`drain_connections_total{result}`); nothing outside a drain.
    pub fn count_drained<T>(&self, r: &std::io::Result<T>) {
        if !self.drain.is_draining() {
            return;
        }
        let result = if r.is_err() && self.drain.past_deadline() {
            "reset"
        } else {
            "finished"
        };
        self.metrics
            .drain_connections
            .with_label_values(&[result])
            .inc();
    }
}

/// Accepts connections until the drain begins, one task per connection (tracked by the drain).
/// Accept errors (EMFILE, ECONNABORTED) concern one connection: they are logged and the listener
/// keeps serving. When the drain begins the listener is closed: the kernel refuses new
/// connections to it (an enrolled pod's then fail, fail-closed) while those accepted carry on.
pub async fn accept_loop<F, Fut>(
    listener: TcpListener,
    what: &'static str,
    inputs: Arc<Inputs>,
    handle: F,
) where
    F: Fn(Arc<Inputs>, TcpStream, SocketAddr) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let drain = inputs.drain.clone();
    loop {
        let accepted = tokio::select! {
            biased;
            () = drain.draining() => break,
            r = listener.accept() => r,
        };
        match accepted {
            Ok((stream, peer)) => {
                drain.spawn(handle(inputs.clone(), stream, peer));
            }
            Err(e) => {
                tracing::warn!(listener = what, error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
    tracing::info!(listener = what, "draining: no longer accepting");
    drop(listener);
}
