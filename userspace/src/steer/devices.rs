//! The `FWD_DEVICES` map: the (protocol, device address, device port) of every forward rule,
//! rebuilt from `FWD_RULES` after each rule change (under the steering lock), so the egress
//! program can drop a device's packets that have no flow instead of leaking its VPN address.

use std::collections::BTreeMap;

use aya::maps::{HashMap, Map, MapData};
use tracing::warn;
use tunmeter_common::{DeviceKey, FwdDevice, MAP_FWD_DEVICES};

use super::table::{SteerError, SteerMaps, map_err};

impl SteerMaps {
    /// Make `FWD_DEVICES` hold exactly the devices of the forward rules. Pins made by an older
    /// daemon have no such map: then nothing is done (with a warning) until the daemon, started
    /// again, creates it.
    pub(super) fn sync_devices(&self) -> Result<(), SteerError> {
        let want: BTreeMap<DeviceKey, FwdDevice> = self
            .fwd_rules()?
            .iter()
            .filter_map(Result::ok)
            .map(|(k, r)| {
                let key =
                    DeviceKey { device_addr: r.device_addr, device_port_be: r.device_port_be, proto: k.proto, _pad: 0 };
                (key, FwdDevice { rule_id: r.rule_id })
            })
            .collect();
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
        Ok(())
    }
}
