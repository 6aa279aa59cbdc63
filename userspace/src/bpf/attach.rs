//! Attaching the counting programs to interfaces, keeping them attached across daemon
//! restarts, and removing them.
//!
//! TCX (kernel >= 6.6): each attachment is a BPF link pinned at
//! `<pin_dir>/links/<ingress|egress>:<ifname>`. The pinned link keeps counting while no daemon
//! runs (even after `kill -9`). A restarted daemon finds the pin, checks that the link is still
//! attached to the same device, and swaps its program atomically (`bpf_link_update`): no packet
//! is missed and none is counted twice, because there is exactly one attachment at every instant.
//!
//! Netlink (older kernels, or `attach_mode = "netlink"`): a cls_bpf filter on a clsact qdisc.
//! Filters sit at a fixed priority and handle ([`NL_PRIORITY`], [`NL_HANDLE`]) and outlive the
//! daemon too; a restart replaces ours in place (a short gap is possible).

use std::{
    io,
    mem::ManuallyDrop,
    path::{Path, PathBuf},
};

use aya::{
    programs::{
        Link as _, LinkOrder, ProgramError, SchedClassifier, TcAttachType,
        links::{FdLink, LinkError, PinnedLink},
        tc::{self, NlOptions, SchedClassifierLink, TcAttach, TcError, TcHandle},
    },
    util::KernelVersion,
};
use tracing::{debug, info, warn};

use crate::{
    bpf::loader::{Instance, PROG_EGRESS, PROG_INGRESS},
    types::AttachMode,
};

#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    #[error("attaching {prog} to {iface} ({dir}): {source}")]
    Program { prog: &'static str, iface: String, dir: &'static str, source: Box<ProgramError> },
    #[error("link of {iface} ({dir}): {source}")]
    Link { iface: String, dir: &'static str, source: LinkError },
    #[error("pinning the link of {iface} ({dir}) at {path}: {reason}")]
    Pin { iface: String, dir: &'static str, path: PathBuf, reason: String },
    #[error("clsact qdisc on {iface}: {source}")]
    Qdisc { iface: String, source: TcError },
    #[error("TCX attachment needs kernel >= 6.6 (this is {0}); use attach_mode = \"netlink\" or \"auto\"")]
    NoTcx(String),
    #[error("querying the TCX programs of {iface} ({dir}): {source}")]
    Query { iface: String, dir: &'static str, source: io::Error },
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
}

/// The two hook points of a device, with the program and pin name of each.
pub const HOOKS: [(TcAttachType, &str, &str); 2] =
    [(TcAttachType::Ingress, PROG_INGRESS, "ingress"), (TcAttachType::Egress, PROG_EGRESS, "egress")];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Tcx,
    Netlink,
}

impl Mode {
    pub fn resolve(wanted: AttachMode) -> Result<Mode, AttachError> {
        let tcx = KernelVersion::current().is_ok_and(|v| v >= KernelVersion::new(6, 6, 0));
        match wanted {
            AttachMode::Auto if tcx => Ok(Mode::Tcx),
            AttachMode::Auto | AttachMode::Netlink => Ok(Mode::Netlink),
            AttachMode::Tcx if tcx => Ok(Mode::Tcx),
            AttachMode::Tcx => Err(AttachError::NoTcx(
                KernelVersion::current().map(|v| v.to_string()).unwrap_or_else(|e| e.to_string()),
            )),
        }
    }
}

/// What keeps one hook attached.
enum Held {
    /// A TCX link; the bpffs pin keeps it alive, the fd is ours while we run.
    Tcx(#[allow(dead_code)] SchedClassifierLink),
    /// A netlink filter. Never dropped by us: dropping would remove the filter, and the filter
    /// must outlive the daemon. `detach` removes it by name.
    Netlink(#[allow(dead_code)] ManuallyDrop<SchedClassifierLink>),
}

/// One interface with both hooks attached.
pub struct Attached {
    pub ifindex: u32,
    /// True if at least one hook was adopted from a previous daemon run.
    pub adopted: bool,
    _held: Vec<Held>,
}

pub fn links_dir(pin_dir: &Path) -> PathBuf {
    pin_dir.join("links")
}

/// Pin path of one hook's link: `links/<dir>:<ifname>`. bpffs refuses names with a dot, and
/// interface names may have one (VLANs: `eth0.100`), so dots become `:`, which interface names
/// cannot contain.
fn link_pin(pin_dir: &Path, iface: &str, dir: &str) -> PathBuf {
    links_dir(pin_dir).join(format!("{dir}:{}", iface.replace('.', ":")))
}

/// Attach (or adopt) both hooks of `iface`. If the second hook fails, the first is undone:
/// an interface is either fully attached or not at all.
pub fn attach_interface(
    inst: &mut Instance,
    iface: &str,
    ifindex: u32,
    pin_dir: &Path,
    mode: Mode,
) -> Result<Attached, AttachError> {
    let mut held = Vec::new();
    let mut adopted = false;
    for (attach_type, prog_name, dir) in HOOKS {
        let prog = inst.program_mut(prog_name);
        let result = attach_hook(prog, iface, ifindex, pin_dir, mode, attach_type, dir);
        match result {
            Ok((h, was_adopted)) => {
                adopted |= was_adopted;
                held.push(h);
            }
            Err(e) => {
                if !adopted && !held.is_empty() {
                    // Undo what this call attached (never an adopted attachment: it predates us).
                    let _ = detach_interface(pin_dir, iface, Some(ifindex), mode);
                }
                return Err(e);
            }
        }
    }
    Ok(Attached { ifindex, adopted, _held: held })
}

/// One hook: adopt what a previous run left, or attach anew. An attachment of the *other*
/// mode (left by a run with another `attach_mode`) is removed first, else both would count.
fn attach_hook(
    prog: &mut SchedClassifier,
    iface: &str,
    ifindex: u32,
    pin_dir: &Path,
    mode: Mode,
    attach_type: TcAttachType,
    dir: &'static str,
) -> Result<(Held, bool), AttachError> {
    let path = link_pin(pin_dir, iface, dir);
    match mode {
        Mode::Tcx => {
            if remove_netlink_filter(ifindex, attach_type) {
                warn!(iface, dir, "removed a netlink filter left by a run in netlink mode");
            }
            match adopt_tcx(prog, &path, ifindex, attach_type, iface, dir)? {
                Some(link) => Ok((link, true)),
                None => Ok((attach_tcx(prog, &path, ifindex, attach_type, iface, dir)?, false)),
            }
        }
        Mode::Netlink => {
            if path.exists() {
                remove_pin(&path)?;
                warn!(iface, dir, "removed a TCX link left by a run in TCX mode");
            }
            attach_netlink(prog, ifindex, attach_type, iface, dir)
        }
    }
}

/// If a pinned link for this hook is still attached to `ifindex`, give it our program.
/// A stale pin (device gone or re-created) is removed.
fn adopt_tcx(
    prog: &mut SchedClassifier,
    path: &Path,
    ifindex: u32,
    attach_type: TcAttachType,
    iface: &str,
    dir: &'static str,
) -> Result<Option<Held>, AttachError> {
    let pinned = match PinnedLink::from_pin(path) {
        Ok(p) => p,
        Err(_) if !path.exists() => return Ok(None),
        Err(source) => return Err(AttachError::Link { iface: iface.into(), dir, source }),
    };
    let fd = FdLink::from(pinned);
    let prog_id = fd.info().map_err(|source| AttachError::Link { iface: iface.into(), dir, source })?.program_id();
    // A failed query must not be read as "stale": removing a live pin would stop counting.
    let live = tcx_prog_ids(ifindex, attach_type)
        .map_err(|e| AttachError::Query { iface: iface.into(), dir, source: e })?
        .contains(&prog_id);
    if !live {
        drop(fd);
        remove_pin(path)?;
        debug!(iface, dir, "removed stale link pin");
        return Ok(None);
    }
    let link =
        SchedClassifierLink::try_from(fd).map_err(|source| AttachError::Link { iface: iface.into(), dir, source })?;
    let prog_err =
        |source| AttachError::Program { prog: "link update", iface: iface.into(), dir, source: Box::new(source) };
    let id = prog.attach_to_link(link).map_err(prog_err)?;
    let link = prog.take_link(id).map_err(prog_err)?;
    info!(iface, dir, old_prog = prog_id, "adopted pinned link; program replaced atomically");
    Ok(Some(Held::Tcx(link)))
}

/// The ids of the programs attached to a TCX hook, by a raw `BPF_PROG_QUERY`. aya's
/// `SchedClassifier::query_tcx` also turns each id into an fd (`BPF_PROG_GET_FD_BY_ID`), which
/// needs CAP_SYS_ADMIN; the ids alone need only CAP_NET_ADMIN, so the unit can drop CAP_SYS_ADMIN.
fn tcx_prog_ids(ifindex: u32, attach_type: TcAttachType) -> io::Result<Vec<u32>> {
    const BPF_PROG_QUERY: libc::c_long = 16;
    const BPF_TCX_INGRESS: u32 = 46;
    const BPF_TCX_EGRESS: u32 = 47;
    /// The `query` member of `union bpf_attr` (linux/bpf.h), up to `revision`.
    #[repr(C)]
    #[derive(Default)]
    struct QueryAttr {
        target_ifindex: u32,
        attach_type: u32,
        query_flags: u32,
        attach_flags: u32,
        prog_ids: u64,
        prog_cnt: u32,
        _pad: u32,
        prog_attach_flags: u64,
        link_ids: u64,
        link_attach_flags: u64,
        revision: u64,
    }
    let attach_type = match attach_type {
        TcAttachType::Ingress => BPF_TCX_INGRESS,
        TcAttachType::Egress => BPF_TCX_EGRESS,
    };
    let mut ids = vec![0u32; 64];
    // Bounded: the kernel reports the count it has; a chain that grows between two calls gets
    // a bigger buffer, at most a few times.
    for _ in 0..4 {
        let mut attr = QueryAttr {
            target_ifindex: ifindex,
            attach_type,
            prog_ids: ids.as_mut_ptr() as u64,
            prog_cnt: ids.len() as u32,
            ..Default::default()
        };
        // SAFETY: `attr` is a valid bpf_attr prefix; `prog_ids` points to `prog_cnt` u32s that
        // outlive the call.
        let ret = unsafe {
            libc::syscall(libc::SYS_bpf, BPF_PROG_QUERY, &mut attr as *mut QueryAttr, size_of::<QueryAttr>())
        };
        if ret == 0 {
            ids.truncate(attr.prog_cnt as usize);
            return Ok(ids);
        }
        let err = io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::ENOSPC) {
            return Err(err);
        }
        ids = vec![0u32; attr.prog_cnt as usize + 16];
    }
    Err(io::Error::from_raw_os_error(libc::ENOSPC))
}

fn attach_tcx(
    prog: &mut SchedClassifier,
    path: &Path,
    ifindex: u32,
    attach_type: TcAttachType,
    iface: &str,
    dir: &'static str,
) -> Result<Held, AttachError> {
    let prog_err = |source| AttachError::Program { prog: "tcx", iface: iface.into(), dir, source: Box::new(source) };
    // First in the chain: a program before ours that ends processing would hide packets.
    let id = prog.attach(ifindex, TcAttach::Tcx { attach_type, order: LinkOrder::first() }).map_err(prog_err)?;
    let link = prog.take_link(id).map_err(prog_err)?;
    let fd: FdLink = link.try_into().map_err(|source| AttachError::Link { iface: iface.into(), dir, source })?;
    let parent = path.parent().expect("pin path has a parent");
    std::fs::create_dir_all(parent).map_err(|source| AttachError::Io { path: parent.into(), source })?;
    let pinned = fd.pin(path).map_err(|e| AttachError::Pin {
        iface: iface.into(),
        dir,
        path: path.into(),
        reason: format!("{e:?}"),
    })?;
    let link = SchedClassifierLink::try_from(FdLink::from(pinned)).map_err(|source| AttachError::Link {
        iface: iface.into(),
        dir,
        source,
    })?;
    info!(iface, ifindex, dir, "attached (tcx, link pinned)");
    Ok(Held::Tcx(link))
}

/// Where our netlink filters sit: a fixed priority and handle on each clsact hook, so a
/// restart can replace exactly our filter without listing the device's other filters.
pub const NL_PRIORITY: u16 = 256;
pub const NL_HANDLE: TcHandle = TcHandle::new(0x746d, 1);

/// Remove our filter from one hook, if there is one.
fn remove_netlink_filter(ifindex: u32, attach_type: TcAttachType) -> bool {
    match SchedClassifierLink::attached(ifindex, attach_type.into(), NL_PRIORITY, NL_HANDLE, None) {
        Ok(link) => link.detach().is_ok(),
        Err(_) => false,
    }
}

fn attach_netlink(
    prog: &mut SchedClassifier,
    ifindex: u32,
    attach_type: TcAttachType,
    iface: &str,
    dir: &'static str,
) -> Result<(Held, bool), AttachError> {
    match tc::qdisc_add_clsact(ifindex) {
        Ok(()) => debug!(iface, "clsact qdisc added"),
        Err(TcError::NetlinkError(e)) if e.raw_os_error() == Some(libc::EEXIST) => {}
        Err(source) => return Err(AttachError::Qdisc { iface: iface.into(), source }),
    }
    let prog_err =
        |source| AttachError::Program { prog: "netlink", iface: iface.into(), dir, source: Box::new(source) };
    // A filter left by a previous run: swap its program in place (no gap, never two filters).
    let existing = SchedClassifierLink::attached(ifindex, attach_type.into(), NL_PRIORITY, NL_HANDLE, None)
        .map_err(|e| prog_err(ProgramError::IOError(e)))?;
    if let Ok(id) = prog.attach_to_link(existing) {
        let link = prog.take_link(id).map_err(prog_err)?;
        info!(iface, ifindex, dir, "adopted the netlink filter of a previous run; program replaced in place");
        return Ok((Held::Netlink(ManuallyDrop::new(link)), true));
    }
    let options = NlOptions { priority: NL_PRIORITY, handle: NL_HANDLE, classid: None };
    let id = prog.attach(ifindex, TcAttach::Netlink { parent: attach_type.into(), options }).map_err(prog_err)?;
    let link = prog.take_link(id).map_err(prog_err)?;
    info!(iface, ifindex, dir, "attached (netlink filter)");
    Ok((Held::Netlink(ManuallyDrop::new(link)), false))
}

fn remove_pin(path: &Path) -> Result<(), AttachError> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(AttachError::Io { path: path.into(), source }),
    }
}

/// Detach one interface's hooks (rollback of a failed start, or a device that went away).
pub fn detach_interface(pin_dir: &Path, iface: &str, ifindex: Option<u32>, mode: Mode) -> Result<(), AttachError> {
    for (attach_type, _, dir) in HOOKS {
        match mode {
            Mode::Tcx => remove_pin(&link_pin(pin_dir, iface, dir))?,
            Mode::Netlink => {
                if let Some(ifindex) = ifindex
                    && !remove_netlink_filter(ifindex, attach_type)
                {
                    debug!(iface, dir, "no filter to remove");
                }
            }
        }
    }
    Ok(())
}

/// Interface names with a link pin under `pin_dir` (attached by this or an earlier run).
pub fn pinned_interfaces(pin_dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(links_dir(pin_dir))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let n = e.file_name().into_string().ok()?;
            let (_, iface) = n.split_once(':')?;
            Some(iface.replace(':', "."))
        })
        .collect();
    names.sort();
    names.dedup();
    names
}

/// Remove every attachment tunmeter made: link pins under `pin_dir` and, on every interface of
/// this network namespace, netlink filters at our priority and handle.
pub fn detach_all(pin_dir: &Path) -> Result<usize, AttachError> {
    let mut removed = 0;
    let dir = links_dir(pin_dir);
    if let Ok(entries) = std::fs::read_dir(&dir) {
        for e in entries.flatten() {
            remove_pin(&e.path())?;
            removed += 1;
        }
    }
    if let Ok(ifaces) = nix::net::if_::if_nameindex() {
        for i in ifaces.iter() {
            for (attach_type, _, _) in HOOKS {
                if remove_netlink_filter(i.index(), attach_type) {
                    removed += 1;
                }
            }
        }
    }
    Ok(removed)
}

/// Remove map pins, link pins and the pin directory.
pub fn remove_pins(pin_dir: &Path) -> std::io::Result<()> {
    match std::fs::remove_dir_all(pin_dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        r => r,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pin_names_round_trip_interface_names_with_dots() {
        let dir = std::env::temp_dir().join(format!("tm-pins-{}", std::process::id()));
        std::fs::create_dir_all(links_dir(&dir)).unwrap();
        for (iface, hook) in [("eth0.100", "ingress"), ("eth0.100", "egress"), ("tun0", "ingress")] {
            let p = link_pin(&dir, iface, hook);
            assert!(!p.file_name().unwrap().to_str().unwrap().contains('.'), "bpffs refuses dots: {p:?}");
            std::fs::write(p, b"").unwrap();
        }
        assert_eq!(pinned_interfaces(&dir), vec!["eth0.100".to_string(), "tun0".to_string()]);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
