//! What L7 keeps between requests, apart from the code that fills it (a leaf: `proxy.rs`'s
//! inputs hold it, `http.rs` uses it): a balancer per (source, backend service port, protocol) and
//! pooled endpoint connections per (source, endpoint, protocol).

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
};

use http::{Request, Response};
use hyper::body::Incoming;
use tower::buffer::Buffer;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type BoxFuture<T> = std::pin::Pin<Box<dyn Future<Output = T> + Send>>;
/// A balancer behind its buffer: cloned into every request of every connection that uses it.
pub type Balanced = Buffer<Request<Incoming>, BoxFuture<Result<Response<Incoming>, BoxError>>>;

/// The L7 caches: a balancer per (source, backend service port, protocol), and pooled
/// connections per (source, endpoint, protocol).
#[derive(Default)]
pub struct L7 {
    pub balancers: Mutex<HashMap<BalancerKey, (Vec<SocketAddr>, Balanced)>>,
    pub pools: Mutex<HashMap<PoolKey, Arc<Pool>>>,
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
        lock(&self.balancers).retain(|k, (eps, _)| {
            sources.contains(&k.source) && eps.iter().all(|e| endpoints.contains(e))
        });
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
    pub h2: tokio::sync::Mutex<Option<hyper::client::conn::http2::SendRequest<Incoming>>>,
    pub h1: Mutex<Vec<hyper::client::conn::http1::SendRequest<Incoming>>>,
}
