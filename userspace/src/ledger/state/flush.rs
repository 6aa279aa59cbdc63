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
    /// Clients whose rows are to be written, each once.
    pub clients: Vec<IpAddr>,
}

/// What a flush took from the state: put back if its transaction fails.
#[derive(Debug, Default)]
pub struct Taken {
    /// The usage taken so far.
    pub usage: Vec<MinuteRow>,
    /// Every client the flush was to write (taken or not yet).
    pub clients: Vec<IpAddr>,
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

    /// Take the current rows of `ips` and all of their unwritten usage (appended to `rows` and
    /// `usage`: a client's older minutes, then its open one).
    pub fn take(&mut self, ips: &[IpAddr], rows: &mut Vec<(IpAddr, ClientState)>, usage: &mut Vec<MinuteRow>) {
        for ip in ips {
            let Some(c) = self.clients.get_mut(ip) else { continue };
            c.listed = false;
            c.taken = self.flush_gen;
            if !c.older.is_empty() {
                let v = std::mem::take(&mut c.older);
                self.older_rows -= v.len();
                usage.extend(v.into_iter().map(|(start, b)| ((start, *ip), b)));
            }
            if !c.open.is_empty() {
                usage.push(((c.open.start_ms, *ip), c.open.bucket));
                c.open = Open::default();
                self.open_rows -= 1;
            }
            rows.push((*ip, c.clone()));
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
        for ip in taken.clients {
            let Some(c) = self.clients.get_mut(&ip) else { continue };
            // Not taken yet: still marked listed but no longer in `dirty`. Taken and listed
            // again by a later poll: in `dirty` already.
            if c.taken != gen_ {
                c.listed = false;
            }
            list(c, ip, &mut self.dirty);
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

/// Order `ips` as the database orders its keys (the addresses' text), so that a flush walks
/// the tables' B-trees in order and each page is read once. The first 16 bytes of the text
/// decide (an IPv4 address fits whole; two IPv6 addresses with the same first 16 characters
/// are next to each other either way).
pub fn sort_for_writing(ips: &mut [IpAddr]) {
    ips.sort_by_cached_key(text_key);
}

fn text_key(ip: &IpAddr) -> u128 {
    use std::io::Write as _;
    let mut buf = [0u8; 16];
    // The text is longer than 16 bytes for most IPv6 addresses: the write stops at the end of
    // the buffer, which keeps the first 16.
    let mut w = &mut buf[..];
    let _ = write!(w, "{ip}");
    u128::from_be_bytes(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writing_order_is_the_text_order() {
        let mut ips: Vec<IpAddr> = ["10.0.0.2", "10.0.0.10", "fd00::1", "10.0.0.100", "9.9.9.9", "fd00::1:0"]
            .map(|s| s.parse().unwrap())
            .into();
        sort_for_writing(&mut ips);
        let mut text: Vec<String> = ips.iter().map(|ip| ip.to_string()).collect();
        let got = text.clone();
        text.sort();
        assert_eq!(got, text);
    }
}
