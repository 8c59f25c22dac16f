//! Privileged, end to end through the real binary: `lab up` builds nodes that reach each other
//! over the underlay with netd answering on every node, `lab exec` runs in a node, and `lab down`
//! leaves nothing behind (namespaces, links, mounts, cgroups, directories, processes).

mod common;

use common::{Guard, swarmnet};
use swarmnet_cli::lab::LabState;
use swarmnet_labkit as kit;
use swarmnet_tests_netns::gate;

#[test]
fn lab_up_exec_down_leaves_nothing() {
    if !gate::privileged("lab_up_exec_down_leaves_nothing") {
        return;
    }
    // Unique per process so parallel runs of this test never share a lab.
    let name = common::lab_name("t");
    let _guard = Guard(name.clone());
    let name = name.as_str();
    let config = tempfile::tempdir().unwrap();
    let fp = LabState::footprint(name);

    let up = swarmnet(
        config.path(),
        &[
            "lab", "up", "--name", name, "--nodes", "3", "--format", "json",
        ],
    );
    assert_eq!(up.code, 0, "lab up: {}", up.stderr);
    let status: serde_json::Value = serde_json::from_str(&up.stdout).unwrap();
    let nodes = status["nodes"].as_array().unwrap();
    assert_eq!(nodes.len(), 3);
    for n in nodes {
        assert_eq!(n["netd"], "running", "{n}");
        assert_eq!(n["netd_api"], true, "{n}");
    }
    assert_eq!(nodes[0]["role"], "manager");
    assert_eq!(nodes[1]["role"], "worker");
    // Live progress went to stderr, the result to stdout.
    assert!(
        up.stderr.contains("waiting for netd on n3"),
        "{}",
        up.stderr
    );
    // The context was written and made current.
    let ctx = std::fs::read_to_string(config.path().join(format!("{name}.json"))).unwrap();
    assert!(ctx.contains("198.19.0.1:4242"), "{ctx}");

    // The underlay works: n1 reaches n3, and exec passes the command's exit code through.
    let ping = swarmnet(
        config.path(),
        &[
            "lab",
            "exec",
            "--name",
            name,
            "n1",
            "--",
            "ping",
            "-c1",
            "-W2",
            "198.19.0.3",
        ],
    );
    assert_eq!(ping.code, 0, "{} {}", ping.stdout, ping.stderr);
    let fail = swarmnet(
        config.path(),
        &[
            "lab", "exec", "--name", name, "n2", "--", "sh", "-c", "exit 7",
        ],
    );
    assert_eq!(fail.code, 7);

    let pids: Vec<u32> = nodes
        .iter()
        .map(|n| n["netd_pid"].as_u64().unwrap() as u32)
        .collect();
    let again = swarmnet(config.path(), &["lab", "up", "--name", name]);
    assert_eq!(again.code, 1, "a second lab up must refuse");
    assert!(again.stderr.contains("lab down"), "{}", again.stderr);

    let down = swarmnet(config.path(), &["lab", "down", "--name", name]);
    assert_eq!(down.code, 0, "lab down: {}", down.stderr);
    assert_eq!(kit::leftovers(&fp), Vec::<String>::new());
    for pid in pids {
        assert!(!kit::pid_alive(pid), "{pid} survived lab down");
    }
    assert!(
        !config.path().join(format!("{name}.json")).exists(),
        "context left behind"
    );
    let status = swarmnet(config.path(), &["lab", "status", "--name", name]);
    assert_eq!(status.code, 1);
}

/// A lab whose processes died and whose state file is gone (a crashed or interrupted `lab up`)
/// is still listed by `lab ls` and fully removed by `lab down`.
#[test]
fn crashed_lab_is_listed_and_swept() {
    if !gate::privileged("crashed_lab_is_listed_and_swept") {
        return;
    }
    let name = common::lab_name("c");
    let _guard = Guard(name.clone());
    let name = name.as_str();
    let config = tempfile::tempdir().unwrap();
    let fp = LabState::footprint(name);
    let up = swarmnet(
        config.path(),
        &[
            "lab", "up", "--name", name, "--nodes", "2", "--format", "json",
        ],
    );
    assert_eq!(up.code, 0, "lab up: {}", up.stderr);
    let ours = |c: &std::path::Path| -> serde_json::Value {
        let ls = swarmnet(c, &["lab", "ls", "--format", "json"]);
        assert_eq!(ls.code, 0, "lab ls: {}", ls.stderr);
        let all: Vec<serde_json::Value> = serde_json::from_str(&ls.stdout).unwrap();
        all.into_iter()
            .find(|l| l["name"] == name)
            .unwrap_or_else(|| panic!("{name} not in lab ls: {}", ls.stdout))
    };
    let listed = ours(config.path());
    assert_eq!(listed["state"], "up", "{listed}");
    assert_eq!(listed["nodes"], 2, "{listed}");
    assert_eq!(listed["namespaces"], 3, "{listed}");

    // n2's netd dies (a process this test started, through the lab): degraded.
    let status: serde_json::Value = serde_json::from_str(&up.stdout).unwrap();
    let n2 = status["nodes"][1]["netd_pid"].as_u64().unwrap() as i32;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(n2),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    assert!(kit::wait_until(std::time::Duration::from_secs(10), || {
        ours(config.path())["state"] == "degraded"
    }));

    // The state file goes too (the CLI crashed before writing it): still found, by its traces.
    std::fs::remove_file(LabState::state_path(name)).unwrap();
    let listed = ours(config.path());
    assert_eq!(listed["state"], "leftover", "{listed}");
    assert!(listed["processes"].as_u64().unwrap() >= 1, "{listed}");
    let table = swarmnet(config.path(), &["lab", "ls"]);
    assert!(table.stdout.contains("leftover"), "{}", table.stdout);

    let down = swarmnet(config.path(), &["lab", "down", "--name", name]);
    assert_eq!(down.code, 0, "lab down: {}", down.stderr);
    assert_eq!(kit::leftovers(&fp), Vec::<String>::new());
    let ls = swarmnet(config.path(), &["lab", "ls", "--format", "json"]);
    assert!(!ls.stdout.contains(&format!("\"{name}\"")), "{}", ls.stdout);

    // `--all` with a name is a usage error (it would be ambiguous which one was meant).
    let both = swarmnet(config.path(), &["lab", "down", "--all", "--name", name]);
    assert_eq!(both.code, 2, "{}", both.stderr);
}

/// `node promote` in a lab starts a manager on the node that joins the Raft group; `node
/// demote` takes it out and stops it, even the leader's. The nodes follow the managers that
/// remain (none of them is marked down), and the cluster keeps taking writes.
#[test]
fn promote_and_demote_move_the_managers_of_a_lab() {
    if !gate::privileged("promote_and_demote_move_the_managers_of_a_lab") {
        return;
    }
    let name = common::lab_name("p");
    let _guard = Guard(name.clone());
    let config = tempfile::tempdir().unwrap();
    let c = config.path();
    common::ok(c, &["lab", "up", "--name", &name, "--nodes", "3"]);
    let voters = || -> Vec<u64> {
        let info = common::ok(c, &["cluster", "info", "--format", "json"]).json();
        info["managers"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|m| m["voter"] == true)
            .map(|m| m["id"].as_u64().unwrap())
            .collect()
    };
    assert_eq!(voters(), [1]);
    let r = common::ok(c, &["node", "promote", "n2"]);
    assert!(r.stdout.contains("Raft id 2"), "{}", r.stdout);
    assert_eq!(voters(), [1, 2]);
    // The first manager (the leader) goes.
    let r = common::ok(c, &["node", "demote", "n1"]);
    assert!(r.stdout.contains("stopped"), "{}", r.stdout);
    let lab = LabState::load(&name).unwrap();
    assert!(lab.nodes[0].manager_pid.is_none() && !lab.nodes[0].manager);
    assert!(kit::wait_until(
        std::time::Duration::from_secs(30),
        || voters() == [2]
    ));
    // Every node keeps heartbeating to the manager that remains: none is marked down (the
    // managers mark a node down after 5 s of silence; this waits well past that).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(12);
    while std::time::Instant::now() < deadline {
        let nodes = common::ok(c, &["node", "ls", "--format", "json"]).json();
        let statuses: Vec<&str> = nodes
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n["status"].as_str().unwrap())
            .collect();
        assert!(statuses.iter().all(|s| *s == "ready"), "{statuses:?}");
        std::thread::sleep(std::time::Duration::from_millis(500));
    }
    common::ok(c, &["network", "create", "after"]);
    // The last manager cannot be demoted.
    let last = common::swarmnet(c, &["node", "demote", "n2"]);
    assert_eq!(last.code, 1, "{}", last.stderr);
    assert!(last.stderr.contains("last manager"), "{}", last.stderr);
    common::ok(c, &["lab", "down", "--name", &name]);
}
