//! Validators of the frames the data path sends out, written from the RFCs rather than from
//! the program: an IP header whose lengths fit the frame and whose IPv4 checksum is right, a
//! tunnel whose outer header encloses exactly the inner datagram, a generated ICMP message
//! with the right checksum. Each returns what it found, or a one-line reason.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::checksum;

/// An IP header found at `l3` in a frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ip {
    /// Offset of the IP header in the frame.
    pub l3: usize,
    /// 4 or 6.
    pub version: u8,
    /// IPv4: IHL × 4; IPv6: 40 (extension headers are payload here).
    pub header_len: usize,
    /// The datagram's length as its header states it (IPv4 total length, IPv6 40 + payload).
    pub len: usize,
    /// IPv4 protocol / IPv6 next header.
    pub proto: u8,
    pub src: IpAddr,
    pub dst: IpAddr,
}

impl Ip {
    /// The datagram's bytes after its (fixed) header, as long as the header says.
    pub fn payload<'a>(&self, frame: &'a [u8]) -> &'a [u8] {
        &frame[self.l3 + self.header_len..self.l3 + self.len]
    }
}

/// The EtherType and the L3 offset, after up to two VLAN tags (802.1ad then 802.1Q).
pub fn ethernet(frame: &[u8]) -> Result<(u16, usize), String> {
    let mut off = 12;
    for _ in 0..3 {
        let Some(t) = frame.get(off..off + 2) else {
            return Err(format!(
                "frame of {} bytes ends in its L2 header",
                frame.len()
            ));
        };
        let ether_type = u16::from_be_bytes([t[0], t[1]]);
        if ether_type != 0x8100 && ether_type != 0x88a8 {
            return Ok((ether_type, off + 2));
        }
        off += 4;
    }
    Err("more than two VLAN tags".into())
}

/// An IPv4 header at `l3`: version 4, IHL of at least 5, header checksum right, and a total
/// length that covers the header and fits in the frame (bytes after it are padding).
pub fn ipv4(frame: &[u8], l3: usize) -> Result<Ip, String> {
    let h = frame
        .get(l3..l3 + 20)
        .ok_or("frame too short for an IPv4 header")?;
    if h[0] >> 4 != 4 {
        return Err(format!("IPv4 header with version {}", h[0] >> 4));
    }
    let header_len = (h[0] & 0x0f) as usize * 4;
    let len = u16::from_be_bytes([h[2], h[3]]) as usize;
    if header_len < 20 {
        return Err(format!("IPv4 IHL {} below 5", header_len / 4));
    }
    if len < header_len {
        return Err(format!(
            "IPv4 total length {len} below its header's {header_len}"
        ));
    }
    let avail = frame.len() - l3;
    if len > avail {
        return Err(format!(
            "IPv4 total length {len} beyond the frame's {avail} bytes"
        ));
    }
    if checksum(&frame[l3..l3 + header_len]) != 0 {
        return Err("IPv4 header checksum wrong".into());
    }
    Ok(Ip {
        l3,
        version: 4,
        header_len,
        len,
        proto: h[9],
        src: IpAddr::V4(Ipv4Addr::new(h[12], h[13], h[14], h[15])),
        dst: IpAddr::V4(Ipv4Addr::new(h[16], h[17], h[18], h[19])),
    })
}

/// An IPv6 header at `l3`: version 6 and a payload length that fits in the frame.
pub fn ipv6(frame: &[u8], l3: usize) -> Result<Ip, String> {
    let h = frame
        .get(l3..l3 + 40)
        .ok_or("frame too short for an IPv6 header")?;
    if h[0] >> 4 != 6 {
        return Err(format!("IPv6 header with version {}", h[0] >> 4));
    }
    let len = 40 + u16::from_be_bytes([h[4], h[5]]) as usize;
    let avail = frame.len() - l3;
    if len > avail {
        return Err(format!(
            "IPv6 length {len} (40 + payload) beyond the frame's {avail} bytes"
        ));
    }
    let addr = |b: &[u8]| IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(b).unwrap()));
    Ok(Ip {
        l3,
        version: 6,
        header_len: 40,
        len,
        proto: h[6],
        src: addr(&h[8..24]),
        dst: addr(&h[24..40]),
    })
}

/// The IP header after the L2 header, of the family its EtherType names.
pub fn ip(frame: &[u8]) -> Result<Ip, String> {
    let (ether_type, l3) = ethernet(frame)?;
    match ether_type {
        0x0800 => ipv4(frame, l3),
        0x86dd => ipv6(frame, l3),
        other => Err(format!("EtherType {other:#06x} is not IP")),
    }
}

/// The upper-layer checksum of `ip`'s payload (TCP 6, UDP 17, ICMP 1, ICMPv6 58), with the
/// pseudo-header where the protocol has one. IPv6 extension headers are not walked: the
/// payload must start with the upper-layer header.
pub fn l4_checksum(frame: &[u8], ip: &Ip) -> Result<(), String> {
    let seg = ip.payload(frame);
    let field = match ip.proto {
        6 => 16,
        17 => 6,
        1 | 58 => 2,
        other => return Err(format!("no checksum known for protocol {other}")),
    };
    if seg.len() < field + 2 {
        return Err(format!(
            "protocol {} segment of {} bytes",
            ip.proto,
            seg.len()
        ));
    }
    // A UDP checksum of 0 over IPv4 means "none" (RFC 768).
    if ip.proto == 17 && ip.version == 4 && seg[6..8] == [0, 0] {
        return Ok(());
    }
    let mut sum = Vec::with_capacity(40 + seg.len());
    if ip.proto != 1 {
        match (ip.src, ip.dst) {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                sum.extend_from_slice(&s.octets());
                sum.extend_from_slice(&d.octets());
                sum.extend_from_slice(&[0, ip.proto]);
                sum.extend_from_slice(&(seg.len() as u16).to_be_bytes());
            }
            (IpAddr::V6(s), IpAddr::V6(d)) => {
                sum.extend_from_slice(&s.octets());
                sum.extend_from_slice(&d.octets());
                sum.extend_from_slice(&(seg.len() as u32).to_be_bytes());
                sum.extend_from_slice(&[0, 0, 0, ip.proto]);
            }
            _ => unreachable!("one header, one family"),
        }
    }
    sum.extend_from_slice(seg);
    if checksum(&sum) != 0 {
        return Err(format!("protocol {} checksum wrong", ip.proto));
    }
    Ok(())
}

/// A frame the program built whole (an ICMP reply): IP lengths exactly the frame's (no
/// padding is added by the program), IPv4 header checksum and L4 checksum right.
pub fn generated(frame: &[u8]) -> Result<Ip, String> {
    let ip = ip(frame)?;
    if ip.l3 + ip.len != frame.len() {
        return Err(format!(
            "IP length {} but the frame holds {} bytes of IP",
            ip.len,
            frame.len() - ip.l3
        ));
    }
    l4_checksum(frame, &ip)?;
    Ok(ip)
}

/// A tunnel frame (IPIP, IP6IP6, 4in6, or GUE: UDP whose payload is the inner IP packet): a
/// valid outer header whose length is exactly its own header (and the UDP header, whose
/// length agrees) plus the inner datagram's stated length, which fits in the frame. Returns
/// the outer header and the inner one's offset; the inner packet itself is not judged (the
/// balancer carries it as it came), nor is GUE's UDP checksum (see the fuzz tests).
pub fn tunnel(frame: &[u8]) -> Result<(Ip, usize), String> {
    let outer = ip(frame)?;
    let mut inner = outer.l3 + outer.header_len;
    let mut udp = 0;
    let want_version = match outer.proto {
        4 => 4,
        41 => 6,
        17 => {
            let h = frame
                .get(inner..inner + 9)
                .ok_or("GUE without an inner header")?;
            udp = u16::from_be_bytes([h[4], h[5]]) as usize;
            inner += 8;
            h[8] >> 4
        }
        p => return Err(format!("IPv{} protocol {p} is not a tunnel", outer.version)),
    };
    let inner_len = match want_version {
        4 => {
            let h = frame.get(inner..inner + 4).ok_or("no inner IPv4 header")?;
            if h[0] >> 4 != 4 {
                return Err("IPIP with a non-IPv4 inner packet".into());
            }
            u16::from_be_bytes([h[2], h[3]]) as usize
        }
        6 => {
            let h = frame.get(inner..inner + 6).ok_or("no inner IPv6 header")?;
            if h[0] >> 4 != 6 {
                return Err("IP6IP6 with a non-IPv6 inner packet".into());
            }
            40 + u16::from_be_bytes([h[4], h[5]]) as usize
        }
        v => return Err(format!("GUE carrying IP version {v}")),
    };
    let udp_len = if outer.proto == 17 { 8 } else { 0 };
    if udp_len != 0 && udp != 8 + inner_len {
        return Err(format!(
            "UDP length {udp} does not enclose the inner datagram ({inner_len})"
        ));
    }
    if outer.len != outer.header_len + udp_len + inner_len {
        return Err(format!(
            "outer length {} does not enclose the inner datagram ({} + {udp_len} + {inner_len})",
            outer.len, outer.header_len
        ));
    }
    Ok((outer, inner))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Frame, SYN, outer_header};

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn valid_frames_pass_and_each_corruption_is_named() {
        for f in [
            Frame::tcp("198.18.1.1", "198.18.0.100", 1, 80, SYN),
            Frame::udp("fd00:18:1::1", "fd00:18::100", 1, 53),
            Frame::icmp(
                "198.18.2.1",
                "198.18.0.100",
                3,
                4,
                [0, 0, 5, 0x78],
                &[0x45; 28],
            ),
            Frame::icmp(
                "fd00:18:2::1",
                "fd00:18::100",
                2,
                0,
                [0, 0, 5, 0],
                &[0x60; 48],
            ),
            Frame {
                vlan: Some(3),
                outer_vlan: Some(4),
                ipv4_options: vec![1, 1, 1, 0],
                ..Frame::tcp("198.18.1.1", "198.18.0.100", 1, 80, SYN)
            },
        ] {
            let bytes = f.bytes();
            let found = generated(&bytes).unwrap_or_else(|e| panic!("{f:?}: {e}"));
            assert_eq!((found.src, found.dst), (f.src, f.dst));
            let l3 = found.l3;
            let v4 = f.src.is_ipv4();
            let mut cases: Vec<(Vec<u8>, &str)> = Vec::new();
            let mut flipped = bytes.clone();
            *flipped.last_mut().unwrap() ^= 1;
            cases.push((flipped, "checksum wrong"));
            cases.push((bytes[..bytes.len() - 1].to_vec(), "beyond the frame"));
            let mut padded = bytes.clone();
            padded.push(0);
            cases.push((padded, "holds"));
            if v4 {
                let mut bad = bytes.clone();
                bad[l3 + 8] ^= 1; // TTL: only the header checksum notices
                cases.push((bad, "IPv4 header checksum wrong"));
                let mut bad = bytes.clone();
                bad[l3] = 0x44;
                cases.push((bad, "IHL 4 below 5"));
            } else {
                let mut bad = bytes.clone();
                bad[l3] = 0x40;
                cases.push((bad, "version 4"));
            }
            for (bad, reason) in cases {
                let err = generated(&bad).unwrap_err();
                assert!(err.contains(reason), "{f:?}: {err:?} lacks {reason:?}");
            }
        }
    }

    #[test]
    fn tunnels_must_enclose_their_inner_datagram_exactly() {
        for (inner, src, dst) in [
            (
                Frame::tcp("198.18.1.1", "198.18.0.100", 1, 80, SYN),
                "198.18.0.2",
                "198.19.1.11",
            ),
            (
                Frame::udp("fd00:18:1::1", "fd00:18::100", 1, 53),
                "fd00:18::2",
                "fd00:19::11",
            ),
        ] {
            let frame = inner.bytes();
            let inner_len = frame.len() - 14;
            let good = crate::encapsulate(
                &frame,
                [2; 6],
                [3; 6],
                &outer_header(ip(src), ip(dst), 0, 7, inner_len),
            );
            let (outer, at) = tunnel(&good).unwrap();
            assert_eq!((outer.dst, &good[at..]), (ip(dst), &frame[14..]));
            // An outer length one byte off, with its checksum fixed: caught.
            let lying = crate::encapsulate(
                &frame,
                [2; 6],
                [3; 6],
                &outer_header(ip(src), ip(dst), 0, 7, inner_len + 1),
            );
            let mut padded = lying.clone();
            padded.push(0);
            assert!(tunnel(&padded).unwrap_err().contains("does not enclose"));
            assert!(tunnel(&lying).unwrap_err().contains("beyond the frame"));
        }
    }
}
