//! Gossip records and the table merge (pure). The wire form of records and of a sealed frame
//! is golden (`tests/golden/gossip-*.txt`); regenerate with
//! `SWARMNET_BLESS=1 cargo test -p swarmnet-netd --test gossip_records` and review the diff.

use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use swarmnet_model::{MacAddr, Name, TaskId};
use swarmnet_netd::gossip::crypto::{KEY_LEN, Keyring, Sealer};
use swarmnet_netd::gossip::record::{decode_vtep, encode_vtep};
use swarmnet_netd::gossip::table::{AllowAll, FnCheck};
use swarmnet_netd::gossip::{EndpointRecord, Health, NodeSnapshot, merge};

fn check_golden(name: &str, actual: &str) {
    let dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/golden");
    swarmnet_tests_netns::golden::check(&dir, name, actual);
}

fn rec(net: &str, task: &str, ip: IpAddr, service: Option<&str>, health: Health) -> EndpointRecord {
    EndpointRecord {
        network: Name::new(net).unwrap(),
        task: TaskId::new(task).unwrap(),
        ip,
        mac: match ip {
            IpAddr::V4(v4) => MacAddr::from_ipv4(v4),
            IpAddr::V6(_) => MacAddr::new([0x02, 0x42, 0, 0, 0, 9]).unwrap(),
        },
        service: service.map(|s| Name::new(s).unwrap()),
        health,
    }
}

fn samples() -> Vec<EndpointRecord> {
    vec![
        rec(
            "app",
            "web1",
            IpAddr::V4(Ipv4Addr::new(10, 10, 0, 3)),
            Some("web"),
            Health::Healthy,
        ),
        rec(
            "db",
            "pg2",
            IpAddr::V4(Ipv4Addr::new(10, 11, 0, 4)),
            None,
            Health::Starting,
        ),
        rec(
            "v6net",
            "x_1",
            IpAddr::V6(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 9)),
            Some("api-2"),
            Health::Unhealthy,
        ),
    ]
}

#[test]
fn records_golden_and_roundtrip() {
    let mut out = String::new();
    for r in samples() {
        writeln!(out, "{}\t{}", r.key(), r.value()).unwrap();
        let back = EndpointRecord::decode(&r.key(), &r.value())
            .unwrap()
            .unwrap();
        assert_eq!(back, r);
    }
    let v = encode_vtep(IpAddr::V4(Ipv4Addr::new(198, 18, 0, 1)));
    writeln!(out, "vtep\t{v}").unwrap();
    assert_eq!(decode_vtep(&v).unwrap().to_string(), "198.18.0.1");
    check_golden("gossip-records.txt", &out);
}

#[test]
fn malformed_records_are_errors() {
    let good = &samples()[0];
    let cases = [
        ("ep/app", good.value()),
        ("ep/App/web1", good.value()),
        ("ep/app/web1", "2 10.10.0.3 02:42:0a:0a:00:03 web h".into()),
        ("ep/app/web1", "1 10.10.0.3 02:42:0a:0a:00:03 web".into()),
        (
            "ep/app/web1",
            "1 10.10.0.300 02:42:0a:0a:00:03 web h".into(),
        ),
        ("ep/app/web1", "1 10.10.0.3 01:42:0a:0a:00:03 web h".into()),
        ("ep/app/web1", "1 10.10.0.3 02:42:0a:0a:00:03 Web h".into()),
        ("ep/app/web1", "1 10.10.0.3 02:42:0a:0a:00:03 web x".into()),
        ("ep/app/web1", "".into()),
    ];
    for (k, v) in cases {
        assert!(EndpointRecord::decode(k, &v).is_err(), "{k} = {v:?}");
    }
    assert!(
        EndpointRecord::decode("vtep", "1 1.2.3.4")
            .unwrap()
            .is_none()
    );
    assert!(decode_vtep("1 nope").is_err());
    assert!(decode_vtep("2 1.2.3.4").is_err());
}

#[test]
fn sealed_frame_golden() {
    // Fixed key, session, counter and clock: the frame bytes are deterministic.
    let ring = Keyring::new(7, [0x42; KEY_LEN]);
    let mut s = Sealer::new(0x0102_0304_0506_0708);
    let frame = ring.seal(s.next_header(1_700_000_000_000, 0, 1), b"chitchat bytes");
    let hex: String = frame.iter().map(|b| format!("{b:02x}")).collect();
    check_golden("gossip-frame.txt", &format!("{hex}\n"));
    assert_eq!(ring.open(&frame).unwrap().1, b"chitchat bytes");
}

fn node(id: &str, generation: u64, kv: &[(&str, String)]) -> NodeSnapshot {
    NodeSnapshot {
        node_id: id.into(),
        generation,
        key_values: kv.iter().map(|(k, v)| (k.to_string(), v.clone())).collect(),
    }
}

#[test]
fn merge_validates_against_intent() {
    let s = samples();
    let vtep = |i: u8| encode_vtep(IpAddr::V4(Ipv4Addr::new(198, 18, 0, i)));
    let nodes = vec![
        node(
            "n1",
            1,
            &[
                ("vtep", vtep(1)),
                (&s[0].key(), s[0].value()),
                ("other", "x".into()),
            ],
        ),
        // n2 forges web1 (intent: on n1) and publishes pg2 legitimately.
        node(
            "n2",
            1,
            &[
                ("vtep", vtep(2)),
                (&s[0].key(), s[0].value()),
                (&s[1].key(), s[1].value()),
            ],
        ),
        // n3's VTEP is not the one intent has: its endpoints cannot be programmed.
        node("n3", 1, &[("vtep", vtep(99)), (&s[2].key(), s[2].value())]),
        // An old generation of n1 with a stale endpoint.
        node("n1", 0, &[("vtep", vtep(1)), (&s[1].key(), s[1].value())]),
        node(
            "n4",
            1,
            &[("vtep", "garbage".into()), ("ep/app/zz", "1 x".into())],
        ),
    ];
    let check = FnCheck {
        endpoint: |node: &str, r: &EndpointRecord| {
            matches!(
                (node, r.task.as_str()),
                ("n1", "web1") | ("n2", "pg2") | ("n3", "x_1")
            )
        },
        vtep: |node: &str, ip: IpAddr| ip.to_string() == format!("198.18.0.{}", &node[1..]),
    };
    let (t, st) = merge(&nodes, &check);
    let got: Vec<String> = t
        .endpoints
        .iter()
        .map(|((n, task), e)| format!("{n}/{task}@{}:{}", e.node, e.vtep))
        .collect();
    assert_eq!(got, ["app/web1@n1:198.18.0.1", "db/pg2@n2:198.18.0.2"]);
    assert_eq!(st.accepted, 2);
    assert_eq!(st.rejected_by_intent, 1);
    assert_eq!(st.rejected_vtep, 1);
    assert_eq!(st.no_vtep, 1);
    assert_eq!(st.superseded_generations, 1);
    assert_eq!(st.malformed, 2);
    assert_eq!(t.vteps.len(), 2);

    // Order of input does not matter; duplicate claims resolve to the lowest node id.
    let mut rev = nodes.clone();
    rev.reverse();
    assert_eq!(merge(&rev, &check).0, t);
    let (t2, st2) = merge(&nodes, &AllowAll);
    assert_eq!(t2.endpoints.values().filter(|e| e.node == "n1").count(), 1);
    assert_eq!(st2.conflicts, 1);
}
