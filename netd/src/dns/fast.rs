//! The allocation-free fast path: cluster A/AAAA lookups answered inline in the UDP loop.
//!
//! It handles exactly one shape (see [`wire::parse_simple`]): one IN question for A or AAAA
//! whose name the view knows, with no EDNS or a bare EDNS(0) OPT. Everything else returns
//! `None` and goes to the full path ([`super::full`]), which must produce the very same bytes
//! for the queries the fast path takes; `tests::fast_equals_full` and
//! `netd/tests/dns_paths.rs` check that byte for byte.
//!
//! Layout of the answer (what hickory emits for the same message):
//! header (QR, AA, RD/CD copied, RA per policy, TC when cut) · the question copied verbatim
//! (case preserved, RFC 4343; clients using 0x20 randomisation compare it) · one A record per
//! address with its owner compressed to a pointer at offset 12 (0xC00C) · for an AAAA NODATA,
//! the zone's SOA in the authority section (RFC 2308) · the OPT record when
//! the query had one (payload [`OUR_EDNS_PAYLOAD`], DO copied, RFC 3225).
//!
//! Invariants: no heap allocation once `scratch` has grown to the largest answer set; every
//! write is bounds-checked against the output buffer and the UDP limit.

use std::net::Ipv4Addr;

use rand::Rng;

use super::OUR_EDNS_PAYLOAD;
use super::full::{
    SOA_EXPIRE, SOA_REFRESH, SOA_RETRY, SOA_RNAME_LABEL, SOA_SERIAL, order_addrs, udp_limit,
};
use super::view::{DnsView, Lookup};
use super::wire::{self, CLASS_IN, TYPE_A, TYPE_AAAA, TYPE_OPT, TYPE_SOA};

const OPT_LEN: usize = 11;
/// hickory-proto 0.26 compresses at most this many names per message (an anti-DoS bound in
/// `Name::emit_as_canonical`, `COMPRESSED_NAME_LIMIT`); the question is the first. Past it,
/// owners are written in full. Mirrored here so both paths stay byte-identical (checked by the
/// equivalence tests, which fail if a hickory upgrade changes it).
const HICKORY_COMPRESSED_NAME_LIMIT: usize = 120;

/// Reused state of one UDP loop.
#[derive(Debug, Default)]
pub struct FastPath {
    scratch: Vec<Ipv4Addr>,
}

impl FastPath {
    pub fn new() -> Self {
        Self::default()
    }

    /// Answers `req` into `out` and returns the answer's length, or `None` for the full path.
    /// `ra`: whether this sandbox may forward (the RA bit).
    pub fn try_answer<R: Rng + ?Sized>(
        &mut self,
        view: &DnsView,
        ra: bool,
        req: &[u8],
        rng: &mut R,
        out: &mut [u8],
    ) -> Option<usize> {
        let mut key = [0u8; wire::MAX_KEY];
        let q = wire::parse_simple(req, &mut key)?;
        if q.qtype != TYPE_A && q.qtype != TYPE_AAAA {
            return None;
        }
        let Lookup::Found(d) = view.lookup(&key[..q.key_len]) else {
            return None;
        };
        let limit = udp_limit(q.opt.map(|o| o.payload)).min(out.len());
        let base = q.question_end + if q.opt.is_some() { OPT_LEN } else { 0 };
        if base > limit {
            return None;
        }
        let addrs: &[Ipv4Addr] = if q.qtype == TYPE_A {
            order_addrs(d, rng, &mut self.scratch);
            &self.scratch
        } else {
            // No IPv6 yet: a known name has no AAAA (empty NOERROR). `d.aaaa` is empty.
            if !d.aaaa.is_empty() {
                return None;
            }
            &[]
        };
        // Record i (0-based) is the (i + 2)th name of the message: compressed (2-byte pointer)
        // while i + 1 < the limit, the question's name in full after that.
        let qname = req.get(wire::HEADER_LEN..q.question_end - 4)?;
        let record_len = |i: usize| {
            10 + 4
                + if i + 1 < HICKORY_COMPRESSED_NAME_LIMIT {
                    2
                } else {
                    qname.len()
                }
        };
        let mut n = 0;
        let mut used = base;
        while n < addrs.len() && used + record_len(n) <= limit {
            used += record_len(n);
            n += 1;
        }
        let truncated = n < addrs.len();
        // NODATA (a known name without AAAA): the zone's SOA in the authority section, laid
        // out as hickory emits it: owner and MNAME compressed to the apex's labels in the
        // question, RNAME `hostmaster` + the same pointer (see `full::add_soa`).
        let soa_at = if addrs.is_empty() {
            let at = apex_offset(qname, view.apex_labels(&key[..q.key_len]))?;
            if used + SOA_LEN > limit {
                return None;
            }
            Some(u16::try_from(wire::HEADER_LEN + at).ok()? | 0xC000)
        } else {
            None
        };

        let h = q.header;
        let mut flags = wire::FLAG_QR | wire::FLAG_AA | (h.flags & (wire::FLAG_RD | wire::FLAG_CD));
        if ra {
            flags |= wire::FLAG_RA;
        }
        if truncated {
            flags |= wire::FLAG_TC;
        }
        let an = u16::try_from(n).ok()?;
        let mut w = Writer { out, pos: 0 };
        w.put(&h.id.to_be_bytes())?;
        w.put(&flags.to_be_bytes())?;
        w.put(&[0, 1])?;
        w.put(&an.to_be_bytes())?;
        w.put(&[0, u8::from(soa_at.is_some()), 0, u8::from(q.opt.is_some())])?;
        w.put(req.get(wire::HEADER_LEN..q.question_end)?)?;
        let ttl = view.ttl().to_be_bytes();
        for (i, ip) in addrs[..n].iter().enumerate() {
            if i + 1 < HICKORY_COMPRESSED_NAME_LIMIT {
                w.put(&[0xC0, 0x0C])?;
            } else {
                w.put(qname)?;
            }
            w.put(&TYPE_A.to_be_bytes())?;
            w.put(&CLASS_IN.to_be_bytes())?;
            w.put(&ttl)?;
            w.put(&[0, 4])?;
            w.put(&ip.octets())?;
        }
        if let Some(ptr) = soa_at {
            let ptr = ptr.to_be_bytes();
            w.put(&ptr)?;
            w.put(&TYPE_SOA.to_be_bytes())?;
            w.put(&CLASS_IN.to_be_bytes())?;
            w.put(&ttl)?;
            w.put(&u16::try_from(SOA_LEN - 12).ok()?.to_be_bytes())?;
            w.put(&ptr)?;
            w.put(&[u8::try_from(SOA_RNAME_LABEL.len()).ok()?])?;
            w.put(SOA_RNAME_LABEL.as_bytes())?;
            w.put(&ptr)?;
            w.put(&SOA_SERIAL.to_be_bytes())?;
            w.put(&SOA_REFRESH.to_be_bytes())?;
            w.put(&SOA_RETRY.to_be_bytes())?;
            w.put(&SOA_EXPIRE.to_be_bytes())?;
            w.put(&ttl)?;
        }
        if let Some(o) = q.opt {
            w.put(&[0])?;
            w.put(&TYPE_OPT.to_be_bytes())?;
            w.put(&OUR_EDNS_PAYLOAD.to_be_bytes())?;
            w.put(&[0, 0])?;
            w.put(&(if o.dnssec_ok { 0x8000u16 } else { 0 }).to_be_bytes())?;
            w.put(&[0, 0])?;
        }
        Some(w.pos)
    }
}

/// Bytes of the NODATA SOA record: owner pointer, type, class, TTL, RDLENGTH (12), then MNAME
/// pointer (2), RNAME `hostmaster` label + pointer (1 + 10 + 2) and five 32-bit fields (20).
const SOA_LEN: usize = 12 + 2 + 1 + SOA_RNAME_LABEL.len() + 2 + 20;

/// Offset within `qname` (wire form, uncompressed, ending in the root label) of the suffix
/// made of its last `labels` labels.
fn apex_offset(qname: &[u8], labels: usize) -> Option<usize> {
    let mut starts = [0usize; 128];
    let (mut pos, mut count) = (0usize, 0usize);
    while *qname.get(pos)? != 0 {
        *starts.get_mut(count)? = pos;
        count += 1;
        pos += 1 + usize::from(qname[pos]);
    }
    let labels = labels.min(count);
    (labels > 0).then(|| starts[count - labels])
}

struct Writer<'a> {
    out: &'a mut [u8],
    pos: usize,
}

impl Writer<'_> {
    fn put(&mut self, b: &[u8]) -> Option<()> {
        self.out
            .get_mut(self.pos..self.pos + b.len())?
            .copy_from_slice(b);
        self.pos += b.len();
        Some(())
    }
}
