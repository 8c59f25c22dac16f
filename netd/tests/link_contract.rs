//! The `LinkPort` contract suite: one set of cases, each a function over `&mut dyn LinkPort`,
//! run against [`FakeLinkPort`] and [`LinuxLinkPort`] (module `fake` and module `linux`).
//!
//! The Linux run is privileged (gated by `swarmnet_tests_netns::gate::privileged`) and never
//! touches the machine's root network namespace: each case runs on its own thread that first
//! `unshare(CLONE_NEWNET)`s, so `NsRef::Node` is a scratch namespace that dies with the thread.
//! Owned namespaces are bind mounts in a temporary run directory, removed by a drop guard even
//! when the case fails. The underlay is a veth pair holding 198.18.0.1/15.

use std::net::Ipv4Addr;
use std::os::unix::fs::MetadataExt;

use ipnet::Ipv4Net;
use swarmnet_model::{IfName, MacAddr};
use swarmnet_netd::fake::link::FakeLinkPort;
use swarmnet_netd::linux::link::LinuxLinkPort;
use swarmnet_netd::port::{
    AddrState, ErrorKind, FdbEntry, LinkChange, LinkKind, LinkKindState, LinkPort, LinkSpec,
    LinkState, NeighEntry, NsName, NsRef, PortResult, RouteState,
};

const UNDERLAY: &str = "snul0";
const UNDERLAY_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);

fn n(s: &str) -> IfName {
    IfName::new(s).unwrap()
}
fn ns(s: &str) -> NsName {
    NsName::new(s).unwrap()
}
fn owned(s: &str) -> NsRef {
    NsRef::Owned(ns(s))
}
fn mac(s: &str) -> MacAddr {
    s.parse().unwrap()
}
fn net(s: &str) -> Ipv4Net {
    s.parse().unwrap()
}

fn spec(name: &str, kind: LinkKind) -> LinkSpec {
    LinkSpec {
        name: n(name),
        kind,
        mtu: None,
        mac: None,
        alias: None,
        move_to: None,
    }
}
fn bridge(name: &str) -> LinkSpec {
    spec(name, LinkKind::Bridge)
}
fn veth(name: &str, peer: &str, peer_ns: Option<NsRef>) -> LinkSpec {
    spec(
        name,
        LinkKind::Veth {
            peer: n(peer),
            peer_ns,
            peer_mac: None,
        },
    )
}
fn vxlan(name: &str, vni: u32) -> LinkSpec {
    spec(
        name,
        LinkKind::Vxlan {
            vni,
            local: UNDERLAY_IP,
            port: 4789,
            underlay: Some(n(UNDERLAY)),
        },
    )
}
fn up() -> LinkChange {
    LinkChange {
        up: Some(true),
        ..LinkChange::default()
    }
}

fn kind_of<T: std::fmt::Debug>(r: PortResult<T>) -> ErrorKind {
    match r {
        Ok(v) => panic!("expected an error, got Ok({v:?})"),
        Err(e) => {
            // Every error names what failed.
            assert!(!e.object.is_empty(), "{e:?}");
            e.kind
        }
    }
}

fn find(port: &mut dyn LinkPort, at: &NsRef, name: &str) -> Option<LinkState> {
    port.list_links(at)
        .unwrap()
        .into_iter()
        .find(|l| l.name.as_str() == name)
}

/// The underlay every case can use: a veth pair in the node namespace, `snul0` holding
/// 198.18.0.1/15, MTU 1500.
fn setup_underlay(port: &mut dyn LinkPort) {
    let mut s = veth(UNDERLAY, "snul1", None);
    s.mtu = Some(1500);
    port.create_link(&NsRef::Node, &s).unwrap();
    port.set_link(&NsRef::Node, &n(UNDERLAY), &up()).unwrap();
    port.set_link(&NsRef::Node, &n("snul1"), &up()).unwrap();
    port.add_addr(
        &NsRef::Node,
        &n(UNDERLAY),
        Ipv4Net::new(UNDERLAY_IP, 15).unwrap(),
    )
    .unwrap();
}

// ---------------------------------------------------------------------------------------------
// Cases
// ---------------------------------------------------------------------------------------------

fn netns_lifecycle(port: &mut dyn LinkPort) {
    let a = ns("snt-a");
    port.create_netns(&a).unwrap();
    assert_eq!(kind_of(port.create_netns(&a)), ErrorKind::Exists);
    assert!(port.list_netns().unwrap().contains(&a));
    assert!(port.netns_path(&a).ends_with("netns/snt-a"));
    // A fresh namespace has only its loopback.
    let links = port.list_links(&owned("snt-a")).unwrap();
    assert_eq!(
        links.iter().map(|l| l.name.as_str()).collect::<Vec<_>>(),
        ["lo"]
    );
    port.delete_netns(&a).unwrap();
    assert!(!port.list_netns().unwrap().contains(&a));
    assert_eq!(kind_of(port.delete_netns(&a)), ErrorKind::NotFound);
    assert_eq!(
        kind_of(port.list_links(&owned("snt-a"))),
        ErrorKind::NotFound
    );
    assert_eq!(
        kind_of(port.create_link(&owned("snt-a"), &bridge("br0"))),
        ErrorKind::NotFound
    );
}

fn link_create_exists_notfound(port: &mut dyn LinkPort) {
    port.create_netns(&ns("snt-l")).unwrap();
    let at = owned("snt-l");
    let mut s = bridge("br0");
    s.mtu = Some(1450);
    s.mac = Some(mac("02:42:0a:00:00:01"));
    s.alias = Some("swarmnet:net-app".into());
    port.create_link(&at, &s).unwrap();
    assert_eq!(kind_of(port.create_link(&at, &s)), ErrorKind::Exists);
    // The same name in another namespace is fine.
    port.create_link(&NsRef::Node, &bridge("br0")).unwrap();

    let l = find(port, &at, "br0").unwrap();
    assert_eq!(l.kind, LinkKindState::Bridge);
    assert_eq!(l.mtu, 1450);
    assert_eq!(l.mac, Some(mac("02:42:0a:00:00:01")));
    assert_eq!(l.alias.as_deref(), Some("swarmnet:net-app"));
    assert!(!l.up);
    assert_eq!(l.master, None);

    let change = LinkChange {
        mtu: Some(1400),
        up: Some(true),
        mac: Some(mac("02:42:0a:00:00:02")),
        master: None,
        hairpin: None,
    };
    port.set_link(&at, &n("br0"), &change).unwrap();
    let l = find(port, &at, "br0").unwrap();
    assert_eq!(
        (l.mtu, l.up, l.mac),
        (1400, true, Some(mac("02:42:0a:00:00:02")))
    );
    port.set_link(
        &at,
        &n("br0"),
        &LinkChange {
            up: Some(false),
            ..LinkChange::default()
        },
    )
    .unwrap();
    assert!(!find(port, &at, "br0").unwrap().up);

    assert_eq!(
        kind_of(port.set_link(&at, &n("nope0"), &up())),
        ErrorKind::NotFound
    );
    port.delete_link(&at, &n("br0")).unwrap();
    assert!(find(port, &at, "br0").is_none());
    assert_eq!(
        kind_of(port.delete_link(&at, &n("br0"))),
        ErrorKind::NotFound
    );
    // The node's br0 was not touched.
    assert!(find(port, &NsRef::Node, "br0").is_some());
    port.delete_link(&NsRef::Node, &n("br0")).unwrap();
    port.delete_netns(&ns("snt-l")).unwrap();
}

fn get_link_by_name(port: &mut dyn LinkPort) {
    port.create_netns(&ns("snt-g")).unwrap();
    let at = owned("snt-g");
    port.create_link(&at, &bridge("br0")).unwrap();
    port.create_link(&at, &veth("sn-g0", "sn-g1", None))
        .unwrap();
    port.set_link(
        &at,
        &n("sn-g0"),
        &LinkChange {
            master: Some(Some(n("br0"))),
            ..up()
        },
    )
    .unwrap();
    let one = port.get_link(&at, &n("sn-g0")).unwrap().expect("exists");
    // The same as the dump says, master resolved to its name.
    assert_eq!(
        Some(&one),
        port.list_links(&at)
            .unwrap()
            .iter()
            .find(|l| l.name == n("sn-g0"))
    );
    assert_eq!(one.master, Some(n("br0")));
    assert_eq!(port.get_link(&at, &n("nope0")).unwrap(), None);
    assert_eq!(
        kind_of(port.get_link(&owned("snt-none"), &n("br0"))),
        ErrorKind::NotFound
    );
    port.delete_netns(&ns("snt-g")).unwrap();
}

/// Waits (up to 10 s) for an effect the kernel applies asynchronously.
fn eventually(
    what: &str,
    port: &mut dyn LinkPort,
    mut cond: impl FnMut(&mut dyn LinkPort) -> bool,
) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !cond(port) {
        assert!(
            std::time::Instant::now() < deadline,
            "not within 10 s: {what}"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

fn master_must_exist_and_be_a_bridge(port: &mut dyn LinkPort) {
    port.create_netns(&ns("snt-m")).unwrap();
    let at = owned("snt-m");
    port.create_link(&at, &veth("sn-v0", "sn-v1", None))
        .unwrap();
    let to = |m: &str| LinkChange {
        master: Some(Some(n(m))),
        ..LinkChange::default()
    };
    assert_eq!(
        kind_of(port.set_link(&at, &n("sn-v0"), &to("br0"))),
        ErrorKind::Invalid
    );
    assert_eq!(
        kind_of(port.set_link(&at, &n("sn-v0"), &to("sn-v1"))),
        ErrorKind::Invalid
    );
    // A bridge of the same name in another namespace does not count.
    port.create_link(&NsRef::Node, &bridge("br9")).unwrap();
    assert_eq!(
        kind_of(port.set_link(&at, &n("sn-v0"), &to("br9"))),
        ErrorKind::Invalid
    );
    port.delete_link(&NsRef::Node, &n("br9")).unwrap();

    port.create_link(&at, &bridge("br0")).unwrap();
    port.set_link(&at, &n("sn-v0"), &to("br0")).unwrap();
    assert_eq!(find(port, &at, "sn-v0").unwrap().master, Some(n("br0")));
    let nomaster = LinkChange {
        master: Some(None),
        ..LinkChange::default()
    };
    // Hairpin mode is a bridge-port flag: it needs a master, shows in the listing, and goes
    // when the port leaves the bridge.
    let hairpin = LinkChange {
        hairpin: Some(true),
        ..LinkChange::default()
    };
    port.set_link(&at, &n("sn-v0"), &hairpin).unwrap();
    assert!(find(port, &at, "sn-v0").unwrap().hairpin);
    assert!(port.get_link(&at, &n("sn-v0")).unwrap().is_some());
    port.set_link(&at, &n("sn-v0"), &nomaster).unwrap();
    assert_eq!(find(port, &at, "sn-v0").unwrap().master, None);
    assert!(!find(port, &at, "sn-v0").unwrap().hairpin);
    assert_eq!(
        kind_of(port.set_link(&at, &n("sn-v0"), &hairpin)),
        ErrorKind::Invalid
    );
    port.delete_netns(&ns("snt-m")).unwrap();
}

fn veth_peer_in_other_ns_and_pair_deletion(port: &mut dyn LinkPort) {
    port.create_netns(&ns("snt-a")).unwrap();
    port.create_netns(&ns("snt-b")).unwrap();
    let (a, b) = (owned("snt-a"), owned("snt-b"));
    let mut s = veth("sn-a0", "eth0", Some(b.clone()));
    s.mtu = Some(1450);
    if let LinkKind::Veth { peer_mac, .. } = &mut s.kind {
        *peer_mac = Some(mac("02:42:0a:00:00:05"));
    }
    port.create_link(&a, &s).unwrap();
    assert_eq!(find(port, &a, "sn-a0").unwrap().kind, LinkKindState::Veth);
    assert!(find(port, &a, "eth0").is_none());
    let peer = find(port, &b, "eth0").unwrap();
    assert_eq!(peer.kind, LinkKindState::Veth);
    assert_eq!(peer.mac, Some(mac("02:42:0a:00:00:05")));
    assert_eq!(peer.mtu, 1450);

    // A peer name taken in the peer namespace.
    let clash = veth("sn-a1", "eth0", Some(b.clone()));
    assert_eq!(kind_of(port.create_link(&a, &clash)), ErrorKind::Exists);
    assert!(
        find(port, &a, "sn-a1").is_none(),
        "a failed create leaves nothing behind"
    );

    // Deleting one end deletes the other.
    port.delete_link(&a, &n("sn-a0")).unwrap();
    assert!(find(port, &b, "eth0").is_none());

    // Deleting a namespace deletes its links and the peers elsewhere, at once.
    port.create_link(&a, &veth("sn-a0", "eth0", Some(b.clone())))
        .unwrap();
    port.create_link(&NsRef::Node, &veth("sn-n0", "eth1", Some(b.clone())))
        .unwrap();
    port.delete_netns(&ns("snt-b")).unwrap();
    // The kernel removes a dead namespace's devices (and their peers) asynchronously.
    eventually("peers of snt-b's veths are gone", port, |p| {
        find(p, &a, "sn-a0").is_none() && find(p, &NsRef::Node, "sn-n0").is_none()
    });
    port.delete_netns(&ns("snt-a")).unwrap();
}

fn vxlan_create_move_and_fdb(port: &mut dyn LinkPort) {
    port.create_netns(&ns("snt-ov")).unwrap();
    let ov = owned("snt-ov");
    let mut s = vxlan("vxlan0", 4242);
    s.mtu = Some(1450);
    s.alias = Some("swarmnet:ov".into());
    s.move_to = Some(ov.clone());
    port.create_link(&NsRef::Node, &s).unwrap();
    assert!(find(port, &NsRef::Node, "vxlan0").is_none(), "moved away");
    let l = find(port, &ov, "vxlan0").unwrap();
    assert_eq!(
        l.kind,
        LinkKindState::Vxlan {
            vni: 4242,
            local: Some(UNDERLAY_IP),
            port: 4789,
            learning: false
        }
    );
    assert_eq!(l.mtu, 1450);
    assert_eq!(l.alias.as_deref(), Some("swarmnet:ov"));

    // The same VNI and port from the same namespace collides, although the first was moved.
    port.create_netns(&ns("snt-ov2")).unwrap();
    let mut again = vxlan("vxlan1", 4242);
    again.move_to = Some(owned("snt-ov2"));
    assert_eq!(
        kind_of(port.create_link(&NsRef::Node, &again)),
        ErrorKind::Exists
    );
    assert!(find(port, &NsRef::Node, "vxlan1").is_none());
    assert!(find(port, &owned("snt-ov2"), "vxlan1").is_none());
    // A missing underlay is NotFound.
    let mut bad = vxlan("vxlan2", 4243);
    if let LinkKind::Vxlan { underlay, .. } = &mut bad.kind {
        *underlay = Some(n("nope0"));
    }
    assert_eq!(
        kind_of(port.create_link(&NsRef::Node, &bad)),
        ErrorKind::NotFound
    );

    // It keeps working in its new namespace: enslave, up, FDB.
    port.create_link(&ov, &bridge("br0")).unwrap();
    let to_br = LinkChange {
        master: Some(Some(n("br0"))),
        up: Some(true),
        ..LinkChange::default()
    };
    port.set_link(&ov, &n("vxlan0"), &to_br).unwrap();
    port.set_link(&ov, &n("br0"), &up()).unwrap();
    let l = find(port, &ov, "vxlan0").unwrap();
    assert_eq!((l.master, l.up), (Some(n("br0")), true));

    let vx = n("vxlan0");
    assert_eq!(
        port.list_fdb(&ov, &vx).unwrap(),
        vec![],
        "no entries of the kernel's own"
    );
    let e1 = FdbEntry {
        mac: mac("02:42:0a:00:01:02"),
        dst: Ipv4Addr::new(198, 18, 0, 2),
    };
    let e2 = FdbEntry {
        mac: mac("02:42:0a:00:01:03"),
        dst: Ipv4Addr::new(198, 18, 0, 3),
    };
    port.add_fdb(&ov, &vx, &e1).unwrap();
    port.add_fdb(&ov, &vx, &e2).unwrap();
    assert_eq!(kind_of(port.add_fdb(&ov, &vx, &e1)), ErrorKind::Exists);
    assert_eq!(
        port.list_fdb(&ov, &vx).unwrap(),
        vec![e1.clone(), e2.clone()]
    );
    port.delete_fdb(&ov, &vx, &e1).unwrap();
    assert_eq!(port.list_fdb(&ov, &vx).unwrap(), vec![e2.clone()]);
    assert_eq!(kind_of(port.delete_fdb(&ov, &vx, &e1)), ErrorKind::NotFound);
    // FDB entries need a VXLAN device.
    assert_eq!(
        kind_of(port.add_fdb(&ov, &n("br0"), &e1)),
        ErrorKind::Invalid
    );
    assert_eq!(kind_of(port.list_fdb(&ov, &n("br0"))), ErrorKind::Invalid);
    assert_eq!(
        kind_of(port.add_fdb(&ov, &n("nope0"), &e1)),
        ErrorKind::NotFound
    );

    // Deleting the VXLAN device frees the VNI at once (namespace teardown alone is
    // asynchronous, which is why the planner deletes the device before the namespace).
    port.delete_link(&ov, &n("vxlan0")).unwrap();
    port.delete_netns(&ns("snt-ov")).unwrap();
    port.create_link(&NsRef::Node, &again).unwrap();
    assert!(find(port, &owned("snt-ov2"), "vxlan1").is_some());
    port.delete_netns(&ns("snt-ov2")).unwrap();
}

fn neighbours(port: &mut dyn LinkPort) {
    port.create_netns(&ns("snt-n")).unwrap();
    let at = owned("snt-n");
    port.create_link(&at, &bridge("br0")).unwrap();
    port.set_link(&at, &n("br0"), &up()).unwrap();
    port.add_addr(&at, &n("br0"), net("10.9.0.1/24")).unwrap();
    let br = n("br0");
    let a = NeighEntry {
        ip: Ipv4Addr::new(10, 9, 0, 2),
        mac: mac("02:42:0a:09:00:02"),
    };
    let b = NeighEntry {
        ip: Ipv4Addr::new(10, 9, 0, 3),
        mac: mac("02:42:0a:09:00:03"),
    };
    assert_eq!(port.list_neighs(&at, &br).unwrap(), vec![]);
    port.add_neigh(&at, &br, &a).unwrap();
    port.add_neigh(&at, &br, &b).unwrap();
    assert_eq!(kind_of(port.add_neigh(&at, &br, &a)), ErrorKind::Exists);
    assert_eq!(
        port.list_neighs(&at, &br).unwrap(),
        vec![a.clone(), b.clone()]
    );
    port.delete_neigh(&at, &br, &a).unwrap();
    assert_eq!(port.list_neighs(&at, &br).unwrap(), vec![b]);
    assert_eq!(
        kind_of(port.delete_neigh(&at, &br, &a)),
        ErrorKind::NotFound
    );
    assert_eq!(
        kind_of(port.add_neigh(&at, &n("nope0"), &a)),
        ErrorKind::NotFound
    );
    port.delete_netns(&ns("snt-n")).unwrap();
}

fn addresses_and_default_route(port: &mut dyn LinkPort) {
    port.create_netns(&ns("snt-s")).unwrap();
    let sb = owned("snt-s");
    port.create_link(&NsRef::Node, &veth("sn-gw0", "eth0", Some(sb.clone())))
        .unwrap();
    let eth0 = n("eth0");
    let a = net("10.7.0.2/24");
    assert_eq!(
        kind_of(port.add_addr(&sb, &n("nope0"), a)),
        ErrorKind::NotFound
    );
    port.add_addr(&sb, &eth0, a).unwrap();
    assert_eq!(kind_of(port.add_addr(&sb, &eth0, a)), ErrorKind::Exists);
    assert_eq!(
        port.list_addrs(&sb).unwrap(),
        vec![AddrState {
            link: eth0.clone(),
            addr: a
        }]
    );
    port.set_link(&sb, &eth0, &up()).unwrap();

    let default = RouteState {
        dst: net("0.0.0.0/0"),
        gateway: Some(Ipv4Addr::new(10, 7, 0, 1)),
        link: Some(eth0.clone()),
    };
    port.add_route(&sb, &default).unwrap();
    assert_eq!(kind_of(port.add_route(&sb, &default)), ErrorKind::Exists);
    let routes = port.list_routes(&sb).unwrap();
    assert!(routes.contains(&default), "{routes:?}");
    let connected = RouteState {
        dst: net("10.7.0.0/24"),
        gateway: None,
        link: Some(eth0.clone()),
    };
    assert!(routes.contains(&connected), "{routes:?}");
    port.delete_route(&sb, &default).unwrap();
    assert!(!port.list_routes(&sb).unwrap().contains(&default));
    assert_eq!(
        kind_of(port.delete_route(&sb, &default)),
        ErrorKind::NotFound
    );

    port.delete_addr(&sb, &eth0, a).unwrap();
    assert_eq!(port.list_addrs(&sb).unwrap(), vec![]);
    assert_eq!(
        kind_of(port.delete_addr(&sb, &eth0, a)),
        ErrorKind::NotFound
    );
    port.delete_netns(&ns("snt-s")).unwrap();
    eventually("the node end of the sandbox's veth is gone", port, |p| {
        find(p, &NsRef::Node, "sn-gw0").is_none()
    });
}

fn sysctls(port: &mut dyn LinkPort) {
    port.create_netns(&ns("snt-x")).unwrap();
    port.create_netns(&ns("snt-y")).unwrap();
    let (x, y) = (owned("snt-x"), owned("snt-y"));
    let key = "net/ipv4/ip_forward";
    let before_y = port.get_sysctl(&y, key).unwrap();
    let before_node = port.get_sysctl(&NsRef::Node, key).unwrap();
    let flipped = if port.get_sysctl(&x, key).unwrap() == "1" {
        "0"
    } else {
        "1"
    };
    port.set_sysctl(&x, key, flipped).unwrap();
    assert_eq!(port.get_sysctl(&x, key).unwrap(), flipped);
    // Per namespace: the others are untouched.
    assert_eq!(port.get_sysctl(&y, key).unwrap(), before_y);
    assert_eq!(port.get_sysctl(&NsRef::Node, key).unwrap(), before_node);

    assert_eq!(
        kind_of(port.get_sysctl(&x, "net/ipv4/no_such_key")),
        ErrorKind::NotFound
    );
    assert_eq!(
        kind_of(port.set_sysctl(&x, "net/ipv4/no_such_key", "1")),
        ErrorKind::NotFound
    );
    for k in [
        "net/ipv6/conf/all/accept_ra",
        "net/ipv6/conf/default/accept_ra",
    ] {
        port.set_sysctl(&x, k, "0").unwrap();
        assert_eq!(port.get_sysctl(&x, k).unwrap(), "0");
    }
    // Per-link keys exist while the link does.
    let ra = "net/ipv6/conf/br0/accept_ra";
    assert_eq!(kind_of(port.get_sysctl(&x, ra)), ErrorKind::NotFound);
    port.create_link(&x, &bridge("br0")).unwrap();
    port.set_sysctl(&x, ra, "0").unwrap();
    assert_eq!(port.get_sysctl(&x, ra).unwrap(), "0");
    port.delete_link(&x, &n("br0")).unwrap();
    assert_eq!(kind_of(port.get_sysctl(&x, ra)), ErrorKind::NotFound);
    assert_eq!(
        kind_of(port.get_sysctl(&owned("snt-none"), key)),
        ErrorKind::NotFound
    );
    port.delete_netns(&ns("snt-x")).unwrap();
    port.delete_netns(&ns("snt-y")).unwrap();
}

fn underlay_for(port: &mut dyn LinkPort) {
    assert_eq!(port.underlay_for(UNDERLAY_IP).unwrap(), (n(UNDERLAY), 1500));
    port.set_link(
        &NsRef::Node,
        &n(UNDERLAY),
        &LinkChange {
            mtu: Some(1400),
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(port.underlay_for(UNDERLAY_IP).unwrap(), (n(UNDERLAY), 1400));
    let missing = Ipv4Addr::new(198, 19, 255, 254);
    let err = port.underlay_for(missing).unwrap_err();
    assert_eq!(err.kind, ErrorKind::NotFound);
    assert!(err.to_string().contains("198.19.255.254"), "{err}");
    // Addresses in owned namespaces do not count.
    port.create_netns(&ns("snt-u")).unwrap();
    port.create_link(&owned("snt-u"), &bridge("br0")).unwrap();
    port.add_addr(&owned("snt-u"), &n("br0"), net("198.18.5.5/24"))
        .unwrap();
    assert_eq!(
        kind_of(port.underlay_for(Ipv4Addr::new(198, 18, 5, 5))),
        ErrorKind::NotFound
    );
    port.delete_netns(&ns("snt-u")).unwrap();
}

// ---------------------------------------------------------------------------------------------
// Runners
// ---------------------------------------------------------------------------------------------

type Case = fn(&mut dyn LinkPort);

fn run_fake(case: Case) {
    let mut port = FakeLinkPort::new();
    setup_underlay(&mut port);
    case(&mut port);
    assert_eq!(
        port.list_netns().unwrap(),
        vec![],
        "the case cleans up after itself"
    );
}

/// A Linux port in a scratch node namespace and temporary run directory. Dropping it deletes
/// every namespace (mount) it still holds.
struct Scratch {
    port: LinuxLinkPort,
    dir: tempfile::TempDir,
}

impl Drop for Scratch {
    fn drop(&mut self) {
        for name in self.port.list_netns().unwrap_or_default() {
            if let Err(e) = self.port.delete_netns(&name) {
                eprintln!("cleanup: {e}");
            }
        }
        // Anything left (a name list_netns could not parse): unmount it by path.
        let dir = self.dir.path().join("run/netns");
        for name in swarmnet_netd::linux::netns::list(&dir).unwrap_or_default() {
            let _ignored = swarmnet_netd::linux::netns::remove(&dir.join(name));
        }
    }
}

fn netns_inode() -> u64 {
    std::fs::metadata("/proc/thread-self/ns/net").unwrap().ino()
}

fn run_linux(name: &'static str, case: Case) {
    if !swarmnet_tests_netns::gate::privileged(name) {
        return;
    }
    let result = std::thread::spawn(move || {
        let before = netns_inode();
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        assert_ne!(
            before,
            netns_inode(),
            "must never run in the caller's network namespace"
        );
        let dir = tempfile::tempdir().unwrap();
        let port = LinuxLinkPort::new(dir.path().join("run")).unwrap();
        let mut scratch = Scratch { port, dir };
        scratch
            .port
            .set_link(&NsRef::Node, &n("lo"), &up())
            .unwrap();
        setup_underlay(&mut scratch.port);
        case(&mut scratch.port);
        assert_eq!(
            scratch.port.list_netns().unwrap(),
            vec![],
            "the case cleans up after itself"
        );
    })
    .join();
    if let Err(panic) = result {
        std::panic::resume_unwind(panic);
    }
}

/// UDP ports bound in the namespace of the calling thread (`/proc/net` follows the main
/// thread; `thread-self` follows this one).
fn udp_ports() -> Vec<u16> {
    let text = std::fs::read_to_string("/proc/thread-self/net/udp").unwrap();
    text.lines()
        .skip(1)
        .filter_map(|l| l.split_whitespace().nth(1))
        .filter_map(|local| u16::from_str_radix(local.rsplit(':').next()?, 16).ok())
        .collect()
}

/// Linux only (the fake has no sockets): a VXLAN device created in the node namespace and
/// moved keeps its UDP socket in the node namespace, where the underlay is.
#[test]
fn linux_vxlan_socket_stays_in_node_namespace() {
    run_linux("linux_vxlan_socket_stays_in_node_namespace", |port| {
        port.create_netns(&ns("snt-ov")).unwrap();
        let ov = owned("snt-ov");
        let mut s = vxlan("vxlan0", 4100);
        s.move_to = Some(ov.clone());
        port.create_link(&NsRef::Node, &s).unwrap();
        // The socket is opened when the device goes up.
        port.set_link(&ov, &n("vxlan0"), &up()).unwrap();
        assert!(
            udp_ports().contains(&4789),
            "node namespace: {:?}",
            udp_ports()
        );
        let file = swarmnet_netd::linux::netns::open(&port.netns_path(&ns("snt-ov"))).unwrap();
        let inside = swarmnet_netd::linux::netns::run_in(&file, || Ok(udp_ports())).unwrap();
        assert!(!inside.contains(&4789), "overlay namespace: {inside:?}");
        drop(file);
        // Deleting the device closes the socket at once (the planner deletes it before the
        // namespace, whose own teardown is asynchronous).
        port.delete_link(&ov, &n("vxlan0")).unwrap();
        port.delete_netns(&ns("snt-ov")).unwrap();
        assert!(
            !udp_ports().contains(&4789),
            "node namespace: {:?}",
            udp_ports()
        );
    });
}

macro_rules! contract {
    ($($case:ident),* $(,)?) => {
        mod fake {
            $( #[test] fn $case() { super::run_fake(super::$case); } )*
        }
        mod linux {
            $( #[test] fn $case() { super::run_linux(stringify!($case), super::$case); } )*
        }
    };
}

contract!(
    get_link_by_name,
    netns_lifecycle,
    link_create_exists_notfound,
    master_must_exist_and_be_a_bridge,
    veth_peer_in_other_ns_and_pair_deletion,
    vxlan_create_move_and_fdb,
    neighbours,
    addresses_and_default_route,
    sysctls,
    underlay_for,
);

/// `NftFirewall` in a scratch namespace (it acts on the namespace of the calling thread), and
/// the fake alongside: apply replaces the table, list shows it, delete of a missing table is Ok.
#[test]
fn firewall_apply_list_delete() {
    use swarmnet_netd::fake::firewall::FakeFirewall;
    use swarmnet_netd::linux::firewall::NftFirewall;
    use swarmnet_netd::port::FirewallPort;

    fn check(fw: &mut dyn FirewallPort, exact: bool) {
        let ruleset = "add table inet swarmnet\ndelete table inet swarmnet\n\
                       table inet swarmnet {\n\tchain c {\n\t\ttype filter hook input priority 0;\n\t}\n}\n";
        assert_eq!(fw.list_table().unwrap(), None);
        fw.delete_table().unwrap();
        fw.apply(ruleset).unwrap();
        fw.apply(ruleset).unwrap(); // replacing an existing table is one transaction too
        let listed = fw.list_table().unwrap().unwrap();
        assert!(listed.contains("chain c"), "{listed}");
        if exact {
            // The fake stores the text as given (it does not parse nft).
            assert_eq!(listed, ruleset);
        } else {
            let err = fw.apply("this is not nft").unwrap_err();
            assert_eq!(err.kind, ErrorKind::Invalid, "{err}");
            // A failed transaction leaves the previous table in place.
            assert!(fw.list_table().unwrap().is_some());
        }
        fw.delete_table().unwrap();
        assert_eq!(fw.list_table().unwrap(), None);
    }

    check(&mut FakeFirewall::new(), true);
    if !swarmnet_tests_netns::gate::privileged("firewall_apply_list_delete") {
        return;
    }
    std::thread::spawn(|| {
        let before = netns_inode();
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        assert_ne!(
            before,
            netns_inode(),
            "must never run in the caller's network namespace"
        );
        check(&mut NftFirewall::new("inet", "swarmnet"), false);
    })
    .join()
    .unwrap_or_else(|p| std::panic::resume_unwind(p));
}
