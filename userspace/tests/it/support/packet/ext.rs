//! IPv6 extension headers for [`super::Packet::ext`]: hop-by-hop and destination options
//! (padded with Pad1/PadN to a multiple of 8), routing, fragment, and raw headers for garbage.
//! The builder chains their next-header fields.

/// One IPv6 extension header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Ext {
    /// Hop-by-hop options (next-header value 0); the options as TLVs, padding added.
    HopByHop(Vec<u8>),
    /// Destination options (60).
    DestOpts(Vec<u8>),
    /// Routing header (43): routing type, segments left, type-specific data (zero-padded).
    Routing { typ: u8, segments_left: u8, data: Vec<u8> },
    /// Fragment header (44): fragment offset in bytes (a multiple of 8), more fragments, id.
    Fragment { offset: u16, more: bool, id: u32 },
    /// Any header type `kind` whose bytes after the next-header byte are `bytes`, unchecked.
    Raw { kind: u8, bytes: Vec<u8> },
}

impl Ext {
    /// A hop-by-hop header with no options (8 bytes: PadN).
    pub fn hop_by_hop() -> Ext {
        Ext::HopByHop(Vec::new())
    }

    /// A destination-options header with no options (8 bytes: PadN).
    pub fn dest_opts() -> Ext {
        Ext::DestOpts(Vec::new())
    }

    pub fn fragment(offset: u16, more: bool, id: u32) -> Ext {
        assert_eq!(offset % 8, 0, "fragment offsets are multiples of 8 bytes");
        Ext::Fragment { offset, more, id }
    }

    /// The next-header value that names this header.
    pub fn kind(&self) -> u8 {
        match self {
            Ext::HopByHop(_) => 0,
            Ext::Routing { .. } => 43,
            Ext::Fragment { .. } => 44,
            Ext::DestOpts(_) => 60,
            Ext::Raw { kind, .. } => *kind,
        }
    }

    /// The header's bytes with `next` in its next-header field.
    fn bytes(&self, next: u8) -> Vec<u8> {
        match self {
            Ext::HopByHop(opts) | Ext::DestOpts(opts) => {
                let mut v = vec![next, 0];
                v.extend_from_slice(opts);
                match (8 - v.len() % 8) % 8 {
                    0 => {}
                    1 => v.push(0), // Pad1
                    n => {
                        v.extend_from_slice(&[1, n as u8 - 2]); // PadN
                        v.resize(v.len() + n - 2, 0);
                    }
                }
                v[1] = (v.len() / 8 - 1) as u8;
                v
            }
            Ext::Routing { typ, segments_left, data } => {
                let mut v = vec![next, 0, *typ, *segments_left];
                v.extend_from_slice(data);
                v.resize(v.len().div_ceil(8) * 8, 0);
                v[1] = (v.len() / 8 - 1) as u8;
                v
            }
            Ext::Fragment { offset, more, id } => {
                let mut v = vec![next, 0];
                v.extend_from_slice(&(offset | *more as u16).to_be_bytes());
                v.extend_from_slice(&id.to_be_bytes());
                v
            }
            Ext::Raw { bytes, .. } => {
                let mut v = vec![next];
                v.extend_from_slice(bytes);
                v
            }
        }
    }
}

/// The chain of `headers`, each naming the next, the last naming `proto`.
pub(super) fn chain(headers: &[Ext], proto: u8) -> Vec<u8> {
    let mut v = Vec::new();
    for (i, h) in headers.iter().enumerate() {
        let next = headers.get(i + 1).map_or(proto, Ext::kind);
        v.extend_from_slice(&h.bytes(next));
    }
    v
}
