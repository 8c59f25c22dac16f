//! Projection of the cluster state to the intent netd consumes: a `model::spec::ClusterSpec`,
//! the same document netd reads from its intent file, so netd's own projection is unchanged.
//!
//! Every node receives the whole cluster's intent (it needs remote tasks as load-balancer
//! backends, DNS answers and FDB entries) and picks its own tasks by node id. What is left out:
//! tasks still pending (no node or no address yet: nothing to run, nothing to answer for),
//! tasks that ended (failed or complete: waiting for their restart delay, or kept as they are
//! by a `never` policy; their node removes what is left of them), and,
//! during a rolling update, an old task's attachment to a network its service has left (its
//! interface goes; the task itself is replaced soon). A draining task (the first phase of its
//! removal) is sent as `desired_state: draining`: it keeps running where it is, and no node
//! balances to it or answers for it any more. A task placed but not yet reported running by
//! its node is sent as `starting`: its node sets it up, no node sends it connections yet.

use swarmnet_model::spec::{
    ClusterSpec, DesiredState, NetworkSpec, NodeSpec, ServiceNetwork, ServiceSpec, TaskAttachment,
    TaskSpec,
};

use crate::state::{ClusterState, TaskState};

/// The intent of the whole cluster, as every node's netd receives it.
pub fn project(state: &ClusterState) -> ClusterSpec {
    let nodes = state
        .nodes
        .values()
        .map(|n| NodeSpec {
            id: n.id.clone(),
            hostname: Some(n.hostname.clone()),
            addr: n.addr,
            labels: n.labels.clone(),
            role: n.role,
            availability: n.availability,
            data_interface: n.data_interface.clone(),
            ingress_ip: n.ingress_ip,
        })
        .collect();
    let networks = state
        .networks
        .values()
        .map(|n| NetworkSpec {
            id: None,
            name: n.name.clone(),
            subnet: n.subnet,
            gateway: Some(n.gateway),
            vni: n.vni,
            mtu: n.mtu,
            internal: n.internal,
            attachable: n.attachable,
            ingress: n.ingress,
        })
        .collect();
    let services = state
        .services
        .values()
        .map(|s| {
            let mut networks: Vec<ServiceNetwork> = s
                .def
                .networks
                .iter()
                .map(|n| ServiceNetwork {
                    network: n.network.clone(),
                    aliases: n.aliases.clone(),
                    vip: s.vips.get(&n.network).copied(),
                })
                .collect();
            // The ingress VIP: the service is on the routing mesh.
            for (net, vip) in &s.vips {
                if !networks.iter().any(|n| &n.network == net) {
                    networks.push(ServiceNetwork {
                        network: net.clone(),
                        aliases: vec![],
                        vip: Some(*vip),
                    });
                }
            }
            ServiceSpec {
                id: None,
                name: s.def.name.clone(),
                mode: s.def.mode,
                endpoint_mode: s.def.endpoint_mode,
                ports: s.ports.clone(),
                networks,
                // The orchestrator replaces failed tasks itself (state/restart.rs): netd never restarts.
                restart: swarmnet_model::spec::RestartPolicy::Never,
                health: s.def.health.as_deref().cloned(),
                affinity: s.def.affinity,
            }
        })
        .collect::<Vec<_>>();
    let tasks = state
        .tasks
        .values()
        .filter(|t| {
            !t.is_pending() && !matches!(t.status.state, TaskState::Failed | TaskState::Complete)
        })
        .filter_map(|t| {
            let svc = state.services.get(&t.service)?;
            let on = |net: &swarmnet_model::Name| {
                svc.def.networks.iter().any(|n| &n.network == net) || svc.vips.contains_key(net)
            };
            Some(TaskSpec {
                id: t.id.clone(),
                service: t.service.clone(),
                slot: t.slot,
                node: t.node.clone()?,
                networks: t
                    .networks
                    .iter()
                    .filter(|a| on(&a.network))
                    .map(|a| {
                        Some(TaskAttachment {
                            network: a.network.clone(),
                            ip: a.ip?,
                            mac: None,
                            aliases: a.aliases.clone(),
                            ifname: None,
                        })
                    })
                    .collect::<Option<Vec<_>>>()?,
                argv: t.template.argv.clone(),
                env: t.template.env.clone(),
                desired_state: if t.draining {
                    DesiredState::Draining
                } else if t.status.state == TaskState::Assigned {
                    DesiredState::Starting
                } else {
                    DesiredState::Running
                },
                runtime: t.template.runtime,
            })
        })
        .collect();
    ClusterSpec {
        version: 1,
        nodes,
        networks,
        services,
        tasks,
    }
}
