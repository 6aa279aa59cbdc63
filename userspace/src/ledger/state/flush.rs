//! Taking what a flush writes, a chunk at a time, so the writer never holds every pending row
//! at once. A client's row and the usage its cursor accounts for are always taken together,
//! under one lock, so every transaction's rows agree with its usage; a poll between two chunks
//! only adds, and the clients already taken are listed again for the next flush.

use std::net::IpAddr;

use super::{ClientState, MinuteRow, Open, State, list};

/// What a flush starts with.
#[derive(Debug, Default)]
pub struct FlushStart {
    /// Set when the kernel epoch changed since the last write.
    pub epoch: Option<String>,
    /// Row numbers of the clients whose rows are to be written, each once.
    pub clients: Vec<u32>,
}

/// What a flush took from the state: put back if its transaction fails.
#[derive(Debug, Default)]
pub struct Taken {
    /// The usage taken so far.
    pub usage: Vec<MinuteRow>,
    /// Every client the flush was to write (taken or not yet), by row number.
    pub clients: Vec<u32>,
    /// The flush was to write a new epoch.
    pub epoch: bool,
}

impl State {
    /// Start a flush: take the list of clients to write. Their rows and usage are taken with
    /// `take`; then `commit_flush` or `restore_flush`.
    pub fn begin_flush(&mut self) -> FlushStart {
        self.flush_gen = self.flush_gen.wrapping_add(1).max(1);
        self.in_flush = true;
        FlushStart {
            epoch: std::mem::take(&mut self.epoch_dirty).then(|| self.epoch.clone()),
            clients: std::mem::take(&mut self.dirty),
        }
    }

    /// Order the rows of a flush as the database orders its keys (see `sort_for_writing`):
    /// the keys are made under the state's lock (a format per client), sorted outside it.
    pub fn writing_keys(&self, rows: &[u32]) -> Vec<([u8; 16], u32)> {
        rows.iter().map(|&i| (text_key(&self.clients.at(i).0), i)).collect()
    }

    /// Take the current rows `ids` and all of their unwritten usage (appended to `rows` and
    /// `usage`: a client's older minutes, then its open one).
    pub fn take(&mut self, ids: &[u32], rows: &mut Vec<(IpAddr, ClientState)>, usage: &mut Vec<MinuteRow>) {
        for &i in ids {
            let ip = self.clients.at(i).0;
            let c = self.clients.at_mut(i);
            c.listed = false;
            c.taken = self.flush_gen;
            if !c.older.is_empty() {
                let v = std::mem::take(&mut c.older);
                self.older_rows -= v.len();
                usage.extend(v.into_iter().map(|(start, b)| ((start, ip), b)));
            }
            if !c.open.is_empty() {
                usage.push(((c.open.start_ms, ip), c.open.bucket));
                c.open = Open::default();
                self.open_rows -= 1;
            }
            rows.push((ip, c.clone()));
        }
    }

    /// The transaction that wrote the rows `ids` committed: those rows are in the database.
    pub fn mark_stored(&mut self, ids: &[u32]) {
        for &i in ids {
            self.clients.at_mut(i).stored = true;
        }
    }

    /// The flush's transaction committed.
    pub fn commit_flush(&mut self) {
        self.in_flush = false;
    }

    /// The flush's transaction failed: its usage goes back into pending (written with the next
    /// flush), and every client it was to write is listed again.
    pub fn restore_flush(&mut self, taken: Taken) {
        self.in_flush = false;
        if taken.epoch {
            self.epoch_dirty = true;
        }
        for ((start_ms, ip), bucket) in taken.usage {
            self.put_back(ip, start_ms, &bucket);
        }
        let gen_ = self.flush_gen;
        for i in taken.clients {
            let c = self.clients.at_mut(i);
            // Not taken yet: still marked listed but no longer in `dirty`. Taken and listed
            // again by a later poll: in `dirty` already.
            if c.taken != gen_ {
                c.listed = false;
            }
            list(c, i, &mut self.dirty);
        }
    }

    /// Merge one minute of unwritten usage back into `ip`'s pending usage.
    fn put_back(&mut self, ip: IpAddr, start_ms: u64, bucket: &super::Bucket) {
        // Usage is only ever taken from a client's row, and rows are never removed.
        let c = self.clients.get_or_insert_with(ip, ClientState::default).0;
        if c.open.is_empty() {
            c.open = Open { start_ms, bucket: *bucket };
            self.open_rows += 1;
        } else if c.open.start_ms == start_ms {
            c.open.bucket.merge(bucket);
        } else {
            super::add_older(c, &mut self.older_rows, Open { start_ms, bucket: *bucket });
        }
    }

    /// Whether `ip`'s row is still to be written: listed, or taken by a flush that has not
    /// committed yet.
    pub fn unwritten(&self, ip: IpAddr) -> bool {
        self.clients.get(&ip).is_some_and(|c| c.listed || (self.in_flush && c.taken == self.flush_gen))
    }
}

/// Order rows as the database orders its keys (the addresses' text), so that a flush walks
/// the tables' B-trees in order and each page is read once: `keyed` from
/// `State::writing_keys`. The first 16 bytes of the text decide (an IPv4 address fits whole;
/// two IPv6 addresses with the same first 16 characters are next to each other either way).
pub fn sort_for_writing(mut keyed: Vec<([u8; 16], u32)>) -> Vec<u32> {
    keyed.sort_unstable();
    keyed.into_iter().map(|(_, i)| i).collect()
}

fn text_key(ip: &IpAddr) -> [u8; 16] {
    use std::io::Write as _;
    let mut buf = [0u8; 16];
    // The text is longer than 16 bytes for most IPv6 addresses: the write stops at the end of
    // the buffer, which keeps the first 16.
    let mut w = &mut buf[..];
    let _ = write!(w, "{ip}");
    buf
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writing_order_is_the_text_order() {
        let ips: Vec<IpAddr> = ["10.0.0.2", "10.0.0.10", "fd00::1", "10.0.0.100", "9.9.9.9", "fd00::1:0"]
            .map(|s| s.parse().unwrap())
            .into();
        let order = sort_for_writing(ips.iter().enumerate().map(|(i, ip)| (text_key(ip), i as u32)).collect());
        assert_eq!(order.len(), ips.len());
        let mut text: Vec<String> = order.iter().map(|&i| ips[i as usize].to_string()).collect();
        let got = text.clone();
        text.sort();
        assert_eq!(got, text);
    }
}
