//! Privileged, end to end through the real binary against real managers in a lab: node, network
//! and service commands, server refusals with their exit codes, and failover when the leader dies.

mod common;

use common::{Guard, lab_name, ok, swarmnet};
use swarmnet_cli::lab::LabState;
use swarmnet_labkit as kit;
use swarmnet_tests_netns::gate;

#[test]
fn commands_against_three_managers_with_failover() {
    if !gate::privileged("commands_against_three_managers_with_failover") {
        return;
    }
    let name = lab_name("c");
    let _guard = Guard(name.clone());
    let config = tempfile::tempdir().unwrap();
    let c = config.path();
    let whoami = common::whoami();
    ok(
        c,
        &[
            "lab",
            "up",
            "--name",
            &name,
            "--nodes",
            "3",
            "--managers",
            "3",
        ],
    );

    // Nodes with their addresses and manager status.
    let nodes = ok(c, &["node", "ls", "--format", "json"]).json();
    let nodes = nodes.as_array().unwrap();
    assert_eq!(nodes.len(), 3);
    for (i, n) in nodes.iter().enumerate() {
        assert_eq!(n["hostname"], format!("n{}", i + 1));
        assert_eq!(n["addr"], format!("198.19.0.{}", i + 1));
        assert_eq!(n["role"], "manager");
    }
    let statuses: Vec<&str> = nodes
        .iter()
        .map(|n| n["manager_status"].as_str().unwrap())
        .collect();
    assert_eq!(
        statuses.iter().filter(|s| **s == "leader").count(),
        1,
        "{statuses:?}"
    );
    assert_eq!(
        statuses.iter().filter(|s| **s == "reachable").count(),
        2,
        "{statuses:?}"
    );

    // Gossip key rotation through the CLI: started by `--rotate`, completed by the leader as
    // the nodes confirm (polled, generous bound), ending with one new primary key.
    let before = ok(c, &["cluster", "gossip-key", "--format", "json"]).json();
    assert_eq!(before["gossip_rotation"], "", "{before}");
    let old_id = before["gossip_keys"][0]["id"].clone();
    let started = ok(
        c,
        &["cluster", "gossip-key", "--rotate", "--format", "json"],
    )
    .json();
    assert_eq!(
        started["gossip_keys"].as_array().unwrap().len(),
        2,
        "{started}"
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let now = ok(c, &["cluster", "gossip-key", "--format", "json"]).json();
        let keys = now["gossip_keys"].as_array().unwrap().clone();
        if now["gossip_rotation"] == "" && keys.len() == 1 && keys[0]["id"] != old_id {
            assert_eq!(keys[0]["primary"], true, "{now}");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "rotation stuck: {now}"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    let text = ok(c, &["cluster", "info"]).stdout;
    assert!(text.contains("no rotation in progress"), "{text}");

    // Networks: create, refuse a duplicate (exit 1 with a hint), list.
    ok(c, &["network", "create", "--subnet", "10.20.0.0/24", "app"]);
    let dup = swarmnet(c, &["network", "create", "app"]);
    assert_eq!(dup.code, 1, "{}", dup.stderr);
    assert!(
        dup.stderr.contains("exists") && dup.stderr.contains("hint:"),
        "{}",
        dup.stderr
    );
    let nets = ok(c, &["network", "ls", "--format", "json"]).json();
    let app = nets
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["name"] == "app")
        .unwrap();
    assert_eq!(app["subnet"], "10.20.0.0/24");

    // A service: created, listed, its tasks have addresses in the network's subnet.
    ok(
        c,
        &[
            "service",
            "create",
            "--name",
            "web",
            "--replicas",
            "3",
            "--network",
            "app",
            "--publish",
            "8080:80",
            "--detach",
            "--",
            &whoami,
            "--port",
            "80",
        ],
    );
    let svcs = ok(c, &["service", "ls", "--format", "json"]).json();
    assert_eq!(svcs[0]["name"], "web");
    assert_eq!(svcs[0]["replicas_desired"], 3);
    assert_eq!(svcs[0]["ports"][0]["published"], 8080);
    let tasks = ok(c, &["service", "ps", "web", "--format", "json"]).json();
    let tasks = tasks.as_array().unwrap();
    assert_eq!(tasks.len(), 3);
    for t in tasks {
        assert!(
            t["addresses"]["app"]
                .as_str()
                .unwrap()
                .starts_with("10.20.0."),
            "{t}"
        );
    }
    // A network in use cannot go: the manager refuses (exit 1, names what to do).
    let busy = swarmnet(c, &["network", "rm", "app"]);
    assert_eq!(busy.code, 1, "{}", busy.stderr);

    // The leader dies: commands go on through another manager, which reports it unreachable.
    let lab = LabState::load(&name).unwrap();
    let leader = nodes
        .iter()
        .position(|n| n["manager_status"] == "leader")
        .unwrap();
    let pid = lab.nodes[leader].manager_pid.unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    assert!(kit::wait_until(std::time::Duration::from_secs(10), || {
        !kit::pid_alive(pid)
    }));
    // Writes need the new leader: retry while the election runs.
    assert!(
        kit::wait_until(std::time::Duration::from_secs(20), || {
            swarmnet(c, &["service", "scale", "web=1", "--detach"]).code == 0
        }),
        "scale never succeeded after the leader died"
    );
    let nodes = ok(c, &["node", "ls", "--format", "json"]).json();
    assert_eq!(nodes[leader]["manager_status"], "unreachable", "{nodes}");
    // Scaled-away tasks drain first (shown as such, stopped after the grace period), and
    // replaced ones stay listed with desired state shutdown: one is meant to run.
    let tasks = ok(c, &["service", "ps", "web", "--format", "json"]).json();
    let staying = tasks
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| t["desired_state"] == "running" && t["state"] != "draining")
        .count();
    assert_eq!(staying, 1, "{tasks}");

    ok(c, &["service", "rm", "web"]);
    let gone = swarmnet(c, &["service", "ps", "web"]);
    assert_eq!(gone.code, 1);
    assert!(gone.stderr.contains("service ls"), "{}", gone.stderr);
    ok(c, &["network", "rm", "app"]);

    ok(c, &["lab", "down", "--name", &name]);
    assert_eq!(
        kit::leftovers(&LabState::footprint(&name)),
        Vec::<String>::new()
    );
    for n in &lab.nodes {
        for p in [n.netd_pid, n.manager_pid].into_iter().flatten() {
            assert!(!kit::pid_alive(p), "{p} survived lab down");
        }
    }
}
