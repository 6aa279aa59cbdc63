//! Wall-clock time as the ledger, the API and the webhooks store it: milliseconds since the
//! Unix epoch. Kernel time (jiffies) and its conversion live in `bpf::clock`.

use std::time::{SystemTime, UNIX_EPOCH};

/// Wall-clock milliseconds since the Unix epoch.
pub fn unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_millis() as u64
}
