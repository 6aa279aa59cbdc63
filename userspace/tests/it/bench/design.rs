//! Section 8: the counter layouts of docs/performance.md on prototypes with 100,000 clients
//! (`ebpf/src/bin/design.rs`): packet cost under BPF_PROG_TEST_RUN, alone and with both CPUs
//! on one client or on two, and the poll's cost of reading every counter (batched syscalls
//! for the per-CPU hash, an mmap for the array, a ring of active slots for change tracking).

use std::{
    os::fd::{AsFd as _, AsRawFd as _},
    time::Instant,
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, RingBuf},
    programs::{SchedClassifier, TestRun as _, TestRunOptions},
};
use tunmeter_common::{ClientKey, design::DesignSlot};

use super::*;

use crate::support::DESIGN_OBJECT;

const N: u32 = 100_000;
const PROGRAMS: [(&str, &str); 3] = [
    ("design_percpu_hash", "per-CPU hash (today)"),
    ("design_shared_array", "shared array, atomic adds"),
    ("design_shared_array_dirty", "shared array + active-slot ring"),
];
/// The ring holds one 16-byte record (8-byte header, 4-byte slot, padding) per slot.
const RING_BYTES: u32 = 2 << 20;

fn client(i: u32) -> std::net::Ipv4Addr {
    std::net::Ipv4Addr::from(0x0a08_0000u32 + i)
}

fn packet(i: u32) -> Vec<u8> {
    Packet::udp().ports(1, 2).payload([0; 64]).l4_checksum(0).src(&client(i).to_string()).dst("1.1.1.1").build()
}

fn load() -> Ebpf {
    let mut ebpf = EbpfLoader::new()
        .map_max_entries("DESIGN_PERCPU", N)
        .map_max_entries("DESIGN_SLOT_OF", N)
        .map_max_entries("DESIGN_SLOTS", N)
        .map_max_entries("DESIGN_ACTIVE", RING_BYTES)
        .load(DESIGN_OBJECT)
        .expect("load the design prototypes");
    for (name, _) in PROGRAMS {
        let p: &mut SchedClassifier = ebpf.program_mut(name).unwrap().try_into().unwrap();
        p.load().unwrap();
    }
    let ncpu = nr_cpus().unwrap().get() as usize;
    let keys: Vec<ClientKey> = (0..N).map(|i| ClientKey::v4(client(i).octets())).collect();
    let aya::maps::Map::PerCpuHashMap(percpu) = ebpf.map("DESIGN_PERCPU").unwrap() else { panic!("DESIGN_PERCPU") };
    tunmeter::bpf::batch::update_percpu(percpu, &keys, &vec![ClientCounters::default(); keys.len() * ncpu], ncpu)
        .unwrap();
    let mut slot_of: HashMap<_, ClientKey, u32> = HashMap::try_from(ebpf.map_mut("DESIGN_SLOT_OF").unwrap()).unwrap();
    for (i, k) in keys.iter().enumerate() {
        slot_of.insert(k, &(i as u32), 0).unwrap();
    }
    ebpf
}

fn run(p: &SchedClassifier, data: &[u8], repeat: u32) -> f64 {
    let opts = TestRunOptions { data_in: Some(data), repeat, ..TestRunOptions::new() };
    p.test_run(opts).expect("BPF_PROG_TEST_RUN").duration.as_nanos() as f64
}

fn pin_to_cpu(cpu: usize) {
    // SAFETY: a zeroed cpu_set_t with one bit set, for this thread only.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        assert_eq!(libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set), 0, "pin to CPU {cpu}");
    }
}

/// ns/packet with CPU 0 and CPU 1 running the program at the same time, on `a` and `b`: the
/// mean of the two threads' medians.
fn concurrent(p: &SchedClassifier, a: &[u8], b: &[u8]) -> f64 {
    let times: Vec<f64> = std::thread::scope(|s| {
        let threads: Vec<_> = [a, b]
            .into_iter()
            .enumerate()
            .map(|(cpu, data)| {
                s.spawn(move || {
                    pin_to_cpu(cpu);
                    sampled(|| run(p, data, REPEAT))
                })
            })
            .collect();
        threads.into_iter().map(|t| t.join().unwrap()).collect()
    });
    times.iter().sum::<f64>() / times.len() as f64
}

/// The slots, mapped read-only into this process.
struct Slots {
    ptr: *const DesignSlot,
    len: usize,
    bytes: usize,
}

impl Slots {
    fn map(ebpf: &Ebpf) -> Slots {
        let aya::maps::Map::Array(data) = ebpf.map("DESIGN_SLOTS").unwrap() else { panic!("DESIGN_SLOTS") };
        let bytes = (N as usize * size_of::<DesignSlot>()).next_multiple_of(4096);
        // SAFETY: a shared read-only mapping of a BPF_F_MMAPABLE array of exactly N slots.
        let ptr = unsafe {
            libc::mmap(std::ptr::null_mut(), bytes, libc::PROT_READ, libc::MAP_SHARED, data.fd().as_fd().as_raw_fd(), 0)
        };
        assert_ne!(ptr, libc::MAP_FAILED, "mmap DESIGN_SLOTS: {}", std::io::Error::last_os_error());
        Slots { ptr: ptr.cast(), len: N as usize, bytes }
    }

    fn get(&self, i: usize) -> DesignSlot {
        assert!(i < self.len);
        // SAFETY: in bounds of the mapping; the kernel's concurrent adds make a torn read of
        // one counter impossible (aligned 8-byte loads), only a slightly stale one.
        unsafe { std::ptr::read_volatile(self.ptr.add(i)) }
    }
}

impl Drop for Slots {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `map`.
        unsafe { libc::munmap(self.ptr as *mut _, self.bytes) };
    }
}

/// Median ms of three calls of `f`.
fn ms(mut f: impl FnMut()) -> f64 {
    median(
        (0..3)
            .map(|_| {
                let t = Instant::now();
                f();
                t.elapsed().as_secs_f64() * 1e3
            })
            .collect(),
    )
}

pub(super) fn layouts() {
    let started = Instant::now();
    let mut ebpf = load();
    let mut empty = EmptyProgram::load();
    let (hot, other) = (packet(N / 2), packet(N / 2 + 1));
    let te = empty.time(&hot);
    let ncpu = nr_cpus().unwrap().get() as usize;
    let mut rows = Vec::new();
    for (name, what) in PROGRAMS {
        let p: &SchedClassifier = ebpf.program(name).unwrap().try_into().unwrap();
        let alone = sampled(|| run(p, &hot, REPEAT));
        let same = concurrent(p, &hot, &hot);
        let different = concurrent(p, &hot, &other);
        rows.push((what, alone - te, same - te, different - te));
    }
    // Every repeat counted: 1 + 2 + 1 threads of SAMPLES x REPEAT on the hot client and 1 on
    // the other, per program.
    let hot_packets = 4 * SAMPLES as u64 * REPEAT as u64;
    let all_packets = hot_packets + SAMPLES as u64 * REPEAT as u64;
    let slots = Slots::map(&ebpf);
    let s = slots.get((N / 2) as usize);
    assert_eq!(s.up_packets, 2 * hot_packets, "both array programs counted every repeat on the shared slot");

    // Poll cost: every counter read once.
    let aya::maps::Map::PerCpuHashMap(percpu) = ebpf.map("DESIGN_PERCPU").unwrap() else { panic!("DESIGN_PERCPU") };
    let chunk = tunmeter::bpf::batch::default_chunk::<ClientKey, ClientCounters>(ncpu);
    let mut seen = 0u64;
    let hash_ms = ms(|| {
        seen = 0;
        tunmeter::bpf::batch::for_each_percpu(percpu, chunk, |_: ClientKey, v: &[ClientCounters]| {
            seen += tunmeter::bpf::counters::sum_cpus(v.iter()).up_packets;
        })
        .unwrap();
    });
    assert_eq!(seen, all_packets, "the batched read saw every packet of the per-CPU hash");
    let mut total = 0u64;
    let array_ms = ms(|| {
        total = (0..slots.len).map(|i| slots.get(i).up_packets).sum();
    });
    assert_eq!(total, 2 * all_packets, "the mapped slots hold every packet of both array programs");

    // Change tracking: the next poll generation, then K clients active; the poll drains the ring
    // and reads those slots only.
    let mut ring_rows = Vec::new();
    let mut generation = 1u64;
    for k in [1_000u32, N] {
        generation += 1;
        {
            let mut g: Array<_, u64> = Array::try_from(ebpf.map_mut("DESIGN_POLL_GEN").unwrap()).unwrap();
            g.set(0, &generation, 0).unwrap();
        }
        let dirty: &SchedClassifier = ebpf.program("design_shared_array_dirty").unwrap().try_into().unwrap();
        for i in 0..k {
            run(dirty, &packet(i * (N / k)), 1);
        }
        let mut ring = RingBuf::try_from(ebpf.map_mut("DESIGN_ACTIVE").unwrap()).unwrap();
        let t = Instant::now();
        let (mut listed, mut sum) = (0u32, 0u64);
        while let Some(item) = ring.next() {
            let i = u32::from_ne_bytes(item[..4].try_into().unwrap());
            sum += slots.get(i as usize).up_packets;
            listed += 1;
        }
        let took = t.elapsed().as_secs_f64() * 1e3;
        assert_eq!(listed, k, "each active slot listed once");
        assert!(sum >= k as u64);
        ring_rows.push((k, took));
    }
    drop(slots);

    println!(
        "## Counter layouts (prototypes, {N} clients): per-CPU hash vs shared mmapable array vs array + change tracking"
    );
    println!(
        "Packet cost: BPF_PROG_TEST_RUN ns/packet minus the empty program (median of {SAMPLES} runs of {REPEAT}); \
         \"both CPUs\": CPU 0 and CPU 1 run the program at the same time (threads pinned), on the same client \
         (one slot, its cache line moving between the CPUs) or on two clients. Each prototype counts one \
         direction of an IPv4 packet as the real program does (hash lookup by the 16-byte key, two adds, a \
         last-seen store), without the subnet and device checks."
    );
    println!();
    println!("| layout | alone | both CPUs, same client | both CPUs, different clients |");
    println!("|---|---:|---:|---:|");
    for (what, a, s, d) in &rows {
        println!("| {what} | {a:.1} | {s:.1} | {d:.1} |");
    }
    println!();
    let kib = |b: f64| b / 1024.0;
    println!(
        "Poll cost, every counter read once from userspace: per-CPU hash, batched (BPF_MAP_LOOKUP_BATCH, {} values \
         per entry): {hash_ms:.1} ms; shared array through mmap, no syscall: {array_ms:.2} ms ({:.0}x less). \
         Bytes a poll reads: per-CPU hash {:.0} KiB here ({N} x {ncpu} CPUs x 40 B, keys aside), {:.0} MiB on a \
         64-CPU server; shared array {:.0} KiB on any ({N} x 64 B).",
        ncpu,
        hash_ms / array_ms.max(1e-6),
        kib((N as usize * ncpu * 40) as f64),
        (N as f64 * 64.0 * 40.0) / (1 << 20) as f64,
        kib(N as f64 * 64.0)
    );
    println!();
    for (k, took) in ring_rows {
        println!(
            "Change tracking, {k} of {N} clients active since the last poll: draining the ring and reading those \
             slots took {took:.2} ms."
        );
    }
    println!();
    println!("This section took {:.0} s.", started.elapsed().as_secs_f64());
    println!();
}
