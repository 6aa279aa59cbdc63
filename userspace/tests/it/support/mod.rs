//! Helpers shared by the integration tests: root gating, unique bpffs pin directories,
//! packet builders and a BPF_PROG_TEST_RUN harness around the real eBPF object.

pub mod checksum;
pub mod control;
pub mod daemon;
pub mod env;
pub mod packet;
pub mod postgres;
pub mod proxies;
pub mod sqlite;
pub mod steer;

use std::{
    collections::BTreeMap,
    net::IpAddr,
    path::{Path, PathBuf},
    sync::atomic::{AtomicU32, Ordering},
};

use aya::programs::{TestRun as _, TestRunOptions};
use ipnet::IpNet;
use tunmeter::{
    bpf::{
        counters,
        loader::{Instance, LoadOptions, PinnedMaps},
        slots::{SlotAlloc, SlotReader},
    },
    types::Layer,
};
use tunmeter_common::{ClientCounters, ClientKey, MAP_LEGACY_CLIENTS};

/// The counter-layout prototypes (`ebpf/src/bin/design.rs`); its `DESIGN_PERCPU` has the
/// layout of the per-CPU client map of versions before the shared slots.
pub static DESIGN_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/tunmeter-design"));

/// A per-CPU client map as an earlier version left it, pinned as `CLIENT_COUNTERS` under
/// `dir`, holding `entries` (key, one value per CPU). The returned object keeps nothing alive
/// that the pin does not.
pub fn legacy_map(dir: &Path, capacity: u32, entries: &[(ClientKey, Vec<ClientCounters>)]) -> aya::Ebpf {
    let mut ebpf = aya::EbpfLoader::new()
        .map_max_entries("DESIGN_PERCPU", capacity)
        .load(DESIGN_OBJECT)
        .expect("load the design object");
    let map = ebpf.map_mut("DESIGN_PERCPU").unwrap();
    let mut map: aya::maps::PerCpuHashMap<_, ClientKey, ClientCounters> = map.try_into().unwrap();
    for (k, v) in entries {
        map.insert(k, aya::maps::PerCpuValues::try_from(v.clone()).unwrap(), 0).unwrap();
    }
    let aya::maps::Map::PerCpuHashMap(data) = ebpf.map("DESIGN_PERCPU").unwrap() else { unreachable!() };
    data.pin(dir.join(MAP_LEGACY_CLIENTS)).expect("pin the legacy map");
    ebpf
}

/// Kernel tests need root. Under `cargo xtask test` (TUNMETER_REQUIRE_ROOT_TESTS=1) a missing
/// privilege fails the test; a plain `cargo test` as a user skips it with a message.
pub fn require_root() -> bool {
    if tunmeter_lab::is_root() {
        ensure_bpffs();
        return true;
    }
    if std::env::var_os("TUNMETER_REQUIRE_ROOT_TESTS").is_some() {
        panic!("this test loads BPF programs and creates network namespaces: run as root");
    }
    eprintln!("skipped: needs root (run `cargo xtask test` as root)");
    false
}

/// `args` run in network namespace `ns` (`ip netns exec`): stdout; panics with stderr.
pub fn ns_sh(ns: &str, args: &[&str]) -> String {
    tunmeter_lab::netns_exec(ns, args).unwrap_or_else(|e| panic!("in {ns}: {e:#}"))
}

/// A webhook's signature header value, HMAC-SHA256(secret, "<timestamp>.<body>"), computed
/// here independently of the daemon.
pub fn webhook_signature(secret: &[u8], timestamp: &str, body: &[u8]) -> String {
    use hmac::{Hmac, Mac as _};
    let mut m = Hmac::<sha2::Sha256>::new_from_slice(secret).unwrap();
    m.update(timestamp.as_bytes());
    m.update(b".");
    m.update(body);
    format!("sha256={}", hex::encode(m.finalize().into_bytes()))
}

pub fn ensure_bpffs() {
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    if !mounts.lines().any(|l| l.split_whitespace().nth(1) == Some("/sys/fs/bpf")) {
        let st = std::process::Command::new("mount").args(["-t", "bpf", "bpf", "/sys/fs/bpf"]).status();
        assert!(st.is_ok_and(|s| s.success()), "mounting bpffs at /sys/fs/bpf failed");
    }
}

static NEXT: AtomicU32 = AtomicU32::new(0);

/// A bpffs directory unique to one test; everything under it (and its attachments) is removed
/// on drop.
pub struct PinDir(pub PathBuf);

impl PinDir {
    pub fn new(tag: &str) -> PinDir {
        let p = PathBuf::from(format!(
            "/sys/fs/bpf/tmtest-{tag}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&p);
        PinDir(p)
    }
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        // Removing the pins (links included) releases everything; no netlink sweep here, as
        // that would run in the test process's (host) namespace.
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Interface index BPF_PROG_TEST_RUN gives the skb: the loopback device.
pub const TEST_RUN_IFINDEX: u32 = 1;

/// One loaded program instance with its own maps, for driving packets through
/// BPF_PROG_TEST_RUN.
pub struct Harness {
    pub inst: Instance,
    pub maps: PinnedMaps,
    pub pins: PinDir,
}

impl Harness {
    pub fn new(layer: Layer, max_clients: u32, subnets: &[&str]) -> Harness {
        Self::with_options(layer, max_clients, subnets, LoadOptions::default())
    }

    /// Like `new`, with the load-time globals of `opts` (e.g. wire-byte accounting).
    pub fn with_options(layer: Layer, max_clients: u32, subnets: &[&str], opts: LoadOptions) -> Harness {
        let pins = PinDir::new("fx");
        std::fs::create_dir_all(pins.path()).unwrap();
        let inst = Instance::load_with(layer, pins.path(), max_clients, opts).expect("load eBPF object");
        let maps = PinnedMaps::new(pins.path());
        maps.ensure_slots().unwrap();
        let nets: Vec<IpNet> = subnets.iter().map(|s| s.parse().unwrap()).collect();
        maps.sync_subnets(&BTreeMap::from([(TEST_RUN_IFINDEX, nets)])).unwrap();
        // What the daemon does at start with no rule in its config: the skip hints say "no rule".
        tunmeter::steer::SteerMaps::new(pins.path()).sync_config(&[], &[]).unwrap();
        Harness { inst, maps, pins }
    }

    /// Run `prog` once on `data`; returns the program's return code.
    pub fn run(&mut self, prog: &'static str, data: &[u8]) -> u32 {
        self.try_run(prog, data).unwrap_or_else(|e| panic!("BPF_PROG_TEST_RUN of {} bytes: {e:?}", data.len()))
    }

    pub fn try_run(&mut self, prog: &'static str, data: &[u8]) -> Result<u32, aya::programs::ProgramError> {
        let p = self.inst.program_mut(prog);
        p.test_run(TestRunOptions { data_in: Some(data), repeat: 1, ..TestRunOptions::new() }).map(|r| r.return_value)
    }

    /// Run `prog` once on `data`; returns the return code and the packet as the program left
    /// it (BPF_PROG_TEST_RUN `data_out`).
    pub fn run_out(&mut self, prog: &'static str, data: &[u8]) -> (u32, Vec<u8>) {
        self.try_run_out(prog, data).unwrap_or_else(|e| panic!("BPF_PROG_TEST_RUN of {} bytes: {e:?}", data.len()))
    }

    pub fn try_run_out(
        &mut self,
        prog: &'static str,
        data: &[u8],
    ) -> Result<(u32, Vec<u8>), aya::programs::ProgramError> {
        let (ret, out, _) = self.test_run_io(prog, data, false)?;
        Ok((ret, out))
    }

    /// Like `run_out`, also returning the `struct __sk_buff` after the run (BPF_PROG_TEST_RUN
    /// `ctx_out`): see `SkbOut` for the fields read from it.
    pub fn try_run_skb(
        &mut self,
        prog: &'static str,
        data: &[u8],
    ) -> Result<(u32, Vec<u8>, SkbOut), aya::programs::ProgramError> {
        let (ret, out, skb) = self.test_run_io(prog, data, true)?;
        Ok((ret, out, skb.unwrap_or_default()))
    }

    fn test_run_io(
        &mut self,
        prog: &'static str,
        data: &[u8],
        with_ctx: bool,
    ) -> Result<(u32, Vec<u8>, Option<SkbOut>), aya::programs::ProgramError> {
        let p = self.inst.program_mut(prog);
        // Room for programs that grow the packet.
        let mut out = vec![0u8; data.len() + 512];
        let mut ctx = [0u8; SKB_CTX_SIZE];
        let r = p.test_run(TestRunOptions {
            data_in: Some(data),
            data_out: Some(&mut out),
            ctx_out: if with_ctx { Some(&mut ctx) } else { None },
            repeat: 1,
            ..TestRunOptions::new()
        })?;
        out.truncate(r.data_size_out as usize);
        let word = |off: usize| u32::from_ne_bytes(ctx[off..off + 4].try_into().unwrap());
        let skb = with_ctx.then(|| SkbOut { mark: word(8), priority: word(32), tc_index: word(44) });
        Ok((r.return_value, out, skb))
    }

    /// Run `prog` once on `data` as a merged GSO packet of `segs` segments of `size` payload
    /// bytes (`gso_segs`, `gso_size` of the `struct __sk_buff` given as BPF_PROG_TEST_RUN
    /// `ctx_in`); returns the program's return code.
    pub fn run_gso(&mut self, prog: &'static str, data: &[u8], segs: u32, size: u32) -> u32 {
        self.test_run_gso(prog, data, segs, size, 1).return_value
    }

    /// Average nanoseconds per run over `repeat` runs of the same GSO packet (see `run_gso`).
    pub fn time_gso(&mut self, prog: &'static str, data: &[u8], segs: u32, size: u32, repeat: u32) -> f64 {
        self.test_run_gso(prog, data, segs, size, repeat).duration.as_nanos() as f64
    }

    fn test_run_gso(
        &mut self,
        prog: &'static str,
        data: &[u8],
        segs: u32,
        size: u32,
        repeat: u32,
    ) -> aya::programs::TestRunResult {
        let mut ctx = [0u8; SKB_CTX_SIZE];
        ctx[SKB_GSO_SEGS..SKB_GSO_SEGS + 4].copy_from_slice(&segs.to_ne_bytes());
        ctx[SKB_GSO_SIZE..SKB_GSO_SIZE + 4].copy_from_slice(&size.to_ne_bytes());
        let p = self.inst.program_mut(prog);
        p.test_run(TestRunOptions { data_in: Some(data), ctx_in: Some(&ctx), repeat, ..TestRunOptions::new() })
            .unwrap_or_else(|e| panic!("BPF_PROG_TEST_RUN of {} bytes as {segs} segments: {e:?}", data.len()))
    }

    /// Average nanoseconds per run over `repeat` runs of the same packet.
    pub fn time(&mut self, prog: &'static str, data: &[u8], repeat: u32) -> f64 {
        let p = self.inst.program_mut(prog);
        let r = p
            .test_run(TestRunOptions { data_in: Some(data), repeat, ..TestRunOptions::new() })
            .expect("BPF_PROG_TEST_RUN");
        r.duration.as_nanos() as f64
    }

    pub fn client(&self, ip: &str) -> Option<ClientCounters> {
        let ip: IpAddr = ip.parse().unwrap();
        SlotReader::open(&self.maps, false).unwrap().read_one(ip).unwrap()
    }

    /// Give `ip` a slot (as its first packet would) and add `c` to it; returns the slot.
    pub fn add_to_client(&self, ip: IpAddr, c: &ClientCounters) -> u32 {
        add_to_client(&self.maps, ip, c)
    }

    pub fn client_count(&self) -> usize {
        counters::read_clients(&self.maps, None).unwrap().clients.len()
    }

    /// (direction, outcome) -> (packets, bytes), non-zero entries only.
    pub fn outcomes(&self) -> BTreeMap<(String, String), (u64, u64)> {
        counters::read_stats(&self.maps)
            .unwrap()
            .into_iter()
            .filter(|r| r.packets > 0)
            .map(|r| ((r.direction.to_string(), r.outcome.to_string()), (r.packets, r.bytes)))
            .collect()
    }
}

/// Size of `struct __sk_buff` (uapi) as BPF_PROG_TEST_RUN copies it out.
pub const SKB_CTX_SIZE: usize = 192;
/// Offsets of `gso_segs` and `gso_size` in `struct __sk_buff` (uapi, linux/bpf.h).
const SKB_GSO_SEGS: usize = 164;
const SKB_GSO_SIZE: usize = 176;

/// Fields of the `struct __sk_buff` a program left (BPF_PROG_TEST_RUN `ctx_out`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SkbOut {
    pub mark: u32,
    pub priority: u32,
    pub tc_index: u32,
}

/// Give `ip` a slot in the pinned maps (as its first packet would) and add `c` to it, as the
/// program's atomic adds do; returns the slot.
pub fn add_to_client(maps: &PinnedMaps, ip: IpAddr, c: &ClientCounters) -> u32 {
    let mut alloc = SlotAlloc::open(maps).unwrap();
    let (slot, _) = alloc.admit(&tunmeter::bpf::counters::ip_key(ip)).unwrap().expect("not a reserved key");
    alloc.slots().add(slot, c);
    slot
}

/// A ledger configuration for tests that poll and flush by hand: both intervals are an hour,
/// so the ledger's own tasks never act first.
pub fn hand_polled_ledger(node: &str) -> tunmeter::ledger::LedgerConfig {
    use tunmeter::ledger::store::Granularity;
    tunmeter::ledger::LedgerConfig {
        node_id: node.into(),
        poll_interval: std::time::Duration::from_secs(3600),
        flush_interval: std::time::Duration::from_secs(3600),
        retention_days: [(Granularity::Minute, 2), (Granularity::Hour, 90), (Granularity::Day, 0)],
        max_pending_rows: 1_000_000,
    }
}
