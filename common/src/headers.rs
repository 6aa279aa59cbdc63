//! Header decisions shared by the kernel programs and host tests.
//!
//! The kernel program reads single fields with `bpf_skb_load_bytes` and asks these helpers
//! what they mean; keeping the decisions here lets host unit tests cover them without a kernel.

use crate::stats::{Direction, Outcome};

pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86DD;
/// Offset of the EtherType in an Ethernet header.
pub const ETH_TYPE_OFFSET: u32 = 12;
pub const IPV4_HLEN: u32 = 20;
pub const IPV6_HLEN: u32 = 40;

/// IP family of a packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

/// Decide the family from the EtherType (L2 devices; host byte order) or, on L3 devices
/// (`ethertype == None`), from the version nibble of the first IP byte.
///
/// On L2 the version nibble must agree with the EtherType, else the packet is
/// [`Outcome::Malformed`].
#[inline(always)]
pub fn family(ethertype: Option<u16>, first_byte: u8) -> Result<Family, Outcome> {
    let version = first_byte >> 4;
    match ethertype {
        Some(ETH_P_IP) if version == 4 => Ok(Family::V4),
        Some(ETH_P_IPV6) if version == 6 => Ok(Family::V6),
        Some(ETH_P_IP) | Some(ETH_P_IPV6) => Err(Outcome::Malformed),
        Some(_) => Err(Outcome::NotIp),
        None => match version {
            4 => Ok(Family::V4),
            6 => Ok(Family::V6),
            _ => Err(Outcome::NotIp),
        },
    }
}

/// Only EtherTypes that can carry a counted packet.
#[inline(always)]
pub fn is_ip_ethertype(ethertype: u16) -> bool {
    ethertype == ETH_P_IP || ethertype == ETH_P_IPV6
}

/// Check the fixed header is present (`l3_len` = bytes from the IP header to the end of the
/// packet) and sane. Options, extension headers and fragments need nothing more: the addresses
/// sit at fixed offsets in the fixed header.
#[inline(always)]
pub fn check_header(family: Family, first_byte: u8, l3_len: u32) -> Result<(), Outcome> {
    match family {
        Family::V4 => {
            if l3_len < IPV4_HLEN {
                Err(Outcome::Truncated)
            } else if first_byte & 0x0f < 5 {
                Err(Outcome::Malformed)
            } else {
                Ok(())
            }
        }
        Family::V6 => {
            if l3_len < IPV6_HLEN {
                Err(Outcome::Truncated)
            } else {
                Ok(())
            }
        }
    }
}

/// Offset, from the IP header, of the client-side address: the source on upload
/// (the client sent it), the destination on download.
#[inline(always)]
pub const fn client_addr_offset(family: Family, dir: Direction) -> u32 {
    match (family, dir) {
        (Family::V4, Direction::Upload) => 12,
        (Family::V4, Direction::Download) => 16,
        (Family::V6, Direction::Upload) => 8,
        (Family::V6, Direction::Download) => 24,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::maps::ClientKey;

    #[test]
    fn family_from_l3_version_nibble() {
        assert_eq!(family(None, 0x45), Ok(Family::V4));
        assert_eq!(family(None, 0x60), Ok(Family::V6));
        assert_eq!(family(None, 0x00), Err(Outcome::NotIp));
        assert_eq!(family(None, 0x55), Err(Outcome::NotIp));
    }

    #[test]
    fn family_from_ethertype_must_agree_with_version() {
        assert_eq!(family(Some(ETH_P_IP), 0x45), Ok(Family::V4));
        assert_eq!(family(Some(ETH_P_IPV6), 0x6f), Ok(Family::V6));
        assert_eq!(family(Some(ETH_P_IP), 0x60), Err(Outcome::Malformed));
        assert_eq!(family(Some(ETH_P_IPV6), 0x45), Err(Outcome::Malformed));
        assert_eq!(family(Some(0x0806), 0x45), Err(Outcome::NotIp)); // ARP
        assert!(!is_ip_ethertype(0x8100));
        assert!(is_ip_ethertype(ETH_P_IPV6));
    }

    #[test]
    fn header_checks() {
        assert_eq!(check_header(Family::V4, 0x45, 20), Ok(()));
        assert_eq!(check_header(Family::V4, 0x4f, 60), Ok(())); // with options
        assert_eq!(check_header(Family::V4, 0x45, 19), Err(Outcome::Truncated));
        assert_eq!(check_header(Family::V4, 0x44, 40), Err(Outcome::Malformed));
        assert_eq!(check_header(Family::V6, 0x60, 40), Ok(()));
        assert_eq!(check_header(Family::V6, 0x60, 39), Err(Outcome::Truncated));
    }

    #[test]
    fn address_offsets_pick_the_client_side() {
        // A real IPv4 header: 10.8.0.2 -> 1.1.1.1.
        let hdr: [u8; 20] = [0x45, 0, 0, 20, 0, 0, 0, 0, 64, 17, 0, 0, 10, 8, 0, 2, 1, 1, 1, 1];
        let up = client_addr_offset(Family::V4, Direction::Upload) as usize;
        let down = client_addr_offset(Family::V4, Direction::Download) as usize;
        assert_eq!(&hdr[up..up + 4], &[10, 8, 0, 2]);
        assert_eq!(&hdr[down..down + 4], &[1, 1, 1, 1]);
        assert_eq!(client_addr_offset(Family::V6, Direction::Upload), 8);
        assert_eq!(client_addr_offset(Family::V6, Direction::Download), 24);
    }

    #[test]
    fn client_keys_map_ipv4_into_ipv6() {
        let k = ClientKey::v4([10, 8, 0, 2]);
        assert_eq!(&k.addr[..12], &[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff]);
        assert_eq!(k.as_v4(), Some([10, 8, 0, 2]));
        let v6 = ClientKey::v6([0xfd, 0, 0, 8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2]);
        assert_eq!(v6.as_v4(), None);
        assert!(ClientKey::OTHER.is_reserved() && ClientKey::OVERFLOW.is_reserved());
        assert!(!k.is_reserved());
        // The reserved keys can never collide with a real client address:
        // :: is unspecified and ff..ff is not a valid unicast source/destination.
        assert_ne!(ClientKey::v4([0, 0, 0, 0]), ClientKey::OTHER);
        // Word constructors give the same keys as the byte ones.
        assert_eq!(ClientKey::v4_word(u32::from_ne_bytes([10, 8, 0, 2])), k);
        let a6 = [0xfd, 0, 0, 8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];
        let w = [u64::from_ne_bytes(a6[..8].try_into().unwrap()), u64::from_ne_bytes(a6[8..].try_into().unwrap())];
        assert_eq!(ClientKey::v6_words(w), ClientKey::v6(a6));
    }

    #[test]
    fn subnet_prefix_lengths() {
        use crate::maps::{SUBNET_KEY_BITS, SubnetKey};
        assert_eq!(SubnetKey::v4_prefix_len(24), 152);
        assert_eq!(SubnetKey::v6_prefix_len(64), 96);
        assert_eq!(SubnetKey::v4_prefix_len(32), SUBNET_KEY_BITS);
        assert_eq!(SubnetKey::v6_prefix_len(128), SUBNET_KEY_BITS);
    }
}
