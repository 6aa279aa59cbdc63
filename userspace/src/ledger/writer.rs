//! The ledger's writes: a flush takes what is pending from the state a chunk at a time and
//! writes it in the database's key order, one transaction per group of clients, so each
//! client's row and its usage commit together and memory stays bounded.

use std::time::Instant;

use tracing::{error, info};

use super::{Ledger, ResetNotice, state, store};
use crate::time::unix_ms;
use state::{ResetRecord, Taken};

/// Clients per transaction of a flush (see `Ledger::write_pending`).
const CLIENTS_PER_TRANSACTION: usize = 10 * store::ROWS_PER_STATEMENT;

impl Ledger {
    /// Write everything pending (see `write_pending`). On failure what was not written stays
    /// pending.
    pub async fn flush(&self) -> Result<usize, sqlx::Error> {
        let _writing = self.write_gate.lock().await;
        let started = Instant::now();
        match self.write_pending(None).await {
            Ok(None) => {
                self.set_health(|h| {
                    h.flush_cycles += 1;
                    h.last_flush_ok_unix_ms = Some(unix_ms());
                });
                Ok(0)
            }
            Ok(Some(rows)) => {
                let took = started.elapsed().as_secs_f64();
                self.timings.flush_seconds.observe(took);
                let was_down = !self.health().database_up;
                self.set_health(|h| {
                    h.database_up = true;
                    h.flushes += 1;
                    h.flush_cycles += 1;
                    h.last_flush_ms = took * 1e3;
                    h.last_flush_unix_ms = Some(unix_ms());
                    h.last_flush_ok_unix_ms = h.last_flush_unix_ms;
                    h.last_error = None;
                });
                if was_down {
                    info!(rows, "database is back: pending usage written");
                }
                Ok(rows)
            }
            Err(e) => {
                let was_up = self.health().database_up;
                self.set_health(|h| {
                    h.database_up = false;
                    h.flush_errors += 1;
                    h.last_error = Some(e.to_string());
                });
                if was_up {
                    error!(db = %self.db.shown_url, %e, "writing the ledger failed; usage stays pending and is retried");
                }
                Err(e)
            }
        }
    }

    /// Write everything pending, taken from the state a chunk at a time (`state::flush`), in
    /// the database's key order; with a reset, also its record, its client's row as it is after
    /// the reset, and its webhook event. One transaction per `CLIENTS_PER_TRANSACTION` clients:
    /// each client's row and its usage commit together, so exactness holds per client, while
    /// memory and the time the database is held stay bounded. A new kernel epoch goes first,
    /// in a transaction of its own that also zeroes every stored cursor (as the poll did in
    /// memory), so the rows after it commit in groups too. The caller holds the write gate. On
    /// failure the failed transaction's usage goes back into pending and its clients and the
    /// ones after are listed again. `None`: nothing to write.
    pub(super) async fn write_pending(
        &self,
        reset: Option<(&ResetRecord, Option<&ResetNotice>)>,
    ) -> Result<Option<usize>, sqlx::Error> {
        let start = self.state().begin_flush();
        if start.epoch.is_none() && start.clients.is_empty() && reset.is_none() {
            self.state().commit_flush();
            return Ok(None);
        }
        let keyed = self.state().writing_keys(&start.clients);
        drop(start.clients);
        let clients = state::sort_for_writing(keyed);
        if let Some(epoch) = start.epoch.as_deref()
            && let Err(e) = self.write_epoch(epoch).await
        {
            self.state().restore_flush(Taken { usage: Vec::new(), clients, epoch: true });
            return Err(e);
        }
        let groups = clients.len().div_ceil(CLIENTS_PER_TRANSACTION).max(1);
        let (mut written, mut usage) = (0, Vec::new());
        for g in 0..groups {
            let from = g * CLIENTS_PER_TRANSACTION;
            let ids = &clients[from..clients.len().min(from + CLIENTS_PER_TRANSACTION)];
            usage.clear();
            let reset = if g + 1 == groups { reset } else { None };
            if let Err(e) = self.write_group(ids, &mut usage, reset).await {
                let taken =
                    Taken { usage: std::mem::take(&mut usage), clients: clients[from..].to_vec(), epoch: false };
                self.state().restore_flush(taken);
                return Err(e);
            }
            written += usage.len();
        }
        self.state().commit_flush();
        Ok(Some(written))
    }

    /// The transaction of a new kernel epoch (see `store::BatchWriter::epoch`).
    async fn write_epoch(&self, epoch: &str) -> Result<(), sqlx::Error> {
        let mut w = store::BatchWriter::begin(&self.db, &self.cfg.node_id).await?;
        w.epoch(epoch, unix_ms()).await?;
        w.commit().await
    }

    /// One transaction of a flush: the rows and usage of the clients of rows `ids` (taken now,
    /// in chunks), and the reset if there is one. `usage` collects what was taken.
    async fn write_group(
        &self,
        ids: &[u32],
        usage: &mut Vec<state::MinuteRow>,
        reset: Option<(&ResetRecord, Option<&ResetNotice>)>,
    ) -> Result<(), sqlx::Error> {
        let now = unix_ms();
        let mut w = store::BatchWriter::begin(&self.db, &self.cfg.node_id).await?;
        // Each chunk: the clients' rows, then their usage (a minute refers to its client's row).
        let mut rows = Vec::with_capacity(store::ROWS_PER_STATEMENT);
        for chunk in ids.chunks(store::ROWS_PER_STATEMENT) {
            rows.clear();
            let from = usage.len();
            self.state().take(chunk, &mut rows, usage);
            w.clients(&mut rows).await?;
            w.usage(&usage[from..]).await?;
        }
        if let Some((rec, notice)) = reset {
            rows.clear();
            let from = usage.len();
            {
                let mut state = self.state();
                let id = state.clients.find(&rec.ip);
                state.take(id.as_slice(), &mut rows, usage);
            }
            for (_, row) in &mut rows {
                row.base = rec.new_base;
                row.period_started_ms = rec.at_ms;
                // Written whole: its base and period start move.
                row.stored = false;
            }
            w.clients(&mut rows).await?;
            w.usage(&usage[from..]).await?;
            w.reset(rec).await?;
            if let Some((hooks, ev)) = notice {
                hooks.enqueue_in(w.conn(), ev, now).await?;
            }
        }
        w.commit().await?;
        self.state().mark_stored(ids);
        Ok(())
    }
}
