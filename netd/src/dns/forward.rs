//! Forwarding names the cluster does not own to upstream resolvers.
//!
//! - [`ForwardPolicy`] (pure): whether a sandbox may forward, and to whom. Sandboxes whose
//!   networks are all `internal` never forward (CVE-2024-29018: Docker forwarded their queries
//!   from the host namespace, leaking data out of "internal" networks). Upstreams in
//!   127.0.0.0/8, `::1` or unspecified are dropped when the policy is built: inside a sandbox
//!   they are this resolver itself (moby#47716's loop), so a policy left with none answers
//!   SERVFAIL at once.
//! - [`parse_resolv_conf`] / [`node_upstreams`]: the node's resolvers.
//! - [`forward`] (async): one exchange, from sockets opened in the sandbox's namespace (so the
//!   query leaves as the sandbox's own traffic would), a fresh random query ID and a fresh
//!   socket (kernel-randomised source port) per attempt, a per-attempt timeout, one retry on
//!   another upstream, and a TCP retry when the UDP answer is truncated. Answers are accepted
//!   only from the upstream asked (connected sockets), with our ID and the same question.
//!
//! Invariants: the client's query bytes are forwarded unchanged except for the ID, and the
//! answer goes back unchanged except for the ID (and truncation for a UDP client, done by the
//! caller).

use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::pin::Pin;
use std::time::Duration;

use hickory_proto::op::ResponseCode;
use rand::RngExt;
use swarmnet_model::{Intent, TaskId};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::wire;

/// What an internal-only sandbox gets for a name the cluster does not own.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum DenyAnswer {
    /// REFUSED: "this server will not answer that" (Docker's choice for internal networks).
    #[default]
    Refused,
    /// NXDOMAIN: the name does not exist, as far as the sandbox can tell.
    NxDomain,
}

/// Whether and where a sandbox's other names go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ForwardPolicy {
    /// Forward to these upstreams (loopback ones already removed; empty → SERVFAIL).
    Forward { upstreams: Vec<SocketAddr> },
    /// Never forward.
    Deny(DenyAnswer),
}

/// What the full path does with a name the cluster does not own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision<'a> {
    Forward(&'a [SocketAddr]),
    Answer(ResponseCode),
}

/// An upstream this resolver refuses to use: inside a sandbox, loopback is the resolver itself.
pub fn is_self(addr: &SocketAddr) -> bool {
    addr.ip().is_loopback() || addr.ip().is_unspecified()
}

impl ForwardPolicy {
    /// A forwarding policy; upstreams that would loop back to this resolver are dropped.
    pub fn forward(upstreams: impl IntoIterator<Item = SocketAddr>) -> Self {
        let mut v: Vec<SocketAddr> = Vec::new();
        for u in upstreams {
            if is_self(&u) {
                tracing::warn!(upstream = %u, "dns: upstream is this resolver itself (loopback); not used");
            } else if !v.contains(&u) {
                v.push(u);
            }
        }
        Self::Forward { upstreams: v }
    }

    /// The policy of `task`'s sandbox: deny when every network it is attached to is internal.
    pub fn for_task(
        intent: &Intent,
        task: &TaskId,
        upstreams: &[SocketAddr],
        deny: DenyAnswer,
    ) -> Self {
        let internal_only = intent
            .tasks()
            .find(|(t, _)| &t.id == task)
            .is_some_and(|(_, atts)| {
                !atts.is_empty()
                    && atts
                        .iter()
                        .all(|a| intent.network(&a.network).is_some_and(|n| n.spec.internal))
            });
        if internal_only {
            Self::Deny(deny)
        } else {
            Self::forward(upstreams.iter().copied())
        }
    }

    /// The RA bit: set when this sandbox's queries can be recursed.
    pub fn recursion_available(&self) -> bool {
        matches!(self, Self::Forward { upstreams } if !upstreams.is_empty())
    }

    pub fn decision(&self) -> Decision<'_> {
        match self {
            Self::Forward { upstreams } if !upstreams.is_empty() => Decision::Forward(upstreams),
            // Only loopback upstreams were configured: answer at once, never loop.
            Self::Forward { .. } => Decision::Answer(ResponseCode::ServFail),
            Self::Deny(DenyAnswer::Refused) => Decision::Answer(ResponseCode::Refused),
            Self::Deny(DenyAnswer::NxDomain) => Decision::Answer(ResponseCode::NXDomain),
        }
    }
}

/// The `nameserver` addresses of a resolv.conf text, port 53, in file order. Malformed lines
/// are skipped (glibc does the same); IPv6 zone suffixes (`%eth0`) are not supported.
pub fn parse_resolv_conf(text: &str) -> Vec<SocketAddr> {
    text.lines()
        .filter_map(|l| {
            let l = l.split(['#', ';']).next()?;
            let mut words = l.split_whitespace();
            if words.next()? != "nameserver" {
                return None;
            }
            let ip: IpAddr = words.next()?.parse().ok()?;
            Some(SocketAddr::new(ip, 53))
        })
        .collect()
}

/// The node's upstreams: `/etc/resolv.conf`, or systemd-resolved's real upstream list when the
/// former only names the local stub (127.0.0.53 is unreachable from a sandbox; Docker does the
/// same). A missing file yields no upstreams (every forward answers SERVFAIL).
pub fn node_upstreams() -> std::io::Result<Vec<SocketAddr>> {
    let read = |p: &str| match std::fs::read_to_string(Path::new(p)) {
        Ok(t) => Ok(parse_resolv_conf(&t)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(e),
    };
    let main = read("/etc/resolv.conf")?;
    if !main.is_empty() && main.iter().all(is_self) {
        let resolved = read("/run/systemd/resolve/resolv.conf")?;
        if !resolved.is_empty() {
            return Ok(resolved);
        }
    }
    Ok(main)
}

/// Why a forward produced no answer; the client gets SERVFAIL.
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    #[error("no upstream answered within {timeout:?} ({attempts} attempts)")]
    Timeout { timeout: Duration, attempts: usize },
    #[error("exchange with upstream {upstream} over {transport:?} failed")]
    Io {
        upstream: SocketAddr,
        transport: super::Transport,
        #[source]
        source: std::io::Error,
    },
    #[error("the request has no single question to forward")]
    BadRequest,
}

/// Boxed future of a socket.
pub type SocketFuture<'a, T> = Pin<Box<dyn Future<Output = std::io::Result<T>> + Send + 'a>>;

/// Makes fresh sockets in the sandbox's network namespace (see `linux::dns_socket`).
pub trait UpstreamSockets: Send + Sync {
    /// A UDP socket of `upstream`'s family bound to an ephemeral port, nonblocking.
    fn udp(&self, upstream: SocketAddr) -> SocketFuture<'_, std::net::UdpSocket>;
    /// An unconnected TCP socket of `upstream`'s family, nonblocking.
    fn tcp(&self, upstream: SocketAddr) -> SocketFuture<'_, std::net::TcpStream>;
}

/// Forwarding knobs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ForwardConfig {
    /// Per attempt; a second attempt goes to another upstream.
    pub timeout: Duration,
    pub attempts: usize,
}

impl Default for ForwardConfig {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(2),
            attempts: 2,
        }
    }
}

/// Forwards `req` (a client's query) and returns the upstream's answer with the client's ID
/// restored. `tcp`: the client asked over TCP, so ask over TCP too.
pub async fn forward(
    sockets: &dyn UpstreamSockets,
    upstreams: &[SocketAddr],
    req: &[u8],
    tcp: bool,
    cfg: ForwardConfig,
) -> Result<Vec<u8>, ForwardError> {
    let client = wire::header(req).ok_or(ForwardError::BadRequest)?;
    if upstreams.is_empty() || wire::question(req, &mut [0; wire::MAX_KEY]).is_none() {
        return Err(ForwardError::BadRequest);
    }
    let start = rand::rng().random_range(0..upstreams.len());
    let attempts = cfg.attempts.max(1);
    let mut last_err = None;
    let mut last_answer: Option<Vec<u8>> = None;
    for i in 0..attempts {
        let upstream = upstreams[(start + i) % upstreams.len()];
        let mut q = req.to_vec();
        let id: u16 = rand::rng().random();
        q[..2].copy_from_slice(&id.to_be_bytes());
        let result = if tcp {
            tcp_exchange(sockets, upstream, &q, id, cfg.timeout).await
        } else {
            match udp_exchange(sockets, upstream, &q, id, cfg.timeout).await {
                Ok(a) if wire::header(&a).is_some_and(|h| h.flags & wire::FLAG_TC != 0) => {
                    tcp_exchange(sockets, upstream, &q, id, cfg.timeout).await
                }
                other => other,
            }
        };
        match result {
            Ok(mut a) => {
                a[..2].copy_from_slice(&client.id.to_be_bytes());
                let rcode = wire::header(&a).map_or(0, |h| h.flags & 0xF);
                // SERVFAIL / REFUSED: this upstream cannot help; another one may.
                if (rcode == 2 || rcode == 5) && i + 1 < attempts && upstreams.len() > 1 {
                    last_answer = Some(a);
                    continue;
                }
                return Ok(a);
            }
            Err(e) => last_err = Some(e),
        }
    }
    if let Some(a) = last_answer {
        return Ok(a);
    }
    Err(last_err.unwrap_or(ForwardError::Timeout {
        timeout: cfg.timeout,
        attempts,
    }))
}

fn valid_answer(q: &[u8], a: &[u8], id: u16) -> bool {
    wire::header(a).is_some_and(|h| h.id == id && h.is_response()) && wire::same_question(q, a)
}

async fn udp_exchange(
    sockets: &dyn UpstreamSockets,
    upstream: SocketAddr,
    q: &[u8],
    id: u16,
    timeout: Duration,
) -> Result<Vec<u8>, ForwardError> {
    let io = |source| ForwardError::Io {
        upstream,
        transport: super::Transport::Udp,
        source,
    };
    let exchange = async {
        let sock = tokio::net::UdpSocket::from_std(sockets.udp(upstream).await?)?;
        // Connected: the kernel drops datagrams from any other source.
        sock.connect(upstream).await?;
        sock.send(q).await?;
        let mut buf = vec![0u8; 65535];
        loop {
            let n = sock.recv(&mut buf).await?;
            // Anything else (a stale or forged answer) is ignored; the timeout bounds this.
            if valid_answer(q, &buf[..n], id) {
                buf.truncate(n);
                return Ok(buf);
            }
        }
    };
    match tokio::time::timeout(timeout, exchange).await {
        Ok(r) => r.map_err(io),
        Err(_) => Err(ForwardError::Timeout {
            timeout,
            attempts: 1,
        }),
    }
}

async fn tcp_exchange(
    sockets: &dyn UpstreamSockets,
    upstream: SocketAddr,
    q: &[u8],
    id: u16,
    timeout: Duration,
) -> Result<Vec<u8>, ForwardError> {
    let io = |source| ForwardError::Io {
        upstream,
        transport: super::Transport::Tcp,
        source,
    };
    let exchange = async {
        let std = sockets.tcp(upstream).await?;
        let mut stream = tokio::net::TcpSocket::from_std_stream(std)
            .connect(upstream)
            .await?;
        let len = u16::try_from(q.len())
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
        let mut framed = Vec::with_capacity(q.len() + 2);
        framed.extend_from_slice(&len.to_be_bytes());
        framed.extend_from_slice(q);
        stream.write_all(&framed).await?;
        loop {
            let n = usize::from(stream.read_u16().await?);
            let mut buf = vec![0u8; n];
            stream.read_exact(&mut buf).await?;
            if valid_answer(q, &buf, id) {
                return Ok(buf);
            }
        }
    };
    match tokio::time::timeout(timeout, exchange).await {
        Ok(r) => r.map_err(io),
        Err(_) => Err(ForwardError::Timeout {
            timeout,
            attempts: 1,
        }),
    }
}

/// The unspecified address of `upstream`'s family, port 0 (for binding a fresh socket).
pub fn any_of(upstream: SocketAddr) -> SocketAddr {
    match upstream {
        SocketAddr::V4(_) => SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0),
        SocketAddr::V6(_) => SocketAddr::new(IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED), 0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn resolv_conf() {
        let text = "# comment\nnameserver 192.0.2.1\nnameserver  2001:db8::1 # x\nsearch a b\nnameserver bogus\nnameserver 192.0.2.2;x\n";
        assert_eq!(
            parse_resolv_conf(text),
            vec![
                sa("192.0.2.1:53"),
                sa("[2001:db8::1]:53"),
                sa("192.0.2.2:53")
            ]
        );
    }

    #[test]
    fn loopback_upstreams_are_refused() {
        let p = ForwardPolicy::forward([sa("127.0.0.11:53"), sa("127.0.0.53:53"), sa("[::1]:53")]);
        assert!(!p.recursion_available());
        assert_eq!(p.decision(), Decision::Answer(ResponseCode::ServFail));
        let p =
            ForwardPolicy::forward([sa("127.0.0.11:53"), sa("192.0.2.1:53"), sa("192.0.2.1:53")]);
        assert_eq!(
            p,
            ForwardPolicy::Forward {
                upstreams: vec![sa("192.0.2.1:53")]
            }
        );
    }

    #[test]
    fn internal_only_sandboxes_never_forward() {
        let intent = super::super::view::tests::intent();
        let up = [sa("192.0.2.1:53")];
        let t = |s: &str| TaskId::new(s).unwrap();
        // p1 is on db (internal) only.
        assert_eq!(
            ForwardPolicy::for_task(&intent, &t("p1"), &up, DenyAnswer::NxDomain).decision(),
            Decision::Answer(ResponseCode::NXDomain)
        );
        assert_eq!(
            ForwardPolicy::for_task(&intent, &t("p1"), &up, DenyAnswer::Refused).decision(),
            Decision::Answer(ResponseCode::Refused)
        );
        // a1 is on app too.
        assert!(
            ForwardPolicy::for_task(&intent, &t("a1"), &up, DenyAnswer::Refused)
                .recursion_available()
        );
    }
}
