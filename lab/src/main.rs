//! `tunmeter-lab up|down`: build or remove the namespace lab from the command line.

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Result;
use clap::{Parser, Subcommand};
use tunmeter_lab::{Lab, LabConfig, cleanup_prefix, traffic};

#[derive(Parser)]
#[command(name = "tunmeter-lab", about = "Network-namespace lab for tunmeter")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Build the lab, print `READY <server-ns>`, run until SIGINT/SIGTERM, then clean up.
    Up {
        #[arg(long, default_value = "tmlab")]
        prefix: String,
        #[arg(long, default_value_t = 3)]
        tun_clients: usize,
        #[arg(long, default_value_t = 3)]
        eth_clients: usize,
        /// Run background traffic from every client.
        #[arg(long)]
        traffic: bool,
    },
    /// Remove the namespaces of a lab with this prefix (leftovers of a killed `up`).
    Down {
        #[arg(long, default_value = "tmlab")]
        prefix: String,
    },
}

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

fn install_signal_handlers() -> Result<()> {
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        let prev = unsafe { libc::signal(sig, on_signal as *const () as libc::sighandler_t) };
        if prev == libc::SIG_ERR {
            anyhow::bail!("cannot install handler for signal {sig}");
        }
    }
    Ok(())
}

fn up(cfg: LabConfig, with_traffic: bool) -> Result<()> {
    install_signal_handlers()?;
    let lab = Lab::up(cfg)?;
    eprintln!(
        "tunmeter-lab: lab {} is up: server {}, tun clients {:?}, eth clients {:?}",
        lab.prefix(),
        lab.server_ns(),
        lab.tun_clients().iter().map(|c| &c.ns).collect::<Vec<_>>(),
        lab.eth_clients().iter().map(|c| &c.ns).collect::<Vec<_>>(),
    );
    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "READY {}", lab.server_ns())?;
        out.flush()?;
    }
    let bg = if with_traffic { Some(traffic::background(&lab, Duration::from_millis(500))?) } else { None };
    while !STOP.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!("tunmeter-lab: signal received, cleaning up");
    if let Some(bg) = bg {
        let s = bg.stop();
        eprintln!(
            "tunmeter-lab: traffic rounds ok {}, failed {}{}",
            s.rounds,
            s.errors,
            s.last_error.map(|e| format!(" (last error: {e})")).unwrap_or_default()
        );
    }
    let stats = lab.relay_stats();
    eprintln!("tunmeter-lab: relay {stats:?}");
    lab.down()?;
    eprintln!("tunmeter-lab: lab removed");
    Ok(())
}

fn main() {
    let cli = Cli::parse();
    let res = match cli.cmd {
        Cmd::Up { prefix, tun_clients, eth_clients, traffic } => {
            up(LabConfig { prefix, tun_clients, eth_clients }, traffic)
        }
        Cmd::Down { prefix } => cleanup_prefix(&prefix),
    };
    if let Err(e) = res {
        eprintln!("tunmeter-lab: error: {e:#}");
        std::process::exit(1);
    }
}
