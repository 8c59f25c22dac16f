//! The request entry point without sockets: answers of the full path, byte equality of the
//! fast and full paths on a generated query set, truncation, and a bounded randomized fuzz run
//! (the stable-toolchain counterpart of `netd/fuzz`).

mod dns_common;

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, SocketAddr};

use dns_common::{a_records, intent, parse, query, tid};
use hickory_proto::op::ResponseCode;
use hickory_proto::rr::{RData, RecordType};
use rand::rngs::SmallRng;
use rand::{RngExt, SeedableRng};
use swarmnet_netd::dns::{
    DenyAnswer, DnsView, ForwardPolicy, Outcome, Responder, Transport, ViewOptions, caught_panics,
};

fn view(task: &str) -> DnsView {
    DnsView::build(&intent(300), &tid(task), &ViewOptions::default())
}

fn fwd() -> ForwardPolicy {
    ForwardPolicy::forward(["198.18.1.1:53".parse::<SocketAddr>().unwrap()])
}

fn reply(r: &mut Responder, v: &DnsView, p: &ForwardPolicy, q: &[u8], t: Transport) -> Vec<u8> {
    match r.answer(v, p, q, t) {
        Outcome::Reply(b) => b.to_vec(),
        other => panic!("expected a reply, got {other:?}"),
    }
}

fn ask(v: &DnsView, name: &str, qtype: RecordType) -> hickory_proto::op::Message {
    let mut r = Responder::new();
    parse(&reply(
        &mut r,
        v,
        &fwd(),
        &query(7, name, qtype, Some((1232, false))),
        Transport::Udp,
    ))
}

#[test]
fn cluster_answers() {
    let v = view("w1");
    let m = ask(&v, "web", RecordType::A);
    assert_eq!(m.response_code, ResponseCode::NoError);
    assert!(m.authoritative && m.recursion_available);
    assert_eq!(a_records(&m), vec![Ipv4Addr::new(10, 10, 0, 2)]);
    assert_eq!(m.answers[0].ttl, 5);
    let m = ask(&v, "Tasks.API.", RecordType::A);
    let got: BTreeSet<Ipv4Addr> = a_records(&m).into_iter().collect();
    assert_eq!(
        got,
        [Ipv4Addr::new(10, 10, 0, 20), Ipv4Addr::new(10, 10, 0, 21)].into()
    );
    assert_eq!(
        m.answers[0].name.to_ascii(),
        "Tasks.API.",
        "owner keeps the asked case"
    );
    // AAAA of a known name: NOERROR, empty, with the zone's SOA (fast path).
    let m = ask(&v, "web", RecordType::AAAA);
    assert_eq!(
        (m.response_code, m.answers.len()),
        (ResponseCode::NoError, 0)
    );
    assert_soa(&m, "web.", 5);
    let m = ask(&v, "Tasks.API", RecordType::AAAA);
    assert_soa(&m, "API.", 5);
    // MX of a known name: NODATA too (full path).
    let m = ask(&v, "tasks.web", RecordType::MX);
    assert_eq!(
        (m.response_code, m.answers.len()),
        (ResponseCode::NoError, 0)
    );
    assert_soa(&m, "web.", 5);
    // Another network's name: NXDOMAIN, authoritative, SOA.
    let m = ask(&v, "pg", RecordType::A);
    assert_eq!(m.response_code, ResponseCode::NXDomain);
    assert!(m.authoritative);
    assert_soa(&m, "pg.", 5);
    // The negative TTL follows the configured TTL.
    let v = DnsView::build(
        &intent(300),
        &tid("w1"),
        &ViewOptions {
            ttl: 42,
            live: None,
        },
    );
    assert_soa(&ask(&v, "pg", RecordType::A), "pg.", 42);
    assert_soa(&ask(&v, "web", RecordType::AAAA), "web.", 42);
    // A positive answer has no authority section; a forwarded-name refusal has no SOA.
    assert!(ask(&v, "web", RecordType::A).authorities.is_empty());
}

/// One SOA in the authority section, owned by `apex`, negative TTL `ttl` (RFC 2308).
fn assert_soa(m: &hickory_proto::op::Message, apex: &str, ttl: u32) {
    assert_eq!(m.authorities.len(), 1, "{m:?}");
    let r = &m.authorities[0];
    let RData::SOA(soa) = &r.data else {
        panic!("not an SOA: {r:?}")
    };
    assert_eq!(r.name.to_ascii(), apex);
    assert_eq!(soa.mname.to_ascii(), apex);
    assert_eq!(soa.rname.to_ascii(), format!("hostmaster.{apex}"));
    assert_eq!((r.ttl, soa.minimum), (ttl, ttl));
}

#[test]
fn ptr_and_srv() {
    let v = view("w1");
    let m = ask(&v, "2.0.10.10.in-addr.arpa", RecordType::PTR);
    let RData::PTR(p) = &m.answers[0].data else {
        panic!("{m:?}")
    };
    assert_eq!(p.0.to_ascii(), "web.");
    let m = ask(&v, "21.0.10.10.in-addr.arpa", RecordType::PTR);
    let RData::PTR(p) = &m.answers[0].data else {
        panic!("{m:?}")
    };
    assert_eq!(p.0.to_ascii(), "api.2.a2.");
    let m = ask(&v, "99.0.11.10.in-addr.arpa", RecordType::PTR);
    assert_eq!(
        m.response_code,
        ResponseCode::NXDomain,
        "cluster subnet, unknown address"
    );
    // The SOA of the subnet's octet-aligned reverse zone (10.11.0.0/24).
    assert_soa(&m, "0.11.10.in-addr.arpa.", 5);
    // A PTR name asked for A: NODATA with the reverse zone's SOA.
    let m = ask(&v, "2.0.10.10.in-addr.arpa", RecordType::A);
    assert_eq!(
        (m.response_code, m.answers.len()),
        (ResponseCode::NoError, 0)
    );
    assert_soa(&m, "0.10.10.in-addr.arpa.", 5);

    let m = ask(&v, "_http._tcp.web", RecordType::SRV);
    let RData::SRV(s) = &m.answers[0].data else {
        panic!("{m:?}")
    };
    assert_eq!(
        (s.priority, s.weight, s.port, s.target.to_ascii()),
        (0, 100, 80, "web.".into())
    );
    let mut extra = m.clone();
    extra.answers = m.additionals.clone();
    assert_eq!(a_records(&extra), vec![Ipv4Addr::new(10, 10, 0, 2)]);
    let m = ask(&v, "_grpc._tcp.api", RecordType::SRV);
    assert_eq!(m.answers.len(), 2);
    assert_eq!(
        m.additionals.len(),
        2,
        "targets' addresses as additional data"
    );
}

#[test]
fn errors_and_policies() {
    let v = view("w1");
    let mut r = Responder::new();
    // Unknown names go to the forwarder, with the client's UDP limit.
    let q = query(1, "example.com", RecordType::A, None);
    assert_eq!(
        r.answer(&v, &fwd(), &q, Transport::Udp),
        Outcome::Forward { udp_limit: 512 }
    );
    let q = query(1, "example.com", RecordType::A, Some((4000, false)));
    assert_eq!(
        r.answer(&v, &fwd(), &q, Transport::Udp),
        Outcome::Forward { udp_limit: 4000 }
    );
    // Internal-only sandbox: REFUSED or NXDOMAIN, never forwarded.
    for (deny, code) in [
        (DenyAnswer::Refused, ResponseCode::Refused),
        (DenyAnswer::NxDomain, ResponseCode::NXDomain),
    ] {
        let m = parse(&reply(
            &mut r,
            &v,
            &ForwardPolicy::Deny(deny),
            &q,
            Transport::Udp,
        ));
        assert_eq!(m.response_code, code);
        assert!(!m.recursion_available);
    }
    // Only loopback upstreams: SERVFAIL at once.
    let own = ForwardPolicy::forward(["127.0.0.11:53".parse::<SocketAddr>().unwrap()]);
    assert_eq!(
        parse(&reply(&mut r, &v, &own, &q, Transport::Udp)).response_code,
        ResponseCode::ServFail
    );
    // Unknown opcode: NOTIMP.
    let mut q = query(9, "web", RecordType::A, None);
    q[2] = (q[2] & 0x87) | (2 << 3);
    let m = parse(&reply(&mut r, &v, &fwd(), &q, Transport::Udp));
    assert_eq!((m.id, m.response_code), (9, ResponseCode::NotImp));
    // Malformed: FORMERR with the ID.
    let mut q = query(10, "web", RecordType::A, None);
    q.truncate(15);
    let m = parse(&reply(&mut r, &v, &fwd(), &q, Transport::Udp));
    assert_eq!((m.id, m.response_code), (10, ResponseCode::FormErr));
    // Class CH: REFUSED.
    let mut q = query(11, "version.bind", RecordType::TXT, None);
    let n = q.len();
    q[n - 1] = 3;
    let m = parse(&reply(&mut r, &v, &fwd(), &q, Transport::Udp));
    assert_eq!(m.response_code, ResponseCode::Refused);
    // A response sent to us: dropped. Shorter than a header: dropped.
    let mut q = query(12, "web", RecordType::A, None);
    q[2] |= 0x80;
    assert_eq!(r.answer(&v, &fwd(), &q, Transport::Udp), Outcome::Drop);
    assert_eq!(
        r.answer(&v, &fwd(), &[1, 2, 3], Transport::Udp),
        Outcome::Drop
    );
    // EDNS version 1: BADVERS.
    let mut q = query(13, "web", RecordType::A, Some((1232, false)));
    let n = q.len();
    q[n - 5] = 1;
    let m = parse(&reply(&mut r, &v, &fwd(), &q, Transport::Udp));
    // BADVERS and BADSIG share the value 16; hickory decodes it as BADSIG.
    assert_eq!(u16::from(m.response_code), 16);
}

#[test]
fn dnsrr_order_is_random_per_answer() {
    let v = view("w1");
    let mut r = Responder::new();
    let q = query(1, "api", RecordType::A, None);
    let mut orders = BTreeSet::new();
    for _ in 0..64 {
        orders.insert(a_records(&parse(&reply(
            &mut r,
            &v,
            &fwd(),
            &q,
            Transport::Udp,
        ))));
    }
    assert_eq!(
        orders.len(),
        2,
        "both orders of two addresses show up: {orders:?}"
    );
}

#[test]
fn large_answers_truncate_over_udp_and_not_over_tcp() {
    let v = view("c1");
    let mut r = Responder::new();
    for (edns, limit) in [
        (None, 512usize),
        (Some((1232, false)), 1232),
        (Some((65000, true)), 4096),
        (Some((100, false)), 512),
    ] {
        let q = query(3, "many", RecordType::A, edns);
        let b = reply(&mut r, &v, &fwd(), &q, Transport::Udp);
        assert!(b.len() <= limit, "{} > {limit}", b.len());
        let m = parse(&b);
        assert!(m.truncation, "TC set");
        // As many whole records as fit: one more would not.
        let one_more = if m.answers.len() < 119 { 16 } else { 20 };
        assert!(
            b.len() + one_more > limit,
            "{} answers in {} bytes, limit {limit}",
            m.answers.len(),
            b.len()
        );
        assert_eq!(m.edns.is_some(), edns.is_some());
        // The full path cuts the same way.
        let full = match r.answer_full(&v, &fwd(), &q, Transport::Udp) {
            Outcome::Reply(b) => parse(b),
            other => panic!("{other:?}"),
        };
        assert_eq!(
            (full.truncation, full.answers.len()),
            (true, m.answers.len())
        );
    }
    let q = query(3, "tasks.many", RecordType::A, None);
    let m = parse(&reply(&mut r, &v, &fwd(), &q, Transport::Tcp));
    assert!(!m.truncation);
    assert_eq!(
        a_records(&m).into_iter().collect::<BTreeSet<_>>().len(),
        300
    );
}

/// Every name of the view (and some that are not), every type, case and EDNS variant: when
/// the fast path answers, the full path (same generator state) gives the same bytes.
#[test]
fn fast_equals_full() {
    let intent = intent(300);
    let mut names: Vec<String> = vec![
        "web",
        "www",
        "front",
        "api",
        "tasks.api",
        "tasks.web",
        "api.1.a1",
        "api.2",
        "web.1.w1",
        "pg",
        "primary",
        "many",
        "tasks.many",
        "client.1.c1",
        "example.com",
        "_http._tcp.web",
        "2.0.10.10.in-addr.arpa",
        "nope",
        "many.17",
        "many.17.b16",
        "Tasks.API",
        "WEB.1.w1",
    ]
    .into_iter()
    .map(String::from)
    .collect();
    names.extend(
        (0..300)
            .step_by(37)
            .map(|i| format!("many.{}.b{}", i + 1, i)),
    );
    let types = [
        RecordType::A,
        RecordType::AAAA,
        RecordType::PTR,
        RecordType::SRV,
        RecordType::MX,
        RecordType::ANY,
    ];
    let ednss = [
        None,
        Some((512, false)),
        Some((1232, true)),
        Some((4096, false)),
        Some((100, false)),
        Some((65535, true)),
    ];
    let mut fast_count = 0;
    let mut total = 0;
    for task in ["w1", "a1", "p1", "c1"] {
        let v = DnsView::build(&intent, &tid(task), &ViewOptions::default());
        for policy in [fwd(), ForwardPolicy::Deny(DenyAnswer::Refused)] {
            for name in &names {
                for variant in [name.clone(), name.to_uppercase(), format!("{name}.")] {
                    for qtype in types {
                        for edns in ednss {
                            total += 1;
                            let q = query(total as u16, &variant, qtype, edns);
                            let seed = total as u64;
                            let mut fast = Responder::with_seed(seed);
                            let mut full = Responder::with_seed(seed);
                            let Some(f) = fast.answer_fast(&v, &policy, &q).map(<[u8]>::to_vec)
                            else {
                                continue;
                            };
                            fast_count += 1;
                            let Outcome::Reply(g) =
                                full.answer_full(&v, &policy, &q, Transport::Udp)
                            else {
                                panic!("full path does not answer {variant} {qtype}");
                            };
                            if f != g {
                                let (a, b) = (parse(&f), parse(g));
                                panic!(
                                    "{task} {variant} {qtype} {edns:?}: fast {} bytes, {} answers, tc {}; full {} bytes, {} answers, tc {}",
                                    f.len(),
                                    a.answers.len(),
                                    a.truncation,
                                    g.len(),
                                    b.answers.len(),
                                    b.truncation
                                );
                            }
                        }
                    }
                }
            }
        }
    }
    assert!(
        fast_count > 300,
        "the fast path took only {fast_count} of {total}"
    );
}

/// Generated and mutated packets through the entry point: no panic, every reply parses (or
/// is a header-only error for the same ID), and a good query right after is answered right.
#[test]
fn fuzz_bounded() {
    let v = view("w1");
    let policies = [fwd(), ForwardPolicy::Deny(DenyAnswer::NxDomain)];
    let mut rng = SmallRng::seed_from_u64(0x5eed);
    let mut r = Responder::with_seed(1);
    let seeds: Vec<Vec<u8>> = vec![
        query(1, "web", RecordType::A, None),
        query(2, "tasks.api", RecordType::A, Some((1232, true))),
        query(3, "_http._tcp.web", RecordType::SRV, Some((4096, false))),
        query(4, "2.0.10.10.in-addr.arpa", RecordType::PTR, None),
        query(5, "example.com", RecordType::AAAA, None),
        // Compression loop in the question: a pointer to itself.
        vec![0, 6, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0xC0, 12, 0, 1, 0, 1],
        // Bad label length.
        vec![0, 7, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 63, b'a', 0, 0, 1, 0, 1],
        // Header only, counts claiming records.
        vec![0, 8, 1, 0, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF],
    ];
    let good = query(0x4242, "web", RecordType::A, None);
    let iterations = 20_000;
    for i in 0..iterations {
        let mut p = if i % 10 == 0 {
            let n = rng.random_range(0..600);
            (0..n).map(|_| rng.random()).collect()
        } else {
            seeds[rng.random_range(0..seeds.len())].clone()
        };
        for _ in 0..rng.random_range(0..6) {
            if p.is_empty() {
                break;
            }
            match rng.random_range(0..5) {
                0 => {
                    let at = rng.random_range(0..p.len());
                    p[at] = rng.random();
                }
                1 => p.truncate(rng.random_range(0..p.len())),
                2 => {
                    let at = rng.random_range(0..=p.len());
                    p.insert(at, rng.random());
                }
                3 => {
                    // Plant a compression pointer somewhere.
                    let at = rng.random_range(0..p.len());
                    p[at] = 0xC0 | (rng.random::<u8>() & 0x3F);
                }
                _ => {
                    let at = rng.random_range(0..p.len());
                    p[at] ^= 1 << rng.random_range(0..8);
                }
            }
        }
        let policy = &policies[i % 2];
        for t in [Transport::Udp, Transport::Tcp] {
            if let Outcome::Reply(b) = r.answer(&v, policy, &p, t) {
                let m = parse(b);
                assert_eq!(m.id, u16::from_be_bytes([p[0], p[1]]));
                if t == Transport::Udp {
                    assert!(b.len() <= 4096);
                }
            }
        }
        if i % 97 == 0 {
            let m = parse(&reply(&mut r, &v, &fwd(), &good, Transport::Udp));
            assert_eq!(
                (m.id, a_records(&m)),
                (0x4242, vec![Ipv4Addr::new(10, 10, 0, 2)])
            );
        }
    }
    assert_eq!(
        caught_panics(),
        0,
        "hickory's parser panicked on some input"
    );
}
