//! End-to-end tests of the embedded resolver at 127.0.0.11 through real netd processes on
//! multi-node topologies: names, scoping, forwarding to a test upstream, the loop guard, a
//! 300-task DNSRR answer, answers following a scaled service on every node, malformed input and
//! one flooding sandbox beside a calm one.
//!
//! Clients are real: `dig`, `kdig`, `getent` and `curl` (run "like a task": in the task's network
//! namespace with its own resolv.conf bind-mounted in a private mount namespace), plus a UDP
//! socket opened inside a sandbox for what needs exact bytes or timing (malformed packets, the
//! flood, millisecond polling of an answer).
//!
//! Every netd gets `--dns-upstreams` (a test upstream in the topology's own namespace, or
//! `none`): the machine's resolvers never see test traffic. The test upstream lives in the
//! namespace `<topo>-up`, attached to the underlay bridge with `198.18.<k>.53`; sandboxes reach
//! it through their node's gateway bridge (masquerade in the node namespace).

use std::collections::BTreeSet;
use std::fs::File;
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result, anyhow, bail, ensure};
use serde_json::{Value, json};
use swarmnet_tests_netns::gate;
use swarmnet_tests_netns::topo::{self, CMD_TIMEOUT, CONVERGE_TIMEOUT, Output, Topology, retry};

const SLEEP: &[&str] = &["sleep", "infinity"];
/// What the test upstream answers for every A query.
const UPSTREAM_ANSWER: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 99);
/// Limit for an answer to follow an intent change in the tests (the issue's bound is 100 ms
/// after netd sees the change; this is generous for a loaded 2-core machine and a debug build).
const FOLLOW: Duration = Duration::from_secs(5);

// ---------------------------------------------------------------------------------------------
// A minimal DNS codec for the socket client and the test upstream (no dependency on netd's).

mod wire {
    use std::net::Ipv4Addr;

    use anyhow::{Result, bail, ensure};

    pub const A: u16 = 1;

    /// A query for `name` with RD set; with `edns`, an OPT record advertising that size.
    pub fn query(id: u16, name: &str, qtype: u16, edns: Option<u16>) -> Vec<u8> {
        let mut q = Vec::with_capacity(64);
        q.extend_from_slice(&id.to_be_bytes());
        q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, u8::from(edns.is_some())]);
        for label in name
            .trim_end_matches('.')
            .split('.')
            .filter(|l| !l.is_empty())
        {
            q.push(u8::try_from(label.len()).expect("label under 64 bytes"));
            q.extend_from_slice(label.as_bytes());
        }
        q.push(0);
        q.extend_from_slice(&qtype.to_be_bytes());
        q.extend_from_slice(&[0, 1]);
        if let Some(size) = edns {
            q.extend_from_slice(&[0, 0, 41]);
            q.extend_from_slice(&size.to_be_bytes());
            q.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
        }
        q
    }

    /// Index just past the (possibly compressed) name starting at `i`.
    pub fn skip_name(b: &[u8], mut i: usize) -> Option<usize> {
        for _ in 0..128 {
            let l = *b.get(i)?;
            match l & 0xC0 {
                0 if l == 0 => return Some(i + 1),
                0 => i += 1 + usize::from(l),
                0xC0 => return b.get(i + 1).map(|_| i + 2),
                _ => return None,
            }
        }
        None
    }

    fn u16_at(b: &[u8], i: usize) -> Option<u16> {
        Some(u16::from_be_bytes([*b.get(i)?, *b.get(i + 1)?]))
    }

    /// The parts of an answer the tests look at.
    #[derive(Debug, Clone)]
    pub struct Reply {
        pub id: u16,
        pub rcode: u8,
        pub tc: bool,
        pub ancount: u16,
        /// A records of the answer section, in order.
        pub a: Vec<Ipv4Addr>,
    }

    /// Parses a reply; fails unless every record announced in the header is whole and the
    /// message ends exactly after the last one.
    pub fn parse(b: &[u8]) -> Result<Reply> {
        ensure!(b.len() >= 12, "{} bytes: shorter than a header", b.len());
        let count = |i| u16_at(b, i).unwrap_or(0);
        let (qd, an, ns, ar) = (count(4), count(6), count(8), count(10));
        let mut i = 12;
        for _ in 0..qd {
            let Some(j) = skip_name(b, i) else {
                bail!("bad question name")
            };
            i = j + 4;
        }
        let mut a = Vec::new();
        for n in 0..(u32::from(an) + u32::from(ns) + u32::from(ar)) {
            let Some(j) = skip_name(b, i) else {
                bail!("record {n}: bad owner name at {i}")
            };
            let (Some(ty), Some(len)) = (u16_at(b, j), u16_at(b, j + 8)) else {
                bail!("record {n}: cut in its fixed part")
            };
            let data = j + 10;
            let end = data + usize::from(len);
            ensure!(
                end <= b.len(),
                "record {n}: rdata cut ({end} > {})",
                b.len()
            );
            if n < u32::from(an) && ty == A && len == 4 {
                a.push(Ipv4Addr::new(
                    b[data],
                    b[data + 1],
                    b[data + 2],
                    b[data + 3],
                ));
            }
            i = end;
        }
        ensure!(i == b.len(), "{} bytes after the last record", b.len() - i);
        Ok(Reply {
            id: count(0),
            rcode: b[3] & 0x0F,
            tc: b[2] & 0x02 != 0,
            ancount: an,
            a,
        })
    }

    /// The upstream's answer to `q`: the question echoed, RA set, one A record `ip` for A
    /// queries (none for other types). `None` for what is not a one-question query.
    pub fn upstream_answer(q: &[u8], ip: Ipv4Addr) -> Option<(String, Vec<u8>)> {
        if q.len() < 12 || q[2] & 0x80 != 0 || u16_at(q, 4)? != 1 {
            return None;
        }
        let qend = skip_name(q, 12)? + 4;
        let qtype = u16_at(q, qend - 4)?;
        let name = name_at(q, 12)?;
        let mut r = Vec::with_capacity(qend + 16);
        r.extend_from_slice(&q[..2]);
        r.push(0x80 | (q[2] & 0x79)); // QR, opcode, RD
        r.push(0x80); // RA, NOERROR
        r.extend_from_slice(&[0, 1, 0, u8::from(qtype == A), 0, 0, 0, 0]);
        r.extend_from_slice(q.get(12..qend)?);
        if qtype == A {
            r.extend_from_slice(&[0xC0, 12, 0, 1, 0, 1, 0, 0, 0, 30, 0, 4]);
            r.extend_from_slice(&ip.octets());
        }
        Some((name, r))
    }

    /// The uncompressed name at `i`, lowercase, dotted, no trailing dot.
    fn name_at(b: &[u8], mut i: usize) -> Option<String> {
        let mut out = Vec::new();
        loop {
            let l = usize::from(*b.get(i)?);
            if l == 0 {
                break;
            }
            if l >= 64 {
                return None;
            }
            out.push(String::from_utf8_lossy(b.get(i + 1..i + 1 + l)?).to_ascii_lowercase());
            i += 1 + l;
        }
        Some(out.join("."))
    }
}

// ---------------------------------------------------------------------------------------------
// Helpers

/// Runs `f` on a short-lived thread that entered the network namespace bound at `netns`; a
/// socket made there stays in that namespace.
fn in_netns<T: Send + 'static>(
    netns: &Path,
    f: impl FnOnce() -> std::io::Result<T> + Send + 'static,
) -> Result<T> {
    let file = File::open(netns).with_context(|| format!("opening {}", netns.display()))?;
    std::thread::spawn(move || -> Result<T> {
        nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).context("setns")?;
        Ok(f()?)
    })
    .join()
    .map_err(|_panic| anyhow!("the thread in {} panicked", netns.display()))?
}

/// A UDP socket inside a sandbox, connected to 127.0.0.11:53.
struct Client {
    sock: UdpSocket,
    id: u16,
}

impl Client {
    fn new(netns: &Path) -> Result<Self> {
        let sock = in_netns(netns, || {
            let s = UdpSocket::bind("127.0.0.1:0")?;
            s.connect("127.0.0.11:53")?;
            Ok(s)
        })?;
        Ok(Self { sock, id: 0 })
    }

    /// One query, one answer (stray earlier answers skipped by id), at most `timeout`.
    fn ask(
        &mut self,
        name: &str,
        edns: Option<u16>,
        timeout: Duration,
    ) -> Result<(wire::Reply, usize)> {
        self.id = self.id.wrapping_add(1);
        let id = self.id;
        self.sock.send(&wire::query(id, name, wire::A, edns))?;
        let deadline = Instant::now() + timeout;
        let mut buf = [0u8; 65535];
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            ensure!(!left.is_zero(), "no answer for {name} within {timeout:?}");
            self.sock.set_read_timeout(Some(left))?;
            let n = match self.sock.recv(&mut buf) {
                Ok(n) => n,
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    bail!("no answer for {name} within {timeout:?}")
                }
                Err(e) => return Err(e.into()),
            };
            let r = wire::parse(&buf[..n])?;
            if r.id == id {
                return Ok((r, n));
            }
        }
    }

    /// The A records of `name`, sorted (NOERROR expected).
    fn a_set(&mut self, name: &str) -> Result<Vec<Ipv4Addr>> {
        let (r, _) = self.ask(name, Some(1232), Duration::from_secs(1))?;
        ensure!(r.rcode == 0, "{name}: rcode {}", r.rcode);
        let mut a = r.a;
        a.sort();
        Ok(a)
    }
}

/// `dig @127.0.0.11 +time=2 +tries=1 args...` in the sandbox of `task` on `node`; stdout.
fn dig(topo: &Topology, node: &str, task: &str, args: &[&str]) -> Result<String> {
    let mut argv = vec!["dig", "@127.0.0.11", "+time=2", "+tries=1"];
    argv.extend_from_slice(args);
    Ok(topo.sandbox_exec(node, task, &argv)?.check()?.stdout)
}

fn kdig(topo: &Topology, node: &str, task: &str, args: &[&str]) -> Result<String> {
    let mut argv = vec!["kdig", "@127.0.0.11", "+time=2", "+retry=0"];
    argv.extend_from_slice(args);
    Ok(topo.sandbox_exec(node, task, &argv)?.check()?.stdout)
}

/// Non-empty lines, sorted.
fn lines(s: &str) -> Vec<String> {
    let mut v: Vec<String> = s
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect();
    v.sort();
    v
}

/// The `status:` of a full dig answer.
fn status_of(out: &str) -> &str {
    out.split("status: ")
        .nth(1)
        .and_then(|s| s.split(',').next())
        .unwrap_or("?")
}

fn expect_short(
    topo: &Topology,
    node: &str,
    task: &str,
    args: &[&str],
    want: &[&str],
) -> Result<()> {
    let mut full = vec!["+short"];
    full.extend_from_slice(args);
    let got = lines(&dig(topo, node, task, &full)?);
    let mut want: Vec<String> = want.iter().map(|s| s.to_string()).collect();
    want.sort();
    ensure!(
        got == want,
        "dig {args:?} from {task} on {node}: {got:?}, expected {want:?}"
    );
    Ok(())
}

fn expect_status(
    topo: &Topology,
    node: &str,
    task: &str,
    args: &[&str],
    want: &str,
) -> Result<String> {
    let out = dig(topo, node, task, args)?;
    ensure!(
        status_of(&out) == want,
        "dig {args:?} from {task} on {node}: status {}, expected {want}\n{out}",
        status_of(&out)
    );
    Ok(out)
}

/// Runs `argv` like a task: in its sandbox, with its resolv.conf (nameserver 127.0.0.11)
/// bind-mounted over /etc/resolv.conf in a private mount namespace, no extra flags.
fn as_task(topo: &Topology, node: &str, task: &str, argv: &[&str]) -> Result<Output> {
    let n = topo.node(node);
    let sandbox = n.sandbox_netns(task);
    let resolv = n.run_dir.join("tasks").join(format!("{task}.resolv.conf"));
    ensure!(
        resolv.is_file(),
        "{} is missing: netd did not write the task's resolv.conf",
        resolv.display()
    );
    let resolv = resolv.to_str().context("utf-8 path")?.to_string();
    let mut args = vec![
        "unshare",
        "--mount",
        "sh",
        "-c",
        r#"mount --bind "$1" /etc/resolv.conf && shift && exec "$@""#,
        "sh",
        &resolv,
    ];
    args.extend_from_slice(argv);
    topo::run(topo::nsenter_cmd(&sandbox, &args), None, CMD_TIMEOUT)
}

fn service(name: &str, mode: &str, net: &str, vip: Option<&str>, aliases: &[&str]) -> Value {
    let mut n = json!({"network": net, "aliases": aliases});
    if let Some(v) = vip {
        n["vip"] = json!(v);
    }
    json!({"name": name, "endpoint_mode": mode, "networks": [n],
           "ports": [{"name": "http", "protocol": "tcp", "target": 80}]})
}

#[expect(
    clippy::too_many_arguments,
    reason = "one line per task in the intents below"
)]
fn task(
    id: &str,
    svc: &str,
    slot: u32,
    node: &str,
    net: &str,
    ip: &str,
    aliases: &[&str],
    argv: &[&str],
) -> Value {
    json!({"id": id, "service": svc, "slot": slot, "node": node, "argv": argv,
           "networks": [{"network": net, "ip": ip, "aliases": aliases}]})
}

/// A DNS server in the namespace `<topo>-up` at `198.18.<k>.53:53`, attached to the
/// underlay bridge, UDP and TCP. Answers every A query with [`UPSTREAM_ANSWER`] and records the
/// names it was asked. Stopped (threads joined) on drop.
struct Upstream {
    addr: SocketAddr,
    seen: Arc<AtomicUsize>,
    names: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl Upstream {
    fn start(topo: &Topology) -> Result<Self> {
        let ns = format!("{}-up", topo.name);
        let ul = topo.underlay_ns.clone();
        let addr = Ipv4Addr::new(198, 18, topo.k, 53);
        topo::netns_add(&ns)?;
        let cidr = format!("{addr}/24");
        for args in [
            vec![
                "ip", "-n", &ul, "link", "add", "pup", "type", "veth", "peer", "name", "eth0",
                "netns", &ns,
            ],
            vec!["ip", "-n", &ul, "link", "set", "pup", "master", "ul0", "up"],
            vec!["ip", "-n", &ns, "link", "set", "lo", "up"],
            vec!["ip", "-n", &ns, "link", "set", "eth0", "up"],
            vec!["ip", "-n", &ns, "addr", "add", &cidr, "dev", "eth0"],
        ] {
            topo::host_cmd(&args)?.check()?;
        }
        let netns = Path::new(topo::NETNS_DIR).join(&ns);
        let sock = in_netns(&netns, move || {
            let s = UdpSocket::bind((addr, 53))?;
            s.set_read_timeout(Some(Duration::from_millis(50)))?;
            Ok(s)
        })?;
        let listener = in_netns(&netns, move || {
            let l = std::net::TcpListener::bind((addr, 53))?;
            l.set_nonblocking(true)?;
            Ok(l)
        })?;
        let seen = Arc::new(AtomicUsize::new(0));
        let names = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let note = {
            let (seen, names) = (seen.clone(), names.clone());
            move |name: String| {
                seen.fetch_add(1, Ordering::Relaxed);
                if let Ok(mut v) = names.lock()
                    && v.len() < 100_000
                {
                    v.push(name);
                }
            }
        };
        let udp = {
            let (stop, note) = (stop.clone(), note.clone());
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while !stop.load(Ordering::Relaxed) {
                    let Ok((n, peer)) = sock.recv_from(&mut buf) else {
                        continue;
                    };
                    if let Some((name, answer)) = wire::upstream_answer(&buf[..n], UPSTREAM_ANSWER)
                    {
                        note(name);
                        drop(sock.send_to(&answer, peer));
                    }
                }
            })
        };
        let tcp = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                use std::io::{Read, Write};
                while !stop.load(Ordering::Relaxed) {
                    let Ok((mut s, _)) = listener.accept() else {
                        std::thread::sleep(Duration::from_millis(5));
                        continue;
                    };
                    drop(s.set_nonblocking(false));
                    drop(s.set_read_timeout(Some(Duration::from_secs(2))));
                    // One query per connection is all the resolver sends.
                    let mut len = [0u8; 2];
                    if s.read_exact(&mut len).is_err() {
                        continue;
                    }
                    let mut q = vec![0u8; usize::from(u16::from_be_bytes(len))];
                    if s.read_exact(&mut q).is_err() {
                        continue;
                    }
                    if let Some((name, answer)) = wire::upstream_answer(&q, UPSTREAM_ANSWER) {
                        note(name);
                        let n = u16::try_from(answer.len()).unwrap_or(0).to_be_bytes();
                        drop(s.write_all(&n).and_then(|()| s.write_all(&answer)));
                    }
                }
            })
        };
        Ok(Self {
            addr: SocketAddr::from((addr, 53)),
            seen,
            names,
            stop,
            threads: vec![udp, tcp],
        })
    }

    fn seen(&self) -> usize {
        self.seen.load(Ordering::Relaxed)
    }

    fn asked(&self, name: &str) -> bool {
        self.names
            .lock()
            .map(|v| v.iter().any(|n| n == name))
            .unwrap_or(false)
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            drop(t.join());
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Tests

#[test]
fn three_nodes_resolve_services_tasks_aliases_ptr_srv_within_their_networks() {
    if !gate::privileged("three_nodes_resolve_services_tasks_aliases_ptr_srv_within_their_networks")
    {
        return;
    }
    topo::with_topology(3, |topo| {
        let whoami = topo::whoami_binary()?;
        let whoami = whoami.to_str().context("utf-8 path")?;
        let server: &[&str] = &[whoami, "--port", "80"];
        let intent = topo
            .cluster_intent()
            .network("app", "10.30.0.0/24", 4300)
            .network("other", "10.31.0.0/24", 4301)
            .service_json(service("web", "vip", "app", Some("10.30.0.2"), &["www"]))
            .service_json(service("api", "dnsrr", "app", None, &["apis"]))
            .service_json(service("secret", "vip", "other", Some("10.31.0.2"), &[]))
            .task_json(task(
                "web1",
                "web",
                1,
                "n2",
                "app",
                "10.30.0.11",
                &["primary"],
                SLEEP,
            ))
            .task_json(task(
                "web2",
                "web",
                2,
                "n3",
                "app",
                "10.30.0.12",
                &[],
                SLEEP,
            ))
            .task_json(task(
                "api1",
                "api",
                1,
                "n2",
                "app",
                "10.30.0.21",
                &[],
                server,
            ))
            .task_json(task(
                "api2",
                "api",
                2,
                "n3",
                "app",
                "10.30.0.22",
                &[],
                server,
            ))
            .task_json(task(
                "sec1",
                "secret",
                1,
                "n2",
                "other",
                "10.31.0.11",
                &["hush"],
                SLEEP,
            ))
            .task_json(task(
                "c1",
                "client",
                1,
                "n1",
                "app",
                "10.30.0.101",
                &[],
                SLEEP,
            ))
            .build();
        topo.write_intent(&intent)?;
        topo.start_netd(&["--dns-upstreams", "none"])?;
        topo.wait_converged(CONVERGE_TIMEOUT)?;
        let (n, c) = ("n1", "c1");
        // The resolver answers as soon as the sandbox has it; wait for the first answer.
        retry("c1's resolver answers", Duration::from_secs(10), || {
            expect_short(topo, n, c, &["web"], &["10.30.0.2"])
        })?;

        // Service names: the VIP in vip mode, every task address in dnsrr mode.
        expect_short(topo, n, c, &["WEB."], &["10.30.0.2"])?;
        expect_short(topo, n, c, &["api"], &["10.30.0.21", "10.30.0.22"])?;
        expect_short(topo, n, c, &["tasks.web"], &["10.30.0.11", "10.30.0.12"])?;
        expect_short(topo, n, c, &["tasks.api"], &["10.30.0.21", "10.30.0.22"])?;
        // Task names, long and short.
        expect_short(topo, n, c, &["web.1.web1"], &["10.30.0.11"])?;
        expect_short(topo, n, c, &["api.2.api2"], &["10.30.0.22"])?;
        expect_short(topo, n, c, &["web.2"], &["10.30.0.12"])?;
        // Aliases: of a service (follows its mode) and of a task.
        expect_short(topo, n, c, &["www"], &["10.30.0.2"])?;
        expect_short(topo, n, c, &["apis"], &["10.30.0.21", "10.30.0.22"])?;
        expect_short(topo, n, c, &["primary"], &["10.30.0.11"])?;
        // PTR of a task address and of a VIP.
        expect_short(topo, n, c, &["-x", "10.30.0.11"], &["web.1.web1."])?;
        expect_short(topo, n, c, &["-x", "10.30.0.22"], &["api.2.api2."])?;
        expect_short(topo, n, c, &["-x", "10.30.0.2"], &["web."])?;
        // SRV: one record on the service name for a VIP, one per task for DNSRR.
        expect_short(topo, n, c, &["SRV", "_http._tcp.web"], &["0 100 80 web."])?;
        expect_short(
            topo,
            n,
            c,
            &["SRV", "_http._tcp.api"],
            &["0 50 80 api.1.api1.", "0 50 80 api.2.api2."],
        )?;
        // AAAA: the name exists, the network has no IPv6: empty NOERROR.
        let aaaa = expect_status(topo, n, c, &["AAAA", "web"], "NOERROR")?;
        ensure!(aaaa.contains("ANSWER: 0"), "{aaaa}");
        // On another network only: NXDOMAIN for every form of it, and its reverse name.
        for name in ["secret", "tasks.secret", "secret.1.sec1", "hush"] {
            expect_status(topo, n, c, &[name], "NXDOMAIN")?;
        }
        expect_status(topo, n, c, &["-x", "10.31.0.11"], "NXDOMAIN")?;
        expect_status(topo, n, c, &["-x", "10.31.0.2"], "NXDOMAIN")?;
        // Negative answers carry the zone's SOA with the TTL as negative TTL (RFC 2308), so
        // caching stubs cache them: NODATA, NXDOMAIN, and a reverse name in a cluster subnet.
        for (args, soa) in [
            (
                vec!["AAAA", "web"],
                "web. 5 IN SOA web. hostmaster.web. 1 7200 1800 86400 5",
            ),
            (
                vec!["MX", "tasks.web"],
                "web. 5 IN SOA web. hostmaster.web. 1 7200 1800 86400 5",
            ),
            (
                vec!["A", "tasks.secret"],
                "secret. 5 IN SOA secret. hostmaster.secret. 1 7200 1800 86400 5",
            ),
            (
                vec!["-x", "10.31.0.11"],
                "0.31.10.in-addr.arpa. 5 IN SOA 0.31.10.in-addr.arpa. hostmaster.0.31.10.in-addr.arpa. 1 7200 1800 86400 5",
            ),
        ] {
            let mut q = vec!["+noall", "+authority"];
            q.extend_from_slice(&args);
            let got = dig(topo, n, c, &q)?;
            let got = got.split_whitespace().collect::<Vec<_>>().join(" ");
            ensure!(
                got == soa,
                "dig {args:?}: authority {got:?}, expected {soa:?}"
            );
        }
        ensure!(
            dig(topo, n, c, &["+noall", "+authority", "web"])?
                .trim()
                .is_empty(),
            "a positive answer has no authority section"
        );
        // Nothing of the resolver listens outside sandboxes: not in the node namespace (node
        // and bridge side) nor in the overlay network's namespace; in the sandbox, only on
        // 127.0.0.11 (random ports behind the DNAT), never on the task's own addresses.
        let no_dns = |where_: &str, out: &str| -> Result<()> {
            ensure!(
                !out.lines()
                    .any(|l| l.contains("127.0.0.11:") || l.contains(":53 ")),
                "a resolver socket in {where_}:\n{out}"
            );
            Ok(())
        };
        no_dns(
            "n1's node namespace",
            &topo.node(n).exec_ok(&["ss", "-lnutH"])?,
        )?;
        no_dns(
            "n1's app network namespace",
            &topo
                .network_exec(n, "app", &["ss", "-lnutH"])?
                .check()?
                .stdout,
        )?;
        let in_sb = topo.sandbox_exec(n, c, &["ss", "-lnutH"])?.check()?.stdout;
        ensure!(
            in_sb
                .lines()
                .filter(|l| !l.trim().is_empty())
                .all(|l| l.contains("127.0.0.11:")),
            "sandbox sockets other than the resolver's:\n{in_sb}"
        );
        // kdig over TCP sees the same.
        ensure!(
            lines(&kdig(topo, n, c, &["+short", "+tcp", "tasks.api"])?)
                == ["10.30.0.21", "10.30.0.22"],
            "kdig +tcp tasks.api"
        );
        ensure!(kdig(topo, n, c, &["+short", "+tcp", "-x", "10.30.0.2"])?.trim() == "web.");
        // The same names from a task on another node, and the other network's view from there.
        expect_short(topo, "n3", "web2", &["api"], &["10.30.0.21", "10.30.0.22"])?;
        expect_short(topo, "n2", "sec1", &["secret"], &["10.31.0.2"])?;
        expect_short(topo, "n2", "sec1", &["hush"], &["10.31.0.11"])?;
        expect_status(topo, "n2", "sec1", &["web"], "NXDOMAIN")?;

        // Like a task: getaddrinfo through the task's own resolv.conf, no flags.
        let out = as_task(topo, n, c, &["getent", "hosts", "web"])?.check()?;
        ensure!(
            out.stdout.starts_with("10.30.0.2 "),
            "getent hosts web: {out}"
        );
        let out = as_task(topo, n, c, &["getent", "ahostsv4", "api"])?.check()?;
        let got: BTreeSet<&str> = out
            .stdout
            .split_whitespace()
            .filter(|w| w.starts_with("10."))
            .collect();
        ensure!(
            got == BTreeSet::from(["10.30.0.21", "10.30.0.22"]),
            "getent ahostsv4 api: {out}"
        );
        // curl by the DNSRR name reaches the replicas on n2 and n3 (both, over a few tries).
        let mut answered = BTreeSet::new();
        retry(
            "curl http://api/ reaches both replicas",
            Duration::from_secs(30),
            || {
                let out =
                    as_task(topo, n, c, &["curl", "-s", "-m", "2", "http://api/"])?.check()?;
                let t = out
                    .stdout
                    .lines()
                    .find_map(|l| l.strip_prefix("task: "))
                    .with_context(|| format!("no task line: {out}"))?;
                answered.insert(t.to_string());
                ensure!(answered.len() == 2, "answered so far: {answered:?}");
                Ok(())
            },
        )?;
        ensure!(answered == BTreeSet::from(["api1".into(), "api2".into()]));
        Ok(())
    });
}

#[test]
fn unknown_names_go_upstream_except_from_internal_networks_and_a_self_upstream_fails_fast() {
    if !gate::privileged(
        "unknown_names_go_upstream_except_from_internal_networks_and_a_self_upstream_fails_fast",
    ) {
        return;
    }
    topo::with_topology(2, |topo| {
        let upstream = Upstream::start(topo)?;
        let intent = topo
            .cluster_intent()
            .network("app", "10.30.0.0/24", 4300)
            .network_json(
                json!({"name": "vault", "subnet": "10.32.0.0/24", "vni": 4302,
                                 "internal": true}),
            )
            .service_json(service("web", "vip", "app", Some("10.30.0.2"), &[]))
            .service_json(service("pg", "vip", "vault", Some("10.32.0.2"), &[]))
            .task_json(task(
                "web1",
                "web",
                1,
                "n2",
                "app",
                "10.30.0.11",
                &[],
                SLEEP,
            ))
            .task_json(task(
                "c1",
                "client",
                1,
                "n1",
                "app",
                "10.30.0.101",
                &[],
                SLEEP,
            ))
            .task_json(task(
                "pg1",
                "pg",
                1,
                "n1",
                "vault",
                "10.32.0.11",
                &[],
                SLEEP,
            ))
            .task_json(task(
                "c2",
                "client",
                2,
                "n2",
                "app",
                "10.30.0.102",
                &[],
                SLEEP,
            ))
            .build();
        topo.write_intent(&intent)?;
        let up = upstream.addr.to_string();
        // n1 forwards to the test upstream; n2's resolver is told to use itself.
        let path = topo.intent_path.clone();
        topo.node_mut("n1")
            .spawn_netd(&path, &["--dns-upstreams", &up])?;
        topo.node_mut("n2")
            .spawn_netd(&path, &["--dns-upstreams", "127.0.0.11"])?;
        topo.wait_converged(CONVERGE_TIMEOUT)?;

        // A name unknown to the cluster: answered by the upstream, from inside the sandbox
        // through the node's gateway (the only way to 198.18.x.53).
        retry(
            "c1 resolves example.com through the upstream",
            Duration::from_secs(10),
            || {
                expect_short(
                    topo,
                    "n1",
                    "c1",
                    &["example.com"],
                    &[&UPSTREAM_ANSWER.to_string()],
                )
            },
        )?;
        ensure!(
            upstream.asked("example.com"),
            "the upstream never saw example.com"
        );
        ensure!(
            kdig(topo, "n1", "c1", &["+short", "+tcp", "Other.Example."])?.trim()
                == UPSTREAM_ANSWER.to_string(),
            "kdig +tcp through the upstream"
        );
        // getaddrinfo in a task follows the same path.
        let out = as_task(topo, "n1", "c1", &["getent", "ahostsv4", "task.example"])?.check()?;
        ensure!(out.stdout.contains(&UPSTREAM_ANSWER.to_string()), "{out}");
        // Cluster names, visible or not, never leave the node.
        expect_short(topo, "n1", "c1", &["web"], &["10.30.0.2"])?;
        expect_status(topo, "n1", "c1", &["pg"], "NXDOMAIN")?;
        expect_status(topo, "n1", "c1", &["-x", "10.32.0.11"], "NXDOMAIN")?;
        ensure!(
            !upstream.asked("pg")
                && !upstream.asked("web")
                && !upstream.asked("11.0.32.10.in-addr.arpa"),
            "a cluster name leaked to the upstream"
        );

        // A task on an internal network only: REFUSED, and the upstream sees nothing.
        let before = upstream.seen();
        retry("pg1's resolver answers", Duration::from_secs(10), || {
            expect_short(topo, "n1", "pg1", &["pg"], &["10.32.0.2"])
        })?;
        let out = expect_status(topo, "n1", "pg1", &["leak.example"], "REFUSED")?;
        ensure!(!out.contains("192.0.2"), "{out}");
        let out = as_task(topo, "n1", "pg1", &["getent", "hosts", "leak2.example"])?;
        ensure!(
            !out.success(),
            "getent from an internal network resolved: {out}"
        );
        std::thread::sleep(Duration::from_millis(300));
        ensure!(
            upstream.seen() == before
                && !upstream.asked("leak.example")
                && !upstream.asked("leak2.example"),
            "the internal network's queries reached the upstream ({} new)",
            upstream.seen() - before
        );

        // The resolver as its own upstream: SERVFAIL at once (dig waits up to 2 s).
        retry("c2's resolver answers", Duration::from_secs(10), || {
            expect_short(topo, "n2", "c2", &["web"], &["10.30.0.2"])
        })?;
        for name in ["loop.example", "loop2.example"] {
            let t = Instant::now();
            expect_status(topo, "n2", "c2", &[name], "SERVFAIL")?;
            let took = t.elapsed();
            eprintln!("self-upstream: SERVFAIL for {name} in {took:?} (dig included)");
            ensure!(took < Duration::from_millis(1000), "SERVFAIL took {took:?}");
        }
        // And over a raw socket, without the cost of starting dig.
        let mut sock = Client::new(&topo.node("n2").sandbox_netns("c2"))?;
        let t = Instant::now();
        let (r, _) = sock.ask("loop3.example", None, Duration::from_secs(2))?;
        let took = t.elapsed();
        eprintln!("self-upstream: SERVFAIL over a socket in {took:?}");
        ensure!(r.rcode == 2, "rcode {} (SERVFAIL is 2)", r.rcode);
        ensure!(took < Duration::from_millis(200), "SERVFAIL took {took:?}");
        ensure!(!upstream.asked("loop.example"));
        drop(upstream);
        Ok(())
    });
}

#[test]
fn dnsrr_with_300_tasks_is_truncated_on_whole_records_over_udp_and_whole_over_tcp() {
    if !gate::privileged(
        "dnsrr_with_300_tasks_is_truncated_on_whole_records_over_udp_and_whole_over_tcp",
    ) {
        return;
    }
    topo::with_topology(3, |topo| {
        let mut b = topo
            .cluster_intent()
            .network("big", "10.40.0.0/23", 4400)
            .service_json(service("many", "dnsrr", "big", None, &[]))
            .task_json(task(
                "c1",
                "client",
                1,
                "n1",
                "big",
                "10.40.1.200",
                &[],
                SLEEP,
            ));
        let mut want = Vec::new();
        for i in 0..300u32 {
            let host = 10 + i;
            let ip = format!("10.40.{}.{}", host / 256, host % 256);
            let node = if i % 2 == 0 { "n2" } else { "n3" };
            b = b.task_json(task(
                &format!("m{i}"),
                "many",
                i + 1,
                node,
                "big",
                &ip,
                &[],
                SLEEP,
            ));
            want.push(ip);
        }
        want.sort();
        topo.write_intent(b.build())?;
        let t = Instant::now();
        topo.start_netd(&["--dns-upstreams", "none"])?;
        topo.wait_converged(Duration::from_secs(400))?;
        eprintln!("300 sandboxes on n2/n3 converged in {:?}", t.elapsed());
        let (n, c) = ("n1", "c1");
        retry("c1's resolver answers", Duration::from_secs(10), || {
            expect_short(topo, n, c, &["many.1.m0"], &["10.40.0.10"])
        })?;

        // UDP: TC set, only whole records, fewer than 300 (512 bytes without EDNS, 1232 with).
        let mut sock = Client::new(&topo.node(n).sandbox_netns(c))?;
        for edns in [None, Some(1232), Some(4096)] {
            let (r, size) = sock.ask("many", edns, Duration::from_secs(2))?;
            let limit = usize::from(edns.unwrap_or(512));
            eprintln!(
                "UDP answer, EDNS {edns:?}: {size} bytes, TC {}, {} whole A records (ANCOUNT {})",
                r.tc,
                r.a.len(),
                r.ancount
            );
            ensure!(r.rcode == 0 && r.tc, "TC expected: {r:?}");
            ensure!(size <= limit, "{size} bytes over a {limit}-byte limit");
            ensure!(usize::from(r.ancount) == r.a.len() && !r.a.is_empty() && r.a.len() < 300);
            let known: BTreeSet<String> = want.iter().cloned().collect();
            ensure!(
                r.a.iter().all(|a| known.contains(&a.to_string())),
                "{:?}",
                r.a
            );
        }
        let udp = dig(topo, n, c, &["+ignore", "+notcp", "+noedns", "many"])?;
        ensure!(udp.contains(" tc"), "dig: TC expected: {udp}");
        let k = kdig(topo, n, c, &["+notcp", "+ignore", "+noedns", "many"])?;
        ensure!(k.contains(" tc"), "kdig: TC expected: {k}");

        // TCP (and dig's default retry over TCP on TC): all 300.
        for args in [
            vec!["+short", "+tcp", "many"],
            vec!["+short", "+tcp", "tasks.many"],
            vec!["+short", "many"],
        ] {
            let got = lines(&dig(topo, n, c, &args)?);
            let mut got_sorted = got.clone();
            got_sorted.sort_by_key(|ip| ip.parse::<Ipv4Addr>().ok());
            let mut want_sorted = want.clone();
            want_sorted.sort_by_key(|ip| ip.parse::<Ipv4Addr>().ok());
            ensure!(
                got_sorted == want_sorted,
                "dig {args:?}: {} addresses",
                got.len()
            );
        }
        let got = lines(&kdig(topo, n, c, &["+short", "+tcp", "many"])?);
        ensure!(got.len() == 300, "kdig +tcp: {} addresses", got.len());
        Ok(())
    });
}

/// When each node first answered, as time since the intent write and as wall-clock time.
type Answered = Vec<(String, Duration, SystemTime)>;

/// Polls `name` from each `(node, client)` until its A set equals `want`; returns when each
/// node first gave it.
fn wait_answers(
    clients: &mut [(&str, Client)],
    name: &str,
    want: &[&str],
    since: Instant,
) -> Result<Answered> {
    let mut want: Vec<Ipv4Addr> = want
        .iter()
        .map(|s| s.parse().expect("an address"))
        .collect();
    want.sort();
    let mut done: Vec<Option<(Duration, SystemTime)>> = vec![None; clients.len()];
    let mut last = vec![String::new(); clients.len()];
    while done.iter().any(Option::is_none) {
        for (i, (_, c)) in clients.iter_mut().enumerate() {
            if done[i].is_some() {
                continue;
            }
            match c.a_set(name) {
                Ok(got) if got == want => done[i] = Some((since.elapsed(), SystemTime::now())),
                Ok(got) => last[i] = format!("{got:?}"),
                Err(e) => last[i] = format!("{e:#}"),
            }
        }
        if since.elapsed() > FOLLOW {
            let late: Vec<String> = clients
                .iter()
                .zip(&last)
                .zip(&done)
                .filter(|(_, d)| d.is_none())
                .map(|(((node, _), l), _)| format!("{node}: {l}"))
                .collect();
            bail!("{name} did not become {want:?} within {FOLLOW:?}: {late:?}");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(clients
        .iter()
        .zip(done)
        .map(|((node, _), d)| {
            let (took, at) = d.unwrap_or((Duration::ZERO, SystemTime::UNIX_EPOCH));
            (node.to_string(), took, at)
        })
        .collect())
}

/// [`netd_side`]: ms from netd loading the intent to the answer, and the round's duration.
type NetdSide = Option<(f64, f64)>;

/// Each node's answer time with [`netd_side`]'s view of it.
fn with_netd_side(topo: &Topology, answered: Answered) -> Vec<(String, Duration, NetdSide)> {
    answered
        .into_iter()
        .map(|(node, took, at)| {
            let side = netd_side(topo, &node, at);
            (node, took, side)
        })
        .collect()
}

/// Seconds since midnight (UTC) of a log line starting `2026-01-02T15:07:54.801363Z`.
fn log_time(line: &str) -> Option<f64> {
    let t = line.get(11..)?.split('Z').next()?;
    let mut parts = t.split(':');
    let h: f64 = parts.next()?.parse().ok()?;
    let m: f64 = parts.next()?.parse().ok()?;
    let s: f64 = parts.next()?.parse().ok()?;
    Some(h * 3600.0 + m * 60.0 + s)
}

/// From netd's log on `node`: (answer time − when netd loaded the latest intent, how long the
/// round that followed took), both in ms. The harness waits for convergence between writes,
/// so the last `intent loaded` line is this change's.
fn netd_side(topo: &Topology, node: &str, answered: SystemTime) -> Option<(f64, f64)> {
    let log = std::fs::read_to_string(topo.node(node).log_path()).ok()?;
    let lines: Vec<&str> = log.lines().collect();
    let at = lines.iter().rposition(|l| l.contains("intent loaded"))?;
    let loaded = log_time(lines[at])?;
    let round = lines[at..]
        .iter()
        .find(|l| l.contains("round applied"))
        .and_then(|l| log_time(l))?;
    let unix = answered.duration_since(SystemTime::UNIX_EPOCH).ok()?;
    let answer = (unix.as_secs() % 86_400) as f64 + f64::from(unix.subsec_nanos()) / 1e9;
    let day = |d: f64| (d + 86_400.0) % 86_400.0;
    Some((day(answer - loaded) * 1e3, day(round - loaded) * 1e3))
}

#[test]
fn scaling_a_service_changes_the_answer_on_every_node() {
    if !gate::privileged("scaling_a_service_changes_the_answer_on_every_node") {
        return;
    }
    topo::with_topology(3, |topo| {
        let start = topo
            .cluster_intent()
            .network("app", "10.30.0.0/24", 4300)
            .service_json(service("api", "dnsrr", "app", None, &[]));
        let base = |api: &[Value]| {
            let mut b = start.clone();
            for i in 1..=3u8 {
                let ip = format!("10.30.0.{}", 100 + i);
                b = b.task_json(task(
                    &format!("c{i}"),
                    "client",
                    i.into(),
                    &format!("n{i}"),
                    "app",
                    &ip,
                    &[],
                    SLEEP,
                ));
            }
            for t in api {
                b = b.task_json(t.clone());
            }
            b.build()
        };
        let api = |i: u8, node: &str| {
            task(
                &format!("api{i}"),
                "api",
                i.into(),
                node,
                "app",
                &format!("10.30.0.{}", 20 + i),
                &[],
                SLEEP,
            )
        };
        topo.write_intent(base(&[api(1, "n1"), api(2, "n2")]))?;
        topo.start_netd(&["--dns-upstreams", "none"])?;
        topo.wait_converged(CONVERGE_TIMEOUT)?;
        let mut clients = Vec::new();
        for i in 1..=3 {
            let node = ["n1", "n2", "n3"][i - 1];
            clients.push((
                node,
                Client::new(&topo.node(node).sandbox_netns(&format!("c{i}")))?,
            ));
        }
        let t = Instant::now();
        wait_answers(&mut clients, "api", &["10.30.0.21", "10.30.0.22"], t)?;

        let mut report = Vec::new();
        // Scale up: two more tasks (new sandboxes on n3 and n2).
        topo.write_intent(base(&[
            api(1, "n1"),
            api(2, "n2"),
            api(3, "n3"),
            api(4, "n2"),
        ]))?;
        let t = Instant::now();
        let up = wait_answers(
            &mut clients,
            "api",
            &["10.30.0.21", "10.30.0.22", "10.30.0.23", "10.30.0.24"],
            t,
        )?;
        topo.wait_converged(CONVERGE_TIMEOUT)?;
        report.push(("scale 2 -> 4", with_netd_side(topo, up)));
        // Scale down: api1 (on n1) and api4 (on n2) removed.
        topo.write_intent(base(&[api(2, "n2"), api(3, "n3")]))?;
        let t = Instant::now();
        let down = wait_answers(&mut clients, "tasks.api", &["10.30.0.22", "10.30.0.23"], t)?;
        topo.wait_converged(CONVERGE_TIMEOUT)?;
        report.push(("scale 4 -> 2", with_netd_side(topo, down)));
        // A task that stops (desired state shutdown) leaves the answer too.
        let mut stopped = api(2, "n2");
        stopped["desired_state"] = json!("shutdown");
        topo.write_intent(base(&[stopped, api(3, "n3")]))?;
        let t = Instant::now();
        let stop = wait_answers(&mut clients, "api", &["10.30.0.23"], t)?;
        topo.wait_converged(CONVERGE_TIMEOUT)?;
        report.push(("task shut down", with_netd_side(topo, stop)));

        for (what, per_node) in &report {
            let text: Vec<String> = per_node
                .iter()
                .map(|(n, d, netd)| match netd {
                    Some((seen, round)) => format!(
                        "{n} {:.0} ms (after netd loaded it: {seen:.0} ms, its round took {round:.0} ms)",
                        d.as_secs_f64() * 1e3
                    ),
                    None => format!("{n} {:.0} ms", d.as_secs_f64() * 1e3),
                })
                .collect();
            eprintln!(
                "DNS follows intent ({what}), intent write -> answer: {}",
                text.join("; ")
            );
        }
        // Nothing flaps back afterwards.
        for (node, c) in &mut clients {
            let got = c.a_set("api")?;
            ensure!(got == [Ipv4Addr::new(10, 30, 0, 23)], "{node}: {got:?}");
        }
        Ok(())
    });
}

#[test]
fn malformed_packets_then_a_good_query_is_answered() {
    if !gate::privileged("malformed_packets_then_a_good_query_is_answered") {
        return;
    }
    topo::with_topology(2, |topo| {
        let intent = topo
            .cluster_intent()
            .network("app", "10.30.0.0/24", 4300)
            .service_json(service("web", "vip", "app", Some("10.30.0.2"), &[]))
            .task_json(task(
                "web1",
                "web",
                1,
                "n2",
                "app",
                "10.30.0.11",
                &[],
                SLEEP,
            ))
            .task_json(task(
                "c1",
                "client",
                1,
                "n1",
                "app",
                "10.30.0.101",
                &[],
                SLEEP,
            ))
            .build();
        topo.write_intent(&intent)?;
        topo.start_netd(&["--dns-upstreams", "none"])?;
        topo.wait_converged(CONVERGE_TIMEOUT)?;
        let sandbox = topo.node("n1").sandbox_netns("c1");
        retry("c1's resolver answers", Duration::from_secs(10), || {
            expect_short(topo, "n1", "c1", &["web"], &["10.30.0.2"])
        })?;

        let sock = in_netns(&sandbox, || {
            let s = UdpSocket::bind("127.0.0.1:0")?;
            s.connect("127.0.0.11:53")?;
            Ok(s)
        })?;
        let hdr = |id: u8, flags: u8, qd: u8| vec![0, id, flags, 0, 0, qd, 0, 0, 0, 0, 0, 0];
        let with = |mut h: Vec<u8>, tail: &[u8]| {
            h.extend_from_slice(tail);
            h
        };
        let mut bad: Vec<(&str, Vec<u8>)> = vec![
            ("empty", vec![]),
            ("3 bytes", vec![1, 2, 3]),
            ("11-byte header", vec![0, 9, 1, 0, 0, 1, 0, 0, 0, 0, 0]),
            ("header only, QDCOUNT 1", hdr(10, 1, 1)),
            (
                "compression loop",
                with(hdr(1, 1, 1), &[0xC0, 12, 0, 1, 0, 1]),
            ),
            (
                "pointer to itself further on",
                with(hdr(11, 1, 1), &[1, b'a', 0xC0, 14, 0, 1, 0, 1]),
            ),
            (
                "label longer than the packet",
                with(hdr(2, 1, 1), &[63, b'a', 0, 0, 1, 0, 1]),
            ),
            (
                "reserved label type 0x80",
                with(hdr(12, 1, 1), &[0x80, b'a', 0, 0, 1, 0, 1]),
            ),
            ("name over 255 bytes", {
                let mut t = Vec::new();
                for _ in 0..5 {
                    t.push(63);
                    t.extend_from_slice(&[b'x'; 63]);
                }
                t.extend_from_slice(&[0, 0, 1, 0, 1]);
                with(hdr(13, 1, 1), &t)
            }),
            ("opcode 2 (STATUS)", with(hdr(3, 0x10, 1), &[0, 0, 1, 0, 1])),
            (
                "a response, not a query",
                with(hdr(14, 0x80, 1), &[0, 0, 1, 0, 1]),
            ),
            (
                "QDCOUNT 65535",
                with(
                    vec![0, 15, 1, 0, 0xFF, 0xFF, 0, 0, 0, 0, 0, 0],
                    &[0, 0, 1, 0, 1],
                ),
            ),
            (
                "ARCOUNT with a cut OPT",
                with(
                    vec![0, 16, 1, 0, 0, 1, 0, 0, 0, 0, 0, 1],
                    &[0, 0, 1, 0, 1, 0, 0, 41, 4],
                ),
            ),
        ];
        // Random bytes and mutations of a good query (a fixed-seed generator: reproducible).
        let mut seed: u64 = 0x5eed_d115;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let good = wire::query(0x4242, "web", wire::A, Some(1232));
        for i in 0..300 {
            let len = usize::try_from(next() % 600).unwrap_or(0);
            let mut p: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            if i % 2 == 0 {
                p = good.clone();
                for _ in 0..1 + next() % 4 {
                    let at = usize::try_from(next()).unwrap_or(0) % p.len();
                    p[at] = next() as u8;
                }
                if i % 6 == 0 {
                    p.truncate(usize::try_from(next()).unwrap_or(0) % p.len());
                }
            }
            bad.push(("random", p));
        }
        for (what, b) in &bad {
            sock.send(b).with_context(|| format!("sending {what}"))?;
        }
        // Replies to the crafted ones: FORMERR where a header was readable, NOTIMP for opcode 2.
        sock.set_read_timeout(Some(Duration::from_millis(500)))?;
        let mut codes = BTreeSet::new();
        let mut buf = [0u8; 4096];
        while let Ok(n) = sock.recv(&mut buf) {
            if n >= 4 {
                codes.insert((u16::from_be_bytes([buf[0], buf[1]]), buf[3] & 0x0F));
            }
        }
        eprintln!(
            "answers to crafted packets (id, rcode): {:?}",
            codes.iter().filter(|(id, _)| *id < 20).collect::<Vec<_>>()
        );
        ensure!(
            codes.contains(&(1, 1)),
            "FORMERR for the compression loop: {codes:?}"
        );
        ensure!(
            codes.contains(&(2, 1)),
            "FORMERR for the bad label: {codes:?}"
        );
        ensure!(codes.contains(&(3, 4)), "NOTIMP for opcode 2: {codes:?}");
        ensure!(
            !codes.iter().any(|(id, _)| *id == 14),
            "a response was answered: {codes:?}"
        );

        // Garbage over TCP too: a length prefix longer than what follows, then a hang-up; a
        // 0-length frame; a frame of random bytes.
        for frame in [
            vec![0xFF, 0xFF, 1, 2, 3],
            vec![0, 0],
            vec![0, 5, 9, 9, 9, 9, 9],
        ] {
            let s = in_netns(&sandbox, || {
                std::net::TcpStream::connect_timeout(
                    &"127.0.0.11:53".parse().expect("addr"),
                    Duration::from_secs(2),
                )
            })?;
            use std::io::Write;
            let mut s = s;
            drop(s.write_all(&frame));
            drop(s.shutdown(std::net::Shutdown::Write));
        }

        // The next good queries are answered, correctly, over UDP and TCP.
        expect_short(topo, "n1", "c1", &["web"], &["10.30.0.2"])?;
        expect_short(topo, "n1", "c1", &["+tcp", "tasks.web"], &["10.30.0.11"])?;
        ensure!(kdig(topo, "n1", "c1", &["+short", "web.1.web1"])?.trim() == "10.30.0.11");
        let mut c = Client::new(&sandbox)?;
        ensure!(c.a_set("web")? == [Ipv4Addr::new(10, 30, 0, 2)]);
        // netd survived, and no CPU spin: its CPU time over an idle second stays small.
        let pid = topo.node("n1").netd_pid().context("netd pid")?;
        let cpu = |pid: u32| -> Result<u64> {
            let s = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
            let f: Vec<&str> = s
                .rsplit_once(')')
                .context("stat")?
                .1
                .split_whitespace()
                .collect();
            Ok(f[11].parse::<u64>()? + f[12].parse::<u64>()?)
        };
        let before = cpu(pid)?;
        std::thread::sleep(Duration::from_secs(1));
        let ticks = cpu(pid)? - before;
        eprintln!("netd CPU over 1 idle second after the garbage: {ticks} ticks");
        ensure!(
            ticks < 50,
            "netd used {ticks} ticks of CPU in an idle second: a spin?"
        );
        topo.wait_converged(CONVERGE_TIMEOUT)?;
        Ok(())
    });
}

#[test]
fn a_flooding_sandbox_does_not_starve_another_on_the_same_node() {
    if !gate::privileged("a_flooding_sandbox_does_not_starve_another_on_the_same_node") {
        return;
    }
    topo::with_topology(2, |topo| {
        // The upstream answers, so forwards complete: the flood loads both the cluster path and
        // the forwarding path (in-flight caps) of the flooding sandbox.
        let upstream = Upstream::start(topo)?;
        let intent = topo
            .cluster_intent()
            .network("app", "10.30.0.0/24", 4300)
            .service_json(service("web", "vip", "app", Some("10.30.0.2"), &[]))
            .service_json(service("api", "dnsrr", "app", None, &[]))
            .task_json(task(
                "web1",
                "web",
                1,
                "n2",
                "app",
                "10.30.0.11",
                &[],
                SLEEP,
            ))
            .task_json(task(
                "api1",
                "api",
                1,
                "n2",
                "app",
                "10.30.0.21",
                &[],
                SLEEP,
            ))
            .task_json(task(
                "api2",
                "api",
                2,
                "n2",
                "app",
                "10.30.0.22",
                &[],
                SLEEP,
            ))
            .task_json(task(
                "f1",
                "flood",
                1,
                "n1",
                "app",
                "10.30.0.101",
                &[],
                SLEEP,
            ))
            .task_json(task(
                "c1",
                "client",
                1,
                "n1",
                "app",
                "10.30.0.102",
                &[],
                SLEEP,
            ))
            .build();
        topo.write_intent(&intent)?;
        topo.start_netd(&["--dns-upstreams", &upstream.addr.to_string()])?;
        topo.wait_converged(CONVERGE_TIMEOUT)?;
        retry("both resolvers answer", Duration::from_secs(10), || {
            expect_short(topo, "n1", "c1", &["web"], &["10.30.0.2"])?;
            expect_short(topo, "n1", "f1", &["web"], &["10.30.0.2"])
        })?;

        let flood_sock = in_netns(&topo.node("n1").sandbox_netns("f1"), || {
            let s = UdpSocket::bind("127.0.0.1:0")?;
            s.connect("127.0.0.11:53")?;
            s.set_nonblocking(true)?;
            Ok(s)
        })?;
        let stop = Arc::new(AtomicBool::new(false));
        // 20k queries in about 2 s (10 per ms), answers never read; every 4th one a name
        // unknown to the cluster (forwarded, bounded by the sandbox's in-flight cap).
        let flooder = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let cluster = wire::query(1, "tasks.api", wire::A, None);
                let start = Instant::now();
                let mut sent = 0u32;
                while sent < 20_000
                    && !stop.load(Ordering::Relaxed)
                    && start.elapsed() < Duration::from_secs(5)
                {
                    let q = if sent % 4 == 3 {
                        wire::query(
                            sent as u16,
                            &format!("f{sent}.flood.example"),
                            wire::A,
                            None,
                        )
                    } else {
                        cluster.clone()
                    };
                    if flood_sock.send(&q).is_ok() {
                        sent += 1;
                    }
                    if sent.is_multiple_of(100) {
                        let due = Duration::from_micros(u64::from(sent) * 100);
                        if let Some(wait) = due.checked_sub(start.elapsed()) {
                            std::thread::sleep(wait);
                        }
                    }
                }
                (sent, start.elapsed())
            })
        };
        // Meanwhile the calm sandbox: 200 cluster queries over a socket (1 s limit each), and
        // through dig a cluster name and a forwarded one.
        let mut calm = Client::new(&topo.node("n1").sandbox_netns("c1"))?;
        let start = Instant::now();
        let mut worst = Duration::ZERO;
        let mut answered = 0;
        let mut failures = Vec::new();
        for i in 0..200 {
            let t = Instant::now();
            let name = if i % 2 == 0 { "web" } else { "tasks.api" };
            match calm.a_set(name) {
                Ok(a) if name == "web" && a == [Ipv4Addr::new(10, 30, 0, 2)] => answered += 1,
                Ok(a)
                    if name == "tasks.api"
                        && a == [Ipv4Addr::new(10, 30, 0, 21), Ipv4Addr::new(10, 30, 0, 22)] =>
                {
                    answered += 1
                }
                Ok(a) => failures.push(format!("{name}: {a:?}")),
                Err(e) => failures.push(format!("{name}: {e:#}")),
            }
            worst = worst.max(t.elapsed());
            if i % 50 == 0 {
                let t = Instant::now();
                match dig(topo, "n1", "c1", &["+short", &format!("calm{i}.example")]) {
                    Ok(out) if out.trim() == UPSTREAM_ANSWER.to_string() => {}
                    Ok(out) => failures.push(format!("calm{i}.example: {out:?}")),
                    Err(e) => failures.push(format!("calm{i}.example: {e:#}")),
                }
                worst = worst.max(t.elapsed());
            }
            std::thread::sleep(Duration::from_millis(8));
        }
        let calm_time = start.elapsed();
        stop.store(true, Ordering::Relaxed);
        let (sent, flood_time) = flooder
            .join()
            .map_err(|_panic| anyhow!("the flooder panicked"))?;
        eprintln!(
            "flood: {sent} queries sent in {flood_time:?} ({} reached the upstream); calm sandbox: {answered}/200 \
             cluster answers + 4 forwarded in {calm_time:?}, slowest {worst:?}",
            upstream.seen()
        );
        ensure!(
            failures.is_empty(),
            "the calm sandbox was starved: {failures:?}"
        );
        ensure!(answered == 200);
        ensure!(
            sent >= 15_000,
            "the flood was too small to mean anything: {sent}"
        );
        // netd is still healthy.
        topo.wait_converged(CONVERGE_TIMEOUT)?;
        drop(upstream);
        Ok(())
    });
}
