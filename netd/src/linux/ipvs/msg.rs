//! The messages of the kernel's generic-netlink family `"IPVS"` (`include/uapi/linux/ip_vs.h`,
//! `net/netfilter/ipvs/ip_vs_ctl.c`), encoded and decoded by us: there is no maintained IPVS
//! crate. Framing (`nlmsghdr`, `genlmsghdr`, attribute TLVs) comes from netlink-packet-core and
//! netlink-packet-generic; what goes inside is [`IpvsMessage`], a command plus raw attributes,
//! built from and read into the typed [`Request`] and [`Reply`]. Pure: no sockets here
//! (`super` does the I/O), every message has a golden byte file (`netd/tests/ipvs_msgs.rs`).
//!
//! Kernel facts the encoding follows:
//! - a service is identified by `AF`, `PROTOCOL`, `ADDR`, `PORT` inside the nested
//!   `IPVS_CMD_ATTR_SERVICE`; `NEW_SERVICE`/`SET_SERVICE` need the "full entry" on top
//!   (`SCHED_NAME`, `FLAGS`, `TIMEOUT`, `NETMASK`), or the kernel answers `EINVAL`;
//! - a destination is identified by `ADDR`, `PORT` inside `IPVS_CMD_ATTR_DEST`, with the
//!   service it belongs to alongside; `NEW_DEST`/`SET_DEST` need `FWD_METHOD`, `WEIGHT`,
//!   `U_THRESH`, `L_THRESH`;
//! - addresses are `union nf_inet_addr` (16 bytes; IPv4 in the first 4, as ipvsadm sends
//!   them; the kernel copies at most 16 bytes into a zeroed union, so 4 would do too), ports
//!   are big-endian `u16`, `AF`/`PROTOCOL` host-order `u16`, the netmask a `__be32`;
//! - nested attributes go without `NLA_F_NESTED` (as ipvsadm and moby send them: the IPVS
//!   ops parse with the liberal `nla_parse_nested_deprecated`); replies may carry it, so the
//!   decoder masks it;
//! - errors: `ESRCH` = no such service, `ENOENT` = no such destination (or scheduler module),
//!   `EEXIST` = already there ([`IpvsErrno`]);
//! - the `GET_INFO` reply is command `SET_INFO` with top-level attributes that reuse the
//!   numbers 1 and 2 (version, connection table size), and the `GET_CONFIG` reply is
//!   `SET_CONFIG`: attribute meaning depends on the command, so decoding does too.
//!
//! Invariants: [`Request::encode`] then [`Request::decode`] is the identity; decoding never
//! panics on kernel input (malformed attributes are a [`DecodeError`]).

use std::net::Ipv4Addr;

use netlink_packet_core::{
    DecodeError, Emitable, NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage,
    NetlinkPayload, Nla, NlaBuffer, ParseableParametrized,
};
use netlink_packet_generic::{GenlFamily, GenlHeader, GenlMessage};

use crate::lb::{Proto, ServiceKey};

pub const IPVS_GENL_NAME: &str = "IPVS";
pub const IPVS_GENL_VERSION: u8 = 1;

pub const IPVS_CMD_NEW_SERVICE: u8 = 1;
pub const IPVS_CMD_SET_SERVICE: u8 = 2;
pub const IPVS_CMD_DEL_SERVICE: u8 = 3;
pub const IPVS_CMD_GET_SERVICE: u8 = 4;
pub const IPVS_CMD_NEW_DEST: u8 = 5;
pub const IPVS_CMD_SET_DEST: u8 = 6;
pub const IPVS_CMD_DEL_DEST: u8 = 7;
pub const IPVS_CMD_GET_DEST: u8 = 8;
pub const IPVS_CMD_SET_CONFIG: u8 = 12;
pub const IPVS_CMD_GET_CONFIG: u8 = 13;
pub const IPVS_CMD_SET_INFO: u8 = 14;
pub const IPVS_CMD_GET_INFO: u8 = 15;
pub const IPVS_CMD_FLUSH: u8 = 17;

const IPVS_CMD_ATTR_SERVICE: u16 = 1;
const IPVS_CMD_ATTR_DEST: u16 = 2;
const IPVS_CMD_ATTR_TIMEOUT_TCP: u16 = 4;
const IPVS_CMD_ATTR_TIMEOUT_TCP_FIN: u16 = 5;
const IPVS_CMD_ATTR_TIMEOUT_UDP: u16 = 6;

const IPVS_SVC_ATTR_AF: u16 = 1;
const IPVS_SVC_ATTR_PROTOCOL: u16 = 2;
const IPVS_SVC_ATTR_ADDR: u16 = 3;
const IPVS_SVC_ATTR_PORT: u16 = 4;
const IPVS_SVC_ATTR_SCHED_NAME: u16 = 6;
const IPVS_SVC_ATTR_FLAGS: u16 = 7;
const IPVS_SVC_ATTR_TIMEOUT: u16 = 8;
const IPVS_SVC_ATTR_NETMASK: u16 = 9;

const IPVS_DEST_ATTR_ADDR: u16 = 1;
const IPVS_DEST_ATTR_PORT: u16 = 2;
const IPVS_DEST_ATTR_FWD_METHOD: u16 = 3;
const IPVS_DEST_ATTR_WEIGHT: u16 = 4;
const IPVS_DEST_ATTR_U_THRESH: u16 = 5;
const IPVS_DEST_ATTR_L_THRESH: u16 = 6;
const IPVS_DEST_ATTR_ACTIVE_CONNS: u16 = 7;
const IPVS_DEST_ATTR_INACT_CONNS: u16 = 8;
const IPVS_DEST_ATTR_PERSIST_CONNS: u16 = 9;
const IPVS_DEST_ATTR_ADDR_FAMILY: u16 = 11;

const IPVS_INFO_ATTR_VERSION: u16 = 1;
const IPVS_INFO_ATTR_CONN_TAB_SIZE: u16 = 2;

const AF_INET: u16 = 2;
/// `IP_VS_SVC_F_PERSISTENT`: client-IP persistence (a template per client, `TIMEOUT` long).
pub const IP_VS_SVC_F_PERSISTENT: u32 = 0x1;
/// `IP_VS_SVC_F_HASHED`: set by the kernel on every service it lists; not ours to send.
const IP_VS_SVC_F_HASHED: u32 = 0x2;
/// `IP_VS_CONN_F_MASQ`: NAT forwarding (destination rewritten, source kept).
pub const IP_VS_CONN_F_MASQ: u32 = 0;
const NLA_F_NESTED: u16 = 0x8000;
const NLA_F_NET_BYTEORDER: u16 = 0x4000;

/// One attribute: raw bytes, or nested attributes (emitted without `NLA_F_NESTED`, see the
/// module docs). Decoded attributes are always [`AttrValue::Bytes`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attr {
    pub kind: u16,
    pub value: AttrValue,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AttrValue {
    Bytes(Vec<u8>),
    Nested(Vec<Attr>),
}

impl Attr {
    fn bytes(kind: u16, b: impl Into<Vec<u8>>) -> Self {
        Self {
            kind,
            value: AttrValue::Bytes(b.into()),
        }
    }
    fn u16(kind: u16, v: u16) -> Self {
        Self::bytes(kind, v.to_ne_bytes())
    }
    fn be16(kind: u16, v: u16) -> Self {
        Self::bytes(kind, v.to_be_bytes())
    }
    fn u32(kind: u16, v: u32) -> Self {
        Self::bytes(kind, v.to_ne_bytes())
    }
    fn string(kind: u16, s: &str) -> Self {
        let mut b = s.as_bytes().to_vec();
        b.push(0);
        Self::bytes(kind, b)
    }
    fn addr(kind: u16, ip: Ipv4Addr) -> Self {
        let mut b = [0u8; 16];
        b[..4].copy_from_slice(&ip.octets());
        Self::bytes(kind, b)
    }
    fn nested(kind: u16, attrs: Vec<Attr>) -> Self {
        Self {
            kind,
            value: AttrValue::Nested(attrs),
        }
    }
}

impl Nla for Attr {
    fn value_len(&self) -> usize {
        match &self.value {
            AttrValue::Bytes(b) => b.len(),
            AttrValue::Nested(attrs) => attrs.as_slice().buffer_len(),
        }
    }
    fn kind(&self) -> u16 {
        self.kind
    }
    fn emit_value(&self, buffer: &mut [u8]) {
        match &self.value {
            AttrValue::Bytes(b) => buffer[..b.len()].copy_from_slice(b),
            AttrValue::Nested(attrs) => attrs.as_slice().emit(buffer),
        }
    }
}

/// Attributes of a buffer, flags masked; a malformed one is an error.
pub fn parse_attrs(buf: &[u8]) -> Result<Vec<(u16, &[u8])>, DecodeError> {
    let mut out = Vec::new();
    let mut rest = buf;
    while rest.len() >= 4 {
        // Validates the header and the length against the buffer.
        let nla = NlaBuffer::new_checked(rest)?;
        let len = usize::from(nla.length());
        if len < 4 {
            return Err(DecodeError::from("attribute shorter than its header"));
        }
        out.push((
            nla.kind() & !(NLA_F_NESTED | NLA_F_NET_BYTEORDER),
            &rest[4..len],
        ));
        rest = rest.get((len + 3) & !3..).unwrap_or_default();
    }
    Ok(out)
}

/// The payload of an IPVS generic-netlink message: its command and attributes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IpvsMessage {
    pub cmd: u8,
    pub attrs: Vec<Attr>,
}

impl GenlFamily for IpvsMessage {
    fn family_name() -> &'static str {
        IPVS_GENL_NAME
    }
    fn command(&self) -> u8 {
        self.cmd
    }
    fn version(&self) -> u8 {
        IPVS_GENL_VERSION
    }
}

impl Emitable for IpvsMessage {
    fn buffer_len(&self) -> usize {
        self.attrs.as_slice().buffer_len()
    }
    fn emit(&self, buffer: &mut [u8]) {
        self.attrs.as_slice().emit(buffer)
    }
}

impl ParseableParametrized<[u8], GenlHeader> for IpvsMessage {
    fn parse_with_param(buf: &[u8], header: GenlHeader) -> Result<Self, DecodeError> {
        let attrs = parse_attrs(buf)?
            .into_iter()
            .map(|(kind, v)| Attr::bytes(kind, v))
            .collect();
        Ok(Self {
            cmd: header.cmd,
            attrs,
        })
    }
}

/// An IPVS virtual service as the kernel holds it (IPv4, identified by its [`ServiceKey`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IpvsService {
    pub key: ServiceKey,
    /// Scheduler module name without the `ip_vs_` prefix (`rr`, `sh`, ...).
    pub sched: String,
    /// `IP_VS_SVC_F_*` without `HASHED` (which the kernel adds to everything it lists).
    pub flags: u32,
    /// Persistence timeout in seconds (0 without persistence).
    pub timeout: u32,
    /// Persistence netmask, as the address bits it keeps (`0xffff_ffff`: per client IP).
    pub netmask: u32,
}

/// A real server of a service.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpvsDest {
    pub addr: Ipv4Addr,
    pub port: u16,
    /// `IP_VS_CONN_F_*` forwarding method ([`IP_VS_CONN_F_MASQ`] for us).
    pub fwd: u32,
    /// 0: takes no new connection (quiescent), established ones continue.
    pub weight: u32,
    pub u_thresh: u32,
    pub l_thresh: u32,
    /// Connection counters (replies only; 0 in requests).
    pub active_conns: u32,
    pub inact_conns: u32,
    pub persist_conns: u32,
}

impl IpvsDest {
    /// A masquerading destination with this weight and no thresholds.
    pub fn masq(addr: Ipv4Addr, port: u16, weight: u32) -> Self {
        Self {
            addr,
            port,
            fwd: IP_VS_CONN_F_MASQ,
            weight,
            u_thresh: 0,
            l_thresh: 0,
            active_conns: 0,
            inact_conns: 0,
            persist_conns: 0,
        }
    }
}

/// The per-namespace IPVS timeouts in seconds (`ipvsadm --set tcp tcpfin udp`); 0 in a
/// `SET_CONFIG` leaves that value unchanged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct IpvsTimeouts {
    pub tcp: u32,
    pub tcp_fin: u32,
    pub udp: u32,
}

/// A request to the IPVS family.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    NewService(IpvsService),
    SetService(IpvsService),
    DelService(ServiceKey),
    /// One service (`ESRCH` when missing).
    GetService(ServiceKey),
    /// Every service of the namespace (dump).
    DumpServices,
    NewDest(ServiceKey, IpvsDest),
    SetDest(ServiceKey, IpvsDest),
    DelDest {
        service: ServiceKey,
        addr: Ipv4Addr,
        port: u16,
    },
    /// Every destination of a service (dump).
    DumpDests(ServiceKey),
    SetConfig(IpvsTimeouts),
    GetConfig,
    GetInfo,
    /// Deletes every service of the namespace.
    Flush,
}

fn service_id(key: &ServiceKey) -> Vec<Attr> {
    vec![
        Attr::u16(IPVS_SVC_ATTR_AF, AF_INET),
        Attr::u16(IPVS_SVC_ATTR_PROTOCOL, u16::from(key.proto.number())),
        Attr::addr(IPVS_SVC_ATTR_ADDR, key.vip),
        Attr::be16(IPVS_SVC_ATTR_PORT, key.port),
    ]
}

fn service_full(s: &IpvsService) -> Vec<Attr> {
    let mut attrs = service_id(&s.key);
    let mut flags = s.flags.to_ne_bytes().to_vec();
    // struct ip_vs_flags { flags; mask }: every bit ours, as ipvsadm sends it.
    flags.extend_from_slice(&u32::MAX.to_ne_bytes());
    attrs.extend([
        Attr::string(IPVS_SVC_ATTR_SCHED_NAME, &s.sched),
        Attr::bytes(IPVS_SVC_ATTR_FLAGS, flags),
        Attr::u32(IPVS_SVC_ATTR_TIMEOUT, s.timeout),
        Attr::bytes(IPVS_SVC_ATTR_NETMASK, s.netmask.to_be_bytes()),
    ]);
    attrs
}

fn dest_id(addr: Ipv4Addr, port: u16) -> Vec<Attr> {
    vec![
        Attr::addr(IPVS_DEST_ATTR_ADDR, addr),
        Attr::be16(IPVS_DEST_ATTR_PORT, port),
        Attr::u16(IPVS_DEST_ATTR_ADDR_FAMILY, AF_INET),
    ]
}

fn dest_full(d: &IpvsDest) -> Vec<Attr> {
    let mut attrs = dest_id(d.addr, d.port);
    attrs.extend([
        Attr::u32(IPVS_DEST_ATTR_FWD_METHOD, d.fwd),
        Attr::u32(IPVS_DEST_ATTR_WEIGHT, d.weight),
        Attr::u32(IPVS_DEST_ATTR_U_THRESH, d.u_thresh),
        Attr::u32(IPVS_DEST_ATTR_L_THRESH, d.l_thresh),
    ]);
    attrs
}

fn svc_attr(attrs: Vec<Attr>) -> Attr {
    Attr::nested(IPVS_CMD_ATTR_SERVICE, attrs)
}
fn dest_attr(attrs: Vec<Attr>) -> Attr {
    Attr::nested(IPVS_CMD_ATTR_DEST, attrs)
}

impl Request {
    /// The command and attributes.
    pub fn message(&self) -> IpvsMessage {
        let (cmd, attrs) = match self {
            Self::NewService(s) => (IPVS_CMD_NEW_SERVICE, vec![svc_attr(service_full(s))]),
            Self::SetService(s) => (IPVS_CMD_SET_SERVICE, vec![svc_attr(service_full(s))]),
            Self::DelService(k) => (IPVS_CMD_DEL_SERVICE, vec![svc_attr(service_id(k))]),
            Self::GetService(k) => (IPVS_CMD_GET_SERVICE, vec![svc_attr(service_id(k))]),
            Self::DumpServices => (IPVS_CMD_GET_SERVICE, vec![]),
            Self::NewDest(k, d) => (
                IPVS_CMD_NEW_DEST,
                vec![svc_attr(service_id(k)), dest_attr(dest_full(d))],
            ),
            Self::SetDest(k, d) => (
                IPVS_CMD_SET_DEST,
                vec![svc_attr(service_id(k)), dest_attr(dest_full(d))],
            ),
            Self::DelDest {
                service,
                addr,
                port,
            } => (
                IPVS_CMD_DEL_DEST,
                vec![
                    svc_attr(service_id(service)),
                    dest_attr(dest_id(*addr, *port)),
                ],
            ),
            Self::DumpDests(k) => (IPVS_CMD_GET_DEST, vec![svc_attr(service_id(k))]),
            Self::SetConfig(t) => (
                IPVS_CMD_SET_CONFIG,
                vec![
                    Attr::u32(IPVS_CMD_ATTR_TIMEOUT_TCP, t.tcp),
                    Attr::u32(IPVS_CMD_ATTR_TIMEOUT_TCP_FIN, t.tcp_fin),
                    Attr::u32(IPVS_CMD_ATTR_TIMEOUT_UDP, t.udp),
                ],
            ),
            Self::GetConfig => (IPVS_CMD_GET_CONFIG, vec![]),
            Self::GetInfo => (IPVS_CMD_GET_INFO, vec![]),
            Self::Flush => (IPVS_CMD_FLUSH, vec![]),
        };
        IpvsMessage { cmd, attrs }
    }

    /// The service a request changes or reads, if it names one.
    pub fn service(&self) -> Option<ServiceKey> {
        match self {
            Self::NewService(s) | Self::SetService(s) => Some(s.key),
            Self::DelService(k)
            | Self::GetService(k)
            | Self::NewDest(k, _)
            | Self::SetDest(k, _)
            | Self::DumpDests(k)
            | Self::DelDest { service: k, .. } => Some(*k),
            Self::DumpServices
            | Self::SetConfig(_)
            | Self::GetConfig
            | Self::GetInfo
            | Self::Flush => None,
        }
    }

    /// Whether the request is a dump (answered by several messages and `NLMSG_DONE`).
    pub fn is_dump(&self) -> bool {
        matches!(self, Self::DumpServices | Self::DumpDests(_))
    }

    /// The whole netlink message: header (`family` is the id the controller resolved),
    /// generic header, attributes. Dumps ask for `NLM_F_DUMP`, everything else for an ACK.
    pub fn encode(&self, family: u16, seq: u32) -> Vec<u8> {
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST
            | if self.is_dump() {
                NLM_F_DUMP
            } else {
                NLM_F_ACK
            };
        header.sequence_number = seq;
        let genl = GenlMessage::new(GenlHeader { cmd: 0, version: 0 }, self.message(), family);
        let mut genl = genl;
        genl.finalize();
        let mut msg = NetlinkMessage::new(header, NetlinkPayload::from(genl));
        msg.finalize();
        let mut buf = vec![0u8; msg.buffer_len()];
        msg.serialize(&mut buf);
        buf
    }

    /// Reads back a message [`Self::encode`] made (for tests and diagnostics).
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let msg = NetlinkMessage::<GenlMessage<IpvsMessage>>::deserialize(bytes)?;
        let dump = msg.header.flags & NLM_F_DUMP == NLM_F_DUMP;
        let NetlinkPayload::InnerMessage(genl) = msg.payload else {
            return Err(DecodeError::from("not an IPVS request"));
        };
        let m = genl.payload;
        let top = |kind: u16| {
            m.attrs
                .iter()
                .find(|a| a.kind == kind)
                .and_then(|a| match &a.value {
                    AttrValue::Bytes(b) => Some(b.as_slice()),
                    AttrValue::Nested(_) => None,
                })
        };
        let svc = || -> Result<IpvsService, DecodeError> {
            parse_service(top(IPVS_CMD_ATTR_SERVICE).ok_or("no service attribute")?)
        };
        let key = || svc().map(|s| s.key);
        let dest = || -> Result<IpvsDest, DecodeError> {
            parse_dest(top(IPVS_CMD_ATTR_DEST).ok_or("no destination attribute")?)
        };
        Ok(match m.cmd {
            IPVS_CMD_NEW_SERVICE => Self::NewService(svc()?),
            IPVS_CMD_SET_SERVICE => Self::SetService(svc()?),
            IPVS_CMD_DEL_SERVICE => Self::DelService(key()?),
            IPVS_CMD_GET_SERVICE if dump => Self::DumpServices,
            IPVS_CMD_GET_SERVICE => Self::GetService(key()?),
            IPVS_CMD_NEW_DEST => Self::NewDest(key()?, dest()?),
            IPVS_CMD_SET_DEST => Self::SetDest(key()?, dest()?),
            IPVS_CMD_DEL_DEST => {
                let d = dest()?;
                Self::DelDest {
                    service: key()?,
                    addr: d.addr,
                    port: d.port,
                }
            }
            IPVS_CMD_GET_DEST => Self::DumpDests(key()?),
            IPVS_CMD_SET_CONFIG => Self::SetConfig(parse_config(&m)?),
            IPVS_CMD_GET_CONFIG => Self::GetConfig,
            IPVS_CMD_GET_INFO => Self::GetInfo,
            IPVS_CMD_FLUSH => Self::Flush,
            other => return Err(DecodeError::from(format!("unknown IPVS command {other}"))),
        })
    }
}

fn u16_of(v: &[u8]) -> Result<u16, DecodeError> {
    Ok(u16::from_ne_bytes(
        v.get(..2)
            .and_then(|b| b.try_into().ok())
            .ok_or("short u16")?,
    ))
}
fn be16_of(v: &[u8]) -> Result<u16, DecodeError> {
    Ok(u16::from_be_bytes(
        v.get(..2)
            .and_then(|b| b.try_into().ok())
            .ok_or("short be16")?,
    ))
}
fn u32_of(v: &[u8]) -> Result<u32, DecodeError> {
    Ok(u32::from_ne_bytes(
        v.get(..4)
            .and_then(|b| b.try_into().ok())
            .ok_or("short u32")?,
    ))
}
fn addr_of(v: &[u8]) -> Result<Ipv4Addr, DecodeError> {
    let b: [u8; 4] = v
        .get(..4)
        .and_then(|b| b.try_into().ok())
        .ok_or("short address")?;
    Ok(Ipv4Addr::from(b))
}

/// A service from the payload of a nested `IPVS_CMD_ATTR_SERVICE`. Identifying attributes
/// are required; the rest defaults to 0 / empty (a request that only names a service).
pub fn parse_service(buf: &[u8]) -> Result<IpvsService, DecodeError> {
    let (mut af, mut proto, mut addr, mut port) = (None, None, None, None);
    let mut s = IpvsService {
        key: ServiceKey {
            vip: Ipv4Addr::UNSPECIFIED,
            proto: Proto::Tcp,
            port: 0,
        },
        sched: String::new(),
        flags: 0,
        timeout: 0,
        netmask: 0,
    };
    for (kind, v) in parse_attrs(buf)? {
        match kind {
            IPVS_SVC_ATTR_AF => af = Some(u16_of(v)?),
            IPVS_SVC_ATTR_PROTOCOL => proto = Some(u16_of(v)?),
            IPVS_SVC_ATTR_ADDR => addr = Some(addr_of(v)?),
            IPVS_SVC_ATTR_PORT => port = Some(be16_of(v)?),
            IPVS_SVC_ATTR_SCHED_NAME => {
                s.sched = String::from_utf8_lossy(v.split(|b| *b == 0).next().unwrap_or(&[]))
                    .into_owned();
            }
            IPVS_SVC_ATTR_FLAGS => s.flags = u32_of(v)? & !IP_VS_SVC_F_HASHED,
            IPVS_SVC_ATTR_TIMEOUT => s.timeout = u32_of(v)?,
            IPVS_SVC_ATTR_NETMASK => {
                s.netmask = u32::from_be_bytes(
                    v.get(..4)
                        .and_then(|b| b.try_into().ok())
                        .ok_or("short netmask")?,
                );
            }
            _ => {} // stats, fwmark, PE name: not ours
        }
    }
    if af != Some(AF_INET) {
        return Err(DecodeError::from(format!(
            "service address family {af:?} is not AF_INET"
        )));
    }
    s.key.proto = match proto {
        Some(6) => Proto::Tcp,
        Some(17) => Proto::Udp,
        other => {
            return Err(DecodeError::from(format!(
                "service protocol {other:?} is not TCP or UDP"
            )));
        }
    };
    s.key.vip = addr.ok_or("service without address (fwmark service?)")?;
    s.key.port = port.ok_or("service without port")?;
    Ok(s)
}

/// A destination from the payload of a nested `IPVS_CMD_ATTR_DEST`.
pub fn parse_dest(buf: &[u8]) -> Result<IpvsDest, DecodeError> {
    let (mut addr, mut port) = (None, None);
    let mut d = IpvsDest::masq(Ipv4Addr::UNSPECIFIED, 0, 0);
    for (kind, v) in parse_attrs(buf)? {
        match kind {
            IPVS_DEST_ATTR_ADDR => addr = Some(addr_of(v)?),
            IPVS_DEST_ATTR_PORT => port = Some(be16_of(v)?),
            IPVS_DEST_ATTR_FWD_METHOD => d.fwd = u32_of(v)?,
            IPVS_DEST_ATTR_WEIGHT => d.weight = u32_of(v)?,
            IPVS_DEST_ATTR_U_THRESH => d.u_thresh = u32_of(v)?,
            IPVS_DEST_ATTR_L_THRESH => d.l_thresh = u32_of(v)?,
            IPVS_DEST_ATTR_ACTIVE_CONNS => d.active_conns = u32_of(v)?,
            IPVS_DEST_ATTR_INACT_CONNS => d.inact_conns = u32_of(v)?,
            IPVS_DEST_ATTR_PERSIST_CONNS => d.persist_conns = u32_of(v)?,
            IPVS_DEST_ATTR_ADDR_FAMILY if u16_of(v)? != AF_INET => {
                return Err(DecodeError::from("destination is not IPv4"));
            }
            _ => {}
        }
    }
    d.addr = addr.ok_or("destination without address")?;
    d.port = port.ok_or("destination without port")?;
    Ok(d)
}

fn parse_config(m: &IpvsMessage) -> Result<IpvsTimeouts, DecodeError> {
    let mut t = IpvsTimeouts::default();
    for a in &m.attrs {
        let AttrValue::Bytes(v) = &a.value else {
            continue;
        };
        match a.kind {
            IPVS_CMD_ATTR_TIMEOUT_TCP => t.tcp = u32_of(v)?,
            IPVS_CMD_ATTR_TIMEOUT_TCP_FIN => t.tcp_fin = u32_of(v)?,
            IPVS_CMD_ATTR_TIMEOUT_UDP => t.udp = u32_of(v)?,
            _ => {}
        }
    }
    Ok(t)
}

/// What the kernel sent back for a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// `GET_SERVICE` (one, or one message per service of a dump).
    Service(IpvsService),
    /// One message per destination of a `GET_DEST` dump.
    Dest(IpvsDest),
    /// `GET_CONFIG`.
    Config(IpvsTimeouts),
    /// `GET_INFO`: the IPVS version (`0x010203` = 1.2.3) and connection table size.
    Info { version: u32, conn_tab_size: u32 },
}

impl Reply {
    /// Reads a reply message of the IPVS family.
    pub fn from_message(m: &IpvsMessage) -> Result<Self, DecodeError> {
        let top = |kind: u16| {
            m.attrs
                .iter()
                .find(|a| a.kind == kind)
                .and_then(|a| match &a.value {
                    AttrValue::Bytes(b) => Some(b.as_slice()),
                    AttrValue::Nested(_) => None,
                })
        };
        Ok(match m.cmd {
            IPVS_CMD_NEW_SERVICE => Self::Service(parse_service(
                top(IPVS_CMD_ATTR_SERVICE).ok_or("service reply without service")?,
            )?),
            IPVS_CMD_NEW_DEST => Self::Dest(parse_dest(
                top(IPVS_CMD_ATTR_DEST).ok_or("destination reply without destination")?,
            )?),
            IPVS_CMD_SET_CONFIG => Self::Config(parse_config(m)?),
            IPVS_CMD_SET_INFO => Self::Info {
                version: u32_of(top(IPVS_INFO_ATTR_VERSION).ok_or("info without version")?)?,
                conn_tab_size: u32_of(
                    top(IPVS_INFO_ATTR_CONN_TAB_SIZE).ok_or("info without table size")?,
                )?,
            },
            other => {
                return Err(DecodeError::from(format!(
                    "unexpected IPVS reply command {other}"
                )));
            }
        })
    }

    /// The message the kernel would send for this reply (`family` resolved, `seq` of the
    /// request, multipart for dumps): what [`parse_replies`] reads. For golden files and
    /// decode tests; the kernel also adds stats attributes, which the decoder skips.
    pub fn encode(&self, family: u16, seq: u32) -> Vec<u8> {
        let (cmd, attrs, multi) = match self {
            Self::Service(s) => (IPVS_CMD_NEW_SERVICE, vec![svc_attr(service_full(s))], true),
            Self::Dest(d) => {
                let mut attrs = dest_full(d);
                attrs.extend([
                    Attr::u32(IPVS_DEST_ATTR_ACTIVE_CONNS, d.active_conns),
                    Attr::u32(IPVS_DEST_ATTR_INACT_CONNS, d.inact_conns),
                    Attr::u32(IPVS_DEST_ATTR_PERSIST_CONNS, d.persist_conns),
                ]);
                (IPVS_CMD_NEW_DEST, vec![dest_attr(attrs)], true)
            }
            Self::Config(t) => (
                IPVS_CMD_SET_CONFIG,
                Request::SetConfig(*t).message().attrs,
                false,
            ),
            Self::Info {
                version,
                conn_tab_size,
            } => (
                IPVS_CMD_SET_INFO,
                vec![
                    Attr::u32(IPVS_INFO_ATTR_VERSION, *version),
                    Attr::u32(IPVS_INFO_ATTR_CONN_TAB_SIZE, *conn_tab_size),
                ],
                false,
            ),
        };
        let mut header = NetlinkHeader::default();
        header.flags = if multi {
            netlink_packet_core::NLM_F_MULTIPART
        } else {
            0
        };
        header.sequence_number = seq;
        let mut genl = GenlMessage::new(
            GenlHeader { cmd: 0, version: 0 },
            IpvsMessage { cmd, attrs },
            family,
        );
        genl.finalize();
        let mut msg = NetlinkMessage::new(header, NetlinkPayload::from(genl));
        msg.finalize();
        let mut buf = vec![0u8; msg.buffer_len()];
        msg.serialize(&mut buf);
        buf
    }
}

/// The kernel's answer to a request, as read from one or more datagrams.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// A message for `seq` other than the final one (a dump entry or a `doit` reply).
    Data(Reply),
    /// The final ACK (`NLMSG_ERROR` 0) or `NLMSG_DONE`.
    End,
    /// `NLMSG_ERROR` with this errno.
    Error(IpvsErrno),
    /// A message for another sequence number (a late reply to an earlier request).
    Other,
}

/// An errno the IPVS family answered, classified by what it means there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IpvsErrno {
    /// `ESRCH`: the service does not exist.
    NoService,
    /// `ENOENT`: the destination (or the scheduler module, or the family) does not exist.
    NotFound,
    /// `EEXIST`: the service or destination exists already.
    Exists,
    /// Anything else (`EINVAL`: a malformed or incomplete request; `EPERM`: no
    /// `CAP_NET_ADMIN`).
    Other(i32),
}

impl IpvsErrno {
    pub fn from_errno(errno: i32) -> Self {
        match errno {
            libc::ESRCH => Self::NoService,
            libc::ENOENT => Self::NotFound,
            libc::EEXIST => Self::Exists,
            e => Self::Other(e),
        }
    }
    pub fn errno(self) -> i32 {
        match self {
            Self::NoService => libc::ESRCH,
            Self::NotFound => libc::ENOENT,
            Self::Exists => libc::EEXIST,
            Self::Other(e) => e,
        }
    }
}

/// Every netlink message in a datagram from the IPVS family, classified relative to the
/// request with sequence number `seq`.
pub fn parse_replies(data: &[u8], seq: u32) -> Result<Vec<Answer>, DecodeError> {
    let mut out = Vec::new();
    let mut off = 0;
    while off + 16 <= data.len() {
        let bytes = &data[off..];
        let len = usize::try_from(u32::from_ne_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]))
            .unwrap_or(usize::MAX);
        if len < 16 || len > bytes.len() {
            return Err(DecodeError::from("truncated netlink message"));
        }
        let msg = NetlinkMessage::<GenlMessage<IpvsMessage>>::deserialize(&bytes[..len])?;
        off += (len + 3) & !3;
        if msg.header.sequence_number != seq {
            out.push(Answer::Other);
            continue;
        }
        out.push(match msg.payload {
            NetlinkPayload::Error(e) => match e.code {
                None => Answer::End,
                Some(code) => Answer::Error(IpvsErrno::from_errno(-code.get())),
            },
            NetlinkPayload::Done(_) => Answer::End,
            NetlinkPayload::InnerMessage(m) => Answer::Data(Reply::from_message(&m.payload)?),
            _ => Answer::Other,
        });
    }
    Ok(out)
}

/// An `NLMSG_ERROR` for the request `seq` with `errno` (0: an ACK), as the kernel sends it
/// with `NETLINK_CAP_ACK` (only the request's header echoed). For golden files and tests.
pub fn encode_error(errno: i32, seq: u32, request: &[u8]) -> Vec<u8> {
    let mut header = NetlinkHeader::default();
    header.sequence_number = seq;
    let mut err = netlink_packet_core::ErrorMessage::default();
    err.code = std::num::NonZeroI32::new(-errno);
    err.header = request.get(..16).unwrap_or(request).to_vec();
    let mut msg =
        NetlinkMessage::<GenlMessage<IpvsMessage>>::new(header, NetlinkPayload::Error(err));
    msg.finalize();
    let mut buf = vec![0u8; msg.buffer_len()];
    msg.serialize(&mut buf);
    buf
}
