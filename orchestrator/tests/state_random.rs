//! Deterministic randomized test of the state machine and IPAM: random command sequences from
//! seeded generators, the invariants of `common::check_invariants` after every step, refused
//! commands leaving the state untouched, and the same log replayed (and the state sent through
//! its snapshot encoding) giving the same state. A failure prints its seed; rerun one with
//! `SWARMNET_SEED=<seed> cargo test -p swarmnet-orchestrator --test state_random`.

mod common;

use std::collections::BTreeMap;

use common::*;
use swarmnet_model::spec::{
    Availability, EndpointMode, NodeRole, Protocol, PublishMode, ServiceMode,
};
use swarmnet_orchestrator::project::project;
use swarmnet_orchestrator::state::{
    ClusterState, Command, FailureAction, GossipKey, NetworkConfig, NodeStatus, PortConfig,
    Publish, TaskState,
};

/// splitmix64: small, seedable, and the same everywhere.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len() as u64) as usize]
    }
    fn word(&mut self, items: &[&'static str]) -> &'static str {
        items[self.below(items.len() as u64) as usize]
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

const NETS: &[&str] = &["a", "b", "c", "d"];
const SERVICES: &[&str] = &["s1", "s2", "s3", "s4", "s5"];
/// Small and overlapping on purpose: /29s exhaust fast, the /16 overlaps the pool's first blocks.
const SUBNETS: [&str; 5] = [
    "10.50.0.0/29",
    "10.50.0.8/29",
    "10.50.0.0/24",
    "10.0.0.0/16",
    "192.168.7.0/28",
];

fn random_service(r: &mut Rng, s: &ClusterState) -> swarmnet_orchestrator::state::ServiceDef {
    let nets: Vec<&str> = NETS
        .iter()
        .copied()
        .filter(|n| s.networks.contains_key(&name(n)) && r.chance(50))
        .collect();
    let mut def = service(r.word(SERVICES), r.below(9) as u32, &nets);
    if r.chance(20) {
        def.mode = ServiceMode::Global;
    }
    if r.chance(20) {
        def.endpoint_mode = EndpointMode::Dnsrr;
    }
    for _ in 0..r.below(3) {
        def.ports.push(PortConfig {
            name: None,
            protocol: *r.pick(&[Protocol::Tcp, Protocol::Udp]),
            target: *r.pick(&[80, 443, 53]),
            publish: *r.pick(&[
                Publish::No,
                Publish::Auto,
                Publish::Port(8080),
                Publish::Port(30001),
            ]),
            publish_mode: *r.pick(&[PublishMode::Ingress, PublishMode::Host]),
            traffic_policy: Default::default(),
        });
    }
    if r.chance(30) {
        let c = *r.pick(&[
            "node.labels.zone==east",
            "node.labels.zone!=east",
            "node.role==manager",
            "node.id==n2",
        ]);
        def.constraints.push(c.parse().unwrap());
    }
    if r.chance(50) {
        def.task.argv = vec!["sleep".into(), r.below(3).to_string()];
    }
    def.update.parallelism = r.below(3) as u32;
    def.update.delay_ms = *r.pick(&[0, 0, 500]);
    def.update.failure_action = *r.pick(&[
        FailureAction::Pause,
        FailureAction::Continue,
        FailureAction::Rollback,
    ]);
    def
}

fn random_command(r: &mut Rng, s: &ClusterState) -> Command {
    let nodes: Vec<_> = s.nodes.keys().cloned().collect();
    let any_node = |r: &mut Rng| {
        if nodes.is_empty() || r.chance(5) {
            node_id("n9")
        } else {
            r.pick(&nodes).clone()
        }
    };
    match r.below(15) {
        0 => Command::JoinNode(join(
            r.below(6) as u8 + 1,
            *r.pick(&[NodeRole::Worker, NodeRole::Manager]),
        )),
        1 => Command::UpdateNode {
            id: any_node(r),
            labels: r
                .chance(50)
                .then(|| BTreeMap::from([("zone".into(), r.pick(&["east", "west"]).to_string())])),
            availability: r.chance(70).then(|| {
                *r.pick(&[
                    Availability::Active,
                    Availability::Pause,
                    Availability::Drain,
                ])
            }),
        },
        2 => Command::SetNodeStatus {
            id: any_node(r),
            status: *r.pick(&[NodeStatus::Ready, NodeStatus::Ready, NodeStatus::Down]),
        },
        3 => Command::SetNodeRole {
            id: any_node(r),
            role: *r.pick(&[NodeRole::Worker, NodeRole::Manager]),
        },
        4 => Command::RemoveNode {
            id: any_node(r),
            force: r.chance(30),
        },
        5 => Command::CreateNetwork(NetworkConfig {
            name: Some(name(r.word(NETS))),
            subnet: r.chance(60).then(|| r.pick(&SUBNETS).parse().unwrap()),
            internal: r.chance(20),
            ..Default::default()
        }),
        6 => Command::RemoveNetwork {
            name: name(r.word(NETS)),
        },
        7 | 8 => Command::CreateService(random_service(r, s)),
        9 => Command::UpdateService(random_service(r, s)),
        10 => Command::ScaleService {
            name: name(r.word(SERVICES)),
            replicas: r.below(10) as u32,
        },
        11 => Command::RemoveService {
            name: name(r.word(SERVICES)),
        },
        12 | 13 => {
            let tasks: Vec<_> = s.tasks.values().collect();
            if tasks.is_empty() {
                return Command::ScaleService {
                    name: name(r.word(SERVICES)),
                    replicas: 3,
                };
            }
            let t = *r.pick(&tasks);
            let node = match (&t.node, r.chance(90)) {
                (Some(n), true) => n.clone(),
                _ => any_node(r),
            };
            Command::ReportTask {
                node,
                task: t.id.clone(),
                state: *r.pick(&[
                    TaskState::Running,
                    TaskState::Running,
                    TaskState::Failed,
                    TaskState::Complete,
                ]),
                message: "reported".into(),
                health: None,
            }
        }
        _ if r.chance(40) => {
            // The leader's reaping of draining tasks (sometimes naming one that is not).
            let tasks: Vec<_> = s
                .tasks
                .values()
                .filter(|t| t.draining || r.chance(10))
                .map(|t| t.id.clone())
                .collect();
            Command::ReapTasks { tasks }
        }
        _ => {
            if r.chance(50) {
                let svc = name(r.word(SERVICES));
                let version = s.services.get(&svc).map_or(1, |s| s.version);
                Command::AdvanceUpdate {
                    service: svc,
                    version,
                }
            } else {
                // The rotation's three steps, with ids that are sometimes right.
                let newest = s.keyring.last().map_or(0, |k| k.id);
                let primary = s.primary_gossip_key().map_or(0, |k| k.id);
                match r.below(3) {
                    0 => {
                        let id = r.next();
                        Command::RotateGossipKey(GossipKey {
                            id,
                            key: format!("{id:016x}").repeat(4),
                            created_ms: 0,
                        })
                    }
                    1 => Command::PromoteGossipKey {
                        id: if r.chance(70) { newest } else { r.next() },
                    },
                    _ => Command::RetireGossipKeys {
                        keep: if r.chance(70) { primary } else { r.next() },
                    },
                }
            }
        }
    }
}

/// What a run went through, so the test proves it reached the interesting states.
#[derive(Debug, Default)]
struct Coverage {
    accepted: usize,
    refused: usize,
    placed_tasks: usize,
    exhausted_tasks: usize,
    unplaceable_tasks: usize,
    updates_rolling: usize,
}

fn run(seed: u64, steps: usize) -> Coverage {
    let mut cov = Coverage::default();
    let mut r = Rng(seed);
    let mut s = cluster(3);
    let mut log = Vec::new();
    let (mut ok, mut refused) = (0, 0);
    for step in 0..steps {
        let cmd = random_command(&mut r, &s);
        let before = s.clone();
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let res = s.apply(&cmd);
            check_invariants(&s);
            // Applying in place with a reconcile scoped to the touched services gives what a
            // copy and a reconcile over every service give.
            let mut reference = before.clone();
            let reference_res = reference.apply_reconciling_all(&cmd);
            assert_eq!(
                res, reference_res,
                "scoped and full apply answer differently"
            );
            if s != reference {
                for (id, t) in &reference.tasks {
                    if s.tasks.get(id) != Some(t) {
                        eprintln!("full: {t:?}\nscoped: {:?}", s.tasks.get(id));
                    }
                }
                for (id, t) in &s.tasks {
                    if !reference.tasks.contains_key(id) {
                        eprintln!("only scoped: {t:?}");
                    }
                }
                for (n, v) in &reference.services {
                    if s.services.get(n) != Some(v) {
                        eprintln!("svc full: {v:?}\nscoped: {:?}", s.services.get(n));
                    }
                }
            }
            assert_eq!(s, reference, "scoped and full apply differ");
            // The assignment stream: the delta between the two projections, applied to the
            // one before, is the one after (snapshot + deltas == final snapshot).
            let (old, new) = (project(&before), project(&s));
            let mut got = old.clone();
            swarmnet_model::delta::apply(&mut got, &swarmnet_model::delta::diff(&old, &new));
            assert_eq!(got, new, "snapshot + delta differs from the new snapshot");
            res
        }));
        match result {
            Err(p) => {
                eprintln!("seed {seed} step {step}: {cmd:?} (after {:?})", log.last());
                std::panic::resume_unwind(p);
            }
            Ok(Ok(_)) => {
                ok += 1;
                log.push(cmd);
                for t in s.tasks.values() {
                    if !t.is_pending() {
                        cov.placed_tasks += 1;
                    } else if t.status.message.contains("no free address") {
                        cov.exhausted_tasks += 1;
                    } else {
                        cov.unplaceable_tasks += 1;
                    }
                }
                cov.updates_rolling += s
                    .services
                    .values()
                    .filter(|v| {
                        s.tasks
                            .values()
                            .any(|t| t.service == v.def.name && t.version < v.version)
                    })
                    .count();
            }
            Ok(Err(_)) => {
                refused += 1;
                assert_eq!(
                    s, before,
                    "seed {seed} step {step}: refused {cmd:?} changed the state"
                );
            }
        }
    }
    // Determinism: the accepted commands replayed from the same start give the same state.
    let mut replay = cluster(3);
    for cmd in &log {
        replay.apply(cmd).expect("accepted once, accepted again");
    }
    assert_eq!(replay, s, "seed {seed}: replay differs");
    // The snapshot encoding loses nothing.
    let json = serde_json::to_vec(&s).unwrap();
    let back: ClusterState = serde_json::from_slice(&json).unwrap();
    assert_eq!(back, s, "seed {seed}: snapshot round trip differs");
    assert!(
        ok > steps / 5,
        "seed {seed}: only {ok} of {steps} commands accepted ({refused} refused)"
    );
    cov.accepted = ok;
    cov.refused = refused;
    cov
}

#[test]
fn random_command_sequences_keep_every_invariant() {
    if let Some(seed) = std::env::var("SWARMNET_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
    {
        eprintln!("{:?}", run(seed, 400));
        return;
    }
    let mut total = Coverage::default();
    for seed in 0..60 {
        let c = run(seed, 400);
        total.accepted += c.accepted;
        total.refused += c.refused;
        total.placed_tasks += c.placed_tasks;
        total.exhausted_tasks += c.exhausted_tasks;
        total.unplaceable_tasks += c.unplaceable_tasks;
        total.updates_rolling += c.updates_rolling;
    }
    eprintln!("{total:?}");
    // The sequences must reach the states the invariants are about.
    assert!(total.placed_tasks > 10_000, "{total:?}");
    assert!(total.exhausted_tasks > 100, "{total:?}");
    assert!(total.unplaceable_tasks > 100, "{total:?}");
    assert!(total.updates_rolling > 100, "{total:?}");
    assert!(total.refused > 1000, "{total:?}");
}

/// Addresses alone, at a larger scale than the state machine sequences reach: random
/// allocate/reserve/release against a model set.
#[test]
fn random_address_operations_match_a_model() {
    use std::collections::BTreeSet;
    use std::net::Ipv4Addr;
    use swarmnet_orchestrator::ipam::{AddressError, Addresses};
    for seed in 0..40 {
        let mut r = Rng(seed);
        let subnet: ipnet::Ipv4Net = r
            .pick(&["10.1.0.0/28", "10.1.0.0/29", "10.1.0.0/26"])
            .parse()
            .unwrap();
        let mut a = Addresses::new(subnet);
        let mut model: BTreeSet<Ipv4Addr> = BTreeSet::new();
        let hosts: Vec<Ipv4Addr> = subnet.hosts().collect();
        for _ in 0..2000 {
            match r.below(3) {
                0 => match a.allocate() {
                    Ok(ip) => {
                        assert!(
                            hosts.contains(&ip),
                            "seed {seed}: {ip} not a host of {subnet}"
                        );
                        assert!(model.insert(ip), "seed {seed}: {ip} handed out twice");
                    }
                    Err(AddressError::Exhausted { capacity, .. }) => {
                        assert_eq!(model.len(), hosts.len(), "seed {seed}: exhausted too early");
                        assert_eq!(capacity as usize, hosts.len());
                    }
                    Err(e) => panic!("seed {seed}: {e}"),
                },
                1 => {
                    let ip = *r.pick(&hosts);
                    assert_eq!(
                        a.reserve(ip).is_ok(),
                        model.insert(ip),
                        "seed {seed}: reserve {ip}"
                    );
                }
                _ => {
                    let ip = *r.pick(&hosts);
                    assert_eq!(
                        a.release(ip),
                        model.remove(&ip),
                        "seed {seed}: release {ip}"
                    );
                }
            }
            assert_eq!(a.in_use(), model.len());
            assert!(a.used().eq(model.iter().copied()));
        }
    }
}
