//! Golden bytes of every IPVS generic-netlink message we send and of the replies we parse
//! (`netd/tests/golden/ipvs/*.hex`, regenerated with `SWARMNET_BLESS=1 cargo test -p
//! swarmnet-netd --test ipvs_msgs`), decode round trips, error acks mapped to typed errnos,
//! and the companion nftables table. No privileges: runs in plain `cargo test`.
//!
//! The family id (0x2a) and sequence numbers are fixed here; on a live kernel the id comes
//! from `nlctrl`. Byte order is the machine's (netlink headers and host-order attributes are
//! native-endian): the files are for x86_64 and other little-endian machines.

use std::fmt::Write as _;
use std::net::Ipv4Addr;
use std::time::Duration;

use swarmnet_netd::lb::nft_render::render_script;
use swarmnet_netd::lb::{Affinity, BackendState, LbSpec, Proto, ServiceKey, ServiceSpec};
use swarmnet_netd::linux::ipvs::msg::{
    Answer, IP_VS_SVC_F_PERSISTENT, IpvsDest, IpvsErrno, IpvsService, IpvsTimeouts, Reply, Request,
    encode_error, parse_replies,
};
use swarmnet_netd::linux::ipvs::plan::Companion;

const FAMILY: u16 = 0x2a;
const SEQ: u32 = 7;

fn key(vip: &str, proto: Proto, port: u16) -> ServiceKey {
    ServiceKey {
        vip: vip.parse().unwrap(),
        proto,
        port,
    }
}
fn ip(s: &str) -> Ipv4Addr {
    s.parse().unwrap()
}

/// 16 bytes per line, offset first: a reviewable diff when an encoding changes.
fn hex(bytes: &[u8]) -> String {
    let mut s = String::new();
    for (i, line) in bytes.chunks(16).enumerate() {
        let _ = write!(s, "{:04x}:", i * 16);
        for b in line {
            let _ = write!(s, " {b:02x}");
        }
        s.push('\n');
    }
    s
}

fn check_golden(name: &str, actual: &str) {
    let dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/golden/ipvs");
    swarmnet_tests_netns::golden::check(&dir, name, actual);
}

fn web() -> IpvsService {
    IpvsService {
        key: key("10.0.0.2", Proto::Tcp, 80),
        sched: "rr".into(),
        flags: 0,
        timeout: 0,
        netmask: 0,
    }
}
fn sticky() -> IpvsService {
    IpvsService {
        key: key("10.0.0.3", Proto::Udp, 53),
        sched: "rr".into(),
        flags: IP_VS_SVC_F_PERSISTENT,
        timeout: 10800,
        netmask: u32::MAX,
    }
}

/// Every request we send, by golden-file name.
fn requests() -> Vec<(&'static str, Request)> {
    let k = web().key;
    vec![
        ("new-service", Request::NewService(web())),
        ("new-service-persistent", Request::NewService(sticky())),
        ("set-service", Request::SetService(sticky())),
        ("del-service", Request::DelService(k)),
        ("get-service", Request::GetService(k)),
        ("dump-services", Request::DumpServices),
        (
            "new-dest",
            Request::NewDest(k, IpvsDest::masq(ip("10.0.1.3"), 8080, 1)),
        ),
        (
            "set-dest-drain",
            Request::SetDest(k, IpvsDest::masq(ip("10.0.1.3"), 8080, 0)),
        ),
        (
            "del-dest",
            Request::DelDest {
                service: k,
                addr: ip("10.0.1.3"),
                port: 8080,
            },
        ),
        ("dump-dests", Request::DumpDests(k)),
        (
            "set-config",
            Request::SetConfig(IpvsTimeouts {
                tcp: 432000,
                tcp_fin: 0,
                udp: 300,
            }),
        ),
        ("get-config", Request::GetConfig),
        ("get-info", Request::GetInfo),
        ("flush", Request::Flush),
    ]
}

#[test]
fn golden_requests_and_round_trip() {
    for (name, req) in requests() {
        let bytes = req.encode(FAMILY, SEQ);
        check_golden(&format!("{name}.hex"), &hex(&bytes));
        assert_eq!(Request::decode(&bytes).unwrap(), req, "{name}");
        // Header: length, the family id as type, flags, sequence.
        assert_eq!(
            u32::from_ne_bytes(bytes[..4].try_into().unwrap()) as usize,
            bytes.len()
        );
        assert_eq!(u16::from_ne_bytes([bytes[4], bytes[5]]), FAMILY);
        let flags = u16::from_ne_bytes([bytes[6], bytes[7]]);
        assert_eq!(flags & 0x300 == 0x300, req.is_dump(), "{name}: dump flag");
        assert_eq!(flags & 0x4 != 0, !req.is_dump(), "{name}: ack flag");
        // Generic header: the command, version 1.
        assert_eq!(bytes[17], 1, "{name}: version");
    }
}

/// Replies in the kernel's layout (what `ip_vs_genl_fill_service`/`_dest`/`_get_cmd`
/// send), decoded; plus a service reply with the kernel's own additions (the `HASHED` flag,
/// a nested stats attribute flagged `NLA_F_NESTED`), which the decoder must skip or mask.
#[test]
fn golden_replies_decode() {
    let mut d = IpvsDest::masq(ip("10.0.1.3"), 8080, 1);
    d.active_conns = 2;
    d.inact_conns = 1;
    let replies = [
        ("reply-service", Reply::Service(sticky())),
        ("reply-dest", Reply::Dest(d)),
        (
            "reply-config",
            Reply::Config(IpvsTimeouts {
                tcp: 900,
                tcp_fin: 120,
                udp: 300,
            }),
        ),
        (
            "reply-info",
            Reply::Info {
                version: 0x010203,
                conn_tab_size: 4096,
            },
        ),
    ];
    for (name, r) in replies {
        let bytes = r.encode(FAMILY, SEQ);
        check_golden(&format!("{name}.hex"), &hex(&bytes));
        assert_eq!(
            parse_replies(&bytes, SEQ).unwrap(),
            vec![Answer::Data(r.clone())],
            "{name}"
        );
        assert_eq!(parse_replies(&bytes, SEQ + 1).unwrap(), vec![Answer::Other]);
    }

    // The kernel's service reply: flags | HASHED, mask ~0, and IPVS_SVC_ATTR_STATS (10)
    // nested with NLA_F_NESTED around one u32.
    let mut bytes = Reply::Service(web()).encode(FAMILY, SEQ);
    let flags_at = bytes
        .windows(4)
        .position(|w| w == [12, 0, 7, 0])
        .expect("flags attribute")
        + 4;
    bytes[flags_at] |= 0x2;
    let stats: [u8; 12] = [12, 0, 10, 0x80, 8, 0, 1, 0, 5, 0, 0, 0];
    let outer = 20; // nlmsghdr + genlmsghdr: the service attribute starts here
    let svc_len = u16::from_ne_bytes([bytes[outer], bytes[outer + 1]]) + 12;
    bytes[outer..outer + 2].copy_from_slice(&svc_len.to_ne_bytes());
    bytes.extend_from_slice(&stats);
    let total = u32::try_from(bytes.len()).unwrap();
    bytes[..4].copy_from_slice(&total.to_ne_bytes());
    assert_eq!(
        parse_replies(&bytes, SEQ).unwrap(),
        vec![Answer::Data(Reply::Service(web()))]
    );
}

/// Error acks: each errno the IPVS family uses is mapped to its meaning; 0 is the ACK; a
/// dump ends with NLMSG_DONE; a truncated message is an error, never a panic.
#[test]
fn error_acks_are_typed() {
    let req = Request::DelService(web().key).encode(FAMILY, SEQ);
    for (errno, want) in [
        (libc::ESRCH, IpvsErrno::NoService),
        (libc::ENOENT, IpvsErrno::NotFound),
        (libc::EEXIST, IpvsErrno::Exists),
        (libc::EINVAL, IpvsErrno::Other(libc::EINVAL)),
    ] {
        let bytes = encode_error(errno, SEQ, &req);
        assert_eq!(
            parse_replies(&bytes, SEQ).unwrap(),
            vec![Answer::Error(want)]
        );
        assert_eq!(want.errno(), errno);
    }
    check_golden(
        "error-esrch.hex",
        &hex(&encode_error(libc::ESRCH, SEQ, &req)),
    );
    let ack = encode_error(0, SEQ, &req);
    check_golden("ack.hex", &hex(&ack));
    assert_eq!(parse_replies(&ack, SEQ).unwrap(), vec![Answer::End]);
    // NLMSG_DONE after a dump: header + 4-byte status.
    let mut done = Vec::new();
    done.extend_from_slice(&20u32.to_ne_bytes());
    done.extend_from_slice(&3u16.to_ne_bytes());
    done.extend_from_slice(&2u16.to_ne_bytes());
    done.extend_from_slice(&SEQ.to_ne_bytes());
    done.extend_from_slice(&0u32.to_ne_bytes());
    done.extend_from_slice(&0u32.to_ne_bytes());
    let mut two = Reply::Dest(IpvsDest::masq(ip("10.0.1.4"), 8080, 1)).encode(FAMILY, SEQ);
    two.extend_from_slice(&done);
    assert_eq!(
        parse_replies(&two, SEQ).unwrap(),
        vec![
            Answer::Data(Reply::Dest(IpvsDest::masq(ip("10.0.1.4"), 8080, 1))),
            Answer::End
        ]
    );
    let full = Request::NewService(web()).encode(FAMILY, SEQ);
    for cut in [3, 17, 25, full.len() - 1] {
        let mut b = full[..cut].to_vec();
        if b.len() >= 4 {
            // Claim the original length: the message is cut short.
            b[..4].copy_from_slice(&u32::try_from(full.len()).unwrap().to_ne_bytes());
        }
        assert!(
            parse_replies(&b, SEQ).map_or(true, |a| a.is_empty()),
            "cut at {cut}"
        );
        assert!(Request::decode(&b).is_err(), "cut at {cut}");
    }
}

/// The companion table (reject of services without a healthy backend, hairpin masquerade)
/// for a sample spec, as the nft script our netlink encoder sends.
#[test]
fn golden_companion_table() {
    let mut web = ServiceSpec::new(
        key("10.0.0.2", Proto::Tcp, 80),
        8080,
        [ip("10.0.1.3"), ip("10.0.1.4")],
    );
    web.backends.insert(ip("10.0.1.5"), BackendState::Draining);
    let mut api = ServiceSpec::new(key("10.0.0.3", Proto::Tcp, 443), 8443, [ip("10.0.1.3")]);
    api.affinity = Affinity::ClientIp {
        timeout: Duration::from_secs(10800),
    };
    let empty = ServiceSpec::new(key("10.0.0.5", Proto::Udp, 53), 53, []);
    let spec = LbSpec::from_services([web, api, empty]);
    let (ops, _) = Companion::plan_full(&spec);
    check_golden("companion.nft", &render_script(&ops));
}
