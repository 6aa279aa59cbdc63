//! Packet fuzzing through BPF_PROG_TEST_RUN: thousands of seeded random, structured and mutated
//! packets into `tunmeter_in` and `tunmeter_out` of the L3 and the L2 instance, with no rules and
//! with forward and redirect rules, each checked against the design's invariants (see `check`).
//! Seed: `TM_FUZZ_SEED` (decimal or 0x-hex), cases per program: `TM_FUZZ_CASES`.

mod cases;

use std::collections::BTreeMap;

use ipnet::IpNet;
use tunmeter::{
    bpf::{
        counters,
        loader::{PROG_EGRESS, PROG_INGRESS},
    },
    types::Layer,
};
use tunmeter_common::{ClientKey, Direction};

use crate::support::{
    Harness, checksum,
    packet::{TCP, UDP},
    require_root,
    steer::SteerTables,
};
use cases::{Case, Gen};

const SUBNETS: &[&str] = &["10.8.0.0/24", "fd00:8::/64"];
const DEFAULT_SEED: u64 = 0x746d_6675_7a7a_0001;
const DEFAULT_CASES: usize = 2500;

const TC_ACT_UNSPEC: u32 = -1i32 as u32;
const TC_ACT_SHOT: u32 = 2;
const TC_ACT_REDIRECT: u32 = 7;
/// The verdicts the design allows: pass on (TCX_NEXT), drop, redirect. Never TC_ACT_OK.
const ALLOWED: [u32; 3] = [TC_ACT_UNSPEC, TC_ACT_SHOT, TC_ACT_REDIRECT];

fn env_u64(name: &str) -> Option<u64> {
    let v = std::env::var(name).ok()?;
    let v = v.trim();
    let n = match v.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => v.parse(),
    };
    Some(n.unwrap_or_else(|e| panic!("{name}={v:?}: {e}")))
}

/// What one configuration saw, printed at the end (and checked to be not vacuous).
#[derive(Default, Debug)]
struct Tally {
    runs: u64,
    /// Inputs BPF_PROG_TEST_RUN refused before any program ran (shorter than an Ethernet
    /// header, or an IP EtherType on a frame shorter than that IP header).
    refused: u64,
    /// Return code (as i32: -1 is TC_ACT_UNSPEC) -> packets.
    verdicts: BTreeMap<i32, u64>,
    rewritten: u64,
    /// Rewrites of inputs whose checksums were valid, whose output checksums were verified.
    verified: u64,
    outcomes: BTreeMap<String, u64>,
}

/// Total (packets, bytes) per direction over every outcome.
fn outcome_totals(h: &Harness) -> [(u64, u64); 2] {
    let mut t = [(0, 0); 2];
    for r in counters::read_stats(&h.maps).unwrap() {
        let d = Direction::from_name(r.direction).unwrap().index() as usize;
        t[d].0 += r.packets;
        t[d].1 += r.bytes;
    }
    t
}

fn outcome_counts(h: &Harness) -> BTreeMap<String, u64> {
    h.outcomes().into_iter().map(|((d, o), (p, _))| (format!("{d}/{o}"), p)).collect()
}

/// Every key of the client map (reserved buckets left out).
fn client_keys(h: &Harness) -> Vec<ClientKey> {
    counters::read_sums(&h.maps).unwrap().into_iter().map(|(k, _)| k).filter(|k| !k.is_reserved()).collect()
}

fn in_subnets(k: &ClientKey) -> bool {
    let ip = counters::key_ip(k);
    SUBNETS.iter().any(|s| s.parse::<IpNet>().unwrap().contains(&ip))
}

/// Checks a rewritten packet: same length, Ethernet header untouched, a parseable IP header,
/// and (when the input's checksums were valid) valid IPv4 header and L4 checksums.
fn check_rewrite(layer: Layer, input: &[u8], out: &[u8], tally: &mut Tally) -> Result<(), String> {
    let l3 = layer.l3_offset() as usize;
    if out.len() != input.len() {
        return Err(format!("rewrite changed the length: {} -> {}", input.len(), out.len()));
    }
    if out[..l3] != input[..l3] {
        return Err("rewrite changed the Ethernet header".into());
    }
    let (ip_in, ip_out) = (&input[l3..], &out[l3..]);
    match ip_out.first().map(|b| b >> 4) {
        Some(4) => {
            checksum::ipv4_ihl(ip_out).ok_or("rewritten IPv4 header does not parse")?;
            if checksum::ipv4_problems(ip_in).is_empty() {
                let problems = checksum::ipv4_problems(ip_out);
                if !problems.is_empty() {
                    return Err(format!("rewritten packet's checksums do not verify: {problems:?}"));
                }
                tally.verified += 1;
            }
            Ok(())
        }
        Some(6) if ip_out.len() >= 40 => Ok(()),
        _ => Err("rewritten packet is not a parseable IP packet".into()),
    }
}

/// Run one case and check every invariant; `Err` says which one broke.
fn check(
    h: &mut Harness,
    layer: Layer,
    rules: bool,
    prog: &'static str,
    case: &Case,
    tally: &mut Tally,
) -> Result<(), String> {
    let dir = if prog == PROG_INGRESS { Direction::Upload } else { Direction::Download };
    let before = outcome_totals(h);
    let keys_before = client_keys(h);
    tally.runs += 1;
    let (ret, out) = match h.try_run_out(prog, &case.bytes) {
        Ok(r) => r,
        Err(_) => {
            tally.refused += 1;
            // Refused before any program ran: nothing may have been counted.
            let after = outcome_totals(h);
            return if after == before {
                Ok(())
            } else {
                Err(format!("refused input counted: {before:?} -> {after:?}"))
            };
        }
    };
    *tally.verdicts.entry(ret as i32).or_default() += 1;
    if !ALLOWED.contains(&ret) {
        return Err(format!("verdict {} is not one the design allows ({ALLOWED:?})", ret as i32));
    }
    if out != case.bytes {
        if !rules {
            return Err("packet changed with no rules installed".into());
        }
        tally.rewritten += 1;
        check_rewrite(layer, &case.bytes, &out, tally)?;
    }
    // Exactly one outcome, in this program's direction, with the packet's L3 bytes.
    let after = outcome_totals(h);
    let d = dir.index() as usize;
    let l3_len = (case.bytes.len() as u64).saturating_sub(layer.l3_offset() as u64);
    let mut want = before;
    want[d].0 += 1;
    want[d].1 += l3_len;
    if after != want {
        return Err(format!("outcome counters went {before:?} -> {after:?}, want {want:?}"));
    }
    let keys = client_keys(h);
    if let Some(k) = keys.iter().find(|k| !in_subnets(k)) {
        return Err(format!("non-client address {} got a client entry", counters::key_ip(k)));
    }
    if dir == Direction::Download && keys.len() != keys_before.len() {
        return Err(format!(
            "a download packet created a client entry ({} -> {} entries)",
            keys_before.len(),
            keys.len()
        ));
    }
    Ok(())
}

fn install_rules(h: &Harness) {
    let s = SteerTables::new(h.pins.path());
    s.add_forward(TCP, 8080, None, "10.8.0.77", 3128, 7);
    s.add_forward(UDP, 5353, Some("203.0.113.7"), "10.8.0.77", 53, 9);
    s.add_redirect("10.8.0.0/25", 15001, 11);
    s.add_redirect("fd00:8::/64", 15001, 12);
    s.add_bypass(["10.8.0.1/32".parse().unwrap()]);
}

fn fuzz(layer: Layer, rules: bool) {
    if !require_root() {
        return;
    }
    let base = env_u64("TM_FUZZ_SEED").unwrap_or(DEFAULT_SEED);
    let cases = env_u64("TM_FUZZ_CASES").map_or(DEFAULT_CASES, |n| n as usize);
    // One stream per configuration, so a failure replays with the same seed alone.
    let seed = base ^ ((layer.l3_offset() as u64) << 8) ^ rules as u64;
    eprintln!(
        "fuzz {layer:?} rules={rules}: seed {seed:#x} from TM_FUZZ_SEED={base:#x} (set it to replay), {cases} cases per program"
    );
    let mut h = Harness::new(layer, 4096, SUBNETS);
    if rules {
        install_rules(&h);
    }
    let mut g = Gen::new(seed);
    let mut tally = Tally::default();
    for i in 0..cases {
        for prog in [PROG_INGRESS, PROG_EGRESS] {
            let case = g.case(layer);
            if let Err(why) = check(&mut h, layer, rules, prog, &case, &mut tally) {
                panic!(
                    "fuzz {layer:?} rules={rules} seed {seed:#x} (TM_FUZZ_SEED={base:#x}) case {i} {prog}: {why}\n  input: {}\n  bytes ({}): {}",
                    case.what,
                    case.bytes.len(),
                    hex::encode(&case.bytes)
                );
            }
        }
    }
    tally.outcomes = outcome_counts(&h);
    eprintln!("fuzz {layer:?} rules={rules}: {tally:#?}");
    // Not vacuous: most inputs ran, several outcomes were hit, and with rules some packets
    // were rewritten (L2: forwarding) or dropped (L3: redirect without a proxy socket).
    assert!(tally.refused < tally.runs / 2, "{tally:?}");
    assert!(tally.outcomes.len() >= 6, "too few outcomes exercised: {tally:?}");
    match (rules, layer) {
        (true, Layer::L2) => assert!(tally.verified > 100, "too few verified rewrites: {tally:?}"),
        (true, Layer::L3) => assert!(tally.verdicts.get(&(TC_ACT_SHOT as i32)).is_some_and(|n| *n > 20), "{tally:?}"),
        (false, _) => assert_eq!(tally.rewritten, 0),
    }
}

#[test]
fn l3_without_rules() {
    fuzz(Layer::L3, false);
}

#[test]
fn l3_with_forward_and_redirect_rules() {
    fuzz(Layer::L3, true);
}

#[test]
fn l2_without_rules() {
    fuzz(Layer::L2, false);
}

#[test]
fn l2_with_forward_and_redirect_rules() {
    fuzz(Layer::L2, true);
}
