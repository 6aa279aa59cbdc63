//! The dataplane the daemon owns: the loaded programs (one instance per device layer), their
//! attachments, the pinned maps and the pin-directory lock. `start` brings it up (and rolls
//! back on failure); `reconcile` keeps attachments and client subnets in line with the devices.

use std::{collections::BTreeMap, time::Instant};

use tracing::{error, info, warn};

use super::DaemonError;
use crate::{
    bpf::{
        attach::{self, Attached, Mode},
        clock,
        links::LinkTable,
        loader::{Instance, LoadOptions, PinnedMaps, effective_forward_flows, effective_max_clients},
        system,
    },
    config::{Config, InterfaceConfig},
    selfcheck::Watched,
    types::Layer,
};

/// Everything the running daemon owns.
pub struct Dataplane {
    pub cfg: Config,
    pub mode: Mode,
    maps: PinnedMaps,
    instances: BTreeMap<Layer, Instance>,
    pub attached: BTreeMap<String, Attached>,
    _pin_lock: system::DirLock,
    /// What the subnet map holds now (ifindex -> subnets).
    synced_subnets: BTreeMap<u32, Vec<ipnet::IpNet>>,
}

impl Dataplane {
    /// Load programs and attach every configured interface. On error, everything this call
    /// created is removed again (pins of a fresh pin directory included).
    pub fn start(cfg: Config, links: &LinkTable) -> Result<Dataplane, DaemonError> {
        for i in &cfg.interfaces {
            let link = links.get(&i.name).ok_or_else(|| DaemonError::MissingInterface(i.name.clone()))?;
            if link.layer != Some(i.layer) {
                return Err(DaemonError::WrongLayer {
                    name: i.name.clone(),
                    configured: i.layer,
                    actual: link
                        .layer
                        .map(|l| format!("{l:?}"))
                        .unwrap_or_else(|| "neither Ethernet nor raw IP".into()),
                });
            }
        }
        let mode = Mode::resolve(cfg.attach_mode)?;
        let fresh = !cfg.pin_dir.exists();
        if fresh {
            std::fs::create_dir_all(&cfg.pin_dir).map_err(|e| system::io_err(&cfg.pin_dir, e))?;
        }
        // The pin directory is locked too, so `tunmeter detach` refuses whatever state
        // directory it is given while a daemon uses these pins.
        let pin_lock = match system::lock_dir(&cfg.pin_dir) {
            Ok(l) => l,
            Err(e) => {
                if fresh {
                    let _ = attach::remove_pins(&cfg.pin_dir);
                }
                return Err(e.into());
            }
        };
        let mut dp = Dataplane {
            _pin_lock: pin_lock,
            maps: PinnedMaps::new(&cfg.pin_dir),
            cfg,
            mode,
            instances: BTreeMap::new(),
            attached: BTreeMap::new(),
            synced_subnets: BTreeMap::new(),
        };
        match dp.bring_up(links) {
            Ok(()) => Ok(dp),
            Err(e) => {
                dp.roll_back(fresh);
                Err(e)
            }
        }
    }

    fn bring_up(&mut self, links: &LinkTable) -> Result<(), DaemonError> {
        let max = effective_max_clients(&self.cfg.pin_dir, self.cfg.max_clients);
        let forward_flows = effective_forward_flows(&self.cfg.pin_dir, self.cfg.steer.max_forward_flows);
        for layer in self.cfg.interfaces.iter().map(|i| i.layer).collect::<std::collections::BTreeSet<_>>() {
            let opts = LoadOptions {
                redirect_mark: self.cfg.steer.policy.mark,
                wire_bytes: self.cfg.count_wire_bytes,
                forward_flows,
            };
            self.instances.insert(layer, Instance::load_with(layer, &self.cfg.pin_dir, max, opts)?);
        }
        self.maps.ensure_slots()?;
        // Interfaces attached by an earlier run but no longer configured: stop counting there.
        for name in attach::pinned_interfaces(&self.cfg.pin_dir) {
            if !self.cfg.interfaces.iter().any(|i| i.name == name) {
                attach::detach_interface(&self.cfg.pin_dir, &name, None, Mode::Tcx)?;
                warn!(iface = name, "detached: attached by an earlier run but no longer configured");
            }
        }
        let first = self.instances.values_mut().next().expect("at least one interface");
        clock::pin(first, &self.cfg.pin_dir)?;
        self.reconcile(links)?;
        Ok(())
    }

    /// Remove what this run attached (adopted links stay: they were there before), and the
    /// whole pin directory if this run created it.
    fn roll_back(&mut self, fresh_pin_dir: bool) {
        for (name, a) in std::mem::take(&mut self.attached) {
            if !a.adopted
                && let Err(e) = attach::detach_interface(&self.cfg.pin_dir, &name, Some(a.ifindex), self.mode)
            {
                error!(iface = name, %e, "rollback: detaching failed");
            }
        }
        self.instances.clear();
        if fresh_pin_dir && let Err(e) = attach::remove_pins(&self.cfg.pin_dir) {
            error!(path = %self.cfg.pin_dir.display(), %e, "rollback: removing pins failed");
        }
    }

    /// Make attachments match the devices that exist now: point the subnet map at the current
    /// interface indexes (before attaching, so a device's first packets already find its
    /// subnets), attach new or re-created devices, and forget vanished ones.
    pub fn reconcile(&mut self, links: &LinkTable) -> Result<(), DaemonError> {
        let present = |i: &InterfaceConfig| links.get(&i.name).filter(|l| l.layer == Some(i.layer)).map(|l| l.ifindex);
        let wanted: BTreeMap<u32, Vec<ipnet::IpNet>> =
            self.cfg.interfaces.iter().filter_map(|i| present(i).map(|idx| (idx, i.subnets.clone()))).collect();
        if wanted != self.synced_subnets {
            self.maps.sync_subnets(&wanted)?;
            self.synced_subnets = wanted;
        }
        // One failing interface must not keep the others from being (re-)attached: each is
        // tried on its own, and the first error is reported after all were tried.
        let mut first_err = None;
        for i in self.cfg.interfaces.clone() {
            if let Err(e) = self.reconcile_one(&i, present(&i)) {
                error!(iface = i.name, %e, "attaching failed");
                first_err.get_or_insert(e);
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    /// The attached devices, for the self-check.
    pub fn watched(&self) -> Vec<Watched> {
        self.cfg
            .interfaces
            .iter()
            .filter_map(|i| {
                let a = self.attached.get(&i.name)?;
                Some(Watched { name: i.name.clone(), ifindex: a.ifindex, layer: i.layer })
            })
            .collect()
    }

    fn reconcile_one(&mut self, i: &InterfaceConfig, now: Option<u32>) -> Result<(), DaemonError> {
        let had = self.attached.get(&i.name).map(|a| a.ifindex);
        if now == had {
            return Ok(());
        }
        if let Some(old) = self.attached.remove(&i.name) {
            warn!(iface = i.name, old_ifindex = old.ifindex, "interface went away; will re-attach when it returns");
            attach::detach_interface(&self.cfg.pin_dir, &i.name, None, self.mode)?;
        }
        if let Some(ifindex) = now {
            let started = Instant::now();
            let inst = self.instances.get_mut(&i.layer).expect("instance loaded for every configured layer");
            let a = attach::attach_interface(inst, &i.name, ifindex, &self.cfg.pin_dir, self.mode)?;
            info!(
                iface = i.name,
                ifindex,
                adopted = a.adopted,
                took_ms = started.elapsed().as_millis() as u64,
                "interface attached"
            );
            self.attached.insert(i.name.clone(), a);
        }
        Ok(())
    }
}
