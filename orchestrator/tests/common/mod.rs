//! Builders and invariant checks shared by the state-machine tests.
#![allow(dead_code, reason = "each test binary uses a different subset")]

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use swarmnet_model::spec::{DesiredState, NodeRole, ServiceMode, TaskRuntime};
use swarmnet_model::{Intent, Name, NodeId, TaskId};
use swarmnet_orchestrator::ipam::PoolConfig;
use swarmnet_orchestrator::project::project;
use swarmnet_orchestrator::state::{
    ClusterState, Command, NetworkConfig, NodeJoin, NodeStatus, ServiceDef, ServiceNetworkConfig,
    TaskState, TaskTemplate, UpdateConfig,
};

pub fn name(s: &str) -> Name {
    Name::new(s).unwrap()
}

pub fn node_id(s: &str) -> NodeId {
    NodeId::new(s).unwrap()
}

pub fn join(i: u8, role: NodeRole) -> NodeJoin {
    NodeJoin {
        id: node_id(&format!("n{i}")),
        hostname: format!("host{i}"),
        addr: Ipv4Addr::new(198, 18, 0, i),
        role,
        labels: BTreeMap::new(),
        data_interface: None,
    }
}

/// A cluster initialized on n1 (manager) with n2..=nodes joined as workers.
pub fn cluster(nodes: u8) -> ClusterState {
    let mut s = ClusterState::default();
    apply(
        &mut s,
        Command::Init {
            cluster_id: "c1".into(),
            tokens: Default::default(),
            pool: PoolConfig::default(),
            ingress_subnet: None,
            node: join(1, NodeRole::Manager),
        },
    );
    for i in 2..=nodes {
        apply(&mut s, Command::JoinNode(join(i, NodeRole::Worker)));
    }
    s
}

/// Applies a command that must succeed, then checks every invariant. Tasks the command took
/// out of service are then reaped at once (the leader's second phase, after checking the first:
/// each is in netd's intent as draining), so tests see where tasks end up.
pub fn apply(s: &mut ClusterState, cmd: Command) {
    if let Err(e) = s.apply(&cmd) {
        panic!("{cmd:?} refused: {e}");
    }
    check_invariants(s);
    reap(s);
}

/// The leader's second phase of removal, at once: checks that every draining task is in netd's
/// intent as draining, then reaps them all.
pub fn reap(s: &mut ClusterState) {
    let draining: Vec<TaskId> = s
        .tasks
        .values()
        .filter(|t| t.draining)
        .map(|t| t.id.clone())
        .collect();
    if !draining.is_empty() {
        let spec = project(s);
        for id in &draining {
            let t = spec.tasks.iter().find(|t| &t.id == id);
            assert_eq!(
                t.map(|t| t.desired_state),
                Some(DesiredState::Draining),
                "draining task {id} in the intent"
            );
        }
        s.apply(&Command::ReapTasks { tasks: draining })
            .expect("reaping is never refused");
        check_invariants(s);
    }
}

pub fn network(n: &str) -> Command {
    Command::CreateNetwork(NetworkConfig {
        name: Some(name(n)),
        ..Default::default()
    })
}

pub fn service(n: &str, replicas: u32, nets: &[&str]) -> ServiceDef {
    ServiceDef {
        name: name(n),
        mode: ServiceMode::Replicated { replicas },
        endpoint_mode: Default::default(),
        ports: vec![],
        networks: nets
            .iter()
            .map(|n| ServiceNetworkConfig {
                network: name(n),
                aliases: vec![],
            })
            .collect(),
        restart: Default::default(),
        // Replaced at once: the state tests check what replaces; the delay has its own.
        restart_delay_ms: 0,
        affinity: Default::default(),
        task: TaskTemplate {
            argv: vec!["sleep".into(), "inf".into()],
            env: BTreeMap::new(),
            runtime: TaskRuntime::Netd,
        },
        constraints: vec![],
        update: UpdateConfig::default(),
        health: None,
    }
}

/// Tasks of a service per node id (assigned tasks only).
pub fn placement(s: &ClusterState, svc: &str) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    for t in s.tasks.values().filter(|t| t.service.as_str() == svc) {
        if let Some(n) = &t.node
            && !t.is_pending()
        {
            *out.entry(n.to_string()).or_default() += 1;
        }
    }
    out
}

pub fn pending(s: &ClusterState, svc: &str) -> Vec<String> {
    s.tasks
        .values()
        .filter(|t| t.service.as_str() == svc && t.is_pending())
        .map(|t| t.status.message.clone())
        .collect()
}

/// Marks every assigned task running, as the nodes would report.
pub fn report_all_running(s: &mut ClusterState) {
    let assigned: Vec<_> = s
        .tasks
        .values()
        .filter(|t| t.status.state == TaskState::Assigned)
        .map(|t| (t.node.clone().unwrap(), t.id.clone()))
        .collect();
    for (node, task) in assigned {
        // A report may be stale by the time it is applied (the task was replaced): that is
        // refused, which is fine here.
        let _ = s.apply(&Command::ReportTask {
            node,
            task,
            state: TaskState::Running,
            message: String::new(),
            health: None,
        });
        check_invariants(s);
        reap(s);
    }
}

/// Every invariant the state machine promises, checked from the outside.
pub fn check_invariants(s: &ClusterState) {
    // 0. Gossip keys: at most two (one outside a rotation), distinct ids, the primary one of
    //    them and sent to nodes last.
    assert!(s.keyring.len() <= 2, "keyring {:?}", s.keyring);
    let ids: BTreeSet<u64> = s.keyring.iter().map(|k| k.id).collect();
    assert_eq!(ids.len(), s.keyring.len(), "duplicate key ids");
    if let Some(p) = s.gossip_primary {
        assert!(ids.contains(&p), "primary {p} not in the keyring");
    }
    assert_eq!(
        s.keyring_for_nodes().last().map(|k| k.id),
        s.primary_gossip_key().map(|k| k.id)
    );
    // 1. Addresses: each held once, and exactly the held ones are marked used.
    let mut held: BTreeMap<Name, Vec<(Ipv4Addr, String)>> = BTreeMap::new();
    for n in s.networks.values() {
        held.entry(n.name.clone())
            .or_default()
            .push((n.gateway, "gateway".into()));
    }
    let ingress = s
        .networks
        .values()
        .find(|n| n.ingress)
        .map(|n| n.name.clone());
    for n in s.nodes.values() {
        match (&ingress, n.ingress_ip) {
            (Some(net), Some(ip)) => held
                .entry(net.clone())
                .or_default()
                .push((ip, format!("node {}", n.id))),
            (Some(_), None) => panic!("node {} has no ingress address", n.id),
            (None, Some(_)) => panic!("node {} has an ingress address but no ingress", n.id),
            (None, None) => {}
        }
    }
    for svc in s.services.values() {
        for (net, vip) in &svc.vips {
            held.entry(net.clone())
                .or_default()
                .push((*vip, format!("vip of {}", svc.def.name)));
        }
    }
    for t in s.tasks.values() {
        for a in &t.networks {
            if let Some(ip) = a.ip {
                held.entry(a.network.clone())
                    .or_default()
                    .push((ip, format!("task {}", t.id)));
            }
        }
    }
    for (net, list) in &held {
        let network = s
            .networks
            .get(net)
            .unwrap_or_else(|| panic!("address held on missing network {net}"));
        let mut seen = BTreeMap::new();
        for (ip, who) in list {
            if let Some(other) = seen.insert(*ip, who) {
                panic!("{ip} on {net} held by both {other} and {who}");
            }
        }
        let marked: BTreeSet<Ipv4Addr> = network.addresses.used().collect();
        let held_set: BTreeSet<Ipv4Addr> = seen.keys().copied().collect();
        assert_eq!(
            marked, held_set,
            "allocator of {net} disagrees with holders"
        );
    }
    for n in s.networks.values() {
        if !held.contains_key(&n.name) {
            assert_eq!(
                n.addresses.in_use(),
                0,
                "{} marks addresses nobody holds",
                n.name
            );
        }
    }
    // 2. Tasks: placed ones have a ready, non-drained node and every address; pending ones
    //    hold no address (all or nothing) and say why.
    for t in s.tasks.values() {
        let svc = s
            .services
            .get(&t.service)
            .unwrap_or_else(|| panic!("task {} of missing service {}", t.id, t.service));
        if t.is_pending() {
            assert!(
                !t.status.message.is_empty(),
                "pending task {} without reason",
                t.id
            );
            assert!(
                t.networks.iter().all(|a| a.ip.is_none()),
                "pending task {} holds addresses",
                t.id
            );
            // Pending only for a reason that holds now: a full network or no eligible node.
            let full = t.networks.iter().any(|a| {
                let n = &s.networks[&a.network];
                n.addresses.in_use() as u32 == n.addresses.capacity()
            });
            let eligible = match &t.node {
                Some(_) => true,
                None => s.nodes.values().any(|n| {
                    n.status == NodeStatus::Ready
                        && n.availability == swarmnet_model::spec::Availability::Active
                        && svc.def.constraints.iter().all(|c| c.matches(n))
                }),
            };
            assert!(
                full || !eligible,
                "task {} pending ({}) although it could be placed",
                t.id,
                t.status.message
            );
        } else {
            let node = t.node.as_ref().expect("placed task has a node");
            let n = s
                .nodes
                .get(node)
                .unwrap_or_else(|| panic!("task {} on missing node {node}", t.id));
            // A draining task stays where it is until the leader reaps it (its node may be
            // drained, or have gone down since).
            if !t.draining {
                assert_eq!(n.status, NodeStatus::Ready, "task {} on a down node", t.id);
                assert_ne!(
                    n.availability,
                    swarmnet_model::spec::Availability::Drain,
                    "task {} on a drained node",
                    t.id
                );
            }
            for a in &t.networks {
                let ip =
                    a.ip.unwrap_or_else(|| panic!("task {} has no address on {}", t.id, a.network));
                assert!(s.networks[&a.network].subnet.contains(&ip));
            }
        }
    }
    // 3. Replicated services have exactly one active (not draining) task per slot.
    for svc in s.services.values() {
        if let Some(r) = svc.def.replicas() {
            let slots: Vec<u32> = s
                .tasks
                .values()
                .filter(|t| t.service == svc.def.name && t.is_active())
                .map(|t| t.slot)
                .collect();
            let set: BTreeSet<u32> = slots.iter().copied().collect();
            assert_eq!(
                slots.len(),
                set.len(),
                "service {} has a slot twice",
                svc.def.name
            );
            assert_eq!(set, (1..=r).collect(), "service {} slots", svc.def.name);
        }
    }
    // 4. What netd receives always validates.
    let spec = project(s);
    if let Err(e) = Intent::new(spec.clone()) {
        panic!(
            "projection is not a valid intent: {e}\n{}",
            serde_json::to_string_pretty(&spec).unwrap()
        );
    }
}
