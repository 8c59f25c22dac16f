//! The nftables layout of a namespace's load balancer, as data: the objects of one owned table
//! ([`NftOp`]s), planned from [`LbSpec`]s (full program or the difference of two specs), and
//! rendered as `nft` text (a script for `nft -f`, and the listing form for golden files).
//! Pure: the netlink encoder (`crate::linux::nft`) turns the same ops into one batch.
//!
//! Layout of table `ip swarmnet-lb` (kube-proxy's nftables mode is the model):
//! - map `services` `ip daddr . meta l4proto . th dport : goto svc-<key>` for every service
//!   with at least one healthy backend, looked up from nat chains at prerouting (traffic from
//!   sandboxes through the bridge, with bridge netfilter on) and output;
//! - chain `svc-<key>`: one rule per healthy backend, `numgen random mod (N-i) 0 goto
//!   be-<key>-<ip>` (uniform overall; `jhash ip saddr mod N seed S i` with a fixed seed for
//!   client-IP affinity), the last a plain `goto`;
//! - chain `be-<key>-<ip>` per backend (healthy or draining): `dnat to ip:target_port`;
//! - map `no-backends` (same key, `goto reject-svc`) for services without a healthy backend,
//!   looked up for `ct state new` in filter chains at priority dstnat - 10: a reject in a nat
//!   chain never fires; `reject-svc` answers TCP with a reset and anything else with ICMP
//!   port-unreachable; established connections (draining backends) pass;
//! - set `hairpin` of `ip . ip` for every backend address, and a nat postrouting rule that
//!   masquerades only a DNATed connection that lands on its own source.
//!
//! Draining: a draining backend leaves the `numgen` map at once; NAT is decided on a
//! connection's first packet, so established connections keep their conntrack binding.
//!
//! Invariants: an endpoint change of one service touches only that service's chains and map
//! elements (plus the `hairpin` element of an address that appears or disappears in the whole
//! namespace), never another service's objects, so its batch size does not depend on how many
//! services exist; chain and set names are derived from the key, so the layout is stable.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::Ipv4Addr;

use super::model::{Affinity, LbSpec, Proto, ServiceChange, ServiceKey, ServiceSpec, diff};

/// Our table: family `ip`, this name.
pub const TABLE: &str = "swarmnet-lb";
/// Chain that answers services without a healthy backend.
pub const REJECT_CHAIN: &str = "reject-svc";
/// Seed of the affinity hash: fixed, so a client keeps its backend across rule replacements.
pub const AFFINITY_SEED: u32 = 0x736e_6c62;

/// Netfilter hooks we attach to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hook {
    Prerouting,
    Output,
    Postrouting,
}

impl Hook {
    pub fn number(self) -> u32 {
        match self {
            Self::Prerouting => 0,
            Self::Output => 3,
            Self::Postrouting => 4,
        }
    }
    fn as_str(self) -> &'static str {
        match self {
            Self::Prerouting => "prerouting",
            Self::Output => "output",
            Self::Postrouting => "postrouting",
        }
    }
}

/// A base chain: type, hook and priority (policy is always accept).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BaseChain {
    /// `"nat"` or `"filter"`.
    pub kind: &'static str,
    pub hook: Hook,
    pub priority: i32,
}

impl BaseChain {
    /// The priority as nft prints it (symbolic names exist only for some hooks).
    fn priority_text(&self) -> String {
        match (self.hook, self.priority) {
            (Hook::Prerouting, -100) => "dstnat".into(),
            (Hook::Prerouting, p) if p < -100 => format!("dstnat - {}", -100 - p),
            (Hook::Postrouting, 100) => "srcnat".into(),
            (_, p) => p.to_string(),
        }
    }
}

/// Our named sets and maps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum NamedSet {
    /// `ipv4_addr . inet_proto . inet_service : verdict`
    Services,
    /// Same type, every element `goto reject-svc`.
    NoBackends,
    /// `ipv4_addr . ipv4_addr`
    Hairpin,
}

impl NamedSet {
    pub fn name(self) -> &'static str {
        match self {
            Self::Services => "services",
            Self::NoBackends => "no-backends",
            Self::Hairpin => "hairpin",
        }
    }
    pub fn is_map(self) -> bool {
        !matches!(self, Self::Hairpin)
    }
    fn type_text(self) -> &'static str {
        match self {
            Self::Services | Self::NoBackends => "ipv4_addr . inet_proto . inet_service : verdict",
            Self::Hairpin => "ipv4_addr . ipv4_addr",
        }
    }
}

/// An element of a named set.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Elem {
    /// `vip . proto . port : goto chain`
    Service { key: ServiceKey, chain: String },
    /// `ip . ip`
    Hairpin(Ipv4Addr),
}

impl Elem {
    fn key_text(&self) -> String {
        match self {
            Self::Service { key, .. } => format!("{} . {} . {}", key.vip, key.proto, key.port),
            Self::Hairpin(ip) => format!("{ip} . {ip}"),
        }
    }
    fn text(&self) -> String {
        match self {
            Self::Service { chain, .. } => format!("{} : goto {chain}", self.key_text()),
            Self::Hairpin(_) => self.key_text(),
        }
    }
}

/// The rules our layout uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rule {
    /// `ip daddr . meta l4proto . th dport vmap @services`
    Dispatch,
    /// `ct state new ip daddr . meta l4proto . th dport vmap @no-backends`
    NoBackendDispatch,
    /// `ct status dnat ip saddr . ip daddr @hairpin masquerade`
    HairpinMasquerade,
    /// `reject with tcp reset` (nft adds the `meta l4proto tcp` dependency)
    RejectTcp,
    /// `reject` (ICMP port-unreachable)
    Reject,
    /// `numgen random mod <modulus> 0 goto <chain>`: rule `i` of a service's `n` picks has
    /// modulus `n - i`, so each backend gets 1/n of the new connections.
    RandomGoto { modulus: u32, chain: String },
    /// `jhash ip saddr mod <modulus> seed <AFFINITY_SEED> <index> goto <chain>`
    HashGoto {
        modulus: u32,
        index: u32,
        chain: String,
    },
    /// `goto <chain>`: the last pick.
    Goto(String),
    /// `meta l4proto <proto> dnat to ip:port`
    Dnat {
        proto: Proto,
        ip: Ipv4Addr,
        port: u16,
    },
}

impl Rule {
    pub fn text(&self) -> String {
        match self {
            Self::Dispatch => "ip daddr . meta l4proto . th dport vmap @services".into(),
            Self::NoBackendDispatch => {
                "ct state new ip daddr . meta l4proto . th dport vmap @no-backends".into()
            }
            Self::HairpinMasquerade => {
                "ct status dnat ip saddr . ip daddr @hairpin masquerade".into()
            }
            Self::RejectTcp => "reject with tcp reset".into(),
            Self::Reject => "reject".into(),
            Self::RandomGoto { modulus, chain } => {
                format!("numgen random mod {modulus} 0 goto {chain}")
            }
            Self::HashGoto {
                modulus,
                index,
                chain,
            } => {
                format!("jhash ip saddr mod {modulus} seed {AFFINITY_SEED:#x} {index} goto {chain}")
            }
            Self::Goto(chain) => format!("goto {chain}"),
            Self::Dnat { proto, ip, port } => format!("meta l4proto {proto} dnat to {ip}:{port}"),
        }
    }
}

/// One change to the table. A list of these is one transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NftOp {
    /// Creates the table if missing (no error if it exists).
    AddTable,
    DelTable,
    AddChain {
        name: String,
        base: Option<BaseChain>,
    },
    /// Deletes every rule of the chain.
    FlushChain {
        name: String,
    },
    /// Deletes the chain and its rules; nothing may refer to it any more.
    DelChain {
        name: String,
    },
    AddSet(NamedSet),
    AddElems {
        set: NamedSet,
        elems: Vec<Elem>,
    },
    DelElems {
        set: NamedSet,
        elems: Vec<Elem>,
    },
    AddRule {
        chain: String,
        rule: Rule,
    },
}

pub fn svc_chain(key: &ServiceKey) -> String {
    format!("svc-{}-{}-{}", key.vip, key.proto, key.port)
}

pub fn be_chain(key: &ServiceKey, ip: Ipv4Addr) -> String {
    format!("be-{}-{}-{}-{ip}", key.vip, key.proto, key.port)
}

/// The base chains and their rules.
fn base_chains() -> Vec<(&'static str, BaseChain, Rule)> {
    let nat = |hook, priority| BaseChain {
        kind: "nat",
        hook,
        priority,
    };
    let filter = |hook, priority| BaseChain {
        kind: "filter",
        hook,
        priority,
    };
    vec![
        (
            "nat-prerouting",
            nat(Hook::Prerouting, -100),
            Rule::Dispatch,
        ),
        ("nat-output", nat(Hook::Output, -100), Rule::Dispatch),
        (
            "nat-postrouting",
            nat(Hook::Postrouting, 100),
            Rule::HairpinMasquerade,
        ),
        (
            "filter-prerouting",
            filter(Hook::Prerouting, -110),
            Rule::NoBackendDispatch,
        ),
        (
            "filter-output",
            filter(Hook::Output, -110),
            Rule::NoBackendDispatch,
        ),
    ]
}

/// The rules of a service chain: one `goto` per healthy backend, each taken with the
/// probability that makes the choice uniform (or by the client's hash, for affinity). Rules
/// rather than a `numgen ... vmap { }` anonymous map: the kernel finds an anonymous map of a
/// batch by walking the whole transaction, which made a 10k-service program quadratic.
fn pick_rules(s: &ServiceSpec) -> Vec<Rule> {
    let chains: Vec<String> = s.healthy().iter().map(|ip| be_chain(&s.key, *ip)).collect();
    let n = u32::try_from(chains.len()).unwrap_or(u32::MAX);
    let hash = matches!(s.affinity, Affinity::ClientIp { .. });
    let mut out = Vec::with_capacity(chains.len());
    for (i, chain) in chains.into_iter().enumerate() {
        let i = u32::try_from(i).unwrap_or(u32::MAX);
        out.push(if i + 1 == n {
            Rule::Goto(chain)
        } else if hash {
            Rule::HashGoto {
                modulus: n,
                index: i,
                chain,
            }
        } else {
            Rule::RandomGoto {
                modulus: n - i,
                chain,
            }
        });
    }
    out
}

/// Where a service's map element lives and what it points to.
fn dispatch_elem(s: &ServiceSpec) -> (NamedSet, Elem) {
    if s.healthy().is_empty() {
        (
            NamedSet::NoBackends,
            Elem::Service {
                key: s.key,
                chain: REJECT_CHAIN.into(),
            },
        )
    } else {
        (
            NamedSet::Services,
            Elem::Service {
                key: s.key,
                chain: svc_chain(&s.key),
            },
        )
    }
}

fn dnat(s: &ServiceSpec, ip: Ipv4Addr) -> Rule {
    Rule::Dnat {
        proto: s.key.proto,
        ip,
        port: s.target_port,
    }
}

/// Ops grouped in the order one transaction needs them: new chains before the rules that
/// jump to them; flushes before the deletion of what they referenced; elements removed before
/// the chains they point to.
#[derive(Debug, Default)]
struct Phases {
    create: Vec<NftOp>,
    rewire: Vec<NftOp>,
    del_elems: BTreeMap<NamedSet, Vec<Elem>>,
    add_elems: BTreeMap<NamedSet, Vec<Elem>>,
    delete_svc: Vec<NftOp>,
    delete_be: Vec<NftOp>,
}

impl Phases {
    fn add_backend(&mut self, s: &ServiceSpec, ip: Ipv4Addr) {
        let name = be_chain(&s.key, ip);
        self.create.push(NftOp::AddChain {
            name: name.clone(),
            base: None,
        });
        self.create.push(NftOp::AddRule {
            chain: name,
            rule: dnat(s, ip),
        });
    }

    fn added(&mut self, s: &ServiceSpec) {
        for ip in s.backends.keys() {
            self.add_backend(s, *ip);
        }
        let name = svc_chain(&s.key);
        self.create.push(NftOp::AddChain {
            name: name.clone(),
            base: None,
        });
        for rule in pick_rules(s) {
            self.create.push(NftOp::AddRule {
                chain: name.clone(),
                rule,
            });
        }
        let (set, elem) = dispatch_elem(s);
        self.add_elems.entry(set).or_default().push(elem);
    }

    fn removed(&mut self, s: &ServiceSpec) {
        let (set, elem) = dispatch_elem(s);
        self.del_elems.entry(set).or_default().push(elem);
        self.delete_svc.push(NftOp::DelChain {
            name: svc_chain(&s.key),
        });
        for ip in s.backends.keys() {
            self.delete_be.push(NftOp::DelChain {
                name: be_chain(&s.key, *ip),
            });
        }
    }

    fn changed(&mut self, old: &ServiceSpec, new: &ServiceSpec) {
        for ip in new.backends.keys() {
            if !old.backends.contains_key(ip) {
                self.add_backend(new, *ip);
            } else if old.target_port != new.target_port {
                let name = be_chain(&new.key, *ip);
                self.rewire.push(NftOp::FlushChain { name: name.clone() });
                self.rewire.push(NftOp::AddRule {
                    chain: name,
                    rule: dnat(new, *ip),
                });
            }
        }
        let (old_pick, new_pick) = (pick_rules(old), pick_rules(new));
        if old_pick != new_pick {
            let name = svc_chain(&new.key);
            if !old_pick.is_empty() {
                self.rewire.push(NftOp::FlushChain { name: name.clone() });
            }
            for rule in new_pick {
                self.rewire.push(NftOp::AddRule {
                    chain: name.clone(),
                    rule,
                });
            }
        }
        let (old_set, old_elem) = dispatch_elem(old);
        let (new_set, new_elem) = dispatch_elem(new);
        if old_set != new_set {
            self.del_elems.entry(old_set).or_default().push(old_elem);
            self.add_elems.entry(new_set).or_default().push(new_elem);
        }
        for ip in old.backends.keys() {
            if !new.backends.contains_key(ip) {
                self.delete_be.push(NftOp::DelChain {
                    name: be_chain(&old.key, *ip),
                });
            }
        }
    }

    fn finish(self) -> Vec<NftOp> {
        let mut out = self.create;
        out.extend(self.rewire);
        for (set, elems) in self.del_elems {
            out.push(NftOp::DelElems { set, elems });
        }
        for (set, elems) in self.add_elems {
            out.push(NftOp::AddElems { set, elems });
        }
        out.extend(self.delete_svc);
        out.extend(self.delete_be);
        out
    }
}

/// What the nftables backend keeps in memory about a namespace: the spec it applied last and
/// how many backends use each address (for the `hairpin` set).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NftLbState {
    pub spec: LbSpec,
    pub hairpin: BTreeMap<Ipv4Addr, u32>,
}

impl NftLbState {
    /// Ops that replace whatever table exists with `spec`, and the state after them.
    pub fn plan_full(spec: &LbSpec) -> (Vec<NftOp>, Self) {
        let mut ops = vec![NftOp::AddTable, NftOp::DelTable, NftOp::AddTable];
        for set in [NamedSet::Services, NamedSet::NoBackends, NamedSet::Hairpin] {
            ops.push(NftOp::AddSet(set));
        }
        ops.push(NftOp::AddChain {
            name: REJECT_CHAIN.into(),
            base: None,
        });
        ops.push(NftOp::AddRule {
            chain: REJECT_CHAIN.into(),
            rule: Rule::RejectTcp,
        });
        ops.push(NftOp::AddRule {
            chain: REJECT_CHAIN.into(),
            rule: Rule::Reject,
        });
        let mut phases = Phases::default();
        let mut hairpin: BTreeMap<Ipv4Addr, u32> = BTreeMap::new();
        for s in spec.services.values() {
            phases.added(s);
            for ip in s.backends.keys() {
                *hairpin.entry(*ip).or_default() += 1;
            }
        }
        if !hairpin.is_empty() {
            phases.add_elems.insert(
                NamedSet::Hairpin,
                hairpin.keys().map(|ip| Elem::Hairpin(*ip)).collect(),
            );
        }
        ops.extend(phases.finish());
        // Base chains last: the hooks see a complete table from the first packet on (the
        // transaction is atomic anyway; this keeps the text readable top-down too).
        for (name, base, rule) in base_chains() {
            ops.push(NftOp::AddChain {
                name: name.into(),
                base: Some(base),
            });
            ops.push(NftOp::AddRule {
                chain: name.into(),
                rule,
            });
        }
        (
            ops,
            Self {
                spec: spec.clone(),
                hairpin,
            },
        )
    }

    /// Ops that turn the table from `self.spec` into `new`, and the number of services that
    /// changed; updates `self` to match. Only changed services are visited beyond the
    /// comparison.
    pub fn plan_diff(&mut self, new: &LbSpec) -> (Vec<NftOp>, usize) {
        let mut phases = Phases::default();
        let mut delta: BTreeMap<Ipv4Addr, i64> = BTreeMap::new();
        let changes = diff(&self.spec, new);
        for change in &changes {
            match change {
                ServiceChange::Added(s) => {
                    phases.added(s);
                    for ip in s.backends.keys() {
                        *delta.entry(*ip).or_default() += 1;
                    }
                }
                ServiceChange::Removed(s) => {
                    phases.removed(s);
                    for ip in s.backends.keys() {
                        *delta.entry(*ip).or_default() -= 1;
                    }
                }
                ServiceChange::Changed { old, new } => {
                    phases.changed(old, new);
                    for ip in old.backends.keys() {
                        *delta.entry(*ip).or_default() -= 1;
                    }
                    for ip in new.backends.keys() {
                        *delta.entry(*ip).or_default() += 1;
                    }
                }
            }
        }
        for (ip, d) in delta {
            let before = i64::from(self.hairpin.get(&ip).copied().unwrap_or(0));
            let after = u32::try_from((before + d).max(0)).unwrap_or(u32::MAX);
            if before == 0 && after > 0 {
                phases
                    .add_elems
                    .entry(NamedSet::Hairpin)
                    .or_default()
                    .push(Elem::Hairpin(ip));
            } else if before > 0 && after == 0 {
                phases
                    .del_elems
                    .entry(NamedSet::Hairpin)
                    .or_default()
                    .push(Elem::Hairpin(ip));
            }
            if after == 0 {
                self.hairpin.remove(&ip);
            } else {
                self.hairpin.insert(ip, after);
            }
        }
        // Update the remembered spec with the changed services only (no whole-spec clone).
        let updates: Vec<(ServiceKey, Option<ServiceSpec>)> = changes
            .iter()
            .map(|c| match c {
                ServiceChange::Added(s) | ServiceChange::Changed { new: s, .. } => {
                    (s.key, Some((*s).clone()))
                }
                ServiceChange::Removed(s) => (s.key, None),
            })
            .collect();
        let ops = phases.finish();
        let changed = updates.len();
        for (key, s) in updates {
            match s {
                Some(s) => self.spec.services.insert(key, s),
                None => self.spec.services.remove(&key),
            };
        }
        self.spec.timeouts = new.timeouts;
        (ops, changed)
    }
}

fn table_ref() -> String {
    format!("ip {TABLE}")
}

/// The ops as an `nft -f` script (one transaction when fed to `nft -f`).
pub fn render_script(ops: &[NftOp]) -> String {
    let t = table_ref();
    let mut s = String::new();
    for op in ops {
        match op {
            NftOp::AddTable => {
                let _ = writeln!(s, "add table {t}");
            }
            NftOp::DelTable => {
                let _ = writeln!(s, "delete table {t}");
            }
            NftOp::AddChain { name, base: None } => {
                let _ = writeln!(s, "add chain {t} {name}");
            }
            NftOp::AddChain {
                name,
                base: Some(b),
            } => {
                let _ = writeln!(
                    s,
                    "add chain {t} {name} {{ type {} hook {} priority {}; policy accept; }}",
                    b.kind,
                    b.hook.as_str(),
                    b.priority_text()
                );
            }
            NftOp::FlushChain { name } => {
                let _ = writeln!(s, "flush chain {t} {name}");
            }
            NftOp::DelChain { name } => {
                let _ = writeln!(s, "delete chain {t} {name}");
            }
            NftOp::AddSet(set) => {
                let _ = writeln!(
                    s,
                    "add {} {t} {} {{ type {}; }}",
                    if set.is_map() { "map" } else { "set" },
                    set.name(),
                    set.type_text()
                );
            }
            NftOp::AddElems { set, elems } => {
                let items: Vec<String> = elems.iter().map(Elem::text).collect();
                let _ = writeln!(
                    s,
                    "add element {t} {} {{ {} }}",
                    set.name(),
                    items.join(", ")
                );
            }
            NftOp::DelElems { set, elems } => {
                let items: Vec<String> = elems.iter().map(Elem::key_text).collect();
                let _ = writeln!(
                    s,
                    "delete element {t} {} {{ {} }}",
                    set.name(),
                    items.join(", ")
                );
            }
            NftOp::AddRule { chain, rule } => {
                let _ = writeln!(s, "add rule {t} {chain} {}", rule.text());
            }
        }
    }
    s
}

/// The whole table for `spec` in the form `nft list table ip swarmnet-lb` prints it, with
/// sets, maps and chains sorted by name and elements sorted (see [`normalize_listing`]).
pub fn render_table(spec: &LbSpec) -> String {
    let (ops, _) = NftLbState::plan_full(spec);
    let mut sets: BTreeMap<&'static str, (NamedSet, Vec<Elem>)> = BTreeMap::new();
    let mut chains: BTreeMap<String, (Option<BaseChain>, Vec<String>)> = BTreeMap::new();
    for op in &ops {
        match op {
            NftOp::AddSet(set) => {
                sets.insert(set.name(), (*set, Vec::new()));
            }
            NftOp::AddElems { set, elems } => {
                if let Some(e) = sets.get_mut(set.name()) {
                    e.1.extend(elems.iter().cloned());
                }
            }
            NftOp::AddChain { name, base } => {
                chains.insert(name.clone(), (*base, Vec::new()));
            }
            NftOp::AddRule { chain, rule } => {
                if let Some(c) = chains.get_mut(chain) {
                    c.1.push(rule.text());
                }
            }
            _ => {}
        }
    }
    let mut blocks = Vec::new();
    for (name, (set, elems)) in &sets {
        let mut b = format!(
            "\t{} {name} {{\n\t\ttype {}\n",
            if set.is_map() { "map" } else { "set" },
            set.type_text()
        );
        if !elems.is_empty() {
            let mut items: Vec<String> = elems.iter().map(Elem::text).collect();
            items.sort();
            let _ = writeln!(b, "\t\telements = {{ {} }}", items.join(", "));
        }
        b.push_str("\t}\n");
        blocks.push(b);
    }
    for (name, (base, rules)) in &chains {
        let mut b = format!("\tchain {name} {{\n");
        if let Some(base) = base {
            let _ = writeln!(
                b,
                "\t\ttype {} hook {} priority {}; policy accept;",
                base.kind,
                base.hook.as_str(),
                base.priority_text()
            );
        }
        for r in rules {
            let _ = writeln!(b, "\t\t{r}");
        }
        b.push_str("\t}\n");
        blocks.push(b);
    }
    format!("table {} {{\n{}}}\n", table_ref(), blocks.join("\n"))
}

/// Puts an `nft list table` output into the canonical form [`render_table`] produces: blocks
/// (sets, maps, chains) sorted by kind and name, element lists joined onto one line and sorted,
/// anonymous-map contents left as printed. Needed because the kernel lists objects in creation
/// order and hash-set elements in hash order.
pub fn normalize_listing(text: &str) -> String {
    // Join element lists that nft wraps over several lines.
    let mut lines: Vec<String> = Vec::new();
    let mut open: Option<String> = None;
    for line in text.lines() {
        if let Some(acc) = open.as_mut() {
            acc.push(' ');
            acc.push_str(line.trim());
            if line.trim_end().ends_with('}') {
                lines.push(open.take().unwrap_or_default());
            }
            continue;
        }
        if line.trim_start().starts_with("elements = {") && !line.trim_end().ends_with('}') {
            open = Some(line.to_string());
            continue;
        }
        lines.push(line.to_string());
    }
    let mut header = String::new();
    let mut blocks: Vec<(u8, String, String)> = Vec::new();
    let mut cur: Option<(u8, String, String)> = None;
    for line in &lines {
        let t = line.trim();
        if t.starts_with("table ") {
            header = format!("{t}\n");
            continue;
        }
        if cur.is_none() {
            let mut words = t.split_whitespace();
            let kind = match words.next() {
                Some("map") | Some("set") => 0,
                Some("chain") => 1,
                _ => continue,
            };
            let name = words.next().unwrap_or_default().to_string();
            cur = Some((kind, name, format!("\t{t}\n")));
            continue;
        }
        if let Some((_, _, body)) = cur.as_mut() {
            if t == "}" {
                body.push_str("\t}\n");
                if let Some(done) = cur.take() {
                    blocks.push(done);
                }
                continue;
            }
            if let Some(items) = t
                .strip_prefix("elements = { ")
                .and_then(|r| r.strip_suffix(" }"))
            {
                let mut items: Vec<&str> = items.split(", ").map(str::trim).collect();
                items.sort();
                let _ = writeln!(body, "\t\telements = {{ {} }}", items.join(", "));
            } else {
                let _ = writeln!(body, "\t\t{t}");
            }
        }
    }
    blocks.sort_by(|a, b| (a.0, &a.1).cmp(&(b.0, &b.1)));
    let bodies: Vec<String> = blocks.into_iter().map(|b| b.2).collect();
    format!("{header}{}}}\n", bodies.join("\n"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lb::model::BackendState;

    fn key(last: u8) -> ServiceKey {
        ServiceKey {
            vip: Ipv4Addr::new(10, 0, 0, last),
            proto: Proto::Tcp,
            port: 80,
        }
    }
    fn ip(last: u8) -> Ipv4Addr {
        Ipv4Addr::new(10, 0, 1, last)
    }

    fn spec(n: u8) -> LbSpec {
        LbSpec::from_services((1..=n).map(|i| ServiceSpec::new(key(i), 8080, [ip(i), ip(100)])))
    }

    #[test]
    fn endpoint_change_touches_only_its_service() {
        for n in [2u8, 50] {
            let (_, mut state) = NftLbState::plan_full(&spec(n));
            let mut new = spec(n);
            new.services
                .get_mut(&key(1))
                .unwrap()
                .backends
                .insert(ip(200), BackendState::Healthy);
            let ops = state.plan_diff(&new).0;
            let script = render_script(&ops);
            assert_eq!(
                script,
                "add chain ip swarmnet-lb be-10.0.0.1-tcp-80-10.0.1.200\n\
                 add rule ip swarmnet-lb be-10.0.0.1-tcp-80-10.0.1.200 meta l4proto tcp dnat to 10.0.1.200:8080\n\
                 flush chain ip swarmnet-lb svc-10.0.0.1-tcp-80\n\
                 add rule ip swarmnet-lb svc-10.0.0.1-tcp-80 numgen random mod 3 0 goto be-10.0.0.1-tcp-80-10.0.1.1\n\
                 add rule ip swarmnet-lb svc-10.0.0.1-tcp-80 numgen random mod 2 0 goto be-10.0.0.1-tcp-80-10.0.1.100\n\
                 add rule ip swarmnet-lb svc-10.0.0.1-tcp-80 goto be-10.0.0.1-tcp-80-10.0.1.200\n\
                 add element ip swarmnet-lb hairpin { 10.0.1.200 . 10.0.1.200 }\n"
            );
            assert_eq!(state.spec, new);
            assert!(state.plan_diff(&new).0.is_empty());
        }
    }

    #[test]
    fn last_healthy_backend_drained_moves_to_reject() {
        let s = LbSpec::from_services([ServiceSpec::new(key(1), 8080, [ip(1)])]);
        let (_, mut state) = NftLbState::plan_full(&s);
        let mut new = s.clone();
        new.services
            .get_mut(&key(1))
            .unwrap()
            .backends
            .insert(ip(1), BackendState::Draining);
        let script = render_script(&state.plan_diff(&new).0);
        assert_eq!(
            script,
            "flush chain ip swarmnet-lb svc-10.0.0.1-tcp-80\n\
             delete element ip swarmnet-lb services { 10.0.0.1 . tcp . 80 }\n\
             add element ip swarmnet-lb no-backends { 10.0.0.1 . tcp . 80 : goto reject-svc }\n"
        );
        // Removing the service deletes its element, its chain, then its backends' chains.
        let script = render_script(&state.plan_diff(&LbSpec::default()).0);
        assert_eq!(
            script,
            "delete element ip swarmnet-lb no-backends { 10.0.0.1 . tcp . 80 }\n\
             delete element ip swarmnet-lb hairpin { 10.0.1.1 . 10.0.1.1 }\n\
             delete chain ip swarmnet-lb svc-10.0.0.1-tcp-80\n\
             delete chain ip swarmnet-lb be-10.0.0.1-tcp-80-10.0.1.1\n"
        );
    }

    #[test]
    fn normalize_sorts_blocks_and_wrapped_elements() {
        let listed = "table ip swarmnet-lb {\n\tset hairpin {\n\t\ttype ipv4_addr . ipv4_addr\n\t\telements = { 10.0.1.2 . 10.0.1.2,\n\t\t\t     10.0.1.1 . 10.0.1.1 }\n\t}\n\n\tchain b {\n\t}\n\n\tchain a {\n\t\treject\n\t}\n}\n";
        assert_eq!(
            normalize_listing(listed),
            "table ip swarmnet-lb {\n\tset hairpin {\n\t\ttype ipv4_addr . ipv4_addr\n\t\telements = { 10.0.1.1 . 10.0.1.1, 10.0.1.2 . 10.0.1.2 }\n\t}\n\n\tchain a {\n\t\treject\n\t}\n\n\tchain b {\n\t}\n}\n"
        );
    }
}
