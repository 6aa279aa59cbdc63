//! Comparing a program's output with the expected packet: byte differences named by header
//! field, hex dumps, checksum problems, and fragment reassembly.

use super::*;

pub(super) fn hex(b: &[u8]) -> String {
    let mut s = String::new();
    for (i, c) in b.chunks(16).enumerate() {
        s.push_str(&format!("  {:04x}:", i * 16));
        for x in c {
            s.push_str(&format!(" {x:02x}"));
        }
        s.push('\n');
    }
    s
}

/// Name of the header field at frame offset `off` of an Ethernet + IPv4 (IHL 5) frame.
pub(super) fn field_name(frame: &[u8], off: usize) -> String {
    if off < ETH {
        return "ethernet".into();
    }
    let ip = &frame[ETH..];
    let o = off - ETH;
    let ihl = checksum::ipv4_ihl(ip).unwrap_or(20);
    let name = match o {
        0 => "ip ver/ihl",
        2 | 3 => "ip total length",
        4 | 5 => "ip id",
        6 | 7 => "ip frag",
        10 | 11 => "ip checksum",
        12..=15 => "ip src",
        16..=19 => "ip dst",
        _ if o < ihl => "ip header",
        _ => {
            let l = o - ihl;
            let frag_off = u16::from_be_bytes([ip[6], ip[7]]) & 0x1fff;
            match (ip[9], l, frag_off) {
                (_, _, f) if f != 0 => "fragment payload",
                (6 | 17, 0 | 1, _) => "l4 sport",
                (6 | 17, 2 | 3, _) => "l4 dport",
                (6, 16 | 17, _) => "tcp checksum",
                (17, 6 | 7, _) => "udp checksum",
                (1, 2 | 3, _) => "icmp checksum",
                (1, 8..=27, _) => match l - 8 {
                    10 | 11 => "inner ip checksum",
                    12..=15 => "inner ip src",
                    16..=19 => "inner ip dst",
                    _ => "inner ip header",
                },
                (1, 28 | 29, _) => "inner l4 sport",
                (1, 30 | 31, _) => "inner l4 dport",
                (1, 34 | 35, _) => "inner udp checksum",
                (1, 44 | 45, _) => "inner tcp checksum",
                _ => "l4/payload",
            }
        }
    };
    name.into()
}

pub(super) fn byte_diff(have: &[u8], want: &[u8]) -> String {
    let mut s = String::new();
    if have.len() != want.len() {
        s.push_str(&format!("  length: have {} want {}\n", have.len(), want.len()));
    }
    for i in 0..have.len().min(want.len()) {
        if have[i] != want[i] {
            s.push_str(&format!(
                "  offset {i:4} ({:#05x}) [{}]: have {:02x} want {:02x}\n",
                i,
                field_name(want, i),
                have[i],
                want[i]
            ));
        }
    }
    s
}

/// The program's output must be `want` byte for byte, with every checksum valid (checked from
/// scratch on the output itself), and the return code `want_ret`.
#[track_caller]
pub(super) fn check_translated(what: &str, ret: u32, out: &[u8], want: &[u8]) {
    let problems_out = if out.len() > ETH { checksum::ipv4_problems(&out[ETH..]) } else { vec!["too short".into()] };
    let problems_want = checksum::ipv4_problems(&want[ETH..]);
    assert!(problems_want.is_empty(), "{what}: test bug, expected packet has checksum problems {problems_want:?}");
    if ret != TC_ACT_UNSPEC || out != want || !problems_out.is_empty() {
        panic!(
            "{what}: mismatch\n return code: have {ret:#x} want {TC_ACT_UNSPEC:#x}\n checksum problems in the output: {problems_out:?}\n differing bytes:\n{}\n output:\n{}\n expected:\n{}",
            byte_diff(out, want),
            hex(out),
            hex(want)
        );
    }
}

/// The program must leave the packet exactly as it was and return `want_ret`.
#[track_caller]
pub(super) fn check_unchanged(what: &str, ret: u32, want_ret: u32, out: &[u8], input: &[u8]) {
    if let Some(p) = unchanged_problem(what, ret, want_ret, out, input) {
        panic!("{p}");
    }
}

pub(super) fn unchanged_problem(what: &str, ret: u32, want_ret: u32, out: &[u8], input: &[u8]) -> Option<String> {
    (ret != want_ret || out != input).then(|| {
        format!(
            "{what}: must pass untouched\n return code: have {ret:#x} want {want_ret:#x}\n differing bytes:\n{}\n output:\n{}\n input:\n{}",
            byte_diff(out, input),
            hex(out),
            hex(input)
        )
    })
}

/// Reassemble IPv4 fragments (IP packets, any order): (src, dst, proto, whole L4 datagram).
pub(super) fn reassemble(frags: &[&[u8]]) -> ([u8; 4], [u8; 4], u8, Vec<u8>) {
    let mut parts: Vec<(usize, bool, &[u8])> = frags
        .iter()
        .map(|p| {
            let ihl = checksum::ipv4_ihl(p).unwrap();
            let total = u16::from_be_bytes([p[2], p[3]]) as usize;
            let f = u16::from_be_bytes([p[6], p[7]]);
            (((f & 0x1fff) as usize) * 8, f & IP_MF != 0, &p[ihl..total])
        })
        .collect();
    parts.sort_by_key(|x| x.0);
    let mut data = Vec::new();
    for (i, (off, mf, d)) in parts.iter().enumerate() {
        assert_eq!(*off, data.len(), "fragments not contiguous");
        assert_eq!(*mf, i + 1 != parts.len(), "MF flags");
        data.extend_from_slice(d);
    }
    let p = frags[0];
    for f in frags {
        assert_eq!((&f[12..20], f[9]), (&p[12..20], p[9]), "fragments disagree on addresses/protocol");
    }
    ([p[12], p[13], p[14], p[15]], [p[16], p[17], p[18], p[19]], p[9], data)
}
