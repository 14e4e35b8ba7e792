//! Drain: how the daemon stops without cutting connections (ztunnel's `drain.rs` is the model).
//!
//! Every connection task is spawned through a [`Drain`]. On SIGTERM the daemon calls
//! [`Drain::run`]: the listeners stop accepting ([`Drain::draining`] fires; the outbound port is
//! then closed, so enrolled pods' new connections are refused, never sent direct), HBONE
//! connections get GOAWAY, and connections in flight carry on. When the last one ends the drain is
//! done; at the deadline [`Drain::deadline`] fires, and every connection still open is reset (and
//! counted) rather than closed as if it had ended cleanly.

use std::time::{Duration, Instant};

use tokio_util::{sync::CancellationToken, task::TaskTracker};

/// How long connections get to notice the deadline and reset themselves before the daemon exits
/// regardless.
const AFTER_DEADLINE: Duration = Duration::from_secs(2);

/// The error a relay ends with when the drain's deadline passes while it is still open.
pub fn deadline_error() -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        "reset at the end of the daemon's drain (--drain-timeout)",
    )
}

/// The drain signal and the connections it waits for. Clones share both.
#[derive(Clone, Debug, Default)]
pub struct Drain {
    draining: CancellationToken,
    deadline: CancellationToken,
    tasks: TaskTracker,
}

/// How a drain ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Every connection finished within the timeout.
    Finished { took: Duration },
    /// The deadline passed with `open` connections still open; they were reset.
    Deadline { open: usize },
}

impl Drain {
    pub fn new() -> Self {
        Self::default()
    }

    /// Runs a connection (or any work the drain must wait for) as a task the drain tracks.
    pub fn spawn<F>(&self, task: F) -> tokio::task::JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.tasks.spawn(task)
    }

    /// Resolves once the drain has begun: stop accepting, send GOAWAY.
    pub async fn draining(&self) {
        self.draining.cancelled().await
    }

    pub fn is_draining(&self) -> bool {
        self.draining.is_cancelled()
    }

    /// Resolves once the drain's deadline has passed: reset what is still open.
    pub async fn deadline(&self) {
        self.deadline.cancelled().await
    }

    /// Whether the deadline has passed.
    pub fn past_deadline(&self) -> bool {
        self.deadline.is_cancelled()
    }

    /// Connections (tracked tasks) still running.
    pub fn open(&self) -> usize {
        self.tasks.len()
    }

    /// Begins the drain and waits for it: until every tracked task ends, or `timeout` passes
    /// (then [`Drain::deadline`] fires and the tasks get a moment to reset their sockets).
    pub async fn run(&self, timeout: Duration) -> Outcome {
        let start = Instant::now();
        self.draining.cancel();
        self.tasks.close();
        if tokio::time::timeout(timeout, self.tasks.wait())
            .await
            .is_ok()
        {
            return Outcome::Finished {
                took: start.elapsed(),
            };
        }
        let open = self.tasks.len();
        self.deadline.cancel();
        let _ = tokio::time::timeout(AFTER_DEADLINE, self.tasks.wait()).await;
        Outcome::Deadline { open }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_drain_waits_for_work_in_flight() {
        let d = Drain::new();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let seen = d.clone();
        d.spawn(async move {
            seen.draining().await;
            // In flight when the drain starts; finishes on its own a moment later.
            let _ = rx.await;
        });
        let run = tokio::spawn({
            let d = d.clone();
            async move { d.run(Duration::from_secs(10)).await }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(d.is_draining());
        assert_eq!(d.open(), 1);
        tx.send(()).expect("task alive");
        match run.await.expect("join") {
            Outcome::Finished { took } => assert!(took < Duration::from_secs(10)),
            o => panic!("{o:?}"),
        }
    }

    #[tokio::test]
    async fn the_deadline_ends_what_is_still_open() {
        let d = Drain::new();
        let reset = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (w, r) = (d.clone(), reset.clone());
        d.spawn(async move {
            tokio::select! {
                () = std::future::pending::<()>() => {}
                () = w.deadline() => r.store(true, std::sync::atomic::Ordering::SeqCst),
            }
        });
        let outcome = d.run(Duration::from_millis(50)).await;
        assert_eq!(outcome, Outcome::Deadline { open: 1 });
        assert!(reset.load(std::sync::atomic::Ordering::SeqCst));
        assert_eq!(d.open(), 0);
    }

    #[tokio::test]
    async fn nothing_in_flight_drains_at_once() {
        let d = Drain::new();
        assert!(matches!(
            d.run(Duration::from_secs(30)).await,
            Outcome::Finished { .. }
        ));
    }
}
