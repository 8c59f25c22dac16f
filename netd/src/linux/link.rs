//! [`LinuxLinkPort`]: the real [`LinkPort`], talking rtnetlink directly and synchronously.
//!
//! One netlink socket per namespace, created on a thread that entered the namespace (see
//! [`super::netns::run_in`]) and cached; the socket stays bound to its namespace for its whole
//! life, so every request on it acts there. Requests go out with `NLM_F_REQUEST|NLM_F_ACK` and
//! are read until the ACK/ERROR (or `NLMSG_DONE` for dumps); the kernel's errno is classified
//! with [`ErrorKind::from_errno`] and kept as the error's source.
//!
//! Invariants: the calling thread never changes namespace; `NsRef::Node` is the namespace of
//! the thread that constructed the port (kept open as a file descriptor); the cached socket of
//! a namespace is dropped before the namespace is deleted (it would keep it alive otherwise).

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use ipnet::Ipv4Net;
use netlink_packet_core::{
    DefaultNla, NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_DUMP_INTR, NLM_F_EXCL, NLM_F_REQUEST,
    NetlinkBuffer, NetlinkHeader, NetlinkMessage, NetlinkPayload, Nla,
};
use netlink_packet_route::address::{AddressAttribute, AddressMessage, AddressScope};
use netlink_packet_route::link::{
    InfoData, InfoKind, InfoVeth, InfoVxlan, LinkAttribute, LinkFlags, LinkInfo, LinkMessage,
    LinkProtoInfoBridge,
};
use netlink_packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState,
};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};
use swarmnet_model::{IfName, MacAddr};

use super::netns;
use crate::port::{
    AddrState, ErrorKind, FdbEntry, LinkChange, LinkKind, LinkKindState, LinkPort, LinkSpec,
    LinkState, NeighEntry, NsName, NsRef, PortError, PortResult, RouteState,
};

/// A synchronous rtnetlink socket bound to one namespace.
#[derive(Debug)]
struct Netlink {
    sock: Socket,
    seq: u32,
}

impl Netlink {
    /// Opens a socket in the namespace of the calling thread.
    fn open() -> io::Result<Self> {
        let mut sock = Socket::new(NETLINK_ROUTE)?;
        sock.bind_auto()?;
        sock.connect(&SocketAddr::new(0, 0))?;
        Ok(Self { sock, seq: 0 })
    }

    /// Sends `msg` and collects the replies: for a dump every message up to `NLMSG_DONE`, for
    /// other requests nothing (the ACK) or the kernel's error.
    fn request(
        &mut self,
        msg: RouteNetlinkMessage,
        flags: u16,
    ) -> io::Result<Vec<RouteNetlinkMessage>> {
        self.seq = self.seq.wrapping_add(1);
        let seq = self.seq;
        let dump = flags & NLM_F_DUMP == NLM_F_DUMP;
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | flags | if dump { 0 } else { NLM_F_ACK };
        header.sequence_number = seq;
        let mut packet = NetlinkMessage::new(header, NetlinkPayload::from(msg));
        packet.finalize();
        let mut buf = vec![0u8; packet.buffer_len()];
        packet.serialize(&mut buf);
        self.sock.send(&buf, 0)?;

        let mut out = Vec::new();
        let mut interrupted = false;
        loop {
            let (data, _addr) = self.sock.recv_from_full()?;
            let mut offset = 0;
            while offset < data.len() {
                let bytes = &data[offset..];
                let len = NetlinkBuffer::new_checked(bytes)
                    .map_err(decode_err)?
                    .length() as usize;
                if len == 0 {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "zero-length netlink message",
                    ));
                }
                let msg = NetlinkMessage::<RouteNetlinkMessage>::deserialize(
                    &bytes[..len.min(bytes.len())],
                )
                .map_err(decode_err)?;
                // Messages are 4-byte aligned in a datagram.
                offset += (len + 3) & !3;
                if msg.header.sequence_number != seq {
                    // A late reply to an earlier request that failed half way: not ours.
                    continue;
                }
                interrupted |= msg.header.flags & NLM_F_DUMP_INTR != 0;
                match msg.payload {
                    NetlinkPayload::Error(e) => {
                        return match e.code {
                            None => Ok(out),
                            Some(_) => Err(e.to_io()),
                        };
                    }
                    NetlinkPayload::Done(_) => {
                        if interrupted {
                            // The table changed during the dump; the caller may retry.
                            return Err(io::Error::from_raw_os_error(libc::EAGAIN));
                        }
                        return Ok(out);
                    }
                    NetlinkPayload::InnerMessage(m) => out.push(m),
                    NetlinkPayload::Overrun(_) => {
                        return Err(io::Error::from_raw_os_error(libc::ENOBUFS));
                    }
                    _ => {}
                }
            }
        }
    }

    fn ack(&mut self, msg: RouteNetlinkMessage, flags: u16) -> io::Result<()> {
        self.request(msg, flags).map(drop)
    }

    /// A dump the kernel marks interrupted (the table changed while it was read: NLM_F_DUMP_INTR,
    /// as [`Self::request`] reports it with EAGAIN) is inconsistent; it is read again, a few
    /// times, as libnl does, before the caller sees Busy. Concurrent changes are normal on a busy
    /// node, so an interrupted dump must not fail a round by itself.
    fn dump(&mut self, msg: RouteNetlinkMessage) -> io::Result<Vec<RouteNetlinkMessage>> {
        const ATTEMPTS: usize = 5;
        let mut last = None;
        for _ in 0..ATTEMPTS {
            match self.request(msg.clone(), NLM_F_DUMP) {
                Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => last = Some(e),
                r => return r,
            }
        }
        Err(last.unwrap_or_else(|| io::Error::from_raw_os_error(libc::EAGAIN)))
    }
}

/// IFLA_BRPORT_MODE: the bridge port's hairpin flag (include/uapi/linux/if_link.h).
const IFLA_BRPORT_MODE: u16 = 4;

fn decode_err(e: netlink_packet_core::DecodeError) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

/// A [`PortError`] from an I/O error. Errors without an errno that say "invalid input" (our own
/// validation) are classified as [`ErrorKind::Invalid`].
fn perr(op: &'static str, object: impl Into<String>, e: io::Error) -> PortError {
    let invalid = e.raw_os_error().is_none() && e.kind() == io::ErrorKind::InvalidInput;
    let mut err = PortError::io(op, object, e);
    if invalid {
        err.kind = ErrorKind::Invalid;
    }
    err
}

fn in_ns(name: &str, ns: &NsRef) -> String {
    format!("{name} in {ns}")
}

/// Attributes of a link that matter to us, decoded from an `RTM_NEWLINK`.
fn decode_link(msg: &LinkMessage) -> Option<(LinkState, u32)> {
    let mut name = None;
    let mut mtu = 0u32;
    let mut mac = None;
    let mut master_idx = 0u32;
    let mut alias = None;
    let mut kind = LinkKindState::Other(String::new());
    for attr in &msg.attributes {
        match attr {
            LinkAttribute::IfName(n) => name = IfName::new(n.clone()).ok(),
            LinkAttribute::Mtu(m) => mtu = *m,
            LinkAttribute::Address(a) => mac = mac_from(a),
            LinkAttribute::Controller(m) => master_idx = *m,
            LinkAttribute::IfAlias(a) if !a.is_empty() => alias = Some(a.clone()),
            LinkAttribute::LinkInfo(infos) => kind = decode_kind(infos),
            _ => {}
        }
    }
    let state = LinkState {
        name: name?,
        index: msg.header.index,
        kind,
        mtu: u16::try_from(mtu).unwrap_or(u16::MAX),
        mac,
        master: None,
        up: msg.header.flags.contains(LinkFlags::Up),
        alias,
        hairpin: false,
    };
    Some((state, master_idx))
}

fn decode_kind(infos: &[LinkInfo]) -> LinkKindState {
    let mut kind = None;
    let mut data = None;
    for i in infos {
        match i {
            LinkInfo::Kind(k) => kind = Some(k),
            LinkInfo::Data(d) => data = Some(d),
            _ => {}
        }
    }
    match kind {
        Some(InfoKind::Bridge) => LinkKindState::Bridge,
        Some(InfoKind::Veth) => LinkKindState::Veth,
        Some(InfoKind::Vxlan) => {
            let (mut vni, mut local, mut port, mut learning) = (0, None, 0, true);
            if let Some(InfoData::Vxlan(attrs)) = data {
                for a in attrs {
                    match a {
                        InfoVxlan::Id(v) => vni = *v,
                        InfoVxlan::Local(l) => local = Some(*l),
                        InfoVxlan::Port(p) => port = *p,
                        InfoVxlan::Learning(l) => learning = *l,
                        _ => {}
                    }
                }
            }
            LinkKindState::Vxlan {
                vni,
                local,
                port,
                learning,
            }
        }
        Some(other) => LinkKindState::Other(other.to_string()),
        None => LinkKindState::Other(String::new()),
    }
}

fn mac_from(bytes: &[u8]) -> Option<MacAddr> {
    let octets: [u8; 6] = bytes.try_into().ok()?;
    MacAddr::new(octets).ok()
}

fn ipv4_of(addr: &IpAddr) -> Option<Ipv4Addr> {
    match addr {
        IpAddr::V4(a) => Some(*a),
        IpAddr::V6(_) => None,
    }
}

/// Builds the `RTM_NEWLINK` message that creates `spec` (without the namespace move and the
/// alias, which need a second request). `peer_ns_fd` is the open namespace file for a veth
/// peer that lives elsewhere; `underlay` is the resolved index of the VXLAN's lower device.
pub fn encode_create(
    spec: &LinkSpec,
    peer_ns_fd: Option<i32>,
    underlay: Option<u32>,
) -> LinkMessage {
    let mut msg = LinkMessage::default();
    msg.attributes
        .push(LinkAttribute::IfName(spec.name.to_string()));
    if let Some(mtu) = spec.mtu {
        msg.attributes.push(LinkAttribute::Mtu(u32::from(mtu)));
    }
    if let Some(mac) = spec.mac {
        msg.attributes
            .push(LinkAttribute::Address(mac.octets().to_vec()));
    }
    let (kind, data) = match &spec.kind {
        LinkKind::Bridge => (InfoKind::Bridge, None),
        LinkKind::Vxlan {
            vni,
            local,
            port,
            underlay: _,
        } => {
            let mut attrs = vec![
                InfoVxlan::Id(*vni),
                InfoVxlan::Local(*local),
                InfoVxlan::Port(*port),
                // Remote MACs come from our FDB entries, never from flooding and learning.
                InfoVxlan::Learning(false),
                // Answer ARP from the neighbour table locally instead of flooding it.
                InfoVxlan::Proxy(true),
                InfoVxlan::UDPCsum(false),
            ];
            if let Some(idx) = underlay {
                attrs.push(InfoVxlan::Link(idx));
            }
            (InfoKind::Vxlan, Some(InfoData::Vxlan(attrs)))
        }
        LinkKind::Veth {
            peer,
            peer_ns: _,
            peer_mac,
        } => {
            let mut p = LinkMessage::default();
            p.attributes.push(LinkAttribute::IfName(peer.to_string()));
            if let Some(mtu) = spec.mtu {
                p.attributes.push(LinkAttribute::Mtu(u32::from(mtu)));
            }
            if let Some(mac) = peer_mac {
                p.attributes
                    .push(LinkAttribute::Address(mac.octets().to_vec()));
            }
            if let Some(fd) = peer_ns_fd {
                p.attributes.push(LinkAttribute::NetNsFd(fd));
            }
            (InfoKind::Veth, Some(InfoData::Veth(InfoVeth::Peer(p))))
        }
    };
    let mut info = vec![LinkInfo::Kind(kind)];
    if let Some(d) = data {
        info.push(LinkInfo::Data(d));
    }
    msg.attributes.push(LinkAttribute::LinkInfo(info));
    msg
}

/// Builds the `RTM_NEWNEIGH`/`RTM_DELNEIGH` body for a VXLAN FDB entry (`self permanent`).
pub fn encode_fdb(ifindex: u32, entry: &FdbEntry) -> NeighbourMessage {
    let mut msg = NeighbourMessage::default();
    msg.header.family = AddressFamily::Bridge;
    msg.header.ifindex = ifindex;
    msg.header.state = NeighbourState::Permanent;
    // NTF_SELF: the entry belongs to the VXLAN driver's own table (with a remote), not to the
    // bridge it is enslaved to.
    msg.header.flags = NeighbourFlags::Own;
    msg.attributes.push(NeighbourAttribute::LinkLayerAddress(
        entry.mac.octets().to_vec(),
    ));
    msg.attributes
        .push(NeighbourAttribute::Destination(NeighbourAddress::Inet(
            entry.dst,
        )));
    msg
}

/// Builds the `RTM_NEWNEIGH`/`RTM_DELNEIGH` body for a permanent IPv4 neighbour.
pub fn encode_neigh(ifindex: u32, entry: &NeighEntry) -> NeighbourMessage {
    let mut msg = NeighbourMessage::default();
    msg.header.family = AddressFamily::Inet;
    msg.header.ifindex = ifindex;
    msg.header.state = NeighbourState::Permanent;
    msg.attributes
        .push(NeighbourAttribute::Destination(NeighbourAddress::Inet(
            entry.ip,
        )));
    msg.attributes.push(NeighbourAttribute::LinkLayerAddress(
        entry.mac.octets().to_vec(),
    ));
    msg
}

/// Builds the `RTM_NEWADDR`/`RTM_DELADDR` body for an IPv4 address.
pub fn encode_addr(ifindex: u32, addr: Ipv4Net) -> AddressMessage {
    let mut msg = AddressMessage::default();
    msg.header.family = AddressFamily::Inet;
    msg.header.prefix_len = addr.prefix_len();
    msg.header.scope = AddressScope::Universe;
    msg.header.index = ifindex;
    // Like iproute2: IFA_LOCAL is the address, IFA_ADDRESS the same on non-p2p links.
    msg.attributes
        .push(AddressAttribute::Local(IpAddr::V4(addr.addr())));
    msg.attributes
        .push(AddressAttribute::Address(IpAddr::V4(addr.addr())));
    msg
}

/// Builds the `RTM_NEWROUTE`/`RTM_DELROUTE` body for a main-table IPv4 route.
pub fn encode_route(route: &RouteState, oif: Option<u32>, delete: bool) -> RouteMessage {
    let mut msg = RouteMessage::default();
    msg.header.address_family = AddressFamily::Inet;
    msg.header.destination_prefix_length = route.dst.prefix_len();
    msg.header.table = RouteHeader::RT_TABLE_MAIN;
    msg.header.kind = RouteType::Unicast;
    if delete {
        // Like iproute2: "nowhere" matches any scope, unspec any protocol.
        msg.header.scope = RouteScope::NoWhere;
        msg.header.protocol = RouteProtocol::Unspec;
    } else {
        msg.header.protocol = RouteProtocol::Static;
        msg.header.scope = if route.gateway.is_some() {
            RouteScope::Universe
        } else {
            RouteScope::Link
        };
    }
    if route.dst.prefix_len() > 0 {
        msg.attributes
            .push(RouteAttribute::Destination(RouteAddress::Inet(
                route.dst.network(),
            )));
    }
    if let Some(gw) = route.gateway {
        msg.attributes
            .push(RouteAttribute::Gateway(RouteAddress::Inet(gw)));
    }
    if let Some(idx) = oif {
        msg.attributes.push(RouteAttribute::Oif(idx));
    }
    msg
}

/// The real [`LinkPort`]. See the module documentation.
#[derive(Debug)]
pub struct LinuxLinkPort {
    run_dir: PathBuf,
    /// The namespace netd runs in, opened once at construction.
    node: File,
    sockets: HashMap<NsRef, Netlink>,
}

impl LinuxLinkPort {
    /// A port whose node namespace is the one the calling thread is in now, and whose owned
    /// namespaces live under `<run_dir>/netns/`.
    pub fn new(run_dir: PathBuf) -> PortResult<Self> {
        // thread-self, not self: /proc/self names the main thread, which may sit in another
        // namespace than the thread constructing the port (tests run each case on a thread
        // that unshared its own).
        let node = File::open("/proc/thread-self/ns/net")
            .map_err(|e| perr("open node netns", "/proc/thread-self/ns/net", e))?;
        Ok(Self {
            run_dir,
            node,
            sockets: HashMap::new(),
        })
    }

    fn ns_file(&self, ns: &NsRef) -> PortResult<File> {
        match ns {
            NsRef::Node => self
                .node
                .try_clone()
                .map_err(|e| perr("open netns", "node", e)),
            NsRef::Owned(n) => {
                let path = self.netns_path(n);
                netns::open(&path).map_err(|e| {
                    let mut err = perr("open netns", n.to_string(), e);
                    if err.is_not_found() {
                        err.detail = format!("{} does not exist", path.display());
                    }
                    err
                })
            }
        }
    }

    fn nl(&mut self, ns: &NsRef) -> PortResult<&mut Netlink> {
        if !self.sockets.contains_key(ns) {
            let file = self.ns_file(ns)?;
            let sock = netns::run_in(&file, Netlink::open)
                .map_err(|e| perr("open netlink socket", ns.to_string(), e))?;
            self.sockets.insert(ns.clone(), sock);
        }
        Ok(self.sockets.get_mut(ns).expect("inserted above"))
    }

    /// One link by name with its master's index (not resolved to a name), `None` when the
    /// link does not exist: a single RTM_GETLINK, no dump.
    fn fetch_link(&mut self, ns: &NsRef, name: &IfName) -> PortResult<Option<(LinkState, u32)>> {
        let mut msg = LinkMessage::default();
        msg.attributes.push(LinkAttribute::IfName(name.to_string()));
        let replies = match self.nl(ns)?.request(RouteNetlinkMessage::GetLink(msg), 0) {
            Ok(r) => r,
            Err(e) if e.raw_os_error() == Some(libc::ENODEV) => return Ok(None),
            Err(e) => return Err(perr("get link", in_ns(name.as_str(), ns), e)),
        };
        Ok(replies.iter().find_map(|m| match m {
            RouteNetlinkMessage::NewLink(l) => decode_link(l),
            _ => None,
        }))
    }

    /// The kernel's view of one link, by name; NotFound when it does not exist.
    fn require_link(&mut self, ns: &NsRef, name: &IfName) -> PortResult<LinkState> {
        self.fetch_link(ns, name)?.map(|(l, _)| l).ok_or_else(|| {
            PortError::new(
                "get link",
                in_ns(name.as_str(), ns),
                ErrorKind::NotFound,
                "no such link",
            )
        })
    }

    /// Indexes of the bridge ports of `ns` in hairpin mode (an AF_BRIDGE dump, which carries
    /// the port flags in IFLA_PROTINFO).
    fn hairpin_ports(&mut self, ns: &NsRef) -> PortResult<std::collections::HashSet<u32>> {
        let mut req = LinkMessage::default();
        req.header.interface_family = AddressFamily::Bridge;
        let replies = self
            .nl(ns)?
            .dump(RouteNetlinkMessage::GetLink(req))
            .map_err(|e| perr("list bridge ports", ns.to_string(), e))?;
        let mut out = std::collections::HashSet::new();
        for m in replies {
            let RouteNetlinkMessage::NewLink(l) = m else {
                continue;
            };
            let on = l.attributes.iter().any(|a| match a {
                LinkAttribute::ProtoInfoBridge(info) => info.iter().any(|i| match i {
                    LinkProtoInfoBridge::Other(nla) if nla.kind() == IFLA_BRPORT_MODE => {
                        let mut value = vec![0u8; nla.value_len()];
                        nla.emit_value(&mut value);
                        value.first() == Some(&1)
                    }
                    _ => false,
                }),
                _ => false,
            });
            if on {
                out.insert(l.header.index);
            }
        }
        Ok(out)
    }

    /// One neighbour/FDB add or delete, acknowledged.
    fn neigh_request(
        &mut self,
        ns: &NsRef,
        msg: RouteNetlinkMessage,
        flags: u16,
        op: &'static str,
        object: String,
    ) -> PortResult<()> {
        self.nl(ns)?
            .ack(msg, flags)
            .map_err(|e| perr(op, object, e))
    }

    fn link_index(&mut self, ns: &NsRef, name: &IfName) -> PortResult<u32> {
        self.require_link(ns, name).map(|l| l.index)
    }

    fn set_link_msg(
        &mut self,
        ns: &NsRef,
        name: &IfName,
        msg: LinkMessage,
        op: &'static str,
    ) -> PortResult<()> {
        self.nl(ns)?
            .ack(RouteNetlinkMessage::SetLink(msg), 0)
            .map_err(|e| perr(op, in_ns(name.as_str(), ns), e))
    }

    fn index_to_name(&mut self, ns: &NsRef) -> PortResult<HashMap<u32, IfName>> {
        Ok(self
            .list_links(ns)?
            .into_iter()
            .map(|l| (l.index, l.name))
            .collect())
    }

    fn bound_marker(&self, ns: &NsName) -> PathBuf {
        self.run_dir.join("netns-bound").join(ns.as_str())
    }

    fn create_link_inner(&mut self, ns: &NsRef, spec: &LinkSpec) -> PortResult<()> {
        let object = in_ns(spec.name.as_str(), ns);
        let underlay = match &spec.kind {
            // The lower device is looked up by the kernel in the namespace the request comes
            // from, which is `ns`.
            LinkKind::Vxlan {
                underlay: Some(u), ..
            } => Some(self.link_index(ns, u).map_err(|mut e| {
                e.op = "create link";
                e.detail = format!("underlay {u} for {}: {}", spec.name, e.detail);
                e
            })?),
            _ => None,
        };
        // Keep the peer namespace file open until the kernel has answered.
        let peer_file = match &spec.kind {
            LinkKind::Veth {
                peer_ns: Some(p), ..
            } if p != ns => Some(self.ns_file(p)?),
            _ => None,
        };
        let msg = encode_create(spec, peer_file.as_ref().map(|f| f.as_raw_fd()), underlay);
        self.nl(ns)?
            .ack(RouteNetlinkMessage::NewLink(msg), NLM_F_CREATE | NLM_F_EXCL)
            .map_err(|e| perr("create link", object, e))?;
        drop(peer_file);

        let finish = self.finish_create(ns, spec);
        if finish.is_err() {
            // Do not leave a half-configured link behind: the reconciler creates it again.
            let _ignored = self.delete_link(ns, &spec.name);
        }
        finish
    }

    /// The steps that need the link to exist: alias (not honoured on create) and the move.
    fn finish_create(&mut self, ns: &NsRef, spec: &LinkSpec) -> PortResult<()> {
        if spec.alias.is_none() && spec.move_to.as_ref().is_none_or(|t| t == ns) {
            return Ok(());
        }
        let index = self.link_index(ns, &spec.name)?;
        if let Some(alias) = &spec.alias {
            let mut msg = LinkMessage::default();
            msg.header.index = index;
            msg.attributes.push(LinkAttribute::IfAlias(alias.clone()));
            self.set_link_msg(ns, &spec.name, msg, "set link alias")?;
        }
        if let Some(target) = spec.move_to.as_ref().filter(|t| *t != ns) {
            let file = self.ns_file(target)?;
            let mut msg = LinkMessage::default();
            msg.header.index = index;
            msg.attributes
                .push(LinkAttribute::NetNsFd(file.as_raw_fd()));
            self.nl(ns)?
                .ack(RouteNetlinkMessage::SetLink(msg), 0)
                .map_err(|e| {
                    perr(
                        "move link",
                        format!("{} from {ns} to {target}", spec.name),
                        e,
                    )
                })?;
        }
        Ok(())
    }
}

impl LinkPort for LinuxLinkPort {
    fn list_netns(&mut self) -> PortResult<Vec<NsName>> {
        let dir = netns::dir(&self.run_dir);
        let names =
            netns::list(&dir).map_err(|e| perr("list netns", dir.display().to_string(), e))?;
        // Names that are not valid NsNames cannot have been created by us.
        Ok(names
            .into_iter()
            .filter_map(|n| NsName::new(n).ok())
            .collect())
    }

    fn create_netns(&mut self, ns: &NsName) -> PortResult<()> {
        let path = self.netns_path(ns);
        // A cached socket for this name belongs to a namespace someone removed behind our back
        // (the file was unmounted); it must not be used for the new one.
        self.sockets.remove(&NsRef::Owned(ns.clone()));
        netns::create(&path).map_err(|e| perr("create netns", ns.to_string(), e))
    }

    fn bind_netns(&mut self, ns: &NsName, from: &Path) -> PortResult<()> {
        let path = self.netns_path(ns);
        self.sockets.remove(&NsRef::Owned(ns.clone()));
        let object = format!("{ns} from {}", from.display());
        netns::bind_existing(from, &path).map_err(|e| perr("bind netns", object.clone(), e))?;
        let marker = self.bound_marker(ns);
        let mark = marker
            .parent()
            .map_or(Ok(()), std::fs::create_dir_all)
            .and_then(|()| std::fs::write(&marker, from.as_os_str().as_encoded_bytes()));
        if let Err(e) = mark {
            let _ignored = netns::remove(&path);
            return Err(perr("bind netns", object, e));
        }
        Ok(())
    }

    fn netns_path(&self, ns: &NsName) -> PathBuf {
        netns::dir(&self.run_dir).join(ns.as_str())
    }

    fn is_bound(&self, ns: &NsName) -> bool {
        self.bound_marker(ns).exists()
    }

    fn delete_netns(&mut self, ns: &NsName) -> PortResult<()> {
        let path = self.netns_path(ns);
        let r = NsRef::Owned(ns.clone());
        let marker = self.bound_marker(ns);
        let bound = marker.exists();
        // No per-link deletes here: the kernel tears a namespace's devices down in one batch
        // when the last reference goes, where deleting them one by one costs a synchronous
        // RCU grace period each (~24 ms: 50 s for a thousand sandboxes). Callers that need a
        // name or a VNI free at once (a VXLAN device) delete that link first.
        // Our socket holds a reference to the namespace: drop it first.
        self.sockets.remove(&r);
        netns::remove(&path).map_err(|e| perr("delete netns", ns.to_string(), e))?;
        if bound {
            let _ignored = std::fs::remove_file(&marker);
        }
        Ok(())
    }

    fn list_links(&mut self, ns: &NsRef) -> PortResult<Vec<LinkState>> {
        let replies = self
            .nl(ns)?
            .dump(RouteNetlinkMessage::GetLink(LinkMessage::default()))
            .map_err(|e| perr("list links", ns.to_string(), e))?;
        let decoded: Vec<(LinkState, u32)> = replies
            .iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewLink(l) => decode_link(l),
                _ => None,
            })
            .collect();
        let names: HashMap<u32, IfName> = decoded
            .iter()
            .map(|(l, _)| (l.index, l.name.clone()))
            .collect();
        let any_port = decoded.iter().any(|(_, m)| *m != 0);
        let hairpin = if any_port {
            self.hairpin_ports(ns)?
        } else {
            Default::default()
        };
        Ok(decoded
            .into_iter()
            .map(|(mut l, master)| {
                l.master = names.get(&master).cloned();
                l.hairpin = hairpin.contains(&l.index);
                l
            })
            .collect())
    }

    fn get_link(&mut self, ns: &NsRef, name: &IfName) -> PortResult<Option<LinkState>> {
        let decode_one = |replies: &[RouteNetlinkMessage]| {
            replies.iter().find_map(|m| match m {
                RouteNetlinkMessage::NewLink(l) => decode_link(l),
                _ => None,
            })
        };
        let Some((mut link, master)) = self.fetch_link(ns, name)? else {
            return Ok(None);
        };
        if master != 0 {
            let mut by_index = LinkMessage::default();
            by_index.header.index = master;
            let replies = self
                .nl(ns)?
                .request(RouteNetlinkMessage::GetLink(by_index), 0)
                .map_err(|e| perr("get link", format!("master {master} of {name} in {ns}"), e))?;
            link.master = decode_one(&replies).map(|(m, _)| m.name);
        }
        Ok(Some(link))
    }

    fn create_link(&mut self, ns: &NsRef, spec: &LinkSpec) -> PortResult<()> {
        self.create_link_inner(ns, spec)
    }

    fn set_link(&mut self, ns: &NsRef, name: &IfName, change: &LinkChange) -> PortResult<()> {
        let index = self.link_index(ns, name)?;
        let mut msg = LinkMessage::default();
        msg.header.index = index;
        if let Some(mtu) = change.mtu {
            msg.attributes.push(LinkAttribute::Mtu(u32::from(mtu)));
        }
        if let Some(mac) = change.mac {
            msg.attributes
                .push(LinkAttribute::Address(mac.octets().to_vec()));
        }
        match &change.master {
            None => {}
            // IFLA_MASTER 0 releases the link from its bridge.
            Some(None) => msg.attributes.push(LinkAttribute::Controller(0)),
            Some(Some(master)) => {
                let m = self.require_link(ns, master).map_err(|e| PortError {
                    op: "set link",
                    object: in_ns(name.as_str(), ns),
                    kind: ErrorKind::Invalid,
                    detail: format!("master {master} does not exist: {}", e.detail),
                    source: e.source,
                })?;
                if m.kind != LinkKindState::Bridge {
                    return Err(PortError::new(
                        "set link",
                        in_ns(name.as_str(), ns),
                        ErrorKind::Invalid,
                        format!("master {master} is not a bridge"),
                    ));
                }
                msg.attributes.push(LinkAttribute::Controller(m.index));
            }
        }
        if let Some(up) = change.up {
            msg.header.change_mask = LinkFlags::Up;
            msg.header.flags = if up {
                LinkFlags::Up
            } else {
                LinkFlags::empty()
            };
        }
        if !msg.attributes.is_empty() || change.up.is_some() {
            self.set_link_msg(ns, name, msg, "set link")?;
        }
        if let Some(on) = change.hairpin {
            // Bridge-port flags travel in an AF_BRIDGE RTM_SETLINK (the bridge's setlink),
            // nested in IFLA_PROTINFO; the port must already be enslaved (done above).
            let mut port = LinkMessage::default();
            port.header.interface_family = AddressFamily::Bridge;
            port.header.index = index;
            port.attributes.push(LinkAttribute::ProtoInfoBridge(vec![
                LinkProtoInfoBridge::Other(DefaultNla::new(IFLA_BRPORT_MODE, vec![u8::from(on)])),
            ]));
            self.set_link_msg(ns, name, port, "set hairpin mode")?;
        }
        Ok(())
    }

    fn delete_link(&mut self, ns: &NsRef, name: &IfName) -> PortResult<()> {
        let index = self.link_index(ns, name).map_err(|mut e| {
            e.op = "delete link";
            e
        })?;
        let mut msg = LinkMessage::default();
        msg.header.index = index;
        self.nl(ns)?
            .ack(RouteNetlinkMessage::DelLink(msg), 0)
            .map_err(|e| perr("delete link", in_ns(name.as_str(), ns), e))
    }

    fn list_addrs(&mut self, ns: &NsRef) -> PortResult<Vec<AddrState>> {
        let names = self.index_to_name(ns)?;
        let mut req = AddressMessage::default();
        req.header.family = AddressFamily::Inet;
        let replies = self
            .nl(ns)?
            .dump(RouteNetlinkMessage::GetAddress(req))
            .map_err(|e| perr("list addresses", ns.to_string(), e))?;
        let mut out = Vec::new();
        for m in replies {
            let RouteNetlinkMessage::NewAddress(a) = m else {
                continue;
            };
            if a.header.family != AddressFamily::Inet {
                continue;
            }
            let mut local = None;
            let mut address = None;
            for attr in &a.attributes {
                match attr {
                    AddressAttribute::Local(ip) => local = ipv4_of(ip),
                    AddressAttribute::Address(ip) => address = ipv4_of(ip),
                    _ => {}
                }
            }
            let (Some(ip), Some(link)) = (local.or(address), names.get(&a.header.index)) else {
                continue;
            };
            if let Ok(addr) = Ipv4Net::new(ip, a.header.prefix_len) {
                out.push(AddrState {
                    link: link.clone(),
                    addr,
                });
            }
        }
        out.sort();
        Ok(out)
    }

    fn add_addr(&mut self, ns: &NsRef, link: &IfName, addr: Ipv4Net) -> PortResult<()> {
        let index = self.link_index(ns, link)?;
        self.nl(ns)?
            .ack(
                RouteNetlinkMessage::NewAddress(encode_addr(index, addr)),
                NLM_F_CREATE | NLM_F_EXCL,
            )
            .map_err(|e| {
                perr(
                    "add address",
                    format!("{addr} on {}", in_ns(link.as_str(), ns)),
                    e,
                )
            })
    }

    fn delete_addr(&mut self, ns: &NsRef, link: &IfName, addr: Ipv4Net) -> PortResult<()> {
        let index = self.link_index(ns, link)?;
        self.nl(ns)?
            .ack(RouteNetlinkMessage::DelAddress(encode_addr(index, addr)), 0)
            .map_err(|e| {
                // The kernel says EADDRNOTAVAIL for an address that is not there.
                let missing = e.raw_os_error() == Some(libc::EADDRNOTAVAIL);
                let mut err = perr(
                    "delete address",
                    format!("{addr} on {}", in_ns(link.as_str(), ns)),
                    e,
                );
                if missing {
                    err.kind = ErrorKind::NotFound;
                }
                err
            })
    }

    fn list_routes(&mut self, ns: &NsRef) -> PortResult<Vec<RouteState>> {
        let names = self.index_to_name(ns)?;
        let mut req = RouteMessage::default();
        req.header.address_family = AddressFamily::Inet;
        let replies = self
            .nl(ns)?
            .dump(RouteNetlinkMessage::GetRoute(req))
            .map_err(|e| perr("list routes", ns.to_string(), e))?;
        let mut out = Vec::new();
        for m in replies {
            let RouteNetlinkMessage::NewRoute(r) = m else {
                continue;
            };
            let mut table = u32::from(r.header.table);
            let (mut dst, mut gateway, mut oif) = (Ipv4Addr::UNSPECIFIED, None, None);
            for attr in &r.attributes {
                match attr {
                    // The header's table is a u8; big table ids only come in the attribute.
                    RouteAttribute::Table(t) => table = *t,
                    RouteAttribute::Destination(RouteAddress::Inet(d)) => dst = *d,
                    RouteAttribute::Gateway(RouteAddress::Inet(g)) => gateway = Some(*g),
                    RouteAttribute::Oif(i) => oif = Some(*i),
                    _ => {}
                }
            }
            if r.header.address_family != AddressFamily::Inet
                || table != u32::from(RouteHeader::RT_TABLE_MAIN)
                || r.header.kind != RouteType::Unicast
            {
                continue;
            }
            let Ok(dst) = Ipv4Net::new(dst, r.header.destination_prefix_length) else {
                continue;
            };
            let link = oif.and_then(|i| names.get(&i).cloned());
            out.push(RouteState { dst, gateway, link });
        }
        out.sort();
        Ok(out)
    }

    fn add_route(&mut self, ns: &NsRef, route: &RouteState) -> PortResult<()> {
        let oif = route
            .link
            .as_ref()
            .map(|l| self.link_index(ns, l))
            .transpose()?;
        let object = format!("{route:?} in {ns}");
        self.nl(ns)?
            .ack(
                RouteNetlinkMessage::NewRoute(encode_route(route, oif, false)),
                NLM_F_CREATE | NLM_F_EXCL,
            )
            .map_err(|e| perr("add route", object, e))
    }

    fn delete_route(&mut self, ns: &NsRef, route: &RouteState) -> PortResult<()> {
        let oif = route
            .link
            .as_ref()
            .map(|l| self.link_index(ns, l))
            .transpose()?;
        let object = format!("{route:?} in {ns}");
        self.nl(ns)?
            .ack(
                RouteNetlinkMessage::DelRoute(encode_route(route, oif, true)),
                0,
            )
            .map_err(|e| perr("delete route", object, e))
    }

    fn list_fdb(&mut self, ns: &NsRef, link: &IfName) -> PortResult<Vec<FdbEntry>> {
        let index = self.vxlan_index(ns, link, "list fdb")?;
        let mut req = NeighbourMessage::default();
        req.header.family = AddressFamily::Bridge;
        let replies = self
            .nl(ns)?
            .dump(RouteNetlinkMessage::GetNeighbour(req))
            .map_err(|e| perr("list fdb", in_ns(link.as_str(), ns), e))?;
        let mut out = Vec::new();
        for m in replies {
            let RouteNetlinkMessage::NewNeighbour(n) = m else {
                continue;
            };
            if n.header.ifindex != index || !n.header.flags.contains(NeighbourFlags::Own) {
                continue;
            }
            let (mut mac, mut dst) = (None, None);
            for attr in &n.attributes {
                match attr {
                    NeighbourAttribute::LinkLayerAddress(a) => mac = mac_from(a),
                    NeighbourAttribute::Destination(NeighbourAddress::Inet(d)) => dst = Some(*d),
                    // AF_BRIDGE messages carry the VTEP as raw bytes.
                    NeighbourAttribute::Destination(NeighbourAddress::Other(b)) => {
                        dst = <[u8; 4]>::try_from(b.as_slice()).ok().map(Ipv4Addr::from);
                    }
                    _ => {}
                }
            }
            // Entries without a destination (or with a multicast MAC such as the all-zeros
            // default) are the kernel's own, not ours.
            if let (Some(mac), Some(dst)) = (mac, dst) {
                out.push(FdbEntry { mac, dst });
            }
        }
        out.sort();
        Ok(out)
    }

    fn add_fdb(&mut self, ns: &NsRef, link: &IfName, entry: &FdbEntry) -> PortResult<()> {
        let index = self.vxlan_index(ns, link, "add fdb")?;
        let msg = RouteNetlinkMessage::NewNeighbour(encode_fdb(index, entry));
        let object = format!(
            "{} dst {} on {}",
            entry.mac,
            entry.dst,
            in_ns(link.as_str(), ns)
        );
        self.neigh_request(ns, msg, NLM_F_CREATE | NLM_F_EXCL, "add fdb", object)
    }

    fn delete_fdb(&mut self, ns: &NsRef, link: &IfName, entry: &FdbEntry) -> PortResult<()> {
        let index = self.vxlan_index(ns, link, "delete fdb")?;
        let msg = RouteNetlinkMessage::DelNeighbour(encode_fdb(index, entry));
        let object = format!(
            "{} dst {} on {}",
            entry.mac,
            entry.dst,
            in_ns(link.as_str(), ns)
        );
        self.neigh_request(ns, msg, 0, "delete fdb", object)
    }

    fn list_neighs(&mut self, ns: &NsRef, link: &IfName) -> PortResult<Vec<NeighEntry>> {
        let index = self.link_index(ns, link)?;
        let mut req = NeighbourMessage::default();
        req.header.family = AddressFamily::Inet;
        let replies = self
            .nl(ns)?
            .dump(RouteNetlinkMessage::GetNeighbour(req))
            .map_err(|e| perr("list neighbours", in_ns(link.as_str(), ns), e))?;
        let mut out = Vec::new();
        for m in replies {
            let RouteNetlinkMessage::NewNeighbour(n) = m else {
                continue;
            };
            if n.header.ifindex != index
                || n.header.family != AddressFamily::Inet
                || n.header.state != NeighbourState::Permanent
            {
                continue;
            }
            let (mut mac, mut ip) = (None, None);
            for attr in &n.attributes {
                match attr {
                    NeighbourAttribute::LinkLayerAddress(a) => mac = mac_from(a),
                    NeighbourAttribute::Destination(NeighbourAddress::Inet(d)) => ip = Some(*d),
                    _ => {}
                }
            }
            if let (Some(mac), Some(ip)) = (mac, ip) {
                out.push(NeighEntry { ip, mac });
            }
        }
        out.sort();
        Ok(out)
    }

    fn add_neigh(&mut self, ns: &NsRef, link: &IfName, entry: &NeighEntry) -> PortResult<()> {
        let index = self.link_index(ns, link)?;
        let msg = RouteNetlinkMessage::NewNeighbour(encode_neigh(index, entry));
        let object = format!("{} on {}", entry.ip, in_ns(link.as_str(), ns));
        self.neigh_request(ns, msg, NLM_F_CREATE | NLM_F_EXCL, "add neighbour", object)
    }

    fn delete_neigh(&mut self, ns: &NsRef, link: &IfName, entry: &NeighEntry) -> PortResult<()> {
        let index = self.link_index(ns, link)?;
        let msg = RouteNetlinkMessage::DelNeighbour(encode_neigh(index, entry));
        let object = format!("{} on {}", entry.ip, in_ns(link.as_str(), ns));
        self.neigh_request(ns, msg, 0, "delete neighbour", object)
    }

    fn get_sysctl(&mut self, ns: &NsRef, key: &str) -> PortResult<String> {
        let file = self.ns_file(ns)?;
        netns::read_sysctl(&file, key).map_err(|e| perr("get sysctl", format!("{key} in {ns}"), e))
    }

    fn set_sysctl(&mut self, ns: &NsRef, key: &str, value: &str) -> PortResult<()> {
        let file = self.ns_file(ns)?;
        netns::write_sysctl(&file, key, value)
            .map_err(|e| perr("set sysctl", format!("{key}={value} in {ns}"), e))
    }

    fn underlay_for(&mut self, addr: Ipv4Addr) -> PortResult<(IfName, u16)> {
        let node = NsRef::Node;
        let holder = self
            .list_addrs(&node)?
            .into_iter()
            .find(|a| a.addr.addr() == addr);
        let Some(holder) = holder else {
            return Err(PortError::new(
                "find underlay",
                addr.to_string(),
                ErrorKind::NotFound,
                format!(
                    "no interface in the node namespace holds {addr}; check the node's advertise \
                     address"
                ),
            ));
        };
        let link = self.require_link(&node, &holder.link)?;
        Ok((link.name, link.mtu))
    }
}

impl LinuxLinkPort {
    /// The index of `link`, which must be a VXLAN device: the kernel would accept an FDB entry
    /// on any device (as a unicast address filter), which is never what we mean.
    fn vxlan_index(&mut self, ns: &NsRef, link: &IfName, op: &'static str) -> PortResult<u32> {
        let l = self.require_link(ns, link).map_err(|mut e| {
            e.op = op;
            e
        })?;
        if !matches!(l.kind, LinkKindState::Vxlan { .. }) {
            return Err(PortError::new(
                op,
                in_ns(link.as_str(), ns),
                ErrorKind::Invalid,
                "FDB entries with a remote need a VXLAN device",
            ));
        }
        Ok(l.index)
    }
}

#[cfg(test)]
mod tests {
    //! Byte fixtures for the encoders, checked against the kernel's layouts (`struct ndmsg`,
    //! `IFLA_VXLAN_*` in include/uapi/linux/if_link.h).
    use netlink_packet_core::Emitable;

    use super::*;

    fn bytes(m: &impl Emitable) -> Vec<u8> {
        let mut b = vec![0; m.buffer_len()];
        m.emit(&mut b);
        b
    }

    #[test]
    fn fdb_entry_is_self_permanent_with_a_remote() {
        let e = FdbEntry {
            mac: "02:42:0a:00:01:02".parse().unwrap(),
            dst: Ipv4Addr::new(198, 18, 0, 2),
        };
        #[rustfmt::skip]
        let want: Vec<u8> = vec![
            7, 0, 0, 0, 5, 0, 0, 0, 0x80, 0, 0x02, 0, // AF_BRIDGE, ifindex 5, NUD_PERMANENT, NTF_SELF
            10, 0, 2, 0, 0x02, 0x42, 0x0a, 0x00, 0x01, 0x02, 0, 0, // NDA_LLADDR
            8, 0, 1, 0, 198, 18, 0, 2, // NDA_DST
        ];
        assert_eq!(bytes(&encode_fdb(5, &e)), want);
    }

    #[test]
    fn vxlan_has_no_learning_proxy_and_big_endian_port() {
        let spec = LinkSpec {
            name: IfName::new("vxlan0").unwrap(),
            kind: LinkKind::Vxlan {
                vni: 4242,
                local: Ipv4Addr::new(198, 18, 0, 1),
                port: 4789,
                underlay: None,
            },
            mtu: None,
            mac: None,
            alias: None,
            move_to: None,
        };
        let b = bytes(&encode_create(&spec, None, Some(3)));
        let has = |needle: &[u8]| b.windows(needle.len()).any(|w| w == needle);
        assert!(has(&[8, 0, 1, 0, 0x92, 0x10, 0, 0]), "IFLA_VXLAN_ID 4242");
        assert!(has(&[8, 0, 4, 0, 198, 18, 0, 1]), "IFLA_VXLAN_LOCAL");
        assert!(
            has(&[6, 0, 15, 0, 0x12, 0xb5]),
            "IFLA_VXLAN_PORT 4789, network order"
        );
        assert!(has(&[5, 0, 7, 0, 0]), "IFLA_VXLAN_LEARNING off");
        assert!(has(&[5, 0, 11, 0, 1]), "IFLA_VXLAN_PROXY on");
        assert!(has(&[8, 0, 3, 0, 3, 0, 0, 0]), "IFLA_VXLAN_LINK 3");
        assert!(
            !has(&[8, 0, 2, 0]),
            "no IFLA_VXLAN_GROUP: nothing is flooded"
        );
    }

    #[test]
    fn veth_peer_carries_its_namespace_fd() {
        let spec = LinkSpec {
            name: IfName::new("sn-a0").unwrap(),
            kind: LinkKind::Veth {
                peer: IfName::new("eth0").unwrap(),
                peer_ns: None,
                peer_mac: None,
            },
            mtu: Some(1450),
            mac: None,
            alias: None,
            move_to: None,
        };
        let b = bytes(&encode_create(&spec, Some(42), None));
        let has = |needle: &[u8]| b.windows(needle.len()).any(|w| w == needle);
        assert!(
            has(&[8, 0, 28, 0, 42, 0, 0, 0]),
            "IFLA_NET_NS_FD 42 inside the peer"
        );
        assert!(has(b"eth0\0"));
    }
}
