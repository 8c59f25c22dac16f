//! Scenario tests of the cluster state machine: IPAM through commands, the scheduler, rolling
//! updates, and the projection netd receives.

mod common;

use std::collections::{BTreeMap, HashMap};

use common::*;
use swarmnet_model::spec::{Availability, NodeRole, Protocol, PublishMode, ServiceMode};
use swarmnet_model::{Intent, NodeId};
use swarmnet_orchestrator::project::project;
use swarmnet_orchestrator::state::{
    ClusterState, Command, CommandError, FailureAction, GossipKey, KeyAck, NetworkConfig,
    NodeStatus, PortConfig, Publish, Response, Rotation, TaskState, UpdateState,
    next_rotation_step,
};

#[test]
fn init_creates_the_ingress_network_and_gives_nodes_an_address_on_it() {
    let s = cluster(3);
    let ingress = &s.networks[&name("ingress")];
    assert!(ingress.ingress);
    assert_eq!(ingress.subnet.to_string(), "10.0.0.0/24");
    assert_eq!(ingress.vni.get(), 4096);
    assert_eq!(ingress.gateway.to_string(), "10.0.0.1");
    let ips: Vec<String> = s
        .nodes
        .values()
        .map(|n| n.ingress_ip.unwrap().to_string())
        .collect();
    assert_eq!(ips, ["10.0.0.2", "10.0.0.3", "10.0.0.4"]);
    let mut again = s.clone();
    let e = again.apply(&Command::Init {
        cluster_id: "c2".into(),
        tokens: Default::default(),
        pool: Default::default(),
        ingress_subnet: None,
        node: join(9, NodeRole::Manager),
    });
    assert!(matches!(e, Err(CommandError::AlreadyInitialized { .. })));
    assert_eq!(
        ClusterState::default().apply(&network("x")),
        Err(CommandError::NotInitialized)
    );
}

#[test]
fn networks_from_the_pool_overlap_refused_removal_refused_while_used() {
    let mut s = cluster(1);
    assert_eq!(
        s.apply(&network("app")),
        Ok(Response::Network {
            name: name("app"),
            subnet: "10.0.1.0/24".parse().unwrap(),
            vni: 4097
        })
    );
    let overlap = Command::CreateNetwork(NetworkConfig {
        name: Some(name("big")),
        subnet: Some("10.0.0.0/16".parse().unwrap()),
        ..Default::default()
    });
    let before = s.clone();
    let e = s.apply(&overlap).unwrap_err();
    assert_eq!(
        e.to_string(),
        "subnet 10.0.0.0/16 overlaps 10.0.1.0/24 of network \"app\"; pick another subnet"
    );
    assert_eq!(s, before, "a refused command changes nothing");
    let given = Command::CreateNetwork(NetworkConfig {
        name: Some(name("given")),
        subnet: Some("10.0.2.0/24".parse().unwrap()),
        ..Default::default()
    });
    apply(&mut s, given);
    // The pool skips what was given.
    assert!(matches!(
        s.apply(&network("next")),
        Ok(Response::Network { subnet, .. }) if subnet.to_string() == "10.0.3.0/24"
    ));
    assert!(matches!(
        s.apply(&network("app")),
        Err(CommandError::Exists { .. })
    ));
    apply(&mut s, Command::CreateService(service("web", 1, &["app"])));
    let e = s
        .apply(&Command::RemoveNetwork { name: name("app") })
        .unwrap_err();
    assert_eq!(
        e.to_string(),
        "network \"app\" is in use by service \"web\"; remove those first"
    );
    assert!(matches!(
        s.apply(&Command::RemoveNetwork {
            name: name("ingress")
        }),
        Err(CommandError::NetworkInUse { .. })
    ));
    apply(&mut s, Command::RemoveService { name: name("web") });
    apply(&mut s, Command::RemoveNetwork { name: name("app") });
    // Its subnet and VNI are free again.
    assert!(matches!(
        s.apply(&network("again")),
        Ok(Response::Network { subnet, vni: 4097, .. }) if subnet.to_string() == "10.0.1.0/24"
    ));
}

#[test]
fn replicated_tasks_spread_and_get_vip_and_addresses() {
    let mut s = cluster(3);
    apply(&mut s, network("app"));
    apply(&mut s, Command::CreateService(service("web", 6, &["app"])));
    assert_eq!(
        placement(&s, "web"),
        BTreeMap::from([("n1".into(), 2), ("n2".into(), 2), ("n3".into(), 2)])
    );
    let svc = &s.services[&name("web")];
    assert_eq!(svc.vips[&name("app")].to_string(), "10.0.1.2");
    let intent = Intent::new(project(&s)).unwrap();
    assert_eq!(intent.tasks().count(), 6);
    assert!(
        intent
            .tasks()
            .all(|(t, a)| t.argv == ["sleep", "inf"] && a[0].network == name("app"))
    );
    // Scale down keeps the lowest slots and frees the rest's addresses.
    apply(
        &mut s,
        Command::ScaleService {
            name: name("web"),
            replicas: 2,
        },
    );
    assert_eq!(s.tasks.len(), 2);
    assert_eq!(s.networks[&name("app")].addresses.in_use(), 4); // gateway, vip, 2 tasks
}

#[test]
fn exhaustion_shows_on_the_surplus_tasks_and_clears_when_addresses_free_up() {
    let mut s = cluster(2);
    apply(
        &mut s,
        Command::CreateNetwork(NetworkConfig {
            name: Some(name("tiny")),
            subnet: Some("10.9.0.0/29".parse().unwrap()),
            ..Default::default()
        }),
    );
    // 6 usable addresses: the gateway, the VIP, and 4 tasks.
    apply(&mut s, Command::CreateService(service("web", 6, &["tiny"])));
    assert_eq!(placement(&s, "web").values().sum::<usize>(), 4);
    let p = pending(&s, "web");
    assert_eq!(p.len(), 2);
    assert_eq!(
        p[0],
        "network \"tiny\": no free address in 10.9.0.0/29: all 6 are in use"
    );
    // Pending tasks are not in netd's intent.
    assert_eq!(project(&s).tasks.len(), 4);
    apply(
        &mut s,
        Command::ScaleService {
            name: name("web"),
            replicas: 4,
        },
    );
    assert!(pending(&s, "web").is_empty());
    // A second service cannot even get its VIP: refused at create, with the reason.
    let e = s
        .apply(&Command::CreateService(service("api", 1, &["tiny"])))
        .unwrap_err();
    assert!(
        e.to_string().contains("no free address in 10.9.0.0/29"),
        "{e}"
    );
}

#[test]
fn published_ports_auto_allocated_kept_on_update_and_conflicts_refused() {
    let mut s = cluster(2);
    let mut web = service("web", 2, &[]);
    web.ports = vec![PortConfig {
        name: None,
        protocol: Protocol::Tcp,
        target: 80,
        publish: Publish::Auto,
        publish_mode: PublishMode::Ingress,
        traffic_policy: Default::default(),
    }];
    apply(&mut s, Command::CreateService(web.clone()));
    let svc = &s.services[&name("web")];
    assert_eq!(svc.ports[0].published, Some(30000));
    assert!(svc.vips.contains_key(&name("ingress")), "routing mesh VIP");
    // Tasks join the ingress network so the mesh can reach them.
    assert!(
        s.tasks
            .values()
            .all(|t| t.networks.iter().any(|a| a.network == name("ingress")))
    );
    let mut api = service("api", 1, &[]);
    api.ports = web.ports.clone();
    apply(&mut s, Command::CreateService(api.clone()));
    assert_eq!(s.services[&name("api")].ports[0].published, Some(30001));
    // Updating web's command keeps its port.
    web.task.argv = vec!["sleep".into(), "1000".into()];
    apply(&mut s, Command::UpdateService(web.clone()));
    assert_eq!(s.services[&name("web")].ports[0].published, Some(30000));
    // An explicit port taken by another service is refused, naming it.
    api.ports[0].publish = Publish::Port(30000);
    let e = s.apply(&Command::UpdateService(api)).unwrap_err();
    assert_eq!(
        e.to_string(),
        "30000/tcp is already published by service \"web\""
    );
    // Same number, other protocol: fine.
    let mut dns = service("dns", 1, &[]);
    dns.ports = vec![PortConfig {
        name: None,
        protocol: Protocol::Udp,
        target: 53,
        publish: Publish::Port(30000),
        publish_mode: PublishMode::Ingress,
        traffic_policy: Default::default(),
    }];
    apply(&mut s, Command::CreateService(dns));
}

/// A local traffic policy reaches the nodes' intent; on a port that is not published in
/// ingress mode it is refused, naming the port.
#[test]
fn local_traffic_policy_reaches_the_intent_and_needs_an_ingress_port() {
    use swarmnet_model::spec::TrafficPolicy;
    let mut s = cluster(2);
    let mut web = service("web", 2, &[]);
    web.ports = vec![PortConfig {
        name: None,
        protocol: Protocol::Tcp,
        target: 80,
        publish: Publish::Port(8080),
        publish_mode: PublishMode::Ingress,
        traffic_policy: TrafficPolicy::Local,
    }];
    apply(&mut s, Command::CreateService(web.clone()));
    let spec = swarmnet_orchestrator::project::project(&s);
    let port = &spec
        .services
        .iter()
        .find(|x| x.name.as_str() == "web")
        .unwrap()
        .ports[0];
    assert_eq!(port.traffic_policy, TrafficPolicy::Local);
    swarmnet_model::Intent::new(spec).expect("the projection validates");
    for (publish, mode) in [
        (Publish::Port(8080), PublishMode::Host),
        (Publish::No, PublishMode::Ingress),
    ] {
        let mut bad = web.clone();
        bad.ports[0].publish = publish;
        bad.ports[0].publish_mode = mode;
        let e = s.apply(&Command::UpdateService(bad)).unwrap_err();
        assert!(e.to_string().contains("ports[0].traffic_policy"), "{e}");
    }
    assert_eq!(
        s.services[&name("web")].ports[0].traffic_policy,
        TrafficPolicy::Local,
        "a refused update changes nothing"
    );
}

#[test]
fn global_services_follow_nodes_and_constraints() {
    let mut s = cluster(3);
    apply(
        &mut s,
        Command::UpdateNode {
            id: node_id("n3"),
            labels: Some(BTreeMap::from([("zone".into(), "east".into())])),
            availability: None,
        },
    );
    let mut mon = service("mon", 0, &[]);
    mon.mode = ServiceMode::Global;
    apply(&mut s, Command::CreateService(mon.clone()));
    assert_eq!(placement(&s, "mon").len(), 3);
    apply(&mut s, Command::JoinNode(join(4, NodeRole::Worker)));
    assert_eq!(placement(&s, "mon").len(), 4);
    apply(
        &mut s,
        Command::UpdateNode {
            id: node_id("n2"),
            labels: None,
            availability: Some(Availability::Drain),
        },
    );
    assert!(!placement(&s, "mon").contains_key("n2"));
    mon.constraints = vec!["node.labels.zone==east".parse().unwrap()];
    apply(&mut s, Command::UpdateService(mon));
    assert_eq!(placement(&s, "mon"), BTreeMap::from([("n3".into(), 1)]));
    assert!(matches!(
        s.apply(&Command::ScaleService {
            name: name("mon"),
            replicas: 3
        }),
        Err(CommandError::Invalid { .. })
    ));
}

#[test]
fn constraints_that_no_node_meets_leave_tasks_pending_with_every_reason() {
    let mut s = cluster(2);
    let mut db = service("db", 1, &[]);
    db.constraints = vec![
        "node.role==manager".parse().unwrap(),
        "node.labels.disk==ssd".parse().unwrap(),
    ];
    apply(&mut s, Command::CreateService(db));
    assert_eq!(
        pending(&s, "db"),
        [
            "no suitable node (n1: does not satisfy node.labels.disk==ssd; n2: does not satisfy node.role==manager)"
        ]
    );
    apply(
        &mut s,
        Command::UpdateNode {
            id: node_id("n1"),
            labels: Some(BTreeMap::from([("disk".into(), "ssd".into())])),
            availability: None,
        },
    );
    assert_eq!(placement(&s, "db"), BTreeMap::from([("n1".into(), 1)]));
}

#[test]
fn drained_and_dead_nodes_lose_their_tasks_to_the_others() {
    let mut s = cluster(3);
    apply(&mut s, network("app"));
    apply(&mut s, Command::CreateService(service("web", 3, &["app"])));
    report_all_running(&mut s);
    let n3_task = s
        .tasks
        .values()
        .find(|t| t.node == Some(node_id("n3")))
        .unwrap()
        .clone();
    apply(
        &mut s,
        Command::UpdateNode {
            id: node_id("n3"),
            labels: None,
            availability: Some(Availability::Drain),
        },
    );
    assert_eq!(
        placement(&s, "web"),
        BTreeMap::from([("n1".into(), 2), ("n2".into(), 1)])
    );
    let replacement = s.tasks.values().find(|t| t.slot == n3_task.slot).unwrap();
    assert_ne!(replacement.id, n3_task.id);
    assert_eq!(replacement.status.state, TaskState::Assigned);
    // Paused nodes keep what they run but take nothing new.
    apply(
        &mut s,
        Command::UpdateNode {
            id: node_id("n3"),
            labels: None,
            availability: Some(Availability::Active),
        },
    );
    apply(
        &mut s,
        Command::UpdateNode {
            id: node_id("n2"),
            labels: None,
            availability: Some(Availability::Pause),
        },
    );
    assert_eq!(placement(&s, "web").get("n2"), Some(&1));
    // A node whose heartbeats stopped: its tasks go to ready nodes.
    apply(
        &mut s,
        Command::SetNodeStatus {
            id: node_id("n1"),
            status: NodeStatus::Down,
        },
    );
    let p = placement(&s, "web");
    assert!(!p.contains_key("n1"), "{p:?}");
    assert_eq!(p.values().sum::<usize>(), 3);
    // Removing a ready node needs force; a down one goes.
    assert!(matches!(
        s.apply(&Command::RemoveNode {
            id: node_id("n3"),
            force: false
        }),
        Err(CommandError::NodeBusy { .. })
    ));
    apply(
        &mut s,
        Command::SetNodeRole {
            id: node_id("n2"),
            role: NodeRole::Manager,
        },
    );
    apply(
        &mut s,
        Command::RemoveNode {
            id: node_id("n1"),
            force: false,
        },
    );
    assert!(!s.nodes.contains_key(&node_id("n1")));
}

#[test]
fn the_last_manager_cannot_be_demoted_or_removed() {
    let mut s = cluster(2);
    let e = s
        .apply(&Command::SetNodeRole {
            id: node_id("n1"),
            role: NodeRole::Worker,
        })
        .unwrap_err();
    assert!(e.to_string().contains("the last manager"), "{e}");
    let e = s
        .apply(&Command::RemoveNode {
            id: node_id("n1"),
            force: true,
        })
        .unwrap_err();
    assert!(e.to_string().contains("last manager"), "{e}");
}

fn rolling_service(failure_action: FailureAction, delay_ms: u64) -> ClusterState {
    let mut s = cluster(2);
    let mut web = service("web", 4, &[]);
    web.update.parallelism = 1;
    web.update.failure_action = failure_action;
    web.update.delay_ms = delay_ms;
    apply(&mut s, Command::CreateService(web));
    report_all_running(&mut s);
    s
}

fn versions(s: &ClusterState) -> Vec<u64> {
    let mut v: Vec<u64> = s.tasks.values().map(|t| t.version).collect();
    v.sort();
    v
}

#[test]
fn rolling_update_replaces_one_task_at_a_time() {
    let mut s = rolling_service(FailureAction::Pause, 0);
    let mut def = s.services[&name("web")].def.clone();
    def.task.argv = vec!["sleep".into(), "2".into()];
    apply(&mut s, Command::UpdateService(def));
    assert_eq!(versions(&s), [1, 1, 1, 2]);
    // Nothing more until the new task runs.
    apply(&mut s, Command::JoinNode(join(3, NodeRole::Worker)));
    assert_eq!(versions(&s), [1, 1, 1, 2]);
    // Each new task reported running lets the next one be replaced.
    for n in 2..=4 {
        report_all_running(&mut s);
        assert_eq!(versions(&s).iter().filter(|v| **v == 2).count(), n);
    }
    report_all_running(&mut s);
    assert_eq!(versions(&s), [2, 2, 2, 2]);
    assert_eq!(
        s.services[&name("web")].update.as_ref().unwrap().state,
        UpdateState::Completed
    );
    // A scale is not an update: no task is replaced.
    let ids: Vec<_> = s.tasks.keys().cloned().collect();
    apply(
        &mut s,
        Command::ScaleService {
            name: name("web"),
            replicas: 5,
        },
    );
    assert!(ids.iter().all(|id| s.tasks.contains_key(id)));
}

#[test]
fn rolling_update_waits_for_the_leaders_delay() {
    let mut s = rolling_service(FailureAction::Pause, 1000);
    let mut def = s.services[&name("web")].def.clone();
    def.task.argv = vec!["sleep".into(), "2".into()];
    apply(&mut s, Command::UpdateService(def));
    report_all_running(&mut s);
    assert_eq!(versions(&s), [1, 1, 1, 2]);
    let svc = &s.services[&name("web")];
    assert_eq!(svc.update.as_ref().unwrap().state, UpdateState::Waiting);
    // A stale timer (older version) does nothing; the current one advances.
    apply(
        &mut s,
        Command::AdvanceUpdate {
            service: name("web"),
            version: 1,
        },
    );
    assert_eq!(versions(&s), [1, 1, 1, 2]);
    apply(
        &mut s,
        Command::AdvanceUpdate {
            service: name("web"),
            version: 2,
        },
    );
    assert_eq!(versions(&s), [1, 1, 2, 2]);
}

fn fail_new_task(s: &mut ClusterState) {
    let t = s
        .tasks
        .values()
        .find(|t| t.version == 2 && t.status.state == TaskState::Assigned)
        .unwrap()
        .clone();
    apply(
        s,
        Command::ReportTask {
            node: t.node.unwrap(),
            task: t.id,
            state: TaskState::Failed,
            message: "exit status 1".into(),
            health: None,
        },
    );
}

#[test]
fn a_failed_update_pauses_or_rolls_back() {
    let mut s = rolling_service(FailureAction::Pause, 0);
    let mut def = s.services[&name("web")].def.clone();
    def.task.argv = vec!["false".into()];
    apply(&mut s, Command::UpdateService(def.clone()));
    fail_new_task(&mut s);
    let u = s.services[&name("web")].update.clone().unwrap();
    assert_eq!(u.state, UpdateState::Paused);
    assert!(u.message.contains("exit status 1"), "{}", u.message);
    report_all_running(&mut s);
    assert_eq!(versions(&s), [1, 1, 1, 2], "paused: nothing more replaced");

    let mut s = rolling_service(FailureAction::Rollback, 0);
    def.update.failure_action = FailureAction::Rollback;
    apply(&mut s, Command::UpdateService(def));
    fail_new_task(&mut s);
    let svc = &s.services[&name("web")];
    assert_eq!(svc.version, 3);
    assert_eq!(svc.def.task.argv, ["sleep", "inf"]);
    for _ in 0..5 {
        report_all_running(&mut s);
    }
    assert!(
        s.tasks
            .values()
            .all(|t| t.template.argv == ["sleep", "inf"])
    );
    assert_eq!(
        s.services[&name("web")].update.as_ref().unwrap().state,
        UpdateState::RolledBack
    );
}

#[test]
fn reports_from_the_wrong_node_are_stale() {
    let mut s = cluster(2);
    apply(&mut s, Command::CreateService(service("web", 1, &[])));
    let t = s.tasks.values().next().unwrap().clone();
    let other = if t.node == Some(node_id("n1")) {
        "n2"
    } else {
        "n1"
    };
    let e = s
        .apply(&Command::ReportTask {
            node: node_id(other),
            task: t.id.clone(),
            state: TaskState::Running,
            message: String::new(),
            health: None,
        })
        .unwrap_err();
    assert!(matches!(e, CommandError::StaleReport { .. }));
}

fn key(id: u64) -> GossipKey {
    GossipKey {
        id,
        key: format!("{id:064x}"),
        created_ms: 0,
    }
}

fn ack(accepted: &[u64], sealing: u64) -> Option<KeyAck> {
    Some(KeyAck {
        accepted: accepted.to_vec(),
        sealing,
    })
}

fn node_keys(s: &ClusterState) -> Vec<u64> {
    s.keyring_for_nodes().iter().map(|k| k.id).collect()
}

/// A rotation goes distribute -> switch -> retire, each step only once every ready node
/// confirms the one before; a node that is down or runs no gossip does not hold it up; a
/// second rotation is refused while one is in progress; stale steps are refused.
#[test]
fn gossip_key_rotation_moves_only_as_every_ready_node_confirms() {
    let mut s = cluster(3);
    // Init's key: primary at once, alone.
    apply(&mut s, Command::RotateGossipKey(key(1)));
    assert_eq!(s.gossip_rotation(), Rotation::Idle);
    assert_eq!(node_keys(&s), [1]);
    let n = |i: usize| NodeId::new(format!("n{i}")).unwrap();
    let mut acks: HashMap<NodeId, Option<KeyAck>> = HashMap::new();
    assert_eq!(next_rotation_step(&s, &acks), None, "nothing to do");

    // Step 1: key 2 is accepted only; nodes get it first, key 1 (primary) last.
    apply(&mut s, Command::RotateGossipKey(key(2)));
    assert_eq!(s.gossip_rotation(), Rotation::Distributing);
    assert_eq!(node_keys(&s), [2, 1]);
    assert_eq!(s.primary_gossip_key().unwrap().id, 1);
    let e = s.apply(&Command::RotateGossipKey(key(3))).unwrap_err();
    assert!(matches!(e, CommandError::RotationInProgress { .. }), "{e}");
    // A node not heard from is waited for; one that holds only key 1 too.
    acks.insert(n(1), ack(&[1, 2], 1));
    acks.insert(n(2), ack(&[1], 1));
    assert_eq!(s.rotation_waits_for(&acks), [n(2), n(3)]);
    assert_eq!(next_rotation_step(&s, &acks), None);
    // n3 runs no gossip (not waited for); n2 gets the key.
    acks.insert(n(3), None);
    acks.insert(n(2), ack(&[1, 2], 1));
    let step = next_rotation_step(&s, &acks).expect("every node holds key 2");
    assert!(
        matches!(step, Command::PromoteGossipKey { id: 2 }),
        "{step:?}"
    );
    // Promoting a key not in the keyring is refused; the primary again changes nothing.
    let before = s.clone();
    assert!(s.apply(&Command::PromoteGossipKey { id: 9 }).is_err());
    apply(&mut s, Command::PromoteGossipKey { id: 1 });
    assert_eq!(s, before);
    apply(&mut s, step.clone());
    apply(&mut s, step); // idempotent

    // Step 2 done: key 2 seals (last), key 1 still accepted.
    assert_eq!(s.gossip_rotation(), Rotation::Retiring);
    assert_eq!(node_keys(&s), [1, 2]);
    assert_eq!(s.rotation_waits_for(&acks), [n(1), n(2)]);
    acks.insert(n(1), ack(&[1, 2], 2));
    // n2 goes down: not waited for.
    apply(
        &mut s,
        Command::SetNodeStatus {
            id: n(2),
            status: NodeStatus::Down,
        },
    );
    let step = next_rotation_step(&s, &acks).expect("every ready node seals with key 2");
    assert!(
        matches!(step, Command::RetireGossipKeys { keep: 2 }),
        "{step:?}"
    );
    // Retiring around a key that is not primary is refused, state untouched.
    let before = s.clone();
    assert!(s.apply(&Command::RetireGossipKeys { keep: 1 }).is_err());
    assert_eq!(s, before);
    apply(&mut s, step);
    assert_eq!(s.gossip_rotation(), Rotation::Idle);
    assert_eq!(node_keys(&s), [2]);
    assert_eq!(next_rotation_step(&s, &acks), None);

    // Malformed and duplicate keys are refused.
    assert!(
        s.apply(&Command::RotateGossipKey(GossipKey {
            id: 4,
            key: "short".into(),
            created_ms: 0,
        }))
        .is_err()
    );
    assert!(s.apply(&Command::RotateGossipKey(key(2))).is_err());
}

/// State written before primaries were recorded (two keys, no primary): the newest seals, and
/// the rotation it was in is finished by retiring the older.
#[test]
fn gossip_keyring_from_before_primaries_is_finished_by_retiring() {
    let mut s = cluster(1);
    s.keyring = vec![key(1), key(2)];
    s.gossip_primary = None;
    assert_eq!(s.gossip_rotation(), Rotation::Retiring);
    assert_eq!(node_keys(&s), [1, 2]);
    let acks: HashMap<NodeId, Option<KeyAck>> =
        [(NodeId::new("n1").unwrap(), ack(&[1, 2], 2))].into();
    let step = next_rotation_step(&s, &acks).unwrap();
    apply(&mut s, step);
    assert_eq!(node_keys(&s), [2]);
}

#[test]
fn dnsrr_cannot_publish_through_the_mesh() {
    let mut s = cluster(1);
    let mut web = service("web", 1, &[]);
    web.endpoint_mode = swarmnet_model::spec::EndpointMode::Dnsrr;
    web.ports = vec![PortConfig {
        name: None,
        protocol: Protocol::Tcp,
        target: 80,
        publish: Publish::Port(8080),
        publish_mode: PublishMode::Ingress,
        traffic_policy: Default::default(),
    }];
    let e = s.apply(&Command::CreateService(web.clone())).unwrap_err();
    assert!(e.to_string().contains("publish in host mode"), "{e}");
    web.ports[0].publish_mode = PublishMode::Host;
    apply(&mut s, Command::CreateService(web));
    assert!(s.services[&name("web")].vips.is_empty());
}
