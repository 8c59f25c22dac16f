//! Sockets for the embedded DNS resolver, created inside sandbox network namespaces.
//!
//! A socket belongs to the network namespace of the thread that created it, for its whole
//! life, whichever thread uses it later. So (STYLE rule 6):
//! - [`open_listeners`] binds 127.0.0.11:53 (UDP and TCP) on a short-lived thread that entered
//!   the sandbox's namespace, and hands the sockets back nonblocking, for tokio;
//! - [`SocketFactory`] owns one dedicated thread that only ever creates upstream sockets: per
//!   request it enters the asked namespace and returns a fresh socket. It never does anything
//!   else, so switching its namespace per request cannot misplace other work. One thread for
//!   all sandboxes (not one per sandbox): forwarding is rare next to cluster lookups.
//!
//! Invariants: the calling threads' namespaces never change; every socket is close-on-exec and
//! nonblocking; a UDP upstream socket is bound to port 0, so the kernel picks a random
//! ephemeral source port per query (Linux randomises UDP ephemeral ports).

use std::fs::File;
use std::io;
use std::net::{SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket};

/// Receive buffer of each sandbox's resolver UDP socket, bytes.
pub const UDP_RCVBUF: usize = 1 << 20;
use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;
use std::sync::{Arc, Mutex, mpsc};

use nix::sched::CloneFlags;
use nix::sys::socket::{AddressFamily, SockFlag, SockType};

use crate::dns::forward::{SocketFuture, UpstreamSockets, any_of};
use crate::linux::netns;

/// UDP socket and TCP listener bound to `addr` inside the namespace at `netns_path`.
pub fn open_listeners(
    netns_path: &Path,
    addr: SocketAddrV4,
) -> io::Result<(UdpSocket, TcpListener)> {
    let ns = netns::open(netns_path)?;
    netns::run_in(&ns, move || {
        let udp = UdpSocket::bind(addr)?;
        udp.set_nonblocking(true)?;
        // A deeper receive queue than the default (~200 KiB): at a sustained 140k queries/s
        // a scheduling pause of a millisecond or two overflows the default and drops queries
        // (measured: 1.3 % loss at half of our capacity). It bounds memory per sandbox (only
        // queued datagrams use it); FORCE because netd is privileged and rmem_max is the
        // machine's, not the sandbox's, setting.
        nix::sys::socket::setsockopt(&udp, nix::sys::socket::sockopt::RcvBufForce, &UDP_RCVBUF)
            .map_err(io::Error::from)?;
        // std sets SO_REUSEADDR on listeners, so a sandbox re-added right after removal can
        // bind again while old connections linger in TIME_WAIT.
        let tcp = TcpListener::bind(addr)?;
        tcp.set_nonblocking(true)?;
        Ok((udp, tcp))
    })
}

#[derive(Debug, Clone, Copy)]
enum Kind {
    Udp,
    Tcp,
}

struct Request {
    ns: Arc<File>,
    kind: Kind,
    upstream: SocketAddr,
    reply: tokio::sync::oneshot::Sender<io::Result<OwnedFd>>,
}

/// The dedicated socket-creating thread. Cloning shares it; it exits when the last clone drops.
#[derive(Debug, Clone)]
pub struct SocketFactory {
    tx: Arc<Mutex<mpsc::Sender<Request>>>,
}

impl SocketFactory {
    pub fn start() -> io::Result<Self> {
        let (tx, rx) = mpsc::channel::<Request>();
        std::thread::Builder::new()
            .name("sn-dns-sockets".into())
            .spawn(move || factory_loop(&rx))?;
        Ok(Self {
            tx: Arc::new(Mutex::new(tx)),
        })
    }

    async fn make(&self, ns: Arc<File>, kind: Kind, upstream: SocketAddr) -> io::Result<OwnedFd> {
        let (reply, rx) = tokio::sync::oneshot::channel();
        let gone = || {
            io::Error::new(
                io::ErrorKind::BrokenPipe,
                "dns socket factory thread is gone",
            )
        };
        self.tx
            .lock()
            .map_err(|_poisoned| gone())?
            .send(Request {
                ns,
                kind,
                upstream,
                reply,
            })
            .map_err(|_closed| gone())?;
        rx.await.map_err(|_closed| gone())?
    }

    /// Upstream sockets for the namespace at `netns_path` (opened now, kept open).
    pub fn for_netns(&self, netns_path: &Path) -> io::Result<NetnsSockets> {
        Ok(NetnsSockets {
            factory: self.clone(),
            ns: Arc::new(netns::open(netns_path)?),
        })
    }
}

fn factory_loop(rx: &mpsc::Receiver<Request>) {
    while let Ok(req) = rx.recv() {
        // setns on every request (one syscall): no cache keyed by fd numbers, which the
        // kernel reuses once a namespace file closes.
        let result = nix::sched::setns(req.ns.as_fd(), CloneFlags::CLONE_NEWNET)
            .map_err(io::Error::from)
            .and_then(|()| match req.kind {
                Kind::Udp => {
                    let s = UdpSocket::bind(any_of(req.upstream))?;
                    s.set_nonblocking(true)?;
                    Ok(OwnedFd::from(s))
                }
                Kind::Tcp => {
                    let family = match req.upstream {
                        SocketAddr::V4(_) => AddressFamily::Inet,
                        SocketAddr::V6(_) => AddressFamily::Inet6,
                    };
                    nix::sys::socket::socket(
                        family,
                        SockType::Stream,
                        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
                        None,
                    )
                    .map_err(io::Error::from)
                }
            });
        let _receiver_gone = req.reply.send(result);
    }
}

/// Upstream sockets of one sandbox.
#[derive(Debug, Clone)]
pub struct NetnsSockets {
    factory: SocketFactory,
    ns: Arc<File>,
}

impl UpstreamSockets for NetnsSockets {
    fn udp(&self, upstream: SocketAddr) -> SocketFuture<'_, UdpSocket> {
        Box::pin(async move {
            let fd = self
                .factory
                .make(self.ns.clone(), Kind::Udp, upstream)
                .await?;
            Ok(UdpSocket::from(fd))
        })
    }

    fn tcp(&self, upstream: SocketAddr) -> SocketFuture<'_, TcpStream> {
        Box::pin(async move {
            let fd = self
                .factory
                .make(self.ns.clone(), Kind::Tcp, upstream)
                .await?;
            Ok(TcpStream::from(fd))
        })
    }
}
