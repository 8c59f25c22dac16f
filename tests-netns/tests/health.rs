//! Health checks end to end (issue 7) on a 3-node topology with gossip: `web` has two tasks,
//! web1 on n2 and web2 on n3, whose check is `test -f <dir>/ok-$SWARMNET_TASK_ID`, run by
//! netd inside each task's sandbox. Removing web2's file makes its check fail: web2 leaves
//! the DNS answers and the VIP backends on every node (n3 itself through its own projection,
//! n1 and n2 through gossip), and comes back once the file is there again. A client task c1
//! on n1 asks with `dig` and `curl`; n3's status.json says why.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, ensure};
use serde_json::{Value, json};
use swarmnet_tests_netns::gate;
use swarmnet_tests_netns::topo::{self, CONVERGE_TIMEOUT, Topology, retry};

const NET: &str = "app";
const VIP: &str = "10.61.0.2";
/// Generous: a check every 300 ms, two failures in a row, a gossip exchange every 250 ms and
/// a round; on a loaded 2-core machine all of it can stall for a while.
const BOUND: Duration = Duration::from_secs(15);

fn keys(topo: &Topology) -> Result<std::path::PathBuf> {
    let path = topo.dir.join("gossip-keys.toml");
    std::fs::write(
        &path,
        format!(
            "current = 1\n[[keys]]\nid = 1\nsecret = \"{}\"\n",
            "22".repeat(32)
        ),
    )?;
    Ok(path)
}

fn intent(topo: &Topology, flags: &Path) -> Result<Value> {
    let argv = topo::whoami_argv()?;
    let check = format!("test -f {}/ok-$SWARMNET_TASK_ID", flags.display());
    let web = |id: &str, slot: u32, node: &str, ip: &str| {
        json!({"id": id, "service": "web", "slot": slot, "node": node, "argv": argv,
               "networks": [{"network": NET, "ip": ip}]})
    };
    Ok(topo
        .cluster_intent()
        .network(NET, "10.61.0.0/24", 4610)
        .service_json(json!({"name": "web", "endpoint_mode": "vip",
            "networks": [{"network": NET, "vip": VIP}],
            "ports": [{"name": "http", "target": 80}],
            "health": {"cmd": ["/bin/sh", "-c", check], "interval": "300ms",
                       "timeout": "2s", "retries": 2}}))
        .service_json(json!({"name": "client", "networks": [{"network": NET}]}))
        .task_json(
            json!({"id": "c1", "service": "client", "slot": 1, "node": "n1",
            "argv": ["sleep", "infinity"], "networks": [{"network": NET, "ip": "10.61.0.21"}]}),
        )
        .task_json(web("web1", 1, "n2", "10.61.0.11"))
        .task_json(web("web2", 2, "n3", "10.61.0.12"))
        .build())
}

fn resolve(topo: &Topology, node: &str, task: &str, name: &str) -> Result<BTreeSet<String>> {
    let out = topo
        .sandbox_exec(
            node,
            task,
            &["dig", "@127.0.0.11", "+short", "+time=1", "+tries=1", name],
        )?
        .check()?;
    Ok(out
        .stdout
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(String::from)
        .collect())
}

/// `n` new connections to the VIP from `task` on `node`: who answered, and the failures.
fn curl_vip(
    topo: &Topology,
    node: &str,
    task: &str,
    n: usize,
) -> Result<(Vec<String>, Vec<String>)> {
    let script = topo::many_script(n, "curl -sS -m 3 http://$T/", VIP);
    let out = topo.sandbox_exec_timeout(
        node,
        task,
        &["sh", "-c", &script],
        Duration::from_secs(10 + 3 * n as u64),
    )?;
    ensure!(out.success(), "the client loop failed: {out}");
    let (answers, failed) = topo::parse_many(&out.stdout);
    Ok((answers.into_iter().map(|a| a.task).collect(), failed))
}

/// `task`'s health in `node`'s status.json.
fn health(topo: &Topology, node: &str, task: &str) -> Result<Value> {
    let path = topo.node(node).run_dir.join("status.json");
    let text = std::fs::read_to_string(&path).with_context(|| format!("{}", path.display()))?;
    let v: Value = serde_json::from_str(&text)?;
    v["health"]
        .get(task)
        .cloned()
        .ok_or_else(|| anyhow!("no health for {task} in {node}'s status: {}", v["health"]))
}

/// Every node's view of `tasks.web` (from c1 on n1, web1 on n2, web2 on n3) is `want`, and
/// the VIP from n1 reaches exactly the tasks of `want`.
fn everyone_sees(topo: &Topology, want: &[&str]) -> Result<()> {
    let want_ips: BTreeSet<String> = want
        .iter()
        .map(|t| match *t {
            "web1" => "10.61.0.11".to_string(),
            _ => "10.61.0.12".to_string(),
        })
        .collect();
    for (node, task) in [("n1", "c1"), ("n2", "web1"), ("n3", "web2")] {
        let got = resolve(topo, node, task, "tasks.web")?;
        ensure!(
            got == want_ips,
            "tasks.web from {node}: {got:?}, want {want_ips:?}"
        );
    }
    Ok(())
}

#[test]
fn a_failing_check_takes_a_task_out_of_dns_and_the_vip_everywhere_and_a_pass_brings_it_back() {
    if !gate::privileged(
        "a_failing_check_takes_a_task_out_of_dns_and_the_vip_everywhere_and_a_pass_brings_it_back",
    ) {
        return;
    }
    topo::with_topology(3, |topo| {
        let flags = topo.dir.join("health-flags");
        std::fs::create_dir_all(&flags)?;
        // web1 passes from the start; web2 only once its file exists.
        std::fs::write(flags.join("ok-web1"), "")?;
        let keys = keys(topo)?;
        topo.write_intent(&intent(topo, &flags)?)?;
        let args = [
            "--gossip-key-file",
            keys.to_str().expect("utf-8 path"),
            "--gossip-liveness-bound",
            "5s",
            "--gossip-interval",
            "250ms",
        ];
        let path = topo.intent_path.clone();
        for n in &mut topo.nodes {
            n.spawn_netd(&path, &args)?;
        }
        topo.wait_converged(CONVERGE_TIMEOUT)?;

        // A task whose check never passed does not serve: no DNS answer, no backend.
        retry("web1 alone to serve", CONVERGE_TIMEOUT, || {
            everyone_sees(topo, &["web1"])
        })?;
        let h = health(topo, "n3", "web2")?;
        ensure!(h["status"] != json!("healthy"), "web2: {h}");
        let (ok, failed) = curl_vip(topo, "n1", "c1", 10)?;
        ensure!(failed.is_empty(), "VIP with web1 alone: {failed:#?}");
        ensure!(ok.iter().all(|t| t == "web1"), "{ok:?}");

        // web2's check passes: it joins everywhere.
        std::fs::write(flags.join("ok-web2"), "")?;
        retry("web2 to join", BOUND, || {
            everyone_sees(topo, &["web1", "web2"])
        })?;
        let (ok, failed) = curl_vip(topo, "n1", "c1", 30)?;
        ensure!(failed.is_empty(), "VIP with both: {failed:#?}");
        ensure!(ok.iter().any(|t| t == "web2"), "web2 serves: {ok:?}");

        // web2's check starts failing: it leaves DNS and the VIP on every node.
        std::fs::remove_file(flags.join("ok-web2"))?;
        let t0 = Instant::now();
        retry("web2 to leave", BOUND, || everyone_sees(topo, &["web1"]))?;
        eprintln!(
            "web2 left DNS on every node {:?} after its check began failing (2 × 300 ms checks)",
            t0.elapsed()
        );
        let h = health(topo, "n3", "web2")?;
        ensure!(h["status"] == json!("unhealthy"), "web2: {h}");
        ensure!(
            h["last"].as_str().is_some_and(|l| l.starts_with("exit 1")),
            "the last check's result is shown: {h}"
        );
        for (node, task) in [("n1", "c1"), ("n2", "web1")] {
            let (ok, failed) = curl_vip(topo, node, task, 20)?;
            ensure!(
                failed.is_empty(),
                "VIP from {node} without web2: {failed:#?}"
            );
            ensure!(ok.iter().all(|t| t == "web1"), "from {node}: {ok:?}");
        }
        // The task itself keeps running: unhealthy is not dead.
        let h = health(topo, "n3", "web2")?;
        ensure!(h.get("down").is_none(), "web2's process runs: {h}");

        // Healthy again: back everywhere.
        std::fs::write(flags.join("ok-web2"), "")?;
        retry("web2 to return", BOUND, || {
            everyone_sees(topo, &["web1", "web2"])
        })?;
        retry("web2 to answer through the VIP", BOUND, || {
            let (ok, failed) = curl_vip(topo, "n1", "c1", 20)?;
            ensure!(failed.is_empty(), "{failed:#?}");
            ensure!(ok.iter().any(|t| t == "web2"), "{ok:?}");
            Ok(())
        })?;
        Ok(())
    });
}
