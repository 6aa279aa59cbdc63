//! What the programs read beside the rules. The skip hints `FWD_RULELESS_PORTS` (public ports no
//! forward rule uses), `FWD_EMPTY` and `REDIRECT_EMPTY` (no rule of the kind): a hint says "skip"
//! only where no rule exists, withdrawn before a rule goes in, given after the last is gone.
//! `FWD_RULE_GEN`: moved on before a rule is added or changed and after it is deleted.

use std::collections::BTreeSet;

use aya::maps::{Array, Map, MapData};
use tunmeter_common::{
    FWD_DEVICE_PORT_WORDS, FWD_NONE, MAP_FWD_EMPTY, MAP_FWD_RULE_GEN, MAP_FWD_RULELESS_PORTS, MAP_REDIRECT_EMPTY,
    REDIRECT_NONE,
};

use super::table::{SteerError, SteerMaps, map_err};

impl SteerMaps {
    /// An array map derived from the rules (a hint, the device port bitmap), or `None` under
    /// pins of an older daemon, which has no such map (its programs do not read one).
    pub(super) fn derived<V: aya::Pod>(&self, name: &'static str) -> Result<Option<Array<MapData, V>>, SteerError> {
        match self.open(name) {
            Ok(d) => Array::try_from(Map::Array(d)).map(Some).map_err(map_err(name)),
            Err(SteerError::NoMaps(_)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Before a forward rule on `port` goes in: packets are parsed for forwarding again, and
    /// those to that port looked up.
    pub(super) fn unskip_port(&self, port: u16) -> Result<(), SteerError> {
        self.set_empty(MAP_FWD_EMPTY, FWD_NONE, false)?;
        let Some(mut bits) = self.derived::<u64>(MAP_FWD_RULELESS_PORTS)? else { return Ok(()) };
        let (i, bit) = (port as u32 / 64, 1u64 << (port % 64));
        let have = bits.get(&i, 0).map_err(map_err(MAP_FWD_RULELESS_PORTS))?;
        if have & bit != 0 {
            bits.set(i, &(have & !bit), 0).map_err(map_err(MAP_FWD_RULELESS_PORTS))?;
        }
        Ok(())
    }

    /// After the forward rules changed (their public ports are `ruled`): every other port is
    /// skipped, and all of forwarding if there is no rule. Only words that change are written.
    pub(super) fn sync_ruleless_ports(&self, ruled: &BTreeSet<u16>) -> Result<(), SteerError> {
        if let Some(mut bits) = self.derived::<u64>(MAP_FWD_RULELESS_PORTS)? {
            let mut words = vec![u64::MAX; FWD_DEVICE_PORT_WORDS as usize];
            for &port in ruled {
                words[port as usize / 64] &= !(1u64 << (port % 64));
            }
            write_bitmap(&mut bits, MAP_FWD_RULELESS_PORTS, &words, |_, want| want)?;
        }
        self.set_empty(MAP_FWD_EMPTY, FWD_NONE, ruled.is_empty())
    }

    /// Set `REDIRECT_EMPTY` to `none` (before a rule goes in: false; after removals: whether
    /// the trie is empty now).
    pub(super) fn set_redirect_empty(&self, none: bool) -> Result<(), SteerError> {
        self.set_empty(MAP_REDIRECT_EMPTY, REDIRECT_NONE, none)
    }

    /// Set the one-word hint `name` to `value` if `none` (no rule of its kind), else to 0.
    fn set_empty(&self, name: &'static str, value: u32, none: bool) -> Result<(), SteerError> {
        let Some(mut word) = self.derived::<u32>(name)? else { return Ok(()) };
        let want = if none { value } else { 0 };
        if word.get(&0, 0).map_err(map_err(name))? != want {
            word.set(0, &want, 0).map_err(map_err(name))?;
        }
        Ok(())
    }

    /// Move rule id `id`'s generation on and return it: before a rule with this id is added
    /// or changed (the rule carries the value returned), and after it is deleted. Inbound flows
    /// cached from an older rule of this id are not used again. 0 under pins of an older daemon.
    pub(super) fn next_rule_gen(&self, id: u32) -> Result<u32, SteerError> {
        let Some(mut gens) = self.derived::<u32>(MAP_FWD_RULE_GEN)? else { return Ok(0) };
        let next = gens.get(&id, 0).map_err(map_err(MAP_FWD_RULE_GEN))?.wrapping_add(1);
        gens.set(id, &next, 0).map_err(map_err(MAP_FWD_RULE_GEN))?;
        Ok(next)
    }
}

/// Write the words of a port bitmap (`bits`, the map `name`): each becomes `merge(held, want)`,
/// written only where that differs from what the map holds.
pub(super) fn write_bitmap(
    bits: &mut Array<MapData, u64>,
    name: &'static str,
    want: &[u64],
    merge: impl Fn(u64, u64) -> u64,
) -> Result<(), SteerError> {
    for (i, &w) in (0u32..).zip(want) {
        let held = bits.get(&i, 0).map_err(map_err(name))?;
        let new = merge(held, w);
        if new != held {
            bits.set(i, &new, 0).map_err(map_err(name))?;
        }
    }
    Ok(())
}
