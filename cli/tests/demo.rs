//! Privileged: `swarmnet lab demo --down` builds the demo, checks DNS, the VIP and the routing
//! mesh with real clients (it fails otherwise), reports them, and removes the lab.

mod common;

use common::{Guard, lab_name, ok};
use swarmnet_cli::lab::LabState;
use swarmnet_labkit as kit;
use swarmnet_tests_netns::gate;

#[test]
fn lab_demo_down() {
    if !gate::privileged("lab_demo_down") {
        return;
    }
    let name = lab_name("d");
    let _guard = Guard(name.clone());
    let config = tempfile::tempdir().unwrap();
    let r = ok(
        config.path(),
        &["lab", "demo", "--name", &name, "--down", "--format", "json"],
    )
    .json();
    assert_eq!(r["replicas_answering"].as_array().unwrap().len(), 3, "{r}");
    assert_eq!(r["web_resolves_to"], serde_json::json!([r["vip"]]), "{r}");
    assert_eq!(
        r["tasks_web_resolves_to"].as_array().unwrap().len(),
        3,
        "{r}"
    );
    assert_eq!(r["published_port"].as_array().unwrap().len(), 3, "{r}");
    assert_eq!(r["nodes_without_web"], serde_json::json!(["n3"]), "{r}");
    assert_eq!(r["removed"], true);
    assert_eq!(
        kit::leftovers(&LabState::footprint(&name)),
        Vec::<String>::new()
    );
}
