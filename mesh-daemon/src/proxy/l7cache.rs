//! What L7 keeps between requests, apart from the code that fills it (a leaf: `proxy.rs`'s
//! inputs hold it, `http.rs` uses it): a balancer per (source, backend service port, protocol) and
//! pooled endpoint connections per (source, endpoint, protocol).

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::combinators::BoxBody;
use hyper::body::Incoming;
use tower::{buffer::Buffer, retry::budget::TpsBudget};

use crate::state::routes::RateLimit;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type BoxFuture<T> = std::pin::Pin<Box<dyn Future<Output = T> + Send>>;
/// A balancer behind its buffer: cloned into every request of every connection that uses it.
pub type Balanced = Buffer<Request<ReqBody>, BoxFuture<Result<Response<Incoming>, BoxError>>>;
/// A request body on its way to an endpoint: the client's, streamed, or a buffered copy that can
/// be sent again (a retry).
pub type ReqBody = BoxBody<Bytes, hyper::Error>;

/// A backend's balancer, the endpoints it was built for (and their pools, whose breakers say
/// whether any can take a request), and the backend's retry budget.
pub struct Backend {
    pub endpoints: Vec<SocketAddr>,
    pub pools: Vec<Arc<Pool>>,
    pub balancer: Balanced,
    pub budget: Arc<TpsBudget>,
}

impl Backend {
    /// Every endpoint is ejected by its breaker: a request would only wait for a backoff to end
    /// (fail fast instead, as linkerd2-proxy does).
    pub fn all_ejected(&self, now: Instant) -> bool {
        !self.pools.is_empty()
            && self
                .pools
                .iter()
                .all(|p| lock(&p.breaker).ejected_until().is_some_and(|t| t > now))
    }
}

/// A route's local rate limit: one token bucket per source workload (governor's GCRA).
pub type Limiter = governor::DefaultKeyedRateLimiter<u32>;

/// The L7 caches: a balancer per (source, backend service port, protocol), and pooled
/// connections per (source, endpoint, protocol).
#[derive(Default)]
pub struct L7 {
    pub balancers: Mutex<HashMap<BalancerKey, Backend>>,
    pub pools: Mutex<HashMap<PoolKey, Arc<Pool>>>,
    /// Rate limiters per (route, its limit): kept across reloads of an unchanged route.
    pub limiters: Mutex<HashMap<(String, RateLimit), Arc<Limiter>>>,
}

#[derive(Clone, PartialEq, Eq, Hash)]
pub struct BalancerKey {
    pub source: u32,
    pub backend: SocketAddr,
    pub h2: bool,
}

#[derive(Clone, PartialEq, Eq, Hash)]
pub struct PoolKey {
    pub source: u32,
    pub endpoint: SocketAddr,
    pub h2: bool,
}

impl L7 {
    /// Drops balancers and pools of endpoints and sources no longer in the mesh.
    pub fn retain(
        &self,
        endpoints: &std::collections::HashSet<SocketAddr>,
        sources: &std::collections::HashSet<u32>,
    ) {
        lock(&self.pools)
            .retain(|k, _| endpoints.contains(&k.endpoint) && sources.contains(&k.source));
        lock(&self.balancers).retain(|k, b| {
            sources.contains(&k.source) && b.endpoints.iter().all(|e| endpoints.contains(e))
        });
    }

    /// The limiter of a route with a rate limit.
    pub fn limiter(&self, route: &str, limit: RateLimit) -> Arc<Limiter> {
        let mut l = lock(&self.limiters);
        if let Some(found) = l.get(&(route.to_string(), limit)) {
            return found.clone();
        }
        let quota = governor::Quota::per_second(limit.requests_per_second).allow_burst(limit.burst);
        let made = Arc::new(Limiter::hashmap(quota));
        l.insert((route.to_string(), limit), made.clone());
        made
    }

    /// Keeps the limiters of routes (and limits) still in force; forgets sources whose buckets
    /// are full again (they are as if new).
    pub fn retain_limiters(&self, live: &std::collections::HashSet<(String, RateLimit)>) {
        let mut l = lock(&self.limiters);
        l.retain(|k, _| live.contains(k));
        for lim in l.values() {
            lim.retain_recent();
        }
    }

    pub fn sizes(&self) -> (usize, usize) {
        (lock(&self.balancers).len(), lock(&self.pools).len())
    }
}

pub fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Pooled connections to one endpoint for one source.
#[derive(Default)]
pub struct Pool {
    pub h2: tokio::sync::Mutex<Option<hyper::client::conn::http2::SendRequest<ReqBody>>>,
    pub h1: Mutex<Vec<hyper::client::conn::http1::SendRequest<ReqBody>>>,
    /// The endpoint's circuit breaker, as this source sees it (kept across balancer rebuilds).
    pub breaker: Mutex<Breaker>,
}

/// Failure accrual: after [`Breaker::FAILURES`] consecutive failures (5xx or no connection) an
/// endpoint is ejected — the balancer does not pick it — for a backoff that starts at 1 s and
/// doubles while probes fail (at most 60 s). When it ends, the endpoint takes requests again
/// (half-open): the first result either closes the breaker or ejects it for twice as long.
#[derive(Debug, Default)]
pub struct Breaker {
    consecutive: u32,
    ejected_until: Option<Instant>,
    backoff: Option<Duration>,
    probing: bool,
}

impl Breaker {
    pub const FAILURES: u32 = 5;
    pub const MIN_BACKOFF: Duration = Duration::from_secs(1);
    pub const MAX_BACKOFF: Duration = Duration::from_secs(60);

    /// Until when the endpoint is ejected, if it is.
    pub fn ejected_until(&self) -> Option<Instant> {
        self.ejected_until
    }

    /// The backoff is over: the endpoint takes requests again, and the next result decides.
    pub fn readmit(&mut self) {
        self.ejected_until = None;
        self.probing = true;
    }

    /// Records a request's result; `Some(backoff)` when this ejects the endpoint.
    pub fn record(&mut self, ok: bool, now: Instant) -> Option<Duration> {
        if ok {
            self.consecutive = 0;
            if self.probing {
                self.probing = false;
                self.backoff = None;
            }
            return None;
        }
        if self.ejected_until.is_some() {
            // Results of requests sent before the ejection.
            return None;
        }
        self.consecutive += 1;
        let backoff = if self.probing {
            self.backoff
                .map_or(Self::MIN_BACKOFF, |b| (b * 2).min(Self::MAX_BACKOFF))
        } else if self.consecutive >= Self::FAILURES {
            Self::MIN_BACKOFF
        } else {
            return None;
        };
        self.probing = false;
        self.consecutive = 0;
        self.backoff = Some(backoff);
        self.ejected_until = Some(now + backoff);
        Some(backoff)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn consecutive_failures_eject_and_failed_probes_double_the_backoff() {
        let mut b = Breaker::default();
        let t = Instant::now();
        for _ in 0..4 {
            assert_eq!(b.record(false, t), None);
        }
        // a success in between resets the count
        assert_eq!(b.record(true, t), None);
        for _ in 0..4 {
            assert_eq!(b.record(false, t), None);
        }
        assert_eq!(b.record(false, t), Some(Duration::from_secs(1)));
        assert_eq!(b.ejected_until(), Some(t + Duration::from_secs(1)));
        // late results while ejected change nothing
        assert_eq!(b.record(false, t), None);
        b.readmit();
        assert_eq!(b.ejected_until(), None);
        // a failed probe: twice as long
        assert_eq!(b.record(false, t), Some(Duration::from_secs(2)));
        b.readmit();
        assert_eq!(b.record(false, t), Some(Duration::from_secs(4)));
        b.readmit();
        // a good probe closes it; the next ejection starts from 1 s again
        assert_eq!(b.record(true, t), None);
        for _ in 0..4 {
            assert_eq!(b.record(false, t), None);
        }
        assert_eq!(b.record(false, t), Some(Duration::from_secs(1)));
        let mut b = Breaker::default();
        for _ in 0..20 {
            b.record(false, t);
            b.readmit();
        }
        assert_eq!(b.record(false, t), Some(Breaker::MAX_BACKOFF));
    }
}
