//! Parsing `status 3` output into the CLIENT_LIST rows, each malformed row skipped with the
//! reason, so that one bad line never hides the other clients.
//!
//! `status 3` (OpenVPN 2.6) is tab separated, `status 2` the same with commas; both are
//! accepted. Column positions are taken from the `HEADER CLIENT_LIST` line when present, so
//! older or newer column orders still parse; without a header the 2.6 order is assumed. Lines
//! end in CRLF on the management interface; a trailing CR is ignored. Real captures from
//! OpenVPN 2.6.14 are in `testdata/`.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// One CLIENT_LIST row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OvpnClient {
    pub common_name: String,
    /// None when OpenVPN prints UNDEF (no auth-user-pass).
    pub username: Option<String>,
    /// As printed by OpenVPN 2.6: "ip:port" for IPv4 (TCP and UDP alike, also for IPv4
    /// clients of a dual-stack `udp6`/`tcp6-server` instance), and the bare address without a
    /// port for IPv6 ("fd99::2"). See `hook::real_address`.
    pub real_address: String,
    pub virtual_v4: Option<Ipv4Addr>,
    pub virtual_v6: Option<Ipv6Addr>,
    pub bytes_received: u64,
    pub bytes_sent: u64,
    pub connected_since_unix: u64,
    pub client_id: u64,
    pub peer_id: Option<u64>,
}

impl OvpnClient {
    /// The VPN addresses (v4 first).
    pub fn addresses(&self) -> Vec<IpAddr> {
        self.virtual_v4.map(IpAddr::V4).into_iter().chain(self.virtual_v6.map(IpAddr::V6)).collect()
    }
}

/// A line that could not be used, and why (logged and skipped by the caller).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skipped {
    pub line: String,
    pub reason: String,
}

impl Skipped {
    pub(super) fn new(line: &str, reason: impl Into<String>) -> Self {
        Skipped { line: line.to_string(), reason: reason.into() }
    }
}

/// Where each CLIENT_LIST field is (indexes into the row, the "CLIENT_LIST" tag being 0).
#[derive(Debug, Clone, Copy)]
struct Columns {
    common_name: usize,
    real_address: usize,
    virtual_v4: usize,
    virtual_v6: Option<usize>,
    bytes_received: usize,
    bytes_sent: usize,
    connected_since_unix: usize,
    username: Option<usize>,
    client_id: usize,
    peer_id: Option<usize>,
    /// A row needs at least this many fields.
    min_fields: usize,
}

impl Columns {
    /// OpenVPN 2.6: CLIENT_LIST, Common Name, Real Address, Virtual Address, Virtual IPv6
    /// Address, Bytes Received, Bytes Sent, Connected Since, Connected Since (time_t),
    /// Username, Client ID, Peer ID, Data Channel Cipher.
    const V26: Columns = Columns {
        common_name: 1,
        real_address: 2,
        virtual_v4: 3,
        virtual_v6: Some(4),
        bytes_received: 5,
        bytes_sent: 6,
        connected_since_unix: 8,
        username: Some(9),
        client_id: 10,
        peer_id: Some(11),
        min_fields: 12,
    };

    /// From the `HEADER CLIENT_LIST ...` fields (the first being "HEADER").
    fn from_header(fields: &[&str]) -> Result<Columns, String> {
        // fields[0] = "HEADER", fields[1] = "CLIENT_LIST": row index i = header index i - 1.
        let find = |name: &str| fields.iter().skip(2).position(|f| *f == name).map(|p| p + 1);
        let need = |name: &str| find(name).ok_or_else(|| format!("the header has no {name:?} column"));
        let mut c = Columns {
            common_name: need("Common Name")?,
            real_address: need("Real Address")?,
            virtual_v4: need("Virtual Address")?,
            virtual_v6: find("Virtual IPv6 Address"),
            bytes_received: need("Bytes Received")?,
            bytes_sent: need("Bytes Sent")?,
            connected_since_unix: need("Connected Since (time_t)")?,
            username: find("Username"),
            client_id: need("Client ID")?,
            peer_id: find("Peer ID"),
            min_fields: 0,
        };
        c.min_fields = [
            Some(c.common_name),
            Some(c.real_address),
            Some(c.virtual_v4),
            c.virtual_v6,
            Some(c.bytes_received),
            Some(c.bytes_sent),
            Some(c.connected_since_unix),
            c.username,
            Some(c.client_id),
            c.peer_id,
        ]
        .into_iter()
        .flatten()
        .max()
        .unwrap_or(0)
            + 1;
        Ok(c)
    }
}

/// Split a status line on tabs (`status 3`) or commas (`status 2`), after the tag.
fn split_fields(line: &str) -> Vec<&str> {
    let sep = if line.contains('\t') { '\t' } else { ',' };
    line.split(sep).collect()
}

/// Parse a whole `status 3` reply (lines up to and including END). Rows that do not parse are
/// returned in `.1`, never fatal.
pub fn parse_status(text: &str) -> (Vec<OvpnClient>, Vec<Skipped>) {
    let mut clients = Vec::new();
    let mut skipped = Vec::new();
    let mut cols = Columns::V26;
    for raw in text.lines() {
        let line = raw.strip_suffix('\r').unwrap_or(raw);
        if line.trim().is_empty() {
            continue;
        }
        let fields = split_fields(line);
        match fields[0] {
            "END" => break,
            "TITLE" | "TIME" | "ROUTING_TABLE" | "GLOBAL_STATS" => {}
            "HEADER" => {
                if fields.get(1) == Some(&"CLIENT_LIST") {
                    match Columns::from_header(&fields) {
                        Ok(c) => cols = c,
                        Err(reason) => skipped.push(Skipped::new(line, reason)),
                    }
                }
            }
            "CLIENT_LIST" => match parse_row(&fields, &cols) {
                Ok(c) => clients.push(c),
                Err(reason) => skipped.push(Skipped::new(line, reason)),
            },
            _ => skipped.push(Skipped::new(
                line,
                "not a status 3 line (expected TITLE, TIME, HEADER, CLIENT_LIST, ROUTING_TABLE, GLOBAL_STATS or END)",
            )),
        }
    }
    (clients, skipped)
}

fn parse_row(fields: &[&str], c: &Columns) -> Result<OvpnClient, String> {
    if fields.len() < c.min_fields {
        return Err(format!("CLIENT_LIST row has {} fields, expected at least {}", fields.len(), c.min_fields));
    }
    let num = |i: usize, what: &str| -> Result<u64, String> {
        fields[i].parse::<u64>().map_err(|_| format!("{what} {:?} is not a number", fields[i]))
    };
    let common_name = fields[c.common_name].to_string();
    let real_address = fields[c.real_address].to_string();
    if real_address.is_empty() {
        return Err("empty Real Address".into());
    }
    let virtual_v4 = match fields[c.virtual_v4] {
        "" => None,
        s => Some(s.parse::<Ipv4Addr>().map_err(|_| format!("Virtual Address {s:?} is not an IPv4 address"))?),
    };
    let virtual_v6 = match c.virtual_v6.map(|i| fields[i]) {
        None | Some("") => None,
        Some(s) => {
            Some(s.parse::<Ipv6Addr>().map_err(|_| format!("Virtual IPv6 Address {s:?} is not an IPv6 address"))?)
        }
    };
    let username = match c.username.map(|i| fields[i]) {
        None | Some("UNDEF") | Some("") => None,
        Some(s) => Some(s.to_string()),
    };
    let peer_id = match c.peer_id.map(|i| fields[i]) {
        None | Some("UNDEF") | Some("") => None,
        Some(_) => Some(num(c.peer_id.expect("checked"), "Peer ID")?),
    };
    Ok(OvpnClient {
        common_name,
        username,
        real_address,
        virtual_v4,
        virtual_v6,
        bytes_received: num(c.bytes_received, "Bytes Received")?,
        bytes_sent: num(c.bytes_sent, "Bytes Sent")?,
        connected_since_unix: num(c.connected_since_unix, "Connected Since (time_t)")?,
        client_id: num(c.client_id, "Client ID")?,
        peer_id,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const UDP: &str = include_str!("testdata/status3-udp.txt");
    const TCP: &str = include_str!("testdata/status3-tcp.txt");
    const UDP6: &str = include_str!("testdata/status3-udp6.txt");
    const EMPTY: &str = include_str!("testdata/status3-empty.txt");
    const TCP_V2: &str = include_str!("testdata/status2-tcp.txt");

    #[test]
    fn real_udp_capture() {
        assert!(UDP.contains("\r\n"), "the fixture keeps the CRLF of the management interface");
        let (clients, skipped) = parse_status(UDP);
        assert!(skipped.is_empty(), "{skipped:?}");
        assert_eq!(
            clients,
            vec![OvpnClient {
                common_name: "client1".into(),
                username: Some("alice".into()),
                real_address: "10.99.0.2:38937".into(),
                virtual_v4: Some("10.8.0.2".parse().unwrap()),
                virtual_v6: Some("fd00:8::1000".parse().unwrap()),
                bytes_received: 2080,
                bytes_sent: 2096,
                connected_since_unix: 1795449874,
                client_id: 0,
                peer_id: Some(0),
            }]
        );
        assert_eq!(
            clients[0].addresses(),
            vec!["10.8.0.2".parse::<IpAddr>().unwrap(), "fd00:8::1000".parse::<IpAddr>().unwrap()]
        );
    }

    #[test]
    fn real_tcp_capture_with_ipv6_transport_and_undef_username() {
        let (clients, skipped) = parse_status(TCP);
        assert!(skipped.is_empty(), "{skipped:?}");
        assert_eq!(clients.len(), 2);
        assert_eq!(clients[0].common_name, "client2");
        assert_eq!(clients[0].real_address, "10.99.0.2:43062");
        assert_eq!(clients[0].username, None);
        assert_eq!(clients[0].virtual_v4, Some("10.9.0.2".parse().unwrap()));
        assert_eq!(clients[1].common_name, "client1");
        // IPv6 real addresses are printed without a port.
        assert_eq!(clients[1].real_address, "fd99::2");
        assert_eq!(clients[1].client_id, 1);
        assert_eq!(clients[1].peer_id, Some(1));
        assert_eq!(clients[1].virtual_v6, Some("fd00:9::1001".parse().unwrap()));
    }

    #[test]
    fn real_udp6_capture() {
        let (clients, skipped) = parse_status(UDP6);
        assert!(skipped.is_empty(), "{skipped:?}");
        assert_eq!(clients.len(), 1);
        assert_eq!(clients[0].real_address, "fd99::2");
        assert_eq!(clients[0].username.as_deref(), Some("alice"));
    }

    #[test]
    fn empty_list() {
        let (clients, skipped) = parse_status(EMPTY);
        assert!(clients.is_empty());
        assert!(skipped.is_empty(), "{skipped:?}");
    }

    #[test]
    fn comma_variant_matches_tab_variant() {
        let (v2, skipped) = parse_status(TCP_V2);
        assert!(skipped.is_empty(), "{skipped:?}");
        let (v3, _) = parse_status(TCP);
        assert_eq!(v2, v3);
    }

    #[test]
    fn header_decides_column_order() {
        // A reordered header (as a future version might print) still maps by name.
        let text = "HEADER\tCLIENT_LIST\tCommon Name\tVirtual Address\tReal Address\tBytes Received\tBytes Sent\t\
                    Connected Since (time_t)\tClient ID\n\
                    CLIENT_LIST\tc\t10.8.0.9\t1.2.3.4:5\t1\t2\t3\t4\nEND\n";
        let (clients, skipped) = parse_status(text);
        assert!(skipped.is_empty(), "{skipped:?}");
        assert_eq!(clients[0].real_address, "1.2.3.4:5");
        assert_eq!(clients[0].virtual_v4, Some("10.8.0.9".parse().unwrap()));
        assert_eq!((clients[0].username.clone(), clients[0].peer_id, clients[0].virtual_v6), (None, None, None));
        // A header without a needed column is reported (and the default order kept).
        let (_, skipped) = parse_status("HEADER\tCLIENT_LIST\tCommon Name\nEND\n");
        assert!(skipped[0].reason.contains("Real Address"), "{skipped:?}");
    }

    #[test]
    fn malformed_rows_are_skipped_with_a_reason() {
        let good = "CLIENT_LIST\tok\t1.2.3.4:1\t10.8.0.2\t\t1\t2\t2026-01-01 00:00:00\t3\tUNDEF\t4\t5\tAES-256-GCM";
        let text = [
            "CLIENT_LIST\tshort\t1.2.3.4:1",
            "CLIENT_LIST\tbadbytes\t1.2.3.4:1\t10.8.0.2\t\tmany\t2\tx\t3\tUNDEF\t4\t5\tc",
            "CLIENT_LIST\tbadip\t1.2.3.4:1\t10.8.0.300\t\t1\t2\tx\t3\tUNDEF\t4\t5\tc",
            "CLIENT_LIST\tbadip6\t1.2.3.4:1\t10.8.0.3\tzz::\t1\t2\tx\t3\tUNDEF\t4\t5\tc",
            "CLIENT_LIST\tnoreal\t\t10.8.0.3\t\t1\t2\tx\t3\tUNDEF\t4\t5\tc",
            "CLIENT_LIST\tbadcid\t1.2.3.4:1\t10.8.0.3\t\t1\t2\tx\t3\tUNDEF\t-4\t5\tc",
            "garbage line",
            good,
            "END",
            "CLIENT_LIST\tafter-end",
        ]
        .join("\r\n");
        let (clients, skipped) = parse_status(&text);
        assert_eq!(clients.len(), 1);
        assert_eq!(clients[0].common_name, "ok");
        assert_eq!(clients[0].virtual_v6, None, "an empty IPv6 column is None");
        assert_eq!(clients[0].username, None);
        let reasons: Vec<&str> = skipped.iter().map(|s| s.reason.as_str()).collect();
        assert_eq!(skipped.len(), 7, "{reasons:?}");
        assert!(reasons[0].contains("fields"), "{reasons:?}");
        assert!(reasons[1].contains("Bytes Received"), "{reasons:?}");
        assert!(reasons[2].contains("Virtual Address"), "{reasons:?}");
        assert!(reasons[3].contains("IPv6"), "{reasons:?}");
        assert!(reasons[4].contains("Real Address"), "{reasons:?}");
        assert!(reasons[5].contains("Client ID"), "{reasons:?}");
        assert!(reasons[6].contains("not a status 3 line"), "{reasons:?}");
        assert_eq!(skipped[0].line, "CLIENT_LIST\tshort\t1.2.3.4:1");
    }

    #[test]
    fn never_panics_on_odd_input() {
        for text in ["", "\n\n", "\t\t\t", ",,,", "HEADER", "HEADER\tCLIENT_LIST", "CLIENT_LIST", "\u{0}\u{ff}\r"] {
            let _ = parse_status(text);
        }
    }
}
