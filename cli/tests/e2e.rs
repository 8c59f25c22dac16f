//! Privileged, end to end through the real binary, as a user would: `lab up --nodes 3`, a
//! network and a published service of the demo server, a client task; from inside the client
//! (`task exec`) `dig` resolves the service to its VIP and `tasks.web` to every replica, `curl`
//! through the VIP reaches every replica; the published port answers on every node; `inspect`
//! finds no drift on a healthy lab and flags an FDB entry deleted by hand; scale; `lab down`
//! leaves nothing behind.

mod common;

use std::collections::BTreeSet;
use std::process::Command;
use std::time::Duration;

use common::{Guard, lab_name, ok, swarmnet, whoami};
use swarmnet_cli::lab::LabState;
use swarmnet_labkit as kit;
use swarmnet_tests_netns::gate;

const WAIT: Duration = Duration::from_secs(60);

/// Polls `f` until it gives `Some`, or panics with `what` after [`WAIT`].
fn eventually<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let start = std::time::Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(start.elapsed() < WAIT, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn lab_service_dns_vip_mesh_inspect_scale_down() {
    if !gate::privileged("lab_service_dns_vip_mesh_inspect_scale_down") {
        return;
    }
    let name = lab_name("e");
    let _guard = Guard(name.clone());
    let config = tempfile::tempdir().unwrap();
    let c = config.path();
    ok(c, &["lab", "up", "--name", &name, "--nodes", "3"]);
    ok(c, &["network", "create", "--subnet", "10.30.0.0/24", "app"]);
    let whoami = whoami();
    // Without --detach the command waits, showing progress, until every task runs.
    let created = ok(
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
            "--",
            &whoami,
            "--port",
            "80",
        ],
    );
    assert!(
        created.stderr.contains("web: 3/3 tasks running"),
        "{}",
        created.stderr
    );
    ok(
        c,
        &[
            "service",
            "create",
            "--name",
            "client",
            "--network",
            "app",
            "--detach",
            "--",
            "/bin/sleep",
            "infinity",
        ],
    );
    let vip = ok(c, &["service", "ls", "--format", "json"])
        .json()
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "web")
        .unwrap()["vips"]["app"]
        .as_str()
        .unwrap()
        .to_owned();
    let tasks = ok(c, &["service", "ps", "web", "--format", "json"]).json();
    let web_ips: BTreeSet<String> = tasks
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["addresses"]["app"].as_str().unwrap().to_owned())
        .collect();
    let web_ids: BTreeSet<String> = tasks
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(web_ips.len(), 3);
    for t in tasks.as_array().unwrap() {
        assert_eq!(t["state"], "running", "{t}");
    }

    // The client's process runs once its node's netd got the assignment.
    let exec = |args: &[&str]| {
        let mut full = vec!["task", "exec", "client.1", "--"];
        full.extend_from_slice(args);
        swarmnet(c, &full)
    };
    eventually("the client task to run", || {
        (exec(&["true"]).code == 0).then_some(())
    });

    // DNS from inside the client, through its resolv.conf (127.0.0.11).
    let resolv = exec(&["cat", "/etc/resolv.conf"]);
    assert!(
        resolv.stdout.contains("nameserver 127.0.0.11"),
        "{}",
        resolv.stdout
    );
    let dig = eventually("dig web", || {
        let r = exec(&["dig", "+short", "web"]);
        (r.code == 0 && !r.stdout.trim().is_empty()).then_some(r.stdout)
    });
    assert_eq!(dig.trim(), vip);
    let all = eventually("tasks.web to list every replica", || {
        let r = exec(&["dig", "+short", "tasks.web"]);
        let got: BTreeSet<String> = r.stdout.lines().map(str::to_owned).collect();
        (got == web_ips).then_some(got)
    });
    assert_eq!(all.len(), 3);

    // Through the VIP, every replica answers (bounded number of requests).
    let mut seen = BTreeSet::new();
    for _ in 0..60 {
        let r = exec(&["curl", "-s", "--max-time", "3", "http://web/"]);
        if let Some(task) = r.stdout.lines().find_map(|l| l.strip_prefix("task: ")) {
            seen.insert(task.trim().to_owned());
        }
        if seen == web_ids {
            break;
        }
    }
    assert_eq!(seen, web_ids, "not every replica answered through the VIP");

    // The published port answers on every node, asked from the next node over the underlay.
    for k in 1..=3u8 {
        let from = format!("n{}", k % 3 + 1);
        let url = format!("http://198.19.0.{k}:8080/");
        eventually(&format!("{url} from {from}"), || {
            let r = swarmnet(
                c,
                &[
                    "lab",
                    "exec",
                    "--name",
                    &name,
                    &from,
                    "--",
                    "curl",
                    "-s",
                    "--max-time",
                    "3",
                    &url,
                ],
            );
            r.stdout.contains("task: ").then_some(())
        });
    }

    // inspect: healthy lab, no drift; an FDB entry deleted by hand on n2 is drift there.
    let report = ok(c, &["inspect", "network", "app", "--format", "json"]).json();
    assert_eq!(report["drift"], false, "{report}");
    let n2 = &report["nodes"][1];
    assert_eq!(n2["node"], "n2");
    let entry = n2["kernel"]["net-app"]["fdb"]
        .as_object()
        .unwrap()
        .iter()
        .find_map(|(dev, entries)| {
            Some((
                dev.clone(),
                entries.as_array()?.first()?.as_str()?.to_owned(),
            ))
        })
        .expect("n2 has FDB entries for remote replicas");
    let (dev, line) = entry;
    let (mac, dst) = line.split_once(" dst ").unwrap();
    let lab = LabState::load(&name).unwrap();
    let netns = lab.nodes[1].run_dir.join("netns/net-app");
    let del = Command::new("nsenter")
        .arg(format!("--net={}", netns.display()))
        .args(["bridge", "fdb", "del", mac, "dev", &dev, "dst", dst, "self"])
        .output()
        .unwrap();
    assert!(
        del.status.success(),
        "{}",
        String::from_utf8_lossy(&del.stderr)
    );
    let report = ok(c, &["inspect", "network", "app", "--format", "json"]).json();
    assert_eq!(report["drift"], true, "{report}");
    let drift = report["nodes"][1]["drift"].to_string();
    assert!(drift.contains(mac), "{drift}");
    assert_eq!(report["nodes"][0]["drift"], serde_json::json!([]));
    let text = ok(c, &["inspect", "network", "app"]).stdout;
    assert!(
        text.contains("drift on n2") && text.contains("result: DRIFT"),
        "{text}"
    );

    // Node labels through the managers.
    ok(c, &["node", "update", "--label-add", "zone=a", "n2"]);
    let nodes = ok(c, &["node", "ls", "--format", "json"]).json();
    assert_eq!(nodes[1]["labels"]["zone"], "a", "{nodes}");

    // A rolling update: the command waits until the managers report it completed.
    let upd = ok(
        c,
        &[
            "service",
            "update",
            "web",
            "--env-add",
            "X=1",
            "--update-parallelism",
            "1",
        ],
    );
    assert!(upd.stderr.contains("web updated"), "{}", upd.stderr);
    let svc = ok(c, &["service", "ls", "--format", "json"]).json();
    let web = svc
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "web")
        .unwrap();
    assert_eq!(web["update_state"], "completed", "{web}");
    assert_eq!(web["replicas_running"], 3, "{web}");

    // Scale down: the managers keep one task.
    ok(c, &["service", "scale", "web=1"]);
    // Scaled-away tasks drain first (shown as such, stopped after the grace period).
    let tasks = ok(c, &["service", "ps", "web", "--format", "json"]).json();
    let staying = tasks
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| t["state"] != "draining")
        .count();
    assert_eq!(staying, 1, "{tasks}");

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
    // No task process survived either: nothing is left in a namespace of the lab.
    assert!(kit::netns_with_prefix(&format!("snl-{name}-")).is_empty());
}
