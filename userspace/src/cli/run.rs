//! `tunmeter run`: the daemon's flags, turned into config overrides on top of the config file,
//! and the daemon run on a tokio runtime.

use std::path::PathBuf;

use clap::Args;

use super::{args::SettingsArgs, runtime};
use crate::{config::Config, daemon, types::AttachMode};

#[derive(Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub settings: SettingsArgs,
    /// A tun/wg device (L3): packets start at the IP header. Repeatable.
    #[arg(long)]
    pub tun: Vec<String>,
    /// An Ethernet device (L2). Repeatable.
    #[arg(long)]
    pub egress: Vec<String>,
    /// A VPN subnet (CIDR) whose addresses are clients, on every device given by flag. Repeatable.
    #[arg(long)]
    pub subnet: Vec<String>,
    /// bpffs directory for the pinned maps and links (default /sys/fs/bpf/tunmeter).
    #[arg(long)]
    pub pin_dir: Option<PathBuf>,
    /// Capacity of the client map (default 65536).
    #[arg(long)]
    pub max_clients: Option<u32>,
    #[arg(long, value_enum)]
    pub attach_mode: Option<AttachMode>,
    /// API address (default 127.0.0.1:9107; "" for the local control socket only).
    #[arg(long)]
    pub api_listen: Option<String>,
    /// Milliseconds between readings of the kernel counters (default 1000).
    #[arg(long)]
    pub poll_interval_ms: Option<u64>,
    /// Milliseconds between ledger writes (default 10000).
    #[arg(long)]
    pub flush_interval_ms: Option<u64>,
    /// Milliseconds between live stream frames (default 1000, at least 250).
    #[arg(long)]
    pub stream_interval_ms: Option<u64>,
}

pub fn run(a: RunArgs) -> anyhow::Result<()> {
    let mut ov = a.settings.overrides();
    ov.tun = a.tun;
    ov.egress = a.egress;
    ov.subnets = a.subnet;
    ov.pin_dir = a.pin_dir;
    ov.max_clients = a.max_clients;
    ov.attach_mode = a.attach_mode;
    ov.api_listen = a.api_listen;
    ov.poll_interval_ms = a.poll_interval_ms;
    ov.flush_interval_ms = a.flush_interval_ms;
    ov.stream_interval_ms = a.stream_interval_ms;
    let (path, explicit) = a.settings.config_path();
    let cfg = Config::load(&path, explicit, &ov)?;
    runtime()?.block_on(daemon::run(cfg))?;
    Ok(())
}
