//! The shared client slots on the real programs (BPF_PROG_TEST_RUN) and the real ledger: a slot
//! counts for a key only when the index confirms it, a full map overflows into OVERFLOW, a
//! released slot is reused only after its grace and then counts from zero, the free queue is
//! filled once, and an upgrade carries the earlier per-CPU map's counts over exactly once.

use crate::support;

use std::{net::IpAddr, sync::Arc, time::Duration};

use support::{Harness, packet::Packet, require_root, sqlite::SqliteFile};
use tunmeter::{
    bpf::{
        counters::{self, ip_key},
        loader::{LoadError, PROG_EGRESS, PROG_INGRESS},
        slots::SlotReader,
    },
    db::Database,
    ledger::{Ledger, LedgerConfig, source::KernelSource},
    types::Layer,
};
use tunmeter_common::{
    ClientCounters, ClientKey, Direction, MAP_LEGACY_CLIENTS, Outcome, RESERVED_SLOTS, SLOT_OTHER, SLOT_OVERFLOW,
};

const SUBNETS: &[&str] = &["10.8.0.0/24", "fd00:8::/64"];

fn up(from: &str) -> Vec<u8> {
    let to = if from.contains(':') { "2001:db8::1" } else { "1.1.1.1" };
    Packet::udp().src(from).dst(to).ports(9, 53).payload([0; 12]).build()
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

#[test]
fn packets_take_slots_and_reserved_buckets_have_fixed_ones() {
    if !require_root() {
        return;
    }
    let mut h = Harness::new(Layer::L3, 64, SUBNETS);
    let (a, b) = (up("10.8.0.2"), up("fd00:8::2"));
    h.run(PROG_INGRESS, &a);
    h.run(PROG_INGRESS, &b);
    h.run(PROG_INGRESS, &a);
    let outside = up("192.0.2.1");
    h.run(PROG_INGRESS, &outside);
    let reader = SlotReader::open(&h.maps, false).unwrap();
    let sa = reader.slot_of(ip("10.8.0.2")).unwrap().expect("10.8.0.2 has a slot");
    let sb = reader.slot_of(ip("fd00:8::2")).unwrap().expect("fd00:8::2 has a slot");
    assert!(sa >= RESERVED_SLOTS && sb >= RESERVED_SLOTS && sa != sb, "{sa} {sb}");
    assert_eq!(reader.slots().key(sa), ip_key(ip("10.8.0.2")), "the slot names its owner");
    let c = reader.slots().counters(sa);
    assert_eq!((c.up_packets, c.up_bytes), (2, 2 * a.len() as u64));
    assert!(c.last_seen_jiffies > 0);
    let other = reader.slots().counters(SLOT_OTHER);
    assert_eq!((other.up_packets, other.up_bytes), (1, outside.len() as u64));
    assert_eq!(reader.slots().key(SLOT_OVERFLOW), ClientKey::OVERFLOW);
    let sums = counters::read_sums(&h.maps).unwrap();
    assert_eq!(sums.len(), 4, "two buckets and two clients: {sums:?}");
    assert_eq!(sums[0].0, ClientKey::OTHER);
    assert_eq!(sums[1].0, ClientKey::OVERFLOW);
}

#[test]
fn a_slot_the_index_does_not_confirm_is_not_read() {
    if !require_root() {
        return;
    }
    let h = Harness::new(Layer::L3, 64, SUBNETS);
    let a = ip("10.8.0.7");
    let c = ClientCounters { up_bytes: 100, up_packets: 1, ..Default::default() };
    let slot = h.add_to_client(a, &c);
    let mut reader = SlotReader::open(&h.maps, true).unwrap();
    let seen = |r: &mut SlotReader| {
        let mut v = Vec::new();
        r.for_each(|_, k, c| {
            if !k.is_reserved() {
                v.push((*k, *c))
            }
        })
        .unwrap();
        v
    };
    assert_eq!(seen(&mut reader), vec![(ip_key(a), c)]);
    // A slot that names a key the index does not point at (a program that lost the race to
    // publish it, before it gives the slot back) is not read.
    let b = ip("10.8.0.8");
    let other = h.add_to_client(b, &c);
    let mut index = h.maps.index().unwrap();
    index.insert(&ip_key(b), &slot, 0).unwrap();
    let mut fresh = SlotReader::open(&h.maps, true).unwrap();
    assert_eq!(seen(&mut fresh), vec![(ip_key(a), c)], "slot {other} names b, but b's index entry is elsewhere");
    index.remove(&ip_key(b)).unwrap();
    assert_eq!(seen(&mut fresh), vec![(ip_key(a), c)]);
    assert!(h.client("10.8.0.8").is_none());
    // Once the index confirms it, the slot is read.
    index.insert(&ip_key(b), &other, 0).unwrap();
    assert_eq!(seen(&mut fresh), vec![(ip_key(a), c), (ip_key(b), c)]);
}

#[test]
fn a_full_map_overflows_and_a_released_slot_is_reused_from_zero_after_its_grace() {
    if !require_root() {
        return;
    }
    let mut h = Harness::new(Layer::L3, 3, SUBNETS);
    h.run(PROG_INGRESS, &up("10.8.0.2"));
    h.run(PROG_INGRESS, &up("10.8.0.3"));
    let silent = ip("10.8.0.4");
    assert!(h.maps.admit_client(silent).unwrap(), "the third slot");
    let late = up("10.8.0.5");
    h.run(PROG_INGRESS, &late);
    assert!(h.client("10.8.0.5").is_none(), "no slot left");
    let overflow = h.outcomes()[&(Direction::Upload.name().to_string(), Outcome::MapFull.name().to_string())];
    assert_eq!(overflow, (1, late.len() as u64));
    let reader = SlotReader::open(&h.maps, false).unwrap();
    assert_eq!(reader.slots().counters(SLOT_OVERFLOW).up_bytes, late.len() as u64);
    assert!(matches!(h.maps.admit_client(ip("10.8.0.6")), Err(LoadError::ClientsFull { slots: 5 })));
    // Filling the queue again adds nothing: every slot was handed out once.
    h.maps.ensure_slots().unwrap();
    assert!(matches!(h.maps.admit_client(ip("10.8.0.6")), Err(LoadError::ClientsFull { .. })));

    assert!(!h.maps.expire_if_unused(ip("10.8.0.2")).unwrap(), "a slot with counts is kept");
    let freed = reader.slot_of(silent).unwrap().unwrap();
    assert!(h.maps.expire_if_unused(silent).unwrap());
    assert!(h.client("10.8.0.4").is_none());
    // Put counts into the released slot, as a program that looked it up before the release
    // would: they must not reach the slot's next owner.
    reader.slots().add(freed, &ClientCounters { up_bytes: 7, up_packets: 1, ..Default::default() });
    let mut daemon = SlotReader::open(&h.maps, true).unwrap();
    daemon.for_each(|_, _, _| {}).unwrap();
    h.run(PROG_INGRESS, &late);
    assert!(h.client("10.8.0.5").is_none(), "still in its grace: not free yet");
    std::thread::sleep(Duration::from_millis(tunmeter_common::SLOT_RELEASE_GRACE_MS + 100));
    daemon.for_each(|_, _, _| {}).unwrap();
    h.run(PROG_INGRESS, &late);
    let c = h.client("10.8.0.5").expect("the freed slot is taken");
    assert_eq!((c.up_packets, c.up_bytes), (1, late.len() as u64), "counted from zero");
    assert_eq!(SlotReader::open(&h.maps, false).unwrap().slot_of(ip("10.8.0.5")).unwrap(), Some(freed));
}

fn ledger_cfg() -> LedgerConfig {
    support::hand_polled_ledger("slots")
}

fn per_cpu(c: ClientCounters) -> Vec<ClientCounters> {
    let n = aya::util::nr_cpus().unwrap().get() as usize;
    let mut v = vec![ClientCounters::default(); n];
    v[0] = c;
    v
}

#[test]
fn an_upgrade_carries_the_per_cpu_map_over_once_and_exactly() {
    if !require_root() {
        return;
    }
    let mut h = Harness::new(Layer::L3, 64, SUBNETS);
    let db = SqliteFile::new("legacy");
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let (a, b) = (ip("10.8.0.2"), ip("fd00:8::9"));
    let at = |up_bytes, down_bytes| ClientCounters {
        up_bytes,
        up_packets: 1,
        down_bytes,
        down_packets: 1,
        last_seen_jiffies: 0,
    };
    // The earlier version's map and ledger: a ledgered 1000/2000 for a.
    let mut legacy =
        support::legacy_map(h.pins.path(), 64, &[(ip_key(a), per_cpu(at(1000, 2000))), (ip_key(b), per_cpu(at(5, 0)))]);
    rt.block_on(async {
        let db = Database::open(&db.url).await.unwrap();
        let old = Ledger::open(
            ledger_cfg(),
            db,
            Arc::new(tunmeter::ledger::source::LegacySource::find(h.pins.path()).expect("legacy map")),
        )
        .await
        .unwrap();
        old.poll_once().await.unwrap();
        old.flush().await.unwrap();
    });
    // It counted on after its last flush, until the new programs replaced it.
    let mut map: aya::maps::PerCpuHashMap<_, ClientKey, ClientCounters> =
        legacy.map_mut("DESIGN_PERCPU").unwrap().try_into().unwrap();
    map.insert(&ip_key(a), aya::maps::PerCpuValues::try_from(per_cpu(at(1300, 2400))).unwrap(), 0).unwrap();
    // The new version: its own map counts a's next packet from zero.
    let p = up("10.8.0.2");
    h.run(PROG_INGRESS, &p);
    rt.block_on(async {
        let db = Database::open(&db.url).await.unwrap();
        let new = Ledger::open(ledger_cfg(), db, Arc::new(KernelSource::new(h.pins.path()))).await.unwrap();
        assert!(new.carry_over_legacy(h.pins.path()).await.unwrap(), "the legacy map is carried over");
        assert!(!h.pins.path().join(MAP_LEGACY_CLIENTS).exists(), "and unpinned");
        assert!(!new.carry_over_legacy(h.pins.path()).await.unwrap(), "only once");
        new.poll_once().await.unwrap();
        let ca = new.client(a).unwrap().total;
        assert_eq!((ca.up_bytes, ca.down_bytes), (1300 + p.len() as u64, 2400), "nothing lost, nothing doubled");
        assert_eq!(new.client(b).unwrap().total.up_bytes, 5);
        new.flush().await.unwrap();
    });
    // What was written survives a restart unchanged.
    let h2 = &mut h;
    let d = Packet::udp().src("1.1.1.1").dst("10.8.0.2").ports(53, 9).payload([0; 3]).build();
    h2.run(PROG_EGRESS, &d);
    rt.block_on(async {
        let db = Database::open(&db.url).await.unwrap();
        let again = Ledger::open(ledger_cfg(), db, Arc::new(KernelSource::new(h2.pins.path()))).await.unwrap();
        assert!(!again.carry_over_legacy(h2.pins.path()).await.unwrap());
        again.poll_once().await.unwrap();
        let ca = again.client(a).unwrap().total;
        assert_eq!((ca.up_bytes, ca.down_bytes), (1300 + p.len() as u64, 2400 + d.len() as u64));
    });
}

#[test]
fn the_free_queue_is_topped_up_by_the_daemons_scan_and_by_admission() {
    if !require_root() {
        return;
    }
    let mut h = Harness::new(Layer::L3, 20_000, &["10.64.0.0/10"]);
    let headroom = tunmeter::bpf::slots::MIN_FREE_SLOTS;
    let mark = |h: &Harness| h.maps.slots().unwrap().fill_mark();
    assert_eq!(mark(&h), RESERVED_SLOTS + headroom, "a fresh map queues the headroom only");
    // New clients take every queued slot; the next one finds the queue empty and counts into
    // OVERFLOW until a scan tops the queue up.
    let client = |i: u32| std::net::Ipv4Addr::from(0x0a40_0000 + i).to_string();
    for i in 0..headroom {
        h.run(PROG_INGRESS, &up(&client(i)));
    }
    let late = up(&client(headroom));
    h.run(PROG_INGRESS, &late);
    assert!(h.client(&client(headroom)).is_none());
    assert_eq!(h.outcomes()[&(Direction::Upload.name().to_string(), Outcome::MapFull.name().to_string())].0, 1);
    let mut daemon = SlotReader::open(&h.maps, true).unwrap();
    let mut seen = 0;
    daemon.for_each(|_, k, _| seen += u32::from(!k.is_reserved())).unwrap();
    assert_eq!(seen, headroom);
    assert!(mark(&h) > 4096, "the scan crossed a chunk of slots");
    assert_eq!(daemon.slots().mapped_chunks(), 1, "a scan unmaps each chunk once read, but the first");
    assert_eq!(mark(&h), RESERVED_SLOTS + 2 * headroom, "topped up to the headroom again");
    h.run(PROG_INGRESS, &late);
    assert_eq!(h.client(&client(headroom)).expect("a slot now").up_packets, 1);
    // Admission never waits for a scan: with the queue drained it queues a fresh slot itself.
    let mut alloc = tunmeter::bpf::slots::SlotAlloc::open(&h.maps).unwrap();
    let admitted: std::collections::BTreeSet<u32> = (0..headroom + 10)
        .map(|i| alloc.admit(&ip_key(ip(&format!("10.65.{}.{}", i / 250, i % 250 + 1)))).unwrap().unwrap().0)
        .collect();
    assert_eq!(admitted.len() as u32, headroom + 10, "every admitted address has a slot of its own");
    // The queue held headroom - 1 (the late client took one): the other 11 were fresh.
    assert_eq!(mark(&h), RESERVED_SLOTS + 2 * headroom + 11);
}
