//! Propagation bench (ignored by default; run by `bench/gossip.sh`): time for an endpoint
//! added on one node to be visible on every other node, p50/p99, and bytes sent per second per
//! node, for clusters of N in-process nodes over UDP on 127.0.0.1. Two variants run in the same
//! process, one after the other: ours (chitchat over the sealed transport, `GossipNode`) and
//! the peer, chitchat 0.13 over its own unauthenticated `UdpTransport` (what the sealing costs).
//!
//! Observation is event-driven: every node subscribes to chitchat's key-change listener for
//! `ep/`, which fires when that node applies the record; the callback only stamps the time in a
//! shared map. The bench thread waits on a counter, so measuring costs no gossip CPU (an
//! earlier version polled every node's merged table and, on 2 cores, starved gossip itself).
//!
//! `SWARMNET_GOSSIP_NODES=10,50,100,200` (sizes), `SWARMNET_GOSSIP_INTERVALS_MS=500,200`
//! (gossip intervals), `SWARMNET_GOSSIP_ROUNDS=20` (endpoints added per run),
//! `SWARMNET_GOSSIP_VARIANTS=sealed,plain`.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use chitchat::transport::{RecvOutcome, SendOutcome, Socket, Transport};
use chitchat::{ChitchatEnvelope, ChitchatHandle, ListenerHandle};
use swarmnet_model::{MacAddr, Name, TaskId};
use swarmnet_netd::gossip::crypto::KEY_LEN;
use swarmnet_netd::gossip::{
    EndpointRecord, GossipConfig, GossipNode, Health, Keyring, UdpNet, chitchat_config,
};

fn ep(i: usize) -> EndpointRecord {
    let ip = Ipv4Addr::new(10, 1, (i / 250) as u8, (i % 250 + 2) as u8);
    EndpointRecord {
        network: Name::new("app").unwrap(),
        task: TaskId::new(format!("b{i}")).unwrap(),
        ip: IpAddr::V4(ip),
        mac: MacAddr::from_ipv4(ip),
        service: None,
        health: Health::Healthy,
    }
}

/// A 25-character pseudo-random base-36 id, stable per index.
fn node_id(i: usize) -> String {
    let mut x = (i as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    (0..25)
        .map(|_| {
            x ^= x >> 33;
            x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
            x ^= x >> 29;
            let d = (x % 36) as u32;
            char::from_digit(d, 36).expect("below 36")
        })
        .collect()
}

/// chitchat's own UDP socket, counting the bytes it sends (the peer variant).
struct CountingUdp(Arc<AtomicU64>);

struct CountingSocket(chitchat::transport::UdpSocket, Arc<AtomicU64>);

#[async_trait]
impl Transport for CountingUdp {
    async fn open(&self, addr: SocketAddr) -> anyhow::Result<Box<dyn Socket>> {
        Ok(Box::new(CountingSocket(
            chitchat::transport::UdpSocket::open(addr).await?,
            self.0.clone(),
        )))
    }
}

#[async_trait]
impl Socket for CountingSocket {
    fn local_addr(&self) -> anyhow::Result<SocketAddr> {
        self.0.local_addr()
    }
    async fn send(&mut self, to: SocketAddr, env: ChitchatEnvelope) -> anyhow::Result<SendOutcome> {
        let out = self.0.send(to, env).await?;
        self.1
            .fetch_add(out.num_bytes_sent as u64, Ordering::Relaxed);
        Ok(out)
    }
    async fn recv(&mut self) -> anyhow::Result<RecvOutcome> {
        self.0.recv().await
    }
}

enum Node {
    Sealed(GossipNode),
    Plain(ChitchatHandle, Arc<AtomicU64>),
}

impl Node {
    async fn publish(&self, rec: &EndpointRecord) {
        match self {
            Node::Sealed(n) => {
                n.publish_endpoints(std::slice::from_ref(rec)).await;
            }
            Node::Plain(h, _) => {
                h.with_chitchat(|c| c.self_node_state().set(rec.key(), rec.value()))
                    .await
            }
        }
    }

    async fn subscribe(
        &self,
        cb: impl Fn(chitchat::KeyChangeEvent<'_>) + Send + Sync + 'static,
    ) -> ListenerHandle {
        match self {
            Node::Sealed(n) => n.subscribe("ep/", cb).await,
            Node::Plain(h, _) => {
                let cb = Arc::new(cb);
                h.with_chitchat(|c| {
                    let cb = cb.clone();
                    c.subscribe_event("ep/", move |e| cb(e))
                })
                .await
            }
        }
    }

    async fn live(&self) -> usize {
        match self {
            Node::Sealed(n) => n.membership().await.0 + 1,
            Node::Plain(h, _) => h.with_chitchat(|c| c.live_nodes().count()).await,
        }
    }

    fn sent_bytes(&self) -> u64 {
        match self {
            Node::Sealed(n) => n.counters().sent_bytes,
            Node::Plain(_, b) => b.load(Ordering::Relaxed),
        }
    }

    async fn shutdown(self) {
        match self {
            Node::Sealed(n) => n.shutdown().await,
            Node::Plain(h, _) => drop(h.shutdown().await),
        }
    }
}

fn env_list(name: &str, default: &str) -> Vec<String> {
    std::env::var(name)
        .unwrap_or_else(|_| default.into())
        .split(',')
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect()
}

/// Every node of a cluster needs a few sockets (the sealed transport: 5); 200 nodes exceed
/// the usual soft limit of 1024 descriptors.
fn raise_fd_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE)
        && soft < hard
    {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard).ok();
    }
}

/// CPU time (user + system) of this process so far.
fn cpu_time() -> Duration {
    let u = nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_SELF)
        .expect("getrusage");
    let tv = |t: nix::sys::time::TimeVal| {
        Duration::from_secs(t.tv_sec() as u64) + Duration::from_micros(t.tv_usec() as u64)
    };
    tv(u.user_time()) + tv(u.system_time())
}

/// Stamps of when each node first applied each key.
#[derive(Default)]
struct Seen {
    at: Mutex<HashMap<String, HashMap<usize, Instant>>>,
    count: AtomicUsize,
}

struct Run {
    p50: Duration,
    p99: Duration,
    max: Duration,
    samples: usize,
    missing: usize,
    bytes_per_node_s: f64,
    join: Duration,
    /// Mean encoded SYN (= full digest) size, sealed variant only.
    syn_bytes: Option<u64>,
    /// Process CPU time per node per second of the measurement, in ms.
    cpu_ms_per_node_s: f64,
    /// Envelopes the sealed transport lost to its own limits (codec time-outs, full queues,
    /// incomplete reassemblies), sealed variant only.
    drops: Option<u64>,
}

async fn run(variant: &str, n: usize, interval: Duration, rounds: usize, base: u16) -> Run {
    let addr = |i: usize| SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), base + i as u16);
    let mut nodes = Vec::new();
    for i in 0..n {
        // Node ids like Swarm's (25 random base-36 characters), not `n1, n2, ...`: chitchat
        // compresses its digest (zstd), and sequential ids would make it look smaller than
        // a real cluster's.
        let mut cfg = GossipConfig::new(node_id(i), 1, addr(i));
        cfg.gossip_interval = interval;
        // Rounds alone, as the plain variant: the bench compares what the sealing costs
        // (the push on change is measured by bench/intent.sh, end to end).
        cfg.push_fanout = 0;
        cfg.seeds = (0..3.min(n)).filter(|j| *j != i).map(addr).collect();
        // As the daemon runs it: one frame per IP packet.
        cfg.transport.max_datagram = 1400;
        let node = match variant {
            "sealed" => Node::Sealed(
                GossipNode::spawn_with(
                    &cfg,
                    Keyring::new(1, [1; KEY_LEN]),
                    Arc::new(UdpNet),
                    Some(IpAddr::V4(Ipv4Addr::new(198, 18, 0, 1))),
                    &[],
                )
                .await
                .unwrap(),
            ),
            "plain" => {
                let bytes = Arc::new(AtomicU64::new(0));
                let h = chitchat::spawn_chitchat(
                    chitchat_config(&cfg),
                    vec![("vtep".into(), "1 198.18.0.1".into())],
                    &CountingUdp(bytes.clone()),
                )
                .await
                .unwrap();
                Node::Plain(h, bytes)
            }
            other => panic!("unknown variant {other}"),
        };
        nodes.push(node);
    }
    let t0 = Instant::now();
    for nd in &nodes {
        while nd.live().await < n && t0.elapsed() < Duration::from_secs(180) {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let join = t0.elapsed();
    let seen = Arc::new(Seen::default());
    let mut listeners = Vec::new();
    for (i, nd) in nodes.iter().enumerate() {
        let s = seen.clone();
        listeners.push(
            nd.subscribe(move |e| {
                let now = Instant::now();
                let mut at = s.at.lock().unwrap();
                let per = at.entry(e.key.to_string()).or_default();
                if per.insert(i, now).is_none() {
                    s.count.fetch_add(1, Ordering::Release);
                }
            })
            .await,
        );
    }
    let bytes0: u64 = nodes.iter().map(Node::sent_bytes).sum();
    let cpu0 = cpu_time();
    let tb = Instant::now();
    let mut lat = Vec::new();
    let mut missing = 0;
    for round in 0..rounds {
        let src = (round * 7) % n;
        let rec = ep(round);
        let key = format!("{}/{}", rec.network, rec.task);
        let start = Instant::now();
        nodes[src].publish(&rec).await;
        // Everyone but the source (which may or may not notify itself). The counter only
        // says when to look; looking is one lock per wake-up.
        let mut last = usize::MAX;
        let per = loop {
            let count = seen.count.load(Ordering::Acquire);
            if count != last {
                last = count;
                let at = seen.at.lock().unwrap();
                let per = at.get(&key).cloned().unwrap_or_default();
                drop(at);
                if per.keys().filter(|i| **i != src).count() == n - 1 {
                    break per;
                }
            }
            if start.elapsed() > Duration::from_secs(15) {
                let at = seen.at.lock().unwrap();
                break at.get(&key).cloned().unwrap_or_default();
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        for i in (0..n).filter(|i| *i != src) {
            match per.get(&i) {
                Some(t) => lat.push(t.saturating_duration_since(start)),
                None => missing += 1,
            }
        }
    }
    let secs = tb.elapsed().as_secs_f64();
    let cpu = (cpu_time() - cpu0).as_secs_f64();
    let bytes: u64 = nodes.iter().map(Node::sent_bytes).sum::<u64>() - bytes0;
    let drops: u64 = nodes
        .iter()
        .filter_map(|nd| match nd {
            Node::Sealed(g) => Some(g.counters()),
            Node::Plain(..) => None,
        })
        .map(|c| c.dropped_undecodable + c.dropped_queue_full + c.dropped_partial + c.send_errors)
        .sum();
    let (syns, syn_bytes) = nodes
        .iter()
        .filter_map(|nd| match nd {
            Node::Sealed(g) => Some(g.counters()),
            Node::Plain(..) => None,
        })
        .fold((0, 0), |(a, b), c| (a + c.sent_syn, b + c.sent_syn_bytes));
    drop(listeners);
    for nd in nodes {
        nd.shutdown().await;
    }
    lat.sort();
    let p = |q: f64| {
        lat.get(((lat.len().max(1) - 1) as f64 * q).round() as usize)
            .copied()
            .unwrap_or(Duration::MAX)
    };
    Run {
        p50: p(0.5),
        p99: p(0.99),
        max: lat.last().copied().unwrap_or(Duration::MAX),
        samples: lat.len(),
        missing,
        bytes_per_node_s: bytes as f64 / secs / n as f64,
        join,
        syn_bytes: (syns > 0).then(|| syn_bytes / syns),
        drops: (syns > 0).then_some(drops),
        cpu_ms_per_node_s: cpu * 1e3 / secs / n as f64,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: bench/gossip.sh"]
async fn propagation() {
    raise_fd_limit();
    let sizes: Vec<usize> = env_list("SWARMNET_GOSSIP_NODES", "10")
        .iter()
        .map(|s| s.parse().unwrap())
        .collect();
    let intervals: Vec<u64> = env_list("SWARMNET_GOSSIP_INTERVALS_MS", "500")
        .iter()
        .map(|s| s.parse().unwrap())
        .collect();
    let rounds: usize = std::env::var("SWARMNET_GOSSIP_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20);
    let variants = env_list("SWARMNET_GOSSIP_VARIANTS", "sealed,plain");
    println!(
        "published anchors: NetworkDB ~800 ms quiet at 25 nodes (p90 11 s under churn); \
         Serf model 99.99% of nodes in 1.7 s at 30 nodes (200 ms interval, fanout 3)"
    );
    println!(
        "variant  nodes interval  p50      p99      max      samples missing  B/s/node  join   SYN bytes  drops  CPU ms/s/node"
    );
    let mut base = 20_000u16;
    for &ms in &intervals {
        for &n in &sizes {
            for v in &variants {
                let r = run(v, n, Duration::from_millis(ms), rounds, base).await;
                base = base.wrapping_add(n as u16 + 10);
                if base > 60_000 {
                    base = 20_000;
                }
                println!(
                    "{v:<8} {n:>5} {ms:>6}ms  {:>7.0}ms {:>7.0}ms {:>7.0}ms {:>7} {:>7} {:>9.0}  {:>5.1}s {:>9} {:>6} {:>8.1}",
                    r.p50.as_secs_f64() * 1e3,
                    r.p99.as_secs_f64() * 1e3,
                    r.max.as_secs_f64() * 1e3,
                    r.samples,
                    r.missing,
                    r.bytes_per_node_s,
                    r.join.as_secs_f64(),
                    r.syn_bytes.map_or("-".into(), |b| b.to_string()),
                    r.drops.map_or("-".into(), |b| b.to_string()),
                    r.cpu_ms_per_node_s
                );
            }
        }
    }
}
