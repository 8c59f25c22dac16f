//! Unit tests of the value parsers.

use super::*;

#[test]
fn publish_forms() {
    let p = parse_publish("8080:80").unwrap();
    assert_eq!(
        (p.published, p.target, p.protocol.as_str(), p.mode.as_str()),
        (8080, 80, "tcp", "ingress")
    );
    let p = parse_publish("mode=host,53:5353/udp").unwrap();
    assert_eq!(
        (p.published, p.target, p.protocol.as_str(), p.mode.as_str()),
        (53, 5353, "udp", "host")
    );
    let p = parse_publish("policy=local,8080:80").unwrap();
    assert_eq!((p.mode.as_str(), p.policy.as_str()), ("ingress", "local"));
    let p = parse_publish("mode=ingress,policy=local,8080:80/udp").unwrap();
    assert_eq!(
        (p.mode.as_str(), p.policy.as_str(), p.protocol.as_str()),
        ("ingress", "local", "udp")
    );
    assert_eq!(parse_publish("8080:80").unwrap().policy, "cluster");
    for bad in [
        "8080",
        "0:80",
        "8080:70000",
        "8080:80/sctp",
        "mode=bridge,1:2",
        "x:80",
        "policy=nearest,1:2",
        "mode=host,policy=local,1:2",
    ] {
        let e = parse_publish(bad).unwrap_err();
        assert!(e.contains(bad), "{bad}: {e}");
    }
}

#[test]
fn network_forms() {
    assert_eq!(
        parse_network("app,alias=www,alias=web").unwrap(),
        NetworkAttach {
            network: "app".into(),
            aliases: vec!["www".into(), "web".into()]
        }
    );
    assert!(parse_network("").is_err());
    assert!(
        parse_network("app,driver=x")
            .unwrap_err()
            .contains("alias=A")
    );
}

#[test]
fn constraint_forms() {
    for ok in [
        "node.hostname==n1",
        "node.role!=manager",
        "node.labels.zone==a",
        "node.id==x",
    ] {
        assert_eq!(parse_constraint(ok).unwrap(), ok);
    }
    for bad in [
        "node.hostname=n1",
        "node.labels.==a",
        "engine.labels.a==b",
        "node.role==",
    ] {
        assert!(parse_constraint(bad).is_err(), "{bad}");
    }
}

#[test]
fn scale_and_kv() {
    assert_eq!(parse_scale("web=5").unwrap(), ("web".into(), 5));
    assert!(parse_scale("web").is_err());
    assert!(parse_scale("=5").is_err());
    assert!(parse_scale("web=-1").is_err());
    assert_eq!(parse_kv("a=b=c").unwrap(), ("a".into(), "b=c".into()));
    assert!(parse_kv("=b").is_err());
}
