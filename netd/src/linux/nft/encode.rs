//! Netlink encoding of nftables transactions: [`NftOp`]s become `NFNL_SUBSYS_NFTABLES`
//! messages between `NFNL_MSG_BATCH_BEGIN` and `NFNL_MSG_BATCH_END`, which the kernel applies
//! as one transaction (all or nothing). Raw bytes, no library: the layout follows
//! `include/uapi/linux/netfilter/nf_tables.h`, and each expression is encoded the way `nft`
//! itself encodes it (checked with `nft --debug=netlink,mnl`), so that `nft list` prints our
//! objects exactly as the text rendering says (`crate::lb::nft_render`).
//!
//! Invariants: every message is 4-byte aligned, attributes are padded; nftables values are
//! big-endian except register contents, which are in the byte order of the data they hold
//! (addresses and ports in network order, `numgen`/`jhash` results and ct bits in host
//! order); no anonymous sets (the kernel resolves them by walking the batch: quadratic).

use crate::lb::nft_render::{
    AFFINITY_SEED, Elem, NamedSet, NftOp, Pick, REJECT_CHAIN, Rule, SERVICES_CHAIN, TABLE,
};

pub const NFNL_SUBSYS_NFTABLES: u16 = 10;
pub const NFNL_MSG_BATCH_BEGIN: u16 = 16;
pub const NFNL_MSG_BATCH_END: u16 = 17;
pub const NLMSG_ERROR: u16 = 2;
pub const NLMSG_DONE: u16 = 3;

pub const NFT_MSG_NEWTABLE: u16 = 0;
pub const NFT_MSG_GETTABLE: u16 = 1;
pub const NFT_MSG_DELTABLE: u16 = 2;
pub const NFT_MSG_NEWCHAIN: u16 = 3;
pub const NFT_MSG_NEWRULE: u16 = 6;
pub const NFT_MSG_GETRULE: u16 = 7;
pub const NFT_MSG_DELRULE: u16 = 8;
pub const NFT_MSG_NEWSET: u16 = 9;
pub const NFT_MSG_DELSET: u16 = 11;
pub const NFT_MSG_NEWSETELEM: u16 = 12;
pub const NFT_MSG_DELSETELEM: u16 = 14;
pub const NFT_MSG_NEWGEN: u16 = 15;
pub const NFT_MSG_GETGEN: u16 = 16;

pub const NLM_F_REQUEST: u16 = 0x1;
pub const NLM_F_ACK: u16 = 0x4;
pub const NLM_F_CREATE: u16 = 0x400;
pub const NLM_F_APPEND: u16 = 0x800;

const NLA_F_NESTED: u16 = 0x8000;
pub const NFPROTO_IPV4: u8 = 2;
pub const NFPROTO_UNSPEC: u8 = 0;

// nf_tables.h attribute numbers.
pub const NFTA_TABLE_NAME: u16 = 1;
pub const NFTA_TABLE_FLAGS: u16 = 2;
pub const NFTA_TABLE_HANDLE: u16 = 4;
pub const NFTA_CHAIN_TABLE: u16 = 1;
pub const NFTA_CHAIN_NAME: u16 = 3;
pub const NFTA_CHAIN_HOOK: u16 = 4;
pub const NFTA_CHAIN_POLICY: u16 = 5;
pub const NFTA_CHAIN_TYPE: u16 = 7;
pub const NFTA_HOOK_HOOKNUM: u16 = 1;
pub const NFTA_HOOK_PRIORITY: u16 = 2;
pub const NFTA_RULE_TABLE: u16 = 1;
pub const NFTA_RULE_CHAIN: u16 = 2;
pub const NFTA_RULE_EXPRESSIONS: u16 = 4;
pub const NFTA_LIST_ELEM: u16 = 1;
pub const NFTA_EXPR_NAME: u16 = 1;
pub const NFTA_EXPR_DATA: u16 = 2;
const NFTA_SET_TABLE: u16 = 1;
const NFTA_SET_NAME: u16 = 2;
const NFTA_SET_FLAGS: u16 = 3;
const NFTA_SET_KEY_TYPE: u16 = 4;
const NFTA_SET_KEY_LEN: u16 = 5;
const NFTA_SET_DATA_TYPE: u16 = 6;
const NFTA_SET_DATA_LEN: u16 = 7;
const NFTA_SET_ID: u16 = 10;
const NFTA_SET_USERDATA: u16 = 13;
const NFTA_SET_ELEM_LIST_TABLE: u16 = 1;
const NFTA_SET_ELEM_LIST_SET: u16 = 2;
const NFTA_SET_ELEM_LIST_ELEMENTS: u16 = 3;
const NFTA_SET_ELEM_KEY: u16 = 1;
const NFTA_SET_ELEM_DATA: u16 = 2;
pub const NFTA_DATA_VALUE: u16 = 1;
const NFTA_DATA_VERDICT: u16 = 2;
const NFTA_VERDICT_CODE: u16 = 1;
const NFTA_VERDICT_CHAIN: u16 = 2;
pub const NFTA_GEN_ID: u16 = 1;

const NFT_SET_MAP: u32 = 0x8;
const NFT_JUMP: i32 = -3;
const NFT_GOTO: i32 = -4;
const NF_ACCEPT: u32 = 1;

// nft's datatype ids (src/datatype.h), concatenated 6 bits per field: what `nft list` uses to
// print keys.
const TYPE_IPADDR: u32 = 7;
const TYPE_INET_PROTOCOL: u32 = 12;
const TYPE_INET_SERVICE: u32 = 13;
const TYPE_INTEGER: u32 = 4;

/// The set userdata (of every pick map) nft 1.0.6 writes for `typeof ip daddr . meta l4proto . th dport . numgen
/// random mod 1 : ip daddr . th dport` (key/data byte order and the typeof expressions, in
/// libnftnl's udata TLVs), captured with `nft --debug=mnl`. The kernel stores it opaquely;
/// `nft list` needs it to print the map's declaration and its keys.
const PICK_MAP_USERDATA: [u8; 170] = [
    0x00, 0x04, 0x00, 0x00, 0x00, 0x00, 0x01, 0x04, 0x00, 0x00, 0x00, 0x00, 0x03, 0x60, 0x00, 0x04,
    0x0d, 0x00, 0x00, 0x00, 0x01, 0x58, 0x00, 0x14, 0x00, 0x04, 0x07, 0x00, 0x00, 0x00, 0x01, 0x0c,
    0x00, 0x04, 0x0c, 0x00, 0x00, 0x00, 0x01, 0x04, 0x0c, 0x00, 0x00, 0x00, 0x01, 0x0e, 0x00, 0x04,
    0x09, 0x00, 0x00, 0x00, 0x01, 0x06, 0x00, 0x04, 0x10, 0x00, 0x00, 0x00, 0x02, 0x14, 0x00, 0x04,
    0x07, 0x00, 0x00, 0x00, 0x01, 0x0c, 0x00, 0x04, 0x0b, 0x00, 0x00, 0x00, 0x01, 0x04, 0x02, 0x00,
    0x00, 0x00, 0x03, 0x1a, 0x00, 0x04, 0x17, 0x00, 0x00, 0x00, 0x01, 0x12, 0x00, 0x04, 0x01, 0x00,
    0x00, 0x00, 0x01, 0x04, 0x01, 0x00, 0x00, 0x00, 0x02, 0x04, 0x00, 0x00, 0x00, 0x00, 0x04, 0x34,
    0x00, 0x04, 0x0d, 0x00, 0x00, 0x00, 0x01, 0x2c, 0x00, 0x14, 0x00, 0x04, 0x07, 0x00, 0x00, 0x00,
    0x01, 0x0c, 0x00, 0x04, 0x0c, 0x00, 0x00, 0x00, 0x01, 0x04, 0x0c, 0x00, 0x00, 0x00, 0x01, 0x14,
    0x00, 0x04, 0x07, 0x00, 0x00, 0x00, 0x01, 0x0c, 0x00, 0x04, 0x0b, 0x00, 0x00, 0x00, 0x01, 0x04,
    0x02, 0x00, 0x00, 0x00, 0x06, 0x04, 0x00, 0x00, 0x00, 0x00,
];
const fn concat(a: u32, b: u32) -> u32 {
    (a << 6) | b
}

// Registers: NFT_REG_1 (16 bytes, aliases NFT_REG32_00..03) and the 32-bit ones after it.
const REG_VERDICT: u32 = 0;
const REG_1: u32 = 1;
const REG_3: u32 = 3;
const REG32_01: u32 = 9;
const REG32_02: u32 = 10;
const REG32_03: u32 = 11;

/// Largest attribute payload we put in one element list (attribute lengths are 16 bits).
const MAX_ELEMS_BYTES: usize = 48 * 1024;

/// A netlink buffer being written: messages, attributes, nests.
#[derive(Debug, Default)]
pub struct Writer {
    pub buf: Vec<u8>,
}

impl Writer {
    fn pad(&mut self) {
        while !self.buf.len().is_multiple_of(4) {
            self.buf.push(0);
        }
    }

    /// Starts a message: netlink header + nfgenmsg. Returns its offset for [`Self::end_msg`].
    pub fn begin_msg(&mut self, ty: u16, flags: u16, seq: u32, family: u8, res_id: u16) -> usize {
        let start = self.buf.len();
        self.buf.extend_from_slice(&0u32.to_ne_bytes());
        self.buf.extend_from_slice(&ty.to_ne_bytes());
        self.buf.extend_from_slice(&flags.to_ne_bytes());
        self.buf.extend_from_slice(&seq.to_ne_bytes());
        self.buf.extend_from_slice(&0u32.to_ne_bytes());
        self.buf.push(family);
        self.buf.push(0); // NFNETLINK_V0
        self.buf.extend_from_slice(&res_id.to_be_bytes());
        start
    }

    pub fn end_msg(&mut self, start: usize) {
        self.pad();
        let len = u32::try_from(self.buf.len() - start).unwrap_or(u32::MAX);
        self.buf[start..start + 4].copy_from_slice(&len.to_ne_bytes());
    }

    pub fn attr(&mut self, ty: u16, data: &[u8]) {
        let len = u16::try_from(4 + data.len()).unwrap_or(u16::MAX);
        self.buf.extend_from_slice(&len.to_ne_bytes());
        self.buf.extend_from_slice(&ty.to_ne_bytes());
        self.buf.extend_from_slice(data);
        self.pad();
    }

    pub fn be32(&mut self, ty: u16, v: u32) {
        self.attr(ty, &v.to_be_bytes());
    }

    /// A NUL-terminated string attribute.
    pub fn str(&mut self, ty: u16, s: &str) {
        let mut data = Vec::with_capacity(s.len() + 1);
        data.extend_from_slice(s.as_bytes());
        data.push(0);
        self.attr(ty, &data);
    }

    pub fn nest(&mut self, ty: u16) -> usize {
        let start = self.buf.len();
        self.buf.extend_from_slice(&0u16.to_ne_bytes());
        self.buf
            .extend_from_slice(&(ty | NLA_F_NESTED).to_ne_bytes());
        start
    }

    pub fn end_nest(&mut self, start: usize) {
        let len = u16::try_from(self.buf.len() - start).unwrap_or(u16::MAX);
        self.buf[start..start + 2].copy_from_slice(&len.to_ne_bytes());
    }

    /// `NFTA_*_DATA { NFTA_DATA_VALUE bytes }`
    pub fn data_value(&mut self, ty: u16, value: &[u8]) {
        let n = self.nest(ty);
        self.attr(NFTA_DATA_VALUE, value);
        self.end_nest(n);
    }

    /// `NFTA_*_DATA { NFTA_DATA_VERDICT { code, chain } }`
    fn data_verdict(&mut self, ty: u16, code: i32, chain: &str) {
        let n = self.nest(ty);
        let v = self.nest(NFTA_DATA_VERDICT);
        self.attr(NFTA_VERDICT_CODE, &code.to_be_bytes());
        self.str(NFTA_VERDICT_CHAIN, chain);
        self.end_nest(v);
        self.end_nest(n);
    }
}

/// One batch: the bytes to send and what each message was for.
#[derive(Debug)]
pub struct Batch {
    pub bytes: Vec<u8>,
    /// Sequence number of the first message (the batch begin).
    pub first_seq: u32,
    /// Sequence number of the last real message, the one that asks for an ACK.
    pub last_seq: u32,
    /// For each real message (seq `first_seq + 1 + i`), the index of the op it came from.
    pub op_of_message: Vec<usize>,
}

impl Batch {
    /// Real messages (without begin/end).
    pub fn messages(&self) -> usize {
        self.op_of_message.len()
    }
    /// The op index of the message with sequence number `seq`, if it is one of ours.
    pub fn op_of_seq(&self, seq: u32) -> Option<usize> {
        let i = seq.checked_sub(self.first_seq.checked_add(1)?)?;
        self.op_of_message.get(usize::try_from(i).ok()?).copied()
    }
}

/// Builds a batch for `ops`, sequence numbers from `seq` on.
struct Encoder {
    w: Writer,
    seq: u32,
    first_seq: u32,
    next_set_id: u32,
    op_of_message: Vec<usize>,
    op: usize,
    last_start: Option<usize>,
}

impl Encoder {
    fn msg(&mut self, ty: u16, flags: u16) -> usize {
        self.seq = self.seq.wrapping_add(1);
        self.op_of_message.push(self.op);
        let start = self.w.begin_msg(
            (NFNL_SUBSYS_NFTABLES << 8) | ty,
            NLM_F_REQUEST | flags,
            self.seq,
            NFPROTO_IPV4,
            0,
        );
        self.last_start = Some(start);
        start
    }

    fn table(&mut self, ty: u16, flags: u16) {
        let m = self.msg(ty, flags);
        self.w.str(NFTA_TABLE_NAME, TABLE);
        if ty == NFT_MSG_NEWTABLE {
            self.w.be32(NFTA_TABLE_FLAGS, 0);
        }
        self.w.end_msg(m);
    }

    fn chain_msg(&mut self, ty: u16, flags: u16, name: &str) -> usize {
        let m = self.msg(ty, flags);
        self.w.str(NFTA_CHAIN_TABLE, TABLE);
        self.w.str(NFTA_CHAIN_NAME, name);
        m
    }

    fn set(&mut self, set: NamedSet) {
        let m = self.msg(NFT_MSG_NEWSET, NLM_F_CREATE);
        self.w.str(NFTA_SET_TABLE, TABLE);
        self.w.str(NFTA_SET_NAME, &set.name());
        let service = concat(concat(TYPE_IPADDR, TYPE_INET_PROTOCOL), TYPE_INET_SERVICE);
        let (key_type, key_len) = match set {
            NamedSet::NoBackends => (service, 12),
            NamedSet::Hairpin => (concat(TYPE_IPADDR, TYPE_IPADDR), 8),
            NamedSet::Pick(_) => (concat(service, TYPE_INTEGER), 16),
        };
        self.w
            .be32(NFTA_SET_FLAGS, if set.is_map() { NFT_SET_MAP } else { 0 });
        self.w.be32(NFTA_SET_KEY_TYPE, key_type);
        self.w.be32(NFTA_SET_KEY_LEN, key_len);
        if set.is_map() {
            self.w
                .be32(NFTA_SET_DATA_TYPE, concat(TYPE_IPADDR, TYPE_INET_SERVICE));
            self.w.be32(NFTA_SET_DATA_LEN, 8);
        }
        self.next_set_id += 1;
        self.w.be32(NFTA_SET_ID, self.next_set_id);
        if set.is_map() {
            self.w.attr(NFTA_SET_USERDATA, &PICK_MAP_USERDATA);
        }
        self.w.end_msg(m);
    }

    /// Element messages for a named set, split so that no element list overflows an attribute.
    fn elems(&mut self, ty: u16, set: NamedSet, elems: &[Elem]) {
        let mut rest = elems;
        while !rest.is_empty() {
            let m = self.msg(
                ty,
                if ty == NFT_MSG_NEWSETELEM {
                    NLM_F_CREATE
                } else {
                    0
                },
            );
            self.w.str(NFTA_SET_ELEM_LIST_TABLE, TABLE);
            self.w.str(NFTA_SET_ELEM_LIST_SET, &set.name());
            let list = self.w.nest(NFTA_SET_ELEM_LIST_ELEMENTS);
            let begin = self.w.buf.len();
            while let Some((e, tail)) = rest.split_first() {
                if self.w.buf.len() - begin > MAX_ELEMS_BYTES {
                    break;
                }
                let item = self.w.nest(NFTA_LIST_ELEM);
                match e {
                    Elem::Service(key) => {
                        self.w.data_value(NFTA_SET_ELEM_KEY, &service_key(key));
                    }
                    Elem::Slot {
                        key,
                        slot,
                        ip,
                        port,
                    } => {
                        let mut k = service_key(key).to_vec();
                        k.extend_from_slice(&slot.to_ne_bytes());
                        self.w.data_value(NFTA_SET_ELEM_KEY, &k);
                        if ty == NFT_MSG_NEWSETELEM {
                            // `ip . port`, each in its own 4-byte register.
                            let mut d = [0u8; 8];
                            d[..4].copy_from_slice(&ip.octets());
                            d[4..6].copy_from_slice(&port.to_be_bytes());
                            self.w.data_value(NFTA_SET_ELEM_DATA, &d);
                        }
                    }
                    Elem::Hairpin(ip) => {
                        let mut k = ip.octets().to_vec();
                        k.extend_from_slice(&ip.octets());
                        self.w.data_value(NFTA_SET_ELEM_KEY, &k);
                    }
                }
                self.w.end_nest(item);
                rest = tail;
            }
            self.w.end_nest(list);
            self.w.end_msg(m);
        }
    }

    fn rule(&mut self, chain: &str, rule: &Rule) {
        let m = self.msg(NFT_MSG_NEWRULE, NLM_F_CREATE | NLM_F_APPEND);
        self.w.str(NFTA_RULE_TABLE, TABLE);
        self.w.str(NFTA_RULE_CHAIN, chain);
        let exprs = self.w.nest(NFTA_RULE_EXPRESSIONS);
        let mut x = Exprs { w: &mut self.w };
        match rule {
            Rule::JumpServices => x.verdict(NFT_JUMP, SERVICES_CHAIN),
            Rule::NoBackendReject => {
                // ct state new: IP_CT_NEW is state bit 3 (NF_CT_STATE_BIT).
                x.ct_bit(0, 1 << 3);
                x.service_tuple();
                x.lookup(&NamedSet::NoBackends.name(), REG_1, None);
                x.verdict(NFT_GOTO, REJECT_CHAIN);
            }
            Rule::HairpinMasquerade | Rule::HairpinMasqueradeAny => {
                if matches!(rule, Rule::HairpinMasquerade) {
                    // ct status dnat: IPS_DST_NAT is bit 5.
                    x.ct_bit(2, 1 << 5);
                }
                x.payload(REG_1, 1, 12, 4);
                x.payload(REG32_01, 1, 16, 4);
                x.lookup(&NamedSet::Hairpin.name(), REG_1, None);
                x.expr("masq", |_| {});
            }
            Rule::RejectTcp => {
                x.meta_l4proto(REG_1);
                x.cmp_eq(REG_1, &[6]);
                x.reject(1, 0);
            }
            Rule::Reject => x.reject(0, 3),
            Rule::Pick(p) => x.pick(*p),
        }
        self.w.end_nest(exprs);
        self.w.end_msg(m);
    }

    fn op(&mut self, op: &NftOp) {
        match op {
            NftOp::AddTable => self.table(NFT_MSG_NEWTABLE, NLM_F_CREATE),
            NftOp::DelTable => self.table(NFT_MSG_DELTABLE, 0),
            NftOp::AddChain { name, base } => {
                let m = self.chain_msg(NFT_MSG_NEWCHAIN, NLM_F_CREATE, name);
                if let Some(b) = base {
                    let h = self.w.nest(NFTA_CHAIN_HOOK);
                    self.w.be32(NFTA_HOOK_HOOKNUM, b.hook.number());
                    self.w.attr(NFTA_HOOK_PRIORITY, &b.priority.to_be_bytes());
                    self.w.end_nest(h);
                    self.w.be32(NFTA_CHAIN_POLICY, NF_ACCEPT);
                    self.w.str(NFTA_CHAIN_TYPE, b.kind);
                }
                self.w.end_msg(m);
            }
            NftOp::FlushChain { name } => {
                let m = self.msg(NFT_MSG_DELRULE, 0);
                self.w.str(NFTA_RULE_TABLE, TABLE);
                self.w.str(NFTA_RULE_CHAIN, name);
                self.w.end_msg(m);
            }
            NftOp::AddSet(set) => self.set(*set),
            NftOp::DelSet(set) => {
                let m = self.msg(NFT_MSG_DELSET, 0);
                self.w.str(NFTA_SET_TABLE, TABLE);
                self.w.str(NFTA_SET_NAME, &set.name());
                self.w.end_msg(m);
            }
            NftOp::AddElems { set, elems } => self.elems(NFT_MSG_NEWSETELEM, *set, elems),
            NftOp::DelElems { set, elems } => self.elems(NFT_MSG_DELSETELEM, *set, elems),
            NftOp::AddRule { chain, rule } => self.rule(chain, rule),
        }
    }
}

/// `vip . proto . port` as a concatenated key: each field in its own 4-byte register.
fn service_key(key: &crate::lb::ServiceKey) -> [u8; 12] {
    let mut k = [0u8; 12];
    k[..4].copy_from_slice(&key.vip.octets());
    k[4] = key.proto.number();
    k[8..10].copy_from_slice(&key.port.to_be_bytes());
    k
}

/// Expression writer inside `NFTA_RULE_EXPRESSIONS` (also the DNS redirect's, `dns_nat.rs`).
pub struct Exprs<'a> {
    w: &'a mut Writer,
}

impl<'a> Exprs<'a> {
    pub fn new(w: &'a mut Writer) -> Self {
        Self { w }
    }

    pub fn expr(&mut self, name: &str, data: impl FnOnce(&mut Writer)) {
        let e = self.w.nest(NFTA_LIST_ELEM);
        self.w.str(NFTA_EXPR_NAME, name);
        let d = self.w.nest(NFTA_EXPR_DATA);
        data(self.w);
        self.w.end_nest(d);
        self.w.end_nest(e);
    }

    /// `payload load len @ base + offset => dreg` (base 1: network, 2: transport).
    pub fn payload(&mut self, dreg: u32, base: u32, offset: u32, len: u32) {
        self.expr("payload", |w| {
            w.be32(1, dreg);
            w.be32(2, base);
            w.be32(3, offset);
            w.be32(4, len);
        });
    }

    pub fn meta_l4proto(&mut self, dreg: u32) {
        self.expr("meta", |w| {
            w.be32(2, 16); // KEY: NFT_META_L4PROTO
            w.be32(1, dreg);
        });
    }

    pub fn cmp_eq(&mut self, sreg: u32, value: &[u8]) {
        self.expr("cmp", |w| {
            w.be32(1, sreg);
            w.be32(2, 0); // NFT_CMP_EQ
            w.data_value(3, value);
        });
    }

    /// `ct <key> & bit != 0` (key 0: state, 2: status); the ct value is a host-order u32.
    fn ct_bit(&mut self, key: u32, bit: u32) {
        self.expr("ct", |w| {
            w.be32(2, key);
            w.be32(1, REG_1);
        });
        self.expr("bitwise", |w| {
            w.be32(1, REG_1);
            w.be32(2, REG_1);
            w.be32(3, 4);
            w.data_value(4, &bit.to_ne_bytes());
            w.data_value(5, &0u32.to_ne_bytes());
        });
        self.expr("cmp", |w| {
            w.be32(1, REG_1);
            w.be32(2, 1); // NFT_CMP_NEQ
            w.data_value(3, &0u32.to_ne_bytes());
        });
    }

    /// `ip daddr . meta l4proto . th dport` into registers 32_00..02 (`NFT_REG_1`).
    fn service_tuple(&mut self) {
        self.payload(REG_1, 1, 16, 4);
        self.meta_l4proto(REG32_01);
        self.payload(REG32_02, 2, 2, 2);
    }

    /// `dnat ip to ip daddr . meta l4proto . th dport . <slot> map @<pick map>`, registers as
    /// nft lays them out: the tuple in 32_00..02, the slot in 32_03, the map's `ip . port`
    /// back into 32_00 and 32_01.
    fn pick(&mut self, p: Pick) {
        self.service_tuple();
        if p.hash {
            self.payload(REG_3, 1, 12, 4);
            self.expr("hash", |w| {
                w.be32(1, REG_3); // SREG
                w.be32(2, REG32_03); // DREG
                w.be32(3, 4); // LEN
                w.be32(4, p.n); // MODULUS
                w.be32(5, AFFINITY_SEED); // SEED
                w.be32(6, 0); // OFFSET
                w.be32(7, 0); // TYPE: jenkins
            });
        } else {
            self.expr("numgen", |w| {
                w.be32(1, REG32_03); // DREG
                w.be32(2, p.n); // MODULUS
                w.be32(3, 1); // TYPE: random
                w.be32(4, 0); // OFFSET
            });
        }
        self.lookup(&NamedSet::Pick(p).name(), REG_1, Some(REG_1));
        self.expr("nat", |w| {
            w.be32(1, 1); // TYPE: dnat
            w.be32(2, u32::from(NFPROTO_IPV4)); // FAMILY
            w.be32(3, REG_1); // REG_ADDR_MIN
            w.be32(5, REG32_01); // REG_PROTO_MIN
            w.be32(7, 2); // FLAGS: NF_NAT_RANGE_PROTO_SPECIFIED
        });
    }

    fn lookup(&mut self, set: &str, sreg: u32, dreg: Option<u32>) {
        self.expr("lookup", |w| {
            w.be32(2, sreg);
            if let Some(d) = dreg {
                w.be32(3, d);
            }
            w.str(1, set);
        });
    }

    /// `jump chain` / `goto chain`: an immediate verdict.
    fn verdict(&mut self, code: i32, chain: &str) {
        self.expr("immediate", |w| {
            w.be32(1, REG_VERDICT);
            w.data_verdict(2, code, chain);
        });
    }

    fn reject(&mut self, ty: u32, code: u8) {
        self.expr("reject", |w| {
            w.be32(1, ty);
            w.attr(2, &[code]);
        });
    }
}

/// Encodes `ops` as one transaction. Sequence numbers start at `seq` (the batch begin).
pub fn encode_batch(ops: &[NftOp], seq: u32) -> Batch {
    let mut e = Encoder {
        w: Writer::default(),
        seq,
        first_seq: seq,
        next_set_id: 0,
        op_of_message: Vec::new(),
        op: 0,
        last_start: None,
    };
    let b = e.w.begin_msg(
        NFNL_MSG_BATCH_BEGIN,
        NLM_F_REQUEST,
        seq,
        NFPROTO_UNSPEC,
        NFNL_SUBSYS_NFTABLES,
    );
    e.w.end_msg(b);
    for (i, op) in ops.iter().enumerate() {
        e.op = i;
        e.op(op);
    }
    // The last real message asks for an ACK: the kernel answers it after the whole batch was
    // processed (errors of earlier messages come first), so it marks the end of the replies.
    if let Some(start) = e.last_start {
        let flags_at = start + 6;
        let flags = u16::from_ne_bytes([e.w.buf[flags_at], e.w.buf[flags_at + 1]]) | NLM_F_ACK;
        e.w.buf[flags_at..flags_at + 2].copy_from_slice(&flags.to_ne_bytes());
    }
    let last_seq = e.seq;
    let end_seq = e.seq.wrapping_add(1);
    let m = e.w.begin_msg(
        NFNL_MSG_BATCH_END,
        NLM_F_REQUEST,
        end_seq,
        NFPROTO_UNSPEC,
        NFNL_SUBSYS_NFTABLES,
    );
    e.w.end_msg(m);
    Batch {
        bytes: e.w.buf,
        first_seq: e.first_seq,
        last_seq,
        op_of_message: e.op_of_message,
    }
}

/// A single request outside a batch (`GETTABLE`, `GETGEN`), asking for an ACK.
pub fn encode_get_table(seq: u32) -> Vec<u8> {
    let mut w = Writer::default();
    let m = w.begin_msg(
        (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETTABLE,
        NLM_F_REQUEST | NLM_F_ACK,
        seq,
        NFPROTO_IPV4,
        0,
    );
    w.str(NFTA_TABLE_NAME, TABLE);
    w.end_msg(m);
    w.buf
}

pub fn encode_get_gen(seq: u32) -> Vec<u8> {
    let mut w = Writer::default();
    let m = w.begin_msg(
        (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETGEN,
        NLM_F_REQUEST | NLM_F_ACK,
        seq,
        NFPROTO_UNSPEC,
        0,
    );
    w.end_msg(m);
    w.buf
}

/// Attributes of an nfnetlink message payload (after the 4-byte nfgenmsg): `(type, data)`.
pub fn parse_attrs(payload: &[u8]) -> Vec<(u16, &[u8])> {
    parse_nested(payload.get(4..).unwrap_or_default())
}

/// The attributes inside a nested attribute's data: `(type, data)`. Stops at the first
/// malformed one (a length that does not fit), so a garbled reply yields fewer attributes,
/// never a panic.
pub fn parse_nested(data: &[u8]) -> Vec<(u16, &[u8])> {
    let mut out = Vec::new();
    let mut rest = data;
    while rest.len() >= 4 {
        let len = usize::from(u16::from_ne_bytes([rest[0], rest[1]]));
        let ty = u16::from_ne_bytes([rest[2], rest[3]]) & !NLA_F_NESTED;
        if len < 4 || len > rest.len() {
            break;
        }
        out.push((ty, &rest[4..len]));
        let next = (len + 3) & !3;
        rest = rest.get(next..).unwrap_or_default();
    }
    out
}
