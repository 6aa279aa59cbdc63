//! The `tunmeter` command line: `run`, `clients`, `stats`, `reset`, `token`, `steer`, `hook`, `detach`.

use tunmeter::{attach, clock, config, control, counters, daemon, db, report, steer, system, tokens};

use std::{io::IsTerminal as _, path::PathBuf, process::ExitCode, time::Duration};

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use config::{AttachMode, Config, Overrides};
use tunmeter::loader::PinnedMaps;

#[derive(Parser)]
#[command(name = "tunmeter", version, about = "Per-VPN-client traffic accounting with eBPF")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Load and attach the programs and keep them attached (re-attaching re-created devices).
    Run(RunArgs),
    /// Print the per-client counters from the pinned maps (no daemon needed).
    Clients {
        #[command(flatten)]
        pins: PinArgs,
        /// JSON instead of a table (see docs/cli-json.md).
        #[arg(long)]
        json: bool,
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
        #[arg(long)]
        json: bool,
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
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        settings: SettingsArgs,
    },
    /// Manage API bearer tokens.
    Token {
        #[command(subcommand)]
        cmd: TokenCmd,
    },
    /// Forward and redirect rules (docs/steering.md): changes apply at once, no daemon needed.
    Steer {
        #[command(subcommand)]
        cmd: SteerCmd,
    },
    /// Scripts that other programs run (docs/openvpn.md).
    Hook {
        #[command(subcommand)]
        cmd: HookCmd,
    },
    /// Remove programs, links, pins and the redirect policy route (this zeroes all counters).
    Detach {
        #[command(flatten)]
        pins: PinArgs,
        /// Config file naming the redirect policy route to remove (default values otherwise).
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// State directory of the daemon, to refuse while it runs.
        #[arg(long, default_value = config::DEFAULT_STATE_DIR)]
        state_dir: PathBuf,
    },
}

#[derive(Subcommand)]
enum HookCmd {
    /// OpenVPN client-connect / client-disconnect script: tells the daemon over its control
    /// socket; exits 1 when the daemon did not accept (OpenVPN then rejects the client).
    Openvpn {
        /// State directory of the daemon (its control socket is STATE_DIR/control.sock).
        #[arg(long, default_value = config::DEFAULT_STATE_DIR)]
        state_dir: PathBuf,
        /// The temporary file OpenVPN passes to client-connect (ignored).
        #[arg(hide = true)]
        _file: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum TokenCmd {
    /// Create a token and print it (only this once: the database keeps its hash).
    Create {
        /// read: every GET; admin: also resets.
        #[arg(long, value_parser = ["read", "admin"])]
        role: String,
        /// A label, e.g. who uses it.
        #[arg(long, default_value = "")]
        name: String,
        #[command(flatten)]
        settings: SettingsArgs,
    },
    /// List tokens (never their secrets).
    List {
        #[command(flatten)]
        settings: SettingsArgs,
    },
    /// Revoke a token by id.
    Revoke {
        id: String,
        #[command(flatten)]
        settings: SettingsArgs,
    },
}

#[derive(Subcommand)]
enum SteerCmd {
    /// Add a rule.
    Add {
        #[command(subcommand)]
        rule: AddRule,
    },
    /// Delete a rule (flows of a deleted forward rule stop at once; see docs/steering.md).
    Del {
        #[command(subcommand)]
        rule: DelRule,
    },
    /// List rules with their counters, the bypass set and the steering events.
    List {
        #[command(flatten)]
        pins: PinArgs,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum AddRule {
    /// (protocol, public port) on the egress interfaces -> a device's VPN address and port.
    Forward {
        /// tcp or udp.
        #[arg(long)]
        proto: String,
        #[arg(long)]
        public_port: String,
        /// The device's VPN IPv4 address and port, e.g. 10.8.0.2:3128.
        #[arg(long)]
        device: String,
        /// Only traffic to this address of the host (default: any).
        #[arg(long)]
        public_address: Option<String>,
        #[command(flatten)]
        pins: PinArgs,
    },
    /// TCP and UDP from a VPN client address or subnet -> the local transparent proxy.
    Redirect {
        /// Client address or subnet, e.g. 10.8.0.5 or 10.8.0.0/24 (IPv6 too).
        #[arg(long)]
        source: String,
        /// The transparent proxy's port (it listens with IP_TRANSPARENT on the wildcard address).
        #[arg(long)]
        proxy_port: String,
        #[command(flatten)]
        pins: PinArgs,
    },
}

#[derive(Subcommand)]
enum DelRule {
    Forward {
        #[arg(long)]
        proto: String,
        #[arg(long)]
        public_port: String,
        #[command(flatten)]
        pins: PinArgs,
    },
    Redirect {
        #[arg(long)]
        source: String,
        #[command(flatten)]
        pins: PinArgs,
    },
}

fn steer_cmd(cmd: SteerCmd) -> anyhow::Result<()> {
    use steer::{ForwardSpec, Origin, RedirectSpec, SteerMaps, host, rules};
    match cmd {
        SteerCmd::Add { rule: AddRule::Forward { proto, public_port, device, public_address, pins } } => {
            let spec = ForwardSpec::parse(&proto, &public_port, &device, public_address.as_deref())?;
            let id = SteerMaps::new(&pins.pin_dir).add_forward(&spec, Origin::Runtime)?;
            host::reserve_ports(&[spec.public_port].into_iter().collect())?;
            if !host::ipv4_forwarding() {
                eprintln!("warning: net.ipv4.ip_forward is 0: forwarded traffic cannot reach the device");
            }
            eprintln!("forward rule {id}: {}/{} -> {}", spec.proto, spec.public_port, spec.device);
        }
        SteerCmd::Add { rule: AddRule::Redirect { source, proxy_port, pins } } => {
            let spec = RedirectSpec::parse(&source, &proxy_port)?;
            let id = SteerMaps::new(&pins.pin_dir).add_redirect(&spec, Origin::Runtime)?;
            eprintln!("redirect rule {id}: {} -> proxy port {}", spec.source, spec.proxy_port);
        }
        SteerCmd::Del { rule: DelRule::Forward { proto, public_port, pins } } => {
            let proto: steer::Proto = proto.parse()?;
            SteerMaps::new(&pins.pin_dir).del_forward(proto, rules::parse_port(&public_port)?)?;
            eprintln!("forward rule {proto}/{public_port} deleted");
        }
        SteerCmd::Del { rule: DelRule::Redirect { source, pins } } => {
            let net = rules::parse_net(&source)?;
            SteerMaps::new(&pins.pin_dir).del_redirect(net)?;
            eprintln!("redirect rule {net} deleted");
        }
        SteerCmd::List { pins, json } => {
            let list = SteerMaps::new(&pins.pin_dir).list()?;
            if json {
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else {
                print!("{}", report::steer_table(&list));
            }
        }
    }
    Ok(())
}

/// Where the ledger lives, for commands other than `run` (same meaning as for `run`).
#[derive(Args)]
struct SettingsArgs {
    #[arg(long, short)]
    config: Option<PathBuf>,
    #[arg(long)]
    state_dir: Option<PathBuf>,
    #[arg(long)]
    database_url: Option<String>,
    #[arg(long)]
    node_id: Option<String>,
}

impl SettingsArgs {
    fn load(self) -> anyhow::Result<Config> {
        let ov = Overrides {
            state_dir: self.state_dir,
            database_url: self.database_url,
            node_id: self.node_id,
            ..Overrides::default()
        };
        let explicit = self.config.is_some();
        let path = self.config.unwrap_or_else(|| config::DEFAULT_CONFIG.into());
        Ok(Config::load_settings(&path, explicit, &ov)?)
    }
}

#[derive(Args)]
struct PinArgs {
    /// bpffs directory holding tunmeter's pinned maps and links.
    #[arg(long, default_value = config::DEFAULT_PIN_DIR)]
    pin_dir: PathBuf,
}

#[derive(Args)]
struct RunArgs {
    /// TOML config file.
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// A tun/wg device (L3): packets start at the IP header. Repeatable.
    #[arg(long)]
    tun: Vec<String>,
    /// An Ethernet device (L2). Repeatable.
    #[arg(long)]
    egress: Vec<String>,
    /// A VPN subnet (CIDR) whose addresses are clients, on every device given by flag. Repeatable.
    #[arg(long)]
    subnet: Vec<String>,
    #[arg(long)]
    pin_dir: Option<PathBuf>,
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// Capacity of the client map (default 65536).
    #[arg(long)]
    max_clients: Option<u32>,
    #[arg(long, value_parser = parse_mode)]
    attach_mode: Option<AttachMode>,
    /// This server's name in the ledger (default: the host name).
    #[arg(long)]
    node_id: Option<String>,
    /// sqlite://PATH (default: tunmeter.db in the state directory) or postgres://USER@HOST/DB.
    #[arg(long)]
    database_url: Option<String>,
    /// API address (default 127.0.0.1:9107; "" for the local control socket only).
    #[arg(long)]
    api_listen: Option<String>,
    /// Milliseconds between readings of the kernel counters (default 1000).
    #[arg(long)]
    poll_interval_ms: Option<u64>,
    /// Milliseconds between ledger writes (default 10000).
    #[arg(long)]
    flush_interval_ms: Option<u64>,
    /// Milliseconds between live stream frames (default 1000, at least 250).
    #[arg(long)]
    stream_interval_ms: Option<u64>,
}

fn parse_mode(s: &str) -> Result<AttachMode, String> {
    match s {
        "auto" => Ok(AttachMode::Auto),
        "tcx" => Ok(AttachMode::Tcx),
        "netlink" => Ok(AttachMode::Netlink),
        _ => Err("expected auto, tcx or netlink".into()),
    }
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
    match real_main() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tunmeter: error: {}", chain_message(&e));
            ExitCode::FAILURE
        }
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

fn real_main() -> anyhow::Result<()> {
    match Cli::parse().cmd {
        Cmd::Run(a) => {
            let ov = Overrides {
                tun: a.tun,
                egress: a.egress,
                subnets: a.subnet,
                pin_dir: a.pin_dir,
                state_dir: a.state_dir,
                max_clients: a.max_clients,
                attach_mode: a.attach_mode,
                node_id: a.node_id,
                database_url: a.database_url,
                api_listen: a.api_listen,
                poll_interval_ms: a.poll_interval_ms,
                flush_interval_ms: a.flush_interval_ms,
                stream_interval_ms: a.stream_interval_ms,
            };
            let explicit = a.config.is_some();
            let path = a.config.unwrap_or_else(|| config::DEFAULT_CONFIG.into());
            let cfg = Config::load(&path, explicit, &ov)?;
            runtime()?.block_on(daemon::run(cfg))?;
        }
        Cmd::Reset { client, settings } => {
            let cfg = settings.load()?;
            let ip = tunmeter::api::routes::parse_client(&client).map_err(|e| anyhow::anyhow!(e.message))?;
            let (status, body) = runtime()?.block_on(control::request(
                &cfg.state_dir,
                hyper::Method::POST,
                &format!("/api/v1/clients/{ip}/reset"),
                30,
            ))?;
            if status != 200 {
                anyhow::bail!("{}", api_error_message(status, &body));
            }
            println!("{body}");
        }
        Cmd::Sessions { all, client, limit, json, settings } => {
            let cfg = settings.load()?;
            let mut path = format!("/api/v1/sessions?limit={limit}");
            if !all {
                path.push_str("&active=true");
            }
            if let Some(c) = client {
                let ip = tunmeter::api::routes::parse_client(&c).map_err(|e| anyhow::anyhow!(e.message))?;
                path.push_str(&format!("&client={ip}"));
            }
            let (status, body) =
                runtime()?.block_on(control::request(&cfg.state_dir, hyper::Method::GET, &path, 30))?;
            if status != 200 {
                anyhow::bail!("{}", api_error_message(status, &body));
            }
            if json {
                println!("{body}");
            } else {
                let v: serde_json::Value = serde_json::from_str(&body).context("the daemon's answer is not JSON")?;
                print!("{}", report::sessions_table(v["sessions"].as_array().map(Vec::as_slice).unwrap_or_default()));
            }
        }
        Cmd::Token { cmd } => runtime()?.block_on(token(cmd))?,
        Cmd::Clients { pins, json, watch, count } => clients(&pins.pin_dir, json, watch, count)?,
        Cmd::Stats { pins, json } => {
            let rows =
                counters::read_stats(&PinnedMaps::new(&pins.pin_dir)).with_context(|| no_pins_hint(&pins.pin_dir))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&serde_json::json!({ "outcomes": rows }))?);
            } else {
                print!("{}", report::stats_table(&rows));
            }
        }
        Cmd::Steer { cmd } => steer_cmd(cmd)?,
        Cmd::Hook { cmd: HookCmd::Openvpn { state_dir, _file } } => hook_openvpn(&state_dir)?,
        Cmd::Detach { pins, state_dir, config: cfg_path } => {
            if system::daemon_running(&state_dir) {
                anyhow::bail!(
                    "a tunmeter daemon is running with state directory {}: stop it first",
                    state_dir.display()
                );
            }
            let n = attach::detach_all(&pins.pin_dir)?;
            let explicit = cfg_path.is_some();
            let path = cfg_path.unwrap_or_else(|| config::DEFAULT_CONFIG.into());
            let policy = Config::load_settings(&path, explicit, &Overrides::default())?.steer.policy;
            runtime()?.block_on(policy.remove())?;
            daemon::remove_pins(&pins.pin_dir).with_context(|| format!("removing {}", pins.pin_dir.display()))?;
            eprintln!("detached {n} attachment(s) and removed {}", pins.pin_dir.display());
        }
    }
    Ok(())
}

/// `tunmeter hook openvpn`: one line on stderr and exit 1 on any failure (fail closed).
fn hook_openvpn(state_dir: &std::path::Path) -> anyhow::Result<()> {
    use tunmeter::identity::openvpn::hook;
    let call = hook::call_from_env(&|k| std::env::var(k).ok()).map_err(|e| anyhow::anyhow!("hook openvpn: {e}"))?;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().context("tokio runtime")?;
    rt.block_on(hook::send(state_dir, &call)).map_err(|e| {
        anyhow::anyhow!(
            "hook openvpn: {} {} ({}): {e}",
            match call.kind {
                hook::HookKind::ClientConnect => "client-connect",
                hook::HookKind::ClientDisconnect => "client-disconnect",
            },
            call.common_name,
            call.real_address
        )
    })
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().context("tokio runtime")
}

/// The message of an API error body, or the raw body.
fn api_error_message(status: u16, body: &str) -> String {
    serde_json::from_str::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v["error"]["message"].as_str().map(str::to_string))
        .map_or_else(|| format!("HTTP {status}: {body}"), |m| format!("{m} (HTTP {status})"))
}

async fn token(cmd: TokenCmd) -> anyhow::Result<()> {
    match cmd {
        TokenCmd::Create { role, name, settings } => {
            let cfg = settings.load()?;
            if cfg.ledger.database_url.starts_with("sqlite:") {
                // Before the daemon's first start the state directory may not exist yet.
                std::fs::create_dir_all(&cfg.state_dir)
                    .with_context(|| format!("creating {}", cfg.state_dir.display()))?;
            }
            let db = db::Database::open(&cfg.ledger.database_url).await?;
            let role = tokens::Role::parse(&role).expect("clap checked the role");
            let (info, secret) = tokens::create(&db, &cfg.node_id, role, &name).await?;
            eprintln!(
                "created {} token {} for node {} (shown once; store it now):",
                role.as_str(),
                info.id,
                cfg.node_id
            );
            println!("{secret}");
        }
        TokenCmd::List { settings } => {
            let cfg = settings.load()?;
            let db = db::Database::open(&cfg.ledger.database_url).await?;
            for t in tokens::list(&db, &cfg.node_id).await? {
                let state = if t.revoked_unix_ms.is_some() { "revoked" } else { "active" };
                println!("{}  {:<5}  {:<7}  {}", t.id, t.role.as_str(), state, t.name);
            }
        }
        TokenCmd::Revoke { id, settings } => {
            let cfg = settings.load()?;
            let db = db::Database::open(&cfg.ledger.database_url).await?;
            if !tokens::revoke(&db, &cfg.node_id, &id).await? {
                anyhow::bail!("no active token {id} on node {}", cfg.node_id);
            }
            eprintln!("revoked {id}");
        }
    }
    Ok(())
}

fn no_pins_hint(pin_dir: &std::path::Path) -> String {
    format!("reading pinned maps under {} (is `tunmeter run` started with this --pin-dir?)", pin_dir.display())
}

fn clients(pin_dir: &std::path::Path, json: bool, watch: Option<f64>, count: Option<u64>) -> anyhow::Result<()> {
    let maps = PinnedMaps::new(pin_dir);
    // Last-seen needs the kernel clock; counters are shown without it if it is unavailable.
    let kclock = clock::KernelClock::open(pin_dir).and_then(|k| k.calibrate().map(|c| (k, c.hz)));
    if let Err(e) = &kclock {
        tracing::warn!(%e, "last-seen times unavailable");
    }
    let read = || {
        let cal = kclock.as_ref().ok().and_then(|(k, hz)| k.recalibrate(*hz).ok());
        counters::read_clients(&maps, cal.as_ref()).with_context(|| no_pins_hint(pin_dir))
    };
    let Some(secs) = watch else {
        let snap = read()?;
        if json {
            println!("{}", serde_json::to_string_pretty(&snap)?);
        } else {
            print!("{}", report::clients_table(&snap, None));
        }
        return Ok(());
    };
    anyhow::ensure!(secs >= 0.1 && secs.is_finite(), "--watch needs at least 0.1 seconds");
    let mut before = read()?;
    let mut n = 0;
    loop {
        std::thread::sleep(Duration::from_secs_f64(secs));
        let now = read()?;
        let rates = report::rates(&now, &before);
        if json {
            let rates: Vec<_> = rates
                .iter()
                .map(
                    |(ip, r)| serde_json::json!({"ip": ip, "upload_bps": r.upload_bps, "download_bps": r.download_bps}),
                )
                .collect();
            println!("{}", serde_json::to_string(&serde_json::json!({"snapshot": now, "rates": rates}))?);
        } else {
            // Clear the screen between refreshes on a terminal; plain tables when piped.
            let clear = if std::io::stdout().is_terminal() { "\x1b[2J\x1b[H" } else { "" };
            print!("{clear}{}", report::clients_table(&now, Some(&rates)));
        }
        before = now;
        n += 1;
        if count.is_some_and(|c| n >= c) {
            return Ok(());
        }
    }
}
