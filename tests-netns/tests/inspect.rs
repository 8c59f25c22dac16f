//! `swarmnet-netd inspect` on a live two-node overlay: a converged node reports no drift and
//! shows what its kernel holds (the remote endpoint's FDB and neighbour entries, the VIP's load
//! balancer); an FDB entry deleted by hand is reported as drift under the network that owns
//! it, and is gone from the report once a full round has repaired it. The DNS records each
//! sandbox's resolver serves are shown too, and a hand edit of a sandbox's resolver redirect
//! is drift of `dns/<task>` until the same round restores it.

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use serde_json::{Value, json};
use swarmnet_tests_netns::gate;
use swarmnet_tests_netns::topo::{self, CONVERGE_TIMEOUT, Topology, retry};

/// Runs `swarmnet-netd inspect` against `node`'s netd and parses its JSON.
fn inspect(topo: &Topology, node: &str) -> Result<Value> {
    let bin = topo::netd_binary()?;
    let run_dir = topo.node(node).run_dir.to_string_lossy().into_owned();
    let out = topo::run(
        {
            let mut c = std::process::Command::new(bin);
            c.args(["--run-dir", &run_dir, "inspect"]);
            c
        },
        None,
        Duration::from_secs(30),
    )?
    .check()?;
    serde_json::from_str(&out.stdout).with_context(|| format!("inspect output: {}", out.stdout))
}

fn drift(v: &Value) -> Vec<Value> {
    v["drift"].as_array().cloned().unwrap_or_default()
}

#[test]
fn inspect_shows_the_kernel_and_flags_a_deleted_fdb_entry_as_drift() {
    if !gate::privileged("inspect_shows_the_kernel_and_flags_a_deleted_fdb_entry_as_drift") {
        return;
    }
    topo::with_topology(2, |topo| {
        let intent = topo
            .cluster_intent()
            .network("app", "10.40.0.0/24", 4300)
            .service_json(
                json!({"name": "web", "networks": [{"network": "app", "vip": "10.40.0.2"}],
                                 "ports": [{"target": 80}]}),
            )
            .task_json(
                json!({"id": "web1", "service": "web", "node": "n1", "argv": ["sleep", "infinity"],
                              "networks": [{"network": "app", "ip": "10.40.0.11"}]}),
            )
            .task_json(
                json!({"id": "web2", "service": "web", "node": "n2", "argv": ["sleep", "infinity"],
                              "networks": [{"network": "app", "ip": "10.40.0.12"}]}),
            )
            .build();
        ensure!(topo.write_intent(&intent)?.is_none(), "valid intent");
        // Full rounds far apart, so the hand-made drift is still there when we inspect.
        topo.start_netd(&["--full-reconcile-interval", "1h"])?;
        topo.wait_converged(CONVERGE_TIMEOUT)?;

        let v = inspect(topo, "n1")?;
        ensure!(v["ready"] == json!(true), "{v:#}");
        ensure!(
            drift(&v).is_empty(),
            "a converged node has no drift: {:#}",
            v["drift"]
        );
        let net_ns = v["desired"]["networks"]["app"]["netns"]
            .as_str()
            .context("the app network's namespace in the report")?
            .to_string();
        let kernel = &v["kernel"][&net_ns];
        let fdb: Vec<String> = kernel["fdb"]
            .as_object()
            .context("fdb of the network namespace")?
            .values()
            .flat_map(|es| es.as_array().cloned().unwrap_or_default())
            .filter_map(|e| e.as_str().map(String::from))
            .collect();
        let n2 = topo.node("n2").addr.to_string();
        let entry = fdb
            .iter()
            .find(|e| e.ends_with(&format!("dst {n2}")) && !e.starts_with("00:00:00:00:00:00"))
            .with_context(|| format!("n1 holds an FDB entry for web2 via {n2}: {fdb:?}"))?
            .clone();
        ensure!(
            kernel["neighbours"].to_string().contains("10.40.0.12"),
            "the remote endpoint's neighbour entry is shown: {kernel:#}"
        );
        ensure!(
            kernel["lb"]["services"]["10.40.0.2:80/tcp"]
                .to_string()
                .contains("10.40.0.12:80"),
            "the VIP's backends are shown: {kernel:#}"
        );

        // The DNS records web1's resolver serves: the VIP, both tasks, the PTRs.
        let dns = &v["dns"]["web1"];
        ensure!(
            dns["records"]["web"] == json!(["A 10.40.0.2"])
                && dns["records"]["tasks.web"] == json!(["A 10.40.0.11", "A 10.40.0.12"])
                && dns["records"]["web.0.web2"] == json!(["A 10.40.0.12"])
                && dns["records"]["2.0.40.10.in-addr.arpa"] == json!(["PTR web."]),
            "web1's DNS records in inspect: {dns:#}"
        );
        ensure!(
            dns["listen"].to_string().contains("udp 127.0.0.11:"),
            "the resolver's sockets: {dns:#}"
        );

        // Delete the remote endpoint's FDB entry behind netd's back.
        let mac = entry.split_whitespace().next().context("mac")?.to_string();
        let vxlan = kernel["fdb"]
            .as_object()
            .and_then(|m| m.keys().next().cloned())
            .context("vxlan device")?;
        topo.network_exec(
            "n1",
            "app",
            &[
                "bridge", "fdb", "del", &mac, "dev", &vxlan, "dst", &n2, "self",
            ],
        )?
        .check()?;
        let v = inspect(topo, "n1")?;
        let d = drift(&v);
        ensure!(
            d.len() == 1
                && d[0]["object"] == json!("network/app")
                && d[0]["ops"].to_string().contains(&mac),
            "the deleted FDB entry is drift of network/app: {:#}",
            v["drift"]
        );
        // The other node is untouched.
        ensure!(drift(&inspect(topo, "n2")?).is_empty(), "n2 has no drift");

        // The resolver's redirect in web1's sandbox, edited by hand (its UDP reply rewrite
        // deleted): drift of dns/web1 that names the missing rule, beside the FDB entry.
        let listing = topo
            .sandbox_exec(
                "n1",
                "web1",
                &["nft", "-a", "list", "chain", "ip", "swarmnet-dns", "output"],
            )?
            .check()?
            .stdout;
        let handle = listing
            .lines()
            .find(|l| l.contains("udp sport set 53"))
            .and_then(|l| l.rsplit("# handle ").next())
            .with_context(|| format!("the UDP reply rewrite in web1's sandbox: {listing}"))?
            .trim()
            .to_string();
        topo.sandbox_exec(
            "n1",
            "web1",
            &[
                "nft",
                "delete",
                "rule",
                "ip",
                "swarmnet-dns",
                "output",
                "handle",
                &handle,
            ],
        )?
        .check()?;
        let v = inspect(topo, "n1")?;
        let d = drift(&v);
        ensure!(
            d.len() == 2
                && d.iter().any(|e| e["object"] == json!("dns/web1")
                    && e["ops"].to_string().contains("add udp from 127.0.0.11:")),
            "the edited redirect is drift of dns/web1: {:#}",
            v["drift"]
        );
        ensure!(
            v["dns"]["web1"]["redirect"]["drift"]
                .as_str()
                .is_some_and(|s| s.contains("sport -> 53")),
            "web1's resolver shows its redirect drift: {:#}",
            v["dns"]["web1"]
        );

        // A full round (a netd restart runs one) repairs it; inspect shows no drift again.
        topo.node_mut("n1").restart_netd()?;
        retry(
            "n1 to repair the FDB entry",
            Duration::from_secs(30),
            || {
                let v = inspect(topo, "n1")?;
                ensure!(drift(&v).is_empty(), "drift left: {:#}", v["drift"]);
                Ok(())
            },
        )?;
        Ok(())
    });
}
