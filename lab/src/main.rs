//! `tunmeter-lab up|down|openvpn|wireguard`: build or remove the namespace labs from the command
//! line.

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Result, bail};
use clap::{Parser, Subcommand};
use tunmeter_lab::openvpn::{self, OvpnLab, OvpnLabConfig, RoundSizes, Transport};
use tunmeter_lab::wireguard::{self, WgLab};
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
    /// The real OpenVPN lab (two server instances, UDP and TCP, and real clients).
    Openvpn {
        #[command(subcommand)]
        cmd: OvpnCmd,
    },
    /// The WireGuard lab (wireguard-go server and peers).
    Wireguard {
        #[command(subcommand)]
        cmd: WgCmd,
    },
}

#[derive(Subcommand)]
enum OvpnCmd {
    /// Build the lab, connect every client (alice, bob, carol, ...: odd ones UDP, even ones TCP),
    /// print one `CLIENT ...` line per client and `READY <server-ns>`, run until SIGINT/SIGTERM,
    /// then clean up.
    Up {
        #[arg(long, default_value = "tmovpn")]
        prefix: String,
        #[arg(long, default_value_t = 4)]
        clients: usize,
        /// Command line run by both servers as client-connect and client-disconnect (absolute
        /// program path).
        #[arg(long)]
        hook: Option<String>,
        /// Management interface password.
        #[arg(long)]
        mgmt_password: Option<String>,
        /// Run background traffic from every client.
        #[arg(long)]
        traffic: bool,
        /// Pause between background traffic rounds.
        #[arg(long, default_value_t = 1000)]
        traffic_interval_ms: u64,
        /// How long the clients may take to connect.
        #[arg(long, default_value_t = 60)]
        connect_timeout_secs: u64,
    },
    /// Traffic rounds (TCP and UDP transfers, pings; IPv4 and IPv6) from every connected client
    /// of a running OpenVPN lab with this prefix, e.g. one started by `openvpn up`.
    Traffic {
        #[arg(long, default_value = "tmovpn")]
        prefix: String,
        /// Number of rounds; 0 = until SIGINT/SIGTERM.
        #[arg(long, default_value_t = 1)]
        rounds: u64,
        #[arg(long, default_value_t = 1000)]
        interval_ms: u64,
        /// TCP upload bytes per round and client (plus 1000 x client index).
        #[arg(long, default_value_t = 4096)]
        tcp_up: u64,
        /// TCP download bytes per round and client (plus 3000 x client index).
        #[arg(long, default_value_t = 16384)]
        tcp_down: u64,
    },
    /// Remove the leftovers (processes, namespaces, files) of an OpenVPN lab with this prefix.
    Down {
        #[arg(long, default_value = "tmovpn")]
        prefix: String,
    },
}

#[derive(Subcommand)]
enum WgCmd {
    /// Build the lab, make every peer handshake, print one `PEER ...` line per peer and
    /// `READY <server-ns>`, run until SIGINT/SIGTERM, then clean up.
    Up {
        #[arg(long, default_value = "tmwg")]
        prefix: String,
        #[arg(long, default_value_t = 2)]
        peers: usize,
    },
    /// Remove the leftovers of a WireGuard lab with this prefix.
    Down {
        #[arg(long, default_value = "tmwg")]
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

fn print_lines(lines: &[String]) -> Result<()> {
    let mut out = std::io::stdout().lock();
    for l in lines {
        writeln!(out, "{l}")?;
    }
    out.flush()?;
    Ok(())
}

fn wait_for_signal() {
    while !STOP.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn report_traffic(bg: Option<traffic::Background>) {
    if let Some(bg) = bg {
        let s = bg.stop();
        eprintln!(
            "tunmeter-lab: traffic rounds ok {}, failed {}{}",
            s.rounds,
            s.errors,
            s.last_error.map(|e| format!(" (last error: {e})")).unwrap_or_default()
        );
    }
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
    print_lines(&[format!("READY {}", lab.server_ns())])?;
    let bg = if with_traffic { Some(traffic::background(&lab, Duration::from_millis(500))?) } else { None };
    wait_for_signal();
    eprintln!("tunmeter-lab: signal received, cleaning up");
    report_traffic(bg);
    let stats = lab.relay_stats();
    eprintln!("tunmeter-lab: relay {stats:?}");
    lab.down()?;
    eprintln!("tunmeter-lab: lab removed");
    Ok(())
}

struct OvpnUp {
    cfg: OvpnLabConfig,
    traffic: bool,
    traffic_interval: Duration,
    connect_timeout: Duration,
}

fn openvpn_up(o: OvpnUp) -> Result<()> {
    install_signal_handlers()?;
    let mut lab = OvpnLab::up(o.cfg)?;
    let addrs = lab.connect_all(o.connect_timeout)?;
    let mut lines = vec![format!(
        "SERVER ns={} udp_mgmt={} tcp_mgmt={} udp_dev={} tcp_dev={} cust_ns={} dir={}",
        lab.server_ns(),
        lab.mgmt_addr(Transport::Udp),
        lab.mgmt_addr(Transport::Tcp),
        Transport::Udp.server_dev(),
        Transport::Tcp.server_dev(),
        lab.cust_ns(),
        lab.dir().display()
    )];
    for (i, (c, a)) in lab.clients().iter().zip(&addrs).enumerate() {
        lines.push(format!(
            "CLIENT name={} username={} password={} transport={} ns={} v4={} v6={}",
            c.name,
            c.username,
            c.password,
            c.transport,
            lab.client_ns(i),
            a.v4,
            a.v6.map(|v| v.to_string()).unwrap_or_else(|| "-".into())
        ));
    }
    lines.push(format!("READY {}", lab.server_ns()));
    print_lines(&lines)?;
    let bg = if o.traffic { Some(lab.background(o.traffic_interval)?) } else { None };
    wait_for_signal();
    eprintln!("tunmeter-lab: signal received, cleaning up");
    report_traffic(bg);
    lab.down()?;
    eprintln!("tunmeter-lab: OpenVPN lab removed");
    Ok(())
}

fn openvpn_traffic(prefix: &str, rounds: u64, interval: Duration, sizes: RoundSizes) -> Result<()> {
    install_signal_handlers()?;
    let targets = openvpn::discover_targets(prefix)?;
    if targets.is_empty() {
        bail!(
            "no connected client namespaces {prefix}-c<n> found (is `tunmeter-lab openvpn up --prefix {prefix}` running?)"
        );
    }
    let (mut ok, mut failed) = (0u64, 0u64);
    let mut n = 0u64;
    while !STOP.load(Ordering::SeqCst) && (rounds == 0 || n < rounds) {
        n += 1;
        match openvpn::traffic_round(&targets, sizes) {
            Ok(()) => ok += 1,
            Err(e) => {
                failed += 1;
                eprintln!("tunmeter-lab: round {n} failed: {e:#}");
            }
        }
        if rounds == 0 || n < rounds {
            let until = std::time::Instant::now() + interval;
            while !STOP.load(Ordering::SeqCst) && std::time::Instant::now() < until {
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
    println!("TRAFFIC clients={} rounds_ok={ok} rounds_failed={failed}", targets.len());
    if failed > 0 && ok == 0 {
        bail!("every traffic round failed");
    }
    Ok(())
}

fn wireguard_up(prefix: &str, peers: usize) -> Result<()> {
    install_signal_handlers()?;
    let lab = WgLab::up(prefix, peers)?;
    let mut lines = vec![format!(
        "SERVER ns={} iface={} public_key={} addr={}",
        lab.server_ns(),
        lab.server_iface(),
        lab.server_public_key(),
        lab.server_addr()
    )];
    for i in 0..peers {
        lab.handshake(i)?;
        lines.push(format!(
            "PEER ns={} iface={} public_key={} v4={} v6={}",
            lab.peer_ns(i),
            lab.peer_iface(i),
            lab.peer_public_key(i),
            lab.peer_addr(i),
            lab.peer_addr6(i)
        ));
    }
    lines.push(format!("READY {}", lab.server_ns()));
    print_lines(&lines)?;
    wait_for_signal();
    eprintln!("tunmeter-lab: signal received, cleaning up");
    lab.down()?;
    eprintln!("tunmeter-lab: WireGuard lab removed");
    Ok(())
}

fn main() {
    let cli = Cli::parse();
    let res = match cli.cmd {
        Cmd::Up { prefix, tun_clients, eth_clients, traffic } => {
            up(LabConfig { prefix, tun_clients, eth_clients }, traffic)
        }
        Cmd::Down { prefix } => cleanup_prefix(&prefix),
        Cmd::Openvpn { cmd } => match cmd {
            OvpnCmd::Up {
                prefix,
                clients,
                hook,
                mgmt_password,
                traffic,
                traffic_interval_ms,
                connect_timeout_secs,
            } => {
                let mut cfg = OvpnLabConfig::demo(&prefix, clients);
                cfg.hook = hook;
                cfg.mgmt_password = mgmt_password;
                openvpn_up(OvpnUp {
                    cfg,
                    traffic,
                    traffic_interval: Duration::from_millis(traffic_interval_ms),
                    connect_timeout: Duration::from_secs(connect_timeout_secs),
                })
            }
            OvpnCmd::Traffic { prefix, rounds, interval_ms, tcp_up, tcp_down } => openvpn_traffic(
                &prefix,
                rounds,
                Duration::from_millis(interval_ms),
                RoundSizes { tcp_up, tcp_down, ..RoundSizes::default() },
            ),
            OvpnCmd::Down { prefix } => openvpn::cleanup(&prefix),
        },
        Cmd::Wireguard { cmd } => match cmd {
            WgCmd::Up { prefix, peers } => wireguard_up(&prefix, peers),
            WgCmd::Down { prefix } => wireguard::cleanup(&prefix),
        },
    };
    if let Err(e) = res {
        eprintln!("tunmeter-lab: error: {e:#}");
        std::process::exit(1);
    }
}
