//! What the programs read beside the rules. The skip hints `FWD_RULELESS_PORTS` (public ports no
//! forward rule uses) and `REDIRECT_EMPTY` (no redirect rule): a hint says "skip" only where no
//! rule exists, withdrawn before a rule goes in, given after the last is gone. `FWD_RULE_GEN`:
//! moved on before a rule is added or changed and after it is deleted, ending its cached flows.

use std::collections::BTreeSet;

use aya::maps::{Array, Map, MapData};
use tunmeter_common::{
    FWD_DEVICE_PORT_WORDS, MAP_FWD_RULE_GEN, MAP_FWD_RULELESS_PORTS, MAP_REDIRECT_EMPTY, REDIRECT_NONE,
};

use super::table::{SteerError, SteerMaps, map_err};

impl SteerMaps {
    /// A hint map, or `None` under pins of an older daemon (the programs there look up always).
    fn hint<V: aya::Pod>(&self, name: &'static str) -> Result<Option<Array<MapData, V>>, SteerError> {
        match self.open(name) {
            Ok(d) => Array::try_from(Map::Array(d)).map(Some).map_err(map_err(name)),
            Err(SteerError::NoMaps(_)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Before a forward rule on `port` goes in: packets to that port are looked up.
    pub(super) fn unskip_port(&self, port: u16) -> Result<(), SteerError> {
        let Some(mut bits) = self.hint::<u64>(MAP_FWD_RULELESS_PORTS)? else { return Ok(()) };
        let (i, bit) = (port as u32 / 64, 1u64 << (port % 64));
        let have = bits.get(&i, 0).map_err(map_err(MAP_FWD_RULELESS_PORTS))?;
        if have & bit != 0 {
            bits.set(i, &(have & !bit), 0).map_err(map_err(MAP_FWD_RULELESS_PORTS))?;
        }
        Ok(())
    }

    /// After the forward rules changed (their public ports are `ruled`): every other port is
    /// skipped. Only words that change are written.
    pub(super) fn sync_ruleless_ports(&self, ruled: &BTreeSet<u16>) -> Result<(), SteerError> {
        let Some(mut bits) = self.hint::<u64>(MAP_FWD_RULELESS_PORTS)? else { return Ok(()) };
        let mut words = vec![u64::MAX; FWD_DEVICE_PORT_WORDS as usize];
        for &port in ruled {
            words[port as usize / 64] &= !(1u64 << (port % 64));
        }
        for (i, w) in words.into_iter().enumerate() {
            let i = i as u32;
            if bits.get(&i, 0).map_err(map_err(MAP_FWD_RULELESS_PORTS))? != w {
                bits.set(i, &w, 0).map_err(map_err(MAP_FWD_RULELESS_PORTS))?;
            }
        }
        Ok(())
    }

    /// Set `REDIRECT_EMPTY` to `none` (before a rule goes in: false; after removals: whether
    /// the trie is empty now).
    pub(super) fn set_redirect_empty(&self, none: bool) -> Result<(), SteerError> {
        let Some(mut word) = self.hint::<u32>(MAP_REDIRECT_EMPTY)? else { return Ok(()) };
        let want = if none { REDIRECT_NONE } else { 0 };
        if word.get(&0, 0).map_err(map_err(MAP_REDIRECT_EMPTY))? != want {
            word.set(0, &want, 0).map_err(map_err(MAP_REDIRECT_EMPTY))?;
        }
        Ok(())
    }

    /// Move rule id `id`'s generation on and return it: before a rule with this id is added
    /// or changed (the rule carries the value returned), and after it is deleted. Inbound flows
    /// cached from an older rule of this id are not used again. 0 under pins of an older daemon.
    pub(super) fn next_rule_gen(&self, id: u32) -> Result<u32, SteerError> {
        let Some(mut gens) = self.hint::<u32>(MAP_FWD_RULE_GEN)? else { return Ok(0) };
        let next = gens.get(&id, 0).map_err(map_err(MAP_FWD_RULE_GEN))?.wrapping_add(1);
        gens.set(id, &next, 0).map_err(map_err(MAP_FWD_RULE_GEN))?;
        Ok(next)
    }
}
