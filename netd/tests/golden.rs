//! Golden files for everything netd renders: the node firewall ruleset and the plans the planner
//! makes for a fresh node, a node that drifted, and a node losing a network. Regenerate with
//! `SWARMNET_BLESS=1 cargo test -p swarmnet-netd --test golden` and review the diff.

use std::collections::BTreeMap;

use swarmnet_model::{IfName, Intent, NodeId, TaskId};
use swarmnet_netd::desired::{NodeContext, gw_tasks, lease_gw, project};
use swarmnet_netd::plan::{Observed, ProcessGate, Scope, plan};

const INTENT: &str = include_str!("fixtures/three-nodes.json");

fn check_golden(name: &str, actual: &str) {
    let dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/golden");
    swarmnet_tests_netns::golden::check(&dir, name, actual);
}

fn desired(node: &str) -> swarmnet_netd::desired::DesiredNode {
    let intent = Intent::from_json(INTENT).unwrap();
    let mut ctx = NodeContext {
        node: NodeId::new(node).unwrap(),
        vxlan_port: 4789,
        underlay_mtu: 1500,
        underlay_if: Some(IfName::new("eth0").unwrap()),
        gw_subnet: "172.30.0.0/16".parse().unwrap(),
        gw_leases: BTreeMap::new(),
        external: BTreeMap::new(),
        task_dir: "/run/swarmnet/tasks".into(),
        unready: Default::default(),
    };
    ctx.gw_leases = lease_gw(ctx.gw_subnet, &ctx.gw_leases, &gw_tasks(&intent, &ctx.node)).0;
    let (d, issues) = project(&intent, &ctx);
    assert!(issues.is_empty());
    d
}

fn render_plan(plans: &[swarmnet_netd::plan::ObjectPlan]) -> String {
    let mut s = String::new();
    for p in plans {
        s.push_str(&format!("[{}]\n", p.key));
        for op in &p.ops {
            match op {
                // The ruleset has its own golden file.
                swarmnet_netd::plan::Op::ApplyFirewall(_) => {
                    s.push_str("  apply node firewall table\n")
                }
                other => s.push_str(&format!("  {other}\n")),
            }
        }
    }
    s
}

fn start(_: &TaskId) -> ProcessGate {
    ProcessGate::Start
}

#[test]
fn firewall_ruleset() {
    check_golden(
        "firewall-n1.nft",
        &swarmnet_netd::firewall::render(&desired("n1")),
    );
    check_golden(
        "firewall-n3.nft",
        &swarmnet_netd::firewall::render(&desired("n3")),
    );
}

const MESH_INTENT: &str = r#"{
  "version": 1,
  "nodes": [
    {"id": "n1", "addr": "198.18.0.1", "ingress_ip": "10.255.0.101"},
    {"id": "n2", "addr": "198.18.0.2", "ingress_ip": "10.255.0.102"}
  ],
  "networks": [
    {"name": "ingress", "subnet": "10.255.0.0/24", "vni": 4096, "ingress": true},
    {"name": "app", "subnet": "10.10.0.0/24", "vni": 4097}
  ],
  "services": [
    {"name": "web", "networks": [{"network": "app", "vip": "10.10.0.2"}, {"network": "ingress", "vip": "10.255.0.2"}],
     "ports": [{"target": 80, "published": 8080}, {"target": 53, "protocol": "udp", "published": 5353}]},
    {"name": "cache", "networks": [{"network": "app"}],
     "ports": [{"target": 6379, "published": 6379, "publish_mode": "host"}]},
    {"name": "api", "networks": [{"network": "app"}, {"network": "ingress", "vip": "10.255.0.4"}],
     "ports": [{"target": 9000, "published": 9000, "traffic_policy": "local"}]},
    {"name": "edge", "networks": [{"network": "app"}, {"network": "ingress", "vip": "10.255.0.5"}],
     "ports": [{"target": 9100, "published": 9100, "traffic_policy": "local"},
               {"target": 9100, "protocol": "udp", "published": 9100, "traffic_policy": "local"}]}
  ],
  "tasks": [
    {"id": "web1", "service": "web", "node": "n2", "argv": ["sleep", "inf"],
     "networks": [{"network": "app", "ip": "10.10.0.3"}, {"network": "ingress", "ip": "10.255.0.3"}]},
    {"id": "cache1", "service": "cache", "node": "n1", "argv": ["sleep", "inf"],
     "networks": [{"network": "app", "ip": "10.10.0.4"}]},
    {"id": "api1", "service": "api", "node": "n1", "argv": ["sleep", "inf"],
     "networks": [{"network": "app", "ip": "10.10.0.5"}]},
    {"id": "api2", "service": "api", "node": "n1", "argv": ["sleep", "inf"],
     "networks": [{"network": "app", "ip": "10.10.0.6"}]},
    {"id": "edge1", "service": "edge", "node": "n2", "argv": ["sleep", "inf"],
     "networks": [{"network": "app", "ip": "10.10.0.7"}]}
  ]
}"#;

#[test]
fn routing_mesh_ruleset_and_plan() {
    let intent = Intent::from_json(MESH_INTENT).unwrap();
    let mut ctx = NodeContext {
        node: NodeId::new("n1").unwrap(),
        vxlan_port: 4789,
        underlay_mtu: 1500,
        underlay_if: Some(IfName::new("eth0").unwrap()),
        gw_subnet: "172.30.0.0/16".parse().unwrap(),
        gw_leases: BTreeMap::new(),
        external: BTreeMap::new(),
        task_dir: "/run/swarmnet/tasks".into(),
        unready: Default::default(),
    };
    ctx.gw_leases = lease_gw(ctx.gw_subnet, &ctx.gw_leases, &gw_tasks(&intent, &ctx.node)).0;
    let (d, issues) = project(&intent, &ctx);
    assert!(issues.is_empty(), "{issues:?}");
    // n1 runs no web task, yet publishes 8080 and 5353 (the routing mesh) and 6379 (host mode,
    // its local cache task); 9000 with the local traffic policy goes to its two api tasks at
    // random, and 9100 (local policy, the only edge task is on n2) is refused on n1.
    check_golden("firewall-mesh-n1.nft", &swarmnet_netd::firewall::render(&d));
    let plans = plan(
        &d,
        &Observed::default(),
        &Scope::Full,
        &Default::default(),
        &start,
    );
    check_golden("plan-mesh-n1.txt", &render_plan(&plans));
}

#[test]
fn plan_for_a_fresh_node() {
    let d = desired("n1");
    let plans = plan(
        &d,
        &Observed::default(),
        &Scope::Full,
        &Default::default(),
        &start,
    );
    check_golden("plan-fresh-n1.txt", &render_plan(&plans));
}
