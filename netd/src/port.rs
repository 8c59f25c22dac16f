//! Ports: the narrow interfaces through which netd touches the kernel. Each has a Linux
//! implementation (`crate::linux`) and an in-memory fake (`crate::fake`) that models the kernel's
//! semantics (EEXIST, ENOENT, "master must exist"), and one contract suite runs against both
//! (`netd/tests/link_contract.rs`).
//!
//! The ports speak in kernel terms (links, addresses, FDB entries), never in cluster terms: the
//! mapping from intent to kernel objects lives in the pure planner (`crate::plan`).

use std::fmt;
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use swarmnet_model::{IfName, MacAddr};

/// Name of a network namespace netd owns: a file under `<run_dir>/netns/`.
/// Overlay networks are `net-<network id>`, sandboxes `sb-<task id>`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NsName(String);

impl NsName {
    /// Refuses names that are not a single path component.
    pub fn new(s: impl Into<String>) -> Result<Self, PortError> {
        let s = s.into();
        if s.is_empty() || s.contains('/') || s == "." || s == ".." || s.len() > 200 {
            return Err(PortError::new(
                "netns name",
                s,
                ErrorKind::Invalid,
                "not a valid file name",
            ));
        }
        Ok(Self(s))
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for NsName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Where an operation happens: the node's own namespace (where netd runs) or one it owns.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum NsRef {
    Node,
    Owned(NsName),
}

impl fmt::Display for NsRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Node => f.write_str("node"),
            Self::Owned(n) => write!(f, "netns {n}"),
        }
    }
}

/// How an error should be treated by the reconciler.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The object exists already (EEXIST).
    Exists,
    /// The object, or one it depends on, does not exist (ENOENT, ENODEV).
    NotFound,
    /// The request itself is wrong (EINVAL, EOPNOTSUPP, ERANGE): retrying will not help.
    Invalid,
    /// Temporary (EBUSY, EAGAIN, ENOBUFS): retry.
    Busy,
    /// Permission (EPERM, EACCES): netd is not root or lacks a capability.
    Permission,
    /// Anything else.
    Other,
}

impl ErrorKind {
    /// Classifies a raw errno.
    pub fn from_errno(errno: i32) -> Self {
        match errno {
            libc::EEXIST => Self::Exists,
            libc::ENOENT | libc::ENODEV | libc::ESRCH | libc::ENXIO => Self::NotFound,
            libc::EINVAL
            | libc::EOPNOTSUPP
            | libc::ERANGE
            | libc::EAFNOSUPPORT
            | libc::EPROTONOSUPPORT => Self::Invalid,
            libc::EBUSY | libc::EAGAIN | libc::ENOBUFS | libc::EINTR => Self::Busy,
            libc::EPERM | libc::EACCES => Self::Permission,
            _ => Self::Other,
        }
    }
}

/// A failed port call, with what was attempted on which object and the cause.
#[derive(Debug, thiserror::Error)]
#[error("{op} {object}: {detail}")]
pub struct PortError {
    /// The operation, e.g. "create link".
    pub op: &'static str,
    /// The object, e.g. "br0 in netns net-app".
    pub object: String,
    pub kind: ErrorKind,
    pub detail: String,
    #[source]
    pub source: Option<std::io::Error>,
}

impl PortError {
    pub fn new(
        op: &'static str,
        object: impl Into<String>,
        kind: ErrorKind,
        detail: impl Into<String>,
    ) -> Self {
        Self {
            op,
            object: object.into(),
            kind,
            detail: detail.into(),
            source: None,
        }
    }
    /// From an OS error: the kind is classified from the errno and the cause kept.
    pub fn io(op: &'static str, object: impl Into<String>, err: std::io::Error) -> Self {
        let kind = err
            .raw_os_error()
            .map_or(ErrorKind::Other, ErrorKind::from_errno);
        Self {
            op,
            object: object.into(),
            kind,
            detail: err.to_string(),
            source: Some(err),
        }
    }
    pub fn is_not_found(&self) -> bool {
        self.kind == ErrorKind::NotFound
    }
    pub fn is_exists(&self) -> bool {
        self.kind == ErrorKind::Exists
    }
}

pub type PortResult<T> = Result<T, PortError>;

/// What kind of link to create.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkKind {
    Bridge,
    /// A VXLAN device: learning off, ARP proxy on, no default destination (so no flooding),
    /// UDP checksums off (the inner packet has its own).
    Vxlan {
        vni: u32,
        local: Ipv4Addr,
        port: u16,
        underlay: Option<IfName>,
    },
    /// A veth pair. This end is named by the spec; the peer is created directly in `peer_ns`
    /// (or in the same namespace when `None`).
    Veth {
        peer: IfName,
        peer_ns: Option<NsRef>,
        peer_mac: Option<MacAddr>,
    },
}

/// A link to create. `move_to` moves it into another namespace right after creation (used for
/// VXLAN, whose UDP socket must stay in the namespace where it was created).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkSpec {
    pub name: IfName,
    pub kind: LinkKind,
    pub mtu: Option<u16>,
    pub mac: Option<MacAddr>,
    /// IFLA_IFALIAS; netd writes `swarmnet:<owner>` here so that prune only touches its own links.
    pub alias: Option<String>,
    pub move_to: Option<NsRef>,
}

/// Observed kind of a link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkKindState {
    Bridge,
    Vxlan {
        vni: u32,
        local: Option<Ipv4Addr>,
        port: u16,
        learning: bool,
    },
    Veth,
    Other(String),
}

/// A link as the kernel reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkState {
    pub name: IfName,
    pub index: u32,
    pub kind: LinkKindState,
    pub mtu: u16,
    pub mac: Option<MacAddr>,
    /// Name of the bridge this link is enslaved to, in the same namespace.
    pub master: Option<IfName>,
    /// Administratively up (IFF_UP).
    pub up: bool,
    pub alias: Option<String>,
    /// A bridge port in hairpin mode (frames may leave by the port they came in on).
    pub hairpin: bool,
}

/// A change to an existing link. `None` fields are left alone.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LinkChange {
    pub mtu: Option<u16>,
    /// `Some(None)` removes the link from its bridge.
    pub master: Option<Option<IfName>>,
    pub up: Option<bool>,
    pub mac: Option<MacAddr>,
    /// Hairpin mode of a bridge port (the link must have a bridge master): needed for a task
    /// that reaches its own service's VIP and is load-balanced back to itself.
    pub hairpin: Option<bool>,
}

/// An IPv4 address on a link.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct AddrState {
    pub link: IfName,
    pub addr: Ipv4Net,
}

/// An IPv4 route in the main table. netd only manages default routes in sandboxes.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RouteState {
    pub dst: Ipv4Net,
    pub gateway: Option<Ipv4Addr>,
    pub link: Option<IfName>,
}

/// A bridge-family FDB entry on a VXLAN device (`bridge fdb ... self permanent`).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FdbEntry {
    pub mac: MacAddr,
    /// Remote VTEP.
    pub dst: Ipv4Addr,
}

/// A permanent IPv4 neighbour entry.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NeighEntry {
    pub ip: Ipv4Addr,
    pub mac: MacAddr,
}

/// Links, namespaces, addresses, routes, FDB and neighbour entries, and per-namespace sysctls.
///
/// Semantics every implementation follows (the contract suite checks them):
/// - creating what exists fails with [`ErrorKind::Exists`]; deleting or changing what does not
///   exist fails with [`ErrorKind::NotFound`] (the reconciler decides what is idempotent);
/// - a master must exist and be a bridge; FDB entries need a VXLAN device;
/// - deleting a namespace we created deletes every link in it, and the other end of each veth
///   pair (the kernel does this asynchronously, in one batch: far cheaper than one request per
///   link); deleting a bound namespace only drops our reference.
pub trait LinkPort: Send {
    /// Namespaces under the run directory (owned by this netd).
    fn list_netns(&mut self) -> PortResult<Vec<NsName>>;
    /// Creates a new, empty namespace (loopback down, as the kernel makes it).
    fn create_netns(&mut self, ns: &NsName) -> PortResult<()>;
    /// Makes an existing namespace (a container runtime's, given by path) reachable as `ns`.
    /// Deleting `ns` later only drops our reference; the runtime's namespace lives on.
    fn bind_netns(&mut self, ns: &NsName, from: &std::path::Path) -> PortResult<()>;
    /// Path of the namespace file, for processes and for other runtimes.
    fn netns_path(&self, ns: &NsName) -> std::path::PathBuf;
    /// Whether `ns` was bound from another runtime's namespace (which outlives our reference,
    /// so our links in it must be deleted explicitly).
    fn is_bound(&self, ns: &NsName) -> bool;
    fn delete_netns(&mut self, ns: &NsName) -> PortResult<()>;

    fn list_links(&mut self, ns: &NsRef) -> PortResult<Vec<LinkState>>;
    /// One link by name, `None` when it does not exist. Cheaper than a dump in a namespace with
    /// many links (the node namespace holds one veth end per sandbox).
    fn get_link(&mut self, ns: &NsRef, name: &IfName) -> PortResult<Option<LinkState>> {
        Ok(self.list_links(ns)?.into_iter().find(|l| &l.name == name))
    }
    fn create_link(&mut self, ns: &NsRef, spec: &LinkSpec) -> PortResult<()>;
    fn set_link(&mut self, ns: &NsRef, name: &IfName, change: &LinkChange) -> PortResult<()>;
    fn delete_link(&mut self, ns: &NsRef, name: &IfName) -> PortResult<()>;

    fn list_addrs(&mut self, ns: &NsRef) -> PortResult<Vec<AddrState>>;
    fn add_addr(&mut self, ns: &NsRef, link: &IfName, addr: Ipv4Net) -> PortResult<()>;
    fn delete_addr(&mut self, ns: &NsRef, link: &IfName, addr: Ipv4Net) -> PortResult<()>;

    /// IPv4 routes of the main table.
    fn list_routes(&mut self, ns: &NsRef) -> PortResult<Vec<RouteState>>;
    fn add_route(&mut self, ns: &NsRef, route: &RouteState) -> PortResult<()>;
    fn delete_route(&mut self, ns: &NsRef, route: &RouteState) -> PortResult<()>;

    /// Permanent FDB entries with a remote destination on `link` (a VXLAN device).
    fn list_fdb(&mut self, ns: &NsRef, link: &IfName) -> PortResult<Vec<FdbEntry>>;
    fn add_fdb(&mut self, ns: &NsRef, link: &IfName, entry: &FdbEntry) -> PortResult<()>;
    fn delete_fdb(&mut self, ns: &NsRef, link: &IfName, entry: &FdbEntry) -> PortResult<()>;

    /// Permanent neighbour entries on `link`.
    fn list_neighs(&mut self, ns: &NsRef, link: &IfName) -> PortResult<Vec<NeighEntry>>;
    fn add_neigh(&mut self, ns: &NsRef, link: &IfName, entry: &NeighEntry) -> PortResult<()>;
    fn delete_neigh(&mut self, ns: &NsRef, link: &IfName, entry: &NeighEntry) -> PortResult<()>;

    /// Reads `/proc/sys/<key>` in `ns` (key like `net/ipv4/ip_forward`).
    fn get_sysctl(&mut self, ns: &NsRef, key: &str) -> PortResult<String>;
    fn set_sysctl(&mut self, ns: &NsRef, key: &str, value: &str) -> PortResult<()>;

    /// The MTU of the link that holds `addr` in the node namespace, and its name.
    fn underlay_for(&mut self, addr: Ipv4Addr) -> PortResult<(IfName, u16)>;
}

/// The node-level firewall: one table owned by netd in the node namespace, replaced whole and
/// atomically. `render` (pure, in `crate::plan`) produces the text; the port only applies and
/// lists it.
pub trait FirewallPort: Send {
    /// The current listing of our table, or `None` when it does not exist.
    fn list_table(&mut self) -> PortResult<Option<String>>;
    /// Replaces our table with `ruleset` in one transaction.
    fn apply(&mut self, ruleset: &str) -> PortResult<()>;
    /// Deletes our table; missing is Ok.
    fn delete_table(&mut self) -> PortResult<()>;
}

/// How a task's process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Exit {
    Code(i32),
    Signal(i32),
    /// The process was adopted after a netd restart and has gone; its status is unknowable
    /// because it was not our child any more.
    Unknown,
}

impl Exit {
    pub fn success(self) -> bool {
        matches!(self, Self::Code(0))
    }
}

/// What to run for a task, and where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessSpec {
    pub task: swarmnet_model::TaskId,
    /// The sandbox's network namespace file.
    pub netns: std::path::PathBuf,
    pub argv: Vec<String>,
    pub env: std::collections::BTreeMap<String, String>,
    /// Bind-mounted over `/etc/resolv.conf` in a private mount namespace, when set.
    pub resolv_conf: Option<std::path::PathBuf>,
    /// Where stdout and stderr go (appended).
    pub log: std::path::PathBuf,
}

/// A task process known to the port: started by this netd, or adopted from an earlier one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessState {
    pub task: swarmnet_model::TaskId,
    pub pid: u32,
    /// `None` while it runs.
    pub exit: Option<Exit>,
    /// A stop was requested and the process has not exited yet.
    pub stopping: bool,
}

/// Task processes: each runs in its sandbox's network namespace, a private mount namespace and a
/// cgroup2 directory of its own. Records survive a netd restart (pid files in the run
/// directory), so a new netd adopts what the old one started.
pub trait ProcessPort: Send {
    /// Every known process, running or exited-but-not-forgotten.
    fn list(&mut self) -> PortResult<Vec<ProcessState>>;
    /// Starts the task's process. Fails with [`ErrorKind::Exists`] if one is known and running.
    fn start(&mut self, spec: &ProcessSpec) -> PortResult<u32>;
    /// Asks the task's processes to stop (SIGTERM to its cgroup) and kills what is left after
    /// `grace`; returns at once. Unknown task: [`ErrorKind::NotFound`].
    fn stop(&mut self, task: &swarmnet_model::TaskId, grace: std::time::Duration)
    -> PortResult<()>;
    /// Drops the record of an exited process (and its cgroup directory).
    fn forget(&mut self, task: &swarmnet_model::TaskId) -> PortResult<()>;
}
