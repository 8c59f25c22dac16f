//! End to end with the orchestrator: three managers (`swarmnet-orchestrator`, one in each node
//! namespace) and three netds taking their intent from them (`--managers`, `--join-token`).
//! A network and a service are created through the gRPC API; every node's data plane then
//! serves the service by name and VIP from every task; gossip runs on the keyring the managers
//! distribute (and follows its rotation); a node is drained under load without one failed
//! request (two-phase removal); with every manager stopped, the data plane keeps serving.
//!
//! API calls run on a thread that entered node n1's namespace (the managers listen on the
//! underlay addresses, which exist only there).

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, ensure};
use swarmnet_api as pb;
use swarmnet_tests_netns::gate;
use swarmnet_tests_netns::topo::{self, Bg, Topology, parse_answer, retry};

mod common;
use common::{channel, in_netns, orchestrator_binary};

const PORT: u16 = 4242;

struct Managers {
    procs: Vec<Option<Bg>>,
    addrs: Vec<String>,
}

fn start_managers(topo: &Topology) -> Result<Managers> {
    let bin = orchestrator_binary()?;
    let addrs: Vec<String> = topo
        .nodes
        .iter()
        .map(|n| format!("{}:{PORT}", n.addr))
        .collect();
    let mut procs = Vec::new();
    common::use_admin_of(&topo.dir.join("manager-1"))?;
    for (i, n) in topo.nodes.iter().enumerate() {
        let data = topo.dir.join(format!("manager-{}", i + 1));
        let mut args = vec![
            bin.to_string_lossy().into_owned(),
            "--id".into(),
            (i + 1).to_string(),
            "--listen".into(),
            addrs[i].clone(),
            "--data-dir".into(),
            data.to_string_lossy().into_owned(),
        ];
        if i == 0 {
            args.push("--bootstrap".into());
        } else {
            // Joining needs the manager token: the others start after init.
            break;
        }
        let argv: Vec<&str> = args.iter().map(String::as_str).collect();
        let cmd: Command = topo::nsenter_cmd(&n.netns_path(), &argv);
        procs.push(Some(Bg::spawn(cmd, None)?));
        if i == 0 {
            // The others join through the first: let it answer first.
            let a = addrs[0].clone();
            retry("manager 1 to answer", Duration::from_secs(20), || {
                let a = a.clone();
                in_netns(&n.netns_path(), move || {
                    Box::pin(async move {
                        pb::cluster_client::ClusterClient::new(channel(a).await?)
                            .info(pb::Empty {})
                            .await?;
                        Ok(())
                    })
                })
            })?;
        }
    }
    Ok(Managers { procs, addrs })
}

/// Starts managers 2.. with the manager join token: each gets its certificate from manager 1
/// (checking manager 1's CA against the token), then asks it to add it.
fn start_joining_managers(topo: &Topology, managers: &mut Managers, token: &str) -> Result<()> {
    let bin = orchestrator_binary()?;
    for (i, n) in topo.nodes.iter().enumerate().skip(1) {
        let data = topo.dir.join(format!("manager-{}", i + 1));
        let args = [
            bin.to_string_lossy().into_owned(),
            "--id".into(),
            (i + 1).to_string(),
            "--listen".into(),
            managers.addrs[i].clone(),
            "--data-dir".into(),
            data.to_string_lossy().into_owned(),
            "--join".into(),
            managers.addrs[0].clone(),
            "--join-token".into(),
            token.to_string(),
        ];
        let argv: Vec<&str> = args.iter().map(String::as_str).collect();
        let cmd: Command = topo::nsenter_cmd(&n.netns_path(), &argv);
        managers.procs.push(Some(Bg::spawn(cmd, None)?));
    }
    Ok(())
}

#[test]
fn three_managers_drive_three_nodes_and_the_data_plane_outlives_them() -> Result<()> {
    if !gate::privileged("three_managers_drive_three_nodes_and_the_data_plane_outlives_them") {
        return Ok(());
    }
    let mut topo = Topology::new(3)?;
    let mut managers = start_managers(&topo)?;
    let n1 = topo.node("n1").netns_path();
    let first = managers.addrs[0].clone();
    let n1_addr = topo.node("n1").addr.to_string();
    // Create the cluster (its first node is n1), wait for all three managers to be voters.
    let token = in_netns(&n1, move || {
        Box::pin(async move {
            let mut c = pb::cluster_client::ClusterClient::new(channel(first).await?);
            c.init(pb::InitRequest {
                cluster_id: "e2e".into(),
                node: Some(pb::JoinNodeRequest {
                    id: "n1".into(),
                    addr: n1_addr,
                    role: "manager".into(),
                    ..Default::default()
                }),
                ..Default::default()
            })
            .await?;
            let t = c.join_tokens(pb::Empty {}).await?.into_inner();
            Ok((t.worker, t.manager))
        })
    })?;
    start_joining_managers(&topo, &mut managers, &token.1)?;
    let token = token.0;
    let first = managers.addrs[0].clone();
    in_netns(&n1, move || {
        Box::pin(async move {
            let mut c = pb::cluster_client::ClusterClient::new(channel(first).await?);
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                let info = c.info(pb::Empty {}).await?.into_inner();
                if info.managers.iter().filter(|m| m.voter).count() == 3 {
                    return Ok(());
                }
                ensure!(
                    Instant::now() < deadline,
                    "managers did not all join: {info:?}"
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
    })?;
    let list = managers.addrs.join(",");
    for n in &mut topo.nodes {
        let addr = n.addr.to_string();
        n.spawn_netd(
            Path::new("/nonexistent"),
            &[
                "--managers",
                &list,
                "--join-token",
                &token,
                "--advertise-addr",
                &addr,
            ],
        )?;
    }
    // Every netd joins (n1 was recorded at init and rejoins).
    let m1 = managers.addrs[0].clone();
    retry("three nodes to join", Duration::from_secs(30), || {
        let m1 = m1.clone();
        let n = in_netns(&n1, move || {
            Box::pin(async move {
                let list = pb::nodes_client::NodesClient::new(channel(m1).await?)
                    .list(pb::Empty {})
                    .await?
                    .into_inner();
                Ok(list.nodes.len())
            })
        })?;
        ensure!(n == 3, "{n} nodes");
        Ok(())
    })?;
    // A network and a service through the API (to manager 2: it forwards to the leader).
    let m2 = managers.addrs[1].clone();
    let argv = topo::whoami_argv()?;
    let mut tasks: Vec<(String, String)> = in_netns(&n1, move || {
        Box::pin(async move {
            let ch = channel(m2).await?;
            pb::networks_client::NetworksClient::new(ch.clone())
                .create(pb::NetworkCreate {
                    name: "app".into(),
                    ..Default::default()
                })
                .await?;
            let mut s = pb::services_client::ServicesClient::new(ch);
            s.create(pb::ServiceSpec {
                name: "web".into(),
                replicas: 3,
                argv,
                networks: vec![pb::ServiceNetwork {
                    network: "app".into(),
                    aliases: vec![],
                }],
                // The VIP balances the ports a service declares.
                ports: vec![pb::Port {
                    target: 80,
                    ..Default::default()
                }],
                ..Default::default()
            })
            .await?;
            let ps = s.ps(pb::NameRef { name: "web".into() }).await?.into_inner();
            Ok(ps
                .tasks
                .into_iter()
                .map(|t| (t.node, t.id))
                .collect::<Vec<_>>())
        })
    })?;
    ensure!(tasks.len() == 3, "{tasks:?}");
    let nodes: std::collections::BTreeSet<&str> = tasks.iter().map(|(n, _)| n.as_str()).collect();
    ensure!(nodes.len() == 3, "one task per node: {tasks:?}");
    // Every node runs its task and reaches the service by name (DNS -> VIP -> a backend).
    let check = |topo: &Topology, tasks: &[(String, String)]| -> Result<()> {
        for (node, task) in tasks {
            retry(
                &format!("web to answer {task} on {node}"),
                Duration::from_secs(60),
                || {
                    // The test's commands share only the sandbox's network namespace, not the
                    // task's resolv.conf: ask the sandbox's resolver explicitly.
                    let vip = topo
                        .sandbox_exec(
                            node,
                            task,
                            &["dig", "+short", "+time=1", "@127.0.0.11", "web"],
                        )?
                        .check()?
                        .stdout
                        .trim()
                        .to_string();
                    ensure!(!vip.is_empty(), "web does not resolve");
                    let out = topo
                        .sandbox_exec(
                            node,
                            task,
                            &["curl", "-sS", "-m", "2", &format!("http://{vip}/")],
                        )?
                        .check()?;
                    parse_answer(&out.stdout)
                        .map(drop)
                        .ok_or_else(|| anyhow!("not a whoami answer: {}", out.stdout))
                },
            )?;
        }
        Ok(())
    };
    check(&topo, &tasks)?;
    topo.wait_converged(Duration::from_secs(60))?;
    // The nodes report their tasks running.
    let m3 = managers.addrs[2].clone();
    retry(
        "every task reported running",
        Duration::from_secs(30),
        || {
            let m3 = m3.clone();
            let states = in_netns(&n1, move || {
                Box::pin(async move {
                    let ps = pb::services_client::ServicesClient::new(channel(m3).await?)
                        .ps(pb::NameRef { name: "web".into() })
                        .await?
                        .into_inner();
                    Ok(ps.tasks.into_iter().map(|t| t.state).collect::<Vec<_>>())
                })
            })?;
            ensure!(states.iter().all(|s| s == "running"), "{states:?}");
            Ok(())
        },
    )?;
    // Gossip runs on the keyring the managers distribute (no key file was given to netd): every
    // node seals with the same key and sees the two others live.
    let gossip = |topo: &Topology| -> Result<Vec<serde_json::Value>> {
        topo.nodes
            .iter()
            .map(|n| {
                let path = n.run_dir.join("status.json");
                let v: serde_json::Value = serde_json::from_str(
                    &std::fs::read_to_string(&path).with_context(|| path.display().to_string())?,
                )?;
                Ok(v["gossip"].clone())
            })
            .collect()
    };
    let sealing_keys = |g: &[serde_json::Value]| -> Vec<Option<u64>> {
        g.iter().map(|g| g["sealing_key"].as_u64()).collect()
    };
    let mut first_key = 0;
    retry(
        "gossip live across the nodes on the managers' key",
        Duration::from_secs(60),
        || {
            let g = gossip(&topo)?;
            let keys = sealing_keys(&g);
            ensure!(
                keys[0].is_some() && keys.iter().all(|k| *k == keys[0]),
                "sealing keys {keys:?}"
            );
            ensure!(
                g.iter().all(|g| g["peers_live"].as_u64() == Some(2)),
                "{g:?}"
            );
            first_key = keys[0].unwrap_or_default();
            Ok(())
        },
    )?;
    // A rotation in three steps, driven by the leader as the nodes confirm in their
    // heartbeats: the new key is sent accepted-only, then seals, then the old one goes. No
    // node ever gets a frame sealed with a key it lacks (no `dropped_unknown_key`), and every
    // node keeps hearing the others.
    let unknown_key = |g: &[serde_json::Value]| -> u64 {
        g.iter()
            .map(|g| g["transport"]["dropped_unknown_key"].as_u64().unwrap_or(0))
            .sum()
    };
    let dropped_before = unknown_key(&gossip(&topo)?);
    let rotation_started = Instant::now();
    let m2 = managers.addrs[1].clone();
    let started = in_netns(&n1, move || {
        Box::pin(async move {
            Ok(pb::cluster_client::ClusterClient::new(channel(m2).await?)
                .rotate_gossip_key(pb::Empty {})
                .await?
                .into_inner())
        })
    })?;
    ensure!(
        started.gossip_rotation == "distributing"
            && started.gossip_keys.len() == 2
            // Oldest first: the old key still seals, the new one is accepted only.
            && started.gossip_keys[0].primary
            && !started.gossip_keys[1].primary,
        "step 1 keeps the old key primary: {started:?}"
    );
    // A second rotation while one is in progress is refused, saying why. (Nodes confirm
    // within a heartbeat, so the first may have finished already: then the second is a new
    // rotation of its own, distributing a third key.)
    let m1 = managers.addrs[0].clone();
    let second = in_netns(&n1, move || {
        Box::pin(async move {
            Ok(pb::cluster_client::ClusterClient::new(channel(m1).await?)
                .rotate_gossip_key(pb::Empty {})
                .await)
        })
    })?;
    match &second {
        Err(status) => ensure!(
            status.message().contains("rotation is in progress"),
            "{status:?}"
        ),
        Ok(info) => {
            let info = info.get_ref();
            ensure!(
                info.gossip_rotation == "distributing"
                    && info.gossip_keys.len() == 2
                    && info.gossip_keys.iter().all(|k| started
                        .gossip_keys
                        .iter()
                        .all(|s| s.id != k.id)
                        || k.primary),
                "a second rotation was accepted although the first had not finished: {info:?} \
                 (first: {started:?})"
            );
        }
    }
    retry(
        "every node to seal with the rotated key, the old one retired",
        Duration::from_secs(60),
        || {
            let g = gossip(&topo)?;
            let keys = sealing_keys(&g);
            ensure!(
                keys[0].is_some_and(|k| k != first_key) && keys.iter().all(|k| *k == keys[0]),
                "sealing keys {keys:?} (first {first_key})"
            );
            ensure!(
                g.iter().all(
                    |g| g["accepted_keys"].as_array().is_some_and(|a| a.len() == 1)
                        && g["peers_live"].as_u64() == Some(2)
                ),
                "{g:?}"
            );
            Ok(())
        },
    )?;
    println!(
        "gossip key rotation: all three steps on every node in {:?}",
        rotation_started.elapsed()
    );
    let dropped_after = unknown_key(&gossip(&topo)?);
    ensure!(
        dropped_after == dropped_before,
        "frames sealed with a key a node lacked during the rotation: {} before, {} after",
        dropped_before,
        dropped_after
    );
    let m3 = managers.addrs[2].clone();
    let done = in_netns(&n1, move || {
        Box::pin(async move {
            Ok(pb::cluster_client::ClusterClient::new(channel(m3).await?)
                .info(pb::Empty {})
                .await?
                .into_inner())
        })
    })?;
    ensure!(
        done.gossip_rotation.is_empty()
            && done.gossip_keys.len() == 1
            && done.gossip_keys[0].primary,
        "rotation finished: {done:?}"
    );
    // Drain n3 while n1's task keeps calling the service: n3's task moves, and the service
    // answers throughout.
    let (_, client_task) = tasks.iter().find(|(n, _)| n == "n1").cloned().unwrap();
    let vip = topo
        .sandbox_exec("n1", &client_task, &["dig", "+short", "@127.0.0.11", "web"])?
        .check()?
        .stdout
        .trim()
        .to_string();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sandbox = topo.node("n1").sandbox_netns(&client_task);
    let load = {
        let stop = stop.clone();
        std::thread::spawn(move || -> (usize, Vec<String>) {
            let (mut ok, mut failed) = (0, Vec::new());
            while !stop.load(std::sync::atomic::Ordering::Relaxed) && ok + failed.len() < 2000 {
                let url = format!("http://{vip}/");
                match topo::run(
                    topo::nsenter_cmd(&sandbox, &["curl", "-sS", "-m", "2", &url]),
                    None,
                    Duration::from_secs(5),
                ) {
                    Ok(o) if o.success() => ok += 1,
                    Ok(o) => failed.push(o.stderr),
                    Err(e) => failed.push(e.to_string()),
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            (ok, failed)
        })
    };
    let m1 = managers.addrs[0].clone();
    in_netns(&n1, move || {
        Box::pin(async move {
            pb::nodes_client::NodesClient::new(channel(m1).await?)
                .update(pb::UpdateNodeRequest {
                    id: "n3".into(),
                    availability: "drain".into(),
                    ..Default::default()
                })
                .await?;
            Ok(())
        })
    })?;
    let m1 = managers.addrs[0].clone();
    retry(
        "n3's task to run elsewhere",
        Duration::from_secs(60),
        || {
            let m1 = m1.clone();
            let placed = in_netns(&n1, move || {
                Box::pin(async move {
                    let ps = pb::services_client::ServicesClient::new(channel(m1).await?)
                        .ps(pb::NameRef { name: "web".into() })
                        .await?
                        .into_inner();
                    Ok(ps
                        .tasks
                        .into_iter()
                        .map(|t| (t.node, t.state))
                        .collect::<Vec<_>>())
                })
            })?;
            ensure!(
                placed.len() == 3 && placed.iter().all(|(n, s)| n != "n3" && s == "running"),
                "{placed:?}"
            );
            Ok(())
        },
    )?;
    // Keep calling a while after the move, so the bound below covers the settled state too.
    std::thread::sleep(Duration::from_secs(3));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (ok, failed) = load.join().map_err(|p| anyhow!("load thread: {p:?}"))?;
    eprintln!(
        "during the drain: {ok} answered, {} failed: {failed:?}",
        failed.len()
    );
    ensure!(ok > 10, "too few requests ran during the drain: {ok}");
    // The removal is two-phase: the drained task first leaves every node's load balancer and
    // DNS (still running), and is stopped only after the grace period; its replacement is a
    // backend only once gossip holds it live. Not one request may fail.
    ensure!(
        failed.is_empty(),
        "requests failed during the drain: {failed:?}"
    );
    // Every manager stopped: the data plane keeps serving names and VIPs (from the tasks that
    // stayed where they were).
    for p in &mut managers.procs {
        drop(p.take());
    }
    tasks.retain(|(n, _)| n != "n3");
    check(&topo, &tasks)?;
    Ok(())
}
