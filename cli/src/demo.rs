//! `swarmnet lab demo`: the README's main command. Builds a 3-node lab, an overlay network, a
//! `web` service of 3 replicas of the demo server (`swarmnet-whoami`) published on 8080 and a
//! client task; then shows, from inside the client, `web` and `tasks.web` resolved, requests
//! through the VIP reaching every replica, and the published port answering on every node
//! (including one with no task of its own when there is one); prints a summary and leaves the
//! lab up (or removes it with `--down`).
//!
//! Every check is a real client (dig, curl) in a real namespace; the demo fails (exit 1) when one
//! does not hold, saying which.

use std::collections::BTreeSet;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context as _, anyhow, bail};
use serde::Serialize;
use swarmnet_api as pb;

use crate::api::Managers;
use crate::commands::tasks_of;
use crate::error::{CliError, Result};
use crate::lab::{self, LabState};
use crate::progress::Progress;
use crate::render::TaskView;
use crate::task;

const WAIT: Duration = Duration::from_secs(60);

/// What the demo saw.
#[derive(Debug, Clone, Serialize)]
pub struct DemoReport {
    pub lab: String,
    pub vip: String,
    /// `dig +short web` from the client.
    pub web_resolves_to: Vec<String>,
    /// `dig +short tasks.web`.
    pub tasks_web_resolves_to: Vec<String>,
    /// Replicas (task ids) that answered through the VIP, and how many requests it took.
    pub replicas_answering: Vec<String>,
    pub requests: usize,
    /// Node -> the replica that answered on `<node>:8080`.
    pub published_port: Vec<(String, String)>,
    /// Nodes that run no `web` replica (the mesh forwards for them).
    pub nodes_without_web: Vec<String>,
    pub removed: bool,
}

pub fn text(r: &DemoReport) -> String {
    let mut out = format!("swarmnet demo on lab {}\n", r.lab);
    out.push_str(&format!(
        "  web            -> {} (the VIP)\n",
        r.web_resolves_to.join(" ")
    ));
    out.push_str(&format!(
        "  tasks.web      -> {}\n",
        r.tasks_web_resolves_to.join(" ")
    ));
    out.push_str(&format!(
        "  http://web/    -> {} replicas answered in {} requests\n",
        r.replicas_answering.len(),
        r.requests
    ));
    for (node, who) in &r.published_port {
        let note = if r.nodes_without_web.contains(node) {
            " (no web task on this node)"
        } else {
            ""
        };
        out.push_str(&format!(
            "  {:<14} -> answered by {who}{note}\n",
            format!("{node}:8080")
        ));
    }
    if r.removed {
        out.push_str("lab removed\n");
    } else {
        out.push_str(&format!(
            "the lab stays up: try `swarmnet service ps web`, `swarmnet task exec client.1 -- curl -s web`,\n\
             `swarmnet inspect network app`; remove it with `swarmnet lab down --name {}`\n",
            r.lab
        ));
    }
    out
}

fn poll<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> anyhow::Result<T> {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return Ok(v);
        }
        if start.elapsed() > WAIT {
            bail!("{what} did not happen within {}s", WAIT.as_secs());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Runs `cmd` inside task `t`'s namespaces and captures stdout.
fn in_task(lab: &LabState, t: &TaskView, cmd: &[&str]) -> anyhow::Result<String> {
    let pid = task::live_pid(&lab.node(&t.node)?.run_dir, t)?;
    let out = Command::new("nsenter")
        .arg(format!("--target={pid}"))
        .args(["--net", "--mount", "--"])
        .args(cmd)
        .output()
        .context("running nsenter")?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn task_line(out: &str) -> Option<String> {
    out.lines()
        .find_map(|l| l.strip_prefix("task: "))
        .map(|s| s.trim().to_owned())
}

pub fn run(
    name: &str,
    down: bool,
    config_dir: &std::path::Path,
    progress: &mut Progress,
) -> Result<DemoReport> {
    let state = lab::up(name, 3, 1, progress)?;
    crate::lab_context(&state).save_current(config_dir)?;
    let fail = |e: anyhow::Error| {
        CliError::lab(
            name,
            format!(
                "the lab stays up for a look (`swarmnet lab status --name {name}`); remove it with `swarmnet lab down --name {name}`"
            ),
            e,
        )
    };
    let report = demo(&state, progress).map_err(fail)?;
    let removed = if down {
        lab::down(name, progress)?;
        crate::context::Context::remove(config_dir, name);
        lab::remove_empty_parents();
        true
    } else {
        false
    };
    Ok(DemoReport { removed, ..report })
}

fn demo(state: &LabState, progress: &mut Progress) -> anyhow::Result<DemoReport> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let mut m = Managers::new(
        state
            .nodes
            .iter()
            .filter(|n| n.manager)
            .map(lab::LabNode::manager_endpoint)
            .collect(),
    );
    let whoami = lab::sibling_binary("swarmnet-whoami")?;
    progress.step("network app");
    rt.block_on(m.call(|ch| async move {
        pb::networks_client::NetworksClient::new(ch)
            .create(pb::NetworkCreate {
                name: "app".into(),
                ..Default::default()
            })
            .await
    }))?;
    let service =
        |name: &str, replicas: u32, argv: Vec<String>, ports: Vec<pb::Port>| pb::ServiceSpec {
            name: name.into(),
            replicas,
            ports,
            // n3 runs no replica, so that the routing mesh shows on a node without a task.
            constraints: if name == "web" {
                vec!["node.hostname!=n3".into()]
            } else {
                vec![]
            },
            networks: vec![pb::ServiceNetwork {
                network: "app".into(),
                aliases: vec![],
            }],
            argv,
            ..Default::default()
        };
    let web = service(
        "web",
        3,
        vec![whoami.display().to_string(), "--port".into(), "80".into()],
        vec![pb::Port {
            protocol: "tcp".into(),
            target: 80,
            publish: "8080".into(),
            ..Default::default()
        }],
    );
    let client = service(
        "client",
        1,
        vec!["/bin/sleep".into(), "infinity".into()],
        vec![],
    );
    for spec in [web, client] {
        progress.step(&format!("service {}", spec.name));
        let created = rt.block_on(m.call(|ch| {
            let spec = spec.clone();
            async move {
                pb::services_client::ServicesClient::new(ch)
                    .create(spec)
                    .await
            }
        }))?;
        let vips: Vec<String> = created.vips.values().cloned().collect();
        progress.step(&format!("  VIPs {}", vips.join(", ")));
    }
    let vip = rt
        .block_on(m.call(|ch| async move {
            pb::services_client::ServicesClient::new(ch)
                .inspect(pb::NameRef { name: "web".into() })
                .await
        }))?
        .vips
        .get("app")
        .cloned()
        .ok_or_else(|| anyhow!("web has no VIP on app"))?;
    let mut tasks = rt.block_on(tasks_of(&mut m, ""))?;
    tasks.retain(|t| t.desired_state != "shutdown");
    progress.step("waiting for the 4 task processes to run on their nodes");
    poll("every task process to start", || {
        tasks
            .iter()
            .all(|t| {
                state
                    .node(&t.node)
                    .is_ok_and(|n| task::live_pid(&n.run_dir, t).is_ok())
            })
            .then_some(())
    })?;
    let client = tasks
        .iter()
        .find(|t| t.service == "client")
        .ok_or_else(|| anyhow!("no client task"))?;
    let web: Vec<&TaskView> = tasks.iter().filter(|t| t.service == "web").collect();
    let web_ids: BTreeSet<String> = web.iter().map(|t| t.id.clone()).collect();
    let web_ips: BTreeSet<String> = web
        .iter()
        .filter_map(|t| t.addresses.get("app").cloned())
        .collect();

    progress.step("dig web, dig tasks.web (inside the client)");
    let dig = |name: &str| -> anyhow::Result<Vec<String>> {
        Ok(in_task(state, client, &["dig", "+short", name])?
            .lines()
            .map(str::to_owned)
            .collect())
    };
    let web_resolves_to = poll("web to resolve to its VIP", || {
        dig("web").ok().filter(|a| a == std::slice::from_ref(&vip))
    })?;
    let tasks_web_resolves_to = poll("tasks.web to list every replica", || {
        dig("tasks.web")
            .ok()
            .filter(|a| a.iter().cloned().collect::<BTreeSet<_>>() == web_ips)
    })?;

    progress.step("curl http://web/ until every replica answered");
    let mut seen = BTreeSet::new();
    let mut requests = 0;
    while seen != web_ids && requests < 60 {
        requests += 1;
        let out = in_task(
            state,
            client,
            &["curl", "-s", "--max-time", "3", "http://web/"],
        )?;
        seen.extend(task_line(&out));
    }
    if seen != web_ids {
        bail!(
            "only {} of 3 replicas answered through the VIP in {requests} requests",
            seen.len()
        );
    }

    progress.step("the published port on every node");
    let mut published_port = Vec::new();
    for (i, node) in state.nodes.iter().enumerate() {
        let from = &state.nodes[(i + 1) % state.nodes.len()];
        let url = format!("http://{}:8080/", node.addr);
        let who = poll(&format!("{url} to answer (asked from {})", from.id), || {
            let out = Command::new("nsenter")
                .arg(format!("--net={}", from.netns_path().display()))
                .args(["--", "curl", "-s", "--max-time", "3", &url])
                .output()
                .ok()?;
            task_line(&String::from_utf8_lossy(&out.stdout))
        })?;
        published_port.push((node.id.clone(), who));
    }
    Ok(DemoReport {
        lab: state.name.clone(),
        vip,
        web_resolves_to,
        tasks_web_resolves_to,
        replicas_answering: seen.into_iter().collect(),
        requests,
        published_port,
        nodes_without_web: state
            .nodes
            .iter()
            .filter(|n| !web.iter().any(|t| t.node == n.id))
            .map(|n| n.id.clone())
            .collect(),
        removed: false,
    })
}
