//! The ledger state's tests: polls, folds, resets, epochs and chunked flushes, checked for
//! exactness (every byte counted once) across failures.

use super::*;

fn t(up: u64, down: u64) -> Totals {
    Totals { up_bytes: up, up_packets: up / 100, down_bytes: down, down_packets: down / 100 }
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn r(a: &str, tot: Totals) -> Reading {
    Reading { ip: ip(a), totals: tot, last_seen_ms: Some(1), slot: None }
}

/// A whole flush as the ledger's writer makes it (every listed client in one chunk, then the
/// reset's row as it will be after the reset), committed.
struct Batch {
    epoch: Option<String>,
    buckets: Vec<MinuteRow>,
    clients: Vec<(IpAddr, ClientState)>,
    taken: Taken,
}

impl Batch {
    fn is_empty(&self) -> bool {
        self.epoch.is_none() && self.buckets.is_empty() && self.clients.is_empty()
    }
}

fn take_flush(s: &mut State, reset: Option<&ResetRecord>) -> Batch {
    let start = s.begin_flush();
    let (mut rows, mut usage) = (Vec::new(), Vec::new());
    s.take(&start.clients, &mut rows, &mut usage);
    if let Some(r) = reset {
        rows.retain(|(ip, _)| *ip != r.ip);
        let id = s.clients.find(&r.ip);
        s.take(id.as_slice(), &mut rows, &mut usage);
        let row = &mut rows.last_mut().expect("the reset's client").1;
        row.base = r.new_base;
        row.period_started_ms = r.at_ms;
    }
    s.commit_flush();
    Batch {
        epoch: start.epoch.clone(),
        buckets: usage.clone(),
        clients: rows,
        taken: Taken { usage, clients: start.clients, epoch: start.epoch.is_some() },
    }
}

fn pending_sum(b: &Batch, who: IpAddr) -> Totals {
    let mut s = Totals::default();
    for ((_, i), bucket) in &b.buckets {
        if *i == who {
            s.add(&bucket.totals);
        }
    }
    s
}

#[test]
fn polls_add_increments_and_rates() {
    let mut s = State::default();
    s.apply_poll("e1", &[r("10.8.0.2", t(1000, 500))], 60_000, None);
    let o = s.apply_poll("e1", &[r("10.8.0.2", t(3000, 500)), r("fd00:8::2", t(100, 0))], 61_000, Some(2.0));
    assert_eq!(o.changed, 2);
    let c = &s.clients[&ip("10.8.0.2")];
    assert_eq!(c.total, t(3000, 500));
    assert_eq!(c.up_rate, 1000.0);
    assert_eq!(c.down_rate, 0.0);
    let b = take_flush(&mut s, None);
    assert_eq!(b.epoch.as_deref(), Some("e1"));
    assert_eq!(pending_sum(&b, ip("10.8.0.2")), t(3000, 500));
    // The peak of the minute is the highest poll-interval rate.
    let bucket = b.buckets.iter().find(|((_, i), _)| *i == ip("10.8.0.2")).unwrap().1;
    assert_eq!(bucket.peak_up_rate, 1000.0);
    assert!(take_flush(&mut s, None).is_empty());
}

#[test]
fn a_new_epoch_counts_the_new_map_from_zero() {
    let mut s = State::default();
    s.apply_poll("boot1/7", &[r("10.8.0.2", t(900_000, 900_000))], 0, None);
    let o = s.apply_poll("boot2/7", &[r("10.8.0.2", t(300, 200))], 1000, Some(1.0));
    assert!(o.new_epoch);
    assert!(o.recreated.is_empty());
    assert_eq!(s.clients[&ip("10.8.0.2")].total, t(900_300, 900_200));
}

#[test]
fn a_recreated_entry_is_reported_and_counted_from_zero() {
    let mut s = State::default();
    s.apply_poll("e", &[r("10.8.0.2", t(900, 900))], 0, None);
    let o = s.apply_poll("e", &[r("10.8.0.2", t(100, 0))], 1000, Some(1.0));
    assert_eq!(o.recreated, vec![ip("10.8.0.2")]);
    assert_eq!(s.clients[&ip("10.8.0.2")].total, t(1000, 900));
}

#[test]
fn a_failed_write_loses_nothing() {
    let mut s = State::default();
    s.apply_poll("e", &[r("10.8.0.2", t(1000, 0))], 0, None);
    let failed = take_flush(&mut s, None);
    s.apply_poll("e", &[r("10.8.0.2", t(1500, 0))], 500, Some(0.5));
    s.restore_flush(failed.taken);
    let b = take_flush(&mut s, None);
    assert_eq!(b.epoch.as_deref(), Some("e"));
    assert_eq!(pending_sum(&b, ip("10.8.0.2")), t(1500, 0));
    // The client row written is the current one: its cursor matches the usage above.
    assert_eq!(b.clients[0].1.cursor, t(1500, 0));
}

#[test]
fn reset_closes_the_period_and_is_visible_only_after_commit() {
    let mut s = State::default();
    s.apply_poll("e", &[r("10.8.0.2", t(1000, 400))], 0, None);
    let rec = s.prepare_reset(ip("10.8.0.2"), 5000).unwrap();
    assert_eq!(rec.closed, t(1000, 400));
    let b = take_flush(&mut s, Some(&rec));
    assert_eq!(b.clients[0].1.base, t(1000, 400));
    assert_eq!(s.clients[&ip("10.8.0.2")].period(), t(1000, 400));
    s.commit_reset(&rec);
    assert!(s.clients[&ip("10.8.0.2")].period().is_zero());
    s.apply_poll("e", &[r("10.8.0.2", t(1300, 400))], 6000, Some(1.0));
    assert_eq!(s.clients[&ip("10.8.0.2")].period(), t(300, 0));
    assert!(s.prepare_reset(ip("10.9.9.9"), 0).is_none());
}

#[test]
fn usage_polled_while_a_reset_is_written_belongs_to_the_new_period() {
    let mut s = State::default();
    s.apply_poll("e", &[r("10.8.0.2", t(1000, 0))], 0, None);
    let rec = s.prepare_reset(ip("10.8.0.2"), 10).unwrap();
    let batch = take_flush(&mut s, Some(&rec));
    // A poll lands while the reset's transaction is in flight.
    s.apply_poll("e", &[r("10.8.0.2", t(1700, 0))], 20, Some(1.0));
    s.commit_reset(&rec);
    assert_eq!(rec.closed, t(1000, 0));
    assert_eq!(s.clients[&ip("10.8.0.2")].period(), t(700, 0));
    // The next batch carries that usage and the reset's base, so the stored period agrees.
    let next = take_flush(&mut s, None);
    assert_eq!(pending_sum(&next, ip("10.8.0.2")), t(700, 0));
    assert_eq!(next.clients[0].1.base, t(1000, 0));
    drop(batch);
}

#[test]
fn an_admitted_client_counts_its_first_reading_in_full() {
    let mut s = State::default();
    s.apply_poll("e", &[r("10.8.0.3", t(10, 10))], 0, None);
    assert_eq!(s.admit(ip("10.8.0.2"), 5), (Totals::default(), true));
    let b = take_flush(&mut s, None);
    assert!(b.clients.iter().any(|(i, c)| *i == ip("10.8.0.2") && c.cursor.is_zero()));
    // Known and written: nothing more to write.
    assert_eq!(s.admit(ip("10.8.0.2"), 6), (Totals::default(), false));
    s.apply_poll("e", &[r("10.8.0.3", t(10, 10)), r("10.8.0.2", t(700, 300))], 1000, Some(1.0));
    assert_eq!(s.clients[&ip("10.8.0.2")].total, t(700, 300));
    assert_eq!(s.clients[&ip("10.8.0.2")].first_seen_ms, 5);
}

#[test]
fn restarts_from_a_stored_cursor_neither_lose_nor_double() {
    // Readings of one growing counter; every 7th poll the state is rebuilt from what was
    // written (cursor + total), as after a restart; the total must equal the last reading.
    let series: Vec<u64> = (0..50).map(|i| i * i * 37).collect();
    let mut s = State::default();
    let mut written: Option<ClientState> = None;
    for (n, v) in series.iter().enumerate() {
        if n % 7 == 0
            && let Some(c) = &written
        {
            s = State::restore("e".into(), [(ip("10.8.0.9"), c.clone())]);
        }
        s.apply_poll("e", &[r("10.8.0.9", t(*v, *v / 2))], n as u64 * 1000, Some(1.0));
        if n % 3 == 0 {
            written = take_flush(&mut s, None).clients.into_iter().next().map(|(_, c)| c).or(written);
        }
    }
    assert_eq!(s.clients[&ip("10.8.0.9")].total.up_bytes, *series.last().unwrap());
}

/// A flush taken a chunk at a time with polls in between and some transactions failing: what
/// the committed transactions wrote always agrees (each stored row's total is the sum of the
/// stored usage of its client), and once everything is written nothing is lost or doubled.
#[test]
fn chunked_flushes_with_polls_between_and_failures_stay_exact() {
    use std::collections::HashMap;
    let ips: Vec<IpAddr> = (0..40u8).map(|i| IpAddr::from([10, 8, 1, i])).collect();
    let mut kernel: HashMap<IpAddr, Totals> = HashMap::new();
    let mut s = State::default();
    // What the database holds: rows and summed usage per client.
    let mut rows: HashMap<IpAddr, ClientState> = HashMap::new();
    let mut usage: HashMap<IpAddr, Totals> = HashMap::new();
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let mut rand = move |n: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % n
    };
    let mut now = 10 * MINUTE_MS;
    let poll = |s: &mut State, kernel: &mut HashMap<IpAddr, Totals>, now: u64, rand: &mut dyn FnMut(u64) -> u64| {
        for ip in &ips {
            if rand(3) == 0 {
                let t = kernel.entry(*ip).or_default();
                t.add(&Totals { up_bytes: 1 + rand(1000), up_packets: 1, down_bytes: rand(5000), down_packets: 1 });
            }
        }
        let readings: Vec<Reading> =
            kernel.iter().map(|(ip, t)| Reading { ip: *ip, totals: *t, last_seen_ms: Some(now), slot: None }).collect();
        s.apply_poll("e", &readings, now, Some(1.0));
    };
    for round in 0..200 {
        now += 7_000 + rand(20_000);
        poll(&mut s, &mut kernel, now, &mut rand);
        let start = s.begin_flush();
        let mut taken = Taken { usage: Vec::new(), clients: start.clients, epoch: start.epoch.is_some() };
        let mut written = Vec::new();
        for chunk in taken.clients.clone().chunks(7) {
            s.take(chunk, &mut written, &mut taken.usage);
            // A poll lands between two chunks.
            if rand(2) == 0 {
                now += 1 + rand(2_000);
                poll(&mut s, &mut kernel, now, &mut rand);
            }
            // Admitting a client taken by this flush waits for it.
            if let Some((ip, _)) = written.last() {
                assert!(s.admit(*ip, now).1, "a row taken by an uncommitted flush is unwritten");
            }
        }
        if rand(4) == 0 {
            s.restore_flush(taken);
            continue;
        }
        s.commit_flush();
        for (ip, row) in written {
            rows.insert(ip, row);
        }
        for ((_, ip), b) in &taken.usage {
            usage.entry(*ip).or_default().add(&b.totals);
        }
        for (ip, row) in &rows {
            assert_eq!(row.total, usage.get(ip).copied().unwrap_or_default(), "round {round}: {ip}");
        }
    }
    // Quiet, then one last complete flush: the database holds every byte the kernel counted.
    now += 1000;
    let readings: Vec<Reading> =
        kernel.iter().map(|(ip, t)| Reading { ip: *ip, totals: *t, last_seen_ms: None, slot: None }).collect();
    s.apply_poll("e", &readings, now, Some(1.0));
    let b = take_flush(&mut s, None);
    for (ip, row) in b.clients {
        rows.insert(ip, row);
    }
    for ((_, ip), bk) in &b.buckets {
        usage.entry(*ip).or_default().add(&bk.totals);
    }
    assert_eq!(s.pending_rows(), 0);
    for (ip, t) in &kernel {
        assert_eq!(usage.get(ip), Some(t), "{ip}: stored usage is what the kernel counted");
        assert_eq!(rows[ip].cursor, *t);
    }
}

#[test]
fn a_minute_that_ends_before_its_flush_is_kept_as_an_older_row() {
    let mut s = State::default();
    s.apply_poll("e", &[r("10.8.0.2", t(100, 0))], 60_000, None);
    s.apply_poll("e", &[r("10.8.0.2", t(300, 0))], 125_000, Some(1.0));
    assert_eq!(s.pending_rows(), 2);
    let b = take_flush(&mut s, None);
    let mut minutes: Vec<(u64, u64)> = b.buckets.iter().map(|((start, _), bk)| (*start, bk.totals.up_bytes)).collect();
    minutes.sort();
    assert_eq!(minutes, [(60_000, 100), (120_000, 200)]);
    assert_eq!(s.pending_rows(), 0);
}
