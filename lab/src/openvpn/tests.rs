//! Unit tests of the OpenVPN lab's configuration checks and of its `status 3` parsing, which
//! need neither root nor a running OpenVPN.

use super::*;

#[test]
fn demo_config_alternates_transports() {
    let c = OvpnLabConfig::demo("x", 12);
    assert_eq!(c.clients[0].name, "alice");
    assert_eq!(c.clients[0].transport, Transport::Udp);
    assert_eq!(c.clients[1].transport, Transport::Tcp);
    assert_eq!(c.clients[3].username, "dave");
    assert_eq!(c.clients[10].name, "client11");
    c.validate().unwrap();
}

#[test]
fn rejects_bad_configs() {
    let mut c = OvpnLabConfig::demo("x", 2);
    c.clients[1].name = "alice".into();
    assert!(c.validate().is_err());
    let mut c = OvpnLabConfig::demo("x", 2);
    c.clients[0].password = "has space".into();
    assert!(c.validate().is_err());
    let mut c = OvpnLabConfig::demo("x", 1);
    c.hook = Some("/bin/echo \"x\"".into());
    assert!(c.validate().is_err());
    assert!(OvpnLabConfig::demo("BAD", 1).validate().is_err());
    assert!(OvpnLabConfig::demo("x", MAX_CLIENTS + 1).validate().is_err());
    assert!("quic".parse::<Transport>().is_err());
    assert_eq!("tcp".parse::<Transport>().unwrap(), Transport::Tcp);
}

#[test]
fn parses_status_3() {
    let text = "TITLE\tOpenVPN 2.6.14\nTIME\t2026-01-01 00:00:00\t1767225600\n\
HEADER\tCLIENT_LIST\tCommon Name\tReal Address\tVirtual Address\tVirtual IPv6 Address\tBytes Received\tBytes Sent\tConnected Since\tConnected Since (time_t)\tUsername\tClient ID\tPeer ID\tData Channel Cipher\n\
CLIENT_LIST\talice\t172.30.1.2:40000\t10.8.0.2\tfd00:8::2\t3000\t4000\t2026-01-01 00:00:00\t1767225600\talice-user\t0\t0\tAES-256-GCM\n\
HEADER\tROUTING_TABLE\tVirtual Address\tCommon Name\tReal Address\tLast Ref\tLast Ref (time_t)\n\
ROUTING_TABLE\t10.8.0.2\talice\t172.30.1.2:40000\t2026-01-01 00:00:00\t1767225600\nEND\n";
    let c = parse_status_clients(text);
    assert_eq!(c.len(), 1);
    assert_eq!(c[0].common_name, "alice");
    assert_eq!(c[0].username, "alice-user");
    assert_eq!(c[0].virtual_v4, "10.8.0.2");
    assert_eq!(c[0].virtual_v6, "fd00:8::2");
    assert_eq!((c[0].bytes_received, c[0].bytes_sent), (3000, 4000));
}

#[test]
fn transports_have_distinct_resources() {
    assert_eq!(Transport::Udp.server_dev(), "tun0");
    assert_eq!(Transport::Tcp.server_dev(), "tun1");
    assert_eq!(Transport::Tcp.server_v4(), Ipv4Addr::new(10, 8, 100, 1));
    assert_eq!(Transport::Tcp.server_v6().to_string(), "fd00:8:100::1");
    assert_eq!(Transport::Udp.server_v6().to_string(), "fd00:8::1");
}

#[test]
fn daemon_config_names_both_instances() {
    let c = daemon_config(true);
    assert!(
        c.starts_with("[[interface]]\nname = \"tun0\"\nlayer = \"l3\"\nsubnets = [\"10.8.0.0/24\", \"fd00:8::/64\"]\n"),
        "{c}"
    );
    assert!(c.contains("subnets = [\"10.8.100.0/24\", \"fd00:8:100::/64\"]"), "{c}");
    assert!(
        c.contains(
            "[[openvpn]]\nname = \"tcp\"\nprotocol = \"tcp\"\nmanagement = \"127.0.0.1:7506\"\ninterface = \"tun1\"\n"
        ),
        "{c}"
    );
    assert!(!daemon_config(false).contains("[[openvpn]]"));
}
