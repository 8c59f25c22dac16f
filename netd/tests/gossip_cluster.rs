//! Gossip clusters in-process on `MemNet`: liveness (a stopped or cut-off node's endpoints
//! leave every table within the bound and return with it; deletions made while away are not
//! resurrected), forged records refused by the intent check, attacks on a running node
//! change no state, a key rotation (add → switch → remove, nodes out of step) that never
//! drops an endpoint, and a seeded property test of random adds/removes, stops/starts and
//! partitions that must converge to the same table everywhere.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use swarmnet_model::{MacAddr, Name, TaskId};
use swarmnet_netd::gossip::crypto::KEY_LEN;
use swarmnet_netd::gossip::table::{AllowAll, FnCheck};
use swarmnet_netd::gossip::{
    EndpointRecord, EndpointTable, GossipConfig, GossipNode, Health, Keyring, MemNet,
};

const BOUND: Duration = Duration::from_secs(2);
const INTERVAL: Duration = Duration::from_millis(100);

fn addr(i: usize) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1)), 7000 + i as u16)
}

fn ep(task: usize) -> EndpointRecord {
    let ip = Ipv4Addr::new(10, 0, (task / 250) as u8, (task % 250 + 2) as u8);
    EndpointRecord {
        network: Name::new("app").unwrap(),
        task: TaskId::new(format!("t{task}")).unwrap(),
        ip: IpAddr::V4(ip),
        mac: MacAddr::from_ipv4(ip),
        service: Some(Name::new("web").unwrap()),
        health: Health::Healthy,
    }
}

struct Cluster {
    net: MemNet,
    nodes: Vec<Option<GossipNode>>,
    generation: Vec<u64>,
    interval: Duration,
    bound: Duration,
}

impl Cluster {
    async fn new(n: usize) -> Self {
        Self::with_timing(n, INTERVAL, BOUND).await
    }

    async fn with_timing(n: usize, interval: Duration, bound: Duration) -> Self {
        let mut c = Cluster {
            net: MemNet::new(256),
            nodes: (0..n).map(|_| None).collect(),
            generation: vec![0; n],
            interval,
            bound,
        };
        for i in 0..n {
            c.start(i).await;
        }
        c
    }

    async fn start(&mut self, i: usize) {
        self.generation[i] += 1;
        let mut cfg = GossipConfig::new(format!("n{i}"), self.generation[i], addr(i));
        cfg.gossip_interval = self.interval;
        cfg.liveness_bound = self.bound;
        cfg.seeds = (0..self.nodes.len())
            .filter(|j| *j != i)
            .map(addr)
            .collect();
        // The previous incarnation's socket is released asynchronously: retry briefly.
        let deadline = Instant::now() + Duration::from_secs(5);
        let node = loop {
            match GossipNode::spawn(
                &cfg,
                Keyring::new(1, [5; KEY_LEN]),
                Arc::new(self.net.clone()),
            )
            .await
            {
                Ok(n) => break n,
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(e) => panic!("restart n{i}: {e}"),
            }
        };
        node.set_vtep(IpAddr::V4(Ipv4Addr::new(198, 18, 0, i as u8 + 1)))
            .await;
        self.nodes[i] = Some(node);
    }

    async fn stop(&mut self, i: usize) {
        if let Some(n) = self.nodes[i].take() {
            n.shutdown().await;
        }
    }

    fn isolate(&self, i: usize) {
        for j in 0..self.nodes.len() {
            if j != i {
                self.net.cut(addr(i), addr(j));
            }
        }
    }

    async fn tables(&self) -> Vec<(usize, EndpointTable)> {
        let mut v = Vec::new();
        for (i, n) in self.nodes.iter().enumerate() {
            if let Some(n) = n {
                v.push((i, n.table(&AllowAll).await.0));
            }
        }
        v
    }

    /// Waits until every running node's table has exactly `want` (node → tasks).
    async fn converge(&self, want: &BTreeMap<usize, BTreeSet<usize>>, timeout: Duration) {
        if let Err(e) = self.try_converge(want, timeout).await {
            panic!("{e}");
        }
    }

    async fn try_converge(
        &self,
        want: &BTreeMap<usize, BTreeSet<usize>>,
        timeout: Duration,
    ) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        let expect: BTreeSet<(String, String)> = want
            .iter()
            .flat_map(|(n, ts)| ts.iter().map(move |t| (format!("n{n}"), format!("t{t}"))))
            .collect();
        loop {
            let tables = self.tables().await;
            let bad: Vec<_> = tables
                .iter()
                .filter(|(_, t)| {
                    let got: BTreeSet<(String, String)> = t
                        .endpoints
                        .iter()
                        .map(|((_, task), e)| (e.node.clone(), task.to_string()))
                        .collect();
                    got != expect
                })
                .collect();
            if bad.is_empty() {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "no convergence within {timeout:?}: want {expect:?}, node {} has {:?}",
                    bad[0].0,
                    bad[0].1.endpoints.keys().collect::<Vec<_>>()
                ));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Publishes `tasks` as node `i`'s endpoints; answers how many peers the change was
    /// pushed to.
    async fn publish(&self, i: usize, tasks: &BTreeSet<usize>) -> usize {
        let recs: Vec<EndpointRecord> = tasks.iter().map(|t| ep(*t)).collect();
        self.nodes[i]
            .as_ref()
            .unwrap()
            .publish_endpoints(&recs)
            .await
    }
}

/// A changed endpoint set is pushed to the peers at once, not left for the next gossip rounds
/// (which, with a 3 s interval, come 1.5 s later on average): every change below reaches both
/// peers within a tenth of the interval, four times in a row (without the push, each would
/// make it with a chance of about one in ten: a round falling in that window). An unchanged
/// set pushes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_is_pushed_to_peers_without_waiting_for_a_round() {
    let interval = Duration::from_secs(3);
    let c = Cluster::with_timing(3, interval, Duration::from_secs(30)).await;
    let mut want: BTreeMap<usize, BTreeSet<usize>> = BTreeMap::new();
    // Membership first (the failure detector needs a few heartbeats from each peer).
    c.converge(&want, Duration::from_secs(20)).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    while c.tables().await.iter().any(|(_, t)| t.vteps.len() < 3) {
        assert!(Instant::now() < deadline, "membership did not converge");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut tasks = BTreeSet::new();
    for round in 0..4 {
        // Alternately a new endpoint and a removal of the oldest.
        if round % 2 == 0 || tasks.len() < 2 {
            tasks.insert(round);
        } else {
            let first = *tasks.iter().next().unwrap();
            tasks.remove(&first);
        }
        let started = Instant::now();
        assert_eq!(c.publish(0, &tasks).await, 2, "pushed to both peers");
        want.insert(0, tasks.clone());
        c.converge(&want, interval / 10).await;
        println!("change {round} everywhere after {:?}", started.elapsed());
    }
    assert_eq!(
        c.publish(0, &tasks).await,
        0,
        "nothing changed, nothing pushed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn liveness_stop_restart_and_no_resurrection() {
    let mut c = Cluster::new(4).await;
    let mut want: BTreeMap<usize, BTreeSet<usize>> = BTreeMap::new();
    for i in 0..4 {
        let ts: BTreeSet<usize> = (i * 10..i * 10 + 3).collect();
        c.publish(i, &ts).await;
        want.insert(i, ts);
    }
    c.converge(&want, Duration::from_secs(10)).await;

    // n3 stops: gone from every table within the bound (plus one table poll).
    c.stop(3).await;
    let stopped = Instant::now();
    let mut without = want.clone();
    without.remove(&3);
    c.converge(&without, BOUND + Duration::from_secs(1)).await;
    let detect = stopped.elapsed();
    assert!(detect <= BOUND + Duration::from_secs(1), "{detect:?}");

    // It comes back (new generation) having lost task 31 while away: 30 and 32 return, 31
    // does not.
    c.start(3).await;
    let back: BTreeSet<usize> = [30, 32].into();
    c.publish(3, &back).await;
    want.insert(3, back);
    c.converge(&want, Duration::from_secs(10)).await;
    println!("n3 declared dead after {detect:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partition_then_heal_with_changes_on_both_sides() {
    let c = Cluster::new(4).await;
    let mut want: BTreeMap<usize, BTreeSet<usize>> = BTreeMap::new();
    for i in 0..4 {
        let ts: BTreeSet<usize> = (i * 10..i * 10 + 3).collect();
        c.publish(i, &ts).await;
        want.insert(i, ts);
    }
    c.converge(&want, Duration::from_secs(10)).await;
    c.isolate(3);
    tokio::time::sleep(BOUND + Duration::from_millis(500)).await;
    // n3 deletes 31 and adds 33 while away; n0 deletes 1.
    let n3: BTreeSet<usize> = [30, 32, 33].into();
    c.publish(3, &n3).await;
    let n0: BTreeSet<usize> = [0, 2].into();
    c.publish(0, &n0).await;
    let t0 = c.nodes[0].as_ref().unwrap().table(&AllowAll).await.0;
    assert_eq!(t0.of_node("n3").count(), 0, "cut-off node is dead for n0");
    c.net.heal_all();
    want.insert(3, n3);
    want.insert(0, n0);
    c.converge(&want, Duration::from_secs(10)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_records_and_attack_datagrams_change_nothing() {
    let c = Cluster::new(3).await;
    c.publish(0, &[1, 2].into()).await;
    c.publish(1, &[3].into()).await;
    // n2 claims task t1 (intent places it on n0) and a task intent does not know.
    c.publish(2, &[1, 99].into()).await;
    // Intent: t1, t2 on n0; t3 on n1; VTEPs 198.18.0.(i+1).
    let check = FnCheck {
        endpoint: |node: &str, r: &EndpointRecord| {
            let owner = match r.task.as_str() {
                "t1" | "t2" => "n0",
                "t3" => "n1",
                _ => return false,
            };
            node == owner && r.ip == ep(r.task.as_str()[1..].parse().unwrap()).ip
        },
        vtep: |node: &str, ip: IpAddr| {
            let i: u8 = node[1..].parse().unwrap();
            ip == IpAddr::V4(Ipv4Addr::new(198, 18, 0, i + 1))
        },
    };
    let n1 = c.nodes[1].as_ref().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let (table, stats) = loop {
        let (t, s) = n1.table(&check).await;
        if t.endpoints.len() == 3 && s.rejected_by_intent == 2 {
            break (t, s);
        }
        assert!(Instant::now() < deadline, "{t:?} {s:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(table.endpoints.values().all(|e| e.node != "n2"));
    assert_eq!(stats.accepted, 3);

    // Capture genuine datagrams, then replay them, plus wrong-key and random ones, at n1.
    c.net.start_capture(50);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let captured = c.net.take_captured();
    assert!(!captured.is_empty());
    let before_counters = n1.counters();
    let before_state = n1.live_snapshots().await;
    let attacker = addr(50);
    let mut replays = 0;
    for (_, to, bytes) in &captured {
        if *to == addr(1) {
            c.net.inject(attacker, addr(1), bytes.clone());
            replays += 1;
        }
    }
    let wrong = Keyring::new(1, [6; KEY_LEN]);
    let mut sealer = swarmnet_netd::gossip::crypto::Sealer::new(1);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    for (_, _, bytes) in captured.iter().take(5) {
        let forged = wrong.seal(sealer.next_header(now, 0, 1), &bytes[33..]);
        c.net.inject(attacker, addr(1), forged);
    }
    for k in 0..20u8 {
        c.net
            .inject(attacker, addr(1), vec![k; 60 + usize::from(k)]);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let after = n1.counters();
    assert!(after.dropped_replay - before_counters.dropped_replay >= replays as u64);
    assert!(after.dropped_auth - before_counters.dropped_auth >= 5);
    assert!(after.dropped_malformed - before_counters.dropped_malformed >= 20);
    // No state change: the same nodes, the same max versions.
    let after_state = n1.live_snapshots().await;
    let kv = |s: &[swarmnet_netd::gossip::NodeSnapshot]| {
        s.iter()
            .map(|n| (n.node_id.clone(), n.generation, n.key_values.clone()))
            .collect::<Vec<_>>()
    };
    assert_eq!(kv(&before_state), kv(&after_state));
    println!(
        "replayed {replays}, counters: replay {} auth {} malformed {}",
        after.dropped_replay, after.dropped_auth, after.dropped_malformed
    );
}

/// Rotation in the three steps of `gossip::keyfile`, each applied node by node with gossip
/// running in between (nodes out of step, as when they re-read the key file at different
/// times): every node keeps every endpoint throughout, and no datagram is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_rotation_out_of_step_keeps_every_endpoint() {
    use swarmnet_netd::gossip::keyfile::{KeyFile, render};
    let c = Cluster::new(4).await;
    let mut want: BTreeMap<usize, BTreeSet<usize>> = BTreeMap::new();
    for i in 0..4 {
        let ts: BTreeSet<usize> = [i * 10].into();
        c.publish(i, &ts).await;
        want.insert(i, ts);
    }
    c.converge(&want, Duration::from_secs(10)).await;
    let old = [5; KEY_LEN];
    let new = [9; KEY_LEN];
    let refused = |c: &Cluster| -> u64 {
        c.nodes
            .iter()
            .flatten()
            .map(|n| {
                let k = n.counters();
                k.dropped_auth + k.dropped_unknown_key
            })
            .sum()
    };
    let refused_before = refused(&c);
    for step in [
        render(1, &[(1, old), (2, new)]),
        render(2, &[(1, old), (2, new)]),
        render(2, &[(2, new)]),
    ] {
        let file = KeyFile::parse(&step).unwrap();
        for i in 0..4 {
            file.apply(c.nodes[i].as_ref().unwrap().keyring()).unwrap();
            // Gossip runs with this node ahead of the others; nothing may go missing.
            let deadline = Instant::now() + 2 * INTERVAL;
            while Instant::now() < deadline {
                for (j, t) in c.tables().await {
                    assert_eq!(
                        t.endpoints.len(),
                        4,
                        "node {j} lost an endpoint at step {step}"
                    );
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
    // Past the liveness bound on the new key alone: every node still live everywhere.
    tokio::time::sleep(BOUND + Duration::from_millis(500)).await;
    c.converge(&want, Duration::from_secs(1)).await;
    assert_eq!(
        refused(&c),
        refused_before,
        "no datagram refused during the rotation"
    );
    for n in c.nodes.iter().flatten() {
        assert_eq!((n.keyring().sealing_id(), n.keyring().ids()), (2, vec![2]));
    }
}

/// Random scenarios with a fixed seed: after the last event and a quiet period, every running
/// node holds the table of exactly the running nodes' current endpoints.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn property_random_churn_converges() {
    let scenarios: u64 = std::env::var("SWARMNET_GOSSIP_SCENARIOS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20);
    for seed in 0..scenarios {
        let mut rng = StdRng::seed_from_u64(0x5eed_0000 + seed);
        let n = rng.random_range(3..=5);
        let mut c = Cluster::new(n).await;
        let mut eps: Vec<BTreeSet<usize>> = vec![BTreeSet::new(); n];
        let mut events = Vec::new();
        for _ in 0..rng.random_range(4..=10) {
            let i = rng.random_range(0..n);
            match rng.random_range(0..10) {
                0..=3 => {
                    let t = i * 100 + rng.random_range(0..8);
                    eps[i].insert(t);
                    events.push(format!("add n{i} t{t}"));
                }
                4..=5 => {
                    if let Some(t) = eps[i].iter().next().copied() {
                        eps[i].remove(&t);
                        events.push(format!("remove n{i} t{t}"));
                    }
                }
                6 => {
                    if c.nodes[i].is_some() {
                        c.stop(i).await;
                        events.push(format!("stop n{i}"));
                    } else {
                        c.start(i).await;
                        events.push(format!("start n{i}"));
                    }
                }
                7 => {
                    c.isolate(i);
                    events.push(format!("isolate n{i}"));
                }
                _ => {
                    c.net.heal_all();
                    events.push("heal".into());
                }
            }
            if c.nodes[i].is_some() {
                c.publish(i, &eps[i]).await;
            }
            tokio::time::sleep(Duration::from_millis(rng.random_range(0..300))).await;
        }
        c.net.heal_all();
        // At least one node runs.
        if c.nodes.iter().all(Option::is_none) {
            c.start(0).await;
            c.publish(0, &eps[0]).await;
        }
        let want: BTreeMap<usize, BTreeSet<usize>> = (0..n)
            .filter(|i| c.nodes[*i].is_some())
            .map(|i| (i, eps[i].clone()))
            .collect();
        // A stopped node needs the liveness bound to be declared dead; a healed partition a
        // few rounds. 15 s is generous.
        let started = Instant::now();
        if let Err(e) = c.try_converge(&want, Duration::from_secs(15)).await {
            panic!("seed {seed}: events {events:?}: {e}");
        }
        println!(
            "seed {seed}: {n} nodes, {:?} to converge after {events:?}",
            started.elapsed()
        );
        for i in 0..n {
            c.stop(i).await;
        }
    }
}
