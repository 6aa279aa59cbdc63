//! Daemon configuration: a TOML file plus command-line flags for the common case, validated
//! into `Config`. One submodule per section; this module holds the top-level keys, the errors
//! and the loading. Depends only on `types`: every layer above reads its settings from here.

mod api;
mod identity;
mod interfaces;
mod ledger;
mod steer;
#[cfg(test)]
mod tests;
mod webhooks;

use std::path::{Path, PathBuf};

use serde::Deserialize;

pub use api::{ApiSettings, DEFAULT_API_LISTEN};
pub use identity::{IdentitySettings, MgmtAddr, OpenvpnInstance};
pub use interfaces::{InterfaceConfig, parse_subnet, validate_ifname};
pub use ledger::{LedgerSettings, default_url};
pub use steer::SteerSettings;
pub use webhooks::{Endpoint, redact_url};

use crate::types::AttachMode;

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
    Rule(#[from] crate::types::RuleError),
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
    #[error("{0}")]
    Invalid(String),
}

/// The validated configuration the daemon runs with.
#[derive(Debug, Clone)]
pub struct Config {
    pub interfaces: Vec<InterfaceConfig>,
    pub pin_dir: PathBuf,
    pub state_dir: PathBuf,
    pub max_clients: u32,
    /// Charge GSO/GRO packets with their segments' wire bytes (the `WIRE_BYTES` load-time global).
    pub count_wire_bytes: bool,
    pub attach_mode: AttachMode,
    /// Milliseconds between reconciliations of attachments (safety net behind link events).
    pub reconcile_interval_ms: u64,
    /// Names this server in the ledger (several servers can share one PostgreSQL).
    pub node_id: String,
    pub ledger: LedgerSettings,
    pub api: ApiSettings,
    pub steer: SteerSettings,
    pub identity: IdentitySettings,
    pub webhooks: Vec<Endpoint>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    pin_dir: Option<PathBuf>,
    state_dir: Option<PathBuf>,
    max_clients: Option<u32>,
    count_wire_bytes: Option<bool>,
    attach_mode: Option<AttachMode>,
    reconcile_interval_ms: Option<u64>,
    node_id: Option<String>,
    #[serde(default)]
    ledger: ledger::FileLedger,
    #[serde(default)]
    api: api::FileApi,
    #[serde(default, rename = "interface")]
    interfaces: Vec<interfaces::FileInterface>,
    #[serde(default)]
    steer: steer::FileSteer,
    #[serde(default)]
    forward: Vec<steer::FileForward>,
    #[serde(default)]
    redirect: Vec<steer::FileRedirect>,
    #[serde(default)]
    identity: identity::FileIdentity,
    #[serde(default)]
    openvpn: Vec<identity::FileOpenvpn>,
    #[serde(default)]
    wireguard: Vec<identity::FileWireguard>,
    #[serde(default)]
    webhook: Vec<webhooks::FileWebhook>,
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

fn read_secret(what: &'static str, path: &Path) -> Result<String, ConfigError> {
    if let Some(warning) = secret_mode_warning(what, path) {
        tracing::warn!("{warning}");
    }
    std::fs::read_to_string(path)
        .map(|s| s.trim_end_matches(['\r', '\n']).to_string())
        .map_err(|source| ConfigError::ReadSecret { what, path: path.into(), source })
}

/// A warning if the secret file at `path` is readable by other users (mode o+r). Group read is
/// fine: `root:tunmeter 0640` is how the service user reads a file it must not change.
pub fn secret_mode_warning(what: &str, path: &Path) -> Option<String> {
    use std::os::unix::fs::PermissionsExt as _;
    let mode = std::fs::metadata(path).ok()?.permissions().mode();
    (mode & 0o004 != 0).then(|| {
        format!(
            "{what} {} is readable by every local user (mode {:o}): `chmod o-rwx {}`",
            path.display(),
            mode & 0o777,
            path.display()
        )
    })
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
        // Interfaces from the file have their own subnets; --subnet applies to --tun/--egress.
        let interfaces = interfaces::build(file.interfaces, ov, need_interfaces)?;
        let client_subnets: Vec<ipnet::IpNet> = interfaces.iter().flat_map(|i| i.subnets.iter().copied()).collect();
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
        Ok(Config {
            ledger: ledger::build(file.ledger, ov, &state_dir)?,
            api: api::build(file.api, ov)?,
            steer: steer::build(file.steer, &file.forward, &file.redirect, need_interfaces.then_some(&client_subnets))?,
            identity: identity::build(file.identity, file.openvpn, file.wireguard)?,
            webhooks: webhooks::build(file.webhook)?,
            interfaces,
            pin_dir,
            state_dir,
            max_clients,
            count_wire_bytes: file.count_wire_bytes.unwrap_or(false),
            attach_mode: ov.attach_mode.or(file.attach_mode).unwrap_or_default(),
            reconcile_interval_ms: ranged(
                "reconcile_interval_ms",
                file.reconcile_interval_ms.unwrap_or(1000),
                100,
                60_000,
            )?,
            node_id,
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
