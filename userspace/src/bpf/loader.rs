//! Loading the embedded eBPF object, once per device layer, with maps pinned by name so that
//! both instances and every daemon run share the same counters.

use std::{
    collections::BTreeMap,
    net::IpAddr,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{LpmTrie, MapData, MapError, MapInfo, PerCpuArray, PerCpuHashMap, lpm_trie::Key},
    programs::{ProgramError, SchedClassifier},
};
use ipnet::IpNet;
use tracing::{debug, info, warn};
use tunmeter_common::{
    ClientCounters, ClientKey, FWD_FLOW_ENTRIES, GLOBAL_L3_OFFSET, GLOBAL_REDIRECT_MARK, GLOBAL_WIRE_BYTES,
    IfaceCounter, MAP_CLIENT_INDEX, MAP_CLIENTS, MAP_FREE_SLOTS, MAP_FWD_FLOWS, MAP_FWD_INBOUND, MAP_LEGACY_CLIENTS,
    MAP_SUBNETS, RESERVED_SLOTS, SUBNET_FLAG_CLIENTS, SubnetKey, SubnetValue,
};

use crate::types::Layer;

/// The eBPF object built by build.rs.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/tunmeter"));

pub const PROG_INGRESS: &str = "tunmeter_in";
pub const PROG_EGRESS: &str = "tunmeter_out";
/// Reads jiffies for userspace (see `clock`); never attached.
pub const PROG_CLOCK: &str = "tunmeter_clock";

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("loading BPF programs is not permitted: run as root (or with CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON): {0}")]
    Permission(String),
    #[error("loading the eBPF object failed: {0}")]
    Ebpf(#[from] aya::EbpfError),
    #[error(
        "the maps pinned under {dir} have another layout (from another tunmeter version?): {detail}; run `tunmeter detach` (zeroes counters) or use another pin_dir"
    )]
    IncompatiblePins { dir: PathBuf, detail: String },
    #[error("program {name}: {source}")]
    Program { name: &'static str, source: ProgramError },
    #[error("map {name}: {source}")]
    Map { name: &'static str, source: MapError },
    #[error("cannot determine the number of CPUs: {0}")]
    Cpus(String),
    #[error("mapping {name} into memory: {source}")]
    Mmap { name: &'static str, source: std::io::Error },
    #[error(
        "every client slot is taken ({slots} slots): raise max_clients (needs `tunmeter detach`, which zeroes counters)"
    )]
    ClientsFull { slots: u32 },
}

fn is_eperm(text: &str) -> bool {
    text.contains("Operation not permitted") || text.contains("os error 1)") || text.contains("EPERM")
}

/// The load-time globals of an instance besides its layer's L3 offset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoadOptions {
    /// The mark of redirected packets (see `steer::PolicyRoute`).
    pub redirect_mark: u32,
    /// Charge GSO/GRO packets with their segments' wire bytes (`count_wire_bytes`).
    pub wire_bytes: bool,
    /// Entries of each forward flow table (`[steer] max_forward_flows`; pinned tables keep
    /// theirs: `effective_max_entries`).
    pub forward_flows: u32,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            redirect_mark: crate::types::DEFAULT_REDIRECT_MARK,
            wire_bytes: false,
            forward_flows: FWD_FLOW_ENTRIES,
        }
    }
}

/// One loaded instance of the object (programs loaded into the kernel, not yet attached).
pub struct Instance {
    pub ebpf: Ebpf,
}

impl Instance {
    /// Load the object for `layer` with its maps under `pin_dir` and the default options.
    pub fn load(layer: Layer, pin_dir: &Path, max_clients: u32) -> Result<Instance, LoadError> {
        Self::load_with(layer, pin_dir, max_clients, LoadOptions::default())
    }

    /// Load with `opts` (the load-time globals besides the layer's L3 offset).
    pub fn load_with(layer: Layer, pin_dir: &Path, max_clients: u32, opts: LoadOptions) -> Result<Instance, LoadError> {
        let offset = layer.l3_offset();
        let wire = opts.wire_bytes as u32;
        let mut loader = EbpfLoader::new();
        loader
            .override_global(GLOBAL_L3_OFFSET, &offset, true)
            .override_global(GLOBAL_REDIRECT_MARK, &opts.redirect_mark, true)
            .override_global(GLOBAL_WIRE_BYTES, &wire, true)
            .map_max_entries(MAP_CLIENTS, max_clients.saturating_add(RESERVED_SLOTS))
            .map_max_entries(MAP_CLIENT_INDEX, max_clients)
            .map_max_entries(MAP_FREE_SLOTS, max_clients)
            .map_max_entries(MAP_FWD_FLOWS, opts.forward_flows)
            .map_max_entries(MAP_FWD_INBOUND, opts.forward_flows)
            .default_map_pin_directory(pin_dir);
        let mut ebpf = loader.load(EBPF_OBJECT).map_err(|e| {
            let text = format!("{e:?}");
            if is_eperm(&text) {
                LoadError::Permission(e.to_string())
            } else if text.contains("IncompatiblePinnedMap") {
                LoadError::IncompatiblePins { dir: pin_dir.into(), detail: e.to_string() }
            } else {
                LoadError::Ebpf(e)
            }
        })?;
        for name in [PROG_INGRESS, PROG_EGRESS, PROG_CLOCK] {
            let prog: &mut SchedClassifier = ebpf
                .program_mut(name)
                .expect("program in embedded object")
                .try_into()
                .map_err(|source| LoadError::Program { name, source })?;
            prog.load().map_err(|source| {
                let text = format!("{source:?}");
                if is_eperm(&text) {
                    LoadError::Permission(source.to_string())
                } else {
                    LoadError::Program { name, source }
                }
            })?;
        }
        debug!(?layer, offset, "programs loaded");
        Ok(Instance { ebpf })
    }

    pub fn program_mut(&mut self, name: &'static str) -> &mut SchedClassifier {
        self.ebpf.program_mut(name).expect("program in embedded object").try_into().expect("programs are classifiers")
    }
}

/// The capacity to load with: an existing pinned map keeps its capacity (changing it would
/// mean a new, empty map and lost counts), with a warning if the config asks for another.
pub fn effective_max_clients(pin_dir: &Path, wanted: u32) -> u32 {
    effective_max_entries(pin_dir, MAP_CLIENTS, RESERVED_SLOTS, wanted, "client map", "zeroes counters")
}

/// The forward flow tables' entries to load with: pinned tables keep theirs (a new table would
/// forget every forwarded flow), with a warning if the config asks for another.
pub fn effective_forward_flows(pin_dir: &Path, wanted: u32) -> u32 {
    effective_max_entries(pin_dir, MAP_FWD_FLOWS, 0, wanted, "forward flow table", "ends forwarded flows")
}

/// `map`'s pinned capacity less its `reserved` entries if it is pinned (warning when that is
/// not `wanted`), else `wanted`.
fn effective_max_entries(pin_dir: &Path, map: &str, reserved: u32, wanted: u32, what: &str, detach_does: &str) -> u32 {
    match MapInfo::from_pin(pin_dir.join(map)) {
        Ok(info) => {
            let have = info.max_entries().saturating_sub(reserved);
            if have != wanted {
                warn!(
                    have,
                    wanted,
                    "the pinned {what} keeps its capacity; run `tunmeter detach` (which {detach_does}) to change it"
                );
            }
            have
        }
        Err(_) => wanted,
    }
}

/// Typed handles on the pinned maps, opened by path (works without a running daemon).
pub struct PinnedMaps {
    pub dir: PathBuf,
}

impl PinnedMaps {
    pub fn new(dir: &Path) -> Self {
        PinnedMaps { dir: dir.to_owned() }
    }

    pub(crate) fn open(&self, name: &'static str) -> Result<MapData, LoadError> {
        MapData::from_pin(self.dir.join(name)).map_err(|source| LoadError::Map { name, source })
    }

    /// The per-CPU client hash of earlier versions, if it is still pinned.
    pub fn legacy_clients(&self) -> Result<PerCpuHashMap<MapData, ClientKey, ClientCounters>, LoadError> {
        let data = self.open(MAP_LEGACY_CLIENTS)?;
        PerCpuHashMap::try_from(aya::maps::Map::PerCpuHashMap(data))
            .map_err(|source| LoadError::Map { name: MAP_LEGACY_CLIENTS, source })
    }

    /// Kernel id of the legacy client map: the counter epoch the earlier version used.
    pub fn legacy_epoch(&self) -> Result<u32, LoadError> {
        MapInfo::from_pin(self.dir.join(MAP_LEGACY_CLIENTS))
            .map(|i| i.id())
            .map_err(|source| LoadError::Map { name: MAP_LEGACY_CLIENTS, source })
    }

    pub fn subnets(&self) -> Result<LpmTrie<MapData, SubnetKey, SubnetValue>, LoadError> {
        let data = self.open(MAP_SUBNETS)?;
        LpmTrie::try_from(aya::maps::Map::LpmTrie(data)).map_err(|source| LoadError::Map { name: MAP_SUBNETS, source })
    }

    /// Kernel id of the client slot map: part of the ledger's counter epoch. A new map (after
    /// a reboot, or detach and start) has a new id and counters that start from zero.
    pub fn clients_epoch(&self) -> Result<u32, LoadError> {
        MapInfo::from_pin(self.dir.join(MAP_CLIENTS))
            .map(|i| i.id())
            .map_err(|source| LoadError::Map { name: MAP_CLIENTS, source })
    }

    /// The per-interface totals of the self-check (`IFACE_STATS`).
    pub fn iface_stats(&self) -> Result<PerCpuArray<MapData, IfaceCounter>, LoadError> {
        let name = tunmeter_common::MAP_IFACE_STATS;
        PerCpuArray::try_from(aya::maps::Map::PerCpuArray(self.open(name)?))
            .map_err(|source| LoadError::Map { name, source })
    }

    pub fn stats_data(&self) -> Result<MapData, LoadError> {
        self.open(tunmeter_common::MAP_STATS)
    }

    /// Make the subnet map say exactly `wanted` (ifindex -> subnets): add what is missing,
    /// remove entries of other interfaces or subnets (e.g. an old ifindex after re-creation).
    pub fn sync_subnets(&self, wanted: &BTreeMap<u32, Vec<IpNet>>) -> Result<(), LoadError> {
        let mut trie = self.subnets()?;
        let mut want_keys = Vec::new();
        for (ifindex, nets) in wanted {
            for net in nets {
                want_keys.push(subnet_key(*ifindex, net));
            }
        }
        let existing: Vec<Key<SubnetKey>> = trie.keys().filter_map(Result::ok).collect();
        for k in &existing {
            if !want_keys.iter().any(|w| same_key(w, k)) {
                trie.remove(k).map_err(|source| LoadError::Map { name: MAP_SUBNETS, source })?;
            }
        }
        for k in &want_keys {
            if !existing.iter().any(|e| same_key(e, k)) {
                trie.insert(k, &SubnetValue { flags: SUBNET_FLAG_CLIENTS }, 0)
                    .map_err(|source| LoadError::Map { name: MAP_SUBNETS, source })?;
            }
        }
        info!(entries = want_keys.len(), "client subnets set");
        Ok(())
    }
}

/// The client-map key of an address (IPv4 mapped into IPv6).
pub fn ip_key(ip: IpAddr) -> ClientKey {
    match ip {
        IpAddr::V4(a) => ClientKey::v4(a.octets()),
        IpAddr::V6(a) => ClientKey::v6(a.octets()),
    }
}

fn same_key(a: &Key<SubnetKey>, b: &Key<SubnetKey>) -> bool {
    a.prefix_len() == b.prefix_len() && a.data() == b.data()
}

/// LPM key of `net` on `ifindex`.
pub fn subnet_key(ifindex: u32, net: &IpNet) -> Key<SubnetKey> {
    match net {
        IpNet::V4(n) => Key::new(
            SubnetKey::v4_prefix_len(n.prefix_len()),
            SubnetKey { ifindex_be: ifindex.to_be(), addr: ClientKey::v4(n.network().octets()).addr },
        ),
        IpNet::V6(n) => Key::new(
            SubnetKey::v6_prefix_len(n.prefix_len()),
            SubnetKey { ifindex_be: ifindex.to_be(), addr: n.network().octets() },
        ),
    }
}
