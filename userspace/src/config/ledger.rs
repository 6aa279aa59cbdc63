//! `[ledger]`: where usage is stored (SQLite by default, PostgreSQL for fleets), how often the
//! kernel counters are read and written, and how long history is kept.

use std::path::Path;

use serde::Deserialize;

use super::{ConfigError, Overrides, ranged};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LedgerSettings {
    /// `sqlite://PATH` or `postgres://...`; default: tunmeter.db in the state directory.
    pub database_url: String,
    pub poll_interval_ms: u64,
    pub flush_interval_ms: u64,
    pub retention_minute_days: u32,
    pub retention_hour_days: u32,
    pub retention_day_days: u32,
    /// Self-check: packets per poll that a device counted but the programs did not, above which
    /// a poll counts as drifting.
    pub drift_threshold_packets: u64,
    /// Self-check: consecutive drifting polls before `ledger.drift` fires.
    pub drift_polls: u32,
    /// Pending usage rows (client x minute) held while the database is down, beyond the two each
    /// client holds in place, before the oldest minutes are folded into coarser rows.
    pub max_pending_rows: u64,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileLedger {
    database_url: Option<String>,
    poll_interval_ms: Option<u64>,
    flush_interval_ms: Option<u64>,
    retention_minute_days: Option<u32>,
    retention_hour_days: Option<u32>,
    retention_day_days: Option<u32>,
    drift_threshold_packets: Option<u64>,
    drift_polls: Option<u32>,
    max_pending_rows: Option<u64>,
}

/// The default database: `tunmeter.db` in the state directory, created if missing.
pub fn default_url(state_dir: &Path) -> String {
    format!("sqlite://{}/tunmeter.db?mode=rwc", state_dir.display())
}

/// Days of history to keep: 0 (forever) to 100 years.
fn days(name: &'static str, value: u32) -> Result<u32, ConfigError> {
    Ok(ranged(name, value.into(), 0, 36_500)? as u32)
}

pub(super) fn build(l: FileLedger, ov: &Overrides, state_dir: &Path) -> Result<LedgerSettings, ConfigError> {
    Ok(LedgerSettings {
        database_url: ov.database_url.clone().or(l.database_url).unwrap_or_else(|| default_url(state_dir)),
        poll_interval_ms: ranged(
            "[ledger] poll_interval_ms",
            ov.poll_interval_ms.or(l.poll_interval_ms).unwrap_or(1000),
            100,
            60_000,
        )?,
        flush_interval_ms: ranged(
            "[ledger] flush_interval_ms",
            ov.flush_interval_ms.or(l.flush_interval_ms).unwrap_or(10_000),
            100,
            300_000,
        )?,
        retention_minute_days: days("[ledger] retention_minute_days", l.retention_minute_days.unwrap_or(2))?,
        retention_hour_days: days("[ledger] retention_hour_days", l.retention_hour_days.unwrap_or(90))?,
        retention_day_days: days("[ledger] retention_day_days", l.retention_day_days.unwrap_or(0))?,
        drift_threshold_packets: ranged(
            "[ledger] drift_threshold_packets",
            l.drift_threshold_packets.unwrap_or(64),
            1,
            1_000_000_000,
        )?,
        drift_polls: ranged("[ledger] drift_polls", l.drift_polls.unwrap_or(3).into(), 1, 1_000)? as u32,
        max_pending_rows: ranged(
            "[ledger] max_pending_rows",
            l.max_pending_rows.unwrap_or(1_000_000),
            1_000,
            100_000_000,
        )?,
    })
}
