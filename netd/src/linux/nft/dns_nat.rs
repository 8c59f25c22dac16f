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
    Exprs, NFNL_MSG_BATCH_BEGIN, NFNL_MSG_BATCH_END, NFNL_SUBSYS_NFTABLES, NFPROTO_IPV4,
    NFPROTO_UNSPEC, NFT_MSG_DELTABLE, NFT_MSG_GETTABLE, NFT_MSG_NEWCHAIN, NFT_MSG_NEWRULE,
    NFT_MSG_NEWTABLE, NFTA_CHAIN_HOOK, NFTA_CHAIN_NAME, NFTA_CHAIN_POLICY, NFTA_CHAIN_TABLE,
    NFTA_CHAIN_TYPE, NFTA_HOOK_HOOKNUM, NFTA_HOOK_PRIORITY, NFTA_RULE_CHAIN, NFTA_RULE_EXPRESSIONS,
    NFTA_RULE_TABLE, NFTA_TABLE_FLAGS, NFTA_TABLE_NAME, NLM_F_ACK, NLM_F_APPEND, NLM_F_CREATE,
    NLM_F_REQUEST, Writer,
};
use crate::linux::netns;

/// Our table in every sandbox namespace the resolver serves.
pub const TABLE: &str = "swarmnet-dns";
const CHAIN: &str = "output";

// nf_tables.h numbers only this table uses.
const NF_INET_LOCAL_OUT: u32 = 3;
const NF_ACCEPT: u32 = 1;
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

/// `payload load len @ base + offset => reg 1; cmp eq reg 1 want`
fn match_payload(x: &mut Exprs<'_>, base: u32, offset: u32, want: &[u8]) {
    let len = u32::try_from(want.len()).unwrap_or(0);
    x.payload(REG_1, base, offset, len);
    x.cmp_eq(REG_1, want);
}

/// `ip daddr A <proto> dport 53 dnat ip to A:port`, encoded as nft encodes it.
fn rule(w: &mut Writer, seq: u32, flags: u16, addr: Ipv4Addr, proto: u8, port: u16) {
    let m = msg(w, NFT_MSG_NEWRULE, NLM_F_CREATE | NLM_F_APPEND | flags, seq);
    w.str(NFTA_RULE_TABLE, TABLE);
    w.str(NFTA_RULE_CHAIN, CHAIN);
    let exprs = w.nest(NFTA_RULE_EXPRESSIONS);
    let mut x = Exprs::new(w);
    match_payload(&mut x, 1, 16, &addr.octets());
    x.meta_l4proto(REG_1);
    x.cmp_eq(REG_1, &[proto]);
    match_payload(&mut x, 2, 2, &53u16.to_be_bytes());
    x.expr("immediate", |w| {
        w.be32(1, REG_1);
        w.data_value(2, &addr.octets());
    });
    x.expr("immediate", |w| {
        w.be32(1, REG_2);
        w.data_value(2, &port.to_be_bytes());
    });
    x.expr("nat", |w| {
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
            rule(&mut w, next(), 0, nat.addr, 17, nat.udp_port);
            // The last message asks for the ACK that ends the replies.
            let l = next();
            rule(&mut w, l, NLM_F_ACK, nat.addr, 6, nat.tcp_port);
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
