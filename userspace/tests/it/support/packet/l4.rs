//! The TCP, UDP and ICMP/ICMPv6 setters of [`Packet`]: ports, payload or quote, flags and
//! sequence numbers, options, the UDP length, ICMP type, code and the 4 bytes after the checksum.
//! A setter used on another kind of packet panics (a test bug).

use super::{ACK, Body, FIN, PSH, Packet, RST, SYN};

impl Packet {
    /// TCP/UDP source and destination ports.
    pub fn ports(self, sport: u16, dport: u16) -> Packet {
        self.sport(sport).dport(dport)
    }

    pub fn sport(mut self, p: u16) -> Packet {
        match &mut self.body {
            Body::Tcp { sport, .. } | Body::Udp { sport, .. } => *sport = p,
            b => panic!("sport on {b:?}"),
        }
        self
    }

    pub fn dport(mut self, p: u16) -> Packet {
        match &mut self.body {
            Body::Tcp { dport, .. } | Body::Udp { dport, .. } => *dport = p,
            b => panic!("dport on {b:?}"),
        }
        self
    }

    /// TCP data, UDP data, ICMP data (the echo payload or the quote); for raw L4 the bytes.
    pub fn payload(mut self, bytes: impl AsRef<[u8]>) -> Packet {
        let bytes = bytes.as_ref().to_vec();
        match &mut self.body {
            Body::Tcp { data, .. } | Body::Udp { data, .. } | Body::Icmp { data, .. } => *data = bytes,
            Body::L4 { bytes: b, .. } => *b = bytes,
            b => panic!("payload on {b:?}"),
        }
        self
    }

    /// The datagram an ICMP error quotes (its payload).
    pub fn quote(self, packet: impl AsRef<[u8]>) -> Packet {
        self.payload(packet)
    }

    /// The TCP flags byte as a whole (see `syn`, `ack`, ... to add single flags).
    pub fn flags(mut self, f: u8) -> Packet {
        *self.tcp_field("flags").2 = f;
        self
    }

    pub fn syn(self) -> Packet {
        self.add_flags(SYN)
    }
    pub fn ack(self) -> Packet {
        self.add_flags(ACK)
    }
    pub fn psh(self) -> Packet {
        self.add_flags(PSH)
    }
    pub fn fin(self) -> Packet {
        self.add_flags(FIN)
    }
    pub fn rst(self) -> Packet {
        self.add_flags(RST)
    }

    fn add_flags(mut self, f: u8) -> Packet {
        *self.tcp_field("flags").2 |= f;
        self
    }

    pub fn seq(mut self, s: u32) -> Packet {
        *self.tcp_field("seq").0 = s;
        self
    }

    /// The acknowledgment number (default: 0x55667788 if ACK is set, else 0).
    pub fn ack_no(mut self, a: u32) -> Packet {
        *self.tcp_field("ack_no").1 = Some(a);
        self
    }

    pub fn window(mut self, w: u16) -> Packet {
        *self.tcp_field("window").3 = w;
        self
    }

    /// TCP options (a multiple of 4 bytes; the data offset grows with them).
    pub fn tcp_options(mut self, bytes: impl AsRef<[u8]>) -> Packet {
        assert_eq!(bytes.as_ref().len() % 4, 0, "TCP options come in 4-byte words");
        *self.tcp_field("tcp_options").4 = bytes.as_ref().to_vec();
        self
    }

    fn tcp_field(&mut self, what: &str) -> (&mut u32, &mut Option<u32>, &mut u8, &mut u16, &mut Vec<u8>) {
        match &mut self.body {
            Body::Tcp { seq, ack, flags, window, options, .. } => (seq, ack, flags, window, options),
            b => panic!("{what} on {b:?}"),
        }
    }

    /// The UDP length field as written.
    pub fn udp_len(mut self, l: u16) -> Packet {
        match &mut self.body {
            Body::Udp { len, .. } => *len = Some(l),
            b => panic!("udp_len on {b:?}"),
        }
        self
    }

    pub fn icmp_type(mut self, t: u8) -> Packet {
        *self.icmp_field("icmp_type").0 = t;
        self
    }

    pub fn icmp_code(mut self, c: u8) -> Packet {
        *self.icmp_field("icmp_code").1 = c;
        self
    }

    /// The 4 bytes after the ICMP checksum: unused (0), the next-hop MTU of "fragmentation
    /// needed" (3/4) or "packet too big", a pointer, or an echo's id and sequence number.
    pub fn rest(mut self, r: u32) -> Packet {
        *self.icmp_field("rest").2 = r;
        self
    }

    /// Echo id and sequence number.
    pub fn echo(self, id: u16, seq: u16) -> Packet {
        self.rest(((id as u32) << 16) | seq as u32)
    }

    fn icmp_field(&mut self, what: &str) -> (&mut u8, &mut u8, &mut u32) {
        match &mut self.body {
            Body::Icmp { typ, code, rest, .. } => (typ, code, rest),
            b => panic!("{what} on {b:?}"),
        }
    }
}
