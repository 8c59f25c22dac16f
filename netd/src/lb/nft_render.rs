//! The nftables layout of a namespace's load balancer, as data: the objects of one owned table
//! ([`NftOp`]s), planned from [`LbSpec`]s (full program or the difference of two specs), and
//! rendered as `nft` text (a script for `nft -f`, and the listing form for golden files).
//! Pure: the netlink encoder (`crate::linux::nft`) turns the same ops into one batch.
//!
//! Layout of table `ip swarmnet-lb`: no verdict maps, no per-service or per-backend chains, so
//! no jump graph that grows with the services. Every service is data in named maps:
//! - map `random-<N>` (or `hash-<N>` with client-IP affinity) for the services that pick among
//!   `N` healthy backends: `vip . proto . port . slot : backend-ip . target-port`, slots `0..N`
//!   in address order;
//! - chain `services` has one rule per such map, `dnat ip to ip daddr . meta l4proto . th dport
//!   . numgen random mod <N> map @random-<N>` (uniform), or the same with `jhash ip saddr mod
//!   <N> seed S` for affinity (the fixed seed keeps a client's backend while its service keeps
//!   its backends); a service that is not in the map misses the lookup and the rule does not
//!   apply. The number of these rules is the number of distinct backend counts in use, not
//!   the number of services; the nat base chains at prerouting and output `jump services`;
//! - set `no-backends`: services without a healthy backend, rejected for `ct state new` from
//!   filter chains at priority dstnat - 10 (`goto reject-svc`: a reject in a nat chain never
//!   fires); TCP gets a reset, anything else ICMP port-unreachable;
//! - set `hairpin` of `ip . ip` for every backend address, and a nat postrouting rule that
//!   masquerades only a DNATed connection that lands on its own source.
//!
//! Why (measured with perf on 6.18, see bench/README.md): the kernel validates the whole jump
//! graph of a table (every chain reachable through `jump`/`goto`, every verdict-map element)
//! on each commit that adds a rule or a `goto` element, and a rule that binds a map walks every
//! element of that map (`nf_tables_bind_set`). With per-service chains the first made one
//! endpoint change cost O(services) (200 ms at 10k services); a single shared slot map made
//! the second cost O(backends) whenever a rule was added. Here an endpoint change is element
//! updates only, which need no validation; a rule is added only when a backend count appears
//! table-wide, and it binds a new, empty map.
//!
//! Draining: a draining backend leaves the slots at once; NAT is decided on a connection's first
//! packet, so established connections keep their conntrack binding.
//!
//! Invariants: an endpoint change of one service touches only that service's elements (its
//! slots, in one `random-<N>` map or moved to another, plus the `hairpin` element of an
//! address that appears or disappears in the whole namespace, and one map and rule when its
//! backend count is new to the table), so its batch size does not depend on how many services
//! exist; slots are in address order, so the elements are a function of the spec; pick maps
//! and rules stay, empty, after their last service left (see [`NftLbState`]).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::Ipv4Addr;

use super::model::{Affinity, LbSpec, Proto, ServiceChange, ServiceKey, ServiceSpec, diff};

/// Our table: family `ip`, this name.
pub const TABLE: &str = "swarmnet-lb";
/// Chain that answers services without a healthy backend.
pub const REJECT_CHAIN: &str = "reject-svc";
/// Regular chain with the pick rules, jumped to from the nat base chains.
pub const SERVICES_CHAIN: &str = "services";
/// Seed of the affinity hash: fixed, so a client keeps its backend across rule replacements.
pub const AFFINITY_SEED: u32 = 0x736e_6c62;
/// The declared type of the pick maps, as nft prints it.
pub const PICK_MAP_TYPEOF: &str =
    "typeof ip daddr . meta l4proto . th dport . numgen random mod 1 : ip daddr . th dport";

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

/// How a service picks among its `n` healthy backends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Pick {
    /// Client-IP affinity (`jhash ip saddr`) instead of `numgen random`.
    pub hash: bool,
    pub n: u32,
}

impl Pick {
    /// The pick of a service, `None` without a healthy backend.
    pub fn of(s: &ServiceSpec) -> Option<Self> {
        let n = u32::try_from(s.healthy().len()).unwrap_or(u32::MAX);
        (n > 0).then_some(Self {
            hash: matches!(s.affinity, Affinity::ClientIp { .. }),
            n,
        })
    }
}

/// Our named sets and maps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum NamedSet {
    /// `ipv4_addr . inet_proto . inet_service`: services without a healthy backend.
    NoBackends,
    /// `ipv4_addr . ipv4_addr`
    Hairpin,
    /// `vip . proto . port . slot : ip . port` of the services that pick this way.
    Pick(Pick),
}

impl NamedSet {
    pub fn name(self) -> String {
        match self {
            Self::NoBackends => "no-backends".into(),
            Self::Hairpin => "hairpin".into(),
            Self::Pick(Pick { hash: false, n }) => format!("random-{n}"),
            Self::Pick(Pick { hash: true, n }) => format!("hash-{n}"),
        }
    }
    pub fn is_map(self) -> bool {
        matches!(self, Self::Pick(_))
    }
    fn type_text(self) -> &'static str {
        match self {
            Self::NoBackends => "type ipv4_addr . inet_proto . inet_service",
            Self::Hairpin => "type ipv4_addr . ipv4_addr",
            Self::Pick(_) => PICK_MAP_TYPEOF,
        }
    }
}

/// An element of a named set.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Elem {
    /// `vip . proto . port`
    Service(ServiceKey),
    /// `vip . proto . port . slot : ip . port`
    Slot {
        key: ServiceKey,
        slot: u32,
        ip: Ipv4Addr,
        port: u16,
    },
    /// `ip . ip`
    Hairpin(Ipv4Addr),
}

impl Elem {
    fn key_text(&self) -> String {
        match self {
            Self::Service(key) => format!("{} . {} . {}", key.vip, key.proto, key.port),
            Self::Slot { key, slot, .. } => {
                format!("{} . {} . {} . {slot}", key.vip, key.proto, key.port)
            }
            Self::Hairpin(ip) => format!("{ip} . {ip}"),
        }
    }
    fn text(&self) -> String {
        match self {
            Self::Slot { ip, port, .. } => format!("{} : {ip} . {port}", self.key_text()),
            _ => self.key_text(),
        }
    }
}

/// The rules our layout uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rule {
    /// `jump services`
    JumpServices,
    /// `ct state new ip daddr . meta l4proto . th dport @no-backends goto reject-svc`
    NoBackendReject,
    /// `ct status dnat ip saddr . ip daddr @hairpin masquerade`
    HairpinMasquerade,
    /// `ip saddr . ip daddr @hairpin masquerade`: the IPVS backend's companion table, where
    /// conntrack never marks a connection DNAT (IPVS rewrites outside netfilter's NAT).
    HairpinMasqueradeAny,
    /// `reject with tcp reset` (nft adds the `meta l4proto tcp` dependency)
    RejectTcp,
    /// `reject` (ICMP port-unreachable)
    Reject,
    /// `dnat ip to ip daddr . meta l4proto . th dport . numgen random mod <n> map
    /// @random-<n>` (or `jhash ip saddr mod <n> seed S` ... `@hash-<n>`).
    Pick(Pick),
}

const SERVICE_TUPLE: &str = "ip daddr . meta l4proto . th dport";

impl Rule {
    pub fn text(&self) -> String {
        match self {
            Self::JumpServices => format!("jump {SERVICES_CHAIN}"),
            Self::NoBackendReject => {
                format!("ct state new {SERVICE_TUPLE} @no-backends goto {REJECT_CHAIN}")
            }
            Self::HairpinMasquerade => {
                "ct status dnat ip saddr . ip daddr @hairpin masquerade".into()
            }
            Self::HairpinMasqueradeAny => "ip saddr . ip daddr @hairpin masquerade".into(),
            Self::RejectTcp => "reject with tcp reset".into(),
            Self::Reject => "reject".into(),
            Self::Pick(p) => {
                let slot = if p.hash {
                    format!("jhash ip saddr mod {} seed {AFFINITY_SEED:#x}", p.n)
                } else {
                    format!("numgen random mod {}", p.n)
                };
                format!(
                    "dnat ip to {SERVICE_TUPLE} . {slot} map @{}",
                    NamedSet::Pick(*p).name()
                )
            }
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
    AddSet(NamedSet),
    /// Deletes a set; no rule may refer to it any more.
    DelSet(NamedSet),
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
            Rule::JumpServices,
        ),
        ("nat-output", nat(Hook::Output, -100), Rule::JumpServices),
        (
            "nat-postrouting",
            nat(Hook::Postrouting, 100),
            Rule::HairpinMasquerade,
        ),
        (
            "filter-prerouting",
            filter(Hook::Prerouting, -110),
            Rule::NoBackendReject,
        ),
        (
            "filter-output",
            filter(Hook::Output, -110),
            Rule::NoBackendReject,
        ),
    ]
}

/// The slots of a service: its healthy backends in address order.
fn slots(s: &ServiceSpec) -> Vec<Elem> {
    s.healthy()
        .into_iter()
        .enumerate()
        .map(|(i, ip)| Elem::Slot {
            key: s.key,
            slot: u32::try_from(i).unwrap_or(u32::MAX),
            ip,
            port: s.target_port,
        })
        .collect()
}

/// Element changes grouped per set: deletions go before additions in a transaction, so that a
/// key can be deleted and added again with other data.
#[derive(Debug, Default)]
struct Phases {
    del_elems: BTreeMap<NamedSet, Vec<Elem>>,
    add_elems: BTreeMap<NamedSet, Vec<Elem>>,
}

impl Phases {
    fn add(&mut self, set: NamedSet, e: Elem) {
        self.add_elems.entry(set).or_default().push(e);
    }
    fn del(&mut self, set: NamedSet, e: Elem) {
        self.del_elems.entry(set).or_default().push(e);
    }

    /// A service's elements: its slots in its pick map, or its key in `no-backends`.
    fn elems(s: &ServiceSpec) -> (NamedSet, Vec<Elem>) {
        match Pick::of(s) {
            Some(p) => (NamedSet::Pick(p), slots(s)),
            None => (NamedSet::NoBackends, vec![Elem::Service(s.key)]),
        }
    }

    fn added(&mut self, s: &ServiceSpec) {
        let (set, elems) = Self::elems(s);
        self.add_elems.entry(set).or_default().extend(elems);
    }

    fn removed(&mut self, s: &ServiceSpec) {
        let (set, elems) = Self::elems(s);
        self.del_elems.entry(set).or_default().extend(elems);
    }

    fn changed(&mut self, old: &ServiceSpec, new: &ServiceSpec) {
        let ((oset, os), (nset, ns)) = (Self::elems(old), Self::elems(new));
        if oset != nset {
            self.del_elems.entry(oset).or_default().extend(os);
            self.add_elems.entry(nset).or_default().extend(ns);
            return;
        }
        // Same map: only the slots that differ.
        for i in 0..os.len().max(ns.len()) {
            match (os.get(i), ns.get(i)) {
                (Some(o), Some(n)) if o == n => {}
                (o, n) => {
                    if let Some(o) = o {
                        self.del(oset, o.clone());
                    }
                    if let Some(n) = n {
                        self.add(nset, n.clone());
                    }
                }
            }
        }
    }
}

/// What the nftables backend keeps in memory about a namespace: the spec it applied last, how
/// many backends use each address (for the `hairpin` set), and the picks whose set and rule
/// exist, in rule order.
///
/// Pick maps and rules are created when a backend count first appears and kept (empty) until
/// the next full program: deleting a rule needs its handle, which would have to be read back
/// from the kernel. An empty pick map costs one hash lookup per new connection.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NftLbState {
    pub spec: LbSpec,
    pub hairpin: BTreeMap<Ipv4Addr, u32>,
    pub installed: Vec<Pick>,
    /// Backends (service, address, target port) of UDP services that the last
    /// [`Self::plan_diff`] removed: their conntrack entries are to be deleted once the batch
    /// is committed (UDP flows otherwise stay on a removed backend).
    pub removed_udp: Vec<(ServiceKey, Ipv4Addr, u16)>,
}

fn pick_rule(p: Pick) -> NftOp {
    NftOp::AddRule {
        chain: SERVICES_CHAIN.into(),
        rule: Rule::Pick(p),
    }
}

fn bump<K: Ord + Copy>(m: &mut BTreeMap<K, i64>, k: K, d: i64) {
    *m.entry(k).or_default() += d;
}

/// Applies counted deltas to `counts`; returns the keys that appeared and that disappeared.
fn apply_deltas<K: Ord + Copy>(
    counts: &mut BTreeMap<K, u32>,
    delta: BTreeMap<K, i64>,
) -> (Vec<K>, Vec<K>) {
    let (mut appeared, mut gone) = (Vec::new(), Vec::new());
    for (k, d) in delta {
        let before = i64::from(counts.get(&k).copied().unwrap_or(0));
        let after = u32::try_from((before + d).max(0)).unwrap_or(u32::MAX);
        if before == 0 && after > 0 {
            appeared.push(k);
        } else if before > 0 && after == 0 {
            gone.push(k);
        }
        if after == 0 {
            counts.remove(&k);
        } else {
            counts.insert(k, after);
        }
    }
    (appeared, gone)
}

impl NftLbState {
    /// Ops that replace whatever table exists with `spec`, and the state after them.
    pub fn plan_full(spec: &LbSpec) -> (Vec<NftOp>, Self) {
        let mut ops = vec![NftOp::AddTable, NftOp::DelTable, NftOp::AddTable];
        let mut phases = Phases::default();
        let mut hairpin: BTreeMap<Ipv4Addr, u32> = BTreeMap::new();
        let mut picks: std::collections::BTreeSet<Pick> = std::collections::BTreeSet::new();
        for s in spec.services.values() {
            phases.added(s);
            if let Some(p) = Pick::of(s) {
                picks.insert(p);
            }
            for ip in s.backends.keys() {
                *hairpin.entry(*ip).or_default() += 1;
            }
        }
        for set in [NamedSet::NoBackends, NamedSet::Hairpin] {
            ops.push(NftOp::AddSet(set));
        }
        for p in &picks {
            ops.push(NftOp::AddSet(NamedSet::Pick(*p)));
        }
        if !hairpin.is_empty() {
            phases.add_elems.insert(
                NamedSet::Hairpin,
                hairpin.keys().map(|ip| Elem::Hairpin(*ip)).collect(),
            );
        }
        ops.push(NftOp::AddChain {
            name: REJECT_CHAIN.into(),
            base: None,
        });
        for rule in [Rule::RejectTcp, Rule::Reject] {
            ops.push(NftOp::AddRule {
                chain: REJECT_CHAIN.into(),
                rule,
            });
        }
        ops.push(NftOp::AddChain {
            name: SERVICES_CHAIN.into(),
            base: None,
        });
        ops.extend(picks.iter().map(|p| pick_rule(*p)));
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
        // Elements after the rules: a rule that binds a map makes the kernel check every
        // element already in it.
        for (set, elems) in phases.add_elems {
            ops.push(NftOp::AddElems { set, elems });
        }
        (
            ops,
            Self {
                spec: spec.clone(),
                hairpin,
                installed: picks.into_iter().collect(),
                removed_udp: Vec::new(),
            },
        )
    }

    /// Ops that turn the table from `self.spec` into `new`, and the number of services that
    /// changed; updates `self` to match. Only changed services are visited beyond the
    /// comparison.
    pub fn plan_diff(&mut self, new: &LbSpec) -> (Vec<NftOp>, usize) {
        let mut phases = Phases::default();
        let mut hairpin_delta: BTreeMap<Ipv4Addr, i64> = BTreeMap::new();
        let mut new_picks: Vec<Pick> = Vec::new();
        let changes = diff(&self.spec, new);
        self.removed_udp.clear();
        for change in &changes {
            let (old, new) = match change {
                ServiceChange::Added(s) => {
                    phases.added(s);
                    (None, Some(*s))
                }
                ServiceChange::Removed(s) => {
                    phases.removed(s);
                    (Some(*s), None)
                }
                ServiceChange::Changed { old, new } => {
                    phases.changed(old, new);
                    (Some(*old), Some(*new))
                }
            };
            if let Some(o) = old.filter(|o| o.key.proto == Proto::Udp) {
                for ip in o.backends.keys() {
                    if !new.is_some_and(|n| n.backends.contains_key(ip)) {
                        self.removed_udp.push((o.key, *ip, o.target_port));
                    }
                }
            }
            for (s, d) in [(old, -1), (new, 1)] {
                let Some(s) = s else { continue };
                for ip in s.backends.keys() {
                    bump(&mut hairpin_delta, *ip, d);
                }
            }
            if let Some(p) = new.and_then(Pick::of)
                && !self.installed.contains(&p)
                && !new_picks.contains(&p)
            {
                new_picks.push(p);
            }
        }
        let (ips_new, ips_gone) = apply_deltas(&mut self.hairpin, hairpin_delta);
        for ip in ips_new {
            phases.add(NamedSet::Hairpin, Elem::Hairpin(ip));
        }
        for ip in ips_gone {
            phases.del(NamedSet::Hairpin, Elem::Hairpin(ip));
        }
        new_picks.sort();

        // Order: new pick maps and their rules (appended to `services`; binding an empty map
        // costs nothing); element deletions, then additions (a slot can be deleted and added
        // again with another backend).
        let mut ops: Vec<NftOp> = Vec::new();
        for p in &new_picks {
            ops.push(NftOp::AddSet(NamedSet::Pick(*p)));
            ops.push(pick_rule(*p));
        }
        for (set, elems) in phases.del_elems {
            ops.push(NftOp::DelElems { set, elems });
        }
        for (set, elems) in phases.add_elems {
            ops.push(NftOp::AddElems { set, elems });
        }
        self.installed.extend(new_picks);

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
            NftOp::AddSet(set) => {
                let _ = writeln!(
                    s,
                    "add {} {t} {} {{ {}; }}",
                    if set.is_map() { "map" } else { "set" },
                    set.name(),
                    set.type_text()
                );
            }
            NftOp::DelSet(set) => {
                let _ = writeln!(
                    s,
                    "delete {} {t} {}",
                    if set.is_map() { "map" } else { "set" },
                    set.name()
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

/// The whole table for `spec` as a full program leaves it, in the form `nft list table ip
/// swarmnet-lb` prints it, with sets, maps and chains sorted by name and elements sorted (see
/// [`normalize_listing`]).
pub fn render_table(spec: &LbSpec) -> String {
    NftLbState::plan_full(spec).1.render_table()
}

impl NftLbState {
    /// The table as the kernel holds it after the applies that led to this state (the pick
    /// sets and rules that stay after their last service left included), in the form of
    /// [`render_table`].
    pub fn render_table(&self) -> String {
        let (mut ops, _) = Self::plan_full(&self.spec);
        ops.retain(|op| {
            !matches!(op, NftOp::AddSet(NamedSet::Pick(_)))
                && !matches!(
                    op,
                    NftOp::AddRule {
                        rule: Rule::Pick(_),
                        ..
                    }
                )
        });
        for p in &self.installed {
            ops.push(NftOp::AddSet(NamedSet::Pick(*p)));
            ops.push(pick_rule(*p));
        }
        render_ops(&ops)
    }
}

fn render_ops(ops: &[NftOp]) -> String {
    let mut sets: BTreeMap<String, (NamedSet, Vec<Elem>)> = BTreeMap::new();
    let mut chains: BTreeMap<String, (Option<BaseChain>, Vec<String>)> = BTreeMap::new();
    for op in ops {
        match op {
            NftOp::AddSet(set) => {
                sets.entry(set.name()).or_insert((*set, Vec::new()));
            }
            NftOp::AddElems { set, elems } => {
                let e = sets.entry(set.name()).or_insert((*set, Vec::new()));
                e.1.extend(elems.iter().cloned());
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
            "\t{} {name} {{\n\t\t{}\n",
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

    const MAP3: &str = "add map ip swarmnet-lb random-3 { typeof ip daddr . meta l4proto . th dport . numgen random mod 1 : ip daddr . th dport; }\n\
                        add rule ip swarmnet-lb services dnat ip to ip daddr . meta l4proto . th dport . numgen random mod 3 map @random-3\n";

    #[test]
    fn endpoint_change_touches_only_its_service() {
        for n in [2u8, 50] {
            let (_, mut state) = NftLbState::plan_full(&spec(n));
            let mut new = spec(n);
            // A third backend for service 1: its slots move from `random-2` to `random-3`,
            // which is new to the table, so the map and its rule come with it.
            new.services
                .get_mut(&key(1))
                .unwrap()
                .backends
                .insert(ip(200), BackendState::Healthy);
            let ops = state.plan_diff(&new).0;
            assert_eq!(
                render_script(&ops),
                format!(
                    "{MAP3}delete element ip swarmnet-lb random-2 {{ 10.0.0.1 . tcp . 80 . 0, 10.0.0.1 . tcp . 80 . 1 }}\n\
                     add element ip swarmnet-lb hairpin {{ 10.0.1.200 . 10.0.1.200 }}\n\
                     add element ip swarmnet-lb random-3 {{ 10.0.0.1 . tcp . 80 . 0 : 10.0.1.1 . 8080, 10.0.0.1 . tcp . 80 . 1 : 10.0.1.100 . 8080, 10.0.0.1 . tcp . 80 . 2 : 10.0.1.200 . 8080 }}\n"
                )
            );
            assert_eq!(state.spec, new);
            assert!(state.plan_diff(&new).0.is_empty());
            // The same change to service 2: elements only.
            new.services
                .get_mut(&key(2))
                .unwrap()
                .backends
                .insert(ip(201), BackendState::Healthy);
            let ops = state.plan_diff(&new).0;
            assert_eq!(
                render_script(&ops),
                "delete element ip swarmnet-lb random-2 { 10.0.0.2 . tcp . 80 . 0, 10.0.0.2 . tcp . 80 . 1 }\n\
                 add element ip swarmnet-lb hairpin { 10.0.1.201 . 10.0.1.201 }\n\
                 add element ip swarmnet-lb random-3 { 10.0.0.2 . tcp . 80 . 0 : 10.0.1.2 . 8080, 10.0.0.2 . tcp . 80 . 1 : 10.0.1.100 . 8080, 10.0.0.2 . tcp . 80 . 2 : 10.0.1.201 . 8080 }\n"
            );
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
        assert_eq!(
            render_script(&state.plan_diff(&new).0),
            "delete element ip swarmnet-lb random-1 { 10.0.0.1 . tcp . 80 . 0 }\n\
             add element ip swarmnet-lb no-backends { 10.0.0.1 . tcp . 80 }\n"
        );
        // Removing the service deletes its element and its address's hairpin element; the
        // empty `random-1` map and its rule stay until the next full program.
        assert_eq!(
            render_script(&state.plan_diff(&LbSpec::default()).0),
            "delete element ip swarmnet-lb no-backends { 10.0.0.1 . tcp . 80 }\n\
             delete element ip swarmnet-lb hairpin { 10.0.1.1 . 10.0.1.1 }\n"
        );
        assert_eq!(state.installed, vec![Pick { hash: false, n: 1 }]);
        assert!(state.render_table().contains("map @random-1"));
    }

    #[test]
    fn replaced_backend_changes_only_its_slots() {
        let s = LbSpec::from_services([ServiceSpec::new(key(1), 8080, [ip(1), ip(2), ip(3)])]);
        let (_, mut state) = NftLbState::plan_full(&s);
        let mut new = s.clone();
        let b = &mut new.services.get_mut(&key(1)).unwrap().backends;
        b.remove(&ip(3));
        b.insert(ip(4), BackendState::Healthy);
        assert_eq!(
            render_script(&state.plan_diff(&new).0),
            "delete element ip swarmnet-lb hairpin { 10.0.1.3 . 10.0.1.3 }\n\
             delete element ip swarmnet-lb random-3 { 10.0.0.1 . tcp . 80 . 2 }\n\
             add element ip swarmnet-lb hairpin { 10.0.1.4 . 10.0.1.4 }\n\
             add element ip swarmnet-lb random-3 { 10.0.0.1 . tcp . 80 . 2 : 10.0.1.4 . 8080 }\n"
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
