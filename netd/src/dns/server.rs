//! The resolver runtime: one UDP loop and one TCP accept loop per sandbox, on a tokio runtime
//! the server owns, fed by [`DnsServer::set_sandboxes`] from the (synchronous) daemon loop.
//!
//! Per sandbox: sockets bound to 127.0.0.11:53 inside its namespace, an `ArcSwap` of its view
//! and forwarding policy (a new view is visible to the very next query), a semaphore of
//! in-flight forwards and one of TCP connections. Isolation between sandboxes comes from
//! separate sockets (a flood fills only its own receive buffer), separate tasks (the UDP loop
//! yields every [`UDP_BATCH`] datagrams) and separate caps; nothing is shared but the runtime.
//!
//! Logs that container traffic can trigger (send errors, caps reached, upstream failures) go
//! through a per-sandbox limiter: one line per [`LOG_INTERVAL`] with the count suppressed.
//!
//! Invariants: removing a sandbox aborts its loops, which drop their sockets and every task
//! they spawned (forwards, TCP connections live in `JoinSet`s owned by the loops), so the
//! address is free again at once; opening a sandbox that fails is reported and retried on the
//! next call, never half-registered.

use std::collections::BTreeMap;
use std::net::{SocketAddr, SocketAddrV4};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use swarmnet_model::{Intent, TaskId};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::{JoinHandle, JoinSet};

use super::forward::{self, DenyAnswer, ForwardConfig, ForwardPolicy};
use super::redirect::{self, DnsRedirect, DnsRedirectPort};
use super::view::{DnsView, ViewOptions};
use super::{Outcome, RESOLVER_ADDR, Responder, Transport, full, wire};
use crate::linux::dns_socket::{self, NetnsSockets, SocketFactory};
use crate::linux::nft::dns_redirect::LinuxDnsRedirect;
use crate::linux::udp_batch::UdpBatch;

/// Datagrams handled before the UDP loop yields to other sandboxes' loops.
pub const UDP_BATCH: usize = 64;
/// At most one log line per sandbox and kind in this interval.
pub const LOG_INTERVAL: Duration = Duration::from_secs(10);

/// Operator knobs; defaults in one place.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DnsServerConfig {
    /// Where the resolver listens inside each sandbox.
    pub listen: SocketAddrV4,
    /// Runtime worker threads.
    pub worker_threads: usize,
    pub forward: ForwardConfig,
    /// Per sandbox; past it, queries that need forwarding get SERVFAIL at once. Docker caps
    /// 1,024 for the whole daemon; per sandbox, one flooding container cannot take the rest.
    pub max_inflight_forwards: usize,
    /// Per sandbox; past it, new connections are closed at once (CVE-2024-8418-style
    /// exhaustion stays inside the offending sandbox).
    pub max_tcp_connections: usize,
    /// A TCP connection idle (or sending a message slowly) this long is closed.
    pub tcp_idle_timeout: Duration,
    /// Bind the sockets to random ports of `listen`'s address and redirect `listen` to them in
    /// the sandbox (Docker's way), so a task may bind port 53 itself. Off: bind `listen`.
    pub redirect: bool,
    /// CPUs the runtime's threads are pinned to (bit i = CPU i); 0: not pinned. Only the
    /// resolver runs on these threads (sockets' loops, forwards, TCP connections): netd's
    /// reconcile loop, API and gossip have threads of their own, so with netd itself pinned
    /// elsewhere the resolver has its CPUs to itself.
    pub cpu_mask: u64,
}

impl Default for DnsServerConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddrV4::new(RESOLVER_ADDR, 53),
            worker_threads: 1,
            forward: ForwardConfig::default(),
            max_inflight_forwards: 256,
            max_tcp_connections: 32,
            tcp_idle_timeout: Duration::from_secs(10),
            redirect: true,
            cpu_mask: 0,
        }
    }
}

/// What the server needs for one sandbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SandboxDns {
    /// The sandbox's network namespace file.
    pub netns: PathBuf,
    pub view: Arc<DnsView>,
    pub forward: ForwardPolicy,
}

impl SandboxDns {
    /// The usual construction from the intent: view and policy of `task`.
    pub fn for_task(
        intent: &Intent,
        task: &TaskId,
        netns: PathBuf,
        opts: &ViewOptions,
        upstreams: &[SocketAddr],
        deny: DenyAnswer,
    ) -> Self {
        Self {
            netns,
            view: Arc::new(DnsView::build(intent, task, opts)),
            forward: ForwardPolicy::for_task(intent, task, upstreams, deny),
        }
    }
}

/// One sandbox's resolver as `inspect` shows it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct SandboxDnsInspect {
    /// The sockets' addresses inside the sandbox (`udp 127.0.0.11:53`, `tcp ...`).
    pub listen: Vec<String>,
    /// The redirect of 127.0.0.11:53 to the sockets, when on.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub redirect: Option<RedirectInspect>,
    pub ttl: u32,
    /// What names outside the cluster get.
    pub other_names: String,
    /// Name → records, as answered now.
    pub records: BTreeMap<String, Vec<String>>,
    pub stats: SandboxStatsSnapshot,
}

/// A sandbox's redirect table as `inspect` shows it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct RedirectInspect {
    pub rules: Vec<String>,
    /// Whether the table is in the kernel now (`None`: could not be read).
    pub in_kernel: Option<bool>,
    /// What differs from `rules` in the kernel (a missing table, a changed, missing or foreign
    /// rule), restored by the next full round; absent when the kernel holds exactly `rules`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub drift: Option<String>,
}

/// A sandbox whose resolver could not be started (it is retried on the next call).
#[derive(Debug, thiserror::Error)]
#[error("cannot open the DNS sockets of sandbox {task} in {}", netns.display())]
pub struct SandboxDnsError {
    pub task: TaskId,
    pub netns: PathBuf,
    #[source]
    pub source: std::io::Error,
}

/// The server could not start.
#[derive(Debug, thiserror::Error)]
#[error("cannot start the DNS server: {what}")]
pub struct DnsStartError {
    pub what: &'static str,
    #[source]
    pub source: std::io::Error,
}

/// Counters of one sandbox, for status and tests.
#[derive(Debug, Default)]
pub struct SandboxStats {
    pub udp_queries: AtomicU64,
    pub tcp_queries: AtomicU64,
    pub forwarded: AtomicU64,
    pub forward_failed: AtomicU64,
    /// Queries answered SERVFAIL because the in-flight forward cap was reached.
    pub forward_cap_hit: AtomicU64,
    /// TCP connections closed at once because of the connection cap.
    pub tcp_cap_hit: AtomicU64,
}

/// A snapshot of [`SandboxStats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct SandboxStatsSnapshot {
    pub udp_queries: u64,
    pub tcp_queries: u64,
    pub forwarded: u64,
    pub forward_failed: u64,
    pub forward_cap_hit: u64,
    pub tcp_cap_hit: u64,
}

#[derive(Debug)]
struct LogLimiter {
    next: Mutex<Instant>,
    suppressed: AtomicU64,
}

impl LogLimiter {
    fn new() -> Self {
        Self {
            next: Mutex::new(Instant::now()),
            suppressed: AtomicU64::new(0),
        }
    }
    /// `Some(suppressed since the last line)` when a line may be logged now.
    fn allow(&self) -> Option<u64> {
        let now = Instant::now();
        let mut next = self
            .next
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if now >= *next {
            *next = now + LOG_INTERVAL;
            Some(self.suppressed.swap(0, Ordering::Relaxed))
        } else {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            None
        }
    }
}

#[derive(Debug)]
struct Shared {
    task: TaskId,
    view: ArcSwap<DnsView>,
    policy: ArcSwap<ForwardPolicy>,
    forwards: Arc<Semaphore>,
    tcp: Arc<Semaphore>,
    sockets: NetnsSockets,
    cfg: DnsServerConfig,
    log: LogLimiter,
    stats: SandboxStats,
}

impl Shared {
    fn warn(&self, what: &str, err: &dyn std::fmt::Display) {
        if let Some(suppressed) = self.log.allow() {
            tracing::warn!(task = %self.task, suppressed, error = %err, "dns: {what}");
        }
    }
}

#[derive(Debug)]
struct Running {
    netns: PathBuf,
    /// `udp <addr>` and `tcp <addr>` of the sockets, for `inspect`.
    listen: Vec<String>,
    /// The redirect of the listen address to the sockets, in the sandbox (`redirect` on).
    redirect: Option<DnsRedirect>,
    /// The namespace's ruleset generation when the redirect was last checked.
    redirect_genid: Option<u32>,
    shared: Arc<Shared>,
    loops: Vec<JoinHandle<()>>,
}

impl Drop for Running {
    fn drop(&mut self) {
        for l in &self.loops {
            l.abort();
        }
    }
}

/// The embedded resolver of every sandbox on this node.
#[derive(Debug)]
pub struct DnsServer {
    rt: Option<tokio::runtime::Runtime>,
    factory: SocketFactory,
    cfg: DnsServerConfig,
    running: BTreeMap<TaskId, Running>,
    /// The redirect of 127.0.0.11:53 in each sandbox (`redirect` on).
    redirects: Box<dyn DnsRedirectPort>,
}

impl DnsServer {
    /// Starts the runtime and the socket factory thread. Serves no sandbox yet.
    pub fn start(cfg: DnsServerConfig) -> Result<Self, DnsStartError> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(cfg.worker_threads.max(1))
            .thread_name("sn-dns")
            .on_thread_start(move || pin_current_thread(cfg.cpu_mask))
            .enable_io()
            .enable_time()
            .build()
            .map_err(|source| DnsStartError {
                what: "tokio runtime",
                source,
            })?;
        let factory = SocketFactory::start().map_err(|source| DnsStartError {
            what: "socket factory thread",
            source,
        })?;
        Ok(Self {
            rt: Some(rt),
            factory,
            cfg,
            running: BTreeMap::new(),
            redirects: Box::new(LinuxDnsRedirect),
        })
    }

    pub fn config(&self) -> &DnsServerConfig {
        &self.cfg
    }

    /// Makes the served sandboxes exactly `want`: opens sockets for new ones, closes removed
    /// ones (and ones whose namespace path changed), swaps the view and policy of the others
    /// atomically. Returns the sandboxes that could not be opened; they are not served and
    /// are tried again on the next call.
    pub fn set_sandboxes(&mut self, want: BTreeMap<TaskId, SandboxDns>) -> Vec<SandboxDnsError> {
        self.running.retain(|task, r| {
            let keep = want.get(task).is_some_and(|w| w.netns == r.netns);
            if !keep && r.redirect.is_some() {
                // The namespace usually goes with the sandbox (and the table with it); an
                // attached container's namespace outlives it: leave nothing behind there.
                if let Err(e) = self.redirects.delete(&r.netns) {
                    tracing::warn!(task = %task, error = %e, "dns: cannot remove the redirect table");
                }
            }
            keep
        });
        let mut errors = Vec::new();
        for (task, sb) in want {
            if let Some(r) = self.running.get(&task) {
                if !Arc::ptr_eq(&r.shared.view.load(), &sb.view) {
                    r.shared.view.store(sb.view);
                }
                if **r.shared.policy.load() != sb.forward {
                    r.shared.policy.store(Arc::new(sb.forward));
                }
                continue;
            }
            match self.open(&task, sb) {
                Ok(r) => {
                    tracing::info!(task = %task, netns = %r.netns.display(), "dns: serving sandbox");
                    self.running.insert(task, r);
                }
                Err(e) => errors.push(e),
            }
        }
        errors
    }

    /// The sandboxes served now.
    pub fn sandboxes(&self) -> impl Iterator<Item = &TaskId> {
        self.running.keys()
    }

    /// Counters of a served sandbox.
    pub fn stats(&self, task: &TaskId) -> Option<SandboxStatsSnapshot> {
        let s = &self.running.get(task)?.shared.stats;
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        Some(SandboxStatsSnapshot {
            udp_queries: g(&s.udp_queries),
            tcp_queries: g(&s.tcp_queries),
            forwarded: g(&s.forwarded),
            forward_failed: g(&s.forward_failed),
            forward_cap_hit: g(&s.forward_cap_hit),
            tcp_cap_hit: g(&s.tcp_cap_hit),
        })
    }

    /// Checks every served sandbox's redirect table and restores it where its rules differ from
    /// what was applied (a foreign flush, delete or edit). The rules are read back only when the
    /// namespace's ruleset generation moved since the last check (our other tables' commits move
    /// it too; then the read finds nothing to do). Returns the sandboxes that had drifted, with
    /// what differed.
    pub fn repair_redirect(&mut self) -> Vec<(TaskId, String)> {
        let mut repaired = Vec::new();
        for (task, r) in &mut self.running {
            let Some(want) = r.redirect else { continue };
            let generation = match self.redirects.generation(&r.netns) {
                Ok(g) => g,
                Err(e) => {
                    tracing::warn!(task = %task, error = %e, "dns: cannot read the redirect table");
                    continue;
                }
            };
            if r.redirect_genid == Some(generation) {
                continue;
            }
            let drift = match self.redirects.read(&r.netns) {
                Ok(seen) => redirect::drift(&want, seen.as_deref()),
                Err(e) => {
                    tracing::warn!(task = %task, error = %e, "dns: cannot read the redirect table");
                    continue;
                }
            };
            let Some(drift) = drift else {
                r.redirect_genid = Some(generation);
                continue;
            };
            tracing::warn!(task = %task, drift = %drift, "dns: redirect table drifted; restoring");
            match self
                .redirects
                .ensure(&r.netns, &want)
                .and_then(|()| self.redirects.generation(&r.netns))
            {
                Ok(generation) => r.redirect_genid = Some(generation),
                Err(e) => {
                    r.redirect_genid = None;
                    tracing::warn!(task = %task, error = %e, "dns: cannot restore the redirect table");
                }
            }
            repaired.push((task.clone(), drift));
        }
        repaired
    }

    /// Sandboxes whose redirect table differs from what was applied now, read fresh (nothing is
    /// changed), with what differs: `inspect`'s drift.
    pub fn drift(&self) -> Vec<(TaskId, String)> {
        self.running
            .iter()
            .filter_map(|(task, r)| {
                let want = r.redirect?;
                let d = match self.redirects.read(&r.netns) {
                    Ok(seen) => redirect::drift(&want, seen.as_deref())?,
                    Err(e) => format!("cannot read the redirect table: {e}"),
                };
                Some((task.clone(), d))
            })
            .collect()
    }

    /// What every served sandbox's resolver answers, for `inspect`.
    pub fn inspect(&self) -> BTreeMap<TaskId, SandboxDnsInspect> {
        self.running
            .iter()
            .map(|(task, r)| {
                let policy = r.shared.policy.load();
                let forward = match &**policy {
                    ForwardPolicy::Forward { upstreams } if upstreams.is_empty() => {
                        "SERVFAIL (no usable upstream)".to_string()
                    }
                    ForwardPolicy::Forward { upstreams } => {
                        let u: Vec<String> = upstreams.iter().map(ToString::to_string).collect();
                        format!("forward to {}", u.join(", "))
                    }
                    ForwardPolicy::Deny(DenyAnswer::Refused) => "REFUSED (internal)".into(),
                    ForwardPolicy::Deny(DenyAnswer::NxDomain) => "NXDOMAIN (internal)".into(),
                };
                let view = r.shared.view.load();
                (
                    task.clone(),
                    SandboxDnsInspect {
                        listen: r.listen.iter().map(ToString::to_string).collect(),
                        redirect: r.redirect.map(|n| {
                            let seen = self.redirects.read(&r.netns);
                            RedirectInspect {
                                rules: n.rules().iter().map(ToString::to_string).collect(),
                                in_kernel: seen.as_ref().ok().map(Option::is_some),
                                drift: match &seen {
                                    Ok(seen) => redirect::drift(&n, seen.as_deref()),
                                    Err(e) => Some(format!("cannot read: {e}")),
                                },
                            }
                        }),
                        ttl: view.ttl(),
                        other_names: forward,
                        records: view.records(),
                        stats: self.stats(task).unwrap_or_default(),
                    },
                )
            })
            .collect()
    }

    fn open(&self, task: &TaskId, sb: SandboxDns) -> Result<Running, SandboxDnsError> {
        let err = |source| SandboxDnsError {
            task: task.clone(),
            netns: sb.netns.clone(),
            source,
        };
        let bind = if self.cfg.redirect {
            SocketAddrV4::new(*self.cfg.listen.ip(), 0)
        } else {
            self.cfg.listen
        };
        let (udp, tcp) = dns_socket::open_listeners(&sb.netns, bind).map_err(err)?;
        let redirect = if self.cfg.redirect {
            let port = |a: std::io::Result<SocketAddr>| a.map(|a| a.port()).map_err(err);
            let want = DnsRedirect {
                addr: *self.cfg.listen.ip(),
                udp_port: port(udp.local_addr())?,
                tcp_port: port(tcp.local_addr())?,
            };
            self.redirects
                .ensure(&sb.netns, &want)
                .map_err(|e| err(std::io::Error::other(e)))?;
            Some(want)
        } else {
            None
        };
        let sockets = self.factory.for_netns(&sb.netns).map_err(err)?;
        let rt = self.rt.as_ref().expect("runtime lives until drop");
        let _enter = rt.enter();
        let udp = UdpSocket::from_std(udp).map_err(err)?;
        let tcp = TcpListener::from_std(tcp).map_err(err)?;
        let listen = vec![
            format!("udp {}", udp.local_addr().map_err(err)?),
            format!("tcp {}", tcp.local_addr().map_err(err)?),
        ];
        let shared = Arc::new(Shared {
            task: task.clone(),
            view: ArcSwap::new(sb.view),
            policy: ArcSwap::from_pointee(sb.forward),
            forwards: Arc::new(Semaphore::new(self.cfg.max_inflight_forwards)),
            tcp: Arc::new(Semaphore::new(self.cfg.max_tcp_connections)),
            sockets,
            cfg: self.cfg,
            log: LogLimiter::new(),
            stats: SandboxStats::default(),
        });
        let loops = vec![
            rt.spawn(udp_loop(udp, shared.clone())),
            rt.spawn(tcp_accept_loop(tcp, shared.clone())),
        ];
        Ok(Running {
            netns: sb.netns,
            listen,
            redirect,
            redirect_genid: None,
            shared,
            loops,
        })
    }
}

impl Drop for DnsServer {
    fn drop(&mut self) {
        self.running.clear();
        if let Some(rt) = self.rt.take() {
            rt.shutdown_timeout(Duration::from_secs(1));
        }
    }
}

/// Pins the calling thread to the CPUs of `mask` (nothing when 0). A failure (a CPU that does
/// not exist or lies outside netd's cpuset) is logged and the thread runs unpinned.
fn pin_current_thread(mask: u64) {
    if mask == 0 {
        return;
    }
    let mut set = nix::sched::CpuSet::new();
    for cpu in (0..64).filter(|c| mask & (1 << c) != 0) {
        if let Err(e) = set.set(cpu) {
            tracing::warn!(cpu, error = %e, "dns: cannot pin to this CPU");
        }
    }
    if let Err(e) = nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set) {
        tracing::warn!(mask = format!("{mask:#x}"), error = %e, "dns: cannot pin the resolver thread; running unpinned");
    }
}

async fn udp_loop(sock: UdpSocket, sh: Arc<Shared>) {
    let sock = Arc::new(sock);
    let mut responder = Responder::new();
    let mut forwards: JoinSet<()> = JoinSet::new();
    loop {
        tokio::select! {
            ready = sock.readable() => {
                if let Err(e) = ready {
                    sh.warn("UDP socket failed; loop ends", &e);
                    return;
                }
                let mut handled = 0;
                while handled < UDP_BATCH {
                    // `try_io` clears tokio's readiness when the kernel says EAGAIN.
                    match sock.try_io(tokio::io::Interest::READABLE, || {
                        UDP_BATCHES.with_borrow_mut(|b| {
                            serve_batch(b, &sock, &sh, &mut responder, &mut forwards)
                        })
                    }) {
                        Ok(n) => handled += n,
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                        Err(e) => {
                            // ICMP errors of earlier sends surface here; keep serving.
                            sh.warn("UDP receive error", &e);
                            break;
                        }
                    }
                }
                if handled >= UDP_BATCH {
                    tokio::task::yield_now().await;
                }
            }
            Some(_) = forwards.join_next(), if !forwards.is_empty() => {}
        }
    }
}

thread_local! {
    /// Receive and reply buffers of this runtime thread, shared by every sandbox's UDP loop
    /// that runs on it: a batch is received, answered and flushed with no await in between.
    static UDP_BATCHES: std::cell::RefCell<UdpBatch> = std::cell::RefCell::new(UdpBatch::new());
}

/// Receives one batch, answers it (cluster names inline; forwards spawned) and sends the
/// answers in one batch. Returns how many datagrams it took; `WouldBlock` when none.
fn serve_batch(
    b: &mut UdpBatch,
    sock: &Arc<UdpSocket>,
    sh: &Arc<Shared>,
    responder: &mut Responder,
    forwards: &mut JoinSet<()>,
) -> std::io::Result<usize> {
    let fd = sock.as_raw_fd();
    let n = b.recv(fd)?;
    sh.stats.udp_queries.fetch_add(n as u64, Ordering::Relaxed);
    let view = sh.view.load();
    let policy = sh.policy.load();
    let mut err_out = Vec::new();
    let (rx, tx) = b.split();
    for i in 0..n {
        let (r, req) = rx.datagram(i);
        let Some(peer) = r.peer else { continue };
        if r.truncated {
            // Longer than any real query: answer FORMERR from the header rather than parse
            // a cut message.
            wire::error_reply(req, 1, policy.recursion_available(), &mut err_out);
            if !err_out.is_empty() {
                tx.reply(peer, &err_out);
            }
            continue;
        }
        match responder.answer(&view, &policy, req, Transport::Udp) {
            Outcome::Reply(bytes) => tx.reply(peer, bytes),
            Outcome::Drop => {}
            Outcome::Forward { udp_limit } => {
                let req = req.to_vec();
                if let Some(refusal) =
                    start_forward(sock, sh, &policy, forwards, req, peer, udp_limit)
                {
                    tx.reply(peer, &refusal);
                }
            }
        }
    }
    let (dropped, err) = b.flush(fd);
    if dropped > 0 {
        // A full send buffer drops answers; the clients retry.
        sh.warn(
            "UDP send error",
            &err.map_or_else(|| format!("{dropped} answers dropped"), |e| e.to_string()),
        );
    }
    Ok(n)
}

/// Spawns the forward of `req` for `peer`, or returns the SERVFAIL to send at once when the
/// sandbox's in-flight cap is reached.
fn start_forward(
    sock: &Arc<UdpSocket>,
    sh: &Arc<Shared>,
    policy: &ForwardPolicy,
    forwards: &mut JoinSet<()>,
    req: Vec<u8>,
    peer: SocketAddrV4,
    udp_limit: usize,
) -> Option<Vec<u8>> {
    let ForwardPolicy::Forward { upstreams } = policy else {
        return None;
    };
    let Ok(permit) = sh.forwards.clone().try_acquire_owned() else {
        sh.stats.forward_cap_hit.fetch_add(1, Ordering::Relaxed);
        sh.warn(
            "in-flight forward cap reached; answering SERVFAIL",
            &sh.cfg.max_inflight_forwards,
        );
        let mut out = Vec::new();
        wire::error_reply(&req, 2, true, &mut out);
        return Some(out);
    };
    let (sock, sh, upstreams) = (sock.clone(), sh.clone(), upstreams.clone());
    forwards.spawn(async move {
        let out = run_forward(&sh, &upstreams, &req, false, Some(udp_limit), permit).await;
        if let Err(e) = sock.send_to(&out, SocketAddr::V4(peer)).await {
            sh.warn("UDP send error", &e);
        }
    });
    None
}

/// Forwards and returns the bytes for the client (SERVFAIL on failure).
async fn run_forward(
    sh: &Shared,
    upstreams: &[SocketAddr],
    req: &[u8],
    tcp: bool,
    udp_limit: Option<usize>,
    _permit: OwnedSemaphorePermit,
) -> Vec<u8> {
    sh.stats.forwarded.fetch_add(1, Ordering::Relaxed);
    let mut out = Vec::new();
    match forward::forward(&sh.sockets, upstreams, req, tcp, sh.cfg.forward).await {
        Ok(answer) => match udp_limit {
            Some(limit) if !full::truncate_foreign(&answer, limit, &mut out) => {
                wire::error_reply(req, 2, true, &mut out);
            }
            Some(_) => {}
            None => out = answer,
        },
        Err(e) => {
            sh.stats.forward_failed.fetch_add(1, Ordering::Relaxed);
            sh.warn("forward failed; answering SERVFAIL", &e);
            wire::error_reply(req, 2, true, &mut out);
        }
    }
    out
}

async fn tcp_accept_loop(listener: TcpListener, sh: Arc<Shared>) {
    let mut conns: JoinSet<()> = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => match sh.tcp.clone().try_acquire_owned() {
                    Ok(permit) => {
                        conns.spawn(tcp_conn(stream, sh.clone(), permit));
                    }
                    Err(_) => {
                        sh.stats.tcp_cap_hit.fetch_add(1, Ordering::Relaxed);
                        sh.warn("TCP connection cap reached; closing new connection", &sh.cfg.max_tcp_connections);
                        drop(stream);
                    }
                },
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning on the ready listener.
                    sh.warn("TCP accept error", &e);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
}

async fn tcp_conn(mut stream: TcpStream, sh: Arc<Shared>, _permit: OwnedSemaphorePermit) {
    let idle = sh.cfg.tcp_idle_timeout;
    let mut responder = Responder::new();
    let mut req = Vec::new();
    loop {
        let Ok(Ok(len)) = tokio::time::timeout(idle, stream.read_u16()).await else {
            return;
        };
        req.resize(usize::from(len), 0);
        let Ok(Ok(_)) = tokio::time::timeout(idle, stream.read_exact(&mut req)).await else {
            return;
        };
        sh.stats.tcp_queries.fetch_add(1, Ordering::Relaxed);
        let view = sh.view.load();
        let policy = sh.policy.load();
        let answer = match responder.answer(&view, &policy, &req, Transport::Tcp) {
            Outcome::Reply(b) => b.to_vec(),
            // Not a query: the stream is not speaking DNS to us; end it.
            Outcome::Drop => return,
            Outcome::Forward { .. } => {
                let ForwardPolicy::Forward { upstreams } = &**policy else {
                    return;
                };
                match sh.forwards.clone().try_acquire_owned() {
                    Ok(permit) => run_forward(&sh, upstreams, &req, true, None, permit).await,
                    Err(_) => {
                        sh.stats.forward_cap_hit.fetch_add(1, Ordering::Relaxed);
                        let mut out = Vec::new();
                        wire::error_reply(&req, 2, true, &mut out);
                        out
                    }
                }
            }
        };
        let Ok(len) = u16::try_from(answer.len()) else {
            return;
        };
        let mut framed = Vec::with_capacity(answer.len() + 2);
        framed.extend_from_slice(&len.to_be_bytes());
        framed.extend_from_slice(&answer);
        match tokio::time::timeout(idle, stream.write_all(&framed)).await {
            Ok(Ok(())) => {}
            _ => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    #[test]
    fn log_limiter_counts_what_it_suppresses() {
        let l = LogLimiter::new();
        assert_eq!(l.allow(), Some(0));
        assert_eq!(l.allow(), None);
        assert_eq!(l.allow(), None);
        *l.next.lock().unwrap() = Instant::now();
        assert_eq!(l.allow(), Some(2));
    }

    #[test]
    fn pinning_restricts_the_thread_to_the_mask() {
        let got = std::thread::spawn(|| {
            pin_current_thread(1);
            nix::sched::sched_getaffinity(nix::unistd::Pid::from_raw(0)).unwrap()
        })
        .join()
        .unwrap();
        assert!(got.is_set(0).unwrap());
        assert!((1..nix::sched::CpuSet::count()).all(|c| !got.is_set(c).unwrap()));
    }

    #[test]
    fn defaults() {
        let c = DnsServerConfig::default();
        assert_eq!(
            c.listen,
            SocketAddrV4::new(Ipv4Addr::new(127, 0, 0, 11), 53)
        );
        assert_eq!(c.forward.timeout, Duration::from_secs(2));
    }
}
