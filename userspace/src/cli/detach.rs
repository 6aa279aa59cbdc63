//! `tunmeter detach`: remove programs, links, pins and the redirect policy route (this zeroes
//! all counters). Refused while a daemon holds the state directory or the pin directory.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::Args;

use super::{args::PinArgs, runtime};
use crate::{
    bpf::{attach, system},
    config::{self, Config, Overrides},
};

#[derive(Args)]
pub struct DetachArgs {
    #[command(flatten)]
    pub pins: PinArgs,
    /// Config file naming the redirect policy route to remove (default values otherwise).
    #[arg(long, short)]
    pub config: Option<PathBuf>,
    /// State directory of the daemon, to refuse while it runs.
    #[arg(long, default_value = config::DEFAULT_STATE_DIR)]
    pub state_dir: PathBuf,
    /// Detach even while a daemon holds the state or pin directory (its counters are lost and
    /// it keeps running without programs until restarted).
    #[arg(long)]
    pub force: bool,
}

pub fn detach(a: DetachArgs) -> anyhow::Result<()> {
    let pin_dir = &a.pins.pin_dir;
    if !a.force {
        // Either lock alone is enough: a daemon holds both, and a wrong --state-dir must not
        // let this tear down the pins of a daemon that uses another one.
        if system::daemon_running(&a.state_dir) {
            anyhow::bail!(
                "a tunmeter daemon is running with state directory {}: stop it first (or --force)",
                a.state_dir.display()
            );
        }
        if system::dir_locked(pin_dir) {
            anyhow::bail!(
                "a tunmeter daemon is using the pin directory {}: stop it first (or --force)",
                pin_dir.display()
            );
        }
    }
    let n = attach::detach_all(pin_dir)?;
    let explicit = a.config.is_some();
    let path = a.config.unwrap_or_else(|| config::DEFAULT_CONFIG.into());
    let policy = Config::load_settings(&path, explicit, &Overrides::default())?.steer.policy;
    runtime()?.block_on(policy.remove())?;
    attach::remove_pins(pin_dir).with_context(|| format!("removing {}", pin_dir.display()))?;
    eprintln!("detached {n} attachment(s) and removed {}", pin_dir.display());
    Ok(())
}
