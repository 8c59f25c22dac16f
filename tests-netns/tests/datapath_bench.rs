//! Datapath benchmarks (issue 4, benchmark 2; issue 5's benchmark), run by `bench/datapath.sh`;
//! `#[ignore]`d so `cargo test` never times anything. Each prints one `DATAPATH {json}` line.
//!
//! - `bench_vip_datapath`: a client task on n1, one backend task on n2 (so every packet crosses
//!   VXLAN), the same server reached through the service VIP (netd's load balancer: DNAT in the
//!   network namespace, conntrack) and straight at the backend's overlay address.
//! - `bench_mesh_datapath`: an outside client on the underlay, one task on n1; the service
//!   published on 8080 (routing mesh) reached through n1 (the node with the task) and through n2
//!   (no task: one more hop across VXLAN), beside the task's own address reached straight
//!   through n1 (a route to the gateway-bridge subnet via n1, no NAT), and a host-mode port;
//!   and a second service with a task on n1 and one on n2 through n1
//!   (`mesh_n1_of_local+remote`: half the connections straight to the local task, half
//!   through the ingress sandbox and VXLAN to n2; connection rate only).
//!
//! Measures per path, alternating paths so drift on a shared machine hits all of them:
//! - short-connection rate: new TCP connection per request (connect, read the server's one-byte
//!   reply until EOF, close) for a fixed time from one client thread; the server is a thread of
//!   this process accepting in the backend's namespace (writes one byte, closes), so the path,
//!   not an HTTP server, is what is measured;
//! - throughput: `iperf3 -c <target> -t <secs> -J` (one TCP stream), receiver bits/s.
//!
//! Beside each rate, the CPU it cost: for connections, the CPU time of the client and server
//! threads per connection (`/proc/.../schedstat`: their run time, which includes the softirq
//! work done in their context, i.e. every hop of the path, as veth transmits are processed on
//! the sending CPU; this kernel has no IRQ time accounting to take it out); for throughput,
//! iperf3's own CPU figures (client and server) per GB received. On a shared machine, where a
//! ping-pong rate also measures how long the threads wait for a core, these are the stable
//! figures: the ratio of CPU per connection is the ratio the rate would have on idle cores.
//!
//! Knobs: `SWARMNET_BENCH_SECS` (per measurement, default 4), `SWARMNET_BENCH_ROUNDS` (default 3;
//! the median is reported), `SWARMNET_BENCH_PATHS` (comma-separated path names: measure only
//! those, e.g. one path at a time under `perf record`; `bench/datapath.sh` always runs all).

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use serde_json::{Value, json};
use swarmnet_tests_netns::topo::{self, CONVERGE_TIMEOUT, retry};

const APP: &str = "app";
const INGRESS: &str = "ingress";
const CONN_PORT: u16 = 9000;
const IPERF_PORT: u16 = 5201;

fn secs() -> u64 {
    std::env::var("SWARMNET_BENCH_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(4)
}

fn rounds() -> usize {
    std::env::var("SWARMNET_BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3)
}

/// Runs `f` on a new thread that first enters the network namespace at `netns` (the thread's
/// namespace only: STYLE.md rule 6).
fn in_netns<T: Send + 'static>(
    netns: &Path,
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> JoinHandle<Result<T>> {
    let netns = netns.to_path_buf();
    std::thread::spawn(move || {
        let file =
            std::fs::File::open(&netns).with_context(|| format!("open {}", netns.display()))?;
        nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)
            .with_context(|| format!("setns {}", netns.display()))?;
        f()
    })
}

/// An accept-and-close server in `netns` on `0.0.0.0:port`: one byte, then close. Stops when
/// `stop` is set (checked between accepts; a last connection wakes it).
struct ConnServer {
    /// The server thread's id, for its CPU time.
    tid: i32,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Result<u64>>>,
    wake: SocketAddrV4,
    wake_ns: PathBuf,
}

impl ConnServer {
    fn start(netns: &Path, port: u16, wake: SocketAddrV4) -> Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, rx) = std::sync::mpsc::channel();
        let flag = Arc::clone(&stop);
        let thread = in_netns(netns, move || {
            let l = TcpListener::bind(SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)));
            let l = match l {
                Ok(l) => {
                    let _ = tx.send(Ok(nix::unistd::gettid().as_raw()));
                    l
                }
                Err(e) => {
                    let _ = tx.send(Err(e.to_string()));
                    return Err(e.into());
                }
            };
            let mut served = 0u64;
            for s in l.incoming() {
                if flag.load(Ordering::Relaxed) {
                    break;
                }
                if let Ok(mut s) = s {
                    // One byte, then wait for the client to close (with a reset: see
                    // `conn_rate`), so no side keeps the connection in TIME_WAIT.
                    let _ = s.write_all(b"x");
                    let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
                    let mut sink = [0u8; 8];
                    while matches!(s.read(&mut sink), Ok(n) if n > 0) {}
                    served += 1;
                }
            }
            Ok(served)
        });
        let tid = rx
            .recv_timeout(Duration::from_secs(10))
            .context("the connection server did not start")?
            .map_err(|e| anyhow::anyhow!("bind :{port}: {e}"))?;
        Ok(Self {
            tid,
            stop,
            thread: Some(thread),
            wake,
            wake_ns: netns.to_path_buf(),
        })
    }
}

impl Drop for ConnServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let wake = self.wake;
        let _ = in_netns(&self.wake_ns, move || {
            let _ = TcpStream::connect_timeout(&wake.into(), Duration::from_secs(1));
            Ok(())
        })
        .join();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// CPU time (ns) a thread of this process has run, softirq work done in its context included:
/// the first field of `/proc/self/task/<tid>/schedstat`.
fn thread_cpu_ns(tid: Option<i32>) -> Result<u64> {
    let path = match tid {
        Some(t) => format!("/proc/self/task/{t}/schedstat"),
        None => "/proc/thread-self/schedstat".into(),
    };
    let text = std::fs::read_to_string(&path).with_context(|| format!("read {path}"))?;
    text.split_whitespace()
        .next()
        .and_then(|w| w.parse().ok())
        .with_context(|| format!("no run time in {path}: {text:?}"))
}

/// What one connection-rate measurement gave.
struct ConnRun {
    rate: f64,
    ok: u64,
    failed: u64,
    /// CPU time of the client thread over the run, ns.
    client_cpu_ns: u64,
}

/// New connections per second from `netns` to `to` for `dur`: connect, read the server's byte,
/// close with a reset (`SO_LINGER` 0). Why the reset: ~10k connections a second between the
/// same two addresses cycle through the ephemeral ports within seconds, and a 4-tuple still in
/// TIME_WAIT makes the next SYN on it wait for a retransmit: the measurement would be of
/// TIME_WAIT collisions, not of the path.
fn conn_rate(netns: &Path, to: SocketAddrV4, dur: Duration) -> Result<ConnRun> {
    in_netns(netns, move || {
        let cpu0 = thread_cpu_ns(None)?;
        let start = Instant::now();
        let (mut ok, mut failed) = (0u64, 0u64);
        let mut buf = [0u8; 16];
        while start.elapsed() < dur {
            match TcpStream::connect_timeout(&to.into(), Duration::from_secs(1)) {
                Ok(mut s) => {
                    let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
                    let got = s.read(&mut buf).unwrap_or(0);
                    let _ = nix::sys::socket::setsockopt(
                        &s,
                        nix::sys::socket::sockopt::Linger,
                        &libc::linger {
                            l_onoff: 1,
                            l_linger: 0,
                        },
                    );
                    if got == 1 { ok += 1 } else { failed += 1 }
                }
                Err(_) => failed += 1,
            }
        }
        Ok(ConnRun {
            rate: ok as f64 / start.elapsed().as_secs_f64(),
            ok,
            failed,
            client_cpu_ns: thread_cpu_ns(None)?.saturating_sub(cpu0),
        })
    })
    .join()
    .map_err(|_panic| anyhow::anyhow!("the client thread panicked"))?
}

/// One iperf3 run from `netns` to `to`: receiver bits per second, and CPU ms (client and
/// server, from iperf3's own utilization figures) per GB received.
fn iperf(netns: &Path, to: SocketAddrV4, secs: u64) -> Result<(f64, f64)> {
    let out = topo::run(
        topo::nsenter_cmd(
            netns,
            &[
                "iperf3",
                "-c",
                &to.ip().to_string(),
                "-p",
                &to.port().to_string(),
                "-t",
                &secs.to_string(),
                "-J",
            ],
        ),
        None,
        Duration::from_secs(secs + 30),
    )?;
    ensure!(out.success(), "iperf3 to {to}: {out}");
    let v: Value = serde_json::from_str(&out.stdout).context("iperf3 -J output")?;
    let bps = v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .with_context(|| format!("no receiver rate in iperf3 output: {}", out.stdout))?;
    let bytes = v["end"]["sum_received"]["bytes"].as_f64().unwrap_or(0.0);
    let wall = v["end"]["sum_received"]["seconds"].as_f64().unwrap_or(0.0);
    let cpu = &v["end"]["cpu_utilization_percent"];
    let pct =
        cpu["host_total"].as_f64().unwrap_or(0.0) + cpu["remote_total"].as_f64().unwrap_or(0.0);
    let ms_per_gb = if bytes > 0.0 {
        pct / 100.0 * wall * 1e3 / (bytes / 1e9)
    } else {
        0.0
    };
    Ok((bps, ms_per_gb))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

struct Path_ {
    name: &'static str,
    conn: SocketAddrV4,
    /// `None`: no throughput figure for this path.
    iperf: Option<SocketAddrV4>,
}

/// Measures every path `rounds()` times, alternating; returns a JSON object per path.
fn measure(client_ns: &Path, paths: &[Path_], server_tids: &[i32]) -> Result<Value> {
    let only = std::env::var("SWARMNET_BENCH_PATHS").ok();
    let paths: Vec<&Path_> = paths
        .iter()
        .filter(|p| {
            only.as_deref()
                .is_none_or(|o| o.split(',').any(|n| n.trim() == p.name))
        })
        .collect();
    let dur = Duration::from_secs(secs());
    // Warm-up: ARP, conntrack, caches.
    for p in &paths {
        conn_rate(client_ns, p.conn, Duration::from_millis(500))?;
    }
    let mut rates: Vec<Vec<f64>> = vec![Vec::new(); paths.len()];
    let mut failures = vec![0u64; paths.len()];
    let mut bps: Vec<Vec<f64>> = vec![Vec::new(); paths.len()];
    let mut conn_cpu: Vec<Vec<f64>> = vec![Vec::new(); paths.len()];
    let mut gb_cpu: Vec<Vec<f64>> = vec![Vec::new(); paths.len()];
    for r in 0..rounds() {
        for (i, p) in paths.iter().enumerate() {
            let servers_cpu = || -> Result<u64> {
                server_tids
                    .iter()
                    .map(|t| thread_cpu_ns(Some(*t)))
                    .sum::<Result<u64>>()
            };
            let server0 = servers_cpu()?;
            let run = conn_rate(client_ns, p.conn, dur)?;
            let server = servers_cpu()?.saturating_sub(server0);
            let us = (run.client_cpu_ns + server) as f64 / 1e3 / run.ok.max(1) as f64;
            eprintln!(
                "round {r} {}: {:.0} conn/s ({} failed), {us:.1} us CPU per connection",
                p.name, run.rate, run.failed
            );
            rates[i].push(run.rate);
            failures[i] += run.failed;
            conn_cpu[i].push(us);
        }
        for (i, p) in paths.iter().enumerate() {
            let Some(to) = p.iperf else { continue };
            let (b, ms) = iperf(client_ns, to, secs())?;
            eprintln!(
                "round {r} {}: {:.2} Gbit/s, {ms:.0} ms CPU per GB",
                p.name,
                b / 1e9
            );
            bps[i].push(b);
            gb_cpu[i].push(ms);
        }
    }
    let mut out = serde_json::Map::new();
    for (i, p) in paths.iter().enumerate() {
        out.insert(
            p.name.into(),
            json!({
                "conn_per_s": median(rates[i].clone()),
                "conn_failed": failures[i],
                "gbit_per_s": median(bps[i].clone()) / 1e9,
                "cpu_us_per_conn": median(conn_cpu[i].clone()),
                "cpu_ms_per_gb": median(gb_cpu[i].clone()),
                "conn_samples": rates[i],
                "cpu_us_per_conn_samples": conn_cpu[i],
                "cpu_ms_per_gb_samples": gb_cpu[i],
                "gbit_samples": bps[i].iter().map(|b| b / 1e9).collect::<Vec<_>>(),
            }),
        );
    }
    Ok(Value::Object(out))
}

fn sleeping_task(id: &str, svc: &str, node: &str, net: &str, ip: &str) -> Value {
    json!({"id": id, "service": svc, "slot": 1, "node": node, "argv": ["sleep", "infinity"],
           "networks": [{"network": net, "ip": ip}]})
}

/// The mixed service's task addresses on the ingress network: mix1 (n1), mix2 (n2).
const MIX: [&str; 2] = ["10.255.0.13", "10.255.0.14"];

/// The task as its service's second replica.
fn slot2(mut t: Value) -> Value {
    t["slot"] = json!(2);
    t
}

fn iperf_task(id: &str, svc: &str, node: &str, net: &str, ip: &str) -> Value {
    json!({"id": id, "service": svc, "slot": 1, "node": node,
           "argv": ["iperf3", "-s", "-p", IPERF_PORT.to_string()],
           "networks": [{"network": net, "ip": ip}]})
}

/// Waits until `to` accepts a connection from `netns`.
fn wait_accepting(netns: &Path, to: SocketAddrV4) -> Result<()> {
    let ns = netns.to_path_buf();
    retry(
        &format!("{to} to accept"),
        Duration::from_secs(30),
        move || {
            in_netns(&ns, move || {
                TcpStream::connect_timeout(&to.into(), Duration::from_secs(1))?;
                Ok(())
            })
            .join()
            .map_err(|_panic| anyhow::anyhow!("probe thread panicked"))?
        },
    )?;
    Ok(())
}

fn sa(ip: &str, port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(ip.parse().expect("an IPv4 address"), port)
}

#[test]
#[ignore = "benchmark: run by bench/datapath.sh"]
fn bench_vip_datapath() {
    topo::with_topology(2, |topo| {
        let vip = "10.30.0.2";
        let (conn_backend, iperf_backend) = ("10.30.0.11", "10.30.0.12");
        let intent = topo
            .cluster_intent()
            .network(APP, "10.30.0.0/24", 4200)
            .service_json(
                json!({"name": "conn", "networks": [{"network": APP, "vip": vip}],
                                 "ports": [{"target": CONN_PORT}]}),
            )
            .service_json(
                json!({"name": "perf", "networks": [{"network": APP, "vip": "10.30.0.3"}],
                                 "ports": [{"target": IPERF_PORT}]}),
            )
            .service_json(json!({"name": "client", "networks": [{"network": APP}]}))
            .task_json(sleeping_task("conn1", "conn", "n2", APP, conn_backend))
            .task_json(iperf_task("perf1", "perf", "n2", APP, iperf_backend))
            .task_json(sleeping_task("client1", "client", "n1", APP, "10.30.0.21"))
            .build();
        let verdict = topo.write_intent(&intent)?;
        ensure!(verdict.is_none(), "{verdict:?}");
        topo.start_netd(&[])?;
        topo.wait_converged(CONVERGE_TIMEOUT)?;
        let client = topo.node("n1").sandbox_netns("client1");
        let server_ns = topo.node("n2").sandbox_netns("conn1");
        let server = ConnServer::start(&server_ns, CONN_PORT, sa(conn_backend, CONN_PORT))?;
        for to in [
            sa(vip, CONN_PORT),
            sa(conn_backend, CONN_PORT),
            sa("10.30.0.3", IPERF_PORT),
            sa(iperf_backend, IPERF_PORT),
        ] {
            wait_accepting(&client, to)?;
        }
        let paths = [
            Path_ {
                name: "direct",
                conn: sa(conn_backend, CONN_PORT),
                iperf: Some(sa(iperf_backend, IPERF_PORT)),
            },
            Path_ {
                name: "vip",
                conn: sa(vip, CONN_PORT),
                iperf: Some(sa("10.30.0.3", IPERF_PORT)),
            },
        ];
        let m = measure(&client, &paths, &[server.tid])?;
        println!(
            "DATAPATH {}",
            json!({"bench": "vip", "secs": secs(), "rounds": rounds(), "paths": m})
        );
        Ok(())
    });
}

#[test]
#[ignore = "benchmark: run by bench/datapath.sh"]
fn bench_mesh_datapath() {
    topo::with_topology(2, |topo| {
        let (conn_task, iperf_task_ip) = ("10.255.0.11", "10.255.0.12");
        let mut intent = topo
            .cluster_intent()
            .network_json(
                json!({"name": INGRESS, "subnet": "10.255.0.0/24", "vni": 4096, "ingress": true}),
            )
            .service_json(
                json!({"name": "conn", "networks": [{"network": INGRESS, "vip": "10.255.0.2"}],
                                 "ports": [{"target": CONN_PORT, "published": 8080},
                                           {"name": "host", "target": CONN_PORT, "published": 8081,
                                            "publish_mode": "host"}]}),
            )
            .service_json(
                json!({"name": "perf", "networks": [{"network": INGRESS, "vip": "10.255.0.3"}],
                                 "ports": [{"target": IPERF_PORT, "published": 5201},
                                           {"name": "host", "target": IPERF_PORT, "published": 5202,
                                            "publish_mode": "host"}]}),
            )
            // The same servers for a service with a task on n1 and one on n2: through n1 half
            // the connections go to the local task straight, half through the ingress sandbox
            // and VXLAN to n2 (netd/src/mesh.rs).
            .service_json(
                json!({"name": "mix", "networks": [{"network": INGRESS, "vip": "10.255.0.4"}],
                       "ports": [{"target": CONN_PORT, "published": 8090}]}),
            )
            .task_json(sleeping_task("conn1", "conn", "n1", INGRESS, conn_task))
            .task_json(iperf_task("perf1", "perf", "n1", INGRESS, iperf_task_ip))
            .task_json(sleeping_task("mix1", "mix", "n1", INGRESS, MIX[0]))
            .task_json(slot2(sleeping_task("mix2", "mix", "n2", INGRESS, MIX[1])))
            .build();
        for (i, n) in intent["nodes"]
            .as_array_mut()
            .context("nodes")?
            .iter_mut()
            .enumerate()
        {
            n["ingress_ip"] = json!(format!("10.255.0.{}", 100 + i + 1));
        }
        let verdict = topo.write_intent(&intent)?;
        ensure!(verdict.is_none(), "{verdict:?}");
        topo.start_netd(&[])?;
        topo.wait_converged(CONVERGE_TIMEOUT)?;
        // The outside client: an address on the underlay, and a route to n1's gateway-bridge
        // subnet through n1 so the tasks can also be reached straight, without NAT.
        let outside = format!("198.18.{}.250", topo.k);
        topo::host_cmd(&[
            "ip",
            "-n",
            &topo.underlay_ns,
            "addr",
            "add",
            &format!("{outside}/24"),
            "dev",
            "ul0",
        ])?
        .check()?;
        let n1 = topo.node("n1").addr.to_string();
        let n2 = topo.node("n2").addr.to_string();
        let gw_addr = |task: &str| -> Result<(String, String)> {
            let out = topo
                .sandbox_exec("n1", task, &["ip", "-4", "-o", "addr", "show"])?
                .check()?;
            out.stdout
                .split_whitespace()
                .filter(|w| w.contains('/'))
                .find(|w| !w.starts_with("10.255.") && !w.starts_with("127."))
                .map(|w| {
                    let (ip, len) = w.split_once('/').expect("has a slash");
                    (ip.to_string(), len.to_string())
                })
                .with_context(|| format!("no gateway-bridge address in {}", out.stdout))
        };
        let (conn_gw, len) = gw_addr("conn1")?;
        let (perf_gw, _) = gw_addr("perf1")?;
        let net: Ipv4Addr = conn_gw.parse()?;
        let prefix: u8 = len.parse()?;
        let mask = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
        let subnet = Ipv4Addr::from(u32::from(net) & mask);
        topo::host_cmd(&[
            "ip",
            "-n",
            &topo.underlay_ns,
            "route",
            "add",
            &format!("{subnet}/{prefix}"),
            "via",
            &n1,
        ])?
        .check()?;
        let client = PathBuf::from(topo::NETNS_DIR).join(&topo.underlay_ns);
        let server_ns = topo.node("n1").sandbox_netns("conn1");
        let server = ConnServer::start(&server_ns, CONN_PORT, sa(conn_task, CONN_PORT))?;
        let mix_local = ConnServer::start(
            &topo.node("n1").sandbox_netns("mix1"),
            CONN_PORT,
            sa(MIX[0], CONN_PORT),
        )?;
        let mix_remote = ConnServer::start(
            &topo.node("n2").sandbox_netns("mix2"),
            CONN_PORT,
            sa(MIX[1], CONN_PORT),
        )?;
        let paths = [
            Path_ {
                name: "direct",
                conn: sa(&conn_gw, CONN_PORT),
                iperf: Some(sa(&perf_gw, IPERF_PORT)),
            },
            Path_ {
                name: "host_mode",
                conn: sa(&n1, 8081),
                iperf: Some(sa(&n1, 5202)),
            },
            Path_ {
                name: "mesh_node_with_task",
                conn: sa(&n1, 8080),
                iperf: Some(sa(&n1, 5201)),
            },
            Path_ {
                name: "mesh_node_without_task",
                conn: sa(&n2, 8080),
                iperf: Some(sa(&n2, 5201)),
            },
            // No throughput: iperf3's control and data connections are two connections, and a
            // per-connection random pick sends them to different tasks.
            Path_ {
                name: "mesh_n1_of_local+remote",
                conn: sa(&n1, 8090),
                iperf: None,
            },
        ];
        for p in &paths {
            wait_accepting(&client, p.conn)?;
            if let Some(to) = p.iperf {
                wait_accepting(&client, to)?;
            }
        }
        let m = measure(
            &client,
            &paths,
            &[server.tid, mix_local.tid, mix_remote.tid],
        )?;
        println!(
            "DATAPATH {}",
            json!({"bench": "mesh", "secs": secs(), "rounds": rounds(), "paths": m})
        );
        Ok(())
    });
}
