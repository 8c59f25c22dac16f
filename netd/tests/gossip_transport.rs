//! The sealed chitchat transport: one suite, run on real UDP over 127.0.0.1 and on the
//! in-process `MemNet` (STYLE rule 3). Delivery, fragmentation, forged / replayed / random /
//! oversize datagrams (dropped and counted, never delivered), key rotation under traffic,
//! floods (bounded queue), and socket errors (MemNet injects them; the loop goes on).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use chitchat::transport::{Socket, Transport};
use chitchat::{ChitchatEnvelope, ChitchatMessage, ProtocolVersion};
use swarmnet_netd::gossip::crypto::{KEY_LEN, Keyring};
use swarmnet_netd::gossip::transport::{
    DatagramNet, MemNet, SealedSocket, SealedTransport, TransportConfig, UdpNet,
};

const LO: ([u8; 4], u16) = ([127, 0, 0, 1], 0);

fn syn(cluster: &str) -> ChitchatEnvelope {
    ChitchatEnvelope {
        version: ProtocolVersion::V0,
        message: ChitchatMessage::Syn {
            cluster_id: cluster.into(),
            digest: Default::default(),
        },
    }
}

struct Pair {
    ta: SealedTransport,
    tb: SealedTransport,
    a: SealedSocket,
    b: SealedSocket,
    a_addr: SocketAddr,
    b_addr: SocketAddr,
}

async fn pair(net: Arc<dyn DatagramNet>, cfg: TransportConfig) -> Pair {
    let ring = || Keyring::new(1, [3; KEY_LEN]);
    let ta = SealedTransport::new(net.clone(), ring(), cfg.clone());
    let tb = SealedTransport::new(net, ring(), cfg);
    let a = ta.open_sealed(LO.into()).await.unwrap();
    let b = tb.open_sealed(LO.into()).await.unwrap();
    let a_addr = a.local_addr().unwrap();
    let b_addr = b.local_addr().unwrap();
    Pair {
        ta,
        tb,
        a,
        b,
        a_addr,
        b_addr,
    }
}

async fn recv_within(s: &mut SealedSocket, ms: u64) -> Option<ChitchatEnvelope> {
    tokio::time::timeout(Duration::from_millis(ms), s.recv())
        .await
        .ok()
        .map(|r| r.unwrap().envelope)
}

async fn delivers_and_authenticates_sender(net: Arc<dyn DatagramNet>) {
    let mut p = pair(net, TransportConfig::default()).await;
    p.a.send(p.b_addr, syn("c1")).await.unwrap();
    let out = tokio::time::timeout(Duration::from_secs(2), p.b.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(out.from_addr, p.a_addr);
    assert_eq!(out.envelope, syn("c1"));
    // A reply the other way.
    p.b.send(p.a_addr, syn("c2")).await.unwrap();
    assert_eq!(recv_within(&mut p.a, 2000).await, Some(syn("c2")));
    let c = p.tb.counters().snapshot();
    assert_eq!((c.delivered, c.dropped_total()), (1, 0));
}

async fn fragments_large_envelopes(net: Arc<dyn DatagramNet>) {
    let cfg = TransportConfig {
        max_datagram: 1400,
        ..TransportConfig::default()
    };
    let mut p = pair(net, cfg).await;
    let big = "x".repeat(60_000);
    p.a.send(p.b_addr, syn(&big)).await.unwrap();
    assert_eq!(recv_within(&mut p.b, 2000).await, Some(syn(&big)));
    let sent = p.ta.counters().snapshot().sent_datagrams;
    assert!(sent >= 44, "60 kB in 1400-byte frames: {sent} frames");
}

/// Captures what `a` seals by sending it to a plain socket.
async fn capture_one(net: &Arc<dyn DatagramNet>, p: &mut Pair) -> Vec<u8> {
    let tap = net.bind(LO.into()).await.unwrap();
    p.a.send(tap.local_addr().unwrap(), syn("captured"))
        .await
        .unwrap();
    let mut buf = vec![0; 70_000];
    let (n, _) = tokio::time::timeout(Duration::from_secs(2), tap.recv_from(&mut buf))
        .await
        .unwrap()
        .unwrap();
    buf.truncate(n);
    buf
}

async fn refuses_forged_replayed_random_oversize(net: Arc<dyn DatagramNet>) {
    let cfg = TransportConfig {
        max_datagram: 1400,
        ..TransportConfig::default()
    };
    let mut p = pair(net.clone(), cfg.clone()).await;
    let frame = capture_one(&net, &mut p).await;
    let attacker = net.bind(LO.into()).await.unwrap();

    // The captured frame once: delivered (it is genuine). Then replayed: dropped.
    attacker.send_to(&frame, p.b_addr).await.unwrap();
    assert_eq!(recv_within(&mut p.b, 2000).await, Some(syn("captured")));
    for _ in 0..3 {
        attacker.send_to(&frame, p.b_addr).await.unwrap();
    }
    // Wrong key (same id), unknown key id, random bytes, truncated, oversize.
    let wrong = SealedTransport::new(
        net.clone(),
        Keyring::new(1, [4; KEY_LEN]),
        TransportConfig::default(),
    );
    let mut w = wrong.open_sealed(LO.into()).await.unwrap();
    w.send(p.b_addr, syn("forged")).await.unwrap();
    let unknown = SealedTransport::new(
        net.clone(),
        Keyring::new(77, [3; KEY_LEN]),
        TransportConfig::default(),
    );
    let mut u = unknown.open_sealed(LO.into()).await.unwrap();
    u.send(p.b_addr, syn("unknown key")).await.unwrap();
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    for len in [0usize, 1, 10, 48, 49, 200, 1399] {
        let bytes: Vec<u8> = (0..len)
            .map(|_| {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                rng as u8
            })
            .collect();
        attacker.send_to(&bytes, p.b_addr).await.unwrap();
    }
    let mut tampered = frame.clone();
    tampered[40] ^= 0x80;
    attacker.send_to(&tampered, p.b_addr).await.unwrap();
    attacker
        .send_to(&frame[..frame.len() - 1], p.b_addr)
        .await
        .unwrap();
    attacker.send_to(&vec![0u8; 1401], p.b_addr).await.unwrap();

    assert_eq!(
        recv_within(&mut p.b, 300).await,
        None,
        "nothing else delivered"
    );
    // Datagrams are processed in order; the last one is counted once this holds.
    let c = wait_counters(&p.tb, |c| c.recv_datagrams >= 1 + 3 + 2 + 7 + 3).await;
    assert_eq!(c.delivered, 1);
    assert_eq!(c.dropped_replay, 3);
    assert_eq!(c.dropped_auth, 1 + 2, "wrong key, tampered, truncated");
    assert_eq!(c.dropped_unknown_key, 1);
    assert_eq!(c.dropped_oversize, 1);
    // Random bytes: too short or bad magic (a random 49+ byte string with our magic is 1/65536).
    assert_eq!(c.dropped_malformed, 7);
    // And the socket still works.
    p.a.send(p.b_addr, syn("after")).await.unwrap();
    assert_eq!(recv_within(&mut p.b, 2000).await, Some(syn("after")));
}

async fn wait_counters(
    t: &SealedTransport,
    cond: impl Fn(&swarmnet_netd::gossip::CounterSnapshot) -> bool,
) -> swarmnet_netd::gossip::CounterSnapshot {
    for _ in 0..200 {
        let c = t.counters().snapshot();
        if cond(&c) {
            return c;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    t.counters().snapshot()
}

async fn rotation_under_traffic_drops_nothing(net: Arc<dyn DatagramNet>) {
    let mut p = pair(net, TransportConfig::default()).await;
    let (ka, kb) = (p.ta.keyring().clone(), p.tb.keyring().clone());
    let mut got = 0;
    for i in 0..300u32 {
        match i {
            50 => {
                ka.add(2, [9; KEY_LEN]).unwrap();
                kb.add(2, [9; KEY_LEN]).unwrap();
            }
            100 => ka.use_for_sealing(2).unwrap(),
            150 => kb.use_for_sealing(2).unwrap(),
            200 => {
                ka.remove(1).unwrap();
                kb.remove(1).unwrap();
            }
            _ => {}
        }
        p.a.send(p.b_addr, syn(&format!("m{i}"))).await.unwrap();
        p.b.send(p.a_addr, syn(&format!("r{i}"))).await.unwrap();
        if recv_within(&mut p.b, 2000).await == Some(syn(&format!("m{i}"))) {
            got += 1;
        }
        if recv_within(&mut p.a, 2000).await == Some(syn(&format!("r{i}"))) {
            got += 1;
        }
    }
    assert_eq!(got, 600);
    assert_eq!(p.ta.counters().snapshot().dropped_total(), 0);
    assert_eq!(p.tb.counters().snapshot().dropped_total(), 0);
    assert_eq!(ka.ids(), vec![2]);
}

async fn floods_are_bounded(net: Arc<dyn DatagramNet>) {
    let cfg = TransportConfig {
        recv_queue: 8,
        ..TransportConfig::default()
    };
    let mut p = pair(net.clone(), cfg).await;
    // Nobody reads b while a floods it with genuine datagrams and an attacker with junk.
    let attacker = net.bind(LO.into()).await.unwrap();
    for i in 0..400 {
        p.a.send(p.b_addr, syn(&format!("f{i}"))).await.unwrap();
        attacker.send_to(&[0xab; 64], p.b_addr).await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let c = p.tb.counters().snapshot();
    assert!(c.delivered <= 400);
    let mut queued = 0;
    while recv_within(&mut p.b, 100).await.is_some() {
        queued += 1;
    }
    assert!(queued <= 8, "queue bound: {queued}");
    let c = p.tb.counters().snapshot();
    // Every datagram either queued, dropped (queue full / malformed), or lost below us
    // (kernel socket buffer, MemNet queue): never more than the bound kept.
    assert!(c.dropped_malformed > 0 || c.recv_datagrams < 800);
    // Still serving.
    p.a.send(p.b_addr, syn("alive")).await.unwrap();
    assert_eq!(recv_within(&mut p.b, 2000).await, Some(syn("alive")));
}

async fn suite(make: impl Fn() -> Arc<dyn DatagramNet>) {
    delivers_and_authenticates_sender(make()).await;
    fragments_large_envelopes(make()).await;
    refuses_forged_replayed_random_oversize(make()).await;
    rotation_under_traffic_drops_nothing(make()).await;
    floods_are_bounded(make()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn suite_on_udp_loopback() {
    suite(|| Arc::new(UdpNet)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn suite_on_memnet() {
    suite(|| Arc::new(MemNet::new(64))).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socket_errors_do_not_stop_the_socket() {
    let net = MemNet::new(64);
    let mut p = pair(Arc::new(net.clone()), TransportConfig::default()).await;
    net.fail_recvs(p.b_addr, 5);
    net.fail_sends(p.a_addr, 3);
    for i in 0..3 {
        // Failed sends are reported as sent nothing, not as an error (chitchat would stop).
        let out = p.a.send(p.b_addr, syn(&format!("lost{i}"))).await.unwrap();
        assert_eq!(out.num_bytes_sent, 0);
    }
    p.a.send(p.b_addr, syn("ok")).await.unwrap();
    assert_eq!(recv_within(&mut p.b, 2000).await, Some(syn("ok")));
    // The receiver may already wait in a recv when the failures are armed: then "ok" arrives
    // first and the 5 failures (10 ms apart) come right after it. Wait for them, generously.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while p.tb.counters().snapshot().recv_errors < 5 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (ca, cb) = (p.ta.counters().snapshot(), p.tb.counters().snapshot());
    assert_eq!(ca.send_errors, 3);
    assert_eq!(cb.recv_errors, 5);
    // And the socket still works after them.
    p.a.send(p.b_addr, syn("after")).await.unwrap();
    assert_eq!(recv_within(&mut p.b, 2000).await, Some(syn("after")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn implements_chitchat_transport() {
    // Opening through the chitchat trait, twice on one address: the second fails.
    let t = SealedTransport::new(
        Arc::new(MemNet::default()),
        Keyring::new(1, [1; KEY_LEN]),
        TransportConfig::default(),
    );
    let s = Transport::open(&t, LO.into()).await.unwrap();
    assert!(Transport::open(&t, s.local_addr().unwrap()).await.is_err());
}
