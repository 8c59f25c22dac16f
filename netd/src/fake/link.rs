//! [`FakeLinkPort`]: an in-memory [`LinkPort`] that models the kernel semantics netd relies on.
//!
//! Modelled: per-namespace name uniqueness (Exists); NotFound for missing namespaces, links and
//! entries; a master must exist in the same namespace and be a bridge (Invalid, like the
//! kernel's EINVAL/EOPNOTSUPP); FDB entries only on VXLAN devices (Invalid); deleting a veth end
//! deletes its peer wherever it is; deleting a namespace deletes its links and their peers; two
//! VXLAN devices with the same VNI, port and underlay created from the same namespace collide
//! (Exists) even after one was moved away (the kernel keys them in the creating namespace);
//! connected routes appear for addresses on links that are up, and setting a link down drops
//! the routes through it; sysctls per namespace with a fixed set of known keys.
//!
//! Not modelled: gateway reachability, ifindex per namespace (indexes are global here),
//! traffic. Drift is injected through the trait itself (e.g. `delete_link` from a test).

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use ipnet::Ipv4Net;
use swarmnet_model::{IfName, MacAddr};

use crate::port::{
    AddrState, ErrorKind, FdbEntry, LinkChange, LinkKind, LinkKindState, LinkPort, LinkSpec,
    LinkState, NeighEntry, NsName, NsRef, PortError, PortResult, RouteState,
};

/// Namespace-wide sysctls every namespace has, with the kernel's defaults.
const NS_SYSCTLS: &[(&str, &str)] = &[
    ("net/ipv4/ip_forward", "0"),
    ("net/ipv6/conf/all/accept_ra", "1"),
    ("net/ipv6/conf/default/accept_ra", "1"),
    // br_netfilter's per-namespace default (brnf_init_net).
    ("net/bridge/bridge-nf-call-iptables", "1"),
];

#[derive(Debug, Clone)]
enum FakeKind {
    Loopback,
    Bridge,
    /// `origin` is the namespace it was created in, where its UDP socket lives.
    Vxlan {
        vni: u32,
        local: Ipv4Addr,
        port: u16,
        underlay: Option<IfName>,
        origin: NsRef,
    },
    Veth {
        peer_ns: NsRef,
        peer: IfName,
    },
}

#[derive(Debug, Clone)]
struct FakeLink {
    index: u32,
    kind: FakeKind,
    mtu: u16,
    mac: Option<MacAddr>,
    master: Option<IfName>,
    up: bool,
    alias: Option<String>,
    accept_ra: String,
    hairpin: bool,
    fdb: BTreeSet<FdbEntry>,
    neighs: BTreeSet<NeighEntry>,
}

#[derive(Debug, Clone, Default)]
struct FakeNs {
    links: BTreeMap<IfName, FakeLink>,
    addrs: BTreeSet<AddrState>,
    routes: BTreeSet<RouteState>,
    sysctls: BTreeMap<String, String>,
    /// Bound from another runtime's namespace: deleting it only drops our reference.
    bound: bool,
}

/// See the module documentation.
#[derive(Debug, Clone)]
pub struct FakeLinkPort {
    run_dir: PathBuf,
    namespaces: BTreeMap<NsRef, FakeNs>,
    next_index: u32,
}

impl Default for FakeLinkPort {
    fn default() -> Self {
        Self::new()
    }
}

fn lo() -> IfName {
    IfName::new("lo").expect("valid name")
}

fn obj(name: &str, ns: &NsRef) -> String {
    format!("{name} in {ns}")
}

fn not_found(op: &'static str, object: impl Into<String>, what: &str) -> PortError {
    PortError::new(
        op,
        object,
        ErrorKind::NotFound,
        format!("{what} does not exist"),
    )
}

impl FakeLinkPort {
    /// A node namespace with only `lo`, and no owned namespaces. Paths are under
    /// `/run/swarmnet-fake` (nothing is created there).
    pub fn new() -> Self {
        Self::with_run_dir(PathBuf::from("/run/swarmnet-fake"))
    }

    /// Like [`FakeLinkPort::new`] with the run directory that `netns_path` reports.
    pub fn with_run_dir(run_dir: PathBuf) -> Self {
        let mut port = Self {
            run_dir,
            namespaces: BTreeMap::new(),
            next_index: 1,
        };
        port.insert_ns(NsRef::Node, false);
        port
    }

    fn insert_ns(&mut self, ns: NsRef, bound: bool) {
        let mut n = FakeNs {
            bound,
            ..FakeNs::default()
        };
        n.sysctls = NS_SYSCTLS
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let index = self.alloc_index();
        n.links.insert(
            lo(),
            FakeLink::new(index, FakeKind::Loopback, u16::MAX, None),
        );
        self.namespaces.insert(ns, n);
    }

    fn alloc_index(&mut self) -> u32 {
        self.next_index += 1;
        self.next_index
    }

    fn ns(&self, op: &'static str, ns: &NsRef) -> PortResult<&FakeNs> {
        self.namespaces
            .get(ns)
            .ok_or_else(|| not_found(op, ns.to_string(), "the namespace"))
    }

    fn ns_mut(&mut self, op: &'static str, ns: &NsRef) -> PortResult<&mut FakeNs> {
        self.namespaces
            .get_mut(ns)
            .ok_or_else(|| not_found(op, ns.to_string(), "the namespace"))
    }

    fn link(&self, op: &'static str, ns: &NsRef, name: &IfName) -> PortResult<&FakeLink> {
        self.ns(op, ns)?
            .links
            .get(name)
            .ok_or_else(|| not_found(op, obj(name.as_str(), ns), "the link"))
    }

    fn link_mut(
        &mut self,
        op: &'static str,
        ns: &NsRef,
        name: &IfName,
    ) -> PortResult<&mut FakeLink> {
        self.ns_mut(op, ns)?
            .links
            .get_mut(name)
            .ok_or_else(|| not_found(op, obj(name.as_str(), ns), "the link"))
    }

    /// Removes one link and everything hanging off it (addresses, routes, slaves' master).
    fn remove_one(&mut self, ns: &NsRef, name: &IfName) -> Option<FakeLink> {
        let n = self.namespaces.get_mut(ns)?;
        let link = n.links.remove(name)?;
        n.addrs.retain(|a| &a.link != name);
        n.routes.retain(|r| r.link.as_ref() != Some(name));
        for other in n.links.values_mut() {
            if other.master.as_ref() == Some(name) {
                other.master = None;
            }
        }
        Some(link)
    }

    /// Removes a link and, for a veth, its peer wherever that is.
    fn remove_link(&mut self, ns: &NsRef, name: &IfName) {
        if let Some(link) = self.remove_one(ns, name)
            && let FakeKind::Veth { peer_ns, peer } = link.kind
        {
            self.remove_one(&peer_ns, &peer);
        }
    }

    fn default_mac(index: u32) -> MacAddr {
        let b = index.to_be_bytes();
        MacAddr::new([0x02, 0xfa, b[0], b[1], b[2], b[3]]).expect("unicast")
    }

    /// Moves a link from `from` to `to`, fixing the peer pointer of a veth.
    fn move_link(&mut self, from: &NsRef, name: &IfName, to: &NsRef) -> PortResult<()> {
        let op = "move link";
        if self.ns(op, to)?.links.contains_key(name) {
            return Err(PortError::new(
                op,
                format!("{name} from {from} to {to}"),
                ErrorKind::Exists,
                format!("{to} already has a link named {name}"),
            ));
        }
        // Like the kernel: a moved link leaves its bridge and loses its addresses and routes.
        let mut link = self.remove_one(from, name).expect("checked by caller");
        link.master = None;
        link.up = false;
        if let FakeKind::Veth { peer_ns, peer } = &link.kind
            && let Some(p) = self
                .namespaces
                .get_mut(peer_ns)
                .and_then(|n| n.links.get_mut(peer))
            && let FakeKind::Veth { peer_ns: back, .. } = &mut p.kind
        {
            *back = to.clone();
        }
        self.ns_mut(op, to)?.links.insert(name.clone(), link);
        Ok(())
    }
}

impl FakeLink {
    fn new(index: u32, kind: FakeKind, mtu: u16, mac: Option<MacAddr>) -> Self {
        Self {
            index,
            kind,
            mtu,
            mac,
            master: None,
            up: false,
            alias: None,
            accept_ra: "1".into(),
            hairpin: false,
            fdb: BTreeSet::new(),
            neighs: BTreeSet::new(),
        }
    }

    fn state(&self, name: &IfName) -> LinkState {
        let kind = match &self.kind {
            FakeKind::Loopback => LinkKindState::Other(String::new()),
            FakeKind::Bridge => LinkKindState::Bridge,
            FakeKind::Vxlan {
                vni, local, port, ..
            } => LinkKindState::Vxlan {
                vni: *vni,
                local: Some(*local),
                port: *port,
                learning: false,
            },
            FakeKind::Veth { .. } => LinkKindState::Veth,
        };
        LinkState {
            name: name.clone(),
            index: self.index,
            kind,
            mtu: self.mtu,
            mac: self.mac,
            master: self.master.clone(),
            up: self.up,
            alias: self.alias.clone(),
            hairpin: self.hairpin,
        }
    }
}

/// `net/ipv6/conf/<if>/accept_ra` → `<if>`.
fn per_link_key(key: &str) -> Option<&str> {
    let rest = key.strip_prefix("net/ipv6/conf/")?;
    let name = rest.strip_suffix("/accept_ra")?;
    (name != "all" && name != "default").then_some(name)
}

impl LinkPort for FakeLinkPort {
    fn list_netns(&mut self) -> PortResult<Vec<NsName>> {
        Ok(self
            .namespaces
            .keys()
            .filter_map(|k| match k {
                NsRef::Owned(n) => Some(n.clone()),
                NsRef::Node => None,
            })
            .collect())
    }

    fn create_netns(&mut self, ns: &NsName) -> PortResult<()> {
        let r = NsRef::Owned(ns.clone());
        if self.namespaces.contains_key(&r) {
            return Err(PortError::new(
                "create netns",
                ns.to_string(),
                ErrorKind::Exists,
                "exists",
            ));
        }
        self.insert_ns(r, false);
        Ok(())
    }

    fn bind_netns(&mut self, ns: &NsName, _from: &Path) -> PortResult<()> {
        let r = NsRef::Owned(ns.clone());
        if self.namespaces.contains_key(&r) {
            return Err(PortError::new(
                "bind netns",
                ns.to_string(),
                ErrorKind::Exists,
                "exists",
            ));
        }
        self.insert_ns(r, true);
        Ok(())
    }

    fn netns_path(&self, ns: &NsName) -> PathBuf {
        self.run_dir.join("netns").join(ns.as_str())
    }

    fn is_bound(&self, ns: &NsName) -> bool {
        self.namespaces
            .get(&NsRef::Owned(ns.clone()))
            .is_some_and(|n| n.bound)
    }

    fn delete_netns(&mut self, ns: &NsName) -> PortResult<()> {
        let r = NsRef::Owned(ns.clone());
        let n = self
            .namespaces
            .get(&r)
            .ok_or_else(|| not_found("delete netns", ns.to_string(), "the namespace"))?;
        if !n.bound {
            // The namespace dies with our reference: so do its links and their veth peers.
            let names: Vec<IfName> = n.links.keys().cloned().collect();
            for name in names {
                self.remove_link(&r, &name);
            }
        }
        self.namespaces.remove(&r);
        Ok(())
    }

    fn list_links(&mut self, ns: &NsRef) -> PortResult<Vec<LinkState>> {
        Ok(self
            .ns("list links", ns)?
            .links
            .iter()
            .map(|(n, l)| l.state(n))
            .collect())
    }

    fn create_link(&mut self, ns: &NsRef, spec: &LinkSpec) -> PortResult<()> {
        let op = "create link";
        let object = obj(spec.name.as_str(), ns);
        if self.ns(op, ns)?.links.contains_key(&spec.name) {
            return Err(PortError::new(
                op,
                object,
                ErrorKind::Exists,
                "a link with this name exists",
            ));
        }
        if let Some(t) = &spec.move_to {
            self.ns(op, t)?;
        }
        let mtu = spec.mtu.unwrap_or(1500);
        let index = self.alloc_index();
        let mac = Some(spec.mac.unwrap_or_else(|| Self::default_mac(index)));
        let kind = match &spec.kind {
            LinkKind::Bridge => FakeKind::Bridge,
            LinkKind::Vxlan {
                vni,
                local,
                port,
                underlay,
            } => {
                if let Some(u) = underlay {
                    self.link(op, ns, u).map_err(|mut e| {
                        e.object = object.clone();
                        e.detail = format!("underlay {u} does not exist");
                        e
                    })?;
                }
                let clash = self.namespaces.values().flat_map(|n| n.links.values()).any(|l| {
                    matches!(&l.kind, FakeKind::Vxlan { vni: v, port: p, underlay: u, origin, .. }
                        if v == vni && p == port && u == underlay && origin == ns)
                });
                if clash {
                    return Err(PortError::new(
                        op,
                        object,
                        ErrorKind::Exists,
                        format!("a VXLAN device with VNI {vni} and port {port} exists in {ns}"),
                    ));
                }
                FakeKind::Vxlan {
                    vni: *vni,
                    local: *local,
                    port: *port,
                    underlay: underlay.clone(),
                    origin: ns.clone(),
                }
            }
            LinkKind::Veth {
                peer,
                peer_ns,
                peer_mac,
            } => {
                let pns = peer_ns.clone().unwrap_or_else(|| ns.clone());
                let taken = self.ns(op, &pns)?.links.contains_key(peer)
                    || (pns == *ns && *peer == spec.name);
                if taken {
                    return Err(PortError::new(
                        op,
                        object,
                        ErrorKind::Exists,
                        format!("peer name {peer} is taken in {pns}"),
                    ));
                }
                let pindex = self.alloc_index();
                let pmac = Some(peer_mac.unwrap_or_else(|| Self::default_mac(pindex)));
                let plink = FakeLink::new(
                    pindex,
                    FakeKind::Veth {
                        peer_ns: ns.clone(),
                        peer: spec.name.clone(),
                    },
                    mtu,
                    pmac,
                );
                self.ns_mut(op, &pns)?.links.insert(peer.clone(), plink);
                FakeKind::Veth {
                    peer_ns: pns,
                    peer: peer.clone(),
                }
            }
        };
        let mut link = FakeLink::new(index, kind, mtu, mac);
        link.alias = spec.alias.clone();
        self.ns_mut(op, ns)?.links.insert(spec.name.clone(), link);
        if let Some(t) = spec.move_to.as_ref().filter(|t| *t != ns)
            && let Err(e) = self.move_link(ns, &spec.name, t)
        {
            self.remove_link(ns, &spec.name);
            return Err(e);
        }
        Ok(())
    }

    fn set_link(&mut self, ns: &NsRef, name: &IfName, change: &LinkChange) -> PortResult<()> {
        let op = "set link";
        self.link(op, ns, name)?;
        if let Some(Some(master)) = &change.master {
            let m = self.ns(op, ns)?.links.get(master);
            let detail = match m {
                None => Some(format!("master {master} does not exist")),
                Some(l) if !matches!(l.kind, FakeKind::Bridge) => {
                    Some(format!("master {master} is not a bridge"))
                }
                Some(_) if master == name => Some("a bridge cannot be its own master".to_string()),
                Some(_) => None,
            };
            if let Some(detail) = detail {
                return Err(PortError::new(
                    op,
                    obj(name.as_str(), ns),
                    ErrorKind::Invalid,
                    detail,
                ));
            }
        }
        let link = self.link_mut(op, ns, name)?;
        if let Some(mtu) = change.mtu {
            link.mtu = mtu;
        }
        if let Some(mac) = change.mac {
            link.mac = Some(mac);
        }
        if let Some(master) = &change.master {
            link.master = master.clone();
            // Leaving a bridge drops the port's flags.
            link.hairpin = false;
        }
        if let Some(h) = change.hairpin {
            if link.master.is_none() {
                return Err(PortError::new(
                    op,
                    obj(name.as_str(), ns),
                    ErrorKind::Invalid,
                    "hairpin mode needs a bridge master",
                ));
            }
            link.hairpin = h;
        }
        if let Some(up) = change.up {
            link.up = up;
            if !up {
                // The kernel flushes the routes through a link that goes down.
                self.ns_mut(op, ns)?
                    .routes
                    .retain(|r| r.link.as_ref() != Some(name));
            }
        }
        Ok(())
    }

    fn delete_link(&mut self, ns: &NsRef, name: &IfName) -> PortResult<()> {
        let link = self.link("delete link", ns, name)?;
        if matches!(link.kind, FakeKind::Loopback) {
            return Err(PortError::new(
                "delete link",
                obj(name.as_str(), ns),
                ErrorKind::Invalid,
                "the loopback device cannot be deleted",
            ));
        }
        self.remove_link(ns, name);
        Ok(())
    }

    fn list_addrs(&mut self, ns: &NsRef) -> PortResult<Vec<AddrState>> {
        Ok(self
            .ns("list addresses", ns)?
            .addrs
            .iter()
            .cloned()
            .collect())
    }

    fn add_addr(&mut self, ns: &NsRef, link: &IfName, addr: Ipv4Net) -> PortResult<()> {
        let op = "add address";
        self.link(op, ns, link)?;
        let a = AddrState {
            link: link.clone(),
            addr,
        };
        if !self.ns_mut(op, ns)?.addrs.insert(a) {
            return Err(PortError::new(
                op,
                format!("{addr} on {}", obj(link.as_str(), ns)),
                ErrorKind::Exists,
                "the address is already on the link",
            ));
        }
        Ok(())
    }

    fn delete_addr(&mut self, ns: &NsRef, link: &IfName, addr: Ipv4Net) -> PortResult<()> {
        let op = "delete address";
        self.link(op, ns, link)?;
        let a = AddrState {
            link: link.clone(),
            addr,
        };
        if !self.ns_mut(op, ns)?.addrs.remove(&a) {
            return Err(not_found(
                op,
                format!("{addr} on {}", obj(link.as_str(), ns)),
                "the address",
            ));
        }
        Ok(())
    }

    fn list_routes(&mut self, ns: &NsRef) -> PortResult<Vec<RouteState>> {
        let n = self.ns("list routes", ns)?;
        let mut out: BTreeSet<RouteState> = n.routes.clone();
        // Connected routes, as the kernel adds them for addresses on links that are up.
        for a in &n.addrs {
            let up = n.links.get(&a.link).is_some_and(|l| l.up);
            if up && a.addr.prefix_len() < 32 {
                out.insert(RouteState {
                    dst: a.addr.trunc(),
                    gateway: None,
                    link: Some(a.link.clone()),
                });
            }
        }
        Ok(out.into_iter().collect())
    }

    fn add_route(&mut self, ns: &NsRef, route: &RouteState) -> PortResult<()> {
        let op = "add route";
        if let Some(l) = &route.link {
            self.link(op, ns, l)?;
        }
        if !self.ns_mut(op, ns)?.routes.insert(route.clone()) {
            return Err(PortError::new(
                op,
                format!("{route:?} in {ns}"),
                ErrorKind::Exists,
                "the route exists",
            ));
        }
        Ok(())
    }

    fn delete_route(&mut self, ns: &NsRef, route: &RouteState) -> PortResult<()> {
        let op = "delete route";
        if !self.ns_mut(op, ns)?.routes.remove(route) {
            return Err(not_found(op, format!("{route:?} in {ns}"), "the route"));
        }
        Ok(())
    }

    fn list_fdb(&mut self, ns: &NsRef, link: &IfName) -> PortResult<Vec<FdbEntry>> {
        let l = vxlan("list fdb", ns, link, self.link("list fdb", ns, link)?)?;
        Ok(l.fdb.iter().cloned().collect())
    }

    fn add_fdb(&mut self, ns: &NsRef, link: &IfName, entry: &FdbEntry) -> PortResult<()> {
        let op = "add fdb";
        vxlan(op, ns, link, self.link(op, ns, link)?)?;
        let l = self.link_mut(op, ns, link)?;
        // The kernel keys VXLAN FDB entries by MAC: one MAC, one (first) remote.
        if l.fdb.iter().any(|e| e.mac == entry.mac) {
            return Err(PortError::new(
                op,
                format!("{} on {}", entry.mac, obj(link.as_str(), ns)),
                ErrorKind::Exists,
                "an entry for this MAC exists",
            ));
        }
        l.fdb.insert(entry.clone());
        Ok(())
    }

    fn delete_fdb(&mut self, ns: &NsRef, link: &IfName, entry: &FdbEntry) -> PortResult<()> {
        let op = "delete fdb";
        vxlan(op, ns, link, self.link(op, ns, link)?)?;
        if !self.link_mut(op, ns, link)?.fdb.remove(entry) {
            return Err(not_found(
                op,
                format!(
                    "{} dst {} on {}",
                    entry.mac,
                    entry.dst,
                    obj(link.as_str(), ns)
                ),
                "the entry",
            ));
        }
        Ok(())
    }

    fn list_neighs(&mut self, ns: &NsRef, link: &IfName) -> PortResult<Vec<NeighEntry>> {
        Ok(self
            .link("list neighbours", ns, link)?
            .neighs
            .iter()
            .cloned()
            .collect())
    }

    fn add_neigh(&mut self, ns: &NsRef, link: &IfName, entry: &NeighEntry) -> PortResult<()> {
        let op = "add neighbour";
        let l = self.link_mut(op, ns, link)?;
        // Keyed by IP, like the kernel's neighbour table.
        if l.neighs.iter().any(|e| e.ip == entry.ip) {
            return Err(PortError::new(
                op,
                format!("{} on {}", entry.ip, obj(link.as_str(), ns)),
                ErrorKind::Exists,
                "an entry for this address exists",
            ));
        }
        l.neighs.insert(entry.clone());
        Ok(())
    }

    fn delete_neigh(&mut self, ns: &NsRef, link: &IfName, entry: &NeighEntry) -> PortResult<()> {
        let op = "delete neighbour";
        let l = self.link_mut(op, ns, link)?;
        // The kernel deletes by IP whatever MAC the entry has.
        let before = l.neighs.len();
        l.neighs.retain(|e| e.ip != entry.ip);
        if l.neighs.len() == before {
            return Err(not_found(
                op,
                format!("{} on {}", entry.ip, obj(link.as_str(), ns)),
                "the entry",
            ));
        }
        Ok(())
    }

    fn get_sysctl(&mut self, ns: &NsRef, key: &str) -> PortResult<String> {
        let op = "get sysctl";
        let n = self.ns(op, ns)?;
        if let Some(name) = per_link_key(key) {
            let link = IfName::new(name).ok().and_then(|n2| n.links.get(&n2));
            return link
                .map(|l| l.accept_ra.clone())
                .ok_or_else(|| not_found(op, format!("{key} in {ns}"), "the key"));
        }
        n.sysctls
            .get(key)
            .cloned()
            .ok_or_else(|| not_found(op, format!("{key} in {ns}"), "the key"))
    }

    fn set_sysctl(&mut self, ns: &NsRef, key: &str, value: &str) -> PortResult<()> {
        let op = "set sysctl";
        let object = format!("{key}={value} in {ns}");
        let n = self.ns_mut(op, ns)?;
        if let Some(name) = per_link_key(key) {
            let link = IfName::new(name).ok().and_then(|n2| n.links.get_mut(&n2));
            let link = link.ok_or_else(|| not_found(op, object, "the key"))?;
            link.accept_ra = value.to_string();
            return Ok(());
        }
        let slot = n
            .sysctls
            .get_mut(key)
            .ok_or_else(|| not_found(op, object, "the key"))?;
        *slot = value.to_string();
        Ok(())
    }

    fn underlay_for(&mut self, addr: Ipv4Addr) -> PortResult<(IfName, u16)> {
        let n = self.ns("find underlay", &NsRef::Node)?;
        n.addrs
            .iter()
            .find(|a| a.addr.addr() == addr)
            .and_then(|a| n.links.get(&a.link).map(|l| (a.link.clone(), l.mtu)))
            .ok_or_else(|| {
                PortError::new(
                    "find underlay",
                    addr.to_string(),
                    ErrorKind::NotFound,
                    format!(
                        "no interface in the node namespace holds {addr}; check the node's \
                         advertise address"
                    ),
                )
            })
    }
}

fn vxlan<'a>(
    op: &'static str,
    ns: &NsRef,
    name: &IfName,
    l: &'a FakeLink,
) -> PortResult<&'a FakeLink> {
    if matches!(l.kind, FakeKind::Vxlan { .. }) {
        Ok(l)
    } else {
        Err(PortError::new(
            op,
            obj(name.as_str(), ns),
            ErrorKind::Invalid,
            "FDB entries with a remote need a VXLAN device",
        ))
    }
}
