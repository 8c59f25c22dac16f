//! Minimal in-place reading of DNS messages (RFC 1035 §4.1), no allocation.
//!
//! Used by the fast path to recognise the one common query shape (one question, optional bare
//! EDNS OPT) and by the forwarder to match an upstream's answer to its query. Anything this
//! module does not recognise is left to hickory-proto in the full path: it returns `None`
//! rather than guessing.
//!
//! Invariants: never reads past the slice (every index is checked), never follows compression
//! pointers (a query has no earlier name to point at, so a pointer in a question is either an
//! attack or a full-path case), bounded by the packet length.

/// Header length.
pub const HEADER_LEN: usize = 12;
pub const TYPE_A: u16 = 1;
pub const TYPE_SOA: u16 = 6;
pub const TYPE_AAAA: u16 = 28;
pub const TYPE_OPT: u16 = 41;
pub const CLASS_IN: u16 = 1;

/// Header flag bits (second 16-bit word).
pub const FLAG_QR: u16 = 0x8000;
pub const FLAG_AA: u16 = 0x0400;
pub const FLAG_TC: u16 = 0x0200;
pub const FLAG_RD: u16 = 0x0100;
pub const FLAG_RA: u16 = 0x0080;
pub const FLAG_CD: u16 = 0x0010;

/// Longest key: a 255-byte wire name is at most 253 text bytes.
pub const MAX_KEY: usize = 256;

/// The fixed header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub id: u16,
    pub flags: u16,
    pub qd: u16,
    pub an: u16,
    pub ns: u16,
    pub ar: u16,
}

impl Header {
    pub fn opcode(&self) -> u8 {
        ((self.flags >> 11) & 0xF) as u8
    }
    pub fn is_response(&self) -> bool {
        self.flags & FLAG_QR != 0
    }
}

fn u16_at(p: &[u8], i: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*p.get(i)?, *p.get(i + 1)?]))
}

pub fn header(p: &[u8]) -> Option<Header> {
    if p.len() < HEADER_LEN {
        return None;
    }
    Some(Header {
        id: u16_at(p, 0)?,
        flags: u16_at(p, 2)?,
        qd: u16_at(p, 4)?,
        an: u16_at(p, 6)?,
        ns: u16_at(p, 8)?,
        ar: u16_at(p, 10)?,
    })
}

/// Reads an uncompressed name at `pos`, writing its lowercase dotted form (no trailing dot)
/// into `key`. Returns the offset after the name and the key length. `None` for compression
/// pointers, reserved label types, a label containing `.` (its dotted form would be
/// ambiguous), names over 255 bytes or running off the end.
pub fn read_name(p: &[u8], mut pos: usize, key: &mut [u8; MAX_KEY]) -> Option<(usize, usize)> {
    let start = pos;
    let mut k = 0usize;
    loop {
        let len = usize::from(*p.get(pos)?);
        if len == 0 {
            pos += 1;
            break;
        }
        if len & 0xC0 != 0 {
            return None;
        }
        let label = p.get(pos + 1..pos + 1 + len)?;
        if pos + 1 + len - start > 255 {
            return None;
        }
        if k != 0 {
            *key.get_mut(k)? = b'.';
            k += 1;
        }
        for &b in label {
            if b == b'.' {
                return None;
            }
            *key.get_mut(k)? = b.to_ascii_lowercase();
            k += 1;
        }
        pos += 1 + len;
    }
    Some((pos, k))
}

/// The lowercase dotted key of a parsed name; `None` when a label holds a `.`.
pub fn key_of_labels<'a>(
    labels: impl Iterator<Item = &'a [u8]>,
    key: &mut [u8; MAX_KEY],
) -> Option<usize> {
    let mut k = 0usize;
    for label in labels {
        if k != 0 {
            *key.get_mut(k)? = b'.';
            k += 1;
        }
        for &b in label {
            if b == b'.' {
                return None;
            }
            *key.get_mut(k)? = b.to_ascii_lowercase();
            k += 1;
        }
    }
    Some(k)
}

/// EDNS data of a bare OPT record (no options).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BareOpt {
    pub payload: u16,
    pub dnssec_ok: bool,
}

/// The common query shape, as the fast path handles it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SimpleQuery {
    pub header: Header,
    pub qtype: u16,
    /// Offset just past the question (qname, qtype, qclass).
    pub question_end: usize,
    pub key_len: usize,
    pub opt: Option<BareOpt>,
}

/// Recognises: a query (QR 0, opcode 0), exactly one question of class IN with an
/// uncompressed name, no answer/authority records, and either no additional record or one
/// EDNS(0) OPT with the root owner and no options, ending exactly at the packet's end.
pub fn parse_simple(p: &[u8], key: &mut [u8; MAX_KEY]) -> Option<SimpleQuery> {
    let h = header(p)?;
    if h.is_response() || h.opcode() != 0 || h.qd != 1 || h.an != 0 || h.ns != 0 || h.ar > 1 {
        return None;
    }
    // Z bit set: RFC 1035 says it must be zero; leave odd queries to the full path.
    if h.flags & 0x0040 != 0 {
        return None;
    }
    let (pos, key_len) = read_name(p, HEADER_LEN, key)?;
    let qtype = u16_at(p, pos)?;
    let qclass = u16_at(p, pos + 2)?;
    if qclass != CLASS_IN {
        return None;
    }
    let question_end = pos + 4;
    let opt = if h.ar == 1 {
        // Root owner (0), TYPE OPT, CLASS = payload, TTL = ext-rcode/version/flags, RDLEN 0.
        let o = p.get(question_end..question_end + 11)?;
        if o[0] != 0 || u16::from_be_bytes([o[1], o[2]]) != TYPE_OPT {
            return None;
        }
        let payload = u16::from_be_bytes([o[3], o[4]]);
        let (ext_rcode, version) = (o[5], o[6]);
        let flags = u16::from_be_bytes([o[7], o[8]]);
        let rdlen = u16::from_be_bytes([o[9], o[10]]);
        // Only DO among the flags; anything else (unknown flags, options) → full path.
        if ext_rcode != 0 || version != 0 || flags & 0x7FFF != 0 || rdlen != 0 {
            return None;
        }
        if p.len() != question_end + 11 {
            return None;
        }
        Some(BareOpt {
            payload,
            dnssec_ok: flags & 0x8000 != 0,
        })
    } else {
        if p.len() != question_end {
            return None;
        }
        None
    };
    Some(SimpleQuery {
        header: h,
        qtype,
        question_end,
        key_len,
        opt,
    })
}

/// The question of a message with exactly one: (lowercase key buffer len, qtype, qclass, end).
/// Used to match an upstream's answer to the query it answers.
pub fn question(p: &[u8], key: &mut [u8; MAX_KEY]) -> Option<(usize, u16, u16, usize)> {
    let h = header(p)?;
    if h.qd != 1 {
        return None;
    }
    let (pos, len) = read_name(p, HEADER_LEN, key)?;
    Some((len, u16_at(p, pos)?, u16_at(p, pos + 2)?, pos + 4))
}

/// Whether two messages ask the same single question (name compared case-insensitively:
/// upstreams may change case, e.g. when they use 0x20 randomisation themselves).
pub fn same_question(a: &[u8], b: &[u8]) -> bool {
    let (mut ka, mut kb) = ([0u8; MAX_KEY], [0u8; MAX_KEY]);
    match (question(a, &mut ka), question(b, &mut kb)) {
        (Some((la, ta, ca, _)), Some((lb, tb, cb, _))) => {
            ka[..la] == kb[..lb] && ta == tb && ca == cb
        }
        _ => false,
    }
}

/// A header-only response: `id`, QR, the request's opcode and RD/CD bits, `rcode` (4 bits).
/// For requests hickory cannot or must not parse (unknown opcode, malformed).
pub fn header_only(req: &Header, rcode: u8, out: &mut Vec<u8>) {
    out.clear();
    let flags = FLAG_QR | (req.flags & (0x7800 | FLAG_RD | FLAG_CD)) | u16::from(rcode & 0xF);
    out.extend_from_slice(&req.id.to_be_bytes());
    out.extend_from_slice(&flags.to_be_bytes());
    out.extend_from_slice(&[0; 8]);
}

/// An error response that echoes the question when the request has a readable one (glibc
/// ignores answers whose question does not match its query, and would time out instead),
/// header-only otherwise. RD/CD copied; RA as given; `rcode` (4 bits).
pub fn error_reply(req: &[u8], rcode: u8, ra: bool, out: &mut Vec<u8>) {
    let Some(h) = header(req) else {
        out.clear();
        return;
    };
    header_only(&h, rcode, out);
    if ra {
        out[3] |= 0x80;
    }
    let mut key = [0u8; MAX_KEY];
    if let Some((_, _, _, end)) = question(req, &mut key)
        && let Some(q) = req.get(HEADER_LEN..end)
    {
        out[5] = 1;
        out.extend_from_slice(q);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn query(name: &[&str], qtype: u16, opt: Option<(u16, u16, u16)>) -> Vec<u8> {
        let mut p = vec![
            0x12,
            0x34,
            0x01,
            0x00,
            0,
            1,
            0,
            0,
            0,
            0,
            0,
            u8::from(opt.is_some()),
        ];
        for l in name {
            p.push(l.len() as u8);
            p.extend_from_slice(l.as_bytes());
        }
        p.push(0);
        p.extend_from_slice(&qtype.to_be_bytes());
        p.extend_from_slice(&CLASS_IN.to_be_bytes());
        if let Some((payload, flags, rdlen)) = opt {
            p.push(0);
            p.extend_from_slice(&TYPE_OPT.to_be_bytes());
            p.extend_from_slice(&payload.to_be_bytes());
            p.extend_from_slice(&[0, 0]);
            p.extend_from_slice(&flags.to_be_bytes());
            p.extend_from_slice(&rdlen.to_be_bytes());
        }
        p
    }

    #[test]
    fn simple_query_shapes() {
        let mut k = [0u8; MAX_KEY];
        let q = parse_simple(&query(&["Tasks", "WEB"], TYPE_A, None), &mut k).unwrap();
        assert_eq!(&k[..q.key_len], b"tasks.web");
        assert_eq!(q.opt, None);
        let q = parse_simple(&query(&["web"], TYPE_AAAA, Some((1232, 0x8000, 0))), &mut k).unwrap();
        assert_eq!(
            q.opt,
            Some(BareOpt {
                payload: 1232,
                dnssec_ok: true
            })
        );
        assert_eq!(q.qtype, TYPE_AAAA);
        // EDNS options, trailing bytes, a response, a pointer: not simple.
        assert!(parse_simple(&query(&["web"], TYPE_A, Some((1232, 0, 4))), &mut k).is_none());
        let mut p = query(&["web"], TYPE_A, None);
        p.push(0);
        assert!(parse_simple(&p, &mut k).is_none());
        let mut p = query(&["web"], TYPE_A, None);
        p[2] |= 0x80;
        assert!(parse_simple(&p, &mut k).is_none());
        let mut p = query(&[], TYPE_A, None);
        p[12] = 0xC0;
        p.insert(13, 12);
        assert!(parse_simple(&p, &mut k).is_none());
        // A label holding a dot.
        assert!(parse_simple(&query(&["a.b"], TYPE_A, None), &mut k).is_none());
        // Root name: empty key.
        let q = parse_simple(&query(&[], TYPE_A, None), &mut k).unwrap();
        assert_eq!(q.key_len, 0);
    }

    #[test]
    fn overlong_names_are_refused() {
        let mut k = [0u8; MAX_KEY];
        let long = "a".repeat(63);
        let labels = [long.as_str(); 5];
        assert!(parse_simple(&query(&labels, TYPE_A, None), &mut k).is_none());
        let labels = [long.as_str(); 3];
        assert!(parse_simple(&query(&labels, TYPE_A, None), &mut k).is_some());
    }

    #[test]
    fn question_match_ignores_case_and_id() {
        let a = query(&["Example", "com"], TYPE_A, None);
        let mut b = query(&["example", "COM"], TYPE_A, Some((512, 0, 0)));
        b[0] = 9;
        assert!(same_question(&a, &b));
        let c = query(&["example", "com"], TYPE_AAAA, None);
        assert!(!same_question(&a, &c));
    }
}
