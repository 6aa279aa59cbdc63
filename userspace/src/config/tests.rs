//! Config parsing and validation: flags alone, files, every section, and the errors that name
//! the bad key or value.

use super::*;
use crate::types::Layer;

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
    assert!(!c.count_wire_bytes, "skb->len accounting by default");
    assert_eq!(c.pin_dir, PathBuf::from(DEFAULT_PIN_DIR));
}

#[test]
fn toml_file_with_interfaces() {
    let c = Config::from_toml(
        r#"
        pin_dir = "/sys/fs/bpf/x"
        max_clients = 200000
        count_wire_bytes = true
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
    assert!(c.count_wire_bytes);
}

#[test]
fn unknown_key_is_an_error_naming_it() {
    let e = Config::from_toml("max_client = 5\n", &ov()).unwrap_err().to_string();
    assert!(e.contains("max_client"), "{e}");
    let e =
        Config::from_toml("[[interface]]\nname=\"tun0\"\nlayer=\"l3\"\nsubnet=[]\n", &ov()).unwrap_err().to_string();
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
    let o = Overrides { tun: vec!["a-very-long-interface-name".into()], subnets: vec!["10.0.0.0/8".into()], ..ov() };
    assert!(matches!(Config::build(FileConfig::default(), &o), Err(ConfigError::BadInterfaceName(_))));
    let o = Overrides { tun: vec!["tun0".into()], subnets: vec!["10.0.0.0/8".into()], max_clients: Some(1), ..ov() };
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
    assert_eq!(
        c.steer.policy,
        crate::types::PolicyRoute { mark: 7, table: 100, priority: crate::types::DEFAULT_RULE_PRIORITY }
    );
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
        ("[[forward]]\nproto = \"tcp\"\npublic_port = 80\ndevice = \"127.0.0.1:1\"\n", "loopback"),
        (
            "[[forward]]\nproto = \"tcp\"\npublic_port = 80\ndevice = \"10.7.0.2:1\"\n",
            "10.7.0.2 is outside every client subnet (10.8.0.0/24)",
        ),
        ("[[redirect]]\nsource = \"0.0.0.0/0\"\nproxy_port = 1\n", "0.0.0.0/0 matches every address"),
        ("[[redirect]]\nsource = \"10.8.0.5\"\nproxy_port = 1\nallow = [\"tcp\"]\n", "\"tcp\""),
        ("[[redirect]]\nsource = \"10.8.0.5\"\nproxy_port = 1\nunparsed = \"maybe\"\n", "maybe"),
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
    assert_eq!(i.openvpn[0].protocol, crate::types::SessionProtocol::OpenvpnUdp);
    assert_eq!(i.openvpn[1].addr, MgmtAddr::Unix("/run/ovpn-tcp.sock".into()));
    assert_eq!(i.openvpn[0].reconcile, std::time::Duration::from_millis(500));
    assert_eq!(i.openvpn_interfaces["udp"], "tun0");
    assert_eq!(i.wireguard, ["wg0"]);
    assert_eq!(c.webhooks[0].events, [crate::types::EventKind::Reset, crate::types::EventKind::DeviceOffline]);
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
    let text = include_str!("../../../deploy/tunmeter.toml");
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

#[test]
fn out_of_range_values_are_refused_naming_their_key() {
    let o = Overrides { tun: vec!["tun0".into()], subnets: vec!["10.0.0.0/8".into()], ..ov() };
    for (text, key) in [
        ("reconcile_interval_ms = 5", "reconcile_interval_ms"),
        ("reconcile_interval_ms = 3600000", "reconcile_interval_ms"),
        ("[identity]\nreconcile_interval_ms = 5", "[identity] reconcile_interval_ms"),
        ("[identity]\nmanagement_grace_secs = 100000", "[identity] management_grace_secs"),
        ("[ledger]\nflush_interval_ms = 50", "[ledger] flush_interval_ms"),
        ("[ledger]\nretention_hour_days = 100000", "[ledger] retention_hour_days"),
        ("[ledger]\ndrift_threshold_packets = 0", "[ledger] drift_threshold_packets"),
        ("[ledger]\ndrift_polls = 0", "[ledger] drift_polls"),
        ("[ledger]\nmax_pending_rows = 10", "[ledger] max_pending_rows"),
        ("[api]\nmetrics_max_clients = 5000000", "[api] metrics_max_clients"),
        ("[api]\noffline_after_secs = 0", "[api] offline_after_secs"),
        ("[api]\nmax_connections = 0", "[api] max_connections"),
        ("[api]\nmax_stream_subscribers = 100000", "[api] max_stream_subscribers"),
        ("[steer]\nredirect_mark = 0", "[steer] redirect_mark"),
        ("[steer]\nmax_forward_flows = 100", "[steer] max_forward_flows"),
        ("[steer]\nmax_forward_flows = 100000000", "[steer] max_forward_flows"),
    ] {
        let e = Config::from_toml(text, &o).unwrap_err();
        assert!(matches!(e, ConfigError::OutOfRange { .. }), "{text}: {e}");
        let msg = e.to_string();
        assert!(msg.starts_with(key) && msg.contains("must be between"), "{text}: {msg}");
    }
    // In range: taken as written, never adjusted.
    let c = Config::from_toml("reconcile_interval_ms = 100\n[ledger]\nretention_day_days = 36500", &o).unwrap();
    assert_eq!((c.reconcile_interval_ms, c.ledger.retention_day_days), (100, 36_500));
    for text in ["[api]\nhook_group = \"a b\"", "[api]\nhook_socket = \"relative.sock\""] {
        let msg = Config::from_toml(text, &o).unwrap_err().to_string();
        assert!(msg.starts_with("[api] hook_"), "{text}: {msg}");
    }
    let a = Config::from_toml("", &o).unwrap().api;
    assert_eq!((a.max_connections, a.max_stream_subscribers, a.hook_socket), (1024, 64, None), "defaults");
    let l = Config::from_toml("", &o).unwrap().ledger;
    assert_eq!((l.drift_threshold_packets, l.drift_polls, l.max_pending_rows), (64, 3, 1_000_000), "defaults");
    assert_eq!(Config::from_toml("", &o).unwrap().steer.max_forward_flows, 262_144, "default");
    assert_eq!(Config::from_toml("[steer]\nmax_forward_flows = 4096", &o).unwrap().steer.max_forward_flows, 4096);
}

#[test]
fn a_world_readable_secret_file_is_warned_about() {
    use std::os::unix::fs::PermissionsExt as _;
    let path = std::env::temp_dir().join(format!("tmtest-secret-mode-{}", std::process::id()));
    std::fs::write(&path, "0123456789abcdef\n").unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    let w = secret_mode_warning("webhook secret file", &path).expect("0644 is warned about");
    assert!(w.contains("readable by every local user") && w.contains("644") && w.contains("chmod o-rwx"), "{w}");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
    assert_eq!(secret_mode_warning("webhook secret file", &path), None, "group read is fine");
    let text = format!(
        "[[webhook]]\nname = \"p\"\nurl = \"https://hooks.example.com/x\"\nsecret_file = \"{}\"\nallow_private = true\n",
        path.display()
    );
    let c = Config::from_toml(
        &format!("{text}\n[[interface]]\nname = \"tun0\"\nlayer = \"l3\"\nsubnets = [\"10.8.0.0/24\"]\n"),
        &ov(),
    );
    let _ = std::fs::remove_file(&path);
    let c = c.unwrap();
    assert!(c.webhooks[0].allow_private && c.webhooks[0].secret == b"0123456789abcdef");
}

#[test]
fn forced_rules_and_redirect_policies() {
    let c = Config::from_toml(
        r#"
[[interface]]
name = "tun0"
layer = "l3"
subnets = ["10.8.0.0/24"]
[[forward]]
proto = "tcp"
public_port = 22
device = "127.0.0.1:2222"
force = true
[[forward]]
proto = "tcp"
public_port = 8080
device = "10.8.0.2:80"
[[redirect]]
source = "0.0.0.0/0"
proxy_port = 12345
force = true
unparsed = "pass"
allow = ["icmp", "gre"]
[[redirect]]
source = "10.8.0.5"
proxy_port = 12345
"#,
        &ov(),
    )
    .unwrap();
    assert_eq!(c.steer.forced, [(crate::types::Proto::Tcp, 22)].into_iter().collect());
    let (open, plain) = (&c.steer.redirect[0], &c.steer.redirect[1]);
    assert_eq!((open.unparsed, open.allow.names()), (crate::types::Unparsed::Pass, vec!["icmp".into(), "gre".into()]));
    assert_eq!((plain.unparsed, plain.allow.names()), (crate::types::Unparsed::Drop, Vec::<String>::new()));
}
