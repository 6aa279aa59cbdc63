//! The `FWD_DEVICES` map (the (protocol, device address, device port) of every forward rule)
//! and its port bitmap `FWD_DEVICE_PORTS`, rebuilt from `FWD_RULES` after each rule change, so
//! the egress program can drop a device's packets that have no flow instead of leaking them;
//! then the public ports without a rule (`hints`).

use std::collections::BTreeMap;

use aya::maps::{HashMap, Map, MapData};
use tracing::warn;
use tunmeter_common::{DeviceKey, FWD_DEVICE_PORT_WORDS, FwdDevice, MAP_FWD_DEVICE_PORTS, MAP_FWD_DEVICES};

use super::{
    hints::write_bitmap,
    table::{SteerError, SteerMaps, map_err},
};

impl SteerMaps {
    /// Make `FWD_DEVICES` hold exactly the devices of the forward rules. Pins made by an older
    /// daemon have no such map: then nothing is done (with a warning) until the daemon, started
    /// again, creates it.
    pub(super) fn sync_devices(&self) -> Result<(), SteerError> {
        let rules: Vec<_> = self.fwd_rules()?.iter().filter_map(Result::ok).collect();
        let want: BTreeMap<DeviceKey, FwdDevice> = rules
            .iter()
            .map(|(k, r)| {
                let key =
                    DeviceKey { device_addr: r.device_addr, device_port_be: r.device_port_be, proto: k.proto, _pad: 0 };
                (key, FwdDevice { rule_id: r.rule_id })
            })
            .collect();
        // The bitmap first when adding (a set bit without its entry only costs a lookup), the
        // table first when removing: a packet never finds an entry whose bit is clear.
        self.sync_device_ports(&want, true)?;
        let data = match self.open(MAP_FWD_DEVICES) {
            Ok(d) => d,
            Err(SteerError::NoMaps(dir)) => {
                warn!(dir = %dir.display(), "no {MAP_FWD_DEVICES} map pinned (maps of an older daemon): restart the daemon so that packets of devices without a flow are dropped");
                return Ok(());
            }
            Err(e) => return Err(e),
        };
        let mut map: HashMap<MapData, DeviceKey, FwdDevice> =
            HashMap::try_from(Map::HashMap(data)).map_err(map_err(MAP_FWD_DEVICES))?;
        let have: Vec<(DeviceKey, FwdDevice)> = map.iter().filter_map(Result::ok).collect();
        for (k, _) in have.iter().filter(|(k, _)| !want.contains_key(k)) {
            map.remove(k).map_err(map_err(MAP_FWD_DEVICES))?;
        }
        for (k, v) in &want {
            if !have.iter().any(|(hk, hv)| hk == k && hv == v) {
                map.insert(k, v, 0).map_err(map_err(MAP_FWD_DEVICES))?;
            }
        }
        self.sync_device_ports(&want, false)?;
        self.sync_ruleless_ports(&rules.iter().map(|(k, _)| u16::from_be(k.port_be)).collect())
    }

    /// Set the bits of `want`'s ports; with `only_add` false, also clear every other bit.
    fn sync_device_ports(&self, want: &BTreeMap<DeviceKey, FwdDevice>, only_add: bool) -> Result<(), SteerError> {
        let Some(mut bits) = self.derived::<u64>(MAP_FWD_DEVICE_PORTS)? else { return Ok(()) };
        let mut words = vec![0u64; FWD_DEVICE_PORT_WORDS as usize];
        for k in want.keys() {
            let port = u16::from_be(k.device_port_be) as usize;
            words[port / 64] |= 1 << (port % 64);
        }
        write_bitmap(&mut bits, MAP_FWD_DEVICE_PORTS, &words, |held, want| if only_add { held | want } else { want })
    }
}
