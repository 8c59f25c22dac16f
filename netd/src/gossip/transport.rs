//! A chitchat [`Transport`] that seals every datagram (see [`super::crypto`]).
//!
//! Layers, outermost first:
//! - [`SealedTransport`] implements chitchat's `Transport`; its sockets turn envelopes into
//!   frames and back.
//! - [`DatagramNet`] / [`DatagramSocket`]: where the frames travel. [`UdpNet`] is the real one;
//!   [`MemNet`] is an in-process network with partitions, capture/injection and fault
//!   injection, for tests. Chitchat's own `ChannelTransport` cannot be used underneath: it
//!   moves decoded envelopes, never bytes, so there is nothing to seal; `MemNet` plays its role
//!   one layer lower, and the same suite runs on both nets (STYLE rule 3).
//! - `EnvelopeCodec`: chitchat 0.13 keeps its wire codec private (`ChitchatEnvelope::serialize`
//!   is `pub(crate)`), so the envelope ↔ bytes step goes through chitchat's own public
//!   `transport::UdpSocket` and a private socket pair on 127.0.0.1: the bytes are exactly
//!   chitchat's, and a 3-line upstream change (making the codec public) would replace this
//!   struct alone. It needs `lo` up in the namespace netd runs in. Datagrams on the pair from
//!   any other address are ignored.
//!
//! Receiving runs on its own task: frames are authenticated, replay-checked, reassembled and
//! decoded there, and queued (bounded) for chitchat's loop. Anything refused is dropped and
//! counted in [`GossipCounters`] and never reaches chitchat. Socket errors are counted and
//! logged (rate-limited) and the loops go on: chitchat's server stops on the first `recv`
//! error, so ours never returns one while the socket lives.
//!
//! Frames are at most `max_datagram` bytes; a larger envelope (chitchat fills deltas up to
//! 65 507 bytes, to which sealing adds 49) is split into fragments, each sealed on its own and
//! reassembled with bounded memory: a frame claiming more fragments than a 65 507-byte
//! envelope needs is refused, at most `max_partial` envelopes are in reassembly at once and a
//! partial one is dropped after `partial_timeout`.
//!
//! Memory bounds per node (defaults; netd sets `max_datagram` to 1400): receive queue
//! `recv_queue` × one envelope (≤ 64 KiB each), reassembly `max_partial` × 64 KiB, replay
//! state `max_sessions` × 136 bytes. Only datagrams that authenticated reach reassembly and
//! the replay table, so without the key none of these can be filled.

use std::collections::{HashMap, HashSet, VecDeque};
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use chitchat::ChitchatEnvelope;
use chitchat::transport::{RecvOutcome, SendOutcome, Socket, Transport};
use tokio::sync::mpsc;
use tracing::warn;

use super::crypto::{FrameHeader, Keyring, OVERHEAD, OpenError, ReplayGuard, Sealer};

/// The largest UDP payload over IPv4, and chitchat's own limit.
pub const MAX_UDP_PAYLOAD: usize = 65_507;

/// Limits of the sealed transport. Defaults in one place ([`Default`]).
#[derive(Debug, Clone)]
pub struct TransportConfig {
    /// Largest frame sent or accepted, in bytes (≥ 512). Larger envelopes are fragmented;
    /// larger incoming datagrams are dropped. Set it below the underlay MTU (e.g. 1400) to
    /// avoid IP fragmentation.
    pub max_datagram: usize,
    /// Decoded envelopes waiting for chitchat's loop; beyond, datagrams are dropped.
    pub recv_queue: usize,
    /// How far a sender clock may be from ours.
    pub freshness: Duration,
    /// Sender sessions remembered by the replay guard.
    pub max_sessions: usize,
    /// Envelopes being reassembled at once, and how long a partial one is kept.
    pub max_partial: usize,
    pub partial_timeout: Duration,
}

impl Default for TransportConfig {
    fn default() -> Self {
        TransportConfig {
            max_datagram: MAX_UDP_PAYLOAD,
            recv_queue: 256,
            freshness: Duration::from_secs(60),
            max_sessions: 4096,
            max_partial: 64,
            partial_timeout: Duration::from_secs(2),
        }
    }
}

/// Counters of one node's gossip transport (all sockets opened by one [`SealedTransport`]).
#[derive(Debug, Default)]
pub struct GossipCounters {
    pub sent_datagrams: AtomicU64,
    pub sent_bytes: AtomicU64,
    pub recv_datagrams: AtomicU64,
    pub recv_bytes: AtomicU64,
    /// Envelopes handed to chitchat.
    pub delivered: AtomicU64,
    pub dropped_malformed: AtomicU64,
    pub dropped_unknown_key: AtomicU64,
    pub dropped_auth: AtomicU64,
    pub dropped_replay: AtomicU64,
    pub dropped_stale: AtomicU64,
    pub dropped_oversize: AtomicU64,
    pub dropped_queue_full: AtomicU64,
    pub dropped_sessions_full: AtomicU64,
    pub dropped_partial: AtomicU64,
    /// Authenticated plaintext chitchat could not decode (a peer bug, not an attack).
    pub dropped_undecodable: AtomicU64,
    pub send_errors: AtomicU64,
    pub recv_errors: AtomicU64,
    /// SYN envelopes sent and their encoded bytes: a SYN is chitchat's full digest (one entry
    /// per known node), so `sent_syn_bytes / sent_syn` shows how close the cluster is to the
    /// 65 507-byte wall (docs/gossip-scaling.md).
    pub sent_syn: AtomicU64,
    pub sent_syn_bytes: AtomicU64,
}

/// A copy of [`GossipCounters`] at one instant.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct CounterSnapshot {
    pub sent_datagrams: u64,
    pub sent_bytes: u64,
    pub recv_datagrams: u64,
    pub recv_bytes: u64,
    pub delivered: u64,
    pub dropped_malformed: u64,
    pub dropped_unknown_key: u64,
    pub dropped_auth: u64,
    pub dropped_replay: u64,
    pub dropped_stale: u64,
    pub dropped_oversize: u64,
    pub dropped_queue_full: u64,
    pub dropped_sessions_full: u64,
    pub dropped_partial: u64,
    pub dropped_undecodable: u64,
    pub send_errors: u64,
    pub recv_errors: u64,
    pub sent_syn: u64,
    pub sent_syn_bytes: u64,
}

impl GossipCounters {
    pub fn snapshot(&self) -> CounterSnapshot {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        CounterSnapshot {
            sent_datagrams: g(&self.sent_datagrams),
            sent_bytes: g(&self.sent_bytes),
            recv_datagrams: g(&self.recv_datagrams),
            recv_bytes: g(&self.recv_bytes),
            delivered: g(&self.delivered),
            dropped_malformed: g(&self.dropped_malformed),
            dropped_unknown_key: g(&self.dropped_unknown_key),
            dropped_auth: g(&self.dropped_auth),
            dropped_replay: g(&self.dropped_replay),
            dropped_stale: g(&self.dropped_stale),
            dropped_oversize: g(&self.dropped_oversize),
            dropped_queue_full: g(&self.dropped_queue_full),
            dropped_sessions_full: g(&self.dropped_sessions_full),
            dropped_partial: g(&self.dropped_partial),
            dropped_undecodable: g(&self.dropped_undecodable),
            send_errors: g(&self.send_errors),
            recv_errors: g(&self.recv_errors),
            sent_syn: g(&self.sent_syn),
            sent_syn_bytes: g(&self.sent_syn_bytes),
        }
    }

    fn count_refusal(&self, e: &OpenError) {
        let c = match e {
            OpenError::TooShort { .. } | OpenError::BadMagic | OpenError::BadFragment { .. } => {
                &self.dropped_malformed
            }
            OpenError::UnknownKey { .. } => &self.dropped_unknown_key,
            OpenError::Auth => &self.dropped_auth,
            OpenError::Replay { .. } => &self.dropped_replay,
            OpenError::Stale { .. } => &self.dropped_stale,
            OpenError::SessionTableFull => &self.dropped_sessions_full,
        };
        inc(c);
    }
}

impl CounterSnapshot {
    /// Every datagram refused for any reason.
    pub fn dropped_total(&self) -> u64 {
        self.dropped_malformed
            + self.dropped_unknown_key
            + self.dropped_auth
            + self.dropped_replay
            + self.dropped_stale
            + self.dropped_oversize
            + self.dropped_queue_full
            + self.dropped_sessions_full
            + self.dropped_partial
            + self.dropped_undecodable
    }
}

fn inc(c: &AtomicU64) -> u64 {
    c.fetch_add(1, Ordering::Relaxed) + 1
}

/// Logs the 1st, 2nd, 4th, 8th… occurrence only: container traffic must not flood the log.
fn rate_limited(n: u64) -> bool {
    n.is_power_of_two()
}

/// A datagram socket (bytes, not envelopes).
#[async_trait]
pub trait DatagramSocket: Send + Sync + 'static {
    fn local_addr(&self) -> io::Result<SocketAddr>;
    async fn send_to(&self, buf: &[u8], to: SocketAddr) -> io::Result<usize>;
    /// Like UDP: a datagram longer than `buf` is truncated, and the full length returned.
    async fn recv_from(&self, buf: &mut [u8]) -> io::Result<(usize, SocketAddr)>;
}

/// Where datagram sockets come from.
#[async_trait]
pub trait DatagramNet: Send + Sync + 'static {
    async fn bind(&self, addr: SocketAddr) -> io::Result<Arc<dyn DatagramSocket>>;
}

/// Real UDP sockets.
#[derive(Debug, Clone, Copy, Default)]
pub struct UdpNet;

#[derive(Debug)]
struct UdpDatagram(tokio::net::UdpSocket);

#[async_trait]
impl DatagramSocket for UdpDatagram {
    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.0.local_addr()
    }
    async fn send_to(&self, buf: &[u8], to: SocketAddr) -> io::Result<usize> {
        self.0.send_to(buf, to).await
    }
    async fn recv_from(&self, buf: &mut [u8]) -> io::Result<(usize, SocketAddr)> {
        self.0.recv_from(buf).await
    }
}

#[async_trait]
impl DatagramNet for UdpNet {
    async fn bind(&self, addr: SocketAddr) -> io::Result<Arc<dyn DatagramSocket>> {
        Ok(Arc::new(UdpDatagram(
            tokio::net::UdpSocket::bind(addr).await?,
        )))
    }
}

type MemDatagram = (Vec<u8>, SocketAddr);
/// A captured datagram: from, to, bytes.
pub type Captured = (SocketAddr, SocketAddr, Vec<u8>);
/// Parts of one envelope being reassembled, with when the first arrived.
type Partial = (Instant, Vec<Option<Vec<u8>>>);

#[derive(Default)]
struct MemInner {
    sockets: HashMap<SocketAddr, mpsc::Sender<MemDatagram>>,
    /// Directed links that drop everything.
    cut: HashSet<(SocketAddr, SocketAddr)>,
    capture: Option<(usize, Vec<Captured>)>,
    fail_sends: HashMap<SocketAddr, u32>,
    fail_recvs: HashMap<SocketAddr, u32>,
    delivered: u64,
    bytes: u64,
}

/// An in-process datagram network: bounded per-socket queues (full = drop, like UDP),
/// partitions, capture and injection of raw datagrams, and injected socket errors.
#[derive(Clone)]
pub struct MemNet {
    inner: Arc<Mutex<MemInner>>,
    queue: usize,
}

impl std::fmt::Debug for MemNet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemNet")
            .field("queue", &self.queue)
            .finish()
    }
}

impl Default for MemNet {
    fn default() -> Self {
        Self::new(128)
    }
}

impl MemNet {
    /// A network whose sockets queue at most `queue` datagrams.
    pub fn new(queue: usize) -> Self {
        MemNet {
            inner: Arc::default(),
            queue,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, MemInner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Drops datagrams between `a` and `b`, both ways.
    pub fn cut(&self, a: SocketAddr, b: SocketAddr) {
        let mut i = self.lock();
        i.cut.insert((a, b));
        i.cut.insert((b, a));
    }

    /// Restores the link between `a` and `b`.
    pub fn heal(&self, a: SocketAddr, b: SocketAddr) {
        let mut i = self.lock();
        i.cut.remove(&(a, b));
        i.cut.remove(&(b, a));
    }

    /// Restores every link.
    pub fn heal_all(&self) {
        self.lock().cut.clear();
    }

    /// Keeps a copy of the next `limit` datagrams sent.
    pub fn start_capture(&self, limit: usize) {
        self.lock().capture = Some((limit, Vec::new()));
    }

    /// Stops capturing and returns `(from, to, bytes)` of what was captured.
    pub fn take_captured(&self) -> Vec<Captured> {
        self.lock().capture.take().map(|c| c.1).unwrap_or_default()
    }

    /// Delivers raw bytes to `to` as if sent from `from` (ignores cuts). False if nobody
    /// listens there or its queue is full.
    pub fn inject(&self, from: SocketAddr, to: SocketAddr, bytes: Vec<u8>) -> bool {
        let i = self.lock();
        i.sockets
            .get(&to)
            .is_some_and(|tx| tx.try_send((bytes, from)).is_ok())
    }

    /// The next `n` sends from `addr` fail with an I/O error.
    pub fn fail_sends(&self, addr: SocketAddr, n: u32) {
        self.lock().fail_sends.insert(addr, n);
    }

    /// The next `n` receives on `addr` fail with an I/O error.
    pub fn fail_recvs(&self, addr: SocketAddr, n: u32) {
        self.lock().fail_recvs.insert(addr, n);
    }

    /// Datagrams and bytes delivered so far.
    pub fn delivered(&self) -> (u64, u64) {
        let i = self.lock();
        (i.delivered, i.bytes)
    }

    fn send(&self, from: SocketAddr, to: SocketAddr, buf: &[u8]) -> io::Result<usize> {
        let mut i = self.lock();
        if let Some(n) = i.fail_sends.get_mut(&from).filter(|n| **n > 0) {
            *n -= 1;
            return Err(io::Error::other("injected send failure"));
        }
        if let Some((limit, cap)) = i.capture.as_mut()
            && cap.len() < *limit
        {
            cap.push((from, to, buf.to_vec()));
        }
        if i.cut.contains(&(from, to)) {
            return Ok(buf.len());
        }
        let ok = i
            .sockets
            .get(&to)
            .is_some_and(|tx| tx.try_send((buf.to_vec(), from)).is_ok());
        if ok {
            i.delivered += 1;
            i.bytes += buf.len() as u64;
        }
        Ok(buf.len())
    }
}

struct MemSocket {
    net: MemNet,
    addr: SocketAddr,
    rx: tokio::sync::Mutex<mpsc::Receiver<MemDatagram>>,
}

impl Drop for MemSocket {
    fn drop(&mut self) {
        self.net.lock().sockets.remove(&self.addr);
    }
}

#[async_trait]
impl DatagramSocket for MemSocket {
    fn local_addr(&self) -> io::Result<SocketAddr> {
        Ok(self.addr)
    }
    async fn send_to(&self, buf: &[u8], to: SocketAddr) -> io::Result<usize> {
        self.net.send(self.addr, to, buf)
    }
    async fn recv_from(&self, buf: &mut [u8]) -> io::Result<(usize, SocketAddr)> {
        {
            let mut i = self.net.lock();
            if let Some(n) = i.fail_recvs.get_mut(&self.addr).filter(|n| **n > 0) {
                *n -= 1;
                return Err(io::Error::other("injected recv failure"));
            }
        }
        let (data, from) = self
            .rx
            .lock()
            .await
            .recv()
            .await
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotConnected, "memnet closed"))?;
        let n = data.len().min(buf.len());
        buf[..n].copy_from_slice(&data[..n]);
        Ok((data.len(), from))
    }
}

#[async_trait]
impl DatagramNet for MemNet {
    async fn bind(&self, mut addr: SocketAddr) -> io::Result<Arc<dyn DatagramSocket>> {
        let (tx, rx) = mpsc::channel(self.queue);
        let mut i = self.lock();
        if addr.port() == 0 {
            let port = (1024..=u16::MAX)
                .find(|p| !i.sockets.contains_key(&SocketAddr::new(addr.ip(), *p)))
                .ok_or_else(|| io::Error::new(io::ErrorKind::AddrInUse, "no free port"))?;
            addr.set_port(port);
        }
        if i.sockets.contains_key(&addr) {
            return Err(io::Error::new(io::ErrorKind::AddrInUse, addr.to_string()));
        }
        i.sockets.insert(addr, tx);
        drop(i);
        Ok(Arc::new(MemSocket {
            net: self.clone(),
            addr,
            rx: tokio::sync::Mutex::new(rx),
        }))
    }
}

/// What can go wrong opening a sealed socket.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("cannot bind the gossip socket on {addr}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("cannot open the envelope codec on 127.0.0.1 (is `lo` up in this namespace?)")]
    Codec {
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("the envelope codec did not answer within {0:?}")]
    CodecTimeout(Duration),
}

/// Loopback delivery is immediate, but on a starved runtime the reactor may report it late.
/// Only a key holder can send bytes that authenticate and then fail to decode, so a long wait
/// costs nothing an outsider can trigger.
const CODEC_TIMEOUT: Duration = Duration::from_millis(500);

/// Envelope ↔ chitchat wire bytes, through chitchat's public UDP socket (see module doc).
struct EnvelopeCodec {
    cc: chitchat::transport::UdpSocket,
    cc_addr: SocketAddr,
    /// A plain non-blocking socket, read with direct syscalls: loopback delivers a datagram
    /// into the receiver's buffer during the sender's syscall, so the encoded bytes are there
    /// as soon as chitchat's send returns, without waiting for the runtime's reactor. That
    /// matters: chitchat's loop awaits every send, and a reactor turn per send on a busy
    /// runtime is what stalled it (measured: a 100-node bench on two busy cores lost
    /// envelopes by the thousand).
    raw: std::net::UdpSocket,
    raw_addr: SocketAddr,
    buf: Vec<u8>,
}

impl EnvelopeCodec {
    async fn open() -> Result<Self, TransportError> {
        let lo: SocketAddr = ([127, 0, 0, 1], 0).into();
        let codec =
            |e: Box<dyn std::error::Error + Send + Sync>| TransportError::Codec { source: e };
        let cc = chitchat::transport::UdpSocket::open(lo)
            .await
            .map_err(|e| codec(e.into()))?;
        let cc_addr = cc.local_addr().map_err(|e| codec(e.into()))?;
        let raw = std::net::UdpSocket::bind(lo).map_err(|e| codec(e.into()))?;
        raw.set_nonblocking(true).map_err(|e| codec(e.into()))?;
        let raw_addr = raw.local_addr().map_err(|e| codec(e.into()))?;
        Ok(EnvelopeCodec {
            cc,
            cc_addr,
            raw,
            raw_addr,
            buf: vec![0; MAX_UDP_PAYLOAD + 1],
        })
    }

    async fn encode(&mut self, envelope: ChitchatEnvelope) -> Result<Vec<u8>, TransportError> {
        // Drop anything left over (a reply that came after a timeout) so bytes never pair
        // with the wrong envelope.
        while self.raw.recv_from(&mut self.buf).is_ok() {}
        self.cc
            .send(self.raw_addr, envelope)
            .await
            .map_err(|e| TransportError::Codec { source: e.into() })?;
        let deadline = Instant::now() + CODEC_TIMEOUT;
        loop {
            match self.raw.recv_from(&mut self.buf) {
                Ok((n, from)) if from == self.cc_addr => return Ok(self.buf[..n].to_vec()),
                Ok(_) => {}
                // Not there yet (delivery deferred to a softirq): let others run, retry.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if Instant::now() > deadline {
                        return Err(TransportError::CodecTimeout(CODEC_TIMEOUT));
                    }
                    tokio::task::yield_now().await;
                }
                Err(e) => return Err(TransportError::Codec { source: e.into() }),
            }
        }
    }

    async fn decode(&mut self, bytes: &[u8]) -> Result<ChitchatEnvelope, TransportError> {
        self.raw
            .send_to(bytes, self.cc_addr)
            .map_err(|e| TransportError::Codec { source: e.into() })?;
        let fut = async {
            loop {
                let out = self.cc.recv().await?;
                if out.from_addr == self.raw_addr {
                    return Ok::<_, anyhow::Error>(out.envelope);
                }
            }
        };
        // Chitchat's socket silently skips bytes it cannot decode, so a timeout means
        // "undecodable" (see CODEC_TIMEOUT). A reply that arrives after its time-out would be
        // taken by the next decode: it is still an authenticated envelope, only its sender
        // address would be the next datagram's.
        match tokio::time::timeout(CODEC_TIMEOUT, fut).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(TransportError::Codec { source: e.into() }),
            Err(_) => Err(TransportError::CodecTimeout(CODEC_TIMEOUT)),
        }
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Chitchat transport sealing every datagram under the keyring.
#[derive(Clone)]
pub struct SealedTransport {
    net: Arc<dyn DatagramNet>,
    keyring: Keyring,
    config: TransportConfig,
    counters: Arc<GossipCounters>,
}

impl std::fmt::Debug for SealedTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SealedTransport")
            .field("keyring", &self.keyring)
            .field("config", &self.config)
            .finish()
    }
}

impl SealedTransport {
    pub fn new(net: Arc<dyn DatagramNet>, keyring: Keyring, config: TransportConfig) -> Self {
        SealedTransport {
            net,
            keyring,
            config,
            counters: Arc::default(),
        }
    }

    /// Counters shared by every socket this transport opens.
    pub fn counters(&self) -> Arc<GossipCounters> {
        self.counters.clone()
    }

    pub fn keyring(&self) -> &Keyring {
        &self.keyring
    }

    /// Opens a sealed socket (what chitchat's `Transport::open` calls), with a typed error.
    pub async fn open_sealed(&self, addr: SocketAddr) -> Result<SealedSocket, TransportError> {
        let sock = self
            .net
            .bind(addr)
            .await
            .map_err(|source| TransportError::Bind { addr, source })?;
        let local = sock
            .local_addr()
            .map_err(|source| TransportError::Bind { addr, source })?;
        let send_codec = EnvelopeCodec::open().await?;
        let recv_codec = EnvelopeCodec::open().await?;
        let (tx, rx) = mpsc::channel(self.config.recv_queue.max(1));
        let receiver = Receiver {
            sock: sock.clone(),
            keyring: self.keyring.clone(),
            guard: ReplayGuard::new(
                self.config.max_sessions,
                self.config.freshness.as_millis() as u64,
            ),
            partial: Reassembly::default(),
            codec: recv_codec,
            tx,
            counters: self.counters.clone(),
            config: self.config.clone(),
        };
        let task = tokio::spawn(receiver.run());
        Ok(SealedSocket {
            sock,
            local,
            keyring: self.keyring.clone(),
            sealer: Sealer::new(rand::random()),
            codec: send_codec,
            rx,
            task,
            counters: self.counters.clone(),
            max_datagram: self.config.max_datagram.clamp(512, MAX_UDP_PAYLOAD),
        })
    }
}

#[async_trait]
impl Transport for SealedTransport {
    async fn open(&self, listen_addr: SocketAddr) -> anyhow::Result<Box<dyn Socket>> {
        Ok(Box::new(self.open_sealed(listen_addr).await?))
    }
}

/// One sealed socket; chitchat owns it through `Box<dyn Socket>`.
pub struct SealedSocket {
    sock: Arc<dyn DatagramSocket>,
    local: SocketAddr,
    keyring: Keyring,
    sealer: Sealer,
    codec: EnvelopeCodec,
    rx: mpsc::Receiver<RecvOutcome>,
    task: tokio::task::JoinHandle<()>,
    counters: Arc<GossipCounters>,
    max_datagram: usize,
}

impl std::fmt::Debug for SealedSocket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SealedSocket")
            .field("local", &self.local)
            .field("session", &format_args!("{:x}", self.sealer.session()))
            .finish()
    }
}

impl Drop for SealedSocket {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[async_trait]
impl Socket for SealedSocket {
    fn local_addr(&self) -> anyhow::Result<SocketAddr> {
        Ok(self.local)
    }

    async fn send(
        &mut self,
        to: SocketAddr,
        envelope: ChitchatEnvelope,
    ) -> anyhow::Result<SendOutcome> {
        let syn = matches!(envelope.message, chitchat::ChitchatMessage::Syn { .. });
        let plain = match self.codec.encode(envelope).await {
            Ok(p) => p,
            Err(e) => {
                let n = inc(&self.counters.send_errors);
                if rate_limited(n) {
                    warn!(error = %e, count = n, "gossip: cannot encode an envelope; dropped");
                }
                return Ok(SendOutcome { num_bytes_sent: 0 });
            }
        };
        if syn {
            inc(&self.counters.sent_syn);
            self.counters
                .sent_syn_bytes
                .fetch_add(plain.len() as u64, Ordering::Relaxed);
        }
        let chunk = self.max_datagram - OVERHEAD;
        let count = plain.len().div_ceil(chunk).max(1);
        if count > usize::from(u8::MAX) {
            inc(&self.counters.dropped_oversize);
            return Ok(SendOutcome { num_bytes_sent: 0 });
        }
        let sent_ms = now_ms();
        let mut total = 0;
        for (i, part) in plain
            .chunks(chunk)
            .chain(plain.is_empty().then_some(&[][..]))
            .enumerate()
        {
            let header = self.sealer.next_header(sent_ms, i as u8, count as u8);
            let frame = self.keyring.seal(header, part);
            match self.sock.send_to(&frame, to).await {
                Ok(n) => {
                    total += n;
                    inc(&self.counters.sent_datagrams);
                    self.counters
                        .sent_bytes
                        .fetch_add(n as u64, Ordering::Relaxed);
                }
                Err(e) => {
                    // Transient (ENOBUFS, EPERM from a firewall, unreachable): chitchat retries
                    // on its next round. Never an error to chitchat, whose loop would stop.
                    let n = inc(&self.counters.send_errors);
                    if rate_limited(n) {
                        warn!(error = %e, to = %to, count = n, "gossip: send failed");
                    }
                    break;
                }
            }
        }
        Ok(SendOutcome {
            num_bytes_sent: total,
        })
    }

    async fn recv(&mut self) -> anyhow::Result<RecvOutcome> {
        // Cancel-safe: chitchat polls this in a select!.
        match self.rx.recv().await {
            Some(out) => Ok(out),
            // The receive task never ends while the socket lives; if it panicked, waiting
            // forever (and gossiping out) beats killing chitchat's loop.
            None => std::future::pending().await,
        }
    }
}

#[derive(Default)]
struct Reassembly {
    /// (session, counter of fragment 0) → parts.
    partial: HashMap<(u64, u64), Partial>,
    order: VecDeque<(u64, u64)>,
}

impl Reassembly {
    /// Adds one authenticated fragment; returns the whole payload when complete.
    fn add(
        &mut self,
        h: &FrameHeader,
        part: Vec<u8>,
        config: &TransportConfig,
        counters: &GossipCounters,
    ) -> Option<Vec<u8>> {
        let (session, counter, index, count) = (h.session, h.counter, h.frag_index, h.frag_count);
        if count == 1 {
            return Some(part);
        }
        // No honest sender splits an envelope (at most MAX_UDP_PAYLOAD bytes) into more
        // frames than that needs: this bounds one reassembly to about 64 KiB, and all of
        // them to `max_partial` × that.
        let chunk = config.max_datagram.clamp(512, MAX_UDP_PAYLOAD) - OVERHEAD;
        if usize::from(count) > MAX_UDP_PAYLOAD.div_ceil(chunk) {
            inc(&counters.dropped_malformed);
            return None;
        }
        let now = Instant::now();
        let key = (session, counter.wrapping_sub(u64::from(index)));
        // Expire, then bound.
        while let Some(k) = self.order.front().copied() {
            let expired = self
                .partial
                .get(&k)
                .is_none_or(|(t, _)| now.duration_since(*t) > config.partial_timeout);
            let full = self.partial.len() >= config.max_partial && !self.partial.contains_key(&key);
            if !(expired || full) {
                break;
            }
            self.order.pop_front();
            if self.partial.remove(&k).is_some() {
                inc(&counters.dropped_partial);
            }
        }
        let entry = self.partial.entry(key).or_insert_with(|| {
            self.order.push_back(key);
            (now, vec![None; usize::from(count)])
        });
        if entry.1.len() != usize::from(count) {
            inc(&counters.dropped_malformed);
            return None;
        }
        entry.1[usize::from(index)] = Some(part);
        if entry.1.iter().all(Option::is_some) {
            let (_, parts) = self.partial.remove(&key)?;
            self.order.retain(|k| *k != key);
            return Some(parts.into_iter().flatten().flatten().collect());
        }
        None
    }
}

struct Receiver {
    sock: Arc<dyn DatagramSocket>,
    keyring: Keyring,
    guard: ReplayGuard,
    partial: Reassembly,
    codec: EnvelopeCodec,
    tx: mpsc::Sender<RecvOutcome>,
    counters: Arc<GossipCounters>,
    config: TransportConfig,
}

impl Receiver {
    async fn run(mut self) {
        let mut buf = vec![0u8; MAX_UDP_PAYLOAD + 1];
        loop {
            let (n, from) = match self.sock.recv_from(&mut buf).await {
                Ok(r) => r,
                Err(e) => {
                    let n = inc(&self.counters.recv_errors);
                    if rate_limited(n) {
                        warn!(error = %e, count = n, "gossip: recv failed; continuing");
                    }
                    // A persistent error must not spin a core.
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            };
            inc(&self.counters.recv_datagrams);
            self.counters
                .recv_bytes
                .fetch_add(n as u64, Ordering::Relaxed);
            if n > self.config.max_datagram || n > MAX_UDP_PAYLOAD {
                inc(&self.counters.dropped_oversize);
                continue;
            }
            if let Some(out) = self.accept(&buf[..n], from).await
                && let Err(e) = self.tx.try_send(out)
            {
                if matches!(e, mpsc::error::TrySendError::Closed(_)) {
                    return;
                }
                inc(&self.counters.dropped_queue_full);
            }
        }
    }

    async fn accept(&mut self, datagram: &[u8], from: SocketAddr) -> Option<RecvOutcome> {
        let refuse = |c: &GossipCounters, e: OpenError| {
            c.count_refusal(&e);
            None
        };
        let (h, plain) = match self.keyring.open(datagram) {
            Ok(v) => v,
            Err(e) => return refuse(&self.counters, e),
        };
        if let Err(e) = self.guard.check_and_record(&h, now_ms()) {
            return refuse(&self.counters, e);
        }
        let whole = self.partial.add(&h, plain, &self.config, &self.counters)?;
        match self.codec.decode(&whole).await {
            Ok(envelope) => {
                inc(&self.counters.delivered);
                Some(RecvOutcome {
                    from_addr: from,
                    envelope,
                    num_bytes_received: datagram.len(),
                })
            }
            Err(e) => {
                let n = inc(&self.counters.dropped_undecodable);
                if rate_limited(n) {
                    warn!(error = %e, from = %from, count = n, "gossip: authenticated but undecodable");
                }
                None
            }
        }
    }
}
