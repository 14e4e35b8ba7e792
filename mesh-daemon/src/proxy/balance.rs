//! Per-connection load balancing over a service's endpoints: power of two choices on the number of
//! outstanding connections, skipping endpoints that recently refused or failed.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use crate::state::Endpoint;

/// How long an endpoint that failed a connection is skipped (while others are available).
pub const EJECT_FOR: Duration = Duration::from_secs(5);

#[derive(Default)]
struct Stats {
    active: AtomicUsize,
    down_until: Mutex<Option<Instant>>,
}

impl Stats {
    fn healthy(&self, now: Instant) -> bool {
        self.down_until
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_none_or(|t| t <= now)
    }
}

/// Endpoint statistics shared by every connection of the daemon.
pub struct Balancer {
    stats: Mutex<HashMap<SocketAddr, Arc<Stats>>>,
    rng: AtomicU64,
}

/// Counts one outstanding connection to an endpoint until dropped.
pub struct Outstanding(Arc<Stats>);

impl Drop for Outstanding {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Default for Balancer {
    fn default() -> Self {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0x9e37_79b9_7f4a_7c15);
        Self::with_seed(seed)
    }
}

impl Balancer {
    /// A balancer whose random choices follow `seed` (tests use fixed seeds so that a
    /// statistical property is checked on known sequences, not on the clock).
    fn with_seed(seed: u64) -> Self {
        Self {
            stats: Mutex::default(),
            rng: AtomicU64::new(seed | 1),
        }
    }

    fn stats(&self, addr: SocketAddr) -> Arc<Stats> {
        self.stats
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(addr)
            .or_default()
            .clone()
    }

    /// xorshift64*: good enough to spread choices, no dependency.
    fn random(&self, n: usize) -> usize {
        let mut x = self.rng.load(Ordering::Relaxed);
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.rng.store(x, Ordering::Relaxed);
        (x.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 33) as usize % n
    }

    /// Picks an endpoint: two random healthy candidates, the one with fewer outstanding
    /// connections wins. When every endpoint is ejected, all are candidates again (trying one is
    /// better than refusing outright).
    pub fn pick<'a>(&self, endpoints: &'a [Endpoint]) -> Option<(&'a Endpoint, Outstanding)> {
        let now = Instant::now();
        let all: Vec<(&Endpoint, Arc<Stats>)> =
            endpoints.iter().map(|e| (e, self.stats(e.addr))).collect();
        let healthy: Vec<&(&Endpoint, Arc<Stats>)> =
            all.iter().filter(|(_, s)| s.healthy(now)).collect();
        let pool: Vec<&(&Endpoint, Arc<Stats>)> = if healthy.is_empty() {
            all.iter().collect()
        } else {
            healthy
        };
        let chosen = match pool.len() {
            0 => return None,
            1 => pool[0],
            n => {
                let a = self.random(n);
                let b = (a + 1 + self.random(n - 1)) % n;
                let (ea, eb) = (pool[a], pool[b]);
                if eb.1.active.load(Ordering::Relaxed) < ea.1.active.load(Ordering::Relaxed) {
                    eb
                } else {
                    ea
                }
            }
        };
        chosen.1.active.fetch_add(1, Ordering::Relaxed);
        Some((chosen.0, Outstanding(chosen.1.clone())))
    }

    /// Forgets the endpoints that are in no service any more, so the table follows the mesh
    /// instead of only growing. A connection still counted on one keeps its own reference.
    pub fn retain(&self, live: &std::collections::HashSet<SocketAddr>) {
        self.stats
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|addr, _| live.contains(addr));
    }

    /// Endpoints with statistics.
    pub fn len(&self) -> usize {
        self.stats.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The statistics of an endpoint already known (never adds one: an endpoint pruned since
    /// its connection picked it must not come back).
    fn known(&self, addr: SocketAddr) -> Option<Arc<Stats>> {
        self.stats
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&addr)
            .cloned()
    }

    /// The endpoint refused or failed a connection: skip it for [`EJECT_FOR`].
    pub fn failed(&self, addr: SocketAddr) {
        if let Some(s) = self.known(addr) {
            *s.down_until.lock().unwrap_or_else(|p| p.into_inner()) =
                Some(Instant::now() + EJECT_FOR);
        }
    }

    /// The endpoint accepted a connection: it is healthy again.
    pub fn succeeded(&self, addr: SocketAddr) {
        if let Some(s) = self.known(addr) {
            *s.down_until.lock().unwrap_or_else(|p| p.into_inner()) = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::Workload;

    fn eps(n: usize) -> Vec<Endpoint> {
        (0..n)
            .map(|i| Endpoint {
                addr: format!("10.0.0.{}:80", i + 1).parse().expect("addr"),
                workload: Arc::new(Workload {
                    id: i as u32,
                    namespace: "ns".into(),
                    name: format!("w{i}"),
                    service_account: "default".into(),
                    node: "n".into(),
                    ip: std::net::Ipv4Addr::new(10, 0, 0, i as u8 + 1),
                    cgroup: "/".into(),
                    probe_ports: vec![],
                    proxy_protocol_ports: vec![],
                    labels: Default::default(),
                    mode: Default::default(),
                }),
            })
            .collect()
    }

    fn active(b: &Balancer, e: &[Endpoint]) -> Vec<usize> {
        e.iter()
            .map(|x| b.stats(x.addr).active.load(Ordering::Relaxed))
            .collect()
    }

    fn spread(counts: &[usize]) -> usize {
        counts.iter().max().copied().unwrap_or(0) - counts.iter().min().copied().unwrap_or(0)
    }

    #[test]
    fn two_endpoints_always_take_the_less_loaded() {
        // With two endpoints both are always the candidates, so the less loaded one wins every
        // time: after any number of picks the counts differ by at most one, whatever the seed.
        let b = Balancer::default();
        let e = eps(2);
        let mut held = Vec::new();
        for _ in 0..101 {
            held.push(b.pick(&e).expect("pick").1);
            assert!(spread(&active(&b, &e)) <= 1, "{:?}", active(&b, &e));
        }
        drop(held);
        assert_eq!(active(&b, &e), vec![0, 0]);
    }

    #[test]
    fn spreads_by_outstanding_connections() {
        // With more endpoints the least loaded one is only a candidate some of the time, so the
        // spread is a statistical bound (it was 3 after 30 picks on one CI run). Fixed seeds make
        // it a property of known sequences (the largest over these 200 is 3); a uniform random pick
        // over 300 connections spreads 16 in the median, 34 at the 95th percentile.
        for seed in 0..200 {
            let b = Balancer::with_seed(seed);
            let e = eps(3);
            let held: Vec<Outstanding> = (0..300).map(|_| b.pick(&e).expect("pick").1).collect();
            let counts = active(&b, &e);
            assert_eq!(counts.iter().sum::<usize>(), 300);
            assert!(spread(&counts) <= 4, "seed {seed}: {counts:?}");
            drop(held);
            assert_eq!(active(&b, &e), vec![0, 0, 0], "seed {seed}");
        }
    }

    #[test]
    fn an_unknown_endpoint_is_never_added_by_a_result() {
        let b = Balancer::default();
        let e = eps(1);
        b.failed(e[0].addr);
        b.succeeded(e[0].addr);
        assert!(b.is_empty(), "a pruned endpoint must not come back");
    }

    #[test]
    fn failed_endpoint_is_skipped_until_it_recovers() {
        let b = Balancer::default();
        let e = eps(2);
        // Both known (picked once), then the first fails a connection.
        let _ = b.pick(&e);
        let _ = b.pick(&e);
        b.failed(e[0].addr);
        for _ in 0..20 {
            assert_eq!(b.pick(&e).expect("pick").0.addr, e[1].addr);
        }
        b.succeeded(e[0].addr);
        let picked: std::collections::HashSet<SocketAddr> =
            (0..50).map(|_| b.pick(&e).expect("pick").0.addr).collect();
        assert_eq!(picked.len(), 2);
    }

    #[test]
    fn all_ejected_still_tries_and_empty_gives_none() {
        let b = Balancer::default();
        let e = eps(2);
        b.failed(e[0].addr);
        b.failed(e[1].addr);
        assert!(b.pick(&e).is_some());
        assert!(b.pick(&[]).is_none());
    }
}
