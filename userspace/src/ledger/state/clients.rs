//! The ledger's clients: rows in one dense vector, found through a small index by address.
//! A hash map holding the rows themselves would size its table above 8/7 of the clients and
//! touch all of it (100,000 clients: 131,072 slots of 240 bytes); here only the index (24
//! bytes a slot) has the slack. Clients are never removed, so row numbers are stable.

use std::{collections::hash_map::Entry, net::IpAddr, ops::Index};

use rustc_hash::FxHashMap;

use super::ClientState;

#[derive(Debug, Default)]
pub struct ClientMap {
    index: FxHashMap<IpAddr, u32>,
    rows: Vec<(IpAddr, ClientState)>,
}

impl ClientMap {
    pub fn len(&self) -> usize {
        self.rows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    pub fn get(&self, ip: &IpAddr) -> Option<&ClientState> {
        self.index.get(ip).map(|i| &self.rows[*i as usize].1)
    }

    pub fn get_mut(&mut self, ip: &IpAddr) -> Option<&mut ClientState> {
        self.index.get(ip).map(|i| &mut self.rows[*i as usize].1)
    }

    pub fn contains_key(&self, ip: &IpAddr) -> bool {
        self.index.contains_key(ip)
    }

    /// Every client, in the order they were first seen.
    pub fn iter(&self) -> impl Iterator<Item = (&IpAddr, &ClientState)> {
        self.rows.iter().map(|(ip, c)| (ip, c))
    }

    pub fn keys(&self) -> impl Iterator<Item = &IpAddr> {
        self.rows.iter().map(|(ip, _)| ip)
    }

    pub fn values(&self) -> impl Iterator<Item = &ClientState> {
        self.rows.iter().map(|(_, c)| c)
    }

    pub(crate) fn iter_mut(&mut self) -> impl Iterator<Item = (&IpAddr, &mut ClientState)> {
        self.rows.iter_mut().map(|(ip, c)| (&*ip, c))
    }

    pub(crate) fn values_mut(&mut self) -> impl Iterator<Item = &mut ClientState> {
        self.rows.iter_mut().map(|(_, c)| c)
    }

    /// `ip`'s row, made by `new` if there is none; true if it was made now.
    pub(crate) fn get_or_insert_with(
        &mut self,
        ip: IpAddr,
        new: impl FnOnce() -> ClientState,
    ) -> (&mut ClientState, bool) {
        match self.index.entry(ip) {
            Entry::Occupied(e) => (&mut self.rows[*e.get() as usize].1, false),
            Entry::Vacant(e) => {
                let i = u32::try_from(self.rows.len()).expect("fewer than 2^32 clients");
                e.insert(i);
                self.rows.push((ip, new()));
                (&mut self.rows.last_mut().expect("just pushed").1, true)
            }
        }
    }
}

impl FromIterator<(IpAddr, ClientState)> for ClientMap {
    fn from_iter<I: IntoIterator<Item = (IpAddr, ClientState)>>(iter: I) -> ClientMap {
        let mut m = ClientMap::default();
        for (ip, c) in iter {
            *m.get_or_insert_with(ip, ClientState::default).0 = c;
        }
        m
    }
}

impl Index<&IpAddr> for ClientMap {
    type Output = ClientState;

    fn index(&self, ip: &IpAddr) -> &ClientState {
        self.get(ip).expect("no such client")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_are_found_by_address_and_made_once() {
        let mut m = ClientMap::default();
        let a: IpAddr = "10.8.0.2".parse().unwrap();
        let b: IpAddr = "fd00::2".parse().unwrap();
        let (c, new) = m.get_or_insert_with(a, ClientState::default);
        c.first_seen_ms = 7;
        assert!(new);
        assert!(!m.get_or_insert_with(a, ClientState::default).1);
        m.get_or_insert_with(b, ClientState::default);
        assert_eq!((m.len(), m[&a].first_seen_ms, m.contains_key(&b)), (2, 7, true));
        assert!(m.get(&"10.8.0.3".parse().unwrap()).is_none());
        assert_eq!(m.keys().copied().collect::<Vec<_>>(), [a, b]);
        let again: ClientMap = m.iter().map(|(ip, c)| (*ip, c.clone())).collect();
        assert_eq!(again[&a].first_seen_ms, 7);
    }
}
