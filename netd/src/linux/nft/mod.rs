//! [`NftLoadBalancer`]: the nftables implementation of [`LoadBalancerPort`], talking
//! `NETLINK_NETFILTER` directly (no `nft` process, no ruleset listing).
//!
//! Per namespace: a netlink socket created on a thread that entered it (STYLE rule 6), the
//! last applied [`NftLbState`] in memory, the table's handle and the ruleset generation seen
//! after our last commit. `apply` plans the difference from that state (`crate::lb::nft_render`)
//! and sends it as one batch; the first apply to a namespace (or the first after drift)
//! replaces the table whole in the same single transaction. `observe` sends `GETGEN` (and
//! `GETTABLE` when the generation moved): two small requests, independent of the table size.
//!
//! Idle timeouts ([`crate::lb::IdleTimeouts`]) are conntrack sysctls of the namespace, written
//! when they change. When a backend leaves a UDP service, its conntrack entries for that
//! service are deleted after the batch commits (ctnetlink, `crate::linux::conntrack`), so the
//! client's next datagram is balanced anew; TCP entries stay (a removed backend's grace period
//! is over, and a connection still open to it ends with it).
//!
//! Invariants: a failed batch changes nothing in the kernel (nftables transactions are all or
//! nothing) and nothing in memory; after a failed batch the namespace is reprogrammed whole on
//! the next apply, in case the failure was a drift we did not see.

pub mod dns_redirect;
mod encode;

pub use encode::{Batch, encode_batch};

use std::collections::BTreeMap;
use std::fs::File;
use std::io;
use std::path::PathBuf;

use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_NETFILTER};

use super::netns;
use crate::lb::nft_render::{NftLbState, NftOp, render_script};
use crate::lb::{ApplyStats, LbKind, LbObserved, LbSpec, LoadBalancerPort};
use crate::port::{ErrorKind, NsRef, PortError, PortResult};

/// A `NETLINK_NETFILTER` socket bound to one namespace.
/// Shared with the IPVS backend's companion table (`crate::linux::ipvs`).
#[derive(Debug)]
pub(crate) struct NfSocket {
    sock: Socket,
    pub(crate) seq: u32,
    sndbuf: usize,
}

/// A reply to one of our messages.
#[derive(Debug)]
struct Reply {
    seq: u32,
    ty: u16,
    /// For NLMSG_ERROR: the errno (0 = ACK) and the extended-ACK message if any.
    error: Option<(i32, Option<String>)>,
    payload: Vec<u8>,
}

impl NfSocket {
    /// Opens a socket in the namespace of the calling thread.
    pub(crate) fn open() -> io::Result<Self> {
        let mut sock = Socket::new(NETLINK_NETFILTER)?;
        sock.bind_auto()?;
        sock.connect(&SocketAddr::new(0, 0))?;
        // Errors carry only the header of the failed message, plus the kernel's explanation.
        sock.set_cap_ack(true)?;
        sock.set_ext_ack(true)?;
        sock.set_rx_buf_sz(4 << 20)?;
        Ok(Self {
            sock,
            seq: 1,
            sndbuf: 0,
        })
    }

    pub(crate) fn next_seq(&mut self, n: u32) -> u32 {
        let s = self.seq;
        self.seq = self.seq.wrapping_add(n);
        s
    }

    /// Sends one datagram; the kernel processes it before `send` returns.
    fn send(&mut self, bytes: &[u8]) -> io::Result<()> {
        // A batch must be one datagram (one transaction), so the send buffer must hold it.
        if bytes.len() + 4096 > self.sndbuf {
            let want = (bytes.len() + 4096).next_power_of_two();
            nix::sys::socket::setsockopt(&self.sock, nix::sys::socket::sockopt::SndBufForce, &want)
                .map_err(io::Error::from)?;
            self.sndbuf = want;
        }
        let n = self.sock.send(bytes, 0)?;
        if n != bytes.len() {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                format!("netlink send wrote {n} of {} bytes", bytes.len()),
            ));
        }
        Ok(())
    }

    /// Reads replies until one for `until_seq` that ends it (ACK/error/DONE) arrives.
    fn recv_until(&mut self, until_seq: u32) -> io::Result<Vec<Reply>> {
        let mut out = Vec::new();
        // Bounded: the kernel answered before send returned; a few datagrams at most.
        for _ in 0..100_000 {
            let (data, _) = self.sock.recv_from_full()?;
            let mut off = 0;
            while off + 16 <= data.len() {
                let word = |at: usize| {
                    u32::from_ne_bytes([data[at], data[at + 1], data[at + 2], data[at + 3]])
                };
                let len = usize::try_from(word(off)).unwrap_or(usize::MAX);
                if len < 16 || off + len > data.len() {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "truncated netlink message",
                    ));
                }
                let ty = u16::from_ne_bytes([data[off + 4], data[off + 5]]);
                let flags = u16::from_ne_bytes([data[off + 6], data[off + 7]]);
                let seq = word(off + 8);
                let body = &data[off + 16..off + len];
                let error = if ty == encode::NLMSG_ERROR && body.len() >= 4 {
                    let code = i32::from_ne_bytes([body[0], body[1], body[2], body[3]]);
                    Some((code, ext_ack_msg(body, flags)))
                } else {
                    None
                };
                let last =
                    seq == until_seq && (ty == encode::NLMSG_ERROR || ty == encode::NLMSG_DONE);
                out.push(Reply {
                    seq,
                    ty,
                    error,
                    payload: body.to_vec(),
                });
                off += (len + 3) & !3;
                if last {
                    return Ok(out);
                }
            }
        }
        Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "no acknowledgement from the kernel",
        ))
    }

    /// A single request with an ACK: the replies before the ACK, or the kernel's error.
    fn request(&mut self, build: impl FnOnce(u32) -> Vec<u8>) -> io::Result<Vec<Reply>> {
        let seq = self.next_seq(1);
        self.send(&build(seq))?;
        let replies = self.recv_until(seq)?;
        let mut data = Vec::new();
        for r in replies {
            match r.error {
                Some((0, _)) => {}
                Some((code, _)) => return Err(io::Error::from_raw_os_error(-code)),
                None if r.seq == seq => data.push(r),
                None => {}
            }
        }
        Ok(data)
    }

    /// Deletes the conntrack entries of UDP flows to `vip:port` that a backend in `targets`
    /// (service, backend address, target port) answers; returns how many.
    pub(crate) fn delete_udp_flows(
        &mut self,
        targets: &[(crate::lb::ServiceKey, std::net::Ipv4Addr, u16)],
    ) -> io::Result<usize> {
        use super::conntrack;
        let seq = self.next_seq(1);
        self.send(&conntrack::encode_dump(seq))?;
        let mut doomed = Vec::new();
        for r in self.recv_until(seq)? {
            if let Some((code, _)) = r.error
                && code != 0
            {
                return Err(io::Error::from_raw_os_error(-code));
            }
            if !conntrack::is_entry(r.ty) {
                continue;
            }
            let Some(e) = conntrack::parse_entry(&r.payload) else {
                continue;
            };
            if e.orig.proto == 17
                && targets.iter().any(|(key, ip, port)| {
                    e.orig.dst == key.vip
                        && e.orig.dport == key.port
                        && e.reply.src == *ip
                        && e.reply.sport == *port
                })
            {
                doomed.push(e.orig);
            }
        }
        if doomed.is_empty() {
            return Ok(0);
        }
        let first = self.next_seq(u32::try_from(doomed.len()).unwrap_or(u32::MAX));
        let mut buf = Vec::new();
        for (i, t) in doomed.iter().enumerate() {
            let seq = first.wrapping_add(u32::try_from(i).unwrap_or(0));
            conntrack::encode_delete(&mut buf, seq, t);
        }
        self.send(&buf)?;
        let last = first.wrapping_add(u32::try_from(doomed.len() - 1).unwrap_or(0));
        // Every delete is acknowledged, in order: read until the last one's.
        for r in self.recv_until(last)? {
            match r.error {
                // ENOENT: gone already (the flow expired meanwhile).
                Some((code, _)) if code != 0 && -code != libc::ENOENT => {
                    return Err(io::Error::from_raw_os_error(-code));
                }
                _ => {}
            }
        }
        Ok(doomed.len())
    }

    /// The ruleset generation of this namespace.
    pub(crate) fn genid(&mut self) -> io::Result<u32> {
        let replies = self.request(encode::encode_get_gen)?;
        for r in &replies {
            if r.ty & 0xff == encode::NFT_MSG_NEWGEN {
                for (ty, v) in encode::parse_attrs(&r.payload) {
                    if ty == encode::NFTA_GEN_ID && v.len() == 4 {
                        return Ok(u32::from_be_bytes([v[0], v[1], v[2], v[3]]));
                    }
                }
            }
        }
        Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "no generation id in reply",
        ))
    }

    /// Our table's handle, or `None` when it does not exist.
    pub(crate) fn table_handle(&mut self) -> io::Result<Option<u64>> {
        let replies = match self.request(encode::encode_get_table) {
            Ok(r) => r,
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(None),
            Err(e) => return Err(e),
        };
        for r in &replies {
            for (ty, v) in encode::parse_attrs(&r.payload) {
                if ty == encode::NFTA_TABLE_HANDLE
                    && let Ok(b) = <[u8; 8]>::try_from(v)
                {
                    return Ok(Some(u64::from_be_bytes(b)));
                }
            }
        }
        Ok(Some(0))
    }
}

/// The extended-ACK message (NLMSGERR_ATTR_MSG) of an error reply, if the kernel sent one.
fn ext_ack_msg(body: &[u8], flags: u16) -> Option<String> {
    const NLM_F_ACK_TLVS: u16 = 0x200;
    const NLM_F_CAPPED: u16 = 0x100;
    if flags & NLM_F_ACK_TLVS == 0 {
        return None;
    }
    // errno + the original header (capped) or the whole original message.
    let orig_len = if flags & NLM_F_CAPPED != 0 || body.len() < 8 {
        16
    } else {
        usize::try_from(u32::from_ne_bytes([body[4], body[5], body[6], body[7]])).ok()?
    };
    let mut rest = body.get(4 + ((orig_len + 3) & !3)..)?;
    while rest.len() >= 4 {
        let len = usize::from(u16::from_ne_bytes([rest[0], rest[1]]));
        let ty = u16::from_ne_bytes([rest[2], rest[3]]);
        if len < 4 || len > rest.len() {
            break;
        }
        if ty == 1 {
            let s = &rest[4..len];
            let s = s.split(|b| *b == 0).next().unwrap_or_default();
            return Some(String::from_utf8_lossy(s).into_owned());
        }
        rest = rest.get((len + 3) & !3..).unwrap_or_default();
    }
    None
}

/// What we know about one namespace.
#[derive(Debug)]
struct NsLb {
    ns_file: File,
    sock: NfSocket,
    /// `None`: nothing applied yet, or the kernel may differ (drift, failed batch): the next
    /// apply replaces the table whole.
    state: Option<NftLbState>,
    handle: Option<u64>,
    genid: Option<u32>,
    timeouts_applied: Option<crate::lb::IdleTimeouts>,
}

/// The nftables load balancer: one owned table `ip swarmnet-lb` per namespace.
#[derive(Debug)]
pub struct NftLoadBalancer {
    files: netns::NsFiles,
    nss: BTreeMap<NsRef, NsLb>,
}

impl NftLoadBalancer {
    /// `NsRef::Node` is the namespace of the calling thread; owned namespaces are files under
    /// `<run_dir>/netns/`.
    pub fn new(run_dir: impl Into<PathBuf>) -> PortResult<Self> {
        Ok(Self {
            files: netns::NsFiles::new(run_dir)?,
            nss: BTreeMap::new(),
        })
    }

    fn ns_entry(&mut self, ns: &NsRef) -> PortResult<&mut NsLb> {
        if !self.nss.contains_key(ns) {
            let file = self.files.open(ns)?;
            let sock = netns::run_in(&file, NfSocket::open)
                .map_err(|e| PortError::io("open nfnetlink socket", ns.to_string(), e))?;
            self.nss.insert(
                ns.clone(),
                NsLb {
                    ns_file: file,
                    sock,
                    state: None,
                    handle: None,
                    genid: None,
                    timeouts_applied: None,
                },
            );
        }
        self.nss
            .get_mut(ns)
            .ok_or_else(|| PortError::new("open netns", ns.to_string(), ErrorKind::Other, "lost"))
    }

    /// Plans and sends one batch for `spec` (the rules; timeouts are sysctls).
    fn apply_rules(entry: &mut NsLb, ns: &NsRef, spec: &LbSpec) -> PortResult<ApplyStats> {
        let object = format!("table ip {} in {ns}", crate::lb::nft_render::TABLE);
        // Plan on the remembered state itself (no copy of a 10k-service spec per apply); if
        // the batch fails, the state is dropped and the next apply reprograms whole.
        let (ops, next, full, services_changed) = match entry.state.take() {
            Some(mut state) => {
                let (ops, changed) = state.plan_diff(spec);
                (ops, state, false, changed)
            }
            None => {
                let (ops, next) = NftLbState::plan_full(spec);
                (ops, next, true, spec.services.len())
            }
        };
        if ops.is_empty() {
            entry.state = Some(next);
            return Ok(ApplyStats {
                full,
                ..ApplyStats::default()
            });
        }
        let seq = entry.sock.next_seq(0);
        let batch = encode_batch(&ops, seq);
        entry.sock.seq = batch.last_seq.wrapping_add(2);
        let result = send_batch(&mut entry.sock, &batch, &ops);
        if let Err(e) = result {
            entry.state = None;
            return Err(PortError {
                op: "apply nftables batch",
                object,
                ..e
            });
        }
        let removed_udp = next.removed_udp.clone();
        entry.state = Some(next);
        if !removed_udp.is_empty() {
            entry
                .sock
                .delete_udp_flows(&removed_udp)
                .map_err(|e| PortError::io("delete conntrack entries", object.clone(), e))?;
        }
        if full {
            entry.handle = entry
                .sock
                .table_handle()
                .map_err(|e| PortError::io("get table", object.clone(), e))?;
        }
        entry.genid = Some(
            entry
                .sock
                .genid()
                .map_err(|e| PortError::io("get ruleset generation", object.clone(), e))?,
        );
        Ok(ApplyStats {
            services_changed,
            messages: batch.messages(),
            bytes: batch.bytes.len(),
            transactions: 1,
            full,
        })
    }
}

/// Sends a batch and checks every reply; an error names the op that failed.
pub(crate) fn send_batch(
    sock: &mut NfSocket,
    batch: &Batch,
    ops: &[NftOp],
) -> Result<(), PortError> {
    sock.send(&batch.bytes)
        .map_err(|e| PortError::io("send batch", String::new(), e))?;
    let replies = sock
        .recv_until(batch.last_seq)
        .map_err(|e| PortError::io("read batch replies", String::new(), e))?;
    for r in replies {
        if let Some((code, msg)) = r.error
            && code != 0
        {
            let errno = -code;
            let what = batch
                .op_of_seq(r.seq)
                .and_then(|i| ops.get(i))
                .map(|op| render_script(std::slice::from_ref(op)).trim().to_string())
                .unwrap_or_else(|| format!("message seq {}", r.seq));
            let io_err = io::Error::from_raw_os_error(errno);
            let mut err = PortError::io("", String::new(), io_err);
            err.detail = match msg {
                Some(m) => format!("{what}: {} ({m})", err.detail),
                None => format!("{what}: {}", err.detail),
            };
            return Err(err);
        }
    }
    Ok(())
}

impl LoadBalancerPort for NftLoadBalancer {
    fn kind(&self) -> LbKind {
        LbKind::Nftables
    }

    fn apply(&mut self, ns: &NsRef, spec: &LbSpec) -> PortResult<ApplyStats> {
        let entry = self.ns_entry(ns)?;
        if spec.timeouts != entry.timeouts_applied
            && let Some(t) = spec.timeouts
        {
            super::conntrack::set_idle_timeouts(&entry.ns_file, ns, t)?;
            entry.timeouts_applied = spec.timeouts;
        }
        Self::apply_rules(entry, ns, spec)
    }

    fn observe(&mut self, ns: &NsRef) -> PortResult<LbObserved> {
        let object = format!("table ip {} in {ns}", crate::lb::nft_render::TABLE);
        let entry = self.ns_entry(ns)?;
        let genid = entry
            .sock
            .genid()
            .map_err(|e| PortError::io("get ruleset generation", object.clone(), e))?;
        if entry.state.is_some() && entry.genid == Some(genid) {
            return Ok(LbObserved::InSync);
        }
        let handle = entry
            .sock
            .table_handle()
            .map_err(|e| PortError::io("get table", object.clone(), e))?;
        let observed = match (&entry.state, handle) {
            (None, None) => LbObserved::Absent,
            // Someone committed in this namespace since our last batch (or the table is not
            // ours to trust): reprogram it whole on the next apply.
            _ => LbObserved::Drifted,
        };
        if observed == LbObserved::Drifted {
            entry.state = None;
        }
        Ok(observed)
    }

    fn flush(&mut self, ns: &NsRef) -> PortResult<()> {
        let object = format!("table ip {} in {ns}", crate::lb::nft_render::TABLE);
        let entry = match self.ns_entry(ns) {
            Ok(e) => e,
            // The namespace is gone, and our table with it.
            Err(e) if e.is_not_found() => {
                self.nss.remove(ns);
                return Ok(());
            }
            Err(e) => return Err(e),
        };
        let ops = [NftOp::AddTable, NftOp::DelTable];
        let seq = entry.sock.next_seq(0);
        let batch = encode_batch(&ops, seq);
        entry.sock.seq = batch.last_seq.wrapping_add(2);
        send_batch(&mut entry.sock, &batch, &ops).map_err(|e| PortError {
            op: "delete table",
            object,
            ..e
        })?;
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

/// The nftables ruleset generation of the namespace `ns` (incremented by every committed
/// transaction there): lets tests check that one apply is one transaction.
pub fn ruleset_generation(ns: impl std::os::fd::AsFd + Send) -> io::Result<u32> {
    netns::run_in(ns, || NfSocket::open()?.genid())
}
