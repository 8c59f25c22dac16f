//! With the orchestrator (one manager on n1, netd on three nodes taking their intent from it):
//! a task whose health check turns unhealthy, and a task whose process exits, are reported by
//! their node, replaced by the manager in the same slot, and `ps` keeps the replaced task with
//! why (issue 7: "an unhealthy one is replaced", task states reported by netd).
//!
//! The checks and exits are driven by files the test creates, named after the task id the
//! manager gave, so only that one task turns sick or exits and its replacement does not.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use swarmnet_api as pb;
use swarmnet_tests_netns::gate;
use swarmnet_tests_netns::topo::{self, Bg, Topology, retry};

mod common;
use common::{channel, in_netns, orchestrator_binary};

const PORT: u16 = 4243;

fn ps(n1: &Path, addr: &str, service: &str) -> Result<Vec<pb::Task>> {
    let (addr, service) = (addr.to_string(), service.to_string());
    in_netns(n1, move || {
        Box::pin(async move {
            Ok(
                pb::services_client::ServicesClient::new(channel(addr).await?)
                    .ps(pb::NameRef { name: service })
                    .await?
                    .into_inner()
                    .tasks,
            )
        })
    })
}

fn live(tasks: &[pb::Task], slot: u32) -> Option<&pb::Task> {
    tasks
        .iter()
        .find(|t| t.slot == slot && t.desired_state == "running")
}

fn show(tasks: &[pb::Task]) -> String {
    tasks
        .iter()
        .map(|t| {
            format!(
                "{} slot {} on {} desired {} state {} health {:?} {:?}",
                t.id, t.slot, t.node, t.desired_state, t.state, t.health, t.message
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn unhealthy_and_exited_tasks_are_replaced_and_ps_says_why() -> Result<()> {
    if !gate::privileged("unhealthy_and_exited_tasks_are_replaced_and_ps_says_why") {
        return Ok(());
    }
    let mut topo = Topology::new(3)?;
    let n1 = topo.node("n1").netns_path();
    let addr = format!("{}:{PORT}", topo.node("n1").addr);
    let data = topo.dir.join("manager");
    common::use_admin_of(&data)?;
    let bin = orchestrator_binary()?;
    let argv = [
        bin.to_str().context("utf-8 path")?,
        "--id",
        "1",
        "--listen",
        &addr,
        "--data-dir",
        data.to_str().context("utf-8 path")?,
        "--bootstrap",
    ];
    let cmd: Command = topo::nsenter_cmd(&n1, &argv);
    let _manager = Bg::spawn(cmd, None)?;
    let n1_addr = topo.node("n1").addr.to_string();
    let a = addr.clone();
    let token = retry(
        "the manager to take the init",
        Duration::from_secs(30),
        || {
            let (a, n1_addr) = (a.clone(), n1_addr.clone());
            in_netns(&n1, move || {
                Box::pin(async move {
                    let mut c = pb::cluster_client::ClusterClient::new(channel(a).await?);
                    c.init(pb::InitRequest {
                        cluster_id: "health".into(),
                        node: Some(pb::JoinNodeRequest {
                            id: "n1".into(),
                            addr: n1_addr,
                            role: "manager".into(),
                            ..Default::default()
                        }),
                        ..Default::default()
                    })
                    .await?;
                    Ok(())
                })
            })
        },
    )
    .and_then(|_| {
        let a = addr.clone();
        in_netns(&n1, move || {
            Box::pin(async move {
                let mut c = pb::cluster_client::ClusterClient::new(channel(a).await?);
                Ok(c.join_tokens(pb::Empty {}).await?.into_inner().worker)
            })
        })
    })?;
    for n in &mut topo.nodes {
        let node_addr = n.addr.to_string();
        n.spawn_netd(
            Path::new("/nonexistent"),
            &[
                "--managers",
                &addr,
                "--join-token",
                &token,
                "--advertise-addr",
                &node_addr,
            ],
        )?;
    }
    // Files that make one task sick or end it, by task id.
    let flags = topo.dir.join("flags");
    std::fs::create_dir_all(&flags)?;
    let check = format!("test ! -f {}/sick-$SWARMNET_TASK_ID", flags.display());
    let job = format!(
        "while [ ! -f {}/exit-$SWARMNET_TASK_ID ]; do sleep 0.2; done; exit 3",
        flags.display()
    );
    let web_argv = topo::whoami_argv()?;
    let a = addr.clone();
    retry("three nodes to join", Duration::from_secs(30), || {
        let a = a.clone();
        let n = in_netns(&n1, move || {
            Box::pin(async move {
                Ok(pb::nodes_client::NodesClient::new(channel(a).await?)
                    .list(pb::Empty {})
                    .await?
                    .into_inner()
                    .nodes
                    .len())
            })
        })?;
        ensure!(n == 3, "{n} nodes");
        Ok(())
    })?;
    let a = addr.clone();
    in_netns(&n1, move || {
        Box::pin(async move {
            let ch = channel(a).await?;
            pb::networks_client::NetworksClient::new(ch.clone())
                .create(pb::NetworkCreate {
                    name: "app".into(),
                    ..Default::default()
                })
                .await?;
            let mut s = pb::services_client::ServicesClient::new(ch);
            let net = vec![pb::ServiceNetwork {
                network: "app".into(),
                aliases: vec![],
            }];
            s.create(pb::ServiceSpec {
                name: "web".into(),
                replicas: 2,
                argv: web_argv,
                networks: net.clone(),
                ports: vec![pb::Port {
                    target: 80,
                    ..Default::default()
                }],
                health: Some(pb::HealthConfig {
                    cmd: vec!["/bin/sh".into(), "-c".into(), check],
                    interval: "300ms".into(),
                    timeout: "2s".into(),
                    retries: Some(2),
                    start_period: String::new(),
                }),
                ..Default::default()
            })
            .await?;
            s.create(pb::ServiceSpec {
                name: "job".into(),
                replicas: 1,
                argv: vec!["/bin/sh".into(), "-c".into(), job],
                networks: net.clone(),
                restart_delay: "6s".into(),
                ..Default::default()
            })
            .await?;
            // Crashes at once, every time: replaced at the pace of the default restart delay.
            s.create(pb::ServiceSpec {
                name: "crash".into(),
                replicas: 1,
                argv: vec!["/bin/sh".into(), "-c".into(), "exit 4".into()],
                networks: net,
                ..Default::default()
            })
            .await?;
            Ok(())
        })
    })?;

    // Every task runs; web's are healthy as their nodes report.
    let settle = Duration::from_secs(90);
    retry("web healthy and job running", settle, || {
        let web = ps(&n1, &addr, "web")?;
        ensure!(
            web.len() == 2
                && web
                    .iter()
                    .all(|t| t.state == "running" && t.health == "healthy"),
            "web:\n{}",
            show(&web)
        );
        let job = ps(&n1, &addr, "job")?;
        ensure!(
            job.len() == 1 && job[0].state == "running" && job[0].health.is_empty(),
            "job:\n{}",
            show(&job)
        );
        Ok(())
    })?;

    // web slot 1 turns unhealthy: replaced, and ps says why.
    let sick = live(&ps(&n1, &addr, "web")?, 1)
        .context("web slot 1")?
        .clone();
    std::fs::write(flags.join(format!("sick-{}", sick.id)), "")?;
    let t0 = Instant::now();
    retry("the unhealthy task to be replaced", settle, || {
        let web = ps(&n1, &addr, "web")?;
        let old = web
            .iter()
            .find(|t| t.id == sick.id)
            .with_context(|| format!("{} gone from ps:\n{}", sick.id, show(&web)))?;
        ensure!(
            old.desired_state == "shutdown"
                && old.state == "failed"
                && old.health == "unhealthy"
                && old
                    .message
                    .starts_with("unhealthy: health check failed 2 times in a row"),
            "the sick task:\n{}",
            show(&web)
        );
        let new = live(&web, 1).context("no live slot 1")?;
        ensure!(
            new.id != sick.id && new.state == "running" && new.health == "healthy",
            "slot 1:\n{}",
            show(&web)
        );
        Ok(())
    })?;
    eprintln!(
        "unhealthy task {} replaced by a healthy one {:?} after its check began failing",
        sick.id,
        t0.elapsed()
    );

    // The job's process exits with 3: replaced, and ps says how it ended.
    let ended = live(&ps(&n1, &addr, "job")?, 1)
        .context("job slot 1")?
        .clone();
    std::fs::write(flags.join(format!("exit-{}", ended.id)), "")?;
    // First it waits out its 6 s restart delay, keeping its slot, and ps says so.
    retry(
        "the exited task to wait for its restart delay",
        settle,
        || {
            let job = ps(&n1, &addr, "job")?;
            ensure!(
                job.iter().any(|t| t.id == ended.id
                    && t.desired_state == "running"
                    && t.state == "failed"
                    && t.message == "exit code 3; replaced after the 6s restart delay"),
                "the ended task, waiting:\n{}",
                show(&job)
            );
            ensure!(job.len() == 1, "no replacement yet:\n{}", show(&job));
            Ok(())
        },
    )?;
    retry("the exited task to be replaced", settle, || {
        let job = ps(&n1, &addr, "job")?;
        let old = job
            .iter()
            .find(|t| t.id == ended.id)
            .with_context(|| format!("{} gone from ps:\n{}", ended.id, show(&job)))?;
        ensure!(
            old.desired_state == "shutdown"
                && old.state == "failed"
                && old.message == "exit code 3",
            "the ended task:\n{}",
            show(&job)
        );
        let new = live(&job, 1).context("no live slot 1")?;
        ensure!(
            new.id != ended.id && new.state == "running",
            "slot 1:\n{}",
            show(&job)
        );
        Ok(())
    })?;
    // A task that crashes on start is replaced at the pace of the restart delay (5 s by
    // default), not as fast as its node reports (about three a second before the delay).
    let ended_count = || -> Result<usize> {
        Ok(ps(&n1, &addr, "crash")?
            .iter()
            .filter(|t| t.state == "failed")
            .count())
    };
    retry("the crashing task to end once", settle, || {
        ensure!(ended_count()? >= 1, "{}", show(&ps(&n1, &addr, "crash")?));
        Ok(())
    })?;
    let before = ended_count()?;
    let window = Duration::from_secs(6);
    std::thread::sleep(window);
    let after = ended_count()?;
    ensure!(
        after - before <= 2,
        "{} crashed tasks ended within {window:?} with a 5 s restart delay:\n{}",
        after - before,
        show(&ps(&n1, &addr, "crash")?)
    );
    // The replaced tasks are gone from their nodes (their sandboxes removed).
    retry("the replaced sandboxes to go", settle, || {
        for id in [&sick.id, &ended.id] {
            for n in &topo.nodes {
                ensure!(
                    !n.sandbox_netns(id).exists(),
                    "{id}'s sandbox is still on {}",
                    n.id
                );
            }
        }
        Ok(())
    })?;
    Ok(())
}
