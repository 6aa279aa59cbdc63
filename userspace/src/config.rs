//! Daemon configuration: a TOML file plus command-line flags for the common case.

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
};

use ipnet::IpNet;
use serde::Deserialize;

pub const DEFAULT_CONFIG: &str = "/etc/tunmeter/tunmeter.toml";
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/tunmeter";
pub const DEFAULT_STATE_DIR: &str = "/var/lib/tunmeter";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("invalid config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("bad subnet {value:?}: {reason}")]
    BadSubnet { value: String, reason: String },
    #[error("bad interface name {0:?}: 1 to 15 characters, no '/', no whitespace")]
    BadInterfaceName(String),
    #[error("interface {0} is configured twice")]
    DuplicateInterface(String),
    #[error("no interfaces configured: give --tun/--egress or [[interface]] entries in the config file")]
    NoInterfaces,
    #[error(
        "interface {0} has no subnets: every address on it would be counted as 'other' (give --subnet or subnets = [...])"
    )]
    NoSubnets(String),
    #[error("{0} subnets configured over all interfaces; at most {max} fit the subnet map", max = tunmeter_common::MAX_SUBNETS)]
    TooManySubnets(usize),
    #[error("max_clients must be between 16 and 16777216, got {0}")]
    BadCapacity(u32),
    #[error("pin_dir {0} must be an absolute path under a bpffs mount (e.g. /sys/fs/bpf/tunmeter)")]
    BadPinDir(PathBuf),
    #[error("bad node_id {0:?}: 1 to 64 characters from A-Z a-z 0-9 . _ -")]
    BadNodeId(String),
    #[error(
        "bad api listen address {0:?}: expected IP:PORT like 127.0.0.1:9107, or \"\" to serve only the control socket"
    )]
    BadListen(String),
    #[error("steering rule: {0}")]
    Rule(#[from] crate::steer::RuleError),
    #[error("redirect_table {0} is one of the kernel's own tables (0, 253 default, 254 main, 255 local)")]
    ReservedTable(u32),
    #[error("forward rule {0} is configured twice")]
    DuplicateForward(String),
    #[error("redirect rule for {0} is configured twice")]
    DuplicateRedirect(String),
    #[error("[[openvpn]] {name:?}: {reason}")]
    BadOpenvpn { name: String, reason: String },
    #[error("[[wireguard]] interface {0:?}: bad or duplicate interface name")]
    BadWireguard(String),
    #[error("[[webhook]] {name:?}: {reason}")]
    BadWebhook { name: String, reason: String },
    #[error("cannot read {what} {path}: {source}")]
    ReadSecret { what: &'static str, path: PathBuf, source: std::io::Error },
    #[error("{name} must be between {min} and {max}, got {value}")]
    OutOfRange { name: &'static str, value: u64, min: u64, max: u64 },
}

/// Layer of a device: where the IP header starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Layer {
    /// tun / wg devices: the packet starts at the IP header.
    L3,
    /// Ethernet devices: 14-byte header first.
    L2,
}

impl Layer {
    pub fn l3_offset(self) -> u32 {
        match self {
            Layer::L3 => 0,
            Layer::L2 => tunmeter_common::ETH_HLEN,
        }
    }
}

/// How programs are attached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AttachMode {
    /// TCX links (pinned; kernel >= 6.6) when available, else a clsact qdisc.
    #[default]
    Auto,
    Tcx,
    /// clsact qdisc + cls_bpf filter through netlink (kernels before 6.6).
    Netlink,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InterfaceConfig {
    pub name: String,
    pub layer: Layer,
    pub subnets: Vec<IpNet>,
}

/// The validated configuration the daemon runs with.
#[derive(Debug, Clone)]
pub struct Config {
    pub interfaces: Vec<InterfaceConfig>,
    pub pin_dir: PathBuf,
    pub state_dir: PathBuf,
    pub max_clients: u32,
    pub attach_mode: AttachMode,
    /// Milliseconds between reconciliations of attachments (safety net behind link events).
    pub reconcile_interval_ms: u64,
    /// Names this server in the ledger (several servers can share one PostgreSQL).
    pub node_id: String,
    pub ledger: LedgerSettings,
    pub api: ApiSettings,
    pub steer: SteerSettings,
    pub identity: IdentitySettings,
    pub webhooks: Vec<crate::webhook::Endpoint>,
}

/// `[identity]`, `[[openvpn]]` and `[[wireguard]]`: where client names come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdentitySettings {
    pub openvpn: Vec<crate::identity::openvpn::mgmt::InstanceConfig>,
    /// Instance name -> its tun device (`dev` in the hook's environment).
    pub openvpn_interfaces: std::collections::BTreeMap<String, String>,
    /// WireGuard interfaces whose peers are read.
    pub wireguard: Vec<String>,
    /// How often management `status 3` and WireGuard peers are re-read (safety net).
    pub reconcile_interval_ms: u64,
    /// A device is offline after this long without a packet or a WireGuard handshake.
    pub device_offline_after_secs: u64,
    /// Sessions of an instance whose management interface is lost close after this long
    /// (a management restart or a stall shorter than this changes nothing).
    pub management_grace_secs: u64,
}

/// `[steer]`, `[[forward]]` and `[[redirect]]` (docs/steering.md).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SteerSettings {
    pub policy: crate::steer::PolicyRoute,
    /// Destinations never redirected besides this host's own addresses.
    pub bypass: Vec<IpNet>,
    /// Also bypass every address configured on this host (default true).
    pub bypass_local: bool,
    pub forward: Vec<crate::steer::ForwardSpec>,
    pub redirect: Vec<crate::steer::RedirectSpec>,
}

pub const DEFAULT_REDIRECT_MARK: u32 = 0x746d_0001;
pub const DEFAULT_REDIRECT_TABLE: u32 = 29549;
pub const DEFAULT_RULE_PRIORITY: u32 = 29549;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LedgerSettings {
    /// `sqlite://PATH` or `postgres://...`; default: tunmeter.db in the state directory.
    pub database_url: String,
    pub poll_interval_ms: u64,
    pub flush_interval_ms: u64,
    pub retention_minute_days: u32,
    pub retention_hour_days: u32,
    pub retention_day_days: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiSettings {
    /// TCP address of the API; None: only the local control socket.
    pub listen: Option<std::net::SocketAddr>,
    pub stream_interval_ms: u64,
    pub stream_stall_timeout_secs: u64,
    pub offline_after_secs: u64,
    pub metrics_max_clients: usize,
}

pub const DEFAULT_API_LISTEN: &str = "127.0.0.1:9107";

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileLedger {
    database_url: Option<String>,
    poll_interval_ms: Option<u64>,
    flush_interval_ms: Option<u64>,
    retention_minute_days: Option<u32>,
    retention_hour_days: Option<u32>,
    retention_day_days: Option<u32>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileApi {
    listen: Option<String>,
    stream_interval_ms: Option<u64>,
    stream_stall_timeout_secs: Option<u64>,
    offline_after_secs: Option<u64>,
    metrics_max_clients: Option<usize>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileSteer {
    redirect_mark: Option<u32>,
    redirect_table: Option<u32>,
    rule_priority: Option<u32>,
    #[serde(default)]
    bypass: Vec<String>,
    bypass_local: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileForward {
    proto: String,
    public_port: u32,
    device: String,
    public_address: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileRedirect {
    source: String,
    proxy_port: u32,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileIdentity {
    reconcile_interval_ms: Option<u64>,
    device_offline_after_secs: Option<u64>,
    management_grace_secs: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileOpenvpn {
    name: String,
    protocol: String,
    management: String,
    interface: Option<String>,
    password_file: Option<PathBuf>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileWireguard {
    interface: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileWebhook {
    name: String,
    url: String,
    secret: Option<String>,
    secret_file: Option<PathBuf>,
    events: Option<Vec<String>>,
    timeout_ms: Option<u64>,
    min_backoff_ms: Option<u64>,
    max_backoff_secs: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    pin_dir: Option<PathBuf>,
    state_dir: Option<PathBuf>,
    max_clients: Option<u32>,
    attach_mode: Option<AttachMode>,
    reconcile_interval_ms: Option<u64>,
    node_id: Option<String>,
    #[serde(default)]
    ledger: FileLedger,
    #[serde(default)]
    api: FileApi,
    #[serde(default, rename = "interface")]
    interfaces: Vec<FileInterface>,
    #[serde(default)]
    steer: FileSteer,
    #[serde(default)]
    forward: Vec<FileForward>,
    #[serde(default)]
    redirect: Vec<FileRedirect>,
    #[serde(default)]
    identity: FileIdentity,
    #[serde(default)]
    openvpn: Vec<FileOpenvpn>,
    #[serde(default)]
    wireguard: Vec<FileWireguard>,
    #[serde(default)]
    webhook: Vec<FileWebhook>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileInterface {
    name: String,
    layer: Layer,
    #[serde(default)]
    subnets: Vec<String>,
}

/// Command-line values that override or extend the file.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    pub tun: Vec<String>,
    pub egress: Vec<String>,
    pub subnets: Vec<String>,
    pub pin_dir: Option<PathBuf>,
    pub state_dir: Option<PathBuf>,
    pub max_clients: Option<u32>,
    pub attach_mode: Option<AttachMode>,
    pub node_id: Option<String>,
    pub database_url: Option<String>,
    pub api_listen: Option<String>,
    pub poll_interval_ms: Option<u64>,
    pub flush_interval_ms: Option<u64>,
    pub stream_interval_ms: Option<u64>,
}

fn ranged(name: &'static str, value: u64, min: u64, max: u64) -> Result<u64, ConfigError> {
    if (min..=max).contains(&value) { Ok(value) } else { Err(ConfigError::OutOfRange { name, value, min, max }) }
}

/// The host name: the default node id.
fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

fn validate_node_id(id: &str) -> Result<(), ConfigError> {
    let ok = !id.is_empty()
        && id.len() <= 64
        && id.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if ok { Ok(()) } else { Err(ConfigError::BadNodeId(id.into())) }
}

fn steer_settings(s: FileSteer, fwd: &[FileForward], red: &[FileRedirect]) -> Result<SteerSettings, ConfigError> {
    use crate::steer::{ForwardSpec, PolicyRoute, RedirectSpec, rules::parse_net};
    let policy = PolicyRoute {
        mark: s.redirect_mark.unwrap_or(DEFAULT_REDIRECT_MARK),
        table: s.redirect_table.unwrap_or(DEFAULT_REDIRECT_TABLE),
        priority: s.rule_priority.unwrap_or(DEFAULT_RULE_PRIORITY),
    };
    if policy.mark == 0 {
        return Err(ConfigError::OutOfRange { name: "redirect_mark", value: 0, min: 1, max: u32::MAX as u64 });
    }
    // Tables 0 and 253..=255 are the kernel's (unspec, default, main, local).
    if policy.table == 0 || (253..=255).contains(&policy.table) {
        return Err(ConfigError::ReservedTable(policy.table));
    }
    let bypass = s.bypass.iter().map(|b| parse_net(b)).collect::<Result<Vec<_>, _>>()?;
    let mut forward = Vec::new();
    for f in fwd {
        let spec = ForwardSpec::parse(&f.proto, &f.public_port.to_string(), &f.device, f.public_address.as_deref())?;
        if forward.iter().any(|o: &ForwardSpec| o.proto == spec.proto && o.public_port == spec.public_port) {
            return Err(ConfigError::DuplicateForward(format!("{}/{}", spec.proto, spec.public_port)));
        }
        forward.push(spec);
    }
    let mut redirect = Vec::new();
    for r in red {
        let spec = RedirectSpec::parse(&r.source, &r.proxy_port.to_string())?;
        if redirect.iter().any(|o: &RedirectSpec| o.source == spec.source) {
            return Err(ConfigError::DuplicateRedirect(spec.source.to_string()));
        }
        redirect.push(spec);
    }
    Ok(SteerSettings { policy, bypass, bypass_local: s.bypass_local.unwrap_or(true), forward, redirect })
}

fn read_secret(what: &'static str, path: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path)
        .map(|s| s.trim_end_matches(['\r', '\n']).to_string())
        .map_err(|source| ConfigError::ReadSecret { what, path: path.into(), source })
}

fn identity_settings(
    s: FileIdentity,
    ovpn: Vec<FileOpenvpn>,
    wg: Vec<FileWireguard>,
) -> Result<IdentitySettings, ConfigError> {
    use crate::identity::openvpn::mgmt::{InstanceConfig, MgmtAddr};
    let reconcile_interval_ms = ranged("reconcile_interval_ms", s.reconcile_interval_ms.unwrap_or(2000), 200, 60_000)?;
    let device_offline_after_secs =
        ranged("device_offline_after_secs", s.device_offline_after_secs.unwrap_or(120), 1, 30 * 86_400)?;
    let management_grace_secs = ranged("management_grace_secs", s.management_grace_secs.unwrap_or(30), 0, 3600)?;
    let mut openvpn: Vec<InstanceConfig> = Vec::new();
    let mut openvpn_interfaces = std::collections::BTreeMap::new();
    for o in ovpn {
        let bad = |reason: String| ConfigError::BadOpenvpn { name: o.name.clone(), reason };
        if o.name.is_empty()
            || o.name.len() > 32
            || !o.name.chars().all(|c| c.is_ascii_alphanumeric() || "-_".contains(c))
        {
            return Err(bad("name must be 1 to 32 characters from A-Z a-z 0-9 - _".into()));
        }
        if openvpn.iter().any(|i| i.name == o.name) {
            return Err(bad("configured twice".into()));
        }
        let protocol = match o.protocol.as_str() {
            "udp" => "openvpn-udp",
            "tcp" => "openvpn-tcp",
            p => return Err(bad(format!("protocol {p:?}: expected \"udp\" or \"tcp\""))),
        };
        let addr = match o.management.strip_prefix("unix:") {
            Some(p) if p.starts_with('/') => MgmtAddr::Unix(p.into()),
            Some(p) => return Err(bad(format!("management unix:{p}: the socket path must be absolute"))),
            None => {
                let ok = o
                    .management
                    .rsplit_once(':')
                    .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok_and(|p| p > 0));
                if !ok {
                    return Err(bad(format!(
                        "management {:?}: expected HOST:PORT like 127.0.0.1:7505 or unix:/run/openvpn/udp.sock",
                        o.management
                    )));
                }
                MgmtAddr::Tcp(o.management.clone())
            }
        };
        if let Some(dev) = &o.interface {
            if validate_ifname(dev).is_err() {
                return Err(bad(format!("interface {dev:?}: bad interface name")));
            }
            if openvpn_interfaces.values().any(|d| d == dev) {
                return Err(bad(format!("interface {dev:?} belongs to another [[openvpn]] instance already")));
            }
            openvpn_interfaces.insert(o.name.clone(), dev.clone());
        }
        let password = o.password_file.as_deref().map(|p| read_secret("management password file", p)).transpose()?;
        openvpn.push(InstanceConfig {
            name: o.name.clone(),
            protocol: protocol.into(),
            addr,
            password,
            reconcile: std::time::Duration::from_millis(reconcile_interval_ms),
        });
    }
    let mut wireguard: Vec<String> = Vec::new();
    for w in wg {
        if validate_ifname(&w.interface).is_err() || wireguard.contains(&w.interface) {
            return Err(ConfigError::BadWireguard(w.interface));
        }
        wireguard.push(w.interface);
    }
    Ok(IdentitySettings {
        openvpn,
        openvpn_interfaces,
        wireguard,
        reconcile_interval_ms,
        device_offline_after_secs,
        management_grace_secs,
    })
}

fn webhook_settings(hooks: Vec<FileWebhook>) -> Result<Vec<crate::webhook::Endpoint>, ConfigError> {
    use crate::webhook::{Endpoint, EventKind};
    use std::time::Duration;
    let mut out: Vec<Endpoint> = Vec::new();
    for h in hooks {
        let bad = |reason: String| ConfigError::BadWebhook { name: h.name.clone(), reason };
        if h.name.is_empty() || h.name.len() > 64 || h.name.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(bad("name must be 1 to 64 characters without spaces".into()));
        }
        if out.iter().any(|e| e.name == h.name) {
            return Err(bad("configured twice".into()));
        }
        if !(h.url.starts_with("http://") || h.url.starts_with("https://")) || h.url.len() < 10 {
            return Err(bad(format!(
                "url {:?} must start with http:// or https://",
                crate::webhook::redact_url(&h.url)
            )));
        }
        let secret = match (&h.secret, &h.secret_file) {
            (Some(s), None) => s.clone(),
            (None, Some(p)) => read_secret("webhook secret file", p)?,
            _ => return Err(bad("give exactly one of secret or secret_file".into())),
        };
        if secret.len() < 16 {
            return Err(bad("the secret must be at least 16 characters".into()));
        }
        let events = match &h.events {
            None => EventKind::ALL.to_vec(),
            Some(list) if list.is_empty() => {
                return Err(bad("events is empty: leave it out to send every event".into()));
            }
            Some(list) => {
                let mut v = Vec::new();
                for e in list {
                    let k = EventKind::parse(e).ok_or_else(|| {
                        bad(format!(
                            "unknown event {e:?}: expected one of {}",
                            EventKind::ALL.map(|k| k.as_str()).join(", ")
                        ))
                    })?;
                    if !v.contains(&k) {
                        v.push(k);
                    }
                }
                v
            }
        };
        let timeout_ms = ranged("webhook timeout_ms", h.timeout_ms.unwrap_or(5000), 100, 120_000)?;
        let min_backoff_ms = ranged("webhook min_backoff_ms", h.min_backoff_ms.unwrap_or(1000), 10, 3_600_000)?;
        let max_backoff_secs = ranged("webhook max_backoff_secs", h.max_backoff_secs.unwrap_or(300), 1, 86_400)?;
        if min_backoff_ms > max_backoff_secs * 1000 {
            return Err(bad(format!(
                "min_backoff_ms ({min_backoff_ms}) is longer than max_backoff_secs ({max_backoff_secs} s)"
            )));
        }
        out.push(Endpoint {
            name: h.name.clone(),
            url: h.url.clone(),
            secret: secret.into_bytes(),
            events,
            timeout: Duration::from_millis(timeout_ms),
            min_backoff: Duration::from_millis(min_backoff_ms),
            max_backoff: Duration::from_secs(max_backoff_secs),
        });
    }
    Ok(out)
}

impl Config {
    /// Read `path` (a missing file is fine only when it is the default path and flags name
    /// the interfaces), apply `ov`, validate.
    pub fn load(path: &Path, explicit: bool, ov: &Overrides) -> Result<Config, ConfigError> {
        Self::build(read_file(path, explicit)?, ov)
    }

    /// Like `load`, for commands that need the state directory, node and database but no
    /// interfaces (`token`, `reset`).
    pub fn load_settings(path: &Path, explicit: bool, ov: &Overrides) -> Result<Config, ConfigError> {
        Self::build_inner(read_file(path, explicit)?, ov, false)
    }

    /// Parse a TOML text (used by tests and `load`).
    pub fn from_toml(text: &str, ov: &Overrides) -> Result<Config, ConfigError> {
        Self::build(parse_file(Path::new("<inline>"), text)?, ov)
    }

    fn build(file: FileConfig, ov: &Overrides) -> Result<Config, ConfigError> {
        Self::build_inner(file, ov, true)
    }

    fn build_inner(file: FileConfig, ov: &Overrides, need_interfaces: bool) -> Result<Config, ConfigError> {
        let flag_subnets = ov.subnets.iter().map(|s| parse_subnet(s)).collect::<Result<Vec<_>, _>>()?;
        let mut interfaces = Vec::new();
        // Interfaces from the file have their own subnets; --subnet applies to --tun/--egress.
        for fi in file.interfaces {
            let subnets = fi.subnets.iter().map(|s| parse_subnet(s)).collect::<Result<Vec<_>, _>>()?;
            interfaces.push(InterfaceConfig { name: fi.name, layer: fi.layer, subnets });
        }
        for (names, layer) in [(&ov.tun, Layer::L3), (&ov.egress, Layer::L2)] {
            for name in names {
                interfaces.push(InterfaceConfig { name: name.clone(), layer, subnets: flag_subnets.clone() });
            }
        }
        let mut seen = BTreeSet::new();
        for i in &mut interfaces {
            validate_ifname(&i.name)?;
            if !seen.insert(i.name.clone()) {
                return Err(ConfigError::DuplicateInterface(i.name.clone()));
            }
            i.subnets.sort();
            i.subnets.dedup();
            // An Ethernet uplink listed only for forward rules has no clients of its own.
            if i.subnets.is_empty() && i.layer == Layer::L3 {
                return Err(ConfigError::NoSubnets(i.name.clone()));
            }
        }
        if interfaces.is_empty() && need_interfaces {
            return Err(ConfigError::NoInterfaces);
        }
        let subnets: usize = interfaces.iter().map(|i| i.subnets.len()).sum();
        if subnets > tunmeter_common::MAX_SUBNETS as usize {
            return Err(ConfigError::TooManySubnets(subnets));
        }
        let max_clients = ov.max_clients.or(file.max_clients).unwrap_or(tunmeter_common::DEFAULT_MAX_CLIENTS);
        if !(16..=16 * 1024 * 1024).contains(&max_clients) {
            return Err(ConfigError::BadCapacity(max_clients));
        }
        let pin_dir = ov.pin_dir.clone().or(file.pin_dir).unwrap_or_else(|| DEFAULT_PIN_DIR.into());
        if !pin_dir.is_absolute() || pin_dir.parent().is_none() {
            return Err(ConfigError::BadPinDir(pin_dir));
        }
        let state_dir: PathBuf = ov.state_dir.clone().or(file.state_dir).unwrap_or_else(|| DEFAULT_STATE_DIR.into());
        let node_id = ov.node_id.clone().or(file.node_id).unwrap_or_else(hostname);
        validate_node_id(&node_id)?;
        let l = file.ledger;
        let database_url =
            ov.database_url.clone().or(l.database_url).unwrap_or_else(|| crate::db::default_url(&state_dir));
        let ledger = LedgerSettings {
            database_url,
            poll_interval_ms: ranged(
                "poll_interval_ms",
                ov.poll_interval_ms.or(l.poll_interval_ms).unwrap_or(1000),
                100,
                60_000,
            )?,
            flush_interval_ms: ranged(
                "flush_interval_ms",
                ov.flush_interval_ms.or(l.flush_interval_ms).unwrap_or(10_000),
                100,
                300_000,
            )?,
            retention_minute_days: l.retention_minute_days.unwrap_or(2),
            retention_hour_days: l.retention_hour_days.unwrap_or(90),
            retention_day_days: l.retention_day_days.unwrap_or(0),
        };
        let a = file.api;
        let listen_text = ov.api_listen.clone().or(a.listen).unwrap_or_else(|| DEFAULT_API_LISTEN.into());
        let listen = match listen_text.trim() {
            "" => None,
            t => Some(t.parse().map_err(|_| ConfigError::BadListen(listen_text.clone()))?),
        };
        let api = ApiSettings {
            listen,
            stream_interval_ms: ranged(
                "stream_interval_ms",
                ov.stream_interval_ms.or(a.stream_interval_ms).unwrap_or(1000),
                250,
                60_000,
            )?,
            stream_stall_timeout_secs: ranged(
                "stream_stall_timeout_secs",
                a.stream_stall_timeout_secs.unwrap_or(10),
                1,
                3600,
            )?,
            offline_after_secs: ranged("offline_after_secs", a.offline_after_secs.unwrap_or(120), 1, 30 * 86_400)?,
            metrics_max_clients: a.metrics_max_clients.unwrap_or(1000),
        };
        let steer = steer_settings(file.steer, &file.forward, &file.redirect)?;
        let identity = identity_settings(file.identity, file.openvpn, file.wireguard)?;
        let webhooks = webhook_settings(file.webhook)?;
        Ok(Config {
            steer,
            identity,
            webhooks,
            interfaces,
            pin_dir,
            state_dir,
            max_clients,
            attach_mode: ov.attach_mode.or(file.attach_mode).unwrap_or_default(),
            reconcile_interval_ms: file.reconcile_interval_ms.unwrap_or(1000).clamp(100, 60_000),
            node_id,
            ledger,
            api,
        })
    }
}

fn read_file(path: &Path, explicit: bool) -> Result<FileConfig, ConfigError> {
    match std::fs::read_to_string(path) {
        Ok(text) => parse_file(path, &text),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !explicit => Ok(FileConfig::default()),
        Err(source) => Err(ConfigError::Read { path: path.into(), source }),
    }
}

fn parse_file(path: &Path, text: &str) -> Result<FileConfig, ConfigError> {
    toml::from_str(text).map_err(|e| ConfigError::Parse { path: path.into(), message: e.to_string() })
}

/// Parse `10.8.0.0/24` or `fd00::/64`. Host bits must be zero, so a typo like
/// `10.8.0.1/24` is caught rather than silently widened.
pub fn parse_subnet(s: &str) -> Result<IpNet, ConfigError> {
    let bad = |reason: &str| ConfigError::BadSubnet { value: s.into(), reason: reason.into() };
    let net: IpNet = s.trim().parse().map_err(|_| bad("expected CIDR notation like 10.8.0.0/24 or fd00:8::/64"))?;
    if net.trunc() != net {
        return Err(bad(&format!("host bits set; did you mean {}?", net.trunc())));
    }
    Ok(net)
}

fn validate_ifname(name: &str) -> Result<(), ConfigError> {
    if name.is_empty()
        || name.len() > 15
        || name.contains('/')
        || name.chars().any(char::is_whitespace)
        || name == "."
        || name == ".."
    {
        return Err(ConfigError::BadInterfaceName(name.into()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ov() -> Overrides {
        Overrides::default()
    }

    #[test]
    fn flags_alone_make_a_config() {
        let o = Overrides {
            tun: vec!["tun0".into(), "tun1".into()],
            egress: vec!["eth0".into()],
            subnets: vec!["10.8.0.0/24".into(), "fd00:8::/64".into()],
            ..ov()
        };
        let c = Config::build(FileConfig::default(), &o).unwrap();
        assert_eq!(c.interfaces.len(), 3);
        assert_eq!(c.interfaces[2].layer, Layer::L2);
        assert_eq!(c.interfaces[0].subnets.len(), 2);
        assert_eq!(c.max_clients, 65_536);
        assert_eq!(c.pin_dir, PathBuf::from(DEFAULT_PIN_DIR));
    }

    #[test]
    fn toml_file_with_interfaces() {
        let c = Config::from_toml(
            r#"
            pin_dir = "/sys/fs/bpf/x"
            max_clients = 200000
            [[interface]]
            name = "tun0"
            layer = "l3"
            subnets = ["10.8.0.0/24"]
            [[interface]]
            name = "wg0"
            layer = "l3"
            subnets = ["10.7.0.0/24", "fd00:7::/64"]
            "#,
            &ov(),
        )
        .unwrap();
        assert_eq!(c.interfaces[1].name, "wg0");
        assert_eq!(c.max_clients, 200_000);
    }

    #[test]
    fn unknown_key_is_an_error_naming_it() {
        let e = Config::from_toml("max_client = 5\n", &ov()).unwrap_err().to_string();
        assert!(e.contains("max_client"), "{e}");
        let e = Config::from_toml("[[interface]]\nname=\"tun0\"\nlayer=\"l3\"\nsubnet=[]\n", &ov())
            .unwrap_err()
            .to_string();
        assert!(e.contains("subnet"), "{e}");
    }

    #[test]
    fn bad_subnets_are_rejected() {
        for s in ["10.8.0.0", "10.8.0.0/33", "banana", "10.8.0.1/24", "fd00::1/64"] {
            assert!(matches!(parse_subnet(s), Err(ConfigError::BadSubnet { .. })), "{s}");
        }
        assert!(parse_subnet("10.8.0.1/24").unwrap_err().to_string().contains("10.8.0.0/24"));
        assert!(parse_subnet(" 10.8.0.0/24 ").is_ok());
    }

    #[test]
    fn invalid_combinations() {
        let o = Overrides { tun: vec!["tun0".into()], ..ov() };
        assert!(matches!(Config::build(FileConfig::default(), &o), Err(ConfigError::NoSubnets(_))));
        assert!(matches!(Config::build(FileConfig::default(), &ov()), Err(ConfigError::NoInterfaces)));
        let o = Overrides { tun: vec!["tun0".into(), "tun0".into()], subnets: vec!["10.0.0.0/8".into()], ..ov() };
        assert!(matches!(Config::build(FileConfig::default(), &o), Err(ConfigError::DuplicateInterface(_))));
        let o =
            Overrides { tun: vec!["a-very-long-interface-name".into()], subnets: vec!["10.0.0.0/8".into()], ..ov() };
        assert!(matches!(Config::build(FileConfig::default(), &o), Err(ConfigError::BadInterfaceName(_))));
        let o =
            Overrides { tun: vec!["tun0".into()], subnets: vec!["10.0.0.0/8".into()], max_clients: Some(1), ..ov() };
        assert!(matches!(Config::build(FileConfig::default(), &o), Err(ConfigError::BadCapacity(1))));
    }

    #[test]
    fn steering_sections_parse_and_bad_rules_name_the_problem() {
        let c = Config::from_toml(
            r#"
[[interface]]
name = "tun0"
layer = "l3"
subnets = ["10.8.0.0/24"]
[[interface]]
name = "eth0"
layer = "l2"
[steer]
redirect_mark = 7
redirect_table = 100
bypass = ["192.0.2.0/24", "2001:db8::1"]
[[forward]]
proto = "tcp"
public_port = 8080
device = "10.8.0.2:3128"
[[forward]]
proto = "udp"
public_port = 8080
device = "10.8.0.2:53"
public_address = "203.0.113.7"
[[redirect]]
source = "10.8.0.0/24"
proxy_port = 12345
"#,
            &ov(),
        )
        .unwrap();
        assert_eq!(c.steer.policy, crate::steer::PolicyRoute { mark: 7, table: 100, priority: DEFAULT_RULE_PRIORITY });
        assert_eq!(c.steer.forward.len(), 2);
        assert_eq!(c.steer.redirect[0].source.to_string(), "10.8.0.0/24");
        assert_eq!(c.steer.bypass[1].to_string(), "2001:db8::1/128");
        assert!(c.steer.bypass_local);
        assert!(c.interfaces.iter().any(|i| i.name == "eth0" && i.subnets.is_empty()));

        let base = "[[interface]]\nname = \"tun0\"\nlayer = \"l3\"\nsubnets = [\"10.8.0.0/24\"]\n";
        for (extra, needle) in [
            ("[[forward]]\nproto = \"icmp\"\npublic_port = 1\ndevice = \"10.8.0.2:1\"\n", "icmp"),
            ("[[forward]]\nproto = \"tcp\"\npublic_port = 70000\ndevice = \"10.8.0.2:1\"\n", "70000"),
            ("[[forward]]\nproto = \"tcp\"\npublic_port = 80\ndevice = \"10.8.0.2\"\n", "10.8.0.2"),
            (
                "[[forward]]\nproto = \"tcp\"\npublic_port = 80\ndevice = \"10.8.0.2:1\"\n[[forward]]\nproto = \"tcp\"\npublic_port = 80\ndevice = \"10.8.0.3:1\"\n",
                "tcp/80",
            ),
            ("[[redirect]]\nsource = \"nope\"\nproxy_port = 1\n", "nope"),
            ("[steer]\nredirect_table = 254\n", "254"),
            ("[steer]\nredirect_mark = 0\n", "redirect_mark"),
            ("[steer]\nbypass = [\"x/1\"]\n", "x/1"),
        ] {
            let e = Config::from_toml(&format!("{base}{extra}"), &ov()).unwrap_err().to_string();
            assert!(e.contains(needle), "{extra}: {e}");
        }
    }

    #[test]
    fn identity_and_webhook_sections() {
        let dir = std::env::temp_dir().join(format!("tm-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let pw = dir.join("pw");
        std::fs::write(&pw, "s3cret\n").unwrap();
        let base = "[[interface]]\nname = \"tun0\"\nlayer = \"l3\"\nsubnets = [\"10.8.0.0/24\"]\n";
        let c = Config::from_toml(
            &format!(
                "{base}[identity]\nreconcile_interval_ms = 500\n\
                 [[openvpn]]\nname = \"udp\"\nprotocol = \"udp\"\nmanagement = \"127.0.0.1:7505\"\ninterface = \"tun0\"\npassword_file = {:?}\n\
                 [[openvpn]]\nname = \"tcp\"\nprotocol = \"tcp\"\nmanagement = \"unix:/run/ovpn-tcp.sock\"\n\
                 [[wireguard]]\ninterface = \"wg0\"\n\
                 [[webhook]]\nname = \"panel\"\nurl = \"http://127.0.0.1:9000/h\"\nsecret = \"0123456789abcdef\"\nevents = [\"reset\", \"device.offline\"]\n",
                pw.display().to_string()
            ),
            &ov(),
        )
        .unwrap();
        let i = &c.identity;
        assert_eq!(i.openvpn.len(), 2);
        assert_eq!(i.openvpn[0].password.as_deref(), Some("s3cret"));
        assert_eq!(i.openvpn[0].protocol, "openvpn-udp");
        assert_eq!(i.openvpn[1].addr, crate::identity::openvpn::mgmt::MgmtAddr::Unix("/run/ovpn-tcp.sock".into()));
        assert_eq!(i.openvpn[0].reconcile, std::time::Duration::from_millis(500));
        assert_eq!(i.openvpn_interfaces["udp"], "tun0");
        assert_eq!(i.wireguard, ["wg0"]);
        assert_eq!(c.webhooks[0].events, [crate::webhook::EventKind::Reset, crate::webhook::EventKind::DeviceOffline]);
        assert_eq!(c.webhooks[0].timeout, std::time::Duration::from_secs(5));
        for (extra, needle) in [
            ("[[openvpn]]\nname = \"u\"\nprotocol = \"sctp\"\nmanagement = \"127.0.0.1:1\"\n", "sctp"),
            ("[[openvpn]]\nname = \"u\"\nprotocol = \"udp\"\nmanagement = \"localhost\"\n", "localhost"),
            ("[[openvpn]]\nname = \"u\"\nprotocol = \"udp\"\nmanagement = \"unix:rel.sock\"\n", "absolute"),
            (
                "[[openvpn]]\nname = \"u\"\nprotocol = \"udp\"\nmanagement = \"127.0.0.1:1\"\npassword_file = \"/nonexistent/pw\"\n",
                "/nonexistent/pw",
            ),
            (
                "[[openvpn]]\nname = \"u\"\nprotocol = \"udp\"\nmanagement = \"127.0.0.1:1\"\n[[openvpn]]\nname = \"u\"\nprotocol = \"tcp\"\nmanagement = \"127.0.0.1:2\"\n",
                "twice",
            ),
            ("[[wireguard]]\ninterface = \"a/b\"\n", "a/b"),
            ("[[webhook]]\nname = \"p\"\nurl = \"ftp://x/y/z\"\nsecret = \"0123456789abcdef\"\n", "ftp://"),
            ("[[webhook]]\nname = \"p\"\nurl = \"http://x/y/z\"\nsecret = \"short\"\n", "16"),
            ("[[webhook]]\nname = \"p\"\nurl = \"http://x/y/z\"\n", "exactly one"),
            (
                "[[webhook]]\nname = \"p\"\nurl = \"http://x/y/z\"\nsecret = \"0123456789abcdef\"\nevents = [\"device.gone\"]\n",
                "device.gone",
            ),
            ("[identity]\nreconcile_interval_ms = 5\n", "reconcile_interval_ms"),
            ("[webhook]\n", "webhook"),
            (
                "[[webhook]]\nname = \"p\"\nurl = \"http://x/y/z\"\nsecret = \"0123456789abcdef\"\nmin_backoff_ms = 5000\nmax_backoff_secs = 1\n",
                "min_backoff_ms",
            ),
            (
                "[[openvpn]]\nname = \"u\"\nprotocol = \"udp\"\nmanagement = \"127.0.0.1:1\"\ninterface = \"tun0\"\n[[openvpn]]\nname = \"t\"\nprotocol = \"tcp\"\nmanagement = \"127.0.0.1:2\"\ninterface = \"tun0\"\n",
                "another",
            ),
        ] {
            let e = Config::from_toml(&format!("{base}{extra}"), &ov()).unwrap_err().to_string();
            assert!(e.contains(needle), "{extra}: {e}");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn the_deployed_example_is_valid() {
        let text = include_str!("../../deploy/tunmeter.toml");
        let c = Config::from_toml(text, &ov()).unwrap();
        assert_eq!(c.interfaces.len(), 3);
        assert_eq!(c.ledger.flush_interval_ms, 10_000);
        assert_eq!(c.identity.openvpn.len(), 2);
        assert_eq!(c.identity.wireguard, ["wg0"]);
    }

    #[test]
    fn ledger_and_api_settings() {
        let o = Overrides { tun: vec!["tun0".into()], subnets: vec!["10.0.0.0/8".into()], ..ov() };
        let c = Config::from_toml(
            "node_id = \"vpn-1\"\n[ledger]\ndatabase_url = \"postgres://u@h/db\"\nflush_interval_ms = 2000\n\
             [api]\nlisten = \"\"\nstream_interval_ms = 250\n",
            &o,
        )
        .unwrap();
        assert_eq!(c.node_id, "vpn-1");
        assert_eq!(c.ledger.database_url, "postgres://u@h/db");
        assert_eq!(c.ledger.flush_interval_ms, 2000);
        assert_eq!(c.api.listen, None);
        let c = Config::build(FileConfig::default(), &Overrides { state_dir: Some("/x".into()), ..o.clone() }).unwrap();
        assert_eq!(c.ledger.database_url, "sqlite:///x/tunmeter.db?mode=rwc");
        assert_eq!(c.api.listen, Some("127.0.0.1:9107".parse().unwrap()));
        for (text, what) in [
            ("node_id = \"a b\"", "node_id"),
            ("[api]\nlisten = \"localhost\"", "listen"),
            ("[api]\nstream_interval_ms = 100", "stream_interval_ms"),
            ("[ledger]\npoll_interval_ms = 0", "poll_interval_ms"),
            ("[ledger]\nbogus = 1", "bogus"),
        ] {
            let e = Config::from_toml(text, &o).unwrap_err().to_string();
            assert!(e.contains(what), "{text}: {e}");
        }
        // Commands that need no interfaces can load the settings alone.
        assert!(Config::build_inner(FileConfig::default(), &ov(), false).is_ok());
    }
}
