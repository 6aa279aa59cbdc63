//! The `tunmeter` command line: `run`, `clients`, `stats`, `reset`, `sessions`, `token`,
//! `steer`, `hook`, `detach`. One submodule per subcommand group; this module holds the
//! command tree, the error printing and the tokio runtime the commands share.

mod args;
mod counters;
mod detach;
mod hook;
mod remote;
pub mod report;
mod run;
mod steer;
mod token;

use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand};

use args::{JsonArg, PinArgs, SettingsArgs};

#[derive(Parser)]
#[command(name = "tunmeter", version, about = "Per-VPN-client traffic accounting with eBPF")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Load and attach the programs and keep them attached (re-attaching re-created devices).
    Run(run::RunArgs),
    /// Print the per-client counters from the pinned maps (no daemon needed).
    Clients {
        #[command(flatten)]
        pins: PinArgs,
        #[command(flatten)]
        out: JsonArg,
        /// Refresh every SECS seconds with rates (JSON: one object per line).
        #[arg(long, value_name = "SECS")]
        watch: Option<f64>,
        /// With --watch: stop after this many refreshes.
        #[arg(long, requires = "watch")]
        count: Option<u64>,
    },
    /// Print the outcome and reason counters (why packets were or were not counted).
    Stats {
        #[command(flatten)]
        pins: PinArgs,
        #[command(flatten)]
        out: JsonArg,
    },
    /// Reset a client's usage: from now on its visible usage starts from zero (the closed period
    /// is recorded). Needs the running daemon.
    Reset {
        /// The client's VPN address, e.g. 10.8.0.2.
        client: String,
        #[command(flatten)]
        settings: SettingsArgs,
    },
    /// List sessions (who is connected, from where, with what bytes). Needs the running daemon.
    Sessions {
        /// Also closed sessions (the newest first).
        #[arg(long)]
        all: bool,
        /// Only this client address.
        #[arg(long)]
        client: Option<String>,
        #[arg(long, default_value_t = 100)]
        limit: u32,
        #[command(flatten)]
        out: JsonArg,
        #[command(flatten)]
        settings: SettingsArgs,
    },
    /// Manage API bearer tokens.
    Token {
        #[command(subcommand)]
        cmd: token::TokenCmd,
    },
    /// Forward and redirect rules (docs/steering.md): changes apply at once, no daemon needed.
    Steer {
        #[command(subcommand)]
        cmd: steer::SteerCmd,
    },
    /// Scripts that other programs run (docs/openvpn.md).
    Hook {
        #[command(subcommand)]
        cmd: hook::HookCmd,
    },
    /// Remove programs, links, pins and the redirect policy route (this zeroes all counters).
    Detach(detach::DetachArgs),
}

/// The binary's entry point: logs to stderr (RUST_LOG, default info), one error line on failure.
pub fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
    match dispatch(Cli::parse().cmd) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tunmeter: error: {}", chain_message(&e));
            ExitCode::FAILURE
        }
    }
}

fn dispatch(cmd: Cmd) -> anyhow::Result<()> {
    match cmd {
        Cmd::Run(a) => run::run(a),
        Cmd::Clients { pins, out, watch, count } => counters::clients(&pins.pin_dir, out.json, watch, count),
        Cmd::Stats { pins, out } => counters::stats(&pins.pin_dir, out.json),
        Cmd::Reset { client, settings } => remote::reset(&client, &settings),
        Cmd::Sessions { all, client, limit, out, settings } => {
            remote::sessions(all, client.as_deref(), limit, out.json, &settings)
        }
        Cmd::Token { cmd } => runtime()?.block_on(token::token(cmd)),
        Cmd::Steer { cmd } => steer::steer(cmd),
        Cmd::Hook { cmd } => hook::hook(cmd),
        Cmd::Detach(a) => detach::detach(a),
    }
}

/// The error and its causes on one line, skipping a cause whose text an outer message already
/// includes (our error types print their source inline).
fn chain_message(e: &anyhow::Error) -> String {
    let mut msg = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if !msg.contains(&text) {
            if !msg.is_empty() {
                msg.push_str(": ");
            }
            msg.push_str(&text);
        }
    }
    msg
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().context("tokio runtime")
}
