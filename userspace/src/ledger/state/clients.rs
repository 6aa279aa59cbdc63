//! The ledger's clients: rows packed in fixed blocks, found through an index of row numbers
//! hashed by the row's address (4 bytes a slot: only the index has a hash table's slack, and
//! the address is not stored twice). Clients are never removed, so row numbers are stable.

use std::{hash::BuildHasher, net::IpAddr, ops::Index};

use hashbrown::HashTable;
use rustc_hash::FxBuildHasher;

use super::ClientState;

/// Rows per block. Blocks are allocated whole and never moved, so adding clients never copies
/// the rows (a single vector would double, holding old and new storage at once: 47 MiB for a
/// moment at 100,000 clients where the rows take 24 MiB).
const BLOCK: usize = 4096;

type Row = (IpAddr, ClientState);

#[derive(Debug, Default)]
pub struct ClientMap {
    /// Row numbers, hashed by their row's address.
    index: HashTable<u32>,
    blocks: Vec<Vec<Row>>,
    len: usize,
    /// Kernel slot -> row + 1 (0: none), the row a reading of that slot found last: a poll
    /// reads the slots in order and finds each row here, without a random probe of the index.
    hints: Vec<u32>,
}

impl ClientMap {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn row(&self, i: u32) -> &Row {
        let i = i as usize;
        &self.blocks[i / BLOCK][i % BLOCK]
    }

    fn row_mut(&mut self, i: u32) -> &mut Row {
        let i = i as usize;
        &mut self.blocks[i / BLOCK][i % BLOCK]
    }

    /// The row number of `ip`, if it is a client (stable: rows are never removed).
    pub(crate) fn find(&self, ip: &IpAddr) -> Option<u32> {
        self.index.find(FxBuildHasher.hash_one(ip), |&i| self.row(i).0 == *ip).copied()
    }

    /// The client of row `i` (a number `find` or an insert gave).
    pub(crate) fn at(&self, i: u32) -> (IpAddr, &ClientState) {
        let (ip, c) = self.row(i);
        (*ip, c)
    }

    pub(crate) fn at_mut(&mut self, i: u32) -> &mut ClientState {
        &mut self.row_mut(i).1
    }

    pub fn get(&self, ip: &IpAddr) -> Option<&ClientState> {
        self.find(ip).map(|i| &self.row(i).1)
    }

    pub fn get_mut(&mut self, ip: &IpAddr) -> Option<&mut ClientState> {
        let i = self.find(ip)?;
        Some(&mut self.row_mut(i).1)
    }

    pub fn contains_key(&self, ip: &IpAddr) -> bool {
        self.find(ip).is_some()
    }

    /// Every client, in the order they were first seen.
    pub fn iter(&self) -> impl Iterator<Item = (&IpAddr, &ClientState)> {
        self.blocks.iter().flatten().map(|(ip, c)| (ip, c))
    }

    pub fn keys(&self) -> impl Iterator<Item = &IpAddr> {
        self.iter().map(|(ip, _)| ip)
    }

    pub fn values(&self) -> impl Iterator<Item = &ClientState> {
        self.iter().map(|(_, c)| c)
    }

    pub(crate) fn iter_mut(&mut self) -> impl Iterator<Item = (&IpAddr, &mut ClientState)> {
        self.blocks.iter_mut().flatten().map(|(ip, c)| (&*ip, c))
    }

    pub(crate) fn values_mut(&mut self) -> impl Iterator<Item = &mut ClientState> {
        self.iter_mut().map(|(_, c)| c)
    }

    /// `ip`'s row, made by `new` if there is none; true if it was made now; its row number.
    pub(crate) fn get_or_insert_with(
        &mut self,
        ip: IpAddr,
        new: impl FnOnce() -> ClientState,
    ) -> (&mut ClientState, bool, u32) {
        let (i, made) = self.find_or_insert(ip, new);
        (&mut self.row_mut(i).1, made, i)
    }

    /// As `get_or_insert_with`, for a reading of kernel slot `slot`: the row found for that
    /// slot last time is tried first (its address checked, so a slot that changed owner, or a
    /// hint of another map, only costs the index lookup it would have made anyway).
    pub(crate) fn get_or_insert_at(
        &mut self,
        ip: IpAddr,
        slot: Option<u32>,
        new: impl FnOnce() -> ClientState,
    ) -> (&mut ClientState, bool, u32) {
        let Some(slot) = slot.map(|s| s as usize) else { return self.get_or_insert_with(ip, new) };
        if let Some(&h) = self.hints.get(slot)
            && h != 0
            && self.row(h - 1).0 == ip
        {
            return (&mut self.row_mut(h - 1).1, false, h - 1);
        }
        let (i, made) = self.find_or_insert(ip, new);
        if self.hints.len() <= slot {
            self.hints.resize(slot + 1, 0);
        }
        self.hints[slot] = i + 1;
        (&mut self.row_mut(i).1, made, i)
    }

    fn find_or_insert(&mut self, ip: IpAddr, new: impl FnOnce() -> ClientState) -> (u32, bool) {
        if let Some(i) = self.find(&ip) {
            return (i, false);
        }
        let i = u32::try_from(self.len).expect("fewer than 2^32 clients");
        let blocks = &self.blocks;
        let rehash = |&j: &u32| FxBuildHasher.hash_one(blocks[j as usize / BLOCK][j as usize % BLOCK].0);
        self.index.insert_unique(FxBuildHasher.hash_one(ip), i, rehash);
        if self.len.is_multiple_of(BLOCK) {
            self.blocks.push(Vec::with_capacity(BLOCK));
        }
        self.len += 1;
        self.blocks.last_mut().expect("a block with room").push((ip, new()));
        (i, true)
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
        let (c, new, _) = m.get_or_insert_with(a, ClientState::default);
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

    #[test]
    fn slot_hints_find_the_row_and_never_another_clients() {
        let mut m = ClientMap::default();
        let (a, b): (IpAddr, IpAddr) = ("10.8.0.2".parse().unwrap(), "10.8.0.3".parse().unwrap());
        m.get_or_insert_at(a, Some(5), ClientState::default).0.first_seen_ms = 1;
        m.get_or_insert_at(b, None, ClientState::default).0.first_seen_ms = 2;
        assert_eq!(m.get_or_insert_at(a, Some(5), ClientState::default).0.first_seen_ms, 1);
        // Slot 5 now read for b (its owner changed): the hint's row is a's, so b's is found.
        let (c, made, row) = m.get_or_insert_at(b, Some(5), ClientState::default);
        assert_eq!((c.first_seen_ms, made, row), (2, false, 1));
        assert_eq!(m.find(&b), Some(1));
        assert_eq!(m.at(1).0, b);
        assert_eq!(m.get_or_insert_at(a, Some(9), ClientState::default).0.first_seen_ms, 1);
        let (c, made, _) = m.get_or_insert_at("10.8.0.4".parse().unwrap(), Some(5), ClientState::default);
        assert!(made && c.first_seen_ms == 0);
        assert_eq!(m.len(), 3);
    }

    #[test]
    fn rows_past_a_block_stay_where_they_are() {
        let n = 2 * BLOCK as u32 + 5;
        let ips: Vec<IpAddr> = (0..n).map(|i| std::net::Ipv4Addr::from(0x0a00_0000 + i).into()).collect();
        let mut m = ClientMap::default();
        for (i, ip) in ips.iter().enumerate() {
            m.get_or_insert_with(*ip, ClientState::default).0.first_seen_ms = i as u64;
        }
        assert_eq!((m.len(), m.blocks.len()), (n as usize, 3));
        assert!(ips.iter().enumerate().all(|(i, ip)| m[ip].first_seen_ms == i as u64));
        assert!(m.keys().eq(ips.iter()));
        for c in m.values_mut() {
            c.first_seen_ms += 1;
        }
        assert_eq!(m.get(&ips[BLOCK]).map(|c| c.first_seen_ms), Some(BLOCK as u64 + 1));
    }
}
