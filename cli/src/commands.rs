//! The commands that talk to the managers: each maps to one or a few calls of the gRPC API
//! (through [`Managers`], with failover) and renders a view.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use pb::cluster_client::ClusterClient;
use pb::networks_client::NetworksClient;
use pb::nodes_client::NodesClient;
use pb::services_client::ServicesClient;
use swarmnet_api as pb;

use crate::api::{self, Managers};
use crate::args::{
    ClusterManagersCmd, InspectKind, NetworkCmd, NodeCmd, ServiceCmd, ServiceCreate, ServiceUpdate,
};
use crate::error::{CliError, Result};
use crate::inspect::Target;
use crate::progress::Progress;
use crate::render::{self, Format, TaskView};

/// How long `service create` / `scale` wait for the tasks to run before giving up.
pub const WAIT_TASKS: Duration = Duration::from_secs(90);

fn print<T: serde::Serialize + ?Sized>(
    format: Format,
    value: &T,
    table: impl FnOnce(&T) -> String,
) -> String {
    match format {
        Format::Table => table(value),
        Format::Json => render::json(value),
    }
}

pub async fn cluster(m: &mut Managers, cmd: ClusterManagersCmd, format: Format) -> Result<String> {
    match cmd {
        ClusterManagersCmd::Info => {
            let c = m.cluster().await?;
            Ok(print(format, &c, render::cluster_text))
        }
        ClusterManagersCmd::JoinToken { role, rotate } => {
            let tokens = if rotate {
                let role = role.clone();
                m.call(|ch| {
                    let role = role.clone();
                    async move {
                        ClusterClient::new(ch)
                            .rotate_join_token(pb::RotateJoinTokenRequest { role })
                            .await
                    }
                })
                .await?
            } else {
                m.call(|ch| async move { ClusterClient::new(ch).join_tokens(pb::Empty {}).await })
                    .await?
            };
            let token = if role == "manager" {
                tokens.manager
            } else {
                tokens.worker
            };
            let v = serde_json::json!({"role": role, "token": token});
            Ok(print(format, &v, |_| format!("{token}\n")))
        }
        ClusterManagersCmd::GossipKey { rotate } => {
            if rotate {
                m.call(|ch| async move {
                    ClusterClient::new(ch).rotate_gossip_key(pb::Empty {}).await
                })
                .await?;
            }
            let c = m.cluster().await?;
            let v = serde_json::json!({
                "gossip_keys": c.gossip_keys,
                "gossip_rotation": c.gossip_rotation,
            });
            Ok(print(format, &v, |_| render::gossip_keys_text(&c)))
        }
    }
}

pub async fn node(m: &mut Managers, cmd: NodeCmd, format: Format) -> Result<String> {
    match cmd {
        NodeCmd::Ls => {
            let list = m
                .call(|ch| async move { NodesClient::new(ch).list(pb::Empty {}).await })
                .await?;
            let cluster = m.cluster().await?;
            let mut nodes: Vec<_> = list
                .nodes
                .into_iter()
                .map(|n| api::node_view(n, &cluster))
                .collect();
            nodes.sort_by_key(|n| natural(&n.hostname));
            Ok(print(format, nodes.as_slice(), render::nodes_table))
        }
        NodeCmd::Update(u) => {
            if u.availability.is_none() && u.label_add.is_empty() && u.label_rm.is_empty() {
                return Err(CliError::usage(
                    "node update changes nothing",
                    "give --availability, --label-add K=V or --label-rm K",
                ));
            }
            let id = u.node.clone();
            let labels = if u.label_add.is_empty() && u.label_rm.is_empty() {
                None
            } else {
                let id = id.clone();
                let node = m
                    .call(|ch| {
                        let id = id.clone();
                        async move { NodesClient::new(ch).inspect(pb::NodeRef { id }).await }
                    })
                    .await?;
                let mut labels: BTreeMap<String, String> = node.labels.into_iter().collect();
                for k in &u.label_rm {
                    labels.remove(k);
                }
                labels.extend(u.label_add.iter().cloned());
                Some(labels)
            };
            let req = pb::UpdateNodeRequest {
                id,
                set_labels: labels.is_some(),
                labels: labels.unwrap_or_default().into_iter().collect(),
                availability: u.availability.unwrap_or_default(),
            };
            let n = m
                .call(|ch| {
                    let req = req.clone();
                    async move { NodesClient::new(ch).update(req).await }
                })
                .await?;
            Ok(format!("{}\n", n.id))
        }
        NodeCmd::Promote { node } => {
            let n = m
                .call(|ch| {
                    let id = node.clone();
                    async move { NodesClient::new(ch).promote(pb::NodeRef { id }).await }
                })
                .await?;
            Ok(format!("node {} is now a {}\n", n.id, n.role))
        }
        NodeCmd::Demote { node } => {
            let n = m
                .call(|ch| {
                    let id = node.clone();
                    async move { NodesClient::new(ch).demote(pb::NodeRef { id }).await }
                })
                .await?;
            Ok(format!("node {} is now a {}\n", n.id, n.role))
        }
        NodeCmd::Rm { node, force } => {
            m.call(|ch| {
                let id = node.clone();
                async move {
                    NodesClient::new(ch)
                        .remove(pb::RemoveNodeRequest { id, force })
                        .await
                }
            })
            .await?;
            Ok(format!("{node}\n"))
        }
    }
}

/// Sort key that puts `n2` before `n10`.
fn natural(s: &str) -> (String, u64) {
    let digits = s.len() - s.trim_end_matches(|c: char| c.is_ascii_digit()).len();
    let (head, tail) = s.split_at(s.len() - digits);
    (head.to_owned(), tail.parse().unwrap_or(0))
}

pub async fn network(m: &mut Managers, cmd: NetworkCmd, format: Format) -> Result<String> {
    match cmd {
        NetworkCmd::Create(c) => {
            let req = pb::NetworkCreate {
                name: c.name,
                subnet: c.subnet.map(|s| s.to_string()).unwrap_or_default(),
                gateway: c.gateway.map(|g| g.to_string()).unwrap_or_default(),
                mtu: 0,
                internal: c.internal,
                attachable: c.attachable,
            };
            let n = m
                .call(|ch| {
                    let req = req.clone();
                    async move { NetworksClient::new(ch).create(req).await }
                })
                .await?;
            let v = api::network_view(n);
            Ok(print(format, &v, |v| {
                format!("{} {} vni {}\n", v.name, v.subnet, v.vni)
            }))
        }
        NetworkCmd::Ls => {
            let list = m
                .call(|ch| async move { NetworksClient::new(ch).list(pb::Empty {}).await })
                .await?;
            let mut nets: Vec<_> = list.networks.into_iter().map(api::network_view).collect();
            nets.sort_by(|a, b| a.name.cmp(&b.name));
            Ok(print(format, nets.as_slice(), render::networks_table))
        }
        NetworkCmd::Rm { name } => {
            m.call(|ch| {
                let name = name.clone();
                async move { NetworksClient::new(ch).remove(pb::NameRef { name }).await }
            })
            .await?;
            Ok(format!("{name}\n"))
        }
    }
}

/// The API's service definition for `service create` (pure).
pub fn service_spec(c: &ServiceCreate) -> pb::ServiceSpec {
    pb::ServiceSpec {
        name: c.name.clone(),
        mode: c.mode.clone().unwrap_or_default(),
        replicas: match (&c.mode, c.replicas) {
            (Some(m), _) if m == "global" => 0,
            (_, Some(n)) => n,
            (_, None) => 1,
        },
        endpoint_mode: c.endpoint_mode.clone().unwrap_or_default(),
        ports: c.publish.iter().map(port_msg).collect(),
        networks: c
            .networks
            .iter()
            .map(|n| pb::ServiceNetwork {
                network: n.network.clone(),
                aliases: n.aliases.clone(),
            })
            .collect(),
        restart: c.restart.policy().unwrap_or_default().into(),
        restart_delay: c.restart.restart_delay.clone().unwrap_or_default(),
        affinity: String::new(),
        argv: c.cmd.clone(),
        env: c.env.iter().cloned().collect(),
        runtime: String::new(),
        constraints: c.constraints.clone(),
        update: None,
        health: health_config(&c.health, None),
    }
}

/// A `--publish` as the managers take it.
fn port_msg(p: &crate::args::Publish) -> pb::Port {
    pb::Port {
        name: String::new(),
        protocol: p.protocol.clone(),
        target: u32::from(p.target),
        publish: p.published.to_string(),
        publish_mode: p.mode.clone(),
        published: 0,
        traffic_policy: p.policy.clone(),
    }
}

/// The health check `flags` make of `current` (none on create): `--health-cmd` replaces the
/// command, the other flags one setting each. Settings without a command reach the managers
/// as such, and they refuse them naming `health.cmd`.
pub fn health_config(
    flags: &crate::args::HealthFlags,
    current: Option<pb::HealthConfig>,
) -> Option<pb::HealthConfig> {
    if !flags.any() {
        return current;
    }
    let mut h = current.unwrap_or_default();
    if let Some(cmd) = &flags.health_cmd {
        h.cmd = vec!["/bin/sh".into(), "-c".into(), cmd.clone()];
    }
    if let Some(v) = &flags.health_interval {
        h.interval = v.clone();
    }
    if let Some(v) = &flags.health_timeout {
        h.timeout = v.clone();
    }
    if flags.health_retries.is_some() {
        h.retries = flags.health_retries;
    }
    if let Some(v) = &flags.health_start_period {
        h.start_period = v.clone();
    }
    Some(h)
}

/// Applies `u` to the service's current definition (pure); `None` when nothing changes.
pub fn updated_spec(mut spec: pb::ServiceSpec, u: &ServiceUpdate) -> Option<pb::ServiceSpec> {
    let before = spec.clone();
    if let Some(n) = u.replicas {
        spec.replicas = n;
    }
    for k in &u.env_rm {
        spec.env.remove(k);
    }
    spec.env.extend(u.env_add.iter().cloned());
    spec.constraints.retain(|c| !u.constraint_rm.contains(c));
    for c in &u.constraint_add {
        if !spec.constraints.contains(c) {
            spec.constraints.push(c.clone());
        }
    }
    spec.ports.retain(|p| {
        let published = p
            .publish
            .parse::<u16>()
            .ok()
            .or(u16::try_from(p.published).ok());
        !published.is_some_and(|n| u.publish_rm.contains(&n))
    });
    spec.ports.extend(u.publish_add.iter().map(port_msg));
    if let Some(n) = u.update_parallelism {
        spec.update.get_or_insert_with(Default::default).parallelism = n;
    }
    spec.health = if u.no_healthcheck {
        None
    } else {
        health_config(&u.health, spec.health.take())
    };
    if let Some(p) = u.restart.policy() {
        spec.restart = p.into();
    }
    if let Some(d) = &u.restart.restart_delay {
        spec.restart_delay = d.clone();
    }
    if !u.cmd.is_empty() {
        spec.argv = u.cmd.clone();
    }
    (spec != before).then_some(spec)
}

pub async fn tasks_of(m: &mut Managers, name: &str) -> Result<Vec<TaskView>> {
    let list = m
        .call(|ch| {
            let name = name.to_owned();
            async move { ServicesClient::new(ch).ps(pb::NameRef { name }).await }
        })
        .await?;
    let mut tasks: Vec<TaskView> = list.tasks.into_iter().map(api::task_view).collect();
    tasks.sort_by(|a, b| (&a.service, a.slot, &a.node).cmp(&(&b.service, b.slot, &b.node)));
    Ok(tasks)
}

/// Polls until every desired task of `name` runs, printing each change of the counts.
async fn wait_running(m: &mut Managers, name: &str, progress: &mut Progress) -> Result<()> {
    let start = Instant::now();
    let mut last = None;
    loop {
        let s = m
            .call(|ch| {
                let name = name.to_owned();
                async move { ServicesClient::new(ch).inspect(pb::NameRef { name }).await }
            })
            .await?;
        let now = (s.tasks_running, s.tasks_desired);
        if last != Some(now) {
            progress.step(&format!("{name}: {}/{} tasks running", now.0, now.1));
            last = Some(now);
        }
        // A rolling update is done when the managers say so, not when the count is full (old
        // tasks count as running until replaced).
        match s.update_state.as_str() {
            "paused" | "rolled_back" => {
                return Err(CliError::Refused {
                    code: crate::error::RefusalKind::Other,
                    message: format!(
                        "the update of {name} is {}: {}",
                        s.update_state, s.update_message
                    ),
                });
            }
            "updating" | "waiting" | "rolling_back" => {}
            _ if s.tasks_running >= s.tasks_desired => return Ok(()),
            _ => {}
        }
        if start.elapsed() > WAIT_TASKS {
            let tasks = tasks_of(m, name).await?;
            let stuck: Vec<String> = tasks
                .iter()
                .filter(|t| t.state != "running")
                .map(|t| {
                    format!(
                        "{} on {}: {}{}",
                        t.name,
                        if t.node.is_empty() {
                            "no node"
                        } else {
                            &t.node
                        },
                        t.state,
                        if t.message.is_empty() {
                            String::new()
                        } else {
                            format!(" ({})", t.message)
                        }
                    )
                })
                .collect();
            return Err(CliError::TasksNotRunning {
                service: name.to_owned(),
                waited: WAIT_TASKS,
                stuck: stuck.join("; "),
            });
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

pub async fn service(
    m: &mut Managers,
    cmd: ServiceCmd,
    format: Format,
    progress: &mut Progress,
) -> Result<String> {
    match cmd {
        ServiceCmd::Create(c) => {
            let spec = service_spec(&c);
            let s = m
                .call(|ch| {
                    let spec = spec.clone();
                    async move { ServicesClient::new(ch).create(spec).await }
                })
                .await?;
            let v = api::service_view(s);
            progress.step(&format!("service {} created", v.name));
            if !c.detach {
                wait_running(m, &v.name, progress).await?;
            }
            Ok(format!("{}\n", v.name))
        }
        ServiceCmd::Ls => {
            let list = m
                .call(|ch| async move { ServicesClient::new(ch).list(pb::Empty {}).await })
                .await?;
            let mut svcs: Vec<_> = list.services.into_iter().map(api::service_view).collect();
            svcs.sort_by(|a, b| a.name.cmp(&b.name));
            Ok(print(format, svcs.as_slice(), render::services_table))
        }
        ServiceCmd::Ps { name } => {
            // The service must exist: an empty list would hide a typo.
            m.call(|ch| {
                let name = name.clone();
                async move { ServicesClient::new(ch).inspect(pb::NameRef { name }).await }
            })
            .await?;
            let tasks = tasks_of(m, &name).await?;
            Ok(print(format, tasks.as_slice(), render::tasks_table))
        }
        ServiceCmd::Scale { targets, detach } => {
            let mut out = String::new();
            for (name, replicas) in targets {
                m.call(|ch| {
                    let name = name.clone();
                    async move {
                        ServicesClient::new(ch)
                            .scale(pb::ScaleRequest { name, replicas })
                            .await
                    }
                })
                .await?;
                progress.step(&format!("{name} scaled to {replicas}"));
                if !detach {
                    wait_running(m, &name, progress).await?;
                }
                out.push_str(&format!("{name}={replicas}\n"));
            }
            Ok(out)
        }
        ServiceCmd::Update(u) => {
            let current = m
                .call(|ch| {
                    let name = u.name.clone();
                    async move { ServicesClient::new(ch).inspect(pb::NameRef { name }).await }
                })
                .await?;
            let Some(spec) = updated_spec(current.spec.unwrap_or_default(), &u) else {
                return Err(CliError::usage(
                    format!("service update {} changes nothing", u.name),
                    "give at least one change, e.g. --replicas N or --env-add K=V",
                ));
            };
            m.call(|ch| {
                let spec = spec.clone();
                async move { ServicesClient::new(ch).update(spec).await }
            })
            .await?;
            progress.step(&format!("{} updated", u.name));
            if !u.detach {
                wait_running(m, &u.name, progress).await?;
            }
            Ok(format!("{}\n", u.name))
        }
        ServiceCmd::Rm { name } => {
            m.call(|ch| {
                let name = name.clone();
                async move { ServicesClient::new(ch).remove(pb::NameRef { name }).await }
            })
            .await?;
            Ok(format!("{name}\n"))
        }
    }
}

/// What the managers hold for `inspect`: the object's record, its tasks, what to select from
/// each netd, and the nodes to ask.
pub async fn inspect_intent(
    m: &mut Managers,
    kind: InspectKind,
    name: &str,
) -> Result<(serde_json::Value, Vec<TaskView>, Target, Vec<String>)> {
    let json = |v: &dyn erased::Ser| v.to_json();
    match kind {
        InspectKind::Node => {
            let node = m
                .call(|ch| {
                    let id = name.to_owned();
                    async move { NodesClient::new(ch).inspect(pb::NodeRef { id }).await }
                })
                .await?;
            let cluster = m.cluster().await?;
            let v = api::node_view(node, &cluster);
            let id = v.id.clone();
            Ok((json(&v), vec![], Target::Node, vec![id]))
        }
        InspectKind::Network => {
            let n = m
                .call(|ch| {
                    let name = name.to_owned();
                    async move { NetworksClient::new(ch).inspect(pb::NameRef { name }).await }
                })
                .await?;
            let v = api::network_view(n);
            let nodes = all_nodes(m).await?;
            Ok((
                json(&v),
                vec![],
                Target::Network {
                    name: name.to_owned(),
                },
                nodes,
            ))
        }
        InspectKind::Service => {
            let s = m
                .call(|ch| {
                    let name = name.to_owned();
                    async move { ServicesClient::new(ch).inspect(pb::NameRef { name }).await }
                })
                .await?;
            let v = api::service_view(s);
            let tasks = tasks_of(m, name).await?;
            let nodes = all_nodes(m).await?;
            let ids = tasks
                .iter()
                .filter(|t| t.desired_state != "shutdown")
                .map(|t| t.id.clone())
                .collect();
            Ok((
                json(&v),
                tasks,
                Target::Service {
                    name: name.to_owned(),
                    tasks: ids,
                },
                nodes,
            ))
        }
        InspectKind::Task => {
            let tasks = tasks_of(m, "").await?;
            let t = crate::task::find(&tasks, name)?.clone();
            let nodes = if t.node.is_empty() {
                vec![]
            } else {
                vec![t.node.clone()]
            };
            Ok((json(&t), vec![t.clone()], Target::Task { id: t.id }, nodes))
        }
    }
}

/// Every node's id, in natural order.
async fn all_nodes(m: &mut Managers) -> Result<Vec<String>> {
    let list = m
        .call(|ch| async move { NodesClient::new(ch).list(pb::Empty {}).await })
        .await?;
    let mut ids: Vec<String> = list.nodes.into_iter().map(|n| n.id).collect();
    ids.sort_by_key(|s| natural(s));
    Ok(ids)
}

/// Object-safe JSON conversion of the views.
mod erased {
    pub trait Ser {
        fn to_json(&self) -> serde_json::Value;
    }
    impl<T: serde::Serialize> Ser for T {
        fn to_json(&self) -> serde_json::Value {
            serde_json::to_value(self).expect("views serialize")
        }
    }
}

/// `cluster init` on the context's first manager (the lab does this itself).
pub async fn init(m: &mut Managers, req: pb::InitRequest) -> Result<pb::ClusterInfo> {
    m.call(|ch| {
        let req = req.clone();
        async move { ClusterClient::new(ch).init(req).await }
    })
    .await
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;
    use crate::args::{Cli, Cmd};

    fn create(args: &[&str]) -> ServiceCreate {
        let cli = Cli::try_parse_from(
            ["swarmnet", "service", "create"]
                .iter()
                .chain(args)
                .copied(),
        )
        .unwrap();
        match cli.cmd {
            Cmd::Service(ServiceCmd::Create(c)) => c,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn service_spec_from_flags() {
        let s = service_spec(&create(&[
            "--name",
            "web",
            "--replicas",
            "3",
            "--network",
            "app,alias=www",
            "-p",
            "mode=host,8080:80/udp",
            "--endpoint-mode",
            "dnsrr",
            "--constraint",
            "node.role==worker",
            "-e",
            "A=1",
            "--",
            "swarmnet-whoami",
            "--port",
            "80",
        ]));
        assert_eq!(s.name, "web");
        assert_eq!((s.mode.as_str(), s.replicas), ("", 3));
        assert_eq!(s.endpoint_mode, "dnsrr");
        assert_eq!(s.networks[0].network, "app");
        assert_eq!(s.networks[0].aliases, ["www"]);
        let p = &s.ports[0];
        assert_eq!(
            (
                p.protocol.as_str(),
                p.target,
                p.publish.as_str(),
                p.publish_mode.as_str()
            ),
            ("udp", 80, "8080", "host")
        );
        assert_eq!(s.constraints, ["node.role==worker"]);
        assert_eq!(s.env.get("A").map(String::as_str), Some("1"));
        assert_eq!(s.argv, ["swarmnet-whoami", "--port", "80"]);
    }

    #[test]
    fn global_mode_and_default_replicas() {
        let g = service_spec(&create(&["--name", "g", "--mode", "global", "--", "true"]));
        assert_eq!((g.mode.as_str(), g.replicas), ("global", 0));
        let d = service_spec(&create(&["--name", "d", "--", "true"]));
        assert_eq!((d.mode.as_str(), d.replicas), ("", 1));
    }

    #[test]
    fn health_flags_make_a_check_and_update_changes_or_removes_it() {
        let s = service_spec(&create(&[
            "--name",
            "web",
            "--health-cmd",
            "test -f /tmp/ok",
            "--health-interval",
            "500ms",
            "--health-retries",
            "2",
            "--health-timeout",
            "1.5s",
            "--health-start-period",
            "90s",
            "--",
            "true",
        ]));
        let h = s.health.clone().unwrap();
        assert_eq!(h.cmd, ["/bin/sh", "-c", "test -f /tmp/ok"]);
        assert_eq!(
            (
                h.interval.as_str(),
                h.timeout.as_str(),
                h.retries,
                h.start_period.as_str()
            ),
            ("500ms", "1s500ms", Some(2), "1m30s")
        );
        assert!(
            service_spec(&create(&["--name", "d", "--", "true"]))
                .health
                .is_none()
        );
        let update = |args: &[&str]| -> Option<pb::ServiceSpec> {
            let cli = Cli::try_parse_from(
                ["swarmnet", "service", "update", "web"]
                    .iter()
                    .chain(args)
                    .copied(),
            )
            .unwrap();
            match cli.cmd {
                Cmd::Service(ServiceCmd::Update(u)) => updated_spec(s.clone(), &u),
                other => panic!("{other:?}"),
            }
        };
        let u = update(&["--health-retries", "5"]).unwrap().health.unwrap();
        assert_eq!(
            (u.retries, u.cmd.len(), u.interval.as_str()),
            (Some(5), 3, "500ms")
        );
        assert!(update(&["--no-healthcheck"]).unwrap().health.is_none());
        assert!(
            update(&["--health-interval", "500ms"]).is_none(),
            "no change"
        );
        // Bad values are usage errors, named.
        for (flag, value, says) in [
            ("--health-retries", "0", "at least 1"),
            ("--health-interval", "5", "needs a unit"),
            ("--health-timeout", "5x", "unknown unit"),
        ] {
            let e = Cli::try_parse_from([
                "swarmnet", "service", "create", "--name", "x", flag, value, "--", "true",
            ])
            .unwrap_err();
            assert_eq!(e.exit_code(), 2, "{flag} {value}");
            assert!(e.to_string().contains(says), "{flag} {value}: {e}");
        }
    }

    #[test]
    fn restart_flags_reach_the_spec_in_the_managers_words() {
        let s = service_spec(&create(&[
            "--name",
            "web",
            "--restart-condition",
            "on-failure",
            "--restart-delay",
            "1m30s",
            "--",
            "true",
        ]));
        assert_eq!(
            (s.restart.as_str(), s.restart_delay.as_str()),
            ("on_failure", "1m30s")
        );
        let d = service_spec(&create(&["--name", "d", "--", "true"]));
        assert_eq!(
            (d.restart.as_str(), d.restart_delay.as_str()),
            ("", ""),
            "unset: the managers' defaults (any, 5s)"
        );
        let update = |args: &[&str]| -> Option<pb::ServiceSpec> {
            let cli = Cli::try_parse_from(
                ["swarmnet", "service", "update", "web"]
                    .iter()
                    .chain(args)
                    .copied(),
            )
            .unwrap();
            match cli.cmd {
                Cmd::Service(ServiceCmd::Update(u)) => updated_spec(s.clone(), &u),
                other => panic!("{other:?}"),
            }
        };
        let u = update(&["--restart-condition", "none", "--restart-delay", "0s"]).unwrap();
        assert_eq!(
            (u.restart.as_str(), u.restart_delay.as_str()),
            ("never", "0s")
        );
        assert!(update(&["--restart-delay", "90s"]).is_none(), "no change");
        for (flag, value) in [
            ("--restart-delay", "5"),
            ("--restart-condition", "sometimes"),
        ] {
            let e = Cli::try_parse_from([
                "swarmnet", "service", "create", "--name", "x", flag, value, "--", "true",
            ])
            .unwrap_err();
            assert_eq!(e.exit_code(), 2, "{flag} {value}");
        }
    }

    #[test]
    fn replicas_and_global_conflict() {
        let r = Cli::try_parse_from([
            "swarmnet",
            "service",
            "create",
            "--name",
            "x",
            "--replicas",
            "2",
            "--mode",
            "global",
            "--",
            "true",
        ]);
        assert!(r.is_err());
    }

    #[test]
    fn update_applies_each_change_and_refuses_none() {
        let base = service_spec(&create(&[
            "--name",
            "web",
            "--replicas",
            "2",
            "-p",
            "8080:80",
            "-e",
            "A=1",
            "--constraint",
            "node.role==worker",
            "--",
            "old",
        ]));
        let parse = |args: &[&str]| -> ServiceUpdate {
            let cli = Cli::try_parse_from(
                ["swarmnet", "service", "update"]
                    .iter()
                    .chain(args)
                    .copied(),
            )
            .unwrap();
            match cli.cmd {
                Cmd::Service(ServiceCmd::Update(u)) => u,
                other => panic!("{other:?}"),
            }
        };
        assert!(updated_spec(base.clone(), &parse(&["web"])).is_none());
        assert!(updated_spec(base.clone(), &parse(&["web", "--replicas", "2"])).is_none());
        let s = updated_spec(
            base,
            &parse(&[
                "web",
                "--replicas",
                "5",
                "--env-rm",
                "A",
                "--env-add",
                "B=2",
                "--constraint-rm",
                "node.role==worker",
                "--constraint-add",
                "node.labels.zone==a",
                "--publish-rm",
                "8080",
                "--publish-add",
                "9090:90/udp",
                "--update-parallelism",
                "2",
                "--",
                "new",
            ]),
        )
        .unwrap();
        assert_eq!(s.replicas, 5);
        assert_eq!(s.env.len(), 1);
        assert_eq!(s.env.get("B").map(String::as_str), Some("2"));
        assert_eq!(s.constraints, ["node.labels.zone==a"]);
        assert_eq!(s.ports.len(), 1);
        assert_eq!(
            (s.ports[0].publish.as_str(), s.ports[0].target),
            ("9090", 90)
        );
        assert_eq!(s.update.unwrap().parallelism, 2);
        assert_eq!(s.argv, ["new"]);
    }

    #[test]
    fn natural_order() {
        let mut v = vec!["n10", "n2", "n1", "m3"];
        v.sort_by_key(|s| natural(s));
        assert_eq!(v, ["m3", "n1", "n2", "n10"]);
    }
}
