//! [`IpvsLoadBalancer`]: the IPVS implementation of [`LoadBalancerPort`], over the kernel's
//! generic-netlink family `"IPVS"` ([`msg`]: our own messages), plus the [`probe`] behind
//! `--lb auto`.
//!
//! Per network namespace: a generic-netlink socket and a netfilter socket, both created on a
//! thread inside it (STYLE rule 6; IPVS state is per namespace, so the socket's namespace is
//! the one it programs), the family id resolved there through `nlctrl`, and the last applied
//! state in memory. `apply` plans the ordered IPVS requests ([`plan`]) and the companion
//! nftables table around them; the first apply to a namespace (or the first after drift or a
//! failure) reads the kernel's services and destinations (two dumps) and plans from what is
//! there, so a restarted netd adopts the running services without dropping a connection.
//!
//! The datapath, and why each namespace setting is needed (the load balancer lives in the
//! overlay network's namespace: VIPs are /32s on `br0`, clients and backends are sandboxes on
//! the same bridge, bridge netfilter is on):
//! - a client's packet to a VIP is addressed to `br0` (the VIP is local there), so it is
//!   routed up to `LOCAL_IN`, where IPVS schedules it and, in masquerade mode, rewrites the
//!   destination to the backend and sends it back out of `br0`; the source stays the
//!   client's (requirement 2);
//! - the backend's reply goes to the client's address on the same bridge: it is *bridged*,
//!   never routed, so it would bypass IPVS's un-NAT, which sits at `FORWARD` (and
//!   `LOCAL_IN`). Bridge netfilter (`bridge-nf-call-iptables`, set by the planner for every
//!   network namespace) passes bridged IPv4 through the `FORWARD` hook, where `ip_vs_out`
//!   finds the connection and rewrites the source back to VIP:port (the same path kube-proxy's
//!   IPVS mode relies on with a bridge CNI);
//! - `net.ipv4.vs.conntrack=1`: without it IPVS marks its packets untracked, so the companion
//!   table's hairpin masquerade (a NAT rule: needs a conntrack entry) never applies and the
//!   reply of a hairpinned connection cannot be un-masqueraded; with it IPVS keeps the entry
//!   and rewrites its reply tuple to the real server, which is also what lets us delete a
//!   removed UDP backend's flows by conntrack tuple;
//! - `net.ipv4.vs.expire_nodest_conn=1`: a connection whose destination was deleted is
//!   expired on its next packet (a UDP flow is then scheduled anew); with 0 its packets are
//!   dropped until the entry times out (300 s for UDP);
//! - `net.ipv4.vs.expire_quiescent_template=1`: with affinity (persistence), a client's
//!   template would keep sending it to a draining (weight 0) destination; with 1 the template
//!   expires and the client moves to a healthy backend (requirement 4);
//! - IPVS timeouts are per namespace (`IPVS_CMD_SET_CONFIG`); when the spec sets none, TCP
//!   gets conntrack's established timeout (5 days) instead of IPVS's 900 s, the silent drop of
//!   moby/moby#31208. The conntrack timeouts of the namespace are set as in the nftables
//!   backend when the spec has them (both tables must keep an idle connection).
//!
//! What IPVS cannot do is in a companion nftables table ([`plan::Companion`]): the immediate
//! reject of a service without a healthy backend (TCP reset; IPVS alone answers ICMP, which is
//! rate-limited) and the hairpin masquerade. Draining is weight 0; a removed backend is a
//! deleted destination, and its established connections end with it (IPVS drops or expires
//! packets of a connection whose destination is gone): removal comes after the caller's grace
//! period, when the task is stopped anyway.
//!
//! `observe` is O(1): the companion table's ruleset generation (only we commit there) and a
//! `GET_SERVICE` + destination dump for a few services, rotating through all of them from one
//! call to the next: a flush by someone else (`ipvsadm -C`) is seen at once, a single changed
//! service within a few rounds.
//!
//! Invariants: an `apply` that fails part way leaves the namespace marked for a full program
//! (from a fresh dump) on the next apply; the in-memory state changes only after every request
//! succeeded.

pub mod msg;
pub mod plan;

use std::collections::BTreeMap;
use std::fs::File;
use std::io;
use std::path::PathBuf;

use netlink_packet_core::{
    NLM_F_ACK, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload,
};
use netlink_packet_generic::GenlMessage;
use netlink_packet_generic::ctrl::nlas::GenlCtrlAttrs;
use netlink_packet_generic::ctrl::{GenlCtrl, GenlCtrlCmd};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_GENERIC};

use self::msg::{Answer, IpvsErrno, IpvsTimeouts, Reply, Request};
use self::plan::{Companion, IpvsServiceState, IpvsState};
use super::netns;
use super::nft::{NfSocket, encode_batch, send_batch};
use crate::lb::model::diff;
use crate::lb::nft_render::{NftOp, TABLE};
use crate::lb::{
    ApplyStats, IdleTimeouts, LbKind, LbObserved, LbSpec, LoadBalancerPort, ServiceChange,
};
use crate::port::{ErrorKind, NsRef, PortError, PortResult};

/// IPVS settings of every namespace we program (see the module docs for why).
pub const IPVS_SYSCTLS: [(&str, &str); 3] = [
    ("net/ipv4/vs/conntrack", "1"),
    ("net/ipv4/vs/expire_nodest_conn", "1"),
    ("net/ipv4/vs/expire_quiescent_template", "1"),
];

/// TCP idle timeout when the spec sets none: conntrack's `tcp_timeout_established` default.
pub const DEFAULT_TCP_TIMEOUT_S: u32 = 5 * 24 * 3600;

/// Services checked per `observe` call.
const OBSERVE_SAMPLE: usize = 4;

/// Requests sent per datagram (each is acknowledged; the kernel handles them in order).
const REQUESTS_PER_SEND: usize = 256;

/// A generic-netlink socket bound to one namespace, with the IPVS family id resolved there.
#[derive(Debug)]
pub struct GenlSocket {
    sock: Socket,
    seq: u32,
    family: u16,
}

/// What resolving the family found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IpvsProbe {
    /// The family is registered (the `ip_vs` module is loaded; since 5.16 asking for the
    /// family loads it): its id.
    Present { family: u16 },
    /// The kernel has no family `"IPVS"` (`ENOENT`: ip_vs not built, or not loadable here)
    /// or the probe failed; why.
    Absent(String),
}

/// Asks the controller of the calling thread's namespace for the family `"IPVS"`.
pub fn probe() -> IpvsProbe {
    let result = (|| {
        let mut sock = Socket::new(NETLINK_GENERIC)?;
        sock.bind_auto()?;
        sock.connect(&SocketAddr::new(0, 0))?;
        resolve_family(&mut sock, 1)
    })();
    match result {
        Ok(family) => IpvsProbe::Present { family },
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => IpvsProbe::Absent(
            "the kernel has no generic-netlink family \"IPVS\" (ip_vs is not built in and \
             cannot be loaded)"
                .into(),
        ),
        Err(e) => IpvsProbe::Absent(format!(
            "asking the kernel for the generic-netlink family \"IPVS\" failed: {e}"
        )),
    }
}

/// `CTRL_CMD_GETFAMILY "IPVS"` on `sock`: the family id, or the kernel's error (`ENOENT`
/// when there is no such family).
fn resolve_family(sock: &mut Socket, seq: u32) -> io::Result<u16> {
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | NLM_F_ACK;
    header.sequence_number = seq;
    let mut genl = GenlMessage::from_payload(GenlCtrl {
        cmd: GenlCtrlCmd::GetFamily,
        nlas: vec![GenlCtrlAttrs::FamilyName(msg::IPVS_GENL_NAME.into())],
    });
    genl.finalize();
    let mut m = NetlinkMessage::new(header, NetlinkPayload::from(genl));
    m.finalize();
    let mut buf = vec![0u8; m.buffer_len()];
    m.serialize(&mut buf);
    sock.send(&buf, 0)?;
    let mut family = None;
    for _ in 0..64 {
        let (data, _) = sock.recv_from_full()?;
        let mut off = 0;
        while off + 16 <= data.len() {
            let len = usize::try_from(u32::from_ne_bytes([
                data[off],
                data[off + 1],
                data[off + 2],
                data[off + 3],
            ]))
            .unwrap_or(usize::MAX);
            if len < 16 || off + len > data.len() {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "truncated netlink message",
                ));
            }
            let m = NetlinkMessage::<GenlMessage<GenlCtrl>>::deserialize(&data[off..off + len])
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
            off += (len + 3) & !3;
            if m.header.sequence_number != seq {
                continue;
            }
            match m.payload {
                NetlinkPayload::InnerMessage(g) => {
                    for nla in g.payload.nlas {
                        if let GenlCtrlAttrs::FamilyId(id) = nla {
                            family = Some(id);
                        }
                    }
                }
                NetlinkPayload::Error(e) => {
                    return match e.code {
                        None => family.ok_or_else(|| {
                            io::Error::new(io::ErrorKind::InvalidData, "no family id in reply")
                        }),
                        Some(c) => Err(io::Error::from_raw_os_error(-c.get())),
                    };
                }
                _ => {}
            }
        }
    }
    Err(io::Error::new(
        io::ErrorKind::TimedOut,
        "no acknowledgement from nlctrl",
    ))
}

/// A request the kernel refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    pub request: Request,
    pub errno: IpvsErrno,
}

impl GenlSocket {
    /// Opens a socket in the calling thread's namespace and resolves the IPVS family there.
    pub fn open() -> io::Result<Self> {
        let mut sock = Socket::new(NETLINK_GENERIC)?;
        sock.bind_auto()?;
        sock.connect(&SocketAddr::new(0, 0))?;
        sock.set_cap_ack(true)?;
        sock.set_rx_buf_sz(4 << 20)?;
        let family = resolve_family(&mut sock, 1)?;
        Ok(Self {
            sock,
            seq: 2,
            family,
        })
    }

    /// The family id this socket uses.
    pub fn family(&self) -> u16 {
        self.family
    }

    /// Sends `reqs` (several per datagram; the kernel handles them in order and answers each)
    /// and returns each one's answer: its data (dump entries, a `doit` reply) or the errno.
    /// An I/O failure is an `Err` for the whole exchange.
    pub fn exchange(&mut self, reqs: &[Request]) -> io::Result<Vec<Result<Vec<Reply>, Refused>>> {
        let mut out = Vec::with_capacity(reqs.len());
        // A dump ends its datagram: the kernel runs one dump per socket at a time, and a dump
        // that does not finish in its first reply makes the next one in the same datagram
        // fail with EBUSY; so the next datagram goes out only after the dump's NLMSG_DONE.
        let mut chunks = Vec::new();
        let mut start = 0;
        for (i, r) in reqs.iter().enumerate() {
            if r.is_dump() || i + 1 - start == REQUESTS_PER_SEND || i + 1 == reqs.len() {
                chunks.push(&reqs[start..=i]);
                start = i + 1;
            }
        }
        for chunk in chunks {
            let first = self.seq;
            let mut buf = Vec::new();
            for (i, r) in chunk.iter().enumerate() {
                buf.extend(r.encode(
                    self.family,
                    first.wrapping_add(u32::try_from(i).unwrap_or(0)),
                ));
            }
            self.seq = first.wrapping_add(u32::try_from(chunk.len()).unwrap_or(0));
            let n = self.sock.send(&buf, 0)?;
            if n != buf.len() {
                return Err(io::Error::new(
                    io::ErrorKind::WriteZero,
                    format!("netlink send wrote {n} of {} bytes", buf.len()),
                ));
            }
            let mut answers: Vec<Option<Result<Vec<Reply>, Refused>>> = vec![None; chunk.len()];
            let mut data: Vec<Vec<Reply>> = vec![Vec::new(); chunk.len()];
            let mut open = chunk.len();
            while open > 0 {
                let (dgram, _) = self.sock.recv_from_full()?;
                // Answers are for consecutive sequence numbers of this chunk: classify each
                // message against every request of the chunk.
                let mut off = 0;
                while off + 16 <= dgram.len() {
                    let len = usize::try_from(u32::from_ne_bytes([
                        dgram[off],
                        dgram[off + 1],
                        dgram[off + 2],
                        dgram[off + 3],
                    ]))
                    .unwrap_or(usize::MAX);
                    if len < 16 || off + len > dgram.len() {
                        return Err(io::Error::new(
                            io::ErrorKind::InvalidData,
                            "truncated netlink message",
                        ));
                    }
                    let seq = u32::from_ne_bytes([
                        dgram[off + 8],
                        dgram[off + 9],
                        dgram[off + 10],
                        dgram[off + 11],
                    ]);
                    let msg_bytes = &dgram[off..off + len];
                    off += (len + 3) & !3;
                    let i = seq.wrapping_sub(first) as usize;
                    if i >= chunk.len() || answers[i].is_some() {
                        continue; // late reply to an earlier exchange
                    }
                    let parsed = msg::parse_replies(msg_bytes, seq)
                        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
                    for a in parsed {
                        match a {
                            Answer::Data(r) => data[i].push(r),
                            Answer::End => {
                                answers[i] = Some(Ok(std::mem::take(&mut data[i])));
                                open -= 1;
                            }
                            Answer::Error(errno) => {
                                answers[i] = Some(Err(Refused {
                                    request: chunk[i].clone(),
                                    errno,
                                }));
                                open -= 1;
                            }
                            Answer::Other => {}
                        }
                    }
                }
            }
            out.extend(answers.into_iter().map(|a| a.unwrap_or(Ok(Vec::new()))));
        }
        Ok(out)
    }

    /// One request; its data, or an `io::Error` carrying the kernel's errno.
    pub fn request(&mut self, req: Request) -> io::Result<Vec<Reply>> {
        match self.exchange(std::slice::from_ref(&req))?.pop() {
            Some(Ok(r)) => Ok(r),
            Some(Err(refused)) => Err(io::Error::from_raw_os_error(refused.errno.errno())),
            None => Ok(Vec::new()),
        }
    }

    /// Every service of the namespace with its destinations (two kinds of dump).
    pub fn dump(&mut self) -> io::Result<IpvsState> {
        let mut state = IpvsState::default();
        for r in self.request(Request::DumpServices)? {
            if let Reply::Service(svc) = r {
                state.services.insert(
                    svc.key,
                    IpvsServiceState {
                        svc,
                        dests: BTreeMap::new(),
                    },
                );
            }
        }
        let keys: Vec<_> = state.services.keys().copied().collect();
        let dumps: Vec<Request> = keys.iter().map(|k| Request::DumpDests(*k)).collect();
        for (k, answer) in keys.iter().zip(self.exchange(&dumps)?) {
            // ESRCH: the service went away between the two dumps.
            let Ok(replies) = answer else { continue };
            if let Some(st) = state.services.get_mut(k) {
                for r in replies {
                    if let Reply::Dest(d) = r {
                        st.dests.insert((d.addr, d.port), d);
                    }
                }
            }
        }
        Ok(state)
    }
}

/// What we know about one namespace.
#[derive(Debug)]
struct NsIpvs {
    ns_file: File,
    genl: GenlSocket,
    nf: NfSocket,
    /// `None`: nothing applied yet, or the kernel may differ: the next apply programs from a
    /// fresh dump.
    state: Option<Applied>,
    timeouts_applied: Option<Option<IdleTimeouts>>,
    /// Rotating position of `observe`'s sample.
    cursor: usize,
}

#[derive(Debug)]
struct Applied {
    spec: LbSpec,
    companion: Companion,
    /// The companion table's ruleset generation after our last commit.
    genid: u32,
}

/// The IPVS load balancer: virtual services in each network namespace it is given.
#[derive(Debug)]
pub struct IpvsLoadBalancer {
    files: netns::NsFiles,
    nss: BTreeMap<NsRef, NsIpvs>,
}

fn object(ns: &NsRef) -> String {
    format!("IPVS services in {ns}")
}

impl IpvsLoadBalancer {
    /// Fails (with [`probe`]'s reason) when the calling thread's namespace has no IPVS.
    pub fn new(run_dir: impl Into<PathBuf>) -> PortResult<Self> {
        if let IpvsProbe::Absent(why) = probe() {
            return Err(PortError::new(
                "probe IPVS",
                "generic-netlink family IPVS",
                ErrorKind::NotFound,
                why,
            ));
        }
        Ok(Self {
            files: netns::NsFiles::new(run_dir)?,
            nss: BTreeMap::new(),
        })
    }

    fn ns_entry(&mut self, ns: &NsRef) -> PortResult<&mut NsIpvs> {
        if !self.nss.contains_key(ns) {
            let file = self.files.open(ns)?;
            let (genl, nf) = netns::run_in(&file, || Ok((GenlSocket::open()?, NfSocket::open()?)))
                .map_err(|e| PortError::io("open IPVS netlink sockets", ns.to_string(), e))?;
            self.nss.insert(
                ns.clone(),
                NsIpvs {
                    ns_file: file,
                    genl,
                    nf,
                    state: None,
                    timeouts_applied: None,
                    cursor: 0,
                },
            );
        }
        self.nss
            .get_mut(ns)
            .ok_or_else(|| PortError::new("open netns", ns.to_string(), ErrorKind::Other, "lost"))
    }
}

/// Sends one nftables transaction on the companion table; its message count.
fn commit_companion(nf: &mut NfSocket, ops: &[NftOp], ns: &NsRef) -> PortResult<usize> {
    if ops.is_empty() {
        return Ok(0);
    }
    let seq = nf.next_seq(0);
    let batch = encode_batch(ops, seq);
    nf.seq = batch.last_seq.wrapping_add(2);
    send_batch(nf, &batch, ops).map_err(|e| PortError {
        op: "apply IPVS companion table",
        object: format!("table ip {TABLE} in {ns}"),
        ..e
    })?;
    Ok(batch.messages())
}

/// Runs `reqs` in order; the first refusal is an error (later requests still ran: the kernel
/// handles every message of a datagram).
fn run_requests(genl: &mut GenlSocket, reqs: &[Request], ns: &NsRef) -> PortResult<usize> {
    let answers = genl
        .exchange(reqs)
        .map_err(|e| PortError::io("send IPVS requests", object(ns), e))?;
    let mut bytes = 0;
    for (r, a) in reqs.iter().zip(answers) {
        bytes += r.encode(genl.family, 0).len();
        if let Err(refused) = a {
            let err = io::Error::from_raw_os_error(refused.errno.errno());
            let mut e = PortError::io("apply IPVS request", object(ns), err);
            e.detail = format!("{:?}: {}", refused.request, e.detail);
            return Err(e);
        }
    }
    Ok(bytes)
}

impl NsIpvs {
    fn set_timeouts(&mut self, ns: &NsRef, t: Option<IdleTimeouts>) -> PortResult<()> {
        if self.timeouts_applied == Some(t) {
            return Ok(());
        }
        let ipvs = IpvsTimeouts {
            tcp: t.map_or(DEFAULT_TCP_TIMEOUT_S, |t| {
                u32::try_from(t.tcp_established.as_secs().max(1)).unwrap_or(u32::MAX)
            }),
            tcp_fin: 0,
            udp: t.map_or(0, |t| {
                u32::try_from(t.udp_stream.as_secs().max(1)).unwrap_or(u32::MAX)
            }),
        };
        self.genl
            .request(Request::SetConfig(ipvs))
            .map_err(|e| PortError::io("set IPVS timeouts", object(ns), e))?;
        if let Some(t) = t {
            super::conntrack::set_idle_timeouts(&self.ns_file, ns, t)?;
        }
        self.timeouts_applied = Some(t);
        Ok(())
    }

    fn apply(&mut self, ns: &NsRef, spec: &LbSpec) -> PortResult<ApplyStats> {
        let applied = self.state.take();
        let full = applied.is_none();
        if full {
            for (key, value) in IPVS_SYSCTLS {
                netns::write_sysctl(&self.ns_file, key, value)
                    .map_err(|e| PortError::io("set IPVS sysctl", format!("{key} in {ns}"), e))?;
            }
        }
        self.set_timeouts(ns, spec.timeouts)?;
        // `next`: the spec to remember, `genid`: ours from the last commit (incremental only).
        let (reqs, before, after, companion, services_changed, udp_gone, next, genid) =
            match applied {
                None => {
                    // Plan from what the kernel holds: adopts a previous netd's services.
                    let kernel = self
                        .genl
                        .dump()
                        .map_err(|e| PortError::io("dump IPVS services", object(ns), e))?;
                    let want = plan::desired(spec);
                    let reqs = plan::plan(&kernel, &want);
                    let udp_gone = plan::removed_udp(&kernel, &want);
                    // Services the plan touches (the dump also carries counters and values
                    // the plan ignores, so the states themselves are not compared).
                    let changed = reqs
                        .iter()
                        .filter_map(Request::service)
                        .collect::<std::collections::BTreeSet<_>>()
                        .len();
                    let (ops, companion) = Companion::plan_full(spec);
                    let next = spec.clone();
                    (
                        reqs,
                        ops,
                        Vec::new(),
                        companion,
                        changed,
                        udp_gone,
                        next,
                        None,
                    )
                }
                Some(Applied {
                    spec: mut old_spec,
                    mut companion,
                    genid,
                }) => {
                    let changes = diff(&old_spec, spec);
                    let mut old_part = IpvsState::default();
                    let mut new_part = IpvsState::default();
                    let pairs: Vec<_> = changes
                        .iter()
                        .map(|c| match c {
                            ServiceChange::Added(n) => (None, Some(*n)),
                            ServiceChange::Removed(o) => (Some(*o), None),
                            ServiceChange::Changed { old, new } => (Some(*old), Some(*new)),
                        })
                        .collect();
                    for (o, n) in &pairs {
                        if let Some(o) = o {
                            old_part.services.insert(o.key, plan::service_state(o));
                        }
                        if let Some(n) = n {
                            new_part.services.insert(n.key, plan::service_state(n));
                        }
                    }
                    let reqs = plan::plan(&old_part, &new_part);
                    let udp_gone = plan::removed_udp(&old_part, &new_part);
                    let ops = companion.plan_diff(pairs.iter().copied());
                    // Remember the new spec by patching the old one with the changed services
                    // only: a clone of 10,000 services costs more than the kernel work of a change.
                    let updates: Vec<_> = pairs
                        .iter()
                        .map(|(o, n)| (n.or(*o).map(|s| s.key), n.map(|n| (*n).clone())))
                        .collect();
                    let changed = changes.len();
                    for (key, n) in updates {
                        match (key, n) {
                            (Some(k), Some(n)) => {
                                old_spec.services.insert(k, n);
                            }
                            (Some(k), None) => {
                                old_spec.services.remove(&k);
                            }
                            _ => {}
                        }
                    }
                    old_spec.timeouts = spec.timeouts;
                    (
                        reqs,
                        ops.before,
                        ops.after,
                        companion,
                        changed,
                        udp_gone,
                        old_spec,
                        Some(genid),
                    )
                }
            };
        if reqs.is_empty() && before.is_empty() && after.is_empty() {
            // Nothing committed: our last generation stays the one to compare with.
            let genid = match genid {
                Some(g) => g,
                None => self
                    .nf
                    .genid()
                    .map_err(|e| PortError::io("get ruleset generation", object(ns), e))?,
            };
            self.state = Some(Applied {
                spec: next,
                companion,
                genid,
            });
            return Ok(ApplyStats {
                full,
                ..ApplyStats::default()
            });
        }
        // On any error below, `self.state` stays `None`: the next apply starts from a dump.
        let mut messages = commit_companion(&mut self.nf, &before, ns)?;
        let bytes = run_requests(&mut self.genl, &reqs, ns)?;
        messages += reqs.len();
        messages += commit_companion(&mut self.nf, &after, ns)?;
        if !udp_gone.is_empty() {
            self.nf
                .delete_udp_flows(&udp_gone)
                .map_err(|e| PortError::io("delete conntrack entries", object(ns), e))?;
        }
        let genid = self
            .nf
            .genid()
            .map_err(|e| PortError::io("get ruleset generation", object(ns), e))?;
        self.state = Some(Applied {
            spec: next,
            companion,
            genid,
        });
        Ok(ApplyStats {
            services_changed,
            messages,
            bytes,
            transactions: 1,
            full,
        })
    }

    fn observe(&mut self, ns: &NsRef) -> PortResult<LbObserved> {
        let Some(applied) = &self.state else {
            let services = self
                .genl
                .request(Request::DumpServices)
                .map_err(|e| PortError::io("dump IPVS services", object(ns), e))?;
            let table = self
                .nf
                .table_handle()
                .map_err(|e| PortError::io("get table", object(ns), e))?;
            return Ok(if services.is_empty() && table.is_none() {
                LbObserved::Absent
            } else {
                LbObserved::Drifted
            });
        };
        let genid = self
            .nf
            .genid()
            .map_err(|e| PortError::io("get ruleset generation", object(ns), e))?;
        let mut in_sync = genid == applied.genid;
        let n = applied.spec.services.len();
        if in_sync && n > 0 {
            let sample: Vec<_> = applied
                .spec
                .services
                .values()
                .cycle()
                .skip(self.cursor % n)
                .take(OBSERVE_SAMPLE.min(n))
                .collect();
            self.cursor = (self.cursor + OBSERVE_SAMPLE) % n;
            let mut reqs = Vec::new();
            for s in &sample {
                reqs.push(Request::GetService(s.key));
                reqs.push(Request::DumpDests(s.key));
            }
            let answers = self
                .genl
                .exchange(&reqs)
                .map_err(|e| PortError::io("get IPVS services", object(ns), e))?;
            for (s, pair) in sample.iter().zip(answers.chunks(2)) {
                let want = plan::service_state(s);
                let got_svc = match &pair[0] {
                    Ok(r) => r.iter().find_map(|r| match r {
                        Reply::Service(svc) => Some(svc.clone()),
                        _ => None,
                    }),
                    Err(_) => None,
                };
                let got_dests: Option<BTreeMap<_, _>> = match &pair[1] {
                    Ok(r) => Some(
                        r.iter()
                            .filter_map(|r| match r {
                                Reply::Dest(d) => Some(((d.addr, d.port), *d)),
                                _ => None,
                            })
                            .collect(),
                    ),
                    Err(_) => None,
                };
                let same = match (got_svc, got_dests) {
                    (Some(svc), Some(dests)) => {
                        let got = IpvsServiceState { svc, dests };
                        plan::plan(
                            &IpvsState {
                                services: [(s.key, got)].into(),
                            },
                            &IpvsState {
                                services: [(s.key, want)].into(),
                            },
                        )
                        .is_empty()
                    }
                    _ => false,
                };
                if !same {
                    in_sync = false;
                    break;
                }
            }
        }
        if in_sync {
            Ok(LbObserved::InSync)
        } else {
            self.state = None;
            Ok(LbObserved::Drifted)
        }
    }

    fn flush(&mut self, ns: &NsRef) -> PortResult<()> {
        self.genl
            .request(Request::Flush)
            .map_err(|e| PortError::io("flush IPVS services", object(ns), e))?;
        commit_companion(&mut self.nf, &[NftOp::AddTable, NftOp::DelTable], ns)?;
        self.state = None;
        Ok(())
    }
}

impl LoadBalancerPort for IpvsLoadBalancer {
    fn kind(&self) -> LbKind {
        LbKind::Ipvs
    }

    fn apply(&mut self, ns: &NsRef, spec: &LbSpec) -> PortResult<ApplyStats> {
        self.ns_entry(ns)?.apply(ns, spec)
    }

    fn observe(&mut self, ns: &NsRef) -> PortResult<LbObserved> {
        self.ns_entry(ns)?.observe(ns)
    }

    fn flush(&mut self, ns: &NsRef) -> PortResult<()> {
        let entry = match self.ns_entry(ns) {
            Ok(e) => e,
            // The namespace is gone, and its IPVS state with it.
            Err(e) if e.is_not_found() => {
                self.nss.remove(ns);
                return Ok(());
            }
            Err(e) => return Err(e),
        };
        entry.flush(ns)?;
        self.nss.remove(ns);
        Ok(())
    }

    fn namespaces(&self) -> Vec<NsRef> {
        self.nss
            .iter()
            .filter(|(_, e)| e.state.is_some())
            .map(|(ns, _)| ns.clone())
            .collect()
    }
}
