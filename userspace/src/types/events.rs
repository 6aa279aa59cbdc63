//! The kinds of webhook events, by their wire names. Shared by the config (which endpoint wants
//! which kinds), the outbox and every module that reports a change.

use super::named::named_enum;

named_enum! {
    /// What happened.
    pub enum EventKind("event") {
        DeviceOffline = "device.offline",
        DeviceRecovered = "device.recovered",
        SessionOpened = "session.opened",
        SessionClosed = "session.closed",
        Reset = "reset",
        LedgerDrift = "ledger.drift",
    }
}
