//! Why the daemon could not start or had to stop: one variant per layer below, each printing
//! its source's message (which names the fix).

use crate::{
    api::ServeError,
    bpf::{attach::AttachError, clock::ClockError, links::LinksError, loader::LoadError, system::SystemError},
    db::DbError,
    ledger::LedgerError,
    steer::{HostError, SteerError},
    types::Layer,
    webhook::WebhookError,
};

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    System(#[from] SystemError),
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error(transparent)]
    Attach(#[from] AttachError),
    #[error(transparent)]
    Links(#[from] LinksError),
    #[error(transparent)]
    Clock(#[from] ClockError),
    #[error("interface {0} does not exist (check the name, and that the daemon runs in the right network namespace)")]
    MissingInterface(String),
    #[error(
        "interface {name} is configured as {configured:?} but its link type is {actual}: use --tun for tun/wg devices and --egress for Ethernet ones"
    )]
    WrongLayer { name: String, configured: Layer, actual: String },
    #[error("signal handler: {0}")]
    Signal(std::io::Error),
    #[error(transparent)]
    Db(#[from] DbError),
    #[error(transparent)]
    Ledger(#[from] LedgerError),
    #[error(transparent)]
    Serve(#[from] ServeError),
    #[error("interrupted while waiting for the database")]
    Interrupted,
    #[error(transparent)]
    Steer(#[from] SteerError),
    #[error(transparent)]
    Host(#[from] HostError),
    #[error(transparent)]
    Webhook(#[from] WebhookError),
}
