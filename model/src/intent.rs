//! Validated cluster intent. [`Intent`] can only be built from a [`ClusterSpec`] that passes every
//! cross-object check (overlaps, duplicates, dangling references), so code that holds an `Intent`
//! never re-checks it.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;

use crate::spec::{ClusterSpec, NetworkSpec, ServiceSpec, TaskRuntime, TaskSpec};
use crate::types::{IfName, MacAddr, Name, NodeId, TaskId};

/// The task id every node's ingress sandbox uses; no task may take it.
pub const RESERVED_TASK: &str = "ingress-sbox";

/// One thing wrong with an intent, located by its path in the document (`networks[1].subnet`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IntentIssue {
    pub path: String,
    pub message: String,
}

impl fmt::Display for IntentIssue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

/// Why an intent was refused: every problem found, not just the first.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct IntentError {
    pub issues: Vec<IntentIssue>,
}

impl fmt::Display for IntentError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid intent")?;
        for i in &self.issues {
            write!(f, "\n  - {i}")?;
        }
        Ok(())
    }
}

impl IntentError {
    fn one(path: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            issues: vec![IntentIssue {
                path: path.into(),
                message: message.into(),
            }],
        }
    }
}

/// A network as seen by consumers: the spec with its defaults resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Network {
    pub id: Name,
    pub spec: NetworkSpec,
    pub gateway: Ipv4Addr,
}

/// An attachment of a task to a network, defaults resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attachment {
    pub network: Name,
    pub ip: Ipv4Addr,
    pub mac: MacAddr,
    pub aliases: Vec<Name>,
    pub ifname: IfName,
}

/// A validated cluster intent with lookup indexes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Intent {
    spec: ClusterSpec,
    networks: BTreeMap<Name, Network>,
    service_index: BTreeMap<Name, usize>,
    attachments: BTreeMap<usize, Vec<Attachment>>,
    node_index: BTreeMap<NodeId, usize>,
    task_index: BTreeMap<TaskId, usize>,
}

impl Intent {
    /// Parses and validates the JSON intent format. Parse errors name the path and position.
    pub fn from_json(text: &str) -> Result<Self, IntentError> {
        let de = &mut serde_json::Deserializer::from_str(text);
        let spec: ClusterSpec = serde_path_to_error::deserialize(de).map_err(|e| {
            let path = e.path().to_string();
            IntentError::one(
                if path == "." {
                    "(document)".into()
                } else {
                    path
                },
                e.into_inner().to_string(),
            )
        })?;
        Self::new(spec)
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(&self.spec).expect("intent serializes")
    }

    pub fn empty() -> Self {
        Self::new(ClusterSpec {
            version: 1,
            nodes: vec![],
            networks: vec![],
            services: vec![],
            tasks: vec![],
        })
        .expect("empty intent is valid")
    }

    pub fn new(spec: ClusterSpec) -> Result<Self, IntentError> {
        let mut v = Validator { issues: Vec::new() };
        let built = v.check(&spec);
        if v.issues.is_empty() {
            let (networks, service_index, attachments) = built;
            let node_index = spec
                .nodes
                .iter()
                .enumerate()
                .map(|(i, n)| (n.id.clone(), i))
                .collect();
            let task_index = spec
                .tasks
                .iter()
                .enumerate()
                .map(|(i, t)| (t.id.clone(), i))
                .collect();
            Ok(Self {
                spec,
                networks,
                service_index,
                attachments,
                node_index,
                task_index,
            })
        } else {
            Err(IntentError { issues: v.issues })
        }
    }

    pub fn spec(&self) -> &ClusterSpec {
        &self.spec
    }
    pub fn nodes(&self) -> impl Iterator<Item = &crate::spec::NodeSpec> {
        self.spec.nodes.iter()
    }
    pub fn node(&self, id: &NodeId) -> Option<&crate::spec::NodeSpec> {
        self.node_index.get(id).map(|&i| &self.spec.nodes[i])
    }
    /// One task with its attachments.
    pub fn task(&self, id: &TaskId) -> Option<(&TaskSpec, &[Attachment])> {
        self.task_index
            .get(id)
            .map(|&i| (&self.spec.tasks[i], self.attachments[&i].as_slice()))
    }
    pub fn networks(&self) -> impl Iterator<Item = &Network> {
        self.networks.values()
    }
    pub fn network(&self, name: &Name) -> Option<&Network> {
        self.networks.get(name)
    }
    /// The routing-mesh network, if the cluster has one.
    pub fn ingress_network(&self) -> Option<&Network> {
        self.networks.values().find(|n| n.spec.ingress)
    }
    pub fn services(&self) -> impl Iterator<Item = &ServiceSpec> {
        self.spec.services.iter()
    }
    pub fn service(&self, name: &Name) -> Option<&ServiceSpec> {
        self.service_index
            .get(name)
            .map(|&i| &self.spec.services[i])
    }
    /// Tasks with their attachments (defaults resolved).
    pub fn tasks(&self) -> impl Iterator<Item = (&TaskSpec, &[Attachment])> {
        self.spec
            .tasks
            .iter()
            .enumerate()
            .map(|(i, t)| (t, self.attachments[&i].as_slice()))
    }
}

/// Addresses a subnet cannot hand out: the network address and broadcast (for prefixes ≤ 30).
fn usable(net: &Ipv4Net, ip: Ipv4Addr) -> Result<(), String> {
    if !net.contains(&ip) {
        return Err(format!("{ip} is outside the subnet {net}"));
    }
    if ip == net.network() {
        return Err(format!("{ip} is the network address of {net}"));
    }
    if ip == net.broadcast() {
        return Err(format!("{ip} is the broadcast address of {net}"));
    }
    Ok(())
}

type Built = (
    BTreeMap<Name, Network>,
    BTreeMap<Name, usize>,
    BTreeMap<usize, Vec<Attachment>>,
);

struct Validator {
    issues: Vec<IntentIssue>,
}

impl Validator {
    fn err(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.issues.push(IntentIssue {
            path: path.into(),
            message: message.into(),
        });
    }

    fn check(&mut self, spec: &ClusterSpec) -> Built {
        if spec.version != 1 {
            self.err(
                "version",
                format!(
                    "unsupported format version {}; this netd reads version 1",
                    spec.version
                ),
            );
        }
        let nodes = self.check_nodes(spec);
        let networks = self.check_networks(spec);
        // Addresses taken per network, and by whom, to report duplicates by name.
        let mut taken: HashMap<(Name, Ipv4Addr), String> = HashMap::new();
        for n in networks.values() {
            taken.insert(
                (n.spec.name.clone(), n.gateway),
                format!("the gateway of network {:?}", n.spec.name.as_str()),
            );
        }
        self.check_ingress(spec, &networks, &mut taken);
        let service_index = self.check_services(spec, &networks, &mut taken);
        let attachments = self.check_tasks(spec, &nodes, &networks, &service_index, &mut taken);
        (networks, service_index, attachments)
    }

    /// With an ingress network, every node has an address on it (its ingress sandbox), and every
    /// service publishing a port in ingress mode has a VIP on it (the routing mesh balances
    /// over the service's tasks there).
    fn check_ingress(
        &mut self,
        spec: &ClusterSpec,
        networks: &BTreeMap<Name, Network>,
        taken: &mut HashMap<(Name, Ipv4Addr), String>,
    ) {
        let ingress = networks.values().find(|n| n.spec.ingress);
        for (i, n) in spec.nodes.iter().enumerate() {
            let p = format!("nodes[{i}].ingress_ip");
            match (ingress, n.ingress_ip) {
                (Some(net), Some(ip)) => {
                    if let Err(e) = usable(&net.spec.subnet, ip) {
                        self.err(p, e);
                    } else if let Some(owner) = taken.insert(
                        (net.spec.name.clone(), ip),
                        format!("the ingress address of node {:?}", n.id.as_str()),
                    ) {
                        self.err(p, format!("{ip} is already {owner}"));
                    }
                }
                (Some(net), None) => self.err(
                    p,
                    format!("every node needs an address on the ingress network {:?} (its ingress sandbox)", net.spec.name.as_str()),
                ),
                (None, Some(_)) => self.err(p, "there is no ingress network (a network with \"ingress\": true)"),
                (None, None) => {}
            }
        }
        for (i, s) in spec.services.iter().enumerate() {
            let Some(k) = s.ports.iter().position(|p| {
                p.published.is_some() && p.publish_mode == crate::spec::PublishMode::Ingress
            }) else {
                continue;
            };
            let p = format!("services[{i}].ports[{k}]");
            match ingress {
                None => self.err(p, "publishing in ingress mode needs an ingress network (a network with \"ingress\": true); or use \"publish_mode\": \"host\""),
                Some(net) => {
                    if !s.networks.iter().any(|sn| sn.network == net.spec.name && sn.vip.is_some()) {
                        self.err(p, format!("service {:?} publishes in ingress mode, so it needs a VIP on the ingress network {:?}", s.name.as_str(), net.spec.name.as_str()));
                    }
                }
            }
        }
        for (i, t) in spec.tasks.iter().enumerate() {
            if t.id.as_str() == RESERVED_TASK {
                self.err(
                    format!("tasks[{i}].id"),
                    format!("{RESERVED_TASK:?} is reserved for the ingress sandbox"),
                );
            }
        }
    }

    fn check_nodes(&mut self, spec: &ClusterSpec) -> BTreeSet<NodeId> {
        let mut ids = BTreeSet::new();
        let mut addrs: HashMap<Ipv4Addr, &NodeId> = HashMap::new();
        for (i, n) in spec.nodes.iter().enumerate() {
            if !ids.insert(n.id.clone()) {
                self.err(
                    format!("nodes[{i}].id"),
                    format!("node id {:?} is used twice", n.id.as_str()),
                );
            }
            if n.addr.is_unspecified() || n.addr.is_multicast() || n.addr.is_broadcast() {
                self.err(
                    format!("nodes[{i}].addr"),
                    format!("{} cannot be a node's underlay address", n.addr),
                );
            }
            if let Some(other) = addrs.insert(n.addr, &n.id) {
                self.err(
                    format!("nodes[{i}].addr"),
                    format!(
                        "{} is also the address of node {:?}",
                        n.addr,
                        other.as_str()
                    ),
                );
            }
        }
        ids
    }

    fn check_networks(&mut self, spec: &ClusterSpec) -> BTreeMap<Name, Network> {
        let mut out: BTreeMap<Name, Network> = BTreeMap::new();
        let mut ids: HashMap<Name, usize> = HashMap::new();
        let mut vnis: HashMap<u32, usize> = HashMap::new();
        let mut ingress: Option<usize> = None;
        let mut placed: Vec<(usize, Ipv4Net)> = Vec::new();
        for (i, n) in spec.networks.iter().enumerate() {
            let p = format!("networks[{i}]");
            let id = n.id.clone().unwrap_or_else(|| n.name.clone());
            if out.contains_key(&n.name) {
                self.err(
                    format!("{p}.name"),
                    format!("network name {:?} is used twice", n.name.as_str()),
                );
                continue;
            }
            if let Some(j) = ids.insert(id.clone(), i) {
                self.err(
                    format!("{p}.id"),
                    format!(
                        "network id {:?} is also the id of networks[{j}]",
                        id.as_str()
                    ),
                );
            }
            if let Some(j) = vnis.insert(n.vni.get(), i) {
                self.err(
                    format!("{p}.vni"),
                    format!(
                        "VNI {} is also used by networks[{j}] ({:?})",
                        n.vni,
                        spec.networks[j].name.as_str()
                    ),
                );
            }
            if n.subnet != n.subnet.trunc() {
                self.err(
                    format!("{p}.subnet"),
                    format!(
                        "{} has host bits set; did you mean {}?",
                        n.subnet,
                        n.subnet.trunc()
                    ),
                );
            }
            if n.subnet.prefix_len() > 30 {
                self.err(
                    format!("{p}.subnet"),
                    format!("{} is too small: a network needs at least a /30", n.subnet),
                );
            }
            for (j, other) in &placed {
                if n.subnet.contains(&other.network()) || other.contains(&n.subnet.network()) {
                    self.err(
                        format!("{p}.subnet"),
                        format!(
                            "{} overlaps {} of networks[{j}] ({:?})",
                            n.subnet,
                            other,
                            spec.networks[*j].name.as_str()
                        ),
                    );
                }
            }
            placed.push((i, n.subnet.trunc()));
            if n.ingress {
                if let Some(j) = ingress {
                    self.err(
                        format!("{p}.ingress"),
                        format!("only one ingress network may exist; networks[{j}] is one already"),
                    );
                }
                ingress = Some(i);
                if n.internal {
                    self.err(
                        format!("{p}.internal"),
                        "the ingress network cannot be internal",
                    );
                }
            }
            let gateway = n
                .gateway
                .unwrap_or_else(|| n.subnet.hosts().next().unwrap_or(n.subnet.network()));
            if let Err(e) = usable(&n.subnet, gateway) {
                self.err(format!("{p}.gateway"), e);
            }
            out.insert(
                n.name.clone(),
                Network {
                    id,
                    spec: n.clone(),
                    gateway,
                },
            );
        }
        out
    }

    fn check_services(
        &mut self,
        spec: &ClusterSpec,
        networks: &BTreeMap<Name, Network>,
        taken: &mut HashMap<(Name, Ipv4Addr), String>,
    ) -> BTreeMap<Name, usize> {
        let mut index = BTreeMap::new();
        let mut ids: HashMap<Name, usize> = HashMap::new();
        let mut published: HashMap<(u16, crate::spec::Protocol), &Name> = HashMap::new();
        for (i, s) in spec.services.iter().enumerate() {
            let p = format!("services[{i}]");
            if index.insert(s.name.clone(), i).is_some() {
                self.err(
                    format!("{p}.name"),
                    format!("service name {:?} is used twice", s.name.as_str()),
                );
                continue;
            }
            let id = s.id.clone().unwrap_or_else(|| s.name.clone());
            if let Some(j) = ids.insert(id.clone(), i) {
                self.err(
                    format!("{p}.id"),
                    format!(
                        "service id {:?} is also the id of services[{j}]",
                        id.as_str()
                    ),
                );
            }
            let mut port_names = BTreeSet::new();
            for (k, port) in s.ports.iter().enumerate() {
                let pp = format!("{p}.ports[{k}]");
                if port.target == 0 {
                    self.err(format!("{pp}.target"), "port 0 cannot be a target");
                }
                if let Some(n) = &port.name
                    && !port_names.insert((n.clone(), port.protocol))
                {
                    self.err(
                        format!("{pp}.name"),
                        format!(
                            "port name {:?} is used twice for {}",
                            n.as_str(),
                            port.protocol
                        ),
                    );
                }
                if port.traffic_policy == crate::spec::TrafficPolicy::Local
                    && (port.published.is_none()
                        || port.publish_mode == crate::spec::PublishMode::Host)
                {
                    self.err(
                        format!("{pp}.traffic_policy"),
                        "traffic_policy \"local\" applies to ports published in ingress mode (host mode always serves from the local task only)",
                    );
                }
                if let Some(pub_port) = port.published {
                    if pub_port == 0 {
                        self.err(format!("{pp}.published"), "port 0 cannot be published");
                    } else if let Some(why) = crate::spec::reserved_port(pub_port, port.protocol) {
                        self.err(
                            format!("{pp}.published"),
                            format!(
                                "{pub_port}/{} is reserved for {why} on every node; publish another port",
                                port.protocol
                            ),
                        );
                    } else if let Some(other) = published.insert((pub_port, port.protocol), &s.name)
                    {
                        self.err(
                            format!("{pp}.published"),
                            format!(
                                "{}/{} is already published by service {:?}",
                                pub_port,
                                port.protocol,
                                other.as_str()
                            ),
                        );
                    }
                }
            }
            if let Some(h) = &s.health {
                for (field, message) in h.problems() {
                    self.err(format!("{p}.health.{field}"), message);
                }
            }
            let mut seen_nets = BTreeSet::new();
            for (k, sn) in s.networks.iter().enumerate() {
                let pp = format!("{p}.networks[{k}]");
                let Some(net) = networks.get(&sn.network) else {
                    self.err(
                        format!("{pp}.network"),
                        format!("no network is named {:?}", sn.network.as_str()),
                    );
                    continue;
                };
                if !seen_nets.insert(sn.network.clone()) {
                    self.err(
                        format!("{pp}.network"),
                        format!("network {:?} is listed twice", sn.network.as_str()),
                    );
                }
                if let Some(vip) = sn.vip {
                    if let Err(e) = usable(&net.spec.subnet, vip) {
                        self.err(format!("{pp}.vip"), e);
                    } else if let Some(owner) = taken.insert(
                        (sn.network.clone(), vip),
                        format!("the VIP of service {:?}", s.name.as_str()),
                    ) {
                        self.err(format!("{pp}.vip"), format!("{vip} is already {owner}"));
                    }
                }
            }
        }
        index
    }

    fn check_tasks(
        &mut self,
        spec: &ClusterSpec,
        nodes: &BTreeSet<NodeId>,
        networks: &BTreeMap<Name, Network>,
        services: &BTreeMap<Name, usize>,
        taken: &mut HashMap<(Name, Ipv4Addr), String>,
    ) -> BTreeMap<usize, Vec<Attachment>> {
        let mut out = BTreeMap::new();
        let mut ids = HashMap::new();
        let mut macs: HashMap<(Name, MacAddr), String> = HashMap::new();
        for (i, t) in spec.tasks.iter().enumerate() {
            let p = format!("tasks[{i}]");
            let mut atts = Vec::new();
            if let Some(j) = ids.insert(t.id.clone(), i) {
                self.err(
                    format!("{p}.id"),
                    format!("task id {:?} is also the id of tasks[{j}]", t.id.as_str()),
                );
            }
            if !nodes.contains(&t.node) {
                self.err(
                    format!("{p}.node"),
                    format!("no node has the id {:?}", t.node.as_str()),
                );
            }
            let service = services.get(&t.service).map(|&k| &spec.services[k]);
            if service.is_none() {
                self.err(
                    format!("{p}.service"),
                    format!("no service is named {:?}", t.service.as_str()),
                );
            }
            match t.runtime {
                TaskRuntime::Netd if t.argv.is_empty() => {
                    self.err(format!("{p}.argv"), "a task run by netd needs a command (argv)")
                }
                TaskRuntime::External if !t.argv.is_empty() => self.err(
                    format!("{p}.argv"),
                    "a task with runtime \"external\" is started by its container runtime; argv must be empty",
                ),
                _ => {}
            }
            let mut ifnames = BTreeSet::new();
            let mut nets = BTreeSet::new();
            for (k, a) in t.networks.iter().enumerate() {
                let pp = format!("{p}.networks[{k}]");
                let Some(net) = networks.get(&a.network) else {
                    self.err(
                        format!("{pp}.network"),
                        format!("no network is named {:?}", a.network.as_str()),
                    );
                    continue;
                };
                if !nets.insert(a.network.clone()) {
                    self.err(
                        format!("{pp}.network"),
                        format!("the task is attached to {:?} twice", a.network.as_str()),
                    );
                }
                if let Some(s) = service
                    && !s.networks.iter().any(|sn| sn.network == a.network)
                {
                    self.err(
                        format!("{pp}.network"),
                        format!(
                            "service {:?} is not on network {:?}",
                            s.name.as_str(),
                            a.network.as_str()
                        ),
                    );
                }
                if let Err(e) = usable(&net.spec.subnet, a.ip) {
                    self.err(format!("{pp}.ip"), e);
                } else if let Some(owner) = taken.insert(
                    (a.network.clone(), a.ip),
                    format!("the address of task {:?}", t.id.as_str()),
                ) {
                    self.err(format!("{pp}.ip"), format!("{} is already {owner}", a.ip));
                }
                let mac = a.mac.unwrap_or_else(|| MacAddr::from_ipv4(a.ip));
                if let Some(owner) = macs.insert((a.network.clone(), mac), t.id.to_string()) {
                    self.err(
                        format!("{pp}.mac"),
                        format!("{mac} is already used by task {owner:?} on this network"),
                    );
                }
                let ifname = a
                    .ifname
                    .clone()
                    .unwrap_or_else(|| IfName::new(format!("eth{k}")).expect("ethN is valid"));
                if !ifnames.insert(ifname.clone()) {
                    self.err(
                        format!("{pp}.ifname"),
                        format!("interface name {ifname:?} is used twice in this task"),
                    );
                }
                atts.push(Attachment {
                    network: a.network.clone(),
                    ip: a.ip,
                    mac,
                    aliases: a.aliases.clone(),
                    ifname,
                });
            }
            out.insert(i, atts);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"{
      "version": 1,
      "nodes": [
        {"id": "n1", "addr": "198.18.0.1", "role": "manager"},
        {"id": "n2", "addr": "198.18.0.2"}
      ],
      "networks": [
        {"name": "app", "subnet": "10.10.0.0/24", "vni": 4097},
        {"name": "db", "subnet": "10.11.0.0/24", "vni": 4098, "internal": true}
      ],
      "services": [
        {"name": "web", "mode": {"replicated": {"replicas": 2}},
         "networks": [{"network": "app", "vip": "10.10.0.2", "aliases": ["www"]}],
         "ports": [{"name": "http", "target": 80, "published": 8080, "publish_mode": "host"}]}
      ],
      "tasks": [
        {"id": "web1", "service": "web", "slot": 1, "node": "n1", "argv": ["sleep", "inf"],
         "networks": [{"network": "app", "ip": "10.10.0.3"}]},
        {"id": "web2", "service": "web", "slot": 2, "node": "n2", "argv": ["sleep", "inf"],
         "networks": [{"network": "app", "ip": "10.10.0.4"}]}
      ]
    }"#;

    fn issues(text: &str) -> Vec<String> {
        Intent::from_json(text)
            .unwrap_err()
            .issues
            .iter()
            .map(|i| i.to_string())
            .collect()
    }

    #[test]
    fn good_intent_resolves_defaults() {
        let i = Intent::from_json(GOOD).unwrap();
        let app = i.network(&Name::new("app").unwrap()).unwrap();
        assert_eq!(app.gateway, "10.10.0.1".parse::<Ipv4Addr>().unwrap());
        assert_eq!(app.id.as_str(), "app");
        let (t, atts) = i.tasks().next().unwrap();
        assert_eq!(t.id.as_str(), "web1");
        assert_eq!(atts[0].mac.to_string(), "02:42:0a:0a:00:03");
        assert_eq!(atts[0].ifname.as_str(), "eth0");
        // Round trip through the file format keeps the same intent.
        assert_eq!(Intent::from_json(&i.to_json()).unwrap(), i);
    }

    #[test]
    fn unknown_field_is_named() {
        let text = GOOD.replace(
            r#""internal": true"#,
            r#""internal": true, "colour": "red""#,
        );
        let e = issues(&text);
        assert!(e[0].starts_with("networks[1]"), "{e:?}");
        assert!(e[0].contains("unknown field `colour`"), "{e:?}");
    }

    #[test]
    fn vni_out_of_range_is_named() {
        let e = issues(&GOOD.replace("4098", "16777216"));
        assert!(e[0].starts_with("networks[1].vni"), "{e:?}");
        assert!(e[0].contains("1..=16777215"), "{e:?}");
        let e = issues(&GOOD.replace("4098", "0"));
        assert!(e[0].starts_with("networks[1].vni"), "{e:?}");
    }

    #[test]
    fn overlapping_subnets() {
        let e = issues(&GOOD.replace("10.11.0.0/24", "10.10.0.0/16"));
        assert_eq!(e.len(), 1, "{e:?}");
        assert!(e[0].starts_with("networks[1].subnet"), "{e:?}");
        assert!(
            e[0].contains("overlaps 10.10.0.0/24 of networks[0] (\"app\")"),
            "{e:?}"
        );
    }

    #[test]
    fn duplicate_task_ip() {
        let e = issues(&GOOD.replace("10.10.0.4", "10.10.0.3"));
        assert_eq!(e.len(), 2, "ip and derived MAC collide: {e:?}");
        assert!(e[0].starts_with("tasks[1].networks[0].ip"), "{e:?}");
        assert!(
            e[0].contains("already the address of task \"web1\""),
            "{e:?}"
        );
    }

    #[test]
    fn task_ip_on_vip_or_gateway() {
        let e = issues(&GOOD.replace("10.10.0.4", "10.10.0.2"));
        assert!(e[0].contains("already the VIP of service \"web\""), "{e:?}");
        let e = issues(&GOOD.replace("10.10.0.4", "10.10.0.1"));
        assert!(
            e[0].contains("already the gateway of network \"app\""),
            "{e:?}"
        );
        let e = issues(&GOOD.replace("10.10.0.4", "10.10.0.255"));
        assert!(e[0].contains("broadcast"), "{e:?}");
        let e = issues(&GOOD.replace("10.10.0.4", "10.12.0.4"));
        assert!(e[0].contains("outside the subnet 10.10.0.0/24"), "{e:?}");
    }

    #[test]
    fn long_interface_name() {
        let text = GOOD.replace(
            r#""ip": "10.10.0.4""#,
            r#""ip": "10.10.0.4", "ifname": "averyveryverylong0""#,
        );
        let e = issues(&text);
        assert!(e[0].starts_with("tasks[1].networks[0].ifname"), "{e:?}");
        assert!(e[0].contains("Linux allows at most 15"), "{e:?}");
    }

    #[test]
    fn dangling_references() {
        let e = issues(&GOOD.replace(r#""node": "n2""#, r#""node": "n9""#));
        assert!(e[0].contains("no node has the id \"n9\""), "{e:?}");
        let e = issues(&GOOD.replace(
            r#"{"network": "app", "ip": "10.10.0.4"}"#,
            r#"{"network": "db", "ip": "10.11.0.4"}"#,
        ));
        assert!(
            e[0].contains("service \"web\" is not on network \"db\""),
            "{e:?}"
        );
    }

    #[test]
    fn duplicate_published_port_names_the_other_service() {
        // A second service publishing the same port is refused with the first one's name.
        let spec_text = GOOD.replace(
            r#""services": ["#,
            r#""services": [{"name": "api", "ports": [{"target": 81, "published": 8080, "publish_mode": "host"}]},"#,
        );
        let e = issues(&spec_text);
        assert!(
            e[0].contains("8080/tcp is already published by service \"api\""),
            "{e:?}"
        );
        let ok = spec_text.replace(
            r#""target": 81, "published": 8080"#,
            r#""target": 81, "published": 8080, "protocol": "udp""#,
        );
        Intent::from_json(&ok).unwrap();
    }

    #[test]
    fn ingress_needs_node_addresses_and_a_vip() {
        let with_ingress = GOOD
            .replace(
                r#"{"name": "app", "subnet""#,
                r#"{"name": "ingress", "subnet": "10.255.0.0/16", "vni": 4096, "ingress": true}, {"name": "app", "subnet""#,
            )
            .replace(r#", "publish_mode": "host""#, "");
        let e = issues(&with_ingress);
        assert!(
            e.iter()
                .any(|i| i.starts_with("nodes[0].ingress_ip") && i.contains("every node needs")),
            "{e:?}"
        );
        assert!(
            e.iter().any(|i| i.starts_with("services[0].ports[0]")
                && i.contains("needs a VIP on the ingress network")),
            "{e:?}"
        );
        let ok = with_ingress
            .replace(
                r#""role": "manager"}"#,
                r#""role": "manager", "ingress_ip": "10.255.0.11"}"#,
            )
            .replace(
                r#"{"id": "n2", "addr": "198.18.0.2"}"#,
                r#"{"id": "n2", "addr": "198.18.0.2", "ingress_ip": "10.255.0.12"}"#,
            )
            .replace(
                r#""aliases": ["www"]}]"#,
                r#""aliases": ["www"]}, {"network": "ingress", "vip": "10.255.0.2"}]"#,
            );
        Intent::from_json(&ok).unwrap();
        let dup = ok.replace("10.255.0.12", "10.255.0.11");
        assert!(issues(&dup)[0].contains("already the ingress address of node \"n1\""));
        let no_ingress = GOOD.replace(
            r#""role": "manager"}"#,
            r#""role": "manager", "ingress_ip": "10.255.0.11"}"#,
        );
        assert!(
            issues(&no_ingress)
                .iter()
                .any(|i| i.contains("there is no ingress network"))
        );
    }

    #[test]
    fn reserved_and_out_of_range_published_ports_are_refused() {
        let vxlan = GOOD.replace(
            r#""published": 8080, "publish_mode": "host""#,
            r#""published": 4789, "protocol": "udp", "publish_mode": "host""#,
        );
        let e = issues(&vxlan);
        assert!(
            e.iter()
                .any(|i| i.contains("services[0].ports[0].published")
                    && i.contains("4789/udp is reserved for VXLAN")),
            "{e:?}"
        );
        // The same number over TCP does not collide with VXLAN.
        Intent::from_json(&vxlan.replace(r#""protocol": "udp", "#, "")).unwrap();
        let big = GOOD.replace(r#""published": 8080"#, r#""published": 70000"#);
        let e = issues(&big);
        assert!(e[0].contains("70000") && e[0].contains("u16"), "{e:?}");
    }

    #[test]
    fn local_traffic_policy_only_on_ingress_published_ports() {
        let host = GOOD.replace(
            r#""publish_mode": "host""#,
            r#""publish_mode": "host", "traffic_policy": "local""#,
        );
        let e = issues(&host);
        assert!(
            e.iter()
                .any(|i| i.contains("services[0].ports[0].traffic_policy")
                    && i.contains("ingress mode")),
            "{e:?}"
        );
        let bad = GOOD.replace(
            r#""publish_mode": "host""#,
            r#""publish_mode": "host", "traffic_policy": "nearest""#,
        );
        let e = issues(&bad);
        assert!(e[0].contains("nearest"), "{e:?}");
    }

    #[test]
    fn health_checks_are_validated() {
        let with = |h: &str| {
            GOOD.replace(
                r#""name": "web","#,
                &format!(r#""name": "web", "health": {h},"#),
            )
        };
        let ok = Intent::from_json(&with(
            r#"{"cmd": ["true"], "interval": "1s", "start_period": "5s"}"#,
        ))
        .unwrap();
        let h = ok
            .service(&Name::new("web").unwrap())
            .unwrap()
            .health
            .clone()
            .unwrap();
        assert_eq!(h.interval.get().as_millis(), 1000);
        assert_eq!(h.timeout, crate::spec::HealthCheck::DEFAULT_TIMEOUT);
        assert_eq!(h.retries, 3);
        assert_eq!(Intent::from_json(&ok.to_json()).unwrap(), ok, "round trip");
        let e = issues(&with(r#"{"cmd": [], "retries": 0, "timeout": "1ms"}"#));
        assert!(
            e.iter()
                .any(|i| i.contains("services[0].health.cmd: must name a program")),
            "{e:?}"
        );
        assert!(
            e.iter()
                .any(|i| i.contains("services[0].health.retries: must be at least 1")),
            "{e:?}"
        );
        assert!(
            e.iter()
                .any(|i| i.contains("services[0].health.timeout: 1ms is too short")),
            "{e:?}"
        );
        let e = issues(&with(r#"{"cmd": ["true"], "interval": "5 parsecs"}"#));
        assert!(e[0].starts_with("services[0].health.interval"), "{e:?}");
        assert!(e[0].contains("unknown unit"), "{e:?}");
    }

    #[test]
    fn malformed_json_says_where() {
        let e = issues("{\"version\": 1, \"nodes\": [");
        assert!(e[0].contains("line 1"), "{e:?}");
    }
}
