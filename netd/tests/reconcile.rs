//! The reconciler against the in-memory ports: convergence, idempotence, drift repair, prune,
//! adoption after a restart, failure isolation and task restarts. The same scenarios run on
//! real kernels in `tests-netns`.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use std::net::Ipv4Addr;
use swarmnet_model::{IfName, Intent, Name, NodeId, TaskId};
use swarmnet_netd::fake::firewall::FakeFirewall;
use swarmnet_netd::fake::lb::{FakeLoadBalancer, FakeRefusal};
use swarmnet_netd::fake::link::FakeLinkPort;
use swarmnet_netd::fake::process::FakeProcessPort;
use swarmnet_netd::lb::{
    ApplyStats, LbKind, LbObserved, LbSpec, LoadBalancerPort, Proto, ServiceKey,
};
use swarmnet_netd::plan::ObjectKey;
use swarmnet_netd::port::{
    ErrorKind, Exit, FdbEntry, LinkKind, LinkPort, LinkSpec, NsName, NsRef, PortError, PortResult,
    ProcessPort, ProcessSpec, ProcessState,
};
use swarmnet_netd::reconcile::{ObjectState, Ports, Reconciler, ReconcilerConfig, RoundReport};

const INTENT: &str = r#"{
  "version": 1,
  "nodes": [
    {"id": "n1", "addr": "198.18.0.1"},
    {"id": "n2", "addr": "198.18.0.2"}
  ],
  "networks": [
    {"name": "app", "subnet": "10.10.0.0/24", "vni": 4097},
    {"name": "db", "subnet": "10.11.0.0/24", "vni": 4098, "internal": true}
  ],
  "services": [
    {"name": "web", "networks": [{"network": "app"}]},
    {"name": "pg", "networks": [{"network": "db"}], "restart": "on_failure"}
  ],
  "tasks": [
    {"id": "web1", "service": "web", "node": "n1", "argv": ["sleep", "inf"],
     "networks": [{"network": "app", "ip": "10.10.0.3"}]},
    {"id": "web2", "service": "web", "node": "n1", "argv": ["sleep", "inf"],
     "networks": [{"network": "app", "ip": "10.10.0.5"}]},
    {"id": "web3", "service": "web", "node": "n2", "argv": ["sleep", "inf"],
     "networks": [{"network": "app", "ip": "10.10.0.4"}]},
    {"id": "pg1", "service": "pg", "node": "n1", "argv": ["sleep", "inf"],
     "networks": [{"network": "db", "ip": "10.11.0.3"}]}
  ]
}"#;

/// A process port whose state the test can also reach, to act out crashes.
#[derive(Clone, Default)]
struct SharedProcs(Arc<Mutex<FakeProcessPort>>);

impl ProcessPort for SharedProcs {
    fn list(&mut self) -> PortResult<Vec<ProcessState>> {
        self.0.lock().unwrap().list()
    }
    fn start(&mut self, spec: &ProcessSpec) -> PortResult<u32> {
        self.0.lock().unwrap().start(spec)
    }
    fn stop(&mut self, task: &TaskId, grace: Duration) -> PortResult<()> {
        self.0.lock().unwrap().stop(task, grace)
    }
    fn forget(&mut self, task: &TaskId) -> PortResult<()> {
        self.0.lock().unwrap().forget(task)
    }
}

fn node_with_underlay() -> FakeLinkPort {
    let mut l = FakeLinkPort::new();
    let eth0 = IfName::new("eth0").unwrap();
    l.create_link(
        &NsRef::Node,
        &LinkSpec {
            name: eth0.clone(),
            kind: LinkKind::Bridge,
            mtu: Some(1500),
            mac: None,
            alias: None,
            move_to: None,
        },
    )
    .unwrap();
    l.add_addr(&NsRef::Node, &eth0, "198.18.0.1/24".parse().unwrap())
        .unwrap();
    l
}

fn config(dir: &std::path::Path) -> ReconcilerConfig {
    ReconcilerConfig {
        node: NodeId::new("n1").unwrap(),
        vxlan_port: 4789,
        gw_subnet: "172.30.0.0/16".parse().unwrap(),
        task_dir: dir.join("tasks"),
        state_dir: dir.to_path_buf(),
        stop_grace: Duration::from_secs(1),
        round_budget: Duration::from_secs(1),
        lb_timeouts: None,
    }
}

fn reconciler(links: FakeLinkPort, procs: SharedProcs, dir: &tempfile::TempDir) -> Reconciler {
    let ports = Ports {
        links: Box::new(links),
        firewall: Box::new(FakeFirewall::new()),
        processes: Box::new(procs),
        lb: Box::new(FakeLoadBalancer::new()),
        ingress_firewall: Box::new(FakeFirewall::new()),
    };
    Reconciler::new(ports, config(dir.path()))
}

/// A reconciler on a node with an underlay whose load balancer the test keeps a handle to.
fn reconciler_with_lb(procs: SharedProcs, lb: &SharedLb, dir: &std::path::Path) -> Reconciler {
    let ports = Ports {
        links: Box::new(node_with_underlay()),
        firewall: Box::new(FakeFirewall::new()),
        processes: Box::new(procs),
        lb: Box::new(lb.clone()),
        ingress_firewall: Box::new(FakeFirewall::new()),
    };
    Reconciler::new(ports, config(dir))
}

/// Runs incremental rounds until converged (bounded), returning the rounds' reports.
fn settle(r: &mut Reconciler) -> Vec<RoundReport> {
    let mut reports = Vec::new();
    for _ in 0..20 {
        if r.converged() && !r.wants_round(Instant::now()) && !r.poll_processes(Instant::now()) {
            return reports;
        }
        reports.push(r.round(false, Instant::now()));
    }
    panic!("did not converge in 20 rounds: {:?}", r.status());
}

fn intent(text: &str) -> Intent {
    Intent::from_json(text).unwrap()
}

fn ns(name: &str) -> NsRef {
    NsRef::Owned(NsName::new(name).unwrap())
}

fn link_names(r: &mut Reconciler, at: &NsRef) -> Vec<String> {
    r.ports_mut()
        .links
        .list_links(at)
        .unwrap()
        .into_iter()
        .map(|l| l.name.to_string())
        .collect()
}

#[test]
fn converges_and_is_idempotent() {
    let tmp = tempfile::tempdir().unwrap();
    let procs = SharedProcs::default();
    let mut r = reconciler(node_with_underlay(), procs.clone(), &tmp);
    r.set_intent(intent(INTENT));
    let first = r.round(true, Instant::now());
    assert_eq!(first.errors, 0, "{:?}", r.status());
    settle(&mut r);
    assert!(r.converged());

    let mut netns: Vec<String> = r
        .ports_mut()
        .links
        .list_netns()
        .unwrap()
        .iter()
        .map(|n| n.to_string())
        .collect();
    netns.sort();
    assert_eq!(netns, ["net-app", "net-db", "sb-pg1", "sb-web1", "sb-web2"]);
    let app = link_names(&mut r, &ns("net-app"));
    assert!(
        app.contains(&"br0".to_string()) && app.contains(&"snvx4097".to_string()),
        "{app:?}"
    );
    // One remote peer on app (web3 on n2): one FDB entry towards n2, nothing on db.
    let fdb = r
        .ports_mut()
        .links
        .list_fdb(&ns("net-app"), &IfName::new("snvx4097").unwrap())
        .unwrap();
    assert_eq!(fdb.len(), 1);
    assert_eq!(fdb[0].dst.to_string(), "198.18.0.2");
    // The gateway bridge exists; pg1 is only on an internal network, so it has no gateway veth.
    assert!(link_names(&mut r, &NsRef::Node).contains(&"sngw0".to_string()));
    assert!(!link_names(&mut r, &ns("sb-pg1")).contains(&"eth1".to_string()));
    assert!(
        procs
            .0
            .lock()
            .unwrap()
            .running(&TaskId::new("web1").unwrap())
    );

    // Nothing changed: a full round applies nothing.
    let again = r.round(true, Instant::now());
    assert_eq!(again.ops_applied, 0, "{again:?}");
}

#[test]
fn full_round_repairs_drift() {
    let tmp = tempfile::tempdir().unwrap();
    let mut r = reconciler(node_with_underlay(), SharedProcs::default(), &tmp);
    r.set_intent(intent(INTENT));
    r.round(true, Instant::now());
    settle(&mut r);
    let vx = IfName::new("snvx4097").unwrap();
    let entry = r.ports_mut().links.list_fdb(&ns("net-app"), &vx).unwrap()[0].clone();
    r.ports_mut()
        .links
        .delete_fdb(&ns("net-app"), &vx, &entry)
        .unwrap();
    r.ports_mut()
        .links
        .delete_link(&ns("net-db"), &IfName::new("br0").unwrap())
        .unwrap();
    // An incremental round does not look; a full one does.
    assert_eq!(r.round(false, Instant::now()).ops_applied, 0);
    let rep = r.round(true, Instant::now());
    assert!(rep.drift_repaired > 0, "{rep:?}");
    settle(&mut r);
    assert_eq!(
        r.ports_mut().links.list_fdb(&ns("net-app"), &vx).unwrap(),
        vec![entry]
    );
    assert!(link_names(&mut r, &ns("net-db")).contains(&"br0".to_string()));
}

#[test]
fn removed_network_leaves_nothing_behind() {
    let tmp = tempfile::tempdir().unwrap();
    let procs = SharedProcs::default();
    let mut r = reconciler(node_with_underlay(), procs.clone(), &tmp);
    r.set_intent(intent(INTENT));
    r.round(true, Instant::now());
    settle(&mut r);
    // Drop the db network, its service and its task.
    let mut spec = intent(INTENT).spec().clone();
    spec.networks.retain(|n| n.name.as_str() != "db");
    spec.services.retain(|s| s.name.as_str() != "pg");
    spec.tasks.retain(|t| t.id.as_str() != "pg1");
    r.set_intent(Intent::new(spec).unwrap());
    r.round(false, Instant::now());
    settle(&mut r);
    let netns: Vec<String> = r
        .ports_mut()
        .links
        .list_netns()
        .unwrap()
        .iter()
        .map(|n| n.to_string())
        .collect();
    assert!(
        !netns.iter().any(|n| n == "net-db" || n == "sb-pg1"),
        "{netns:?}"
    );
    assert!(
        !procs
            .0
            .lock()
            .unwrap()
            .running(&TaskId::new("pg1").unwrap())
    );
    // The VXLAN device of db is gone too (its VNI is free for another network).
    assert!(
        !link_names(&mut r, &NsRef::Node)
            .iter()
            .any(|l| l == "snvx4098")
    );
}

#[test]
fn restart_adopts_without_touching_links() {
    let tmp = tempfile::tempdir().unwrap();
    let procs = SharedProcs::default();
    let mut r = reconciler(node_with_underlay(), procs.clone(), &tmp);
    r.set_intent(intent(INTENT));
    r.round(true, Instant::now());
    settle(&mut r);
    // netd dies; the kernel and the processes stay; a new netd starts over the same state.
    let ports = r.into_ports();
    procs.0.lock().unwrap().restart();
    let mut r2 = Reconciler::new(ports, config(tmp.path()));
    r2.set_intent(intent(INTENT));
    let rep = r2.round(true, Instant::now());
    assert_eq!(rep.errors, 0, "{:?}", r2.status());
    // Only the firewall table is re-applied (one atomic replace: its expected listing is not
    // known to a new process); no link, address, namespace or process op.
    assert!(rep.ops_applied <= 1, "{rep:?}");
    for (k, s) in r2.status() {
        if *k != ObjectKey::Node {
            assert_eq!(s.last_ops, 0, "{k}: {s:?}");
        }
    }
}

/// Fault injection: every link creation in one namespace fails with EBUSY while the fault is
/// set. Everything else is the fake kernel.
struct FaultyLinks {
    inner: FakeLinkPort,
    fail_in: Arc<Mutex<Option<NsRef>>>,
}

macro_rules! delegate {
    ($($name:ident(&mut self $(, $a:ident: $t:ty)*) -> $r:ty;)*) => {
        $(fn $name(&mut self $(, $a: $t)*) -> $r { self.inner.$name($($a),*) })*
    };
}

impl LinkPort for FaultyLinks {
    fn create_link(&mut self, ns: &NsRef, spec: &LinkSpec) -> PortResult<()> {
        let target = spec.move_to.as_ref().unwrap_or(ns);
        if self.fail_in.lock().unwrap().as_ref() == Some(target) {
            return Err(PortError::new(
                "create link",
                spec.name.to_string(),
                ErrorKind::Busy,
                "injected fault",
            ));
        }
        self.inner.create_link(ns, spec)
    }
    fn netns_path(&self, ns: &NsName) -> std::path::PathBuf {
        self.inner.netns_path(ns)
    }
    fn is_bound(&self, ns: &NsName) -> bool {
        self.inner.is_bound(ns)
    }
    delegate! {
        list_netns(&mut self) -> PortResult<Vec<NsName>>;
        create_netns(&mut self, ns: &NsName) -> PortResult<()>;
        bind_netns(&mut self, ns: &NsName, from: &std::path::Path) -> PortResult<()>;
        delete_netns(&mut self, ns: &NsName) -> PortResult<()>;
        list_links(&mut self, ns: &NsRef) -> PortResult<Vec<swarmnet_netd::port::LinkState>>;
        set_link(&mut self, ns: &NsRef, name: &IfName, change: &swarmnet_netd::port::LinkChange) -> PortResult<()>;
        delete_link(&mut self, ns: &NsRef, name: &IfName) -> PortResult<()>;
        list_addrs(&mut self, ns: &NsRef) -> PortResult<Vec<swarmnet_netd::port::AddrState>>;
        add_addr(&mut self, ns: &NsRef, link: &IfName, addr: ipnet::Ipv4Net) -> PortResult<()>;
        delete_addr(&mut self, ns: &NsRef, link: &IfName, addr: ipnet::Ipv4Net) -> PortResult<()>;
        list_routes(&mut self, ns: &NsRef) -> PortResult<Vec<swarmnet_netd::port::RouteState>>;
        add_route(&mut self, ns: &NsRef, route: &swarmnet_netd::port::RouteState) -> PortResult<()>;
        delete_route(&mut self, ns: &NsRef, route: &swarmnet_netd::port::RouteState) -> PortResult<()>;
        list_fdb(&mut self, ns: &NsRef, link: &IfName) -> PortResult<Vec<FdbEntry>>;
        add_fdb(&mut self, ns: &NsRef, link: &IfName, entry: &FdbEntry) -> PortResult<()>;
        delete_fdb(&mut self, ns: &NsRef, link: &IfName, entry: &FdbEntry) -> PortResult<()>;
        list_neighs(&mut self, ns: &NsRef, link: &IfName) -> PortResult<Vec<swarmnet_netd::port::NeighEntry>>;
        add_neigh(&mut self, ns: &NsRef, link: &IfName, entry: &swarmnet_netd::port::NeighEntry) -> PortResult<()>;
        delete_neigh(&mut self, ns: &NsRef, link: &IfName, entry: &swarmnet_netd::port::NeighEntry) -> PortResult<()>;
        get_sysctl(&mut self, ns: &NsRef, key: &str) -> PortResult<String>;
        set_sysctl(&mut self, ns: &NsRef, key: &str, value: &str) -> PortResult<()>;
        underlay_for(&mut self, addr: std::net::Ipv4Addr) -> PortResult<(IfName, u16)>;
    }
}

#[test]
fn one_failing_object_does_not_stall_the_others() {
    let tmp = tempfile::tempdir().unwrap();
    let fault = Arc::new(Mutex::new(Some(ns("net-db"))));
    let links = FaultyLinks {
        inner: node_with_underlay(),
        fail_in: Arc::clone(&fault),
    };
    let ports = Ports {
        links: Box::new(links),
        firewall: Box::new(FakeFirewall::new()),
        processes: Box::new(SharedProcs::default()),
        lb: Box::new(FakeLoadBalancer::new()),
        ingress_firewall: Box::new(FakeFirewall::new()),
    };
    let mut r = Reconciler::new(ports, config(tmp.path()));
    r.set_intent(intent(INTENT));
    let t0 = Instant::now();
    let rep = r.round(true, t0);
    assert!(rep.errors >= 1, "{rep:?}");
    let db = &r.status()[&ObjectKey::Network(Name::new("db").unwrap())];
    assert_eq!(db.state, ObjectState::Error);
    assert!(
        db.error.as_deref().unwrap().contains("injected fault"),
        "{db:?}"
    );
    assert_eq!(db.attempts, 1);
    // app and its sandboxes went ahead.
    r.round(false, t0);
    for key in [
        ObjectKey::Network(Name::new("app").unwrap()),
        ObjectKey::Sandbox(TaskId::new("web1").unwrap()),
    ] {
        assert_eq!(r.status()[&key].state, ObjectState::Ok, "{key}");
    }
    assert!(!r.converged());
    // Within the backoff an incremental round does not hammer the failing object.
    r.round(false, t0);
    assert_eq!(
        r.status()[&ObjectKey::Network(Name::new("db").unwrap())].attempts,
        1
    );
    // The fault clears; after the backoff the object is retried and everything converges.
    *fault.lock().unwrap() = None;
    let later = t0 + Duration::from_secs(2);
    assert!(r.wants_round(later));
    for _ in 0..5 {
        r.round(false, later);
    }
    assert!(r.converged(), "{:?}", r.status());
}

#[test]
fn crashed_task_is_restarted_with_backoff_and_policy() {
    let tmp = tempfile::tempdir().unwrap();
    let procs = SharedProcs::default();
    let mut r = reconciler(node_with_underlay(), procs.clone(), &tmp);
    r.set_intent(intent(INTENT));
    r.round(true, Instant::now());
    settle(&mut r);
    let web1 = TaskId::new("web1").unwrap();
    let pg1 = TaskId::new("pg1").unwrap();
    assert!(procs.0.lock().unwrap().exit(&web1, Exit::Code(1)));
    assert!(procs.0.lock().unwrap().exit(&pg1, Exit::Code(0)));
    let t0 = Instant::now();
    assert!(r.poll_processes(t0));
    r.round(false, t0);
    // Backing off: not started at once.
    assert!(!procs.0.lock().unwrap().running(&web1));
    // After the backoff it starts again; pg1 (on_failure, exited 0) stays down.
    let later = t0 + Duration::from_secs(1);
    assert!(r.wants_round(later));
    r.round(false, later);
    assert!(procs.0.lock().unwrap().running(&web1));
    assert!(!procs.0.lock().unwrap().running(&pg1));
}

#[test]
fn an_intent_without_this_node_changes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let procs = SharedProcs::default();
    let mut r = reconciler(node_with_underlay(), procs.clone(), &tmp);
    r.set_intent(intent(INTENT));
    r.round(true, Instant::now());
    settle(&mut r);
    let before = r.ports_mut().links.list_netns().unwrap();
    // A file for another cluster (or a mistyped --node-id): n1 is not in it.
    let other = r#"{"version": 1, "nodes": [{"id": "n2", "addr": "198.18.0.2"}]}"#;
    r.set_intent(intent(other));
    let rep = r.round(true, Instant::now());
    assert_eq!(rep.ops_applied, 0, "{rep:?}");
    assert_eq!(r.ports_mut().links.list_netns().unwrap(), before);
    assert!(
        procs
            .0
            .lock()
            .unwrap()
            .running(&TaskId::new("web1").unwrap())
    );
    assert!(!r.converged());
    assert!(
        r.node_error().unwrap().contains("not in the intent"),
        "{:?}",
        r.node_error()
    );
}

#[test]
fn gateway_bridge_goes_with_the_last_sandbox_without_waiting_for_a_full_round() {
    let tmp = tempfile::tempdir().unwrap();
    let mut r = reconciler(node_with_underlay(), SharedProcs::default(), &tmp);
    r.set_intent(intent(INTENT));
    r.round(true, Instant::now());
    settle(&mut r);
    assert!(link_names(&mut r, &NsRef::Node).contains(&"sngw0".to_string()));
    let empty = r#"{"version": 1, "nodes": [{"id": "n1", "addr": "198.18.0.1"}]}"#;
    r.set_intent(intent(empty));
    // Incremental rounds only: tasks stop, namespaces go, and the bridge with them.
    for _ in 0..6 {
        r.round(false, Instant::now());
    }
    assert!(r.converged(), "{:?}", r.status());
    assert_eq!(
        link_names(&mut r, &NsRef::Node),
        ["eth0", "lo"].map(String::from)
    );
    assert!(r.ports_mut().links.list_netns().unwrap().is_empty());
}

#[test]
fn a_big_change_is_applied_in_slices_with_status_pending_meanwhile() {
    let tmp = tempfile::tempdir().unwrap();
    let ports = Ports {
        links: Box::new(node_with_underlay()),
        firewall: Box::new(FakeFirewall::new()),
        processes: Box::new(SharedProcs::default()),
        lb: Box::new(FakeLoadBalancer::new()),
        ingress_firewall: Box::new(FakeFirewall::new()),
    };
    // No time budget at all: every round applies exactly one object.
    let mut r = Reconciler::new(
        ports,
        ReconcilerConfig {
            round_budget: Duration::ZERO,
            ..config(tmp.path())
        },
    );
    r.set_intent(intent(INTENT));
    let first = r.round(true, Instant::now());
    assert_eq!(first.objects_applied, 1, "{first:?}");
    assert!(first.deferred >= 4, "{first:?}");
    assert!(!r.converged());
    assert!(r.status().values().any(|s| s.state == ObjectState::Pending));
    let mut rounds = 1;
    while !r.converged() {
        r.round(false, Instant::now());
        rounds += 1;
        assert!(rounds < 50, "no progress: {:?}", r.status());
    }
    // node, app, db, web1, web2, pg1: six objects, one per round, plus confirmations.
    assert!(rounds >= 6, "{rounds}");
    assert_eq!(r.round(true, Instant::now()).ops_applied, 0);
}

/// A load balancer the test can also reach, to make connections through it.
#[derive(Clone, Default)]
struct SharedLb(Arc<Mutex<FakeLoadBalancer>>);

impl LoadBalancerPort for SharedLb {
    fn kind(&self) -> LbKind {
        LbKind::Fake
    }
    fn apply(&mut self, ns: &NsRef, spec: &LbSpec) -> PortResult<ApplyStats> {
        self.0.lock().unwrap().apply(ns, spec)
    }
    fn observe(&mut self, ns: &NsRef) -> PortResult<LbObserved> {
        self.0.lock().unwrap().observe(ns)
    }
    fn flush(&mut self, ns: &NsRef) -> PortResult<()> {
        self.0.lock().unwrap().flush(ns)
    }
    fn namespaces(&self) -> Vec<NsRef> {
        self.0.lock().unwrap().namespaces()
    }
}

const VIP_INTENT: &str = r#"{
  "version": 1,
  "nodes": [{"id": "n1", "addr": "198.18.0.1"}, {"id": "n2", "addr": "198.18.0.2"}],
  "networks": [{"name": "app", "subnet": "10.10.0.0/24", "vni": 4097}],
  "services": [
    {"name": "web", "networks": [{"network": "app", "vip": "10.10.0.2"}],
     "ports": [{"target": 80}, {"target": 53, "protocol": "udp"}]},
    {"name": "client", "networks": [{"network": "app"}]}
  ],
  "tasks": [
    {"id": "c1", "service": "client", "node": "n1", "argv": ["sleep", "inf"],
     "networks": [{"network": "app", "ip": "10.10.0.9"}]},
    {"id": "web1", "service": "web", "node": "n1", "argv": ["sleep", "inf"],
     "networks": [{"network": "app", "ip": "10.10.0.3"}]},
    {"id": "web2", "service": "web", "node": "n2", "argv": ["sleep", "inf"],
     "networks": [{"network": "app", "ip": "10.10.0.4"}]}
  ]
}"#;

#[test]
fn vips_load_balance_over_every_node_and_leaving_backends_drain() {
    let tmp = tempfile::tempdir().unwrap();
    let lb = SharedLb::default();
    let mut r = reconciler_with_lb(SharedProcs::default(), &lb, tmp.path());
    r.set_intent(intent(VIP_INTENT));
    r.round(true, Instant::now());
    settle(&mut r);
    let app = ns("net-app");
    // The VIP is a /32 on br0 of the network's namespace.
    let addrs = r.ports_mut().links.list_addrs(&app).unwrap();
    assert!(
        addrs.iter().any(|a| a.addr.to_string() == "10.10.0.2/32"),
        "{addrs:?}"
    );
    let tcp = ServiceKey {
        vip: "10.10.0.2".parse().unwrap(),
        proto: Proto::Tcp,
        port: 80,
    };
    let client: Ipv4Addr = "10.10.0.9".parse().unwrap();
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..40 {
        seen.insert(
            lb.0.lock()
                .unwrap()
                .connect(&app, client, tcp)
                .unwrap()
                .backend
                .to_string(),
        );
    }
    assert_eq!(
        seen.into_iter().collect::<Vec<_>>(),
        ["10.10.0.3", "10.10.0.4"],
        "local and remote backends"
    );
    let open = lb.0.lock().unwrap().connect(&app, client, tcp).unwrap();

    // web2 (on n2) leaves: it drains for the grace period (1 s here), then is gone.
    let mut spec = intent(VIP_INTENT).spec().clone();
    spec.tasks.retain(|t| t.id.as_str() != "web2");
    r.set_intent(Intent::new(spec).unwrap());
    let t0 = Instant::now();
    r.round(false, t0);
    for _ in 0..20 {
        let c = lb.0.lock().unwrap().connect(&app, client, tcp).unwrap();
        assert_eq!(
            c.backend.to_string(),
            "10.10.0.3",
            "no new connection reaches a draining backend"
        );
    }
    assert!(
        lb.0.lock().unwrap().established(open.id).is_some(),
        "established connections continue"
    );
    let applied_at_t0 = lb.0.lock().unwrap().commits(&app);
    let later = t0 + Duration::from_secs(2);
    assert!(r.wants_round(later), "the drain deadline wakes a round");
    r.round(false, later);
    assert!(
        lb.0.lock().unwrap().commits(&app) > applied_at_t0,
        "the drained backend was removed"
    );

    // No backend left: refused at once.
    let mut spec = intent(VIP_INTENT).spec().clone();
    spec.tasks.retain(|t| !t.id.as_str().starts_with("web"));
    r.set_intent(Intent::new(spec).unwrap());
    r.round(false, later);
    r.round(false, later + Duration::from_secs(2));
    assert_eq!(
        lb.0.lock().unwrap().connect(&app, client, tcp).unwrap_err(),
        FakeRefusal::NoBackend
    );
}

/// Gossip as an input of the projection: a remote task that gossip stops holding live leaves
/// the load balancer like an intent removal (draining: no new connections, established ones
/// continue, then gone) and, its node being dead, its FDB and neighbour entries go at once;
/// when gossip holds it again it comes back. Without gossip (`None`) the intent alone rules.
#[test]
fn gossip_liveness_drives_remote_backends_fdb_and_neighbours() {
    use swarmnet_model::{Name, TaskId};
    use swarmnet_netd::gossip::view::RemoteLive;
    let tmp = tempfile::tempdir().unwrap();
    let lb = SharedLb::default();
    let mut r = reconciler_with_lb(SharedProcs::default(), &lb, tmp.path());
    r.set_intent(intent(VIP_INTENT));
    r.round(true, Instant::now());
    settle(&mut r);
    let app = ns("net-app");
    let vx = swarmnet_model::IfName::new("snvx4097").unwrap();
    let web2: Ipv4Addr = "10.10.0.4".parse().unwrap();
    let n2: std::net::IpAddr = "198.18.0.2".parse().unwrap();
    let remote_entries = |r: &mut Reconciler| {
        let fdb = r.ports_mut().links.list_fdb(&app, &vx).unwrap().len();
        let neigh = r
            .ports_mut()
            .links
            .list_neighs(&app, &vx)
            .unwrap()
            .iter()
            .filter(|n| n.ip == web2)
            .count();
        (fdb, neigh)
    };
    assert_eq!(
        remote_entries(&mut r),
        (1, 1),
        "intent alone: web2 is a peer"
    );
    let tcp = ServiceKey {
        vip: "10.10.0.2".parse().unwrap(),
        proto: Proto::Tcp,
        port: 80,
    };
    let client: Ipv4Addr = "10.10.0.9".parse().unwrap();
    let backends = |lb: &SharedLb| {
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..40 {
            seen.insert(
                lb.0.lock()
                    .unwrap()
                    .connect(&app, client, tcp)
                    .unwrap()
                    .backend
                    .to_string(),
            );
        }
        seen.into_iter().collect::<Vec<_>>()
    };
    assert_eq!(backends(&lb), ["10.10.0.3", "10.10.0.4"]);
    let open = lb.0.lock().unwrap().connect(&app, client, tcp).unwrap();
    let open = if open.backend == web2 {
        open
    } else {
        loop {
            let c = lb.0.lock().unwrap().connect(&app, client, tcp).unwrap();
            if c.backend == web2 {
                break c;
            }
        }
    };

    // Gossip: n2 dead (no VTEP, no endpoint).
    let dead = RemoteLive::default();
    assert!(r.set_remote_live(Some(dead.clone())));
    assert!(
        !r.set_remote_live(Some(dead)),
        "unchanged: no new round needed"
    );
    let t0 = Instant::now();
    r.round(false, t0);
    assert_eq!(
        remote_entries(&mut r),
        (0, 0),
        "a dead node's entries go at once"
    );
    assert_eq!(backends(&lb), ["10.10.0.3"], "no new connection to web2");
    assert!(
        lb.0.lock().unwrap().established(open.id).is_some(),
        "established connections drain as after an intent removal"
    );
    let later = t0 + Duration::from_secs(2);
    assert!(r.wants_round(later), "the drain deadline wakes a round");
    r.round(false, later);
    settle(&mut r);

    // Back in gossip: backend, FDB and neighbour return.
    let live = RemoteLive {
        endpoints: [(Name::new("app").unwrap(), TaskId::new("web2").unwrap())].into(),
        warming: None,
        live_vteps: [n2].into(),
    };
    assert!(r.set_remote_live(Some(live)));
    r.round(false, later);
    settle(&mut r);
    assert_eq!(remote_entries(&mut r), (1, 1));
    assert_eq!(backends(&lb), ["10.10.0.3", "10.10.0.4"]);

    // Gossip switched off: the intent alone.
    assert!(r.set_remote_live(None));
    r.round(false, later);
    settle(&mut r);
    assert_eq!(remote_entries(&mut r), (1, 1));
}

/// A local task serves (VIP backend, gossip-published healthy) only while its process runs
/// and its service's check passes on that process; the verdicts come from the health monitor.
#[test]
fn health_verdicts_decide_local_backends_and_gossip_health() {
    use swarmnet_model::spec::HealthStatus;
    use swarmnet_netd::gossip::Health;
    use swarmnet_netd::health::TaskHealth;
    let tmp = tempfile::tempdir().unwrap();
    let lb = SharedLb::default();
    let procs = SharedProcs::default();
    let mut r = reconciler_with_lb(procs.clone(), &lb, tmp.path());
    let text = VIP_INTENT.replace(
        r#""ports": [{"target": 80}, {"target": 53, "protocol": "udp"}]}"#,
        r#""ports": [{"target": 80}], "health": {"cmd": ["true"], "interval": "1s"}}"#,
    );
    r.set_intent(intent(&text));
    r.round(true, Instant::now());
    settle(&mut r);
    let app = ns("net-app");
    let tcp = ServiceKey {
        vip: "10.10.0.2".parse().unwrap(),
        proto: Proto::Tcp,
        port: 80,
    };
    let backends = |lb: &SharedLb| -> Vec<String> {
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..40 {
            if let Ok(c) =
                lb.0.lock()
                    .unwrap()
                    .connect(&app, "10.10.0.9".parse().unwrap(), tcp)
            {
                seen.insert(c.backend.to_string());
            }
        }
        seen.into_iter().collect()
    };
    let web1 = TaskId::new("web1").unwrap();
    let health_of = |r: &Reconciler| {
        r.local_endpoints()
            .into_iter()
            .find(|e| e.task == web1)
            .map(|e| e.health)
    };
    // Running, never checked: starting, not a backend; the remote task (gossip off) is.
    assert_eq!(backends(&lb), ["10.10.0.4"]);
    assert_eq!(health_of(&r), Some(Health::Starting));
    assert!(r.unready().contains(&web1));
    let c1 = TaskId::new("c1").unwrap();
    assert!(
        !r.unready().contains(&c1),
        "a task without a check serves once running"
    );
    let pid = procs
        .0
        .lock()
        .unwrap()
        .list()
        .unwrap()
        .into_iter()
        .find(|p| p.task == web1)
        .unwrap()
        .pid;
    let verdict = |status, pid| {
        std::collections::BTreeMap::from([(
            web1.clone(),
            TaskHealth {
                status,
                pid,
                failing_streak: 0,
                checks: 1,
                last: None,
            },
        )])
    };
    assert!(r.set_local_health(verdict(HealthStatus::Healthy, pid)));
    assert!(
        !r.set_local_health(verdict(HealthStatus::Healthy, pid)),
        "no change"
    );
    let generation = r.health_generation();
    r.round(false, Instant::now());
    settle(&mut r);
    assert!(r.health_generation() > generation, "DNS views follow");
    assert_eq!(backends(&lb), ["10.10.0.3", "10.10.0.4"]);
    assert_eq!(health_of(&r), Some(Health::Healthy));
    // Unhealthy: it leaves the backends at once (drains), gossip says so.
    assert!(r.set_local_health(verdict(HealthStatus::Unhealthy, pid)));
    r.round(false, Instant::now());
    settle(&mut r);
    assert_eq!(backends(&lb), ["10.10.0.4"]);
    assert_eq!(health_of(&r), Some(Health::Unhealthy));
    // A verdict on another pid (the process restarted since) does not count.
    assert!(r.set_local_health(verdict(HealthStatus::Healthy, pid + 1000)));
    r.round(false, Instant::now());
    assert_eq!(health_of(&r), Some(Health::Starting));
    // The monitor is asked to check web1 (it has a check, its process runs), not c1.
    let targets = r.health_targets();
    assert_eq!(targets.len(), 1);
    assert_eq!((&targets[0].task, targets[0].pid), (&web1, pid));
    assert!(
        targets[0].netns.ends_with("sb-web1"),
        "{:?}",
        targets[0].netns
    );
}

/// A task whose process ends and whose restart policy keeps it down (what the orchestrator
/// projects) stops serving and is reported with how it ended, after its record is forgotten.
#[test]
fn an_exited_task_kept_down_stops_serving_and_is_reported_with_its_exit() {
    let tmp = tempfile::tempdir().unwrap();
    let lb = SharedLb::default();
    let procs = SharedProcs::default();
    let mut r = reconciler_with_lb(procs.clone(), &lb, tmp.path());
    let text = VIP_INTENT.replace(
        r#""ports": [{"target": 80}, {"target": 53, "protocol": "udp"}]}"#,
        r#""ports": [{"target": 80}], "restart": "never"}"#,
    );
    r.set_intent(intent(&text));
    r.round(true, Instant::now());
    settle(&mut r);
    let web1 = TaskId::new("web1").unwrap();
    let n1 = NodeId::new("n1").unwrap();
    let reports = swarmnet_netd::assign::task_reports(&r, &n1);
    assert_eq!(
        reports[&web1],
        ("running".to_string(), String::new(), String::new())
    );
    assert!(procs.0.lock().unwrap().exit(&web1, Exit::Code(3)));
    assert!(r.poll_processes(Instant::now()), "an exit is due a round");
    settle(&mut r);
    assert!(!procs.0.lock().unwrap().running(&web1), "kept down");
    assert!(r.unready().contains(&web1));
    let reports = swarmnet_netd::assign::task_reports(&r, &n1);
    assert_eq!(
        reports[&web1],
        (
            "failed".to_string(),
            "exit code 3".to_string(),
            String::new()
        )
    );
    let app = ns("net-app");
    let tcp = ServiceKey {
        vip: "10.10.0.2".parse().unwrap(),
        proto: Proto::Tcp,
        port: 80,
    };
    for _ in 0..20 {
        let c =
            lb.0.lock()
                .unwrap()
                .connect(&app, "10.10.0.9".parse().unwrap(), tcp)
                .unwrap();
        assert_eq!(
            c.backend.to_string(),
            "10.10.0.4",
            "only the remote task serves"
        );
    }
}

const MESH_INTENT: &str = r#"{
  "version": 1,
  "nodes": [{"id": "n1", "addr": "198.18.0.1", "ingress_ip": "10.255.0.101"},
            {"id": "n2", "addr": "198.18.0.2", "ingress_ip": "10.255.0.102"}],
  "networks": [{"name": "ingress", "subnet": "10.255.0.0/24", "vni": 4096, "ingress": true}],
  "services": [{"name": "web", "networks": [{"network": "ingress", "vip": "10.255.0.2"}],
                "ports": [{"target": 80, "published": 8080}]}],
  "tasks": [
    {"id": "web1", "service": "web", "node": "n1", "argv": ["sleep", "inf"],
     "networks": [{"network": "ingress", "ip": "10.255.0.11"}]},
    {"id": "web2", "service": "web", "node": "n2", "argv": ["sleep", "inf"],
     "networks": [{"network": "ingress", "ip": "10.255.0.12"}]}
  ]
}"#;

/// The routing mesh balances in the ingress sandbox: the ingress VIP is an address there and
/// its load balancer spreads over the tasks of other nodes (this node's get their share
/// straight from the node namespace); the ingress network's namespace
/// holds no VIP and no load balancer. A load balancer an earlier netd left in the network's
/// namespace (the previous layout) is removed by a full round, and a leaving remote task
/// drains in the sandbox's load balancer like in any network's.
#[test]
fn the_routing_mesh_balances_in_the_ingress_sandbox_and_an_old_layout_is_cleaned_up() {
    let tmp = tempfile::tempdir().unwrap();
    let lb = SharedLb::default();
    let net = ns("net-ingress");
    let sbox = ns("sb-ingress-sbox");
    let vip: Ipv4Addr = "10.255.0.2".parse().unwrap();
    let tcp = ServiceKey {
        vip,
        proto: Proto::Tcp,
        port: 80,
    };
    // What an earlier netd left: the ingress network balanced in its own namespace.
    let old = LbSpec {
        services: [(
            tcp,
            swarmnet_netd::lb::ServiceSpec::new(tcp, 80, ["10.255.0.11".parse().unwrap()]),
        )]
        .into(),
        ..LbSpec::default()
    };
    let mut r = reconciler_with_lb(SharedProcs::default(), &lb, tmp.path());
    r.set_intent(intent(MESH_INTENT));
    r.round(true, Instant::now());
    settle(&mut r);
    // The leftover appears in the network's namespace (as after an upgrade, when the new netd
    // starts): the next full round removes it.
    lb.0.lock().unwrap().apply(&net, &old).unwrap();
    assert!(r.round(true, Instant::now()).ops_applied > 0);
    settle(&mut r);
    let sb_addrs = r.ports_mut().links.list_addrs(&sbox).unwrap();
    assert!(
        sb_addrs
            .iter()
            .any(|a| a.addr.to_string() == "10.255.0.2/32"),
        "the VIP is in the ingress sandbox: {sb_addrs:?}"
    );
    let net_addrs = r.ports_mut().links.list_addrs(&net).unwrap();
    assert!(
        !net_addrs.iter().any(|a| a.addr.addr() == vip),
        "not on the network's bridge: {net_addrs:?}"
    );
    let client: Ipv4Addr = "198.18.0.250".parse().unwrap();
    assert_eq!(
        lb.0.lock().unwrap().observe(&net).unwrap(),
        LbObserved::Absent,
        "the old layout's load balancer is gone"
    );
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..40 {
        let c = lb.0.lock().unwrap().connect(&sbox, client, tcp).unwrap();
        seen.insert(c.backend.to_string());
    }
    // The local task's share is DNATed straight from the node namespace (swarmnet_netd::mesh):
    // in the sandbox it takes no new connection, the remote one takes all that come here.
    assert_eq!(
        seen.into_iter().collect::<Vec<_>>(),
        ["10.255.0.12"],
        "the remote task, balanced in the sandbox"
    );
    let open = lb.0.lock().unwrap().connect(&sbox, client, tcp).unwrap();
    assert!(r.converged(), "{:?}", r.status());
    assert_eq!(
        r.round(true, Instant::now()).ops_applied,
        0,
        "a full round finds no drift"
    );

    // web2 (on n2) leaves: it drains in the sandbox's load balancer, then is gone; web1, now
    // the only task, takes the sandbox's new connections again.
    let mut spec = intent(MESH_INTENT).spec().clone();
    spec.tasks.retain(|t| t.id.as_str() != "web2");
    r.set_intent(Intent::new(spec).unwrap());
    let t0 = Instant::now();
    r.round(false, t0);
    for _ in 0..20 {
        let c = lb.0.lock().unwrap().connect(&sbox, client, tcp).unwrap();
        assert_eq!(
            c.backend.to_string(),
            "10.255.0.11",
            "no new connection to a draining task"
        );
    }
    assert!(lb.0.lock().unwrap().established(open.id).is_some());
    let before = lb.0.lock().unwrap().commits(&sbox);
    let later = t0 + Duration::from_secs(2);
    assert!(r.wants_round(later), "the drain deadline wakes a round");
    r.round(false, later);
    assert!(lb.0.lock().unwrap().commits(&sbox) > before, "then removed");
}

/// A port served by local tasks only (local traffic policy; host mode is the same path) is
/// refused while its task starts and forwarded to it from the first incremental round after
/// the task runs: the node firewall follows its published ports without waiting for a full
/// round (it waited up to one full-reconcile interval, 30 s by default).
#[test]
fn a_local_policy_port_follows_its_task_without_a_full_round() {
    let tmp = tempfile::tempdir().unwrap();
    let lb = SharedLb::default();
    let mut r = reconciler_with_lb(SharedProcs::default(), &lb, tmp.path());
    let text = MESH_INTENT.replace(
        r#""published": 8080}"#,
        r#""published": 8080, "traffic_policy": "local"}"#,
    );
    // Placed, not yet running (the orchestrator's `starting`): refused.
    let starting = text.replace(
        r#""node": "n1", "argv""#,
        r#""node": "n1", "desired_state": "starting", "argv""#,
    );
    assert_ne!(starting, text);
    r.set_intent(intent(&starting));
    r.round(false, Instant::now());
    settle(&mut r);
    let fw = r.ports_mut().firewall.list_table().unwrap().unwrap();
    assert!(
        fw.lines()
            .any(|l| l.contains("dport 8080") && l.contains("no local task")),
        "{fw}"
    );
    // Running: only the task's desired state changes, its sandbox does not.
    r.set_intent(intent(&text));
    r.round(false, Instant::now());
    settle(&mut r);
    let fw = r.ports_mut().firewall.list_table().unwrap().unwrap();
    let rule = fw
        .lines()
        .find(|l| l.contains("dport 8080"))
        .unwrap_or_else(|| panic!("no rule for 8080:\n{fw}"));
    assert!(
        rule.contains("dnat ip to 172.30.") && rule.contains(":80"),
        "forwarded to web1 on this node's gateway bridge: {rule}"
    );
    // web1 leaves this node: refused again once it has drained (its stop grace, 1 s here),
    // by incremental rounds alone.
    let mut spec = intent(&text).spec().clone();
    spec.tasks.retain(|t| t.id.as_str() != "web1");
    r.set_intent(Intent::new(spec).unwrap());
    let t0 = Instant::now();
    loop {
        r.round(false, Instant::now());
        let fw = r.ports_mut().firewall.list_table().unwrap().unwrap();
        if fw
            .lines()
            .any(|l| l.contains("dport 8080") && l.contains("no local task"))
        {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "still not refused after web1 left:\n{fw}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}
