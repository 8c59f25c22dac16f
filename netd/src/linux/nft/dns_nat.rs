//! The resolver's DNAT inside a sandbox, the way Docker's embedded resolver does it (moby
//! `libnetwork/resolver_unix.go`): the resolver's sockets are bound to 127.0.0.11 on random
//! ports, and one nat rule per protocol in the sandbox's own namespace sends what a task
//! addresses to 127.0.0.11:53 there. Port 53 of the sandbox stays free, so a task can run its
//! own DNS server on 0.0.0.0:53 (UDP and TCP) and peers reach it on the task's address.
//!
//! Our own table, family `ip`, [`TABLE`], replaced whole in one transaction (add, delete, add:
//! the first `add` makes the `delete` valid when the table is missing), so applying is
//! idempotent and repairs any hand edit. Only the output hook: 127.0.0.11 is reachable from
//! inside the namespace only (loopback), so nothing arriving from outside can match. Replies
//! need no rule: conntrack reverses the DNAT (source port back to 53).
//!
//! Invariants: the table holds exactly [`DnsNat::render`]'s rules after [`ensure`]; it lives
//! and dies with the sandbox's namespace, and [`delete`] removes it from a namespace netd
//! stops serving but does not own (an attached container's).

use std::io;
use std::net::Ipv4Addr;
use std::os::fd::AsFd;

use super::NfSocket;
use super::encode::{
    NFNL_MSG_BATCH_BEGIN, NFNL_MSG_BATCH_END, NFNL_SUBSYS_NFTABLES, NFPROTO_IPV4, NFT_MSG_DELTABLE,
    NFT_MSG_GETTABLE, NFT_MSG_NEWCHAIN, NFT_MSG_NEWRULE, NFT_MSG_NEWTABLE, NFTA_TABLE_NAME,
    NLM_F_ACK, NLM_F_APPEND, NLM_F_CREATE, NLM_F_REQUEST, Writer,
};
use crate::linux::netns;

/// Our table in every sandbox namespace the resolver serves.
pub const TABLE: &str = "swarmnet-dns";
const CHAIN: &str = "output";

// nf_tables.h attribute numbers used here.
const NFTA_TABLE_FLAGS: u16 = 2;
const NFTA_CHAIN_TABLE: u16 = 1;
const NFTA_CHAIN_NAME: u16 = 3;
const NFTA_CHAIN_HOOK: u16 = 4;
const NFTA_CHAIN_POLICY: u16 = 5;
const NFTA_CHAIN_TYPE: u16 = 7;
const NFTA_HOOK_HOOKNUM: u16 = 1;
const NFTA_HOOK_PRIORITY: u16 = 2;
const NFTA_RULE_TABLE: u16 = 1;
const NFTA_RULE_CHAIN: u16 = 2;
const NFTA_RULE_EXPRESSIONS: u16 = 4;
const NFTA_LIST_ELEM: u16 = 1;
const NFTA_EXPR_NAME: u16 = 1;
const NFTA_EXPR_DATA: u16 = 2;
const NFTA_DATA_VALUE: u16 = 1;
const NF_INET_LOCAL_OUT: u32 = 3;
const NF_ACCEPT: u32 = 1;
const NFPROTO_UNSPEC: u8 = 0;
// Registers: NFT_REG_1 and NFT_REG_2 (16 bytes each).
const REG_1: u32 = 1;
const REG_2: u32 = 2;

/// Where 127.0.0.11:53 really goes in one sandbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DnsNat {
    pub addr: Ipv4Addr,
    pub udp_port: u16,
    pub tcp_port: u16,
}

impl DnsNat {
    /// The table as `nft list table ip swarmnet-dns` prints it.
    pub fn render(&self) -> String {
        let a = self.addr;
        format!(
            "table ip {TABLE} {{\n\tchain {CHAIN} {{\n\t\ttype nat hook output priority -100; policy accept;\n\
             \t\tip daddr {a} udp dport 53 dnat to {a}:{}\n\
             \t\tip daddr {a} tcp dport 53 dnat to {a}:{}\n\t}}\n}}\n",
            self.udp_port, self.tcp_port
        )
    }
}

fn expr(w: &mut Writer, name: &str, data: impl FnOnce(&mut Writer)) {
    let e = w.nest(NFTA_LIST_ELEM);
    w.str(NFTA_EXPR_NAME, name);
    let d = w.nest(NFTA_EXPR_DATA);
    data(w);
    w.end_nest(d);
    w.end_nest(e);
}

fn value(w: &mut Writer, ty: u16, bytes: &[u8]) {
    let n = w.nest(ty);
    w.attr(NFTA_DATA_VALUE, bytes);
    w.end_nest(n);
}

/// `payload load len @ base + offset => reg 1; cmp eq reg 1 want`
fn match_payload(w: &mut Writer, base: u32, offset: u32, want: &[u8]) {
    let len = u32::try_from(want.len()).unwrap_or(0);
    expr(w, "payload", |w| {
        w.be32(1, REG_1);
        w.be32(2, base);
        w.be32(3, offset);
        w.be32(4, len);
    });
    cmp_eq(w, want);
}

fn cmp_eq(w: &mut Writer, want: &[u8]) {
    expr(w, "cmp", |w| {
        w.be32(1, REG_1);
        w.be32(2, 0); // NFT_CMP_EQ
        value(w, 3, want);
    });
}

/// `ip daddr A <proto> dport 53 dnat ip to A:port`, encoded as nft encodes it.
fn rule(w: &mut Writer, seq: u32, addr: Ipv4Addr, proto: u8, port: u16) {
    let m = msg(w, NFT_MSG_NEWRULE, NLM_F_CREATE | NLM_F_APPEND, seq);
    w.str(NFTA_RULE_TABLE, TABLE);
    w.str(NFTA_RULE_CHAIN, CHAIN);
    let exprs = w.nest(NFTA_RULE_EXPRESSIONS);
    match_payload(w, 1, 16, &addr.octets());
    expr(w, "meta", |w| {
        w.be32(2, 16); // NFT_META_L4PROTO
        w.be32(1, REG_1);
    });
    cmp_eq(w, &[proto]);
    match_payload(w, 2, 2, &53u16.to_be_bytes());
    expr(w, "immediate", |w| {
        w.be32(1, REG_1);
        value(w, 2, &addr.octets());
    });
    expr(w, "immediate", |w| {
        w.be32(1, REG_2);
        value(w, 2, &port.to_be_bytes());
    });
    expr(w, "nat", |w| {
        w.be32(1, 1); // NFT_NAT_DNAT
        w.be32(2, u32::from(NFPROTO_IPV4));
        w.be32(3, REG_1); // REG_ADDR_MIN
        w.be32(5, REG_2); // REG_PROTO_MIN
        w.be32(7, 2); // NF_NAT_RANGE_PROTO_SPECIFIED
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

/// One transaction: `nat` given → replace the table whole with it; `None` → delete it.
/// Returns the bytes and the sequence number of the message that asks for the ACK.
fn encode(nat: Option<&DnsNat>, seq: u32) -> (Vec<u8>, u32) {
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
    let last = match nat {
        None => {
            let l = next();
            table_msg(&mut w, NFT_MSG_DELTABLE, NLM_F_ACK, l);
            l
        }
        Some(nat) => {
            table_msg(&mut w, NFT_MSG_DELTABLE, 0, next());
            table_msg(&mut w, NFT_MSG_NEWTABLE, NLM_F_CREATE, next());
            let m = msg(&mut w, NFT_MSG_NEWCHAIN, NLM_F_CREATE, next());
            w.str(NFTA_CHAIN_TABLE, TABLE);
            w.str(NFTA_CHAIN_NAME, CHAIN);
            let h = w.nest(NFTA_CHAIN_HOOK);
            w.be32(NFTA_HOOK_HOOKNUM, NF_INET_LOCAL_OUT);
            w.attr(NFTA_HOOK_PRIORITY, &(-100i32).to_be_bytes());
            w.end_nest(h);
            w.be32(NFTA_CHAIN_POLICY, NF_ACCEPT);
            w.str(NFTA_CHAIN_TYPE, "nat");
            w.end_msg(m);
            rule(&mut w, next(), nat.addr, 17, nat.udp_port);
            let l = next();
            rule(&mut w, l, nat.addr, 6, nat.tcp_port);
            l
        }
    };
    // The last message asks for the ACK that ends the replies.
    set_ack_on_last(&mut w.buf, last);
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

/// Sets NLM_F_ACK on the message with sequence number `seq`.
fn set_ack_on_last(buf: &mut [u8], seq: u32) {
    let mut off = 0;
    while off + 16 <= buf.len() {
        let len = u32::from_ne_bytes([buf[off], buf[off + 1], buf[off + 2], buf[off + 3]]);
        let s = u32::from_ne_bytes([buf[off + 8], buf[off + 9], buf[off + 10], buf[off + 11]]);
        if s == seq {
            let f = u16::from_ne_bytes([buf[off + 6], buf[off + 7]]) | NLM_F_ACK;
            buf[off + 6..off + 8].copy_from_slice(&f.to_ne_bytes());
            return;
        }
        let Ok(len) = usize::try_from(len) else {
            return;
        };
        if len < 16 {
            return;
        }
        off += (len + 3) & !3;
    }
}

fn transact(sock: &mut NfSocket, nat: Option<&DnsNat>) -> io::Result<()> {
    let seq = sock.next_seq(16);
    let (bytes, last) = encode(nat, seq);
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

/// Makes the table in the namespace `ns` exactly `nat`'s (one transaction).
pub fn ensure(ns: impl AsFd + Send, nat: &DnsNat) -> io::Result<()> {
    netns::run_in(ns, || transact(&mut NfSocket::open()?, Some(nat)))
}

/// Removes the table from `ns`; a missing table is fine.
pub fn delete(ns: impl AsFd + Send) -> io::Result<()> {
    netns::run_in(ns, || transact(&mut NfSocket::open()?, None))
}

/// Whether the table exists in `ns`, and the namespace's ruleset generation.
pub fn observe(ns: impl AsFd + Send) -> io::Result<(bool, u32)> {
    netns::run_in(ns, || {
        let mut sock = NfSocket::open()?;
        let present = match sock.request(|seq| {
            let mut w = Writer::default();
            let m = msg(&mut w, NFT_MSG_GETTABLE, NLM_F_ACK, seq);
            w.str(NFTA_TABLE_NAME, TABLE);
            w.end_msg(m);
            w.buf
        }) {
            Ok(_) => true,
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => false,
            Err(e) => return Err(e),
        };
        Ok((present, sock.genid()?))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn render_is_what_nft_lists() {
        let n = DnsNat {
            addr: Ipv4Addr::new(127, 0, 0, 11),
            udp_port: 40001,
            tcp_port: 40002,
        };
        let t = n.render();
        assert!(t.contains("ip daddr 127.0.0.11 udp dport 53 dnat to 127.0.0.11:40001"));
        assert!(t.contains("ip daddr 127.0.0.11 tcp dport 53 dnat to 127.0.0.11:40002"));
    }

    #[test]
    fn one_transaction_acked_on_its_last_message() {
        let n = DnsNat {
            addr: Ipv4Addr::new(127, 0, 0, 11),
            udp_port: 1,
            tcp_port: 2,
        };
        for (nat, msgs) in [(Some(&n), 6), (None, 2)] {
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
