//! Conntrack cleanup over ctnetlink (`NFNL_SUBSYS_CTNETLINK` on `NETLINK_NETFILTER`): the
//! messages to dump a namespace's IPv4 conntrack table and to delete one entry by its original
//! tuple, and the parser of dumped entries. Own encoding, no library; the I/O is the caller's
//! (the nftables load balancer's socket in the same namespace).
//!
//! Used when a backend leaves a UDP service: conntrack keeps a UDP "flow" (same client
//! address and port) on the backend its first datagram was NATed to for as long as datagrams
//! keep coming, so without deletion a client keeps talking to a backend that is gone.
//!
//! Also the namespace's conntrack idle timeouts ([`set_idle_timeouts`]), which every
//! load-balancer backend sets the same way.
//!
//! Invariants: attributes are in network byte order (addresses, ports) as ctnetlink wants
//! them; a parsed entry carries exactly the original tuple needed to delete it.

use std::net::Ipv4Addr;

const NFNL_SUBSYS_CTNETLINK: u16 = 1;
const IPCTNL_MSG_CT_GET: u16 = 1;
const IPCTNL_MSG_CT_DELETE: u16 = 2;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_DUMP: u16 = 0x300;
const NLA_F_NESTED: u16 = 0x8000;
const AF_INET: u8 = 2;

const CTA_TUPLE_ORIG: u16 = 1;
const CTA_TUPLE_REPLY: u16 = 2;
const CTA_TUPLE_IP: u16 = 1;
const CTA_TUPLE_PROTO: u16 = 2;
const CTA_IP_V4_SRC: u16 = 1;
const CTA_IP_V4_DST: u16 = 2;
const CTA_PROTO_NUM: u16 = 1;
const CTA_PROTO_SRC_PORT: u16 = 2;
const CTA_PROTO_DST_PORT: u16 = 3;

/// One direction of a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tuple {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub proto: u8,
    pub sport: u16,
    pub dport: u16,
}

/// A dumped conntrack entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    pub orig: Tuple,
    pub reply: Tuple,
}

/// Whether a message type is a dumped conntrack entry.
pub fn is_entry(ty: u16) -> bool {
    ty == (NFNL_SUBSYS_CTNETLINK << 8)
}

fn header(buf: &mut Vec<u8>, ty: u16, flags: u16, seq: u32) -> usize {
    let start = buf.len();
    buf.extend_from_slice(&0u32.to_ne_bytes());
    buf.extend_from_slice(&((NFNL_SUBSYS_CTNETLINK << 8) | ty).to_ne_bytes());
    buf.extend_from_slice(&flags.to_ne_bytes());
    buf.extend_from_slice(&seq.to_ne_bytes());
    buf.extend_from_slice(&0u32.to_ne_bytes());
    buf.extend_from_slice(&[AF_INET, 0, 0, 0]); // nfgenmsg: family, version, res_id
    start
}

fn finish(buf: &mut [u8], start: usize) {
    let len = u32::try_from(buf.len() - start).unwrap_or(u32::MAX);
    buf[start..start + 4].copy_from_slice(&len.to_ne_bytes());
}

fn attr(buf: &mut Vec<u8>, ty: u16, data: &[u8]) {
    let len = u16::try_from(4 + data.len()).unwrap_or(u16::MAX);
    buf.extend_from_slice(&len.to_ne_bytes());
    buf.extend_from_slice(&ty.to_ne_bytes());
    buf.extend_from_slice(data);
    while !buf.len().is_multiple_of(4) {
        buf.push(0);
    }
}

fn nest(buf: &mut Vec<u8>, ty: u16, body: impl FnOnce(&mut Vec<u8>)) {
    let start = buf.len();
    buf.extend_from_slice(&0u16.to_ne_bytes());
    buf.extend_from_slice(&(ty | NLA_F_NESTED).to_ne_bytes());
    body(buf);
    let len = u16::try_from(buf.len() - start).unwrap_or(u16::MAX);
    buf[start..start + 2].copy_from_slice(&len.to_ne_bytes());
}

/// A dump request for the IPv4 conntrack table.
pub fn encode_dump(seq: u32) -> Vec<u8> {
    let mut buf = Vec::new();
    let m = header(&mut buf, IPCTNL_MSG_CT_GET, NLM_F_REQUEST | NLM_F_DUMP, seq);
    finish(&mut buf, m);
    buf
}

/// Appends a request (with ACK) that deletes the entry whose original tuple is `t`.
pub fn encode_delete(buf: &mut Vec<u8>, seq: u32, t: &Tuple) {
    let m = header(buf, IPCTNL_MSG_CT_DELETE, NLM_F_REQUEST | NLM_F_ACK, seq);
    nest(buf, CTA_TUPLE_ORIG, |b| {
        nest(b, CTA_TUPLE_IP, |b| {
            attr(b, CTA_IP_V4_SRC, &t.src.octets());
            attr(b, CTA_IP_V4_DST, &t.dst.octets());
        });
        nest(b, CTA_TUPLE_PROTO, |b| {
            attr(b, CTA_PROTO_NUM, &[t.proto]);
            attr(b, CTA_PROTO_SRC_PORT, &t.sport.to_be_bytes());
            attr(b, CTA_PROTO_DST_PORT, &t.dport.to_be_bytes());
        });
    });
    finish(buf, m);
}

fn attrs(mut rest: &[u8]) -> Vec<(u16, &[u8])> {
    let mut out = Vec::new();
    while rest.len() >= 4 {
        let len = usize::from(u16::from_ne_bytes([rest[0], rest[1]]));
        let ty = u16::from_ne_bytes([rest[2], rest[3]]) & !NLA_F_NESTED;
        if len < 4 || len > rest.len() {
            break;
        }
        out.push((ty, &rest[4..len]));
        rest = rest.get((len + 3) & !3..).unwrap_or_default();
    }
    out
}

fn parse_tuple(data: &[u8]) -> Option<Tuple> {
    let (mut src, mut dst, mut proto, mut sport, mut dport) = (None, None, None, 0, 0);
    for (ty, v) in attrs(data) {
        match ty {
            CTA_TUPLE_IP => {
                for (ty, v) in attrs(v) {
                    let ip = <[u8; 4]>::try_from(v).ok().map(Ipv4Addr::from);
                    match ty {
                        CTA_IP_V4_SRC => src = ip,
                        CTA_IP_V4_DST => dst = ip,
                        _ => {}
                    }
                }
            }
            CTA_TUPLE_PROTO => {
                for (ty, v) in attrs(v) {
                    let port = <[u8; 2]>::try_from(v).ok().map(u16::from_be_bytes);
                    match ty {
                        CTA_PROTO_NUM => proto = v.first().copied(),
                        CTA_PROTO_SRC_PORT => sport = port.unwrap_or(0),
                        CTA_PROTO_DST_PORT => dport = port.unwrap_or(0),
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    Some(Tuple {
        src: src?,
        dst: dst?,
        proto: proto?,
        sport,
        dport,
    })
}

/// Parses a dumped entry (the message payload after the netlink header, starting with the
/// 4-byte nfgenmsg). `None` for anything that is not an IPv4 entry with both tuples.
pub fn parse_entry(payload: &[u8]) -> Option<Entry> {
    let (mut orig, mut reply) = (None, None);
    for (ty, v) in attrs(payload.get(4..)?) {
        match ty {
            CTA_TUPLE_ORIG => orig = parse_tuple(v),
            CTA_TUPLE_REPLY => reply = parse_tuple(v),
            _ => {}
        }
    }
    Some(Entry {
        orig: orig?,
        reply: reply?,
    })
}

/// Sets the namespace's conntrack idle timeouts of established TCP and streaming UDP flows,
/// so a load-balanced connection idle for less than the operator's bound is never forgotten
/// by conntrack (moby/moby#31208). Shared by every load-balancer backend.
pub fn set_idle_timeouts(
    ns_file: &std::fs::File,
    ns: &crate::port::NsRef,
    t: crate::lb::IdleTimeouts,
) -> crate::port::PortResult<()> {
    for (key, d) in [
        (
            "net/netfilter/nf_conntrack_tcp_timeout_established",
            t.tcp_established,
        ),
        (
            "net/netfilter/nf_conntrack_udp_timeout_stream",
            t.udp_stream,
        ),
    ] {
        super::netns::write_sysctl(ns_file, key, &d.as_secs().max(1).to_string()).map_err(|e| {
            crate::port::PortError::io("set conntrack timeout", format!("{key} in {ns}"), e)
        })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delete_message_round_trips_through_the_parser() {
        let t = Tuple {
            src: Ipv4Addr::new(10, 50, 0, 11),
            dst: Ipv4Addr::new(10, 50, 100, 7),
            proto: 17,
            sport: 40000,
            dport: 53,
        };
        let mut buf = Vec::new();
        encode_delete(&mut buf, 7, &t);
        assert_eq!(buf.len() % 4, 0);
        assert_eq!(
            u32::from_ne_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize,
            buf.len()
        );
        // An entry is the same attributes with both tuples: reuse the orig nest as reply.
        let body = &buf[16..];
        let mut entry = body.to_vec();
        let orig = &body[4..];
        let mut reply = orig.to_vec();
        reply[2] = 2; // CTA_TUPLE_REPLY
        entry.extend_from_slice(&reply);
        assert_eq!(parse_entry(&entry), Some(Entry { orig: t, reply: t }));
        assert_eq!(parse_entry(&body[..4]), None);
    }
}
