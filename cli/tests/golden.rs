//! Golden renders of every table and JSON form the CLI prints (`SWARMNET_BLESS=1` regenerates).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use swarmnet_cli::lab::{LabNodeStatus, LabStatusView, status_table};
use swarmnet_cli::render::*;
use swarmnet_tests_netns::golden::check;

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden")
}

fn both<T: serde::Serialize + ?Sized>(name: &str, table: String, value: &T) {
    check(&dir(), &format!("{name}.txt"), &table);
    check(&dir(), &format!("{name}.json"), &json(value));
}

fn nodes() -> Vec<NodeView> {
    vec![
        NodeView {
            id: "n1".into(),
            hostname: "n1".into(),
            addr: "198.19.0.1".into(),
            role: "manager".into(),
            availability: "active".into(),
            status: "ready".into(),
            manager_status: "leader".into(),
            labels: BTreeMap::from([("zone".into(), "a".into())]),
        },
        NodeView {
            id: "n2".into(),
            hostname: "n2".into(),
            addr: "198.19.0.2".into(),
            role: "manager".into(),
            availability: "drain".into(),
            status: "ready".into(),
            manager_status: "unreachable".into(),
            labels: BTreeMap::new(),
        },
        NodeView {
            id: "n3".into(),
            hostname: "worker-with-a-long-name".into(),
            addr: "198.19.0.3".into(),
            role: "worker".into(),
            availability: "active".into(),
            status: "down".into(),
            manager_status: String::new(),
            labels: BTreeMap::from([("disk".into(), "ssd".into()), ("zone".into(), "b".into())]),
        },
    ]
}

#[test]
fn node_ls() {
    let n = nodes();
    both("node_ls", nodes_table(&n), &n);
}

#[test]
fn node_ls_empty() {
    check(&dir(), "node_ls_empty.txt", &nodes_table(&[]));
}

#[test]
fn network_ls() {
    let n = vec![
        NetworkView {
            name: "ingress".into(),
            subnet: "10.0.0.0/24".into(),
            gateway: "10.0.0.1".into(),
            vni: 4096,
            mtu: 1450,
            internal: false,
            attachable: false,
            ingress: true,
            addresses_in_use: 4,
            addresses_total: 253,
        },
        NetworkView {
            name: "app".into(),
            subnet: "10.0.1.0/24".into(),
            gateway: "10.0.1.1".into(),
            vni: 4097,
            mtu: 1450,
            internal: true,
            attachable: true,
            ingress: false,
            addresses_in_use: 7,
            addresses_total: 253,
        },
        NetworkView {
            name: "plain".into(),
            subnet: "10.0.2.0/24".into(),
            gateway: "10.0.2.1".into(),
            vni: 4098,
            mtu: 1450,
            internal: false,
            attachable: false,
            ingress: false,
            addresses_in_use: 0,
            addresses_total: 253,
        },
    ];
    both("network_ls", networks_table(&n), &n);
}

#[test]
fn service_ls() {
    let s = vec![
        ServiceView {
            name: "web".into(),
            mode: "replicated".into(),
            replicas_running: 2,
            replicas_desired: 3,
            endpoint_mode: "vip".into(),
            ports: vec![
                PortView {
                    target: 80,
                    published: 8080,
                    protocol: "tcp".into(),
                    mode: "ingress".into(),
                    traffic_policy: String::new(),
                },
                PortView {
                    target: 9000,
                    published: 9000,
                    protocol: "tcp".into(),
                    mode: "ingress".into(),
                    traffic_policy: "local".into(),
                },
                PortView {
                    target: 53,
                    published: 5353,
                    protocol: "udp".into(),
                    mode: "host".into(),
                    traffic_policy: String::new(),
                },
            ],
            vips: BTreeMap::from([
                ("app".into(), "10.0.1.2".into()),
                ("ingress".into(), "10.0.0.5".into()),
            ]),
            networks: vec!["app".into()],
            argv: vec!["swarmnet-whoami".into(), "--port".into(), "80".into()],
            update_state: "updating".into(),
            update_message: "2 of 3 tasks updated".into(),
        },
        ServiceView {
            name: "agent".into(),
            mode: "global".into(),
            replicas_running: 3,
            replicas_desired: 3,
            endpoint_mode: "dnsrr".into(),
            ports: vec![],
            vips: BTreeMap::new(),
            networks: vec!["app".into()],
            argv: vec!["sleep".into(), "infinity".into()],
            update_state: String::new(),
            update_message: String::new(),
        },
    ];
    both("service_ls", services_table(&s), &s);
}

#[test]
fn service_ps() {
    let t = vec![
        TaskView {
            id: "web.1.a1b2c3".into(),
            name: "web.1".into(),
            service: "web".into(),
            slot: 1,
            node: "n1".into(),
            state: "running".into(),
            desired_state: "running".into(),
            health: "healthy".into(),
            message: String::new(),
            addresses: BTreeMap::from([
                ("app".into(), "10.0.1.3".into()),
                ("ingress".into(), "10.0.0.6".into()),
            ]),
        },
        TaskView {
            id: "web.2.d4e5f6".into(),
            name: "web.2".into(),
            service: "web".into(),
            slot: 2,
            node: String::new(),
            state: "pending".into(),
            desired_state: "running".into(),
            health: String::new(),
            message: "network app: no free address in 10.0.1.0/24".into(),
            addresses: BTreeMap::new(),
        },
        TaskView {
            id: "tq3x9k2m7p1z8a".into(),
            name: "web.1".into(),
            service: "web".into(),
            slot: 1,
            node: "n2".into(),
            state: "failed".into(),
            desired_state: "shutdown".into(),
            health: "unhealthy".into(),
            message: "unhealthy: health check failed 3 times in a row (last: exit 1)".into(),
            addresses: BTreeMap::from([("app".into(), "10.0.1.4".into())]),
        },
    ];
    both("service_ps", tasks_table(&t), &t);
}

#[test]
fn cluster_info() {
    let c = ClusterView {
        cluster_id: "lab".into(),
        leader: 1,
        term: 3,
        index: 42,
        managers: vec![
            ManagerView {
                id: 1,
                addr: "198.19.0.1:4242".into(),
                voter: true,
                status: "leader".into(),
            },
            ManagerView {
                id: 2,
                addr: "198.19.0.2:4242".into(),
                voter: false,
                status: "unreachable".into(),
            },
        ],
        gossip_keys: vec![
            GossipKeyView {
                id: "0c1f4a2b9d3e5f60".into(),
                primary: false,
                created_ms: 1_795_000_000_000,
            },
            GossipKeyView {
                id: "7a6b5c4d3e2f1a0b".into(),
                primary: true,
                created_ms: 1_795_043_200_000,
            },
        ],
        gossip_rotation: "retiring".into(),
    };
    both("cluster_info", cluster_text(&c), &c);
}

#[test]
fn lab_status() {
    let s = LabStatusView {
        name: "lab".into(),
        dir: "/run/swarmnet-lab/lab".into(),
        nodes: vec![
            LabNodeStatus {
                id: "n1".into(),
                addr: "198.19.0.1".into(),
                role: "manager".into(),
                netns: "snl-lab-n1".into(),
                netd: "running".into(),
                netd_pid: Some(4242),
                netd_api: true,
                tasks: 2,
                manager_status: "leader".into(),
            },
            LabNodeStatus {
                id: "n2".into(),
                addr: "198.19.0.2".into(),
                role: "worker".into(),
                netns: "snl-lab-n2".into(),
                netd: "exited".into(),
                netd_pid: None,
                netd_api: false,
                tasks: 0,
                manager_status: String::new(),
            },
        ],
    };
    both("lab_status", status_table(&s), &s);
}

#[test]
fn lab_demo() {
    let r = swarmnet_cli::demo::DemoReport {
        lab: "lab".into(),
        vip: "10.0.1.2".into(),
        web_resolves_to: vec!["10.0.1.2".into()],
        tasks_web_resolves_to: vec!["10.0.1.3".into(), "10.0.1.5".into(), "10.0.1.4".into()],
        replicas_answering: vec!["ta".into(), "tb".into(), "tc".into()],
        requests: 5,
        published_port: vec![
            ("n1".into(), "ta".into()),
            ("n2".into(), "tb".into()),
            ("n3".into(), "tc".into()),
        ],
        nodes_without_web: vec!["n3".into()],
        removed: false,
    };
    both("lab_demo", swarmnet_cli::demo::text(&r), &r);
}

/// `inspect` over netd answers captured from a lab (n2's FDB entry for a replica on n1 deleted by
/// hand): what is selected per kind, the drift flags, and both renderings.
mod inspect {
    use serde_json::Value;
    use swarmnet_cli::inspect::{NodeInspect, Report, Target, select, text};
    use swarmnet_cli::render::TaskView;

    use super::{both, dir};

    fn fixture(name: &str) -> String {
        std::fs::read_to_string(dir().join("../fixtures").join(name)).unwrap()
    }

    fn nodes(target: &Target) -> Vec<NodeInspect> {
        ["n1", "n2"]
            .iter()
            .map(|n| {
                let v: Value =
                    serde_json::from_str(&fixture(&format!("netd_inspect_{n}.json"))).unwrap();
                select(n, target, &v)
            })
            .collect()
    }

    fn report(
        kind: &str,
        name: &str,
        intent: Value,
        tasks: Vec<TaskView>,
        target: &Target,
    ) -> Report {
        let nodes = nodes(target);
        let drift = nodes
            .iter()
            .any(|n| n.error.is_some() || !n.drift.is_empty());
        Report {
            kind: kind.into(),
            name: name.into(),
            intent,
            tasks,
            nodes,
            drift,
        }
    }

    #[test]
    fn network_with_drift_on_n2() {
        let target = Target::Network { name: "app".into() };
        let r = report(
            "network",
            "app",
            serde_json::json!({"name": "app", "subnet": "10.40.0.0/24"}),
            vec![],
            &target,
        );
        assert!(r.drift);
        assert!(r.nodes[0].drift.is_empty(), "n1 is healthy");
        assert_eq!(r.nodes[1].drift.len(), 1);
        assert_eq!(r.nodes[1].kernel.keys().collect::<Vec<_>>(), ["net-app"]);
        both("inspect_network", text(&r), &r);
    }

    #[test]
    fn service_sees_its_sandboxes_but_not_network_drift() {
        let tasks: Vec<TaskView> = serde_json::from_str(&fixture("web_tasks.json")).unwrap();
        let target = Target::Service {
            name: "web".into(),
            tasks: tasks.iter().map(|t| t.id.clone()).collect(),
        };
        let r = report(
            "service",
            "web",
            serde_json::json!({"name": "web"}),
            tasks,
            &target,
        );
        assert!(
            !r.drift,
            "the FDB drift belongs to the network, not the service's sandboxes"
        );
        for n in &r.nodes {
            assert_eq!(
                n.kernel.len(),
                1,
                "one web sandbox per node: {:?}",
                n.kernel.keys()
            );
            assert!(n.kernel.keys().all(|k| k.starts_with("sb-")));
            assert_eq!(n.dns.len(), 1, "the web sandbox's resolver records");
        }
        both("inspect_service", text(&r), &r);
    }

    #[test]
    fn node_shows_everything() {
        let r = report(
            "node",
            "n2",
            serde_json::json!({"id": "n2"}),
            vec![],
            &Target::Node,
        );
        let n2 = &r.nodes[1];
        assert!(n2.kernel.contains_key("node") && n2.kernel.contains_key("net-app"));
        assert!(n2.status.contains_key("network/app"));
        assert_eq!(n2.drift.len(), 1);
    }
}

#[test]
fn lab_ls() {
    use swarmnet_cli::labs::{LabListing, table};
    let labs = vec![
        LabListing {
            name: "lab".into(),
            state: "up".into(),
            nodes: 3,
            namespaces: 4,
            processes: 4,
        },
        LabListing {
            name: "demo".into(),
            state: "leftover".into(),
            nodes: 0,
            namespaces: 2,
            processes: 1,
        },
    ];
    both("lab_ls", table(&labs), &labs);
    assert_eq!(table(&[]), "no labs on this machine\n");
}
