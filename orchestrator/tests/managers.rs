//! Three managers in one process on loopback ports, driven only through the gRPC API:
//! replication and forwarding, the leader killed in the middle of a burst of writes (a new
//! leader within a bounded time, every acknowledged write kept), two of three stopped (writes
//! refused with "no quorum" quickly), and a restart of all managers (state intact); the
//! assignment stream (a snapshot, then deltas on their base; removal in two phases); a fourth
//! manager added and the leader removed while writes continue.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use swarmnet_model::Intent;
use swarmnet_model::delta::SpecDelta;
use swarmnet_model::spec::{ClusterSpec, DesiredState};
use swarmnet_orchestrator::pb;
use swarmnet_orchestrator::raft::manager::{Manager, ManagerConfig};
use swarmnet_orchestrator::{api, ca};
use swarmnet_pki::Role;
use tempfile::TempDir;
use tokio::sync::oneshot;
use tonic::transport::Channel;

struct Running {
    manager: Arc<Manager>,
    stop: oneshot::Sender<()>,
    server: tokio::task::JoinHandle<Result<(), tonic::transport::Error>>,
}

struct Slot {
    id: u64,
    addr: String,
    dir: PathBuf,
    running: Option<Running>,
}

struct Cluster {
    _tmp: TempDir,
    slots: Vec<Slot>,
}

async fn start(slot: &mut Slot) {
    start_with(slot, Duration::from_secs(3600)).await
}

async fn start_with(slot: &mut Slot, node_down_after: Duration) {
    let listener = {
        // Rebinding the same port after a stop can meet a lingering socket for a moment.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match tokio::net::TcpListener::bind(&slot.addr).await {
                Ok(l) => break l,
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => panic!("bind {}: {e}", slot.addr),
            }
        }
    };
    let mut cfg = ManagerConfig::new(slot.id, slot.addr.clone(), slot.dir.clone());
    // Most tests run no netd: nodes never heartbeat, so they set this long.
    cfg.node_down_after = node_down_after;
    // Credentials were provisioned by `cluster3_with` (or survive a restart on disk).
    let tls = ca::ManagerTls::new(ca::existing(&slot.dir).expect("credentials")).unwrap();
    let manager = Manager::start(cfg, tls).await.expect("manager starts");
    let (stop, rx) = oneshot::channel::<()>();
    let server = tokio::spawn(api::serve(manager.clone(), listener, async {
        let _ = rx.await;
    }));
    slot.running = Some(Running {
        manager,
        stop,
        server,
    });
}

async fn stop(slot: &mut Slot) {
    let r = slot.running.take().expect("running");
    r.manager.shutdown().await;
    let _ = r.stop.send(());
    let _ = tokio::time::timeout(Duration::from_secs(10), r.server).await;
}

/// Free loopback ports, reserved by binding and released for the managers to take.
async fn ports(n: usize) -> Vec<String> {
    let mut ls = Vec::new();
    for _ in 0..n {
        ls.push(tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap());
    }
    ls.iter()
        .map(|l| l.local_addr().unwrap().to_string())
        .collect()
}

async fn cluster3() -> Cluster {
    cluster3_with(Duration::from_secs(3600)).await
}

async fn cluster3_with(node_down_after: Duration) -> Cluster {
    let tmp = tempfile::tempdir().unwrap();
    let mut slots: Vec<Slot> = ports(3)
        .await
        .into_iter()
        .enumerate()
        .map(|(i, addr)| Slot {
            id: i as u64 + 1,
            addr,
            dir: tmp.path().join(format!("m{}", i + 1)),
            running: None,
        })
        .collect();
    // Manager 1 makes the CA; the others get the manager certificates a join would give
    // them (tests/tls.rs joins over the network).
    ca::bootstrap(&slots[0].dir, "manager-1", Duration::from_secs(3600)).unwrap();
    let root = ca::pending_root_ca(&slots[0].dir).unwrap();
    for s in &slots[1..] {
        let m = root
            .issue_local(
                &format!("manager-{}", s.id),
                Role::Manager,
                Duration::from_secs(3600),
            )
            .unwrap();
        swarmnet_pki::store::save(&ca::tls_dir(&s.dir), &m).unwrap();
    }
    let admin = ca::client_config_from(&ca::admin_dir(&slots[0].dir)).unwrap();
    for s in &mut slots {
        ADMIN.lock().unwrap().insert(s.addr.clone(), admin.clone());
        start_with(s, node_down_after).await;
    }
    let mut c = cluster_client(&slots[0].addr).await;
    c.init(pb::InitRequest {
        cluster_id: "test".into(),
        node: Some(pb::JoinNodeRequest {
            id: "n1".into(),
            addr: "198.18.0.1".into(),
            role: "manager".into(),
            ..Default::default()
        }),
        ..Default::default()
    })
    .await
    .expect("init");
    for s in &slots[1..] {
        // Through a follower too: it forwards to the leader.
        c.add_manager(pb::AddManagerRequest {
            id: s.id,
            addr: s.addr.clone(),
        })
        .await
        .expect("add manager");
    }
    let tokens = c.join_tokens(pb::Empty {}).await.unwrap().into_inner();
    // The tokens pin the CA.
    let digest = root.digest().unwrap();
    assert!(
        tokens.worker.starts_with(&format!("SWMTKN-1-{digest}-")),
        "{tokens:?}"
    );
    assert_ne!(tokens.worker, tokens.manager);
    // A wrong token is refused, and the node is not recorded.
    let e = c
        .join_node(pb::JoinNodeRequest {
            id: "n2".into(),
            addr: "198.18.0.2".into(),
            token: format!("{}x", tokens.worker),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e}");
    for i in 2..=3 {
        let n = c
            .join_node(pb::JoinNodeRequest {
                id: format!("n{i}"),
                addr: format!("198.18.0.{i}"),
                // Asking for a role does not grant it: the worker token makes a worker.
                role: "manager".into(),
                token: tokens.worker.clone(),
                ..Default::default()
            })
            .await
            .expect("join node")
            .into_inner();
        assert_eq!(n.role, "worker");
        assert!(!n.ingress_ip.is_empty());
    }
    Cluster { _tmp: tmp, slots }
}

/// The administrator's TLS configuration per manager address (each test's cluster has its own
/// CA; ports are unique within the process).
static ADMIN: std::sync::LazyLock<
    std::sync::Mutex<std::collections::HashMap<String, Arc<swarmnet_pki::rustls::ClientConfig>>>,
> = std::sync::LazyLock::new(Default::default);

/// An mTLS channel with the administrator certificate.
async fn channel(addr: &str) -> Channel {
    let tls = ADMIN
        .lock()
        .unwrap()
        .get(addr)
        .cloned()
        .expect("a cluster's address");
    swarmnet_orchestrator::raft::network::channel(addr, &tls).unwrap()
}

async fn cluster_client(addr: &str) -> pb::cluster_client::ClusterClient<Channel> {
    pb::cluster_client::ClusterClient::new(channel(addr).await)
}

async fn networks_client(addr: &str) -> pb::networks_client::NetworksClient<Channel> {
    pb::networks_client::NetworksClient::new(channel(addr).await)
}

async fn services_client(addr: &str) -> pb::services_client::ServicesClient<Channel> {
    pb::services_client::ServicesClient::new(channel(addr).await)
}

/// A client writing `count` networks `<prefix><i>` one after another, each to any manager that
/// answers (retrying for up to 30 s). Each acknowledged name is sent on the channel as it comes;
/// the task returns them all.
fn spawn_writer(
    prefix: &'static str,
    count: usize,
    addrs: Vec<String>,
) -> (
    tokio::task::JoinHandle<Vec<String>>,
    tokio::sync::mpsc::UnboundedReceiver<String>,
) {
    let (acked_tx, acked_rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    let writer = tokio::spawn(async move {
        let mut acked = Vec::new();
        for i in 0..count {
            let name = format!("{prefix}{i}");
            let started = Instant::now();
            'retry: loop {
                for addr in &addrs {
                    match networks_client(addr)
                        .await
                        .create(pb::NetworkCreate {
                            name: name.clone(),
                            ..Default::default()
                        })
                        .await
                    {
                        Ok(_) => break 'retry,
                        // A retried write that had been committed before the failover.
                        Err(e) if e.code() == tonic::Code::AlreadyExists => break 'retry,
                        Err(_) => continue,
                    }
                }
                assert!(
                    started.elapsed() < Duration::from_secs(30),
                    "write {name} not accepted within 30 s"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            acked.push(name.clone());
            let _ = acked_tx.send(name);
        }
        acked
    });
    (writer, acked_rx)
}

/// Polls until `f` holds or the deadline passes; returns whether it held.
async fn eventually(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if f() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    f()
}

fn leader_of(c: &Cluster) -> Option<u64> {
    let leaders: BTreeSet<Option<u64>> = c
        .slots
        .iter()
        .filter_map(|s| s.running.as_ref())
        .map(|r| r.manager.raft.metrics().borrow().current_leader)
        .collect();
    match leaders.into_iter().collect::<Vec<_>>().as_slice() {
        [Some(l)] => Some(*l),
        _ => None,
    }
}

fn networks_on(s: &Slot) -> BTreeSet<String> {
    s.running
        .as_ref()
        .unwrap()
        .manager
        .state
        .read(|a| a.state.networks.keys().map(|n| n.to_string()).collect())
}

fn has_service(s: &Slot, name: &str) -> bool {
    s.running
        .as_ref()
        .unwrap()
        .manager
        .state
        .read(|a| a.state.services.keys().any(|k| k.as_str() == name))
}

fn web() -> pb::ServiceSpec {
    pb::ServiceSpec {
        name: "web".into(),
        replicas: 3,
        argv: vec!["sleep".into(), "inf".into()],
        networks: vec![pb::ServiceNetwork {
            network: "app".into(),
            aliases: vec![],
        }],
        ports: vec![pb::Port {
            target: 80,
            publish: "auto".into(),
            ..Default::default()
        }],
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_managers_replicate_forward_and_stream_assignments() {
    let c = cluster3().await;
    // Write through a follower.
    let leader = leader_of(&c).expect("a leader");
    let follower = c.slots.iter().find(|s| s.id != leader).unwrap();
    let net = networks_client(&follower.addr)
        .await
        .create(pb::NetworkCreate {
            name: "app".into(),
            ..Default::default()
        })
        .await
        .expect("create network")
        .into_inner();
    assert_eq!(net.subnet, "10.0.1.0/24");
    assert_eq!(net.vni, 4097);
    let svc = services_client(&follower.addr)
        .await
        .create(web())
        .await
        .expect("create service")
        .into_inner();
    assert_eq!(svc.spec.unwrap().ports[0].published, 30000);
    assert!(svc.vips.contains_key("app") && svc.vips.contains_key("ingress"));
    // Errors carry the state machine's message and a matching code.
    let e = networks_client(&follower.addr)
        .await
        .create(pb::NetworkCreate {
            name: "other".into(),
            subnet: "10.0.1.128/25".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition);
    assert!(
        e.message()
            .contains("overlaps 10.0.1.0/24 of network \"app\""),
        "{e}"
    );
    // Every manager applies the same state.
    assert!(
        eventually(Duration::from_secs(10), || c.slots.iter().all(|s| {
            networks_on(s).contains("app")
                && s.running
                    .as_ref()
                    .unwrap()
                    .manager
                    .state
                    .read(|a| a.state.services.contains_key(&"web".parse().unwrap()))
        }))
        .await
    );
    let ps = services_client(&c.slots[2].addr)
        .await
        .ps(pb::NameRef { name: "web".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ps.tasks.len(), 3);
    let nodes: BTreeSet<&str> = ps.tasks.iter().map(|t| t.node.as_str()).collect();
    assert_eq!(nodes.len(), 3, "spread over the three nodes: {ps:?}");
    // The assignment stream (from any manager) carries a valid intent with the tasks, stamped.
    let mut d = pb::dispatcher_client::DispatcherClient::new(channel(&follower.addr).await);
    let mut stream = d
        .assignments(pb::AssignmentsRequest {
            node_id: "n2".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let first = stream.message().await.unwrap().unwrap();
    assert!(first.term >= 1 && first.index >= 1);
    assert!(!first.delta, "a stream opens with a snapshot");
    let mut spec: ClusterSpec = serde_json::from_slice(&first.intent_json).unwrap();
    let mut stamp = (first.term, first.index);
    let intent = Intent::new(spec.clone()).unwrap();
    assert_eq!(intent.tasks().count(), 3);
    // Then deltas, each on top of the message before it: follow them as netd does.
    let follow = |a: pb::Assignment, spec: &mut ClusterSpec, stamp: &mut (u64, u64)| {
        assert!(a.delta, "after the snapshot, deltas");
        assert_eq!(
            (a.base_term, a.base_index),
            *stamp,
            "a delta names its base"
        );
        assert!((a.term, a.index) > *stamp);
        let d: SpecDelta = serde_json::from_slice(&a.delta_json).unwrap();
        assert!(!d.is_empty());
        swarmnet_model::delta::apply(spec, &d);
        *stamp = (a.term, a.index);
    };
    let scale = |replicas: u32| {
        let addr = c.slots[0].addr.clone();
        async move {
            services_client(&addr)
                .await
                .scale(pb::ScaleRequest {
                    name: "web".into(),
                    replicas,
                })
                .await
                .unwrap();
        }
    };
    let running = |spec: &ClusterSpec| {
        spec.tasks
            .iter()
            .filter(|t| t.desired_state != DesiredState::Draining)
            .count()
    };
    let draining = |spec: &ClusterSpec| {
        spec.tasks
            .iter()
            .filter(|t| t.desired_state == DesiredState::Draining)
            .count()
    };
    scale(5).await;
    tokio::time::timeout(Duration::from_secs(10), async {
        while running(&spec) != 5 {
            let a = stream.message().await.unwrap().unwrap();
            follow(a, &mut spec, &mut stamp);
        }
    })
    .await
    .expect("the scaled intent arrives as deltas");
    // Scaling down is a two-phase removal: three tasks drain (still in the intent, out of
    // every load balancer and DNS), and are stopped (gone from the intent) after the grace.
    scale(2).await;
    tokio::time::timeout(Duration::from_secs(10), async {
        while draining(&spec) != 3 {
            let a = stream.message().await.unwrap().unwrap();
            follow(a, &mut spec, &mut stamp);
        }
    })
    .await
    .expect("the removed tasks drain first");
    assert_eq!(running(&spec), 2);
    let drained_at = Instant::now();
    tokio::time::timeout(Duration::from_secs(20), async {
        while spec.tasks.len() != 2 {
            let a = stream.message().await.unwrap().unwrap();
            follow(a, &mut spec, &mut stamp);
        }
    })
    .await
    .expect("the drained tasks are stopped after the grace");
    assert!(
        drained_at.elapsed() >= Duration::from_secs(1),
        "stopped only after a grace period ({:?})",
        drained_at.elapsed()
    );
    // The snapshot plus every delta is what a new stream (to another manager) starts from.
    let mut other = pb::dispatcher_client::DispatcherClient::new(channel(&c.slots[0].addr).await)
        .assignments(pb::AssignmentsRequest {
            node_id: "n2".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let fresh = other.message().await.unwrap().unwrap();
    assert!(!fresh.delta);
    let fresh_spec: ClusterSpec = serde_json::from_slice(&fresh.intent_json).unwrap();
    if (fresh.term, fresh.index) == stamp {
        assert_eq!(fresh_spec, spec);
    } else {
        assert_eq!(fresh_spec.tasks, spec.tasks, "only the tasks matter here");
    }
    // An unknown node gets no stream.
    let e = d
        .assignments(pb::AssignmentsRequest {
            node_id: "n9".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound);
    let mut c = c;
    for s in &mut c.slots {
        stop(s).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_killed_mid_burst_keeps_every_acknowledged_write() {
    let mut c = cluster3().await;
    let old = leader_of(&c).expect("a leader");
    let addrs: Vec<String> = c.slots.iter().map(|s| s.addr.clone()).collect();
    // A client writing networks one after another, to any manager that answers.
    let (writer, mut acked_rx) = spawn_writer("b", 60, addrs);
    // Kill the leader once a third of the burst is acknowledged.
    for _ in 0..20 {
        acked_rx.recv().await.expect("writer running");
    }
    let killed_at = Instant::now();
    let idx = c.slots.iter().position(|s| s.id == old).unwrap();
    stop(&mut c.slots[idx]).await;
    // A new leader among the survivors, within a few election timeouts (500-1000 ms each).
    assert!(
        eventually(Duration::from_secs(10), || leader_of(&c)
            .is_some_and(|l| l != old))
        .await,
        "no new leader"
    );
    let elected_in = killed_at.elapsed();
    eprintln!(
        "new leader {:?} elected {elected_in:?} after the kill",
        leader_of(&c)
    );
    assert!(
        elected_in < Duration::from_secs(5),
        "election took {elected_in:?}"
    );
    let acked = writer.await.unwrap();
    assert_eq!(acked.len(), 60);
    // Every acknowledged write is on every surviving manager.
    for s in c.slots.iter().filter(|s| s.running.is_some()) {
        let have = networks_on(s);
        let ok = eventually(Duration::from_secs(10), || {
            let have = networks_on(s);
            acked.iter().all(|n| have.contains(n))
        })
        .await;
        assert!(
            ok,
            "manager {} lacks acknowledged writes; has {have:?}",
            s.id
        );
    }
    for s in &mut c.slots {
        if s.running.is_some() {
            stop(s).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_quorum_writes_fail_fast_and_restart_keeps_the_state() {
    let mut c = cluster3().await;
    networks_client(&c.slots[0].addr)
        .await
        .create(pb::NetworkCreate {
            name: "app".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    services_client(&c.slots[1].addr)
        .await
        .create(web())
        .await
        .unwrap();
    // Every manager has both before two of them stop.
    assert!(
        eventually(Duration::from_secs(10), || c
            .slots
            .iter()
            .all(|s| networks_on(s).contains("app") && has_service(s, "web")))
        .await
    );
    // Stop two of three (the survivor may or may not have been the leader).
    stop(&mut c.slots[0]).await;
    stop(&mut c.slots[1]).await;
    let survivor = c.slots[2].addr.clone();
    let started = Instant::now();
    let e = networks_client(&survivor)
        .await
        .create(pb::NetworkCreate {
            name: "late".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    let took = started.elapsed();
    assert_eq!(e.code(), tonic::Code::Unavailable, "{e}");
    assert!(e.message().starts_with("no quorum"), "{e}");
    assert!(took < Duration::from_secs(10), "refusal took {took:?}");
    // Reads still answer from the survivor's state.
    let svc = services_client(&survivor)
        .await
        .inspect(pb::NameRef { name: "web".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(svc.spec.unwrap().replicas, 3);
    // Restart everything: the state is intact and writes work again.
    stop(&mut c.slots[2]).await;
    for s in &mut c.slots {
        start(s).await;
    }
    assert!(eventually(Duration::from_secs(15), || leader_of(&c).is_some()).await);
    for s in &c.slots {
        assert!(
            eventually(Duration::from_secs(10), || networks_on(s).contains("app")).await,
            "manager {} lost its state",
            s.id
        );
    }
    let svc = services_client(&c.slots[0].addr)
        .await
        .scale(pb::ScaleRequest {
            name: "web".into(),
            replicas: 4,
        })
        .await
        .expect("writes work after the restart")
        .into_inner();
    assert_eq!(svc.tasks_desired, 4);
    assert_eq!(svc.spec.unwrap().ports[0].published, 30000);
    for s in &mut c.slots {
        stop(s).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_node_is_marked_down_and_its_tasks_move() {
    let mut c = cluster3_with(Duration::from_secs(2)).await;
    let addr = c.slots[1].addr.clone();
    // n1 and n2 heartbeat (through a follower: it passes them to the leader); n3 is silent.
    let beat = tokio::spawn(async move {
        let mut d = pb::dispatcher_client::DispatcherClient::new(channel(&addr).await);
        loop {
            for n in ["n1", "n2"] {
                let _ = d
                    .heartbeat(pb::HeartbeatRequest {
                        node_id: n.into(),
                        gossip: None,
                    })
                    .await;
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    });
    networks_client(&c.slots[0].addr)
        .await
        .create(pb::NetworkCreate {
            name: "app".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let mut svc = web();
    svc.replicas = 3;
    services_client(&c.slots[0].addr)
        .await
        .create(svc)
        .await
        .unwrap();
    let nodes_client =
        || async { pb::nodes_client::NodesClient::new(channel(&c.slots[0].addr).await) };
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let list = nodes_client()
            .await
            .list(pb::Empty {})
            .await
            .unwrap()
            .into_inner();
        let status: Vec<(String, String)> =
            list.nodes.into_iter().map(|n| (n.id, n.status)).collect();
        let ps = services_client(&c.slots[0].addr)
            .await
            .ps(pb::NameRef { name: "web".into() })
            .await
            .unwrap()
            .into_inner();
        let on: BTreeSet<String> = ps.tasks.iter().map(|t| t.node.clone()).collect();
        if status
            == [
                ("n1".to_string(), "ready".to_string()),
                ("n2".into(), "ready".into()),
                ("n3".into(), "down".into()),
            ]
            && ps.tasks.len() == 3
            && !on.contains("n3")
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "n3 not marked down or its task not moved: {status:?} {on:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The gossip keyring was created with the cluster.
    let keys = c.slots[0]
        .running
        .as_ref()
        .unwrap()
        .manager
        .state
        .read(|a| a.state.keyring.len());
    assert_eq!(keys, 1);
    beat.abort();
    for s in &mut c.slots {
        stop(s).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn managers_added_and_removed_at_run_time_while_writes_continue() {
    let mut c = cluster3().await;
    let addrs: Vec<String> = c.slots.iter().map(|s| s.addr.clone()).collect();
    // A fourth manager, started now; it joins below while the writes run.
    let fourth = Slot {
        id: 4,
        addr: ports(1).await.remove(0),
        dir: c.slots[0].dir.with_file_name("m4"),
        running: None,
    };
    // It joins as a real manager would: the manager token buys it a certificate (the token
    // pins the CA), and the administrator's certificate reaches it like the others.
    let tokens = cluster_client(&addrs[1])
        .await
        .join_tokens(pb::Empty {})
        .await
        .unwrap()
        .into_inner();
    ca::join(&fourth.dir, &addrs[1], &tokens.manager, "manager-4")
        .await
        .expect("the fourth manager gets its certificate");
    let admin = ADMIN.lock().unwrap().get(&addrs[0]).cloned().unwrap();
    ADMIN.lock().unwrap().insert(fourth.addr.clone(), admin);
    let mut write_to = addrs.clone();
    write_to.push(fourth.addr.clone());
    let (writer, mut acked_rx) = spawn_writer("w", 40, write_to);
    for _ in 0..10 {
        acked_rx.recv().await.expect("writer running");
    }
    // Add the fourth through a follower (it forwards to the leader).
    let mut fourth = fourth;
    start(&mut fourth).await;
    let leader = leader_of(&c).expect("a leader");
    let follower = c
        .slots
        .iter()
        .find(|s| s.id != leader)
        .unwrap()
        .addr
        .clone();
    let info = cluster_client(&follower)
        .await
        .add_manager(pb::AddManagerRequest {
            id: 4,
            addr: fourth.addr.clone(),
        })
        .await
        .expect("add the fourth manager")
        .into_inner();
    assert!(
        info.managers.iter().any(|m| m.id == 4 && m.voter),
        "{info:?}"
    );
    c.slots.push(fourth);
    for _ in 0..10 {
        acked_rx.recv().await.expect("writer running");
    }
    // Remove the leader itself, then stop it: the other three elect a new one and go on.
    let idx = c.slots.iter().position(|s| s.id == leader).unwrap();
    let info = cluster_client(&c.slots[idx].addr)
        .await
        .remove_manager(pb::RemoveManagerRequest { id: leader })
        .await
        .expect("remove the leader")
        .into_inner();
    assert!(!info.managers.iter().any(|m| m.id == leader), "{info:?}");
    stop(&mut c.slots[idx]).await;
    let acked = writer.await.unwrap();
    assert_eq!(acked.len(), 40);
    assert!(
        eventually(Duration::from_secs(10), || leader_of(&c)
            .is_some_and(|l| l != leader))
        .await,
        "no new leader after removing {leader}"
    );
    // Every acknowledged write is on every manager left, the new one included; membership is
    // the three of them.
    for s in c.slots.iter().filter(|s| s.running.is_some()) {
        let ok = eventually(Duration::from_secs(10), || {
            let have = networks_on(s);
            acked.iter().all(|n| have.contains(n))
        })
        .await;
        assert!(ok, "manager {} lacks acknowledged writes", s.id);
        let voters = s.running.as_ref().unwrap().manager.voters();
        let want: BTreeSet<u64> = c
            .slots
            .iter()
            .filter(|x| x.running.is_some())
            .map(|x| x.id)
            .collect();
        assert_eq!(voters, want, "membership on manager {}", s.id);
    }
    for s in &mut c.slots {
        if s.running.is_some() {
            stop(s).await;
        }
    }
}
