//! The full request path: every query the fast path does not take, parsed and answered with
//! hickory-proto.
//!
//! Decisions, in order (each a protocol rule or a security anchor):
//! 1. shorter than a header, or QR set (a response sent to us): dropped, no answer (answering
//!    responses invites reflection loops between resolvers);
//! 2. opcode other than QUERY: NOTIMP, header only;
//! 3. hickory cannot parse it, or the question count is not 1: FORMERR, header only;
//! 4. EDNS version above 0: BADVERS (RFC 6891 §6.1.3);
//! 5. class other than IN (CHAOS `version.bind` and friends): REFUSED;
//! 6. zone transfers (AXFR/IXFR): REFUSED, we are no authoritative server for them;
//! 7. cluster names: the view answers (A, PTR, SRV; empty NOERROR for other types;
//!    NXDOMAIN for names not visible here); negative answers (NXDOMAIN, NODATA) carry the
//!    zone's SOA with the view's TTL as negative TTL, so caching stubs cache them (RFC 2308);
//! 8. everything else: forwarded, or REFUSED/NXDOMAIN for internal-only sandboxes, or SERVFAIL
//!    when no usable upstream exists (the resolver listed as its own upstream).
//!
//! UDP answers larger than 512 bytes, or the client's EDNS payload size (capped at
//! [`MAX_UDP_PAYLOAD`]), drop the additional section first and then answer records from the
//! end, whole records only, and set TC (RFC 1035 §4.2.1, RFC 2181 §9). TCP answers are whole.
//!
//! Invariant: no input makes this module panic; hickory's parser is additionally run under
//! `catch_unwind` so a bug there costs one FORMERR, not the sandbox's server loop.

use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicU64, Ordering};

use hickory_proto::op::{Edns, Message, MessageType, Metadata, OpCode, ResponseCode};
use hickory_proto::rr::rdata::{A, PTR, SOA, SRV};
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType};
use hickory_proto::serialize::binary::{BinEncodable, BinEncoder};
use rand::Rng;
use rand::seq::SliceRandom;

use super::forward::{Decision, ForwardPolicy};
use super::view::{DnsView, Lookup, NameData};
use super::wire;
use super::{MAX_UDP_PAYLOAD, OUR_EDNS_PAYLOAD, Transport};

/// Panics caught in hickory's parser since start (should stay 0; the fuzz tests check it).
pub(crate) static CAUGHT_PANICS: AtomicU64 = AtomicU64::new(0);

/// The SOA of negative answers for cluster names (RFC 2308 §3): owner and MNAME the apex
/// ([`DnsView::apex_labels`]), RNAME `hostmaster.<apex>`, these timers, MINIMUM and TTL the
/// view's TTL, so a caching stub keeps an NXDOMAIN or NODATA exactly as long as a positive
/// answer and a task that appears is seen as soon as a new address would be.
pub(crate) const SOA_SERIAL: u32 = 1;
pub(crate) const SOA_REFRESH: i32 = 7200;
pub(crate) const SOA_RETRY: i32 = 1800;
pub(crate) const SOA_EXPIRE: i32 = 86_400;
pub(crate) const SOA_RNAME_LABEL: &str = "hostmaster";

/// Puts the SOA of the zone of `qname` in the authority section of a negative answer.
fn add_soa(resp: &mut Message, view: &DnsView, qname: &Name, key: &[u8]) {
    let labels = view.apex_labels(key).min(usize::from(qname.num_labels()));
    let apex = qname.trim_to(labels);
    let Ok(rname) = Name::from_ascii(SOA_RNAME_LABEL).and_then(|h| h.append_domain(&apex)) else {
        return;
    };
    let ttl = view.ttl();
    let soa = SOA::new(
        apex.clone(),
        rname,
        SOA_SERIAL,
        SOA_REFRESH,
        SOA_RETRY,
        SOA_EXPIRE,
        ttl,
    );
    resp.add_authority(Record::from_rdata(apex, ttl, RData::SOA(soa)));
}

/// What to do with a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FullOutcome {
    /// The answer is in the output buffer.
    Reply,
    /// Forward the request upstream; a UDP client accepts at most `udp_limit` bytes.
    Forward { udp_limit: usize },
    /// Send nothing.
    Drop,
}

/// Largest UDP answer for a request with (`Some(payload)`) or without EDNS.
pub fn udp_limit(edns_payload: Option<u16>) -> usize {
    match edns_payload {
        // RFC 6891 §6.2.5: values below 512 are treated as 512.
        Some(p) => usize::from(p).clamp(512, MAX_UDP_PAYLOAD),
        None => 512,
    }
}

/// Puts the addresses of `d` in answer order into `scratch`: shuffled per answer when there is
/// more than one. Shared by both paths so that, from the same generator state, they produce
/// the same order.
pub(crate) fn order_addrs<R: Rng + ?Sized>(d: &NameData, rng: &mut R, scratch: &mut Vec<Ipv4Addr>) {
    scratch.clear();
    scratch.extend_from_slice(&d.a);
    if scratch.len() > 1 {
        scratch.shuffle(rng);
    }
}

fn parse(req: &[u8]) -> Option<Message> {
    match std::panic::catch_unwind(|| Message::from_vec(req)) {
        Ok(Ok(m)) => Some(m),
        Ok(Err(_)) => None,
        Err(_) => {
            CAUGHT_PANICS.fetch_add(1, Ordering::Relaxed);
            None
        }
    }
}

fn name_of(key: &str) -> Option<Name> {
    let mut n = Name::from_ascii(key).ok()?;
    n.set_fqdn(true);
    Some(n)
}

/// Answers `req` through hickory. `out` receives the response on [`FullOutcome::Reply`].
pub fn respond<R: Rng + ?Sized>(
    view: &DnsView,
    policy: &ForwardPolicy,
    req: &[u8],
    transport: Transport,
    rng: &mut R,
    scratch: &mut Vec<Ipv4Addr>,
    out: &mut Vec<u8>,
) -> FullOutcome {
    let Some(h) = wire::header(req) else {
        return FullOutcome::Drop;
    };
    if h.is_response() {
        return FullOutcome::Drop;
    }
    if h.opcode() != 0 {
        wire::header_only(&h, ResponseCode::NotImp.low(), out);
        return FullOutcome::Reply;
    }
    let formerr = |out: &mut Vec<u8>| {
        wire::header_only(&h, ResponseCode::FormErr.low(), out);
        FullOutcome::Reply
    };
    let Some(msg) = parse(req) else {
        return formerr(out);
    };
    if msg.queries.len() != 1 {
        return formerr(out);
    }
    let query = msg.queries[0].clone();
    let ra = policy.recursion_available();
    let limit = match transport {
        Transport::Udp => udp_limit(msg.edns.as_ref().map(Edns::max_payload)),
        Transport::Tcp => usize::from(u16::MAX),
    };
    let mut resp = Message::new(msg.metadata.id, MessageType::Response, OpCode::Query);
    resp.metadata = Metadata::response_from_request(&msg.metadata);
    resp.metadata.recursion_available = ra;
    resp.add_query(query.clone());
    if let Some(e) = &msg.edns {
        let mut ours = Edns::new();
        ours.set_max_payload(OUR_EDNS_PAYLOAD);
        ours.set_version(0);
        // RFC 3225 §3: the DO bit of the query is copied into the response.
        ours.set_dnssec_ok(e.flags().dnssec_ok);
        resp.set_edns(ours);
        if e.version() > 0 {
            resp.metadata.response_code = ResponseCode::BADVERS;
            return encode(&resp, limit, out);
        }
    }
    if query.query_class() != DNSClass::IN {
        resp.metadata.response_code = ResponseCode::Refused;
        return encode(&resp, limit, out);
    }
    let qtype = query.query_type();
    if matches!(qtype, RecordType::AXFR | RecordType::IXFR) {
        resp.metadata.response_code = ResponseCode::Refused;
        return encode(&resp, limit, out);
    }
    let mut key = [0u8; wire::MAX_KEY];
    let key_len = wire::key_of_labels(query.name().iter(), &mut key).unwrap_or(0);
    let key = &key[..key_len];
    let lookup = if key_len > 0 {
        view.lookup(key)
    } else {
        Lookup::NotOurs
    };
    let owner = query.name().clone();
    let ttl = view.ttl();
    match lookup {
        Lookup::Found(d) => {
            resp.metadata.authoritative = true;
            match qtype {
                // ANY: the address records (RFC 8482 allows a minimal subset).
                RecordType::A | RecordType::ANY => {
                    order_addrs(d, rng, scratch);
                    for ip in scratch.iter() {
                        resp.add_answer(Record::from_rdata(owner.clone(), ttl, RData::A(A(*ip))));
                    }
                }
                RecordType::AAAA => {
                    for ip in &d.aaaa {
                        let rd = RData::AAAA(hickory_proto::rr::rdata::AAAA(*ip));
                        resp.add_answer(Record::from_rdata(owner.clone(), ttl, rd));
                    }
                }
                RecordType::PTR => {
                    for t in &d.ptr {
                        if let Some(n) = name_of(t) {
                            resp.add_answer(Record::from_rdata(
                                owner.clone(),
                                ttl,
                                RData::PTR(PTR(n)),
                            ));
                        }
                    }
                }
                RecordType::SRV => {
                    for s in &d.srv {
                        let Some(target) = name_of(&s.target) else {
                            continue;
                        };
                        let rd = RData::SRV(SRV::new(s.priority, s.weight, s.port, target.clone()));
                        resp.add_answer(Record::from_rdata(owner.clone(), ttl, rd));
                        // The target's addresses as additional data, as CoreDNS does, so a
                        // client needs no second query.
                        if let Lookup::Found(td) = view.lookup(s.target.as_bytes()) {
                            for ip in &td.a {
                                resp.add_additional(Record::from_rdata(
                                    target.clone(),
                                    ttl,
                                    RData::A(A(*ip)),
                                ));
                            }
                        }
                    }
                }
                // Known name, no record of that type: NOERROR, empty (NODATA).
                _ => {}
            }
            if resp.answers.is_empty() {
                add_soa(&mut resp, view, &owner, key);
            }
            encode(&resp, limit, out)
        }
        Lookup::NxDomain => {
            resp.metadata.authoritative = true;
            resp.metadata.response_code = ResponseCode::NXDomain;
            add_soa(&mut resp, view, &owner, key);
            encode(&resp, limit, out)
        }
        Lookup::NotOurs => match policy.decision() {
            Decision::Forward(_) => FullOutcome::Forward { udp_limit: limit },
            Decision::Answer(code) => {
                resp.metadata.response_code = code;
                encode(&resp, limit, out)
            }
        },
    }
}

fn emit(msg: &Message, out: &mut Vec<u8>) -> bool {
    out.clear();
    let mut enc = BinEncoder::new(out);
    msg.emit(&mut enc).is_ok()
}

/// Encodes `msg` into `out`, truncated to `limit` bytes on whole records with TC set.
fn encode(msg: &Message, limit: usize, out: &mut Vec<u8>) -> FullOutcome {
    if emit(msg, out) && out.len() <= limit {
        return FullOutcome::Reply;
    }
    // Additional data is optional: drop it before touching answers, without TC (RFC 2181 §9).
    let mut m = msg.clone();
    m.additionals.clear();
    if emit(&m, out) && out.len() <= limit {
        return FullOutcome::Reply;
    }
    // Largest prefix of the answers that fits; sizes grow with the prefix, so bisect.
    let answers = std::mem::take(&mut m.answers);
    m.metadata.truncation = true;
    let (mut lo, mut hi) = (0usize, answers.len());
    while lo < hi {
        let mid = (lo + hi).div_ceil(2);
        m.answers = answers[..mid].to_vec();
        if emit(&m, out) && out.len() <= limit {
            lo = mid;
        } else {
            hi = mid - 1;
        }
    }
    m.answers = answers[..lo].to_vec();
    if emit(&m, out) && out.len() <= limit {
        return FullOutcome::Reply;
    }
    // Not even the question fits (cannot happen for a request that fit in the same limit).
    FullOutcome::Drop
}

/// Shrinks a forwarded answer to `limit` bytes for a UDP client: whole records, TC set. A
/// message hickory cannot parse becomes a header-only TC answer (the client retries over TCP).
pub fn truncate_foreign(resp: &[u8], limit: usize, out: &mut Vec<u8>) -> bool {
    if resp.len() <= limit {
        out.clear();
        out.extend_from_slice(resp);
        return true;
    }
    if let Some(m) = parse(resp)
        && encode(&m, limit, out) == FullOutcome::Reply
    {
        return true;
    }
    let Some(h) = wire::header(resp) else {
        return false;
    };
    out.clear();
    out.extend_from_slice(&h.id.to_be_bytes());
    out.extend_from_slice(&(h.flags | wire::FLAG_TC).to_be_bytes());
    out.extend_from_slice(&[0; 8]);
    true
}
