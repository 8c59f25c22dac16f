//! The names one sandbox may resolve: an immutable, pure projection of the intent for one task.
//!
//! Built by [`DnsView::build`] whenever the intent or the set of live tasks changes, and swapped
//! atomically into the running server (readers never see a half-built view).
//!
//! Scope: only the networks the asking task is attached to. Where a name exists on several of
//! them, the first network in the task's attachment order answers (Docker's resolver does the
//! same: it walks the sandbox's endpoints in order and stops at the first match), so
//! `tasks.<svc>` never mixes addresses of two networks.
//!
//! Within one network, when a name is defined more than once the stronger kind wins, in this
//! order: service names and `tasks.<svc>`, service aliases, task names, task aliases. Several
//! definitions of the same kind are merged (two tasks sharing an alias resolve to both).
//!
//! Invariants:
//! - keys are lowercase, dot-separated, without the trailing dot (`tasks.web`);
//! - only live tasks appear (anywhere: addresses, task names, aliases, PTR, SRV), so a dead
//!   task never lingers in DNS (ANCHORS row 2);
//! - a name the cluster defines anywhere but that is not visible from this sandbox is
//!   NXDOMAIN, never forwarded (it must neither resolve nor leak to the upstream resolvers);
//! - reverse names of addresses inside any cluster subnet are ours too: a miss is NXDOMAIN;
//! - addresses are stored sorted; answers with more than one address are shuffled per answer.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::{Ipv4Addr, Ipv6Addr};

use ipnet::Ipv4Net;
use swarmnet_model::spec::{DesiredState, EndpointMode, Protocol, TaskSpec};
use swarmnet_model::{Intent, Name, TaskId};

/// Default answer TTL in seconds. Short on purpose: a DNSRR set changes whenever a task starts
/// or dies, and a client cache must not keep a dead address for long (Docker's 600 s is a known
/// source of "no route to host" after rescheduling). 5 s keeps resolver load negligible for
/// clients that cache, while a change is visible to them within 5 s.
pub const DEFAULT_TTL: u32 = 5;

/// Inputs of a view besides the intent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ViewOptions {
    /// TTL of every answer record.
    pub ttl: u32,
    /// The tasks considered healthy. `None`: every task whose `desired_state` is `running`. The
    /// daemon always gives a set (`dns_sync`): remote tasks gossip holds live, local tasks that
    /// are ready (running, and healthy when their service has a check).
    pub live: Option<BTreeSet<TaskId>>,
}

impl Default for ViewOptions {
    fn default() -> Self {
        Self {
            ttl: DEFAULT_TTL,
            live: None,
        }
    }
}

impl ViewOptions {
    fn is_live(&self, t: &TaskSpec) -> bool {
        match &self.live {
            Some(set) => set.contains(&t.id),
            None => t.desired_state == DesiredState::Running,
        }
    }
}

/// One SRV record's data (RFC 2782).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SrvData {
    pub priority: u16,
    pub weight: u16,
    pub port: u16,
    /// Lowercase dotted target, resolvable in the same view.
    pub target: Box<str>,
}

/// Everything known about one name.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NameData {
    /// Sorted; shuffled per answer when there is more than one.
    pub a: Vec<Ipv4Addr>,
    /// Always empty for now: networks have no IPv6 yet, so AAAA gets an empty NOERROR.
    pub aaaa: Vec<Ipv6Addr>,
    /// PTR targets (lowercase dotted).
    pub ptr: Vec<Box<str>>,
    pub srv: Vec<SrvData>,
}

/// The result of looking a name up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lookup<'a> {
    /// A cluster name visible here (possibly with no record of the asked type: NOERROR, empty).
    Found(&'a NameData),
    /// A cluster name not visible from this sandbox, or a reverse name in a cluster subnet.
    NxDomain,
    /// Not a cluster name: forward (or refuse, per the sandbox's policy).
    NotOurs,
}

/// The immutable set of names of one sandbox.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DnsView {
    ttl: u32,
    names: HashMap<Box<[u8]>, NameData>,
    hidden: HashSet<Box<[u8]>>,
    reverse_zones: Vec<Ipv4Net>,
}

/// Precedence of a definition within one network; lower wins.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    Service,
    ServiceAlias,
    TaskName,
    TaskAlias,
}

#[derive(Default)]
struct NetNames {
    a: BTreeMap<String, (Kind, BTreeSet<Ipv4Addr>)>,
    ptr: BTreeMap<String, String>,
    srv: BTreeMap<String, Vec<SrvData>>,
}

impl NetNames {
    fn add(&mut self, name: String, kind: Kind, addrs: impl IntoIterator<Item = Ipv4Addr>) {
        let e = self
            .a
            .entry(name)
            .or_insert_with(|| (kind, BTreeSet::new()));
        if kind < e.0 {
            *e = (kind, BTreeSet::new());
        }
        if kind == e.0 {
            e.1.extend(addrs);
        }
    }
}

/// `d.c.b.a.in-addr.arpa` for `a.b.c.d`.
pub fn reverse_name(ip: Ipv4Addr) -> String {
    let [a, b, c, d] = ip.octets();
    format!("{d}.{c}.{b}.{a}.in-addr.arpa")
}

fn task_name(t: &TaskSpec) -> String {
    format!("{}.{}.{}", t.service, t.slot, t.id)
}

/// A live task on a network: the task, its address there, its aliases there.
type Member<'a> = (&'a TaskSpec, Ipv4Addr, &'a [Name]);

impl DnsView {
    /// The view of the sandbox of `task`. A task absent from the intent gets a view where
    /// every cluster name is NXDOMAIN.
    pub fn build(intent: &Intent, task: &TaskId, opts: &ViewOptions) -> Self {
        let mut view = Self {
            ttl: opts.ttl,
            ..Self::default()
        };
        view.reverse_zones = intent.networks().map(|n| n.spec.subnet).collect();
        // Every name the cluster defines, visible or not.
        for s in intent.services() {
            view.hide(s.name.as_str());
            view.hide(&format!("tasks.{}", s.name));
            for sn in &s.networks {
                for al in &sn.aliases {
                    view.hide(al.as_str());
                }
            }
            for p in &s.ports {
                if let Some(pn) = &p.name {
                    view.hide(&srv_name(pn, p.protocol, &s.name));
                }
            }
        }
        for (t, atts) in intent.tasks() {
            view.hide(&task_name(t));
            view.hide(&format!("{}.{}", t.service, t.slot));
            for a in atts {
                for al in &a.aliases {
                    view.hide(al.as_str());
                }
            }
        }

        let Some((_, mine)) = intent.task(task) else {
            return view;
        };
        let mut a: HashMap<Box<[u8]>, Vec<Ipv4Addr>> = HashMap::new();
        let mut ptr: HashMap<Box<[u8]>, Vec<Box<str>>> = HashMap::new();
        let mut srv: HashMap<Box<[u8]>, Vec<SrvData>> = HashMap::new();
        for att in mine {
            let nn = Self::network_names(intent, &att.network, opts);
            // First network in attachment order wins a name.
            for (name, (_, addrs)) in nn.a {
                a.entry(key(&name))
                    .or_insert_with(|| addrs.into_iter().collect());
            }
            for (name, target) in nn.ptr {
                ptr.entry(key(&name)).or_insert_with(|| vec![target.into()]);
            }
            for (name, recs) in nn.srv {
                srv.entry(key(&name)).or_insert(recs);
            }
        }
        for (k, addrs) in a {
            view.names.entry(k).or_default().a = addrs;
        }
        for (k, targets) in ptr {
            view.names.entry(k).or_default().ptr = targets;
        }
        for (k, recs) in srv {
            view.names.entry(k).or_default().srv = recs;
        }
        view
    }

    fn hide(&mut self, name: &str) {
        self.hidden.insert(key(name));
    }

    fn network_names(intent: &Intent, net: &Name, opts: &ViewOptions) -> NetNames {
        let mut nn = NetNames::default();
        // Live tasks on this network: (task, its address here, its aliases here).
        let members: Vec<Member<'_>> = intent
            .tasks()
            .filter(|(t, _)| opts.is_live(t))
            .filter_map(|(t, atts)| {
                atts.iter()
                    .find(|a| &a.network == net)
                    .map(|a| (t, a.ip, a.aliases.as_slice()))
            })
            .collect();
        // Members by service, gathered once (a filter per service would be services × tasks).
        let mut by_service: HashMap<&Name, Vec<&Member<'_>>> = HashMap::new();
        for m in &members {
            by_service.entry(&m.0.service).or_default().push(m);
        }
        for s in intent.services() {
            let Some(sn) = s.networks.iter().find(|sn| &sn.network == net) else {
                continue;
            };
            let tasks: Vec<&Member<'_>> = by_service.get(&s.name).cloned().unwrap_or_default();
            let ips: Vec<Ipv4Addr> = tasks.iter().map(|m| m.1).collect();
            // vip mode without a VIP on this network (the orchestrator has not allocated one
            // yet): answer the task addresses rather than nothing.
            let vip = match s.endpoint_mode {
                EndpointMode::Vip => sn.vip,
                EndpointMode::Dnsrr => None,
            };
            let answer: Vec<Ipv4Addr> = vip.map_or_else(|| ips.clone(), |v| vec![v]);
            nn.add(s.name.to_string(), Kind::Service, answer.iter().copied());
            nn.add(
                format!("tasks.{}", s.name),
                Kind::Service,
                ips.iter().copied(),
            );
            for al in &sn.aliases {
                nn.add(al.to_string(), Kind::ServiceAlias, answer.iter().copied());
            }
            if let Some(v) = vip {
                nn.ptr.insert(reverse_name(v), s.name.to_string());
            }
            // SRV, the Kubernetes way: a service with a VIP gets one record pointing at the
            // service name; a DNSRR service one record per live task pointing at its task name
            // (as a headless service points at its pods). Port = the target port: VIP load
            // balancing and DNSRR both reach the task on its target port. Weights split 100
            // evenly (RFC 2782: equal weights, random selection), as CoreDNS does.
            for p in &s.ports {
                let Some(pn) = &p.name else { continue };
                let recs = match vip {
                    Some(_) => vec![SrvData {
                        priority: 0,
                        weight: 100,
                        port: p.target,
                        target: s.name.as_str().into(),
                    }],
                    None => {
                        let weight = u16::try_from(100 / tasks.len().max(1)).unwrap_or(1).max(1);
                        let mut v: Vec<SrvData> = tasks
                            .iter()
                            .map(|m| SrvData {
                                priority: 0,
                                weight,
                                port: p.target,
                                target: task_name(m.0).into(),
                            })
                            .collect();
                        v.sort_by(|x, y| x.target.cmp(&y.target));
                        v
                    }
                };
                nn.srv.insert(srv_name(pn, p.protocol, &s.name), recs);
            }
        }
        for (t, ip, aliases) in &members {
            let tn = task_name(t);
            nn.add(tn.clone(), Kind::TaskName, [*ip]);
            nn.add(format!("{}.{}", t.service, t.slot), Kind::TaskName, [*ip]);
            for al in *aliases {
                nn.add(al.to_string(), Kind::TaskAlias, [*ip]);
            }
            nn.ptr.insert(reverse_name(*ip), tn);
        }
        nn
    }

    /// TTL of every record in this view.
    pub fn ttl(&self) -> u32 {
        self.ttl
    }

    /// Looks up a key: lowercase, dot-separated, no trailing dot.
    pub fn lookup(&self, key: &[u8]) -> Lookup<'_> {
        if let Some(d) = self.names.get(key) {
            return Lookup::Found(d);
        }
        if self.hidden.contains(key) {
            return Lookup::NxDomain;
        }
        if let Some(ip) = parse_reverse(key)
            && self.reverse_zones.iter().any(|z| z.contains(&ip))
        {
            return Lookup::NxDomain;
        }
        Lookup::NotOurs
    }

    /// How many labels, from the right, of the cluster name `key` make the zone apex whose SOA
    /// a negative answer for it carries (RFC 2308): the enclosing octet-aligned reverse zone of
    /// a cluster subnet for reverse names (`10.in-addr.arpa` for a /11, `0.10.10.in-addr.arpa`
    /// for a /24), otherwise the name's top label (cluster names are single-label
    /// names and names below them: `web`, `tasks.web`, `_http._tcp.web`).
    pub fn apex_labels(&self, key: &[u8]) -> usize {
        if let Some(ip) = parse_reverse(key)
            && let Some(z) = self.reverse_zones.iter().find(|z| z.contains(&ip))
        {
            return 2 + usize::from(z.prefix_len() / 8).min(4);
        }
        1
    }

    /// Every name this view answers with its records, in text (`A 10.0.0.2`, `PTR web.`,
    /// `SRV 0 100 80 web.`), for `inspect`. Names hidden from this sandbox are not listed.
    pub fn records(&self) -> BTreeMap<String, Vec<String>> {
        self.names
            .iter()
            .map(|(k, d)| {
                let mut r: Vec<String> = d.a.iter().map(|ip| format!("A {ip}")).collect();
                r.extend(d.aaaa.iter().map(|ip| format!("AAAA {ip}")));
                r.extend(d.ptr.iter().map(|t| format!("PTR {t}.")));
                r.extend(
                    d.srv.iter().map(|s| {
                        format!("SRV {} {} {} {}.", s.priority, s.weight, s.port, s.target)
                    }),
                );
                (String::from_utf8_lossy(k).into_owned(), r)
            })
            .collect()
    }

    /// Looks a name up given as text (any case, optional trailing dot). For tests and tools.
    pub fn lookup_str(&self, name: &str) -> Lookup<'_> {
        let k = name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase();
        self.lookup(k.as_bytes())
    }

    /// Number of names answered (not counting hidden ones).
    pub fn len(&self) -> usize {
        self.names.len()
    }

    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }
}

fn key(name: &str) -> Box<[u8]> {
    name.to_ascii_lowercase().into_bytes().into_boxed_slice()
}

fn srv_name(port: &Name, proto: Protocol, service: &Name) -> String {
    format!("_{port}._{proto}.{service}")
}

/// `d.c.b.a.in-addr.arpa` → `a.b.c.d` (only full four-octet names).
fn parse_reverse(key: &[u8]) -> Option<Ipv4Addr> {
    let head = key.strip_suffix(b".in-addr.arpa")?;
    let text = std::str::from_utf8(head).ok()?;
    let mut oct = [0u8; 4];
    let mut n = 0;
    for part in text.split('.') {
        if n == 4 || part.is_empty() || part.len() > 3 || (part.len() > 1 && part.starts_with('0'))
        {
            return None;
        }
        oct[3 - n] = part.parse().ok()?;
        n += 1;
    }
    (n == 4).then(|| Ipv4Addr::from(oct))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Two networks (app, db internal), a vip service, a dnsrr service, a db-only service.
    pub(crate) fn intent() -> Intent {
        Intent::from_json(
            r#"{
          "version": 1,
          "nodes": [{"id": "n1", "addr": "198.18.0.1"}, {"id": "n2", "addr": "198.18.0.2"}],
          "networks": [
            {"name": "app", "subnet": "10.10.0.0/24", "vni": 4097},
            {"name": "db", "subnet": "10.11.0.0/24", "vni": 4098, "internal": true}
          ],
          "services": [
            {"name": "web", "ports": [{"name": "http", "target": 80}],
             "networks": [{"network": "app", "vip": "10.10.0.2", "aliases": ["www"]}]},
            {"name": "api", "endpoint_mode": "dnsrr", "ports": [{"name": "grpc", "target": 9000}],
             "networks": [{"network": "app"}, {"network": "db"}]},
            {"name": "pg", "networks": [{"network": "db", "vip": "10.11.0.2"}]}
          ],
          "tasks": [
            {"id": "w1", "service": "web", "slot": 1, "node": "n1", "argv": ["x"],
             "networks": [{"network": "app", "ip": "10.10.0.10", "aliases": ["front"]}]},
            {"id": "a1", "service": "api", "slot": 1, "node": "n1", "argv": ["x"],
             "networks": [{"network": "app", "ip": "10.10.0.20"}, {"network": "db", "ip": "10.11.0.20"}]},
            {"id": "a2", "service": "api", "slot": 2, "node": "n2", "argv": ["x"],
             "networks": [{"network": "app", "ip": "10.10.0.21"}, {"network": "db", "ip": "10.11.0.21"}]},
            {"id": "a3", "service": "api", "slot": 3, "node": "n2", "argv": ["x"], "desired_state": "shutdown",
             "networks": [{"network": "app", "ip": "10.10.0.22"}, {"network": "db", "ip": "10.11.0.22"}]},
            {"id": "p1", "service": "pg", "slot": 1, "node": "n2", "argv": ["x"],
             "networks": [{"network": "db", "ip": "10.11.0.30", "aliases": ["primary"]}]}
          ]
        }"#,
        )
        .unwrap()
    }

    fn view(task: &str) -> DnsView {
        DnsView::build(
            &intent(),
            &TaskId::new(task).unwrap(),
            &ViewOptions::default(),
        )
    }

    #[test]
    fn records_list_what_the_sandbox_sees() {
        let r = view("w1").records();
        assert_eq!(r["web"], ["A 10.10.0.2"]);
        assert_eq!(r["tasks.api"], ["A 10.10.0.20", "A 10.10.0.21"]);
        assert_eq!(r["2.0.10.10.in-addr.arpa"], ["PTR web."]);
        assert_eq!(r["_http._tcp.web"], ["SRV 0 100 80 web."]);
        assert!(
            !r.contains_key("pg"),
            "another network's name is not listed"
        );
    }

    fn a(v: &DnsView, name: &str) -> Vec<Ipv4Addr> {
        match v.lookup_str(name) {
            Lookup::Found(d) => d.a.clone(),
            other => panic!("{name}: {other:?}"),
        }
    }

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    #[test]
    fn vip_and_dnsrr_services() {
        let v = view("w1");
        assert_eq!(a(&v, "web"), vec![ip("10.10.0.2")]);
        assert_eq!(
            a(&v, "WWW."),
            vec![ip("10.10.0.2")],
            "alias, any case, trailing dot"
        );
        assert_eq!(a(&v, "tasks.web"), vec![ip("10.10.0.10")]);
        // a3 is shut down: not in any answer.
        assert_eq!(a(&v, "api"), vec![ip("10.10.0.20"), ip("10.10.0.21")]);
        assert_eq!(a(&v, "tasks.api"), vec![ip("10.10.0.20"), ip("10.10.0.21")]);
        assert_eq!(v.lookup_str("api.3.a3"), Lookup::NxDomain);
        assert_eq!(a(&v, "api.1.a1"), vec![ip("10.10.0.20")]);
        assert_eq!(a(&v, "api.2"), vec![ip("10.10.0.21")]);
        assert_eq!(a(&v, "front"), vec![ip("10.10.0.10")]);
    }

    #[test]
    fn scoped_to_the_tasks_networks() {
        let v = view("w1");
        // pg and its alias live on db only, which w1 is not on.
        assert_eq!(v.lookup_str("pg"), Lookup::NxDomain);
        assert_eq!(v.lookup_str("primary"), Lookup::NxDomain);
        assert_eq!(v.lookup_str("pg.1.p1"), Lookup::NxDomain);
        assert_eq!(v.lookup_str("example.com"), Lookup::NotOurs);
        // Reverse names in cluster subnets are ours even when unknown.
        assert_eq!(v.lookup_str("30.0.11.10.in-addr.arpa"), Lookup::NxDomain);
        assert_eq!(v.lookup_str("8.8.8.8.in-addr.arpa"), Lookup::NotOurs);
        // From a task on both networks, the first attachment (app) answers for api.
        let v = view("a1");
        assert_eq!(a(&v, "pg"), vec![ip("10.11.0.2")]);
        assert_eq!(a(&v, "primary"), vec![ip("10.11.0.30")]);
        assert_eq!(a(&v, "tasks.api"), vec![ip("10.10.0.20"), ip("10.10.0.21")]);
    }

    #[test]
    fn ptr_for_tasks_and_vips() {
        let v = view("w1");
        let ptr = |n: &str| match v.lookup_str(n) {
            Lookup::Found(d) => d.ptr.clone(),
            other => panic!("{n}: {other:?}"),
        };
        assert_eq!(ptr("2.0.10.10.in-addr.arpa"), vec![Box::from("web")]);
        assert_eq!(ptr("20.0.10.10.in-addr.arpa"), vec![Box::from("api.1.a1")]);
    }

    #[test]
    fn srv_records() {
        let v = view("w1");
        let Lookup::Found(d) = v.lookup_str("_http._tcp.web") else {
            panic!()
        };
        assert_eq!(
            d.srv,
            vec![SrvData {
                priority: 0,
                weight: 100,
                port: 80,
                target: "web".into()
            }]
        );
        let Lookup::Found(d) = v.lookup_str("_grpc._tcp.api") else {
            panic!()
        };
        let targets: Vec<&str> = d.srv.iter().map(|s| &*s.target).collect();
        assert_eq!(targets, vec!["api.1.a1", "api.2.a2"]);
        assert!(d.srv.iter().all(|s| s.port == 9000 && s.weight == 50));
        assert_eq!(v.lookup_str("_grpc._udp.api"), Lookup::NotOurs);
    }

    #[test]
    fn live_set_overrides_desired_state() {
        let live: BTreeSet<TaskId> = ["w1", "a3"]
            .iter()
            .map(|s| TaskId::new(*s).unwrap())
            .collect();
        let opts = ViewOptions {
            ttl: 1,
            live: Some(live),
        };
        let v = DnsView::build(&intent(), &TaskId::new("w1").unwrap(), &opts);
        assert_eq!(a(&v, "api"), vec![ip("10.10.0.22")]);
        assert_eq!(v.ttl(), 1);
    }

    #[test]
    fn unknown_task_sees_nothing() {
        let v = view("nope");
        assert!(v.is_empty());
        assert_eq!(v.lookup_str("web"), Lookup::NxDomain);
    }

    #[test]
    fn reverse_parse() {
        assert_eq!(parse_reverse(b"4.3.2.1.in-addr.arpa"), Some(ip("1.2.3.4")));
        assert_eq!(parse_reverse(b"3.2.1.in-addr.arpa"), None);
        assert_eq!(parse_reverse(b"04.3.2.1.in-addr.arpa"), None);
        assert_eq!(parse_reverse(b"256.3.2.1.in-addr.arpa"), None);
        assert_eq!(parse_reverse(b"5.4.3.2.1.in-addr.arpa"), None);
    }
}
