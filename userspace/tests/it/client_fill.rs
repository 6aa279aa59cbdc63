//! Client-map fill protection, on the real programs (BPF_PROG_TEST_RUN) and the real ledger over
//! their pinned maps: downloads to random addresses of a client subnet create no map entry and no
//! ledger client (counted as `unknown_client` in OTHER); a client's own upload creates its entry;
//! an admitted address counts from its first download; a silent admitted entry expires.

use crate::support;

use std::{net::IpAddr, sync::Arc};

use support::{Harness, packet::Packet, require_root, sqlite::SqliteFile};
use tunmeter::{
    bpf::{
        counters,
        loader::{PROG_EGRESS, PROG_INGRESS},
    },
    db::Database,
    ledger::{Ledger, source::KernelSource},
    types::Layer,
};
use tunmeter_common::{Direction, Outcome};

const SUBNETS: &[&str] = &["10.8.0.0/24", "fd00:8::/64"];
const RANDOM_ADDRESSES: u64 = 300;

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

/// A ledger reading the harness's pinned maps (polled by hand: the intervals are an hour).
async fn ledger(h: &Harness, db: &SqliteFile) -> Arc<Ledger> {
    let cfg = support::hand_polled_ledger("fill");
    let db = Database::open(&db.url).await.expect("open database");
    Ledger::open(cfg, db, Arc::new(KernelSource::new(h.pins.path()))).await.expect("ledger")
}

fn outcome(h: &Harness, dir: Direction, o: Outcome) -> (u64, u64) {
    h.outcomes().get(&(dir.name().to_string(), o.name().to_string())).copied().unwrap_or_default()
}

/// Deterministic "random" host parts (a fixed LCG: the addresses only need to differ).
fn random_addresses() -> Vec<IpAddr> {
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    (0..RANDOM_ADDRESSES)
        .map(|i| {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            if i % 3 == 0 {
                IpAddr::from([10, 8, 0, (x >> 56) as u8 | 1])
            } else {
                IpAddr::from(std::net::Ipv6Addr::from((0xfd00_0008u128 << 96) | (x as u128 | 1)))
            }
        })
        .collect()
}

#[test]
fn downloads_to_unknown_addresses_create_no_entry_and_no_ledger_client() {
    if !require_root() {
        return;
    }
    for layer in [Layer::L3, Layer::L2] {
        let mut h = Harness::new(layer, 1024, SUBNETS);
        let db = SqliteFile::new("fill");
        let rt = rt();
        let l = rt.block_on(ledger(&h, &db));
        let frame = |p: Packet| if layer == Layer::L2 { p.eth().build() } else { p.build() };
        let l3 = layer.l3_offset() as u64;
        let mut refused_bytes = 0;
        for ip in random_addresses() {
            let from = if ip.is_ipv4() { "198.51.100.9" } else { "2001:db8::9" };
            let p = frame(Packet::udp().src(from).dst(ip).ports(53, 9).payload([0; 20]));
            refused_bytes += p.len() as u64 - l3;
            assert_eq!(h.run(PROG_EGRESS, &p), -1i32 as u32);
        }
        rt.block_on(l.poll_once()).unwrap();
        assert_eq!(h.client_count(), 0, "{layer:?}: downloads created client entries");
        assert_eq!(l.with_clients(|c| c.len()), 0, "{layer:?}: downloads created ledger clients");
        assert_eq!(outcome(&h, Direction::Download, Outcome::UnknownClient), (RANDOM_ADDRESSES, refused_bytes));
        // Charged to OTHER, so every byte still shows up somewhere.
        let snap = counters::read_clients(&h.maps, None).unwrap();
        assert_eq!((snap.other.download.packets, snap.other.download.bytes), (RANDOM_ADDRESSES, refused_bytes));

        // The client's own first upload creates its entry; downloads to it then count as its.
        let me: IpAddr = "fd00:8::2".parse().unwrap();
        let down = frame(Packet::udp().src("2001:db8::9").dst(me).ports(53, 9).payload([0; 40]));
        h.run(PROG_EGRESS, &down);
        assert!(h.client("fd00:8::2").is_none());
        let up = frame(Packet::udp().src(me).dst("2001:db8::9").ports(9, 53).payload([0; 10]));
        h.run(PROG_INGRESS, &up);
        h.run(PROG_EGRESS, &down);
        let c = h.client("fd00:8::2").expect("entry from the client's upload");
        let (up_l3, down_l3) = (up.len() as u64 - l3, down.len() as u64 - l3);
        assert_eq!((c.up_bytes, c.up_packets, c.down_bytes, c.down_packets), (up_l3, 1, down_l3, 1));
        rt.block_on(l.poll_once()).unwrap();
        let lc = l.client(me).expect("ledger client after its upload");
        assert_eq!((lc.total.up_bytes, lc.total.down_bytes), (up_l3, down_l3));
        assert_eq!(l.with_clients(|c| c.len()), 1);
        assert_eq!(outcome(&h, Direction::Download, Outcome::UnknownClient).0, RANDOM_ADDRESSES + 1);
        drop(h);
    }
}

#[test]
fn admitted_addresses_count_from_the_first_download_and_silent_ones_expire() {
    if !require_root() {
        return;
    }
    let mut h = Harness::new(Layer::L3, 1024, SUBNETS);
    let db = SqliteFile::new("admit");
    let rt = rt();
    let l = rt.block_on(ledger(&h, &db));
    let (a, b): (IpAddr, IpAddr) = ("10.8.0.20".parse().unwrap(), "10.8.0.21".parse().unwrap());
    // Identity admits both (the daemon's path: Ledger::admit creates the kernel entry).
    rt.block_on(l.admit(a)).unwrap();
    rt.block_on(l.admit(b)).unwrap();
    assert!(!h.maps.admit_client(a).unwrap(), "a second admission finds the entry");
    assert!(!h.maps.admit_client("::".parse().unwrap()).unwrap(), "reserved keys are never admitted");
    let down = Packet::udp().src("1.1.1.1").dst(a).ports(53, 9).payload([0; 30]).build();
    h.run(PROG_EGRESS, &down);
    let c = h.client("10.8.0.20").expect("admitted entry");
    assert_eq!((c.down_bytes, c.down_packets, c.up_packets), (down.len() as u64, 1, 0));
    assert_eq!(outcome(&h, Direction::Download, Outcome::Client).0, 1);
    assert_eq!(outcome(&h, Direction::Download, Outcome::UnknownClient).0, 0);
    rt.block_on(l.poll_once()).unwrap();
    assert_eq!(l.client(a).unwrap().total.down_bytes, down.len() as u64);

    // Sessions end: the entry that counted is kept (the ledger owns its bytes), the silent
    // one is removed, and removing a missing entry is not an error.
    l.release(a);
    l.release(b);
    assert!(h.client("10.8.0.20").is_some(), "an entry with counts is never expired");
    assert!(h.client("10.8.0.21").is_none(), "a silent admitted entry expires");
    assert!(!h.maps.expire_if_unused(b).unwrap());
    // b's next packet is treated like any unknown address's: its upload re-creates the entry,
    // counted from zero, and the ledger (cursor 0) accounts it whole.
    let up = Packet::udp().src(b).dst("1.1.1.1").ports(9, 53).payload([0; 5]).build();
    h.run(PROG_INGRESS, &up);
    rt.block_on(l.poll_once()).unwrap();
    assert_eq!(l.client(b).unwrap().total.up_bytes, up.len() as u64);
}
