//! The resolver's redirect inside a sandbox (see `crate::dns::redirect` for why it is
//! stateless): the resolver's sockets are bound to 127.0.0.11 on random ports, and in the
//! sandbox's own namespace four rules at the raw priority of the output hook rewrite the ports:
//!
//! ```text
//! table ip swarmnet-dns {
//!     chain output {
//!         type filter hook output priority raw; policy accept;
//!         ip daddr 127.0.0.11 udp dport 53 notrack udp dport set 40001
//!         ip saddr 127.0.0.11 udp sport 40001 notrack udp sport set 53
//!         ip daddr 127.0.0.11 tcp dport 53 notrack tcp dport set 40002
//!         ip saddr 127.0.0.11 tcp sport 40002 notrack tcp sport set 53
//!     }
//! }
//! ```
//!
//! Port 53 of the sandbox stays free, so a task can run its own DNS server on 0.0.0.0:53 (UDP
//! and TCP) and peers reach it on the task's address. Only the output hook: 127.0.0.11 is
//! reachable from inside the namespace only (loopback), so nothing from outside can match,
//! and a packet that leaves through loopback enters again without passing output. The port
//! writes update the transport checksum (`csum_type inet` at the UDP or TCP checksum offset,
//! as `nft` encodes them); the ports are not in the pseudo-header, so no pseudo-header flag.
//! A reply rule matches the resolver's own bound port, which no other socket in the sandbox
//! can hold, so a task's traffic is never rewritten except what it sends to 127.0.0.11:53.
//!
//! Our own table, family `ip`, [`TABLE`], replaced whole in one transaction (add, delete, add:
//! the first `add` makes the `delete` valid when the table is missing), so applying is
//! idempotent, repairs any hand edit and replaces the DNAT layout of earlier versions.
//!
//! [`read`] dumps the chain's rules and decodes each back into a [`Rewrite`] (or a
//! [`RuleSeen::Other`] naming its expressions), so the caller compares contents, not only the
//! table's presence. The decoding is by meaning, not by bytes, so attributes the kernel adds
//! in dumps do not count as drift.
//!
//! Invariants: the table holds exactly [`DnsRedirect::rules`] after [`ensure`]; it lives and
//! dies with the sandbox's namespace, and [`delete`] removes it from a namespace netd stops
//! serving but does not own (an attached container's). [`LinuxDnsRedirect`] is the
//! [`DnsRedirectPort`] over these functions.

use std::io;
use std::net::Ipv4Addr;
use std::os::fd::AsFd;
use std::path::Path;

use super::NfSocket;
use super::encode::{
    Exprs, NFNL_MSG_BATCH_BEGIN, NFNL_MSG_BATCH_END, NFNL_SUBSYS_NFTABLES, NFPROTO_IPV4,
    NFPROTO_UNSPEC, NFT_MSG_DELTABLE, NFT_MSG_GETRULE, NFT_MSG_GETTABLE, NFT_MSG_NEWCHAIN,
    NFT_MSG_NEWRULE, NFT_MSG_NEWTABLE, NFTA_CHAIN_HOOK, NFTA_CHAIN_NAME, NFTA_CHAIN_POLICY,
    NFTA_CHAIN_TABLE, NFTA_CHAIN_TYPE, NFTA_DATA_VALUE, NFTA_EXPR_DATA, NFTA_EXPR_NAME,
    NFTA_HOOK_HOOKNUM, NFTA_HOOK_PRIORITY, NFTA_LIST_ELEM, NFTA_RULE_CHAIN, NFTA_RULE_EXPRESSIONS,
    NFTA_RULE_TABLE, NFTA_TABLE_FLAGS, NFTA_TABLE_NAME, NLM_F_ACK, NLM_F_APPEND, NLM_F_CREATE,
    NLM_F_REQUEST, Writer, parse_attrs, parse_nested,
};
use crate::dns::redirect::{
    Dir, DnsRedirect, DnsRedirectPort, PROTO_TCP, PROTO_UDP, Rewrite, RuleSeen,
};
use crate::linux::netns;
use crate::port::{PortError, PortResult};

/// Our table in every sandbox namespace the resolver serves.
pub const TABLE: &str = "swarmnet-dns";
const CHAIN: &str = "output";

// nf_tables.h / netfilter.h numbers only this table uses.
const NF_INET_LOCAL_OUT: u32 = 3;
const NF_ACCEPT: u32 = 1;
/// `NF_IP_PRI_RAW`: before conntrack (-200), so `notrack` keeps it out.
const PRIORITY_RAW: i32 = -300;
const NFT_MSG_GETCHAIN: u16 = 4;
const NLM_F_DUMP: u16 = 0x300;
/// `NFT_PAYLOAD_CSUM_INET`.
const CSUM_INET: u32 = 1;
// Register NFT_REG_1 (16 bytes).
const REG_1: u32 = 1;
// Payload bases.
const BASE_NETWORK: u32 = 1;
const BASE_TRANSPORT: u32 = 2;

/// Offset of the transport checksum: UDP 6, TCP 16.
fn csum_offset(proto: u8) -> u32 {
    if proto == PROTO_TCP { 16 } else { 6 }
}

/// `payload load len @ base + offset => reg 1; cmp eq reg 1 want`
fn match_payload(x: &mut Exprs<'_>, base: u32, offset: u32, want: &[u8]) {
    let len = u32::try_from(want.len()).unwrap_or(0);
    x.payload(REG_1, base, offset, len);
    x.cmp_eq(REG_1, want);
}

/// One rewrite rule, encoded as `nft` encodes it.
fn rule(w: &mut Writer, seq: u32, flags: u16, r: &Rewrite) {
    let m = msg(w, NFT_MSG_NEWRULE, NLM_F_CREATE | NLM_F_APPEND | flags, seq);
    w.str(NFTA_RULE_TABLE, TABLE);
    w.str(NFTA_RULE_CHAIN, CHAIN);
    let exprs = w.nest(NFTA_RULE_EXPRESSIONS);
    let mut x = Exprs::new(w);
    // Query: daddr (offset 16) and dport (transport offset 2); reply: saddr 12, sport 0.
    let (addr_off, port_off) = match r.dir {
        Dir::Query => (16, 2),
        Dir::Reply => (12, 0),
    };
    match_payload(&mut x, BASE_NETWORK, addr_off, &r.addr.octets());
    x.meta_l4proto(REG_1);
    x.cmp_eq(REG_1, &[r.proto]);
    match_payload(&mut x, BASE_TRANSPORT, port_off, &r.from_port.to_be_bytes());
    x.expr("notrack", |_| {});
    x.expr("immediate", |w| {
        w.be32(1, REG_1);
        w.data_value(2, &r.to_port.to_be_bytes());
    });
    x.expr("payload", |w| {
        w.be32(5, REG_1); // SREG
        w.be32(2, BASE_TRANSPORT);
        w.be32(3, port_off);
        w.be32(4, 2); // LEN
        w.be32(6, CSUM_INET);
        w.be32(7, csum_offset(r.proto));
    });
    w.end_nest(exprs);
    w.end_msg(m);
}

fn msg(w: &mut Writer, ty: u16, flags: u16, seq: u32) -> usize {
    w.begin_msg(
        (NFNL_SUBSYS_NFTABLES << 8) | ty,
        NLM_F_REQUEST | flags,
        seq,
        NFPROTO_IPV4,
        0,
    )
}

fn table_msg(w: &mut Writer, ty: u16, flags: u16, seq: u32) {
    let m = msg(w, ty, flags, seq);
    w.str(NFTA_TABLE_NAME, TABLE);
    if ty == NFT_MSG_NEWTABLE {
        w.be32(NFTA_TABLE_FLAGS, 0);
    }
    w.end_msg(m);
}

/// One transaction: `want` given → replace the table whole with it; `None` → delete it.
/// Returns the bytes and the sequence number of the message that asks for the ACK.
fn encode(want: Option<&DnsRedirect>, seq: u32) -> (Vec<u8>, u32) {
    let mut w = Writer::default();
    let b = w.begin_msg(
        NFNL_MSG_BATCH_BEGIN,
        NLM_F_REQUEST,
        seq,
        NFPROTO_UNSPEC,
        NFNL_SUBSYS_NFTABLES,
    );
    w.end_msg(b);
    let mut s = seq;
    let mut next = || {
        s = s.wrapping_add(1);
        s
    };
    table_msg(&mut w, NFT_MSG_NEWTABLE, NLM_F_CREATE, next());
    let last = match want {
        None => {
            let l = next();
            table_msg(&mut w, NFT_MSG_DELTABLE, NLM_F_ACK, l);
            l
        }
        Some(want) => {
            table_msg(&mut w, NFT_MSG_DELTABLE, 0, next());
            table_msg(&mut w, NFT_MSG_NEWTABLE, NLM_F_CREATE, next());
            let m = msg(&mut w, NFT_MSG_NEWCHAIN, NLM_F_CREATE, next());
            w.str(NFTA_CHAIN_TABLE, TABLE);
            w.str(NFTA_CHAIN_NAME, CHAIN);
            let h = w.nest(NFTA_CHAIN_HOOK);
            w.be32(NFTA_HOOK_HOOKNUM, NF_INET_LOCAL_OUT);
            w.attr(NFTA_HOOK_PRIORITY, &PRIORITY_RAW.to_be_bytes());
            w.end_nest(h);
            w.be32(NFTA_CHAIN_POLICY, NF_ACCEPT);
            w.str(NFTA_CHAIN_TYPE, "filter");
            w.end_msg(m);
            let rules = want.rules();
            let mut l = 0;
            for (i, r) in rules.iter().enumerate() {
                let RuleSeen::Rewrite(r) = r else { continue };
                l = next();
                // The last message asks for the ACK that ends the replies.
                let flags = if i + 1 == rules.len() { NLM_F_ACK } else { 0 };
                rule(&mut w, l, flags, r);
            }
            l
        }
    };
    let e = w.begin_msg(
        NFNL_MSG_BATCH_END,
        NLM_F_REQUEST,
        last.wrapping_add(1),
        NFPROTO_UNSPEC,
        NFNL_SUBSYS_NFTABLES,
    );
    w.end_msg(e);
    (w.buf, last)
}

fn transact(sock: &mut NfSocket, want: Option<&DnsRedirect>) -> io::Result<()> {
    let seq = sock.next_seq(16);
    let (bytes, last) = encode(want, seq);
    sock.send(&bytes)?;
    for r in sock.recv_until(last)? {
        if let Some((code, msg)) = r.error
            && code != 0
        {
            let e = io::Error::from_raw_os_error(-code);
            return Err(io::Error::new(
                e.kind(),
                format!(
                    "nft table {TABLE}: {e}{}",
                    msg.map(|m| format!(" ({m})")).unwrap_or_default()
                ),
            ));
        }
    }
    Ok(())
}

/// Makes the table in the namespace `ns` exactly `want`'s (one transaction).
pub fn ensure(ns: impl AsFd + Send, want: &DnsRedirect) -> io::Result<()> {
    netns::run_in(ns, || transact(&mut NfSocket::open()?, Some(want)))
}

/// Removes the table from `ns`; a missing table is fine.
pub fn delete(ns: impl AsFd + Send) -> io::Result<()> {
    netns::run_in(ns, || transact(&mut NfSocket::open()?, None))
}

fn exists(sock: &mut NfSocket, ty: u16, attrs: &[(u16, &str)]) -> io::Result<bool> {
    match sock.request(|seq| {
        let mut w = Writer::default();
        let m = msg(&mut w, ty, NLM_F_ACK, seq);
        for (t, v) in attrs {
            w.str(*t, v);
        }
        w.end_msg(m);
        w.buf
    }) {
        Ok(_) => Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(false),
        Err(e) => Err(e),
    }
}

/// The chain's rules in `ns`, decoded; `None` when the table or the chain is missing.
pub fn read(ns: impl AsFd + Send) -> io::Result<Option<Vec<RuleSeen>>> {
    netns::run_in(ns, || {
        let mut sock = NfSocket::open()?;
        if !exists(&mut sock, NFT_MSG_GETTABLE, &[(NFTA_TABLE_NAME, TABLE)])?
            || !exists(
                &mut sock,
                NFT_MSG_GETCHAIN,
                &[(NFTA_CHAIN_TABLE, TABLE), (NFTA_CHAIN_NAME, CHAIN)],
            )?
        {
            return Ok(None);
        }
        let replies = sock.request(|seq| {
            let mut w = Writer::default();
            let m = msg(&mut w, NFT_MSG_GETRULE, NLM_F_DUMP, seq);
            w.str(NFTA_RULE_TABLE, TABLE);
            w.str(NFTA_RULE_CHAIN, CHAIN);
            w.end_msg(m);
            w.buf
        })?;
        let rule_ty = (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWRULE;
        Ok(Some(
            replies
                .iter()
                .filter(|r| r.ty == rule_ty)
                // Keep our chain's rules only, whatever the kernel's dump filter did.
                .filter(|r| {
                    let attrs = parse_attrs(&r.payload);
                    let is = |ty, want: &str| {
                        attrs
                            .iter()
                            .any(|(t, v)| *t == ty && nul_str(v) == Some(want))
                    };
                    is(NFTA_RULE_TABLE, TABLE) && is(NFTA_RULE_CHAIN, CHAIN)
                })
                .map(|r| decode_rule(&r.payload))
                .collect(),
        ))
    })
}

fn nul_str(v: &[u8]) -> Option<&str> {
    std::str::from_utf8(v.split(|b| *b == 0).next()?).ok()
}

fn attr(attrs: &[(u16, &[u8])], ty: u16) -> Option<u32> {
    let (_, v) = attrs.iter().find(|(t, _)| *t == ty)?;
    Some(u32::from_be_bytes(v.get(..4)?.try_into().ok()?))
}

/// `NFTA_*_DATA` → its `NFTA_DATA_VALUE` bytes.
fn data_value<'a>(attrs: &[(u16, &'a [u8])], ty: u16) -> Option<&'a [u8]> {
    let (_, nested) = attrs.iter().find(|(t, _)| *t == ty)?;
    parse_nested(nested)
        .into_iter()
        .find(|(t, _)| *t == NFTA_DATA_VALUE)
        .map(|(_, v)| v)
}

/// Decodes one `NEWRULE` payload into the rewrite it expresses, by meaning: the compares of
/// the address, l4proto and port, `notrack`, and the port write with its checksum update.
/// Anything else (another expression, a compare that is not `eq`, a write without the right
/// checksum update, a missing part) is a foreign rule, named by its expressions.
pub(crate) fn decode_rule(payload: &[u8]) -> RuleSeen {
    #[derive(Clone, Copy, PartialEq)]
    enum Field {
        Daddr,
        Saddr,
        Dport,
        Sport,
        Proto,
        Other,
    }
    let attrs = parse_attrs(payload);
    let Some((_, exprs)) = attrs.iter().find(|(t, _)| *t == NFTA_RULE_EXPRESSIONS) else {
        return RuleSeen::Other(String::new());
    };
    let mut m = std::collections::BTreeMap::<u8, Vec<u8>>::new();
    let key = |f: Field| f as u8;
    let (mut loaded, mut imm, mut wrote, mut notrack, mut foreign) =
        (Field::Other, None, None, false, false);
    let mut names = Vec::new();
    for (t, elem) in parse_nested(exprs) {
        if t != NFTA_LIST_ELEM {
            continue;
        }
        let e = parse_nested(elem);
        let name = e
            .iter()
            .find(|(t, _)| *t == NFTA_EXPR_NAME)
            .and_then(|(_, v)| nul_str(v))
            .unwrap_or("?")
            .to_string();
        let data = e
            .iter()
            .find(|(t, _)| *t == NFTA_EXPR_DATA)
            .map(|(_, v)| parse_nested(v))
            .unwrap_or_default();
        match name.as_str() {
            // A load has DREG (1); a write has SREG (5). BASE 2, OFFSET 3, LEN 4.
            "payload" if attr(&data, 5).is_none() => {
                loaded = match (attr(&data, 2), attr(&data, 3), attr(&data, 4)) {
                    (Some(BASE_NETWORK), Some(16), Some(4)) => Field::Daddr,
                    (Some(BASE_NETWORK), Some(12), Some(4)) => Field::Saddr,
                    (Some(BASE_TRANSPORT), Some(2), Some(2)) => Field::Dport,
                    (Some(BASE_TRANSPORT), Some(0), Some(2)) => Field::Sport,
                    _ => Field::Other,
                };
            }
            "payload" => {
                let proto = m.get(&key(Field::Proto)).and_then(|p| p.first().copied());
                let field = match (attr(&data, 2), attr(&data, 3), attr(&data, 4)) {
                    (Some(BASE_TRANSPORT), Some(2), Some(2)) => Some(Field::Dport),
                    (Some(BASE_TRANSPORT), Some(0), Some(2)) => Some(Field::Sport),
                    _ => None,
                };
                // CSUM_TYPE 6, CSUM_OFFSET 7: without them the rewritten packet is dropped.
                let csum = attr(&data, 6) == Some(CSUM_INET)
                    && proto.is_some_and(|p| attr(&data, 7) == Some(csum_offset(p)));
                match (field, csum, wrote) {
                    (Some(f), true, None) => wrote = Some(f),
                    _ => foreign = true,
                }
            }
            // KEY 2 (16: NFT_META_L4PROTO)
            "meta" => {
                loaded = if attr(&data, 2) == Some(16) {
                    Field::Proto
                } else {
                    Field::Other
                };
            }
            // OP 2 (0: eq), DATA 3
            "cmp" => match (attr(&data, 2), data_value(&data, 3)) {
                (Some(0), Some(v)) if loaded != Field::Other && !m.contains_key(&key(loaded)) => {
                    m.insert(key(loaded), v.to_vec());
                }
                _ => foreign = true,
            },
            "notrack" => notrack = true,
            // DATA 2: the new port.
            "immediate" => match data_value(&data, 2) {
                Some(&[a, b]) if imm.is_none() => imm = Some(u16::from_be_bytes([a, b])),
                _ => foreign = true,
            },
            _ => foreign = true,
        }
        names.push(name);
    }
    let get = |f: Field| m.get(&key(f)).map(Vec::as_slice);
    let port = |f: Field| match get(f) {
        Some(&[a, b]) => Some(u16::from_be_bytes([a, b])),
        _ => None,
    };
    let addr = |f: Field| match get(f) {
        Some(&[a, b, c, d]) => Some(Ipv4Addr::new(a, b, c, d)),
        _ => None,
    };
    let proto = match get(Field::Proto) {
        Some(&[p]) => Some(p),
        _ => None,
    };
    let (dir, a, p) = match (wrote, m.len()) {
        (Some(Field::Dport), 3) => (Dir::Query, addr(Field::Daddr), port(Field::Dport)),
        (Some(Field::Sport), 3) => (Dir::Reply, addr(Field::Saddr), port(Field::Sport)),
        _ => (Dir::Query, None, None),
    };
    match (foreign, notrack, proto, a, p, imm) {
        (false, true, Some(proto), Some(addr), Some(from_port), Some(to_port))
            if proto == PROTO_UDP || proto == PROTO_TCP =>
        {
            RuleSeen::Rewrite(Rewrite {
                dir,
                proto,
                addr,
                from_port,
                to_port,
            })
        }
        _ => RuleSeen::Other(names.join(" ")),
    }
}

/// [`DnsRedirectPort`] on the sandboxes' own namespaces (opened by path per call).
#[derive(Debug, Default)]
pub struct LinuxDnsRedirect;

fn port_err(op: &'static str, netns: &Path) -> impl Fn(io::Error) -> PortError {
    let object = format!("nft table ip {TABLE} in {}", netns.display());
    move |e| PortError::io(op, object.clone(), e)
}

impl DnsRedirectPort for LinuxDnsRedirect {
    fn ensure(&self, netns: &Path, want: &DnsRedirect) -> PortResult<()> {
        let err = port_err("apply", netns);
        ensure(netns::open(netns).map_err(&err)?, want).map_err(err)
    }
    fn delete(&self, netns: &Path) -> PortResult<()> {
        let err = port_err("delete", netns);
        delete(netns::open(netns).map_err(&err)?).map_err(err)
    }
    fn read(&self, netns: &Path) -> PortResult<Option<Vec<RuleSeen>>> {
        let err = port_err("read", netns);
        read(netns::open(netns).map_err(&err)?).map_err(err)
    }
    fn generation(&self, netns: &Path) -> PortResult<u32> {
        let err = port_err("read generation of", netns);
        super::ruleset_generation(netns::open(netns).map_err(&err)?).map_err(err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn want() -> DnsRedirect {
        DnsRedirect {
            addr: Ipv4Addr::new(127, 0, 0, 11),
            udp_port: 40001,
            tcp_port: 40002,
        }
    }

    /// The NEWRULE payloads of an encoded transaction.
    fn rule_payloads(bytes: &[u8]) -> Vec<&[u8]> {
        let rule_ty = (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWRULE;
        let mut out = Vec::new();
        let mut off = 0;
        while off < bytes.len() {
            let len = u32::from_ne_bytes(bytes[off..off + 4].try_into().unwrap()) as usize;
            let ty = u16::from_ne_bytes(bytes[off + 4..off + 6].try_into().unwrap());
            if ty == rule_ty {
                out.push(&bytes[off + 16..off + len]);
            }
            off += (len + 3) & !3;
        }
        out
    }

    #[test]
    fn our_own_encoding_decodes_to_the_rewrites() {
        let (bytes, _) = encode(Some(&want()), 7);
        let seen: Vec<RuleSeen> = rule_payloads(&bytes).into_iter().map(decode_rule).collect();
        assert_eq!(seen, want().rules());
    }

    #[test]
    fn garbled_rules_decode_as_foreign_never_panic() {
        let mut rng = 0x9e37_79b9_7f4a_7c15u64;
        let (bytes, _) = encode(Some(&want()), 1);
        let rules: Vec<Vec<u8>> = rule_payloads(&bytes)
            .into_iter()
            .map(<[u8]>::to_vec)
            .collect();
        let mut foreign = 0;
        for i in 0..4000 {
            let mut b = rules[i % rules.len()].clone();
            for _ in 0..3 {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                let at = (rng as usize) % b.len();
                b[at] = (rng >> 32) as u8;
            }
            if matches!(decode_rule(&b), RuleSeen::Other(_)) {
                foreign += 1;
            }
            let cut = (rng as usize >> 8) % b.len();
            let _ = decode_rule(&b[..cut]);
        }
        assert!(foreign > 0, "mutations never made a rule foreign");
    }

    #[test]
    fn one_transaction_acked_on_its_last_message() {
        let w = want();
        for (nat, msgs) in [(Some(&w), 8), (None, 2)] {
            let (bytes, last) = encode(nat, 100);
            let mut off = 0;
            let mut seen = Vec::new();
            while off < bytes.len() {
                let len = u32::from_ne_bytes(bytes[off..off + 4].try_into().unwrap()) as usize;
                let flags = u16::from_ne_bytes(bytes[off + 6..off + 8].try_into().unwrap());
                let seq = u32::from_ne_bytes(bytes[off + 8..off + 12].try_into().unwrap());
                seen.push((seq, flags & NLM_F_ACK != 0));
                off += (len + 3) & !3;
            }
            assert_eq!(seen.len(), msgs + 2, "begin + messages + end");
            let acked: Vec<u32> = seen.iter().filter(|s| s.1).map(|s| s.0).collect();
            assert_eq!(acked, [last]);
            assert_eq!(last, 100 + msgs as u32);
        }
    }
}
