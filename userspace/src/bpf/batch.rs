//! Reading a whole per-CPU hash map in few system calls (BPF_MAP_LOOKUP_BATCH), and writing
//! one the same way (BPF_MAP_UPDATE_BATCH).
//!
//! aya 0.16 has no batch operations, and reading element by element costs two syscalls per
//! entry (get-next-key, lookup). `BPF_MAP_LOOKUP_BATCH` (Linux 5.6) copies whole hash buckets
//! into caller buffers, `chunk` entries per call: keys packed at `key_size`, and per key one
//! value slot per *possible* CPU, each `value_size` rounded up to 8 bytes.

use std::{
    io,
    mem::size_of,
    os::fd::{AsFd as _, AsRawFd as _},
    ptr,
};

use aya::{
    Pod,
    maps::{MapData, MapError, MapType},
    sys::SyscallError,
    util::nr_cpus,
};
use tracing::debug;

/// `BPF_MAP_LOOKUP_BATCH` in `enum bpf_cmd`.
const BPF_MAP_LOOKUP_BATCH: libc::c_int = 24;
/// The kernel's internal "operation not supported" (no batch op for this map type); not in libc.
const ENOTSUPP: i32 = 524;
/// Per-call buffer budget used to pick a default chunk: keys and all CPUs' values. The chunk
/// size hardly matters for speed: the kernel copies out bucket by bucket either way (about 64
/// to 200,000 entries per call measured the same).
const CHUNK_BYTES: usize = 256 << 10;

#[derive(Debug, thiserror::Error)]
pub enum BatchError {
    /// The kernel (before 5.6) or the map type has no batch lookup: iterate instead.
    #[error("BPF_MAP_LOOKUP_BATCH is not supported by this kernel or map: {0}")]
    Unsupported(io::Error),
    #[error("BPF_MAP_LOOKUP_BATCH failed: {0}")]
    Syscall(io::Error),
    /// Reading the map's info failed, or its type or key/value sizes do not match.
    #[error(transparent)]
    Map(#[from] MapError),
    #[error("cannot determine the number of possible CPUs: {0}")]
    Cpus(io::Error),
}

impl From<BatchError> for MapError {
    fn from(e: BatchError) -> MapError {
        match e {
            BatchError::Map(e) => e,
            BatchError::Unsupported(io_error) | BatchError::Syscall(io_error) => {
                SyscallError { call: "BPF_MAP_LOOKUP_BATCH", io_error }.into()
            }
            BatchError::Cpus(io_error) => SyscallError { call: "nr_cpus", io_error }.into(),
        }
    }
}

/// What one full read did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchStats {
    /// Entries passed to the callback.
    pub entries: usize,
    /// bpf(2) calls made.
    pub syscalls: u32,
    /// Chunk size at the end (larger than asked if a bucket did not fit, ENOSPC).
    pub chunk: u32,
}

/// The `batch` member of `union bpf_attr` (include/uapi/linux/bpf.h).
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// BPF_MAP_UPDATE_BATCH (Linux 5.6): write many entries of a per-CPU map in a few system calls;
/// `keys[i]` gets `values[i * ncpus..][..ncpus]`. `V`'s size must be a multiple of 8 (the kernel's
/// per-CPU slot), so the slice is laid out as the kernel expects. For filling maps in tests and
/// benchmarks.
pub fn update_percpu<K: Pod, V: Pod>(map: &MapData, keys: &[K], values: &[V], ncpus: usize) -> io::Result<()> {
    const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;
    const CHUNK: usize = 8192;
    assert_eq!(size_of::<V>() % 8, 0, "per-CPU values must fill 8-byte slots");
    assert_eq!(values.len(), keys.len() * ncpus);
    for (k, v) in keys.chunks(CHUNK).zip(values.chunks(CHUNK * ncpus)) {
        let mut attr = BatchAttr {
            keys: k.as_ptr() as u64,
            values: v.as_ptr() as u64,
            count: k.len() as u32,
            map_fd: map.fd().as_fd().as_raw_fd() as u32,
            ..BatchAttr::default()
        };
        // SAFETY: `attr` is a complete `batch` attribute of the size passed; its pointers name
        // `count` keys and `count * ncpus` values that live across the call (read only).
        let ret = unsafe {
            libc::syscall(libc::SYS_bpf, BPF_MAP_UPDATE_BATCH, &mut attr as *mut BatchAttr, size_of::<BatchAttr>())
        };
        if ret != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// A chunk size that keeps one call's buffers near 256 KiB for this map layout.
pub fn default_chunk<K, V>(ncpus: usize) -> u32 {
    let entry = size_of::<K>() + ncpus * size_of::<V>().next_multiple_of(8);
    (CHUNK_BYTES / entry.max(1)).clamp(64, 16_384) as u32
}

/// Call `f(key, values)` for every entry of the per-CPU hash `map`, with one value per possible
/// CPU, reading `chunk` entries per system call (at least; grown when a bucket does not fit).
///
/// The map's type and key/value sizes are checked against `K` and `V` first, so the kernel
/// never writes past the buffers. An entry inserted or removed during the read may or may not
/// be seen, but none is seen twice (the read goes bucket by bucket, and a key always hashes to
/// the same bucket).
pub fn for_each_percpu<K: Pod, V: Pod>(
    map: &MapData,
    chunk: u32,
    mut f: impl FnMut(K, &[V]),
) -> Result<BatchStats, BatchError> {
    let info = map.info()?;
    let map_type = info.map_type()?;
    if !matches!(map_type, MapType::PerCpuHash | MapType::LruPerCpuHash) {
        return Err(MapError::InvalidMapType { map_type: map_type as u32 }.into());
    }
    let (key_size, value_size) = (size_of::<K>(), size_of::<V>());
    if info.key_size() as usize != key_size {
        return Err(MapError::InvalidKeySize { size: key_size, expected: info.key_size() as usize }.into());
    }
    if info.value_size() as usize != value_size {
        return Err(MapError::InvalidValueSize { size: value_size, expected: info.value_size() as usize }.into());
    }
    let ncpus = nr_cpus().map_err(|(_, e)| BatchError::Cpus(e))?.get() as usize;
    let entry_values = ncpus * value_size.next_multiple_of(8);
    // A bucket never holds more than the map's capacity, so growing stops there.
    let max_chunk = info.max_entries().max(1);
    let mut chunk = chunk.clamp(1, max_chunk);

    let mut keys = Vec::new();
    let mut values = Vec::new();
    let mut scratch: Vec<V> = Vec::with_capacity(ncpus);
    // Hash maps use a u32 bucket index as the batch token; 8 bytes leave room to spare.
    let (mut token_in, mut token_out) = (0u64, 0u64);
    let mut stats = BatchStats { entries: 0, syscalls: 0, chunk };
    loop {
        keys.resize(chunk as usize * key_size, 0u8);
        values.resize(chunk as usize * entry_values, 0u8);
        let mut attr = BatchAttr {
            in_batch: if stats.syscalls == 0 { 0 } else { ptr::from_ref(&token_in) as u64 },
            out_batch: ptr::from_mut(&mut token_out) as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: chunk,
            map_fd: map.fd().as_fd().as_raw_fd() as u32,
            ..BatchAttr::default()
        };
        // SAFETY: `attr` is a complete `batch` attribute and the size passed is its size. Its
        // pointers name live, exclusively borrowed buffers: `keys` holds `chunk` keys of the
        // map's key size, `values` holds `chunk` times `ncpus` value slots of the map's value
        // size rounded up to 8 (the sizes were checked against the map above; `ncpus` is the
        // number of possible CPUs, as the kernel uses), and the tokens are 8 bytes each, of
        // which the kernel reads and writes 4.
        let ret = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_LOOKUP_BATCH,
                ptr::from_mut(&mut attr),
                size_of::<BatchAttr>() as libc::c_uint,
            )
        };
        stats.syscalls += 1;
        let last = if ret == 0 {
            false
        } else {
            let err = io::Error::last_os_error();
            match err.raw_os_error() {
                // The end of the map; `count` says how many entries this last call returned.
                Some(libc::ENOENT) => true,
                // The next bucket holds more than `chunk` entries: retry it with more room.
                Some(libc::ENOSPC) if chunk < max_chunk => {
                    chunk = chunk.saturating_mul(2).min(max_chunk);
                    stats.chunk = chunk;
                    debug!(chunk, "batch lookup: bucket larger than the chunk, growing");
                    continue;
                }
                Some(libc::EINVAL | libc::EOPNOTSUPP | ENOTSUPP) => return Err(BatchError::Unsupported(err)),
                _ => return Err(BatchError::Syscall(err)),
            }
        };
        let n = attr.count.min(chunk) as usize;
        decode(&keys[..n * key_size], &values[..n * entry_values], ncpus, &mut scratch, &mut f);
        stats.entries += n;
        if last {
            return Ok(stats);
        }
        token_in = token_out;
    }
}

/// Pass each entry of a batch to `f`: `keys` packed, and per key `ncpus` value slots of
/// `size_of::<V>()` rounded up to 8 bytes. `scratch` holds one key's values.
fn decode<K: Pod, V: Pod>(keys: &[u8], values: &[u8], ncpus: usize, scratch: &mut Vec<V>, f: &mut impl FnMut(K, &[V])) {
    let stride = size_of::<V>().next_multiple_of(8);
    for (key, vals) in keys.chunks_exact(size_of::<K>()).zip(values.chunks_exact(ncpus * stride)) {
        scratch.clear();
        scratch.extend(vals.chunks_exact(stride).map(read_pod::<V>));
        f(read_pod(key), scratch);
    }
}

/// A `T` from the first `size_of::<T>()` bytes of `bytes` (which may be unaligned).
fn read_pod<T: Pod>(bytes: &[u8]) -> T {
    let bytes = &bytes[..size_of::<T>()];
    // SAFETY: `bytes` holds exactly size_of::<T>() initialized bytes, read without alignment
    // requirements, and every bit pattern is a valid `T` (Pod).
    unsafe { ptr::read_unaligned(bytes.as_ptr().cast::<T>()) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_cpu_slots_are_rounded_up_to_8_bytes() {
        // Two u32 keys, then per key 3 CPUs of a 12-byte value in 16-byte slots (the padding is
        // skipped), all at an odd address (the buffers need no alignment).
        let keys: Vec<u8> = [0xEE].into_iter().chain([7u32, 9].iter().flat_map(|k| k.to_ne_bytes())).collect();
        let mut values = vec![0xEE];
        for key in [7u32, 9] {
            for cpu in 0..3 {
                values.extend([key, cpu, 100 + cpu].iter().flat_map(|w| w.to_ne_bytes()));
                values.extend([0xAA; 4]);
            }
        }
        let mut got = Vec::new();
        decode(&keys[1..], &values[1..], 3, &mut Vec::new(), &mut |k: u32, v: &[[u32; 3]]| got.push((k, v.to_vec())));
        let want = |k| (k, vec![[k, 0, 100], [k, 1, 101], [k, 2, 102]]);
        assert_eq!(got, [want(7), want(9)]);
    }

    #[test]
    fn default_chunk_keeps_buffers_near_256_kib() {
        assert_eq!(default_chunk::<[u8; 16], [u64; 5]>(2), (256 << 10) / (16 + 80));
        assert_eq!(default_chunk::<[u8; 16], [u64; 5]>(4096), 64);
        assert_eq!(default_chunk::<u8, u8>(1), 16_384);
    }
}
