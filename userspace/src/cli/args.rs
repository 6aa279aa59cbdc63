//! Options several subcommands share, flattened into each: where the pins are, where the
//! daemon's state and ledger are, and JSON output.

use std::path::PathBuf;

use clap::Args;

use crate::config::{self, Config, Overrides};

/// The bpffs directory of the pinned maps and links.
#[derive(Args)]
pub struct PinArgs {
    /// bpffs directory holding tunmeter's pinned maps and links.
    #[arg(long, default_value = config::DEFAULT_PIN_DIR)]
    pub pin_dir: PathBuf,
}

/// Where the daemon's state and ledger are (same meaning as for `run`).
#[derive(Args, Default)]
pub struct SettingsArgs {
    /// TOML config file (default /etc/tunmeter/tunmeter.toml if it exists).
    #[arg(long, short)]
    pub config: Option<PathBuf>,
    /// State directory (lock, control socket, default SQLite ledger).
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    /// sqlite://PATH (default: tunmeter.db in the state directory) or postgres://USER@HOST/DB.
    #[arg(long)]
    pub database_url: Option<String>,
    /// This server's name in the ledger (default: the host name).
    #[arg(long)]
    pub node_id: Option<String>,
}

impl SettingsArgs {
    /// The overrides these flags make (the rest of `Overrides` stays empty).
    pub fn overrides(&self) -> Overrides {
        Overrides {
            state_dir: self.state_dir.clone(),
            database_url: self.database_url.clone(),
            node_id: self.node_id.clone(),
            ..Overrides::default()
        }
    }

    /// The config file to read and whether it was named (a named file must exist).
    pub fn config_path(&self) -> (PathBuf, bool) {
        match &self.config {
            Some(p) => (p.clone(), true),
            None => (config::DEFAULT_CONFIG.into(), false),
        }
    }

    /// The settings of commands that need no interfaces.
    pub fn load(&self) -> anyhow::Result<Config> {
        let (path, explicit) = self.config_path();
        Ok(Config::load_settings(&path, explicit, &self.overrides())?)
    }
}

/// `--json`: machine-readable output (docs/cli-json.md).
#[derive(Args)]
pub struct JsonArg {
    /// JSON instead of a table (see docs/cli-json.md).
    #[arg(long)]
    pub json: bool,
}
