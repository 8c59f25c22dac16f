//! The resolver in real network namespaces, asked by real clients (`dig`, `kdig` through
//! `nsenter --net=<file>`), privileged (gated by `swarmnet_tests_netns::gate::privileged`).
//!
//! Each test builds its own scratch namespaces as bind mounts in a temporary directory
//! (removed by a drop guard, even on failure) and never touches the machine's root namespace.
//! The test upstream runs in its own namespace, joined to the client sandbox by a veth pair
//! with 198.18.53.0/30 addresses: a loopback upstream would be refused by design.

mod dns_common;

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use dns_common::{a_records, intent, parse, query, tid};
use hickory_proto::op::{Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{RData, Record, RecordType};
use swarmnet_model::Intent;
use swarmnet_netd::dns::{
    DenyAnswer, DnsServer, DnsServerConfig, ForwardConfig, SandboxDns, ViewOptions,
};
use swarmnet_netd::linux::netns;

const UPSTREAM: Ipv4Addr = Ipv4Addr::new(198, 18, 53, 2);
/// What the test upstream answers for every A query.
const UPSTREAM_ANSWER: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 99);

/// Scratch namespaces; dropping removes them all.
struct Lab {
    dir: tempfile::TempDir,
    names: Vec<PathBuf>,
}

impl Lab {
    fn new() -> Self {
        Self {
            dir: tempfile::tempdir().unwrap(),
            names: Vec::new(),
        }
    }

    fn ns(&mut self, name: &str) -> PathBuf {
        let p = self.dir.path().join(name);
        netns::create(&p).unwrap();
        self.names.push(p.clone());
        sh(&p, &["ip", "link", "set", "lo", "up"]);
        p
    }

    /// A veth pair between `a` (198.18.53.1/30) and `b` (198.18.53.2/30).
    fn link(&self, a: &Path, b: &Path) {
        sh(
            a,
            &[
                "ip", "link", "add", "snt0", "type", "veth", "peer", "name", "snt1",
            ],
        );
        sh(
            a,
            &["ip", "link", "set", "snt1", "netns", b.to_str().unwrap()],
        );
        sh(a, &["ip", "addr", "add", "198.18.53.1/30", "dev", "snt0"]);
        sh(a, &["ip", "link", "set", "snt0", "up"]);
        sh(b, &["ip", "addr", "add", "198.18.53.2/30", "dev", "snt1"]);
        sh(b, &["ip", "link", "set", "snt1", "up"]);
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for p in &self.names {
            if let Err(e) = netns::remove(p) {
                eprintln!("cleanup {}: {e}", p.display());
            }
        }
    }
}

fn nsenter(ns: &Path, argv: &[&str]) -> std::process::Output {
    Command::new("nsenter")
        .arg(format!("--net={}", ns.display()))
        .arg("--")
        .args(argv)
        .output()
        .unwrap()
}

fn sh(ns: &Path, argv: &[&str]) -> String {
    let out = nsenter(ns, argv);
    assert!(
        out.status.success(),
        "{argv:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `dig @127.0.0.11 <args>` in `ns`, one try, 2 s.
fn dig(ns: &Path, args: &[&str]) -> String {
    let mut argv = vec!["dig", "@127.0.0.11", "+time=2", "+tries=1"];
    argv.extend_from_slice(args);
    sh(ns, &argv)
}

fn kdig(ns: &Path, args: &[&str]) -> String {
    let mut argv = vec!["kdig", "@127.0.0.11", "+time=2", "+retry=0"];
    argv.extend_from_slice(args);
    sh(ns, &argv)
}

fn lines(s: &str) -> Vec<String> {
    let mut v: Vec<String> = s
        .lines()
        .map(str::to_string)
        .filter(|l| !l.is_empty())
        .collect();
    v.sort();
    v
}

fn status_of(out: &str) -> &str {
    out.split("status: ")
        .nth(1)
        .and_then(|s| s.split(',').next())
        .unwrap_or("?")
}

fn server(forward_timeout: Duration) -> DnsServer {
    DnsServer::start(DnsServerConfig {
        forward: ForwardConfig {
            timeout: forward_timeout,
            attempts: 2,
        },
        ..DnsServerConfig::default()
    })
    .unwrap()
}

fn sandbox(intent: &Intent, task: &str, netns: &Path, upstreams: &[SocketAddr]) -> SandboxDns {
    SandboxDns::for_task(
        intent,
        &tid(task),
        netns.to_path_buf(),
        &ViewOptions::default(),
        upstreams,
        DenyAnswer::Refused,
    )
}

/// A DNS responder on UDP and TCP 198.18.53.2:53 inside `ns`, on its own thread that entered
/// `ns` and does nothing else. A queries get [`UPSTREAM_ANSWER`]; `big.example` gets 100
/// records (TC over UDP without EDNS). Counts the queries it sees.
struct Upstream {
    seen: Arc<AtomicUsize>,
    /// (query ID, source port) of every UDP query seen.
    udp_origins: Arc<std::sync::Mutex<Vec<(u16, u16)>>>,
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ignored = t.join();
        }
    }
}

fn upstream_answer(q: &[u8], udp: bool) -> Option<Vec<u8>> {
    let req = Message::from_vec(q).ok()?;
    let query = req.queries.first()?.clone();
    let mut resp = Message::new(req.id, MessageType::Response, OpCode::Query);
    resp.metadata.recursion_available = true;
    resp.metadata.recursion_desired = req.recursion_desired;
    resp.add_query(query.clone());
    let big = query.name().to_ascii().eq_ignore_ascii_case("big.example.");
    if query.query_type() == RecordType::A {
        let n = if big { 100 } else { 1 };
        for i in 0..n {
            let ip = if big {
                Ipv4Addr::new(192, 0, 2, i)
            } else {
                UPSTREAM_ANSWER
            };
            resp.add_answer(Record::from_rdata(
                query.name().clone(),
                30,
                RData::A(A(ip)),
            ));
        }
    }
    if big && udp {
        resp.answers.truncate(10);
        resp.metadata.truncation = true;
    }
    resp.to_vec().ok()
}

fn start_upstream(ns: &Path) -> Upstream {
    start_dns_at(ns, SocketAddr::from((UPSTREAM, 53)))
}

/// The same responder on `addr` (e.g. a task's own DNS server on 0.0.0.0:53).
fn start_dns_at(ns: &Path, addr: SocketAddr) -> Upstream {
    let seen = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let udp_origins = Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut threads = Vec::new();
    for tcp in [false, true] {
        let (seen, stop, origins) = (seen.clone(), stop.clone(), udp_origins.clone());
        let file = netns::open(ns).unwrap();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        threads.push(std::thread::spawn(move || {
            nix::sched::setns(file.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            if tcp {
                let l = std::net::TcpListener::bind(addr).unwrap();
                l.set_nonblocking(true).unwrap();
                ready_tx.send(()).unwrap();
                while !stop.load(Ordering::Relaxed) {
                    let Ok((mut s, _)) = l.accept() else {
                        std::thread::sleep(Duration::from_millis(5));
                        continue;
                    };
                    use std::io::{Read, Write};
                    s.set_nonblocking(false).unwrap();
                    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
                    let mut len = [0u8; 2];
                    if s.read_exact(&mut len).is_err() {
                        continue;
                    }
                    let mut q = vec![0u8; usize::from(u16::from_be_bytes(len))];
                    if s.read_exact(&mut q).is_err() {
                        continue;
                    }
                    seen.fetch_add(1, Ordering::Relaxed);
                    if let Some(a) = upstream_answer(&q, false) {
                        let _ignored = s.write_all(&(a.len() as u16).to_be_bytes());
                        let _ignored = s.write_all(&a);
                    }
                }
            } else {
                let u = UdpSocket::bind(addr).unwrap();
                u.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
                ready_tx.send(()).unwrap();
                let mut buf = [0u8; 4096];
                while !stop.load(Ordering::Relaxed) {
                    let Ok((n, peer)) = u.recv_from(&mut buf) else {
                        continue;
                    };
                    seen.fetch_add(1, Ordering::Relaxed);
                    if n >= 2 {
                        origins
                            .lock()
                            .unwrap()
                            .push((u16::from_be_bytes([buf[0], buf[1]]), peer.port()));
                    }
                    if let Some(a) = upstream_answer(&buf[..n], true) {
                        let _ignored = u.send_to(&a, peer);
                    }
                }
            }
        }));
        ready_rx.recv_timeout(Duration::from_secs(5)).unwrap();
    }
    Upstream {
        seen,
        udp_origins,
        stop,
        threads,
    }
}

fn up() -> Vec<SocketAddr> {
    vec![SocketAddr::from((UPSTREAM, 53))]
}

#[test]
fn cluster_names_with_dig_and_kdig() {
    if !swarmnet_tests_netns::gate::privileged("cluster_names_with_dig_and_kdig") {
        return;
    }
    let mut lab = Lab::new();
    let sb = lab.ns("sb-w1");
    let intent = intent(0);
    let mut srv = server(Duration::from_millis(500));
    let errs = srv.set_sandboxes(BTreeMap::from([(
        tid("w1"),
        sandbox(&intent, "w1", &sb, &up()),
    )]));
    assert!(errs.is_empty(), "{errs:?}");

    assert_eq!(dig(&sb, &["+short", "web"]).trim(), "10.10.0.2");
    assert_eq!(dig(&sb, &["+short", "WWW."]).trim(), "10.10.0.2");
    assert_eq!(
        lines(&dig(&sb, &["+short", "api"])),
        vec!["10.10.0.20", "10.10.0.21"]
    );
    assert_eq!(
        lines(&dig(&sb, &["+short", "tasks.api"])),
        vec!["10.10.0.20", "10.10.0.21"]
    );
    assert_eq!(dig(&sb, &["+short", "api.2.a2"]).trim(), "10.10.0.21");
    assert_eq!(dig(&sb, &["+short", "web.1"]).trim(), "10.10.0.10");
    assert_eq!(dig(&sb, &["+short", "front"]).trim(), "10.10.0.10");
    let aaaa = dig(&sb, &["web", "AAAA"]);
    assert_eq!(status_of(&aaaa), "NOERROR");
    assert!(aaaa.contains("ANSWER: 0"), "{aaaa}");
    assert_eq!(dig(&sb, &["+short", "-x", "10.10.0.2"]).trim(), "web.");
    assert_eq!(
        dig(&sb, &["+short", "-x", "10.10.0.20"]).trim(),
        "api.1.a1."
    );
    assert_eq!(
        dig(&sb, &["+short", "_http._tcp.web", "SRV"]).trim(),
        "0 100 80 web."
    );
    assert_eq!(
        lines(&dig(&sb, &["+short", "_grpc._tcp.api", "SRV"])),
        vec!["0 50 9000 api.1.a1.", "0 50 9000 api.2.a2."]
    );
    // pg lives on db only, which w1 is not attached to.
    assert_eq!(status_of(&dig(&sb, &["pg"])), "NXDOMAIN");
    assert_eq!(status_of(&dig(&sb, &["primary"])), "NXDOMAIN");
    // kdig, over UDP and TCP.
    assert_eq!(kdig(&sb, &["+short", "web"]).trim(), "10.10.0.2");
    assert_eq!(
        lines(&kdig(&sb, &["+short", "+tcp", "tasks.api"])),
        vec!["10.10.0.20", "10.10.0.21"]
    );
    assert_eq!(
        kdig(&sb, &["+short", "+tcp", "-x", "10.10.0.2"]).trim(),
        "web."
    );

    // A new view shows at once: scale api to one task.
    let mut live: std::collections::BTreeSet<_> = ["w1", "a1"].iter().map(|s| tid(s)).collect();
    live.insert(tid("p1"));
    let opts = ViewOptions {
        ttl: 5,
        live: Some(live),
    };
    let mut sbd = sandbox(&intent, "w1", &sb, &up());
    sbd.view = Arc::new(swarmnet_netd::dns::DnsView::build(
        &intent,
        &tid("w1"),
        &opts,
    ));
    assert!(
        srv.set_sandboxes(BTreeMap::from([(tid("w1"), sbd)]))
            .is_empty()
    );
    assert_eq!(dig(&sb, &["+short", "api"]).trim(), "10.10.0.20");

    // Removed: nothing listens any more.
    assert!(srv.set_sandboxes(BTreeMap::new()).is_empty());
    let out = nsenter(&sb, &["dig", "@127.0.0.11", "+time=1", "+tries=1", "web"]);
    assert!(
        !out.status.success()
            || String::from_utf8_lossy(&out.stdout).contains("connection refused")
    );
}

#[test]
fn dnsrr_300_truncated_over_udp_whole_over_tcp() {
    if !swarmnet_tests_netns::gate::privileged("dnsrr_300_truncated_over_udp_whole_over_tcp") {
        return;
    }
    let mut lab = Lab::new();
    let sb = lab.ns("sb-c1");
    let intent = intent(300);
    let mut srv = server(Duration::from_millis(500));
    assert!(
        srv.set_sandboxes(BTreeMap::from([(
            tid("c1"),
            sandbox(&intent, "c1", &sb, &up())
        )]))
        .is_empty()
    );

    let udp = dig(&sb, &["+ignore", "+notcp", "+noedns", "many"]);
    assert!(udp.contains(" tc"), "TC expected: {udp}");
    let n_udp = udp
        .lines()
        .filter(|l| l.starts_with("many.") && l.contains("\tA\t"))
        .count();
    assert!(n_udp > 0 && n_udp < 300, "{n_udp} records over UDP");
    // dig's default: retry over TCP on TC, and get everything.
    assert_eq!(lines(&dig(&sb, &["+short", "many"])).len(), 300);
    assert_eq!(
        lines(&dig(&sb, &["+short", "+tcp", "tasks.many"])).len(),
        300
    );
    assert_eq!(lines(&kdig(&sb, &["+short", "+tcp", "many"])).len(), 300);
    let k = kdig(&sb, &["+notcp", "+ignore", "+noedns", "many"]);
    assert!(k.contains(" tc"), "{k}");
}

#[test]
fn malformed_packets_then_a_good_query() {
    if !swarmnet_tests_netns::gate::privileged("malformed_packets_then_a_good_query") {
        return;
    }
    let mut lab = Lab::new();
    let sb = lab.ns("sb-w1");
    let intent = intent(0);
    let mut srv = server(Duration::from_millis(500));
    assert!(
        srv.set_sandboxes(BTreeMap::from([(
            tid("w1"),
            sandbox(&intent, "w1", &sb, &up())
        )]))
        .is_empty()
    );
    let file = netns::open(&sb).unwrap();
    let sock = netns::run_in(&file, || UdpSocket::bind("127.0.0.1:0")).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let bad: Vec<Vec<u8>> = vec![
        vec![1, 2, 3],
        vec![0, 1, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0xC0, 12, 0, 1, 0, 1],
        vec![0, 2, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 63, b'a', 0, 0, 1, 0, 1],
        vec![0, 3, 0x10, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 1],
        (0..512).map(|i| (i * 37 % 251) as u8).collect(),
    ];
    for b in &bad {
        sock.send_to(b, "127.0.0.11:53").unwrap();
    }
    let mut buf = [0u8; 4096];
    // FORMERR for the loop and the bad label, NOTIMP for opcode 2; the others get nothing.
    let mut codes = Vec::new();
    sock.set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    while let Ok(n) = sock.recv(&mut buf) {
        let m = parse(&buf[..n]);
        codes.push((m.id, m.response_code));
    }
    assert!(codes.contains(&(1, ResponseCode::FormErr)), "{codes:?}");
    assert!(codes.contains(&(2, ResponseCode::FormErr)), "{codes:?}");
    assert!(codes.contains(&(3, ResponseCode::NotImp)), "{codes:?}");
    assert_eq!(dig(&sb, &["+short", "web"]).trim(), "10.10.0.2");
}

#[test]
fn forwarding_internal_and_self_upstream() {
    if !swarmnet_tests_netns::gate::privileged("forwarding_internal_and_self_upstream") {
        return;
    }
    let mut lab = Lab::new();
    let sb = lab.ns("sb-w1");
    let sb_internal = lab.ns("sb-p1");
    let sb_self = lab.ns("sb-a1");
    let upns = lab.ns("upstream");
    lab.link(&sb, &upns);
    let upstream = start_upstream(&upns);
    let intent = intent(0);
    let mut srv = server(Duration::from_millis(500));
    let own: Vec<SocketAddr> = vec!["127.0.0.11:53".parse().unwrap()];
    let errs = srv.set_sandboxes(BTreeMap::from([
        (tid("w1"), sandbox(&intent, "w1", &sb, &up())),
        (tid("p1"), sandbox(&intent, "p1", &sb_internal, &up())),
        (tid("a1"), sandbox(&intent, "a1", &sb_self, &own)),
    ]));
    assert!(errs.is_empty(), "{errs:?}");

    // Forwarded from inside the sandbox (the upstream is reachable only over its veth).
    assert_eq!(
        dig(&sb, &["+short", "example.com"]).trim(),
        UPSTREAM_ANSWER.to_string()
    );
    assert_eq!(
        kdig(&sb, &["+short", "+tcp", "Example.COM"]).trim(),
        UPSTREAM_ANSWER.to_string()
    );
    // UDP answer truncated upstream: retried over TCP, then cut to the client's size.
    let big = dig(&sb, &["+ignore", "+notcp", "+noedns", "big.example"]);
    assert_eq!(status_of(&big), "NOERROR");
    assert_eq!(
        lines(&dig(&sb, &["+short", "+bufsize=4096", "big.example"])).len(),
        100
    );
    let seen = upstream.seen.load(Ordering::Relaxed);
    assert!(seen >= 5, "upstream saw {seen} queries");
    // Random query IDs and source ports toward the upstream: the same client ID (dig's
    // +qid) asked 8 times leaves with (almost surely) 8 different IDs and ports.
    upstream.udp_origins.lock().unwrap().clear();
    for i in 0..8 {
        dig(&sb, &["+short", "+qid=4242", &format!("r{i}.example")]);
    }
    let origins = upstream.udp_origins.lock().unwrap().clone();
    let ids: std::collections::BTreeSet<u16> = origins.iter().map(|o| o.0).collect();
    let ports: std::collections::BTreeSet<u16> = origins.iter().map(|o| o.1).collect();
    assert!(origins.len() >= 8, "{origins:?}");
    assert!(
        ids.len() >= 7 && !ids.contains(&4242),
        "query IDs not random: {origins:?}"
    );
    assert!(ports.len() >= 7, "source ports not random: {origins:?}");
    let seen = upstream.seen.load(Ordering::Relaxed);
    assert!(srv.stats(&tid("w1")).unwrap().forwarded >= 4);

    // Internal only: REFUSED, and nothing reaches the upstream.
    let out = dig(&sb_internal, &["example.com"]);
    assert_eq!(status_of(&out), "REFUSED");
    assert_eq!(dig(&sb_internal, &["+short", "pg"]).trim(), "10.11.0.2");
    assert_eq!(
        upstream.seen.load(Ordering::Relaxed),
        seen,
        "the internal sandbox forwarded"
    );

    // Own upstream: SERVFAIL at once, no loop.
    let t = Instant::now();
    let out = dig(&sb_self, &["example.com"]);
    assert_eq!(status_of(&out), "SERVFAIL");
    assert!(
        t.elapsed() < Duration::from_millis(500),
        "took {:?}",
        t.elapsed()
    );
    assert_eq!(upstream.seen.load(Ordering::Relaxed), seen);
}

#[test]
fn one_sandbox_flooding_does_not_starve_another() {
    if !swarmnet_tests_netns::gate::privileged("one_sandbox_flooding_does_not_starve_another") {
        return;
    }
    let mut lab = Lab::new();
    let flood_ns = lab.ns("sb-a1");
    let calm_ns = lab.ns("sb-w1");
    let intent = intent(0);
    let mut srv = server(Duration::from_millis(500));
    assert!(
        srv.set_sandboxes(BTreeMap::from([
            (tid("a1"), sandbox(&intent, "a1", &flood_ns, &up())),
            (tid("w1"), sandbox(&intent, "w1", &calm_ns, &up())),
        ]))
        .is_empty()
    );
    let flood_sock = netns::run_in(netns::open(&flood_ns).unwrap(), || {
        UdpSocket::bind("127.0.0.1:0")
    })
    .unwrap();
    let calm_sock = netns::run_in(netns::open(&calm_ns).unwrap(), || {
        UdpSocket::bind("127.0.0.1:0")
    })
    .unwrap();
    flood_sock.set_nonblocking(true).unwrap();
    calm_sock
        .set_read_timeout(Some(Duration::from_secs(1)))
        .unwrap();

    // 20k queries in about 2 s, answers never read (so the flooder's own buffers fill too).
    let stop = Arc::new(AtomicBool::new(false));
    let flooder = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let q = query(1, "tasks.api", RecordType::A, None);
            let start = Instant::now();
            let mut sent = 0u32;
            while sent < 20_000
                && !stop.load(Ordering::Relaxed)
                && start.elapsed() < Duration::from_secs(4)
            {
                if flood_sock.send_to(&q, "127.0.0.11:53").is_ok() {
                    sent += 1;
                }
                if sent.is_multiple_of(200) {
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
            sent
        })
    };
    let mut ok = 0;
    let mut buf = [0u8; 4096];
    let start = Instant::now();
    for i in 0..250u16 {
        let q = query(i, "web", RecordType::A, None);
        calm_sock.send_to(&q, "127.0.0.11:53").unwrap();
        let n = calm_sock
            .recv(&mut buf)
            .expect("the calm sandbox's query timed out");
        let m = parse(&buf[..n]);
        assert_eq!(
            (m.id, a_records(&m)),
            (i, vec![Ipv4Addr::new(10, 10, 0, 2)])
        );
        ok += 1;
        std::thread::sleep(Duration::from_millis(8));
    }
    stop.store(true, Ordering::Relaxed);
    let sent = flooder.join().unwrap();
    assert_eq!(ok, 250);
    let flood_stats = srv.stats(&tid("a1")).unwrap();
    eprintln!(
        "flood: sent {sent}, server saw {} in {:?}; calm: 250/250 answered",
        flood_stats.udp_queries,
        start.elapsed()
    );
    assert!(
        sent >= 10_000,
        "the flood was too small to mean anything: {sent}"
    );
}

/// Docker's layout, stateless: the resolver's sockets on random ports of 127.0.0.11, the
/// ports rewritten from and to 53 in the sandbox without conntrack. A task runs its own DNS
/// server on 0.0.0.0:53 (UDP and TCP) beside it: the task's `dig @127.0.0.11` still gets
/// cluster answers, a peer asking the task's address gets the task's server, and the queries
/// leave no conntrack entry. A foreign delete or edit of the table is restored by
/// `repair_redirect` and shown by `drift`; removing the sandbox from the resolver removes the
/// table from a namespace that lives on.
#[test]
fn redirect_leaves_port_53_to_the_task() {
    if !swarmnet_tests_netns::gate::privileged("redirect_leaves_port_53_to_the_task") {
        return;
    }
    let mut lab = Lab::new();
    let peer = lab.ns("peer");
    let sb = lab.ns("sb-w1");
    lab.link(&peer, &sb);
    // The task's own server first: port 53 is free for it.
    let task_dns = start_dns_at(&sb, SocketAddr::from((Ipv4Addr::UNSPECIFIED, 53)));
    let intent = intent(0);
    let mut srv = server(Duration::from_millis(500));
    let errs = srv.set_sandboxes(BTreeMap::from([(
        tid("w1"),
        sandbox(&intent, "w1", &sb, &[]),
    )]));
    assert!(errs.is_empty(), "{errs:?}");

    // The resolver's sockets are not on port 53.
    let socks = sh(&sb, &["ss", "-lnutH"]);
    assert!(
        socks
            .lines()
            .any(|l| l.contains("127.0.0.11:") && !l.contains("127.0.0.11:53 ")),
        "{socks}"
    );
    // Inside the sandbox: cluster answers at 127.0.0.11, UDP and TCP.
    assert_eq!(dig(&sb, &["+short", "web"]).trim(), "10.10.0.2");
    assert_eq!(kdig(&sb, &["+short", "+tcp", "web"]).trim(), "10.10.0.2");
    // From a peer, the task's address on port 53 is the task's own server, UDP and TCP.
    let ask_task = |tcp: &str| {
        sh(
            &peer,
            &[
                "dig",
                "@198.18.53.2",
                "+time=2",
                "+tries=1",
                tcp,
                "+short",
                "web",
            ],
        )
    };
    assert_eq!(ask_task("+notcp").trim(), UPSTREAM_ANSWER.to_string());
    assert_eq!(ask_task("+tcp").trim(), UPSTREAM_ANSWER.to_string());
    assert!(task_dns.seen.load(Ordering::Relaxed) >= 2);

    let table = sh(&sb, &["nft", "list", "table", "ip", "swarmnet-dns"]);
    for proto in ["udp", "tcp"] {
        assert!(
            table.contains(&format!(
                "ip daddr 127.0.0.11 {proto} dport 53 notrack {proto} dport set "
            )) && table.contains(&format!("notrack {proto} sport set 53")),
            "{table}"
        );
    }
    // Stateless: the queries above left no conntrack entry in the sandbox.
    let ct = sh(&sb, &["conntrack", "-L", "-d", "127.0.0.11"]);
    assert!(!ct.contains("127.0.0.11"), "conntrack entries: {ct}");
    // Unchanged: nothing to repair, no drift.
    assert_eq!(srv.repair_redirect(), vec![]);
    assert_eq!(srv.drift(), vec![]);
    // A foreign delete: 127.0.0.11:53 no longer reaches the resolver (it reaches the task's
    // 0.0.0.0:53 server, whose unconnected reply leaves from 127.0.0.1 and dig drops it).
    sh(&sb, &["nft", "delete", "table", "ip", "swarmnet-dns"]);
    let out = nsenter(
        &sb,
        &["dig", "@127.0.0.11", "+time=1", "+tries=1", "+short", "web"],
    );
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains("10.10.0.2"),
        "the resolver answered without its redirect"
    );
    let drift = srv.drift();
    assert_eq!(drift.len(), 1, "{drift:?}");
    assert!(drift[0].1.contains("missing"), "{drift:?}");
    let repaired = srv.repair_redirect();
    assert_eq!(repaired.len(), 1, "{repaired:?}");
    assert_eq!(repaired[0].0, tid("w1"));
    assert_eq!(dig(&sb, &["+short", "web"]).trim(), "10.10.0.2");
    // A hand edit that keeps the table: the reply rewrite of UDP deleted. Queries now go
    // unanswered from the client's view (the reply leaves from the random port); seen as drift
    // naming the missing rule, and restored.
    let listing = sh(
        &sb,
        &["nft", "-a", "list", "chain", "ip", "swarmnet-dns", "output"],
    );
    let handle = listing
        .lines()
        .find(|l| l.contains("udp sport set 53"))
        .and_then(|l| l.rsplit("# handle ").next())
        .expect("reply rule with a handle")
        .trim()
        .to_string();
    sh(
        &sb,
        &[
            "nft",
            "delete",
            "rule",
            "ip",
            "swarmnet-dns",
            "output",
            "handle",
            &handle,
        ],
    );
    let drift = srv.drift();
    assert_eq!(drift.len(), 1, "{drift:?}");
    assert!(drift[0].1.contains("add udp from 127.0.0.11:"), "{drift:?}");
    assert_eq!(srv.repair_redirect().len(), 1);
    assert_eq!(srv.drift(), vec![]);
    assert_eq!(dig(&sb, &["+short", "web"]).trim(), "10.10.0.2");
    let inspect = srv.inspect();
    let d = inspect[&tid("w1")]
        .redirect
        .clone()
        .expect("redirect in inspect");
    assert_eq!(d.in_kernel, Some(true));
    assert_eq!(d.rules.len(), 4);
    assert_eq!(d.drift, None);

    // Removed from the resolver while the namespace lives on: the table goes too.
    srv.set_sandboxes(BTreeMap::new());
    let out = nsenter(&sb, &["nft", "list", "table", "ip", "swarmnet-dns"]);
    assert!(!out.status.success(), "table left behind");
    drop(task_dns);
}

/// The per-sandbox caps: a sandbox holding its in-flight forward cap (an upstream that never
/// answers) gets SERVFAIL at once for the rest, and one holding its TCP connection cap has
/// new connections closed at once; another sandbox on the same server resolves meanwhile,
/// over UDP and TCP, and its counters show no cap hit.
#[test]
fn caps_on_forwards_and_tcp_connections_are_per_sandbox() {
    if !swarmnet_tests_netns::gate::privileged(
        "caps_on_forwards_and_tcp_connections_are_per_sandbox",
    ) {
        return;
    }
    use std::io::Read;
    let mut lab = Lab::new();
    let up_ns = lab.ns("up");
    let a = lab.ns("sb-w1");
    let b = lab.ns("sb-a1");
    lab.link(&a, &up_ns);
    // An upstream that takes queries and never answers.
    let blackhole = netns::run_in(netns::open(&up_ns).unwrap(), || {
        UdpSocket::bind(SocketAddr::from((UPSTREAM, 53)))
    })
    .unwrap();
    let intent = intent(0);
    let mut srv = DnsServer::start(DnsServerConfig {
        forward: ForwardConfig {
            timeout: Duration::from_secs(4),
            attempts: 1,
        },
        max_inflight_forwards: 4,
        max_tcp_connections: 2,
        ..DnsServerConfig::default()
    })
    .unwrap();
    let errs = srv.set_sandboxes(BTreeMap::from([
        (tid("w1"), sandbox(&intent, "w1", &a, &up())),
        (tid("a1"), sandbox(&intent, "a1", &b, &up())),
    ]));
    assert!(errs.is_empty(), "{errs:?}");

    // Ten outside names from A at once: four wait on the upstream, six get SERVFAIL now.
    let resolver = SocketAddr::from((Ipv4Addr::new(127, 0, 0, 11), 53));
    let client = netns::run_in(netns::open(&a).unwrap(), || {
        UdpSocket::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))
    })
    .unwrap();
    for i in 0..10u16 {
        let q = query(100 + i, &format!("n{i}.example"), RecordType::A, None);
        client.send_to(&q, resolver).unwrap();
    }
    client
        .set_read_timeout(Some(Duration::from_millis(1500)))
        .unwrap();
    let mut servfail = 0;
    let mut buf = [0u8; 512];
    while let Ok(n) = client.recv(&mut buf) {
        assert_eq!(parse(&buf[..n]).response_code, ResponseCode::ServFail);
        servfail += 1;
    }
    assert_eq!(servfail, 6, "answered at once past the cap");
    assert_eq!(srv.stats(&tid("w1")).unwrap().forward_cap_hit, 6);

    // A holds its two TCP connections; a third is closed at once.
    let held: Vec<std::net::TcpStream> = (0..2)
        .map(|_| {
            netns::run_in(netns::open(&a).unwrap(), || {
                std::net::TcpStream::connect(resolver)
            })
            .unwrap()
        })
        .collect();
    let mut third = netns::run_in(netns::open(&a).unwrap(), || {
        std::net::TcpStream::connect(resolver)
    })
    .unwrap();
    third
        .set_read_timeout(Some(Duration::from_secs(3)))
        .unwrap();
    let mut one = [0u8; 1];
    assert_eq!(third.read(&mut one).unwrap_or(0), 0, "closed by the cap");
    let a_stats = srv.stats(&tid("w1")).unwrap();
    assert_eq!(a_stats.tcp_cap_hit, 1);

    // B is untouched: cluster names over UDP and TCP, no cap hit of its own.
    assert_eq!(dig(&b, &["+short", "web"]).trim(), "10.10.0.2");
    assert_eq!(kdig(&b, &["+short", "+tcp", "web"]).trim(), "10.10.0.2");
    let b_stats = srv.stats(&tid("a1")).unwrap();
    assert_eq!((b_stats.forward_cap_hit, b_stats.tcp_cap_hit), (0, 0));

    // A's held connections closed: A's TCP works again.
    drop(held);
    retry_until(Duration::from_secs(5), || {
        kdig(&a, &["+short", "+tcp", "web"]).trim() == "10.10.0.2"
    });
    drop(blackhole);
}

/// Polls `ok` until it holds or `within` passes (then fails).
fn retry_until(within: Duration, mut ok: impl FnMut() -> bool) {
    let end = Instant::now() + within;
    while !ok() {
        assert!(Instant::now() < end, "condition not met within {within:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}
