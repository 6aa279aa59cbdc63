//! Background tasks that stop together: one cancellation token every task watches and one
//! `JoinSet` that holds them, so that at shutdown each task is joined (or aborted after a grace
//! period) and whatever it returned or panicked with is logged. The daemon runs two of these,
//! stopped in order: the front (API, identity, webhooks) and then the ledger.

use std::{collections::HashMap, fmt::Display, future::Future, time::Duration};

use tokio::task::{Id, JoinError, JoinSet};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, warn};

/// A group of tasks with one stop signal.
pub struct Tasks {
    token: CancellationToken,
    set: JoinSet<Result<(), String>>,
    names: HashMap<Id, &'static str>,
}

impl Default for Tasks {
    fn default() -> Self {
        Tasks::new()
    }
}

impl Tasks {
    pub fn new() -> Tasks {
        Tasks { token: CancellationToken::new(), set: JoinSet::new(), names: HashMap::new() }
    }

    /// The token the tasks of this group watch: cancelled by `shutdown`.
    pub fn token(&self) -> CancellationToken {
        self.token.clone()
    }

    /// Run `fut` in this group. It must return soon after the token is cancelled.
    pub fn spawn<E: Display>(&mut self, name: &'static str, fut: impl Future<Output = Result<(), E>> + Send + 'static) {
        let handle = self.set.spawn(async move { fut.await.map_err(|e| e.to_string()) });
        self.names.insert(handle.id(), name);
        debug!(task = name, "task started");
    }

    /// How many tasks have not been collected yet.
    pub fn len(&self) -> usize {
        self.set.len()
    }

    pub fn is_empty(&self) -> bool {
        self.set.is_empty()
    }

    /// Wait for the next task to end on its own, log how it ended and return its name. Pending
    /// forever when the group is empty (for use in `select!`).
    pub async fn next_exit(&mut self) -> &'static str {
        match self.set.join_next_with_id().await {
            Some(r) => self.collect(r, "ended before the daemon stopped").0,
            None => std::future::pending().await,
        }
    }

    /// Cancel the token, wait up to `grace` for every task to return, abort the rest. Every
    /// outcome is logged; the names of the tasks that failed, panicked or had to be aborted are
    /// returned.
    pub async fn shutdown(mut self, grace: Duration) -> Vec<&'static str> {
        self.token.cancel();
        let deadline = tokio::time::Instant::now() + grace;
        let mut bad = Vec::new();
        while !self.set.is_empty() {
            match tokio::time::timeout_at(deadline, self.set.join_next_with_id()).await {
                Ok(Some(r)) => {
                    if let (name, false) = self.collect(r, "stopped") {
                        bad.push(name);
                    }
                }
                Ok(None) => break,
                Err(_) => {
                    for name in self.names.values() {
                        warn!(task = name, grace_ms = grace.as_millis() as u64, "task did not stop in time; aborted");
                    }
                    self.set.abort_all();
                    while let Some(r) = self.set.join_next_with_id().await {
                        bad.push(self.collect(r, "aborted").0);
                    }
                }
            }
        }
        bad
    }

    /// Abort every task at once without cancelling (what a crash does; for tests).
    pub fn abort(&mut self) {
        self.set.abort_all();
    }

    /// Log how a task ended; its name and whether it returned `Ok`.
    fn collect(&mut self, r: Result<(Id, Result<(), String>), JoinError>, how: &str) -> (&'static str, bool) {
        let (id, outcome) = match r {
            Ok((id, res)) => (id, res.map_err(|e| format!("failed: {e}"))),
            Err(e) if e.is_panic() => (e.id(), Err("panicked".to_string())),
            Err(e) => (e.id(), Err(how.to_string())),
        };
        let name = self.names.remove(&id).unwrap_or("unknown");
        match &outcome {
            Ok(()) => debug!(task = name, "task {how}"),
            Err(e) => error!(task = name, "task {e}"),
        }
        (name, outcome.is_ok())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn shutdown_joins_the_willing_and_aborts_the_stuck() {
        let mut t = Tasks::new();
        let stop = t.token();
        let (tx, rx) = tokio::sync::oneshot::channel();
        t.spawn("polite", async move {
            stop.cancelled().await;
            let _ = tx.send(());
            Ok::<_, String>(())
        });
        // Dropping the sender is what an abort does to the stuck task's state.
        let (guard, aborted) = tokio::sync::oneshot::channel::<()>();
        t.spawn("stuck", async move {
            let _guard = guard;
            std::future::pending::<()>().await;
            Ok::<_, String>(())
        });
        t.spawn("failing", async { Err::<(), _>("boom") });
        assert_eq!(t.len(), 3);
        assert_eq!(t.next_exit().await, "failing");
        assert_eq!(t.shutdown(Duration::from_millis(200)).await, ["stuck"]);
        assert!(rx.await.is_ok(), "the polite task saw the cancellation");
        assert!(aborted.await.is_err(), "the stuck task was aborted");
    }
}
