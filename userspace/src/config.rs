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
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    pin_dir: Option<PathBuf>,
    state_dir: Option<PathBuf>,
    max_clients: Option<u32>,
    attach_mode: Option<AttachMode>,
    reconcile_interval_ms: Option<u64>,
    #[serde(default, rename = "interface")]
    interfaces: Vec<FileInterface>,
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
}

impl Config {
    /// Read `path` (a missing file is fine only when it is the default path and flags name
    /// the interfaces), apply `ov`, validate.
    pub fn load(path: &Path, explicit: bool, ov: &Overrides) -> Result<Config, ConfigError> {
        let file = match std::fs::read_to_string(path) {
            Ok(text) => parse_file(path, &text)?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !explicit => FileConfig::default(),
            Err(source) => return Err(ConfigError::Read { path: path.into(), source }),
        };
        Self::build(file, ov)
    }

    /// Parse a TOML text (used by tests and `load`).
    pub fn from_toml(text: &str, ov: &Overrides) -> Result<Config, ConfigError> {
        Self::build(parse_file(Path::new("<inline>"), text)?, ov)
    }

    fn build(file: FileConfig, ov: &Overrides) -> Result<Config, ConfigError> {
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
            if i.subnets.is_empty() {
                return Err(ConfigError::NoSubnets(i.name.clone()));
            }
        }
        if interfaces.is_empty() {
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
        Ok(Config {
            interfaces,
            pin_dir,
            state_dir: ov.state_dir.clone().or(file.state_dir).unwrap_or_else(|| DEFAULT_STATE_DIR.into()),
            max_clients,
            attach_mode: ov.attach_mode.or(file.attach_mode).unwrap_or_default(),
            reconcile_interval_ms: file.reconcile_interval_ms.unwrap_or(1000).clamp(100, 60_000),
        })
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
}
