//! netd's assignment feed against a real manager (in process, loopback): it trades its join
//! token for a node certificate, keeps it in `<run_dir>/tls` (0600), follows the assignment
//! stream over mTLS, and renews its 4-second certificate at half life without losing the
//! stream; a token pinning another CA never gets a certificate.

use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, Instant};

use swarmnet_model::NodeId;
use swarmnet_netd::assign::{AssignmentFeed, FeedConfig};
use swarmnet_orchestrator::raft::manager::{Manager, ManagerConfig};
use swarmnet_orchestrator::{api, ca, pb};

fn wait_for(limit: Duration, what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn the_feed_joins_over_tls_and_renews_its_certificate() {
    let tmp = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let dir = tmp.path().join("m1");
    let (addr, tokens, manager) = rt.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let mut cfg = ManagerConfig::new(1, addr.clone(), dir.clone());
        cfg.node_down_after = Duration::from_secs(3600);
        cfg.cert_lifetime = Duration::from_secs(4);
        let creds = ca::bootstrap(&dir, "manager-1", cfg.cert_lifetime).unwrap();
        let m = Manager::start(cfg, ca::ManagerTls::new(creds).unwrap())
            .await
            .unwrap();
        tokio::spawn(api::serve(m.clone(), listener, std::future::pending()));
        let admin = ca::client_config_from(&ca::admin_dir(&dir)).unwrap();
        let ch = swarmnet_orchestrator::raft::network::channel(&addr, &admin).unwrap();
        let mut c = pb::cluster_client::ClusterClient::new(ch);
        c.init(pb::InitRequest {
            node: Some(pb::JoinNodeRequest {
                id: "n1".into(),
                addr: "198.18.0.1".into(),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap();
        let t = c.join_tokens(pb::Empty {}).await.unwrap().into_inner();
        (addr, t, m)
    });
    let feed_cfg = |run: &std::path::Path, token: &str| FeedConfig {
        node: NodeId::new("n2").unwrap(),
        hostname: "n2".into(),
        addr: "198.18.0.2".parse().unwrap(),
        managers: vec![addr.clone()],
        join_token: token.to_string(),
        state_file: run.join("assignment.json"),
        gossip_key_file: None,
    };

    // A token pinning another CA: no certificate, and the feed says why.
    let other = tmp.path().join("other");
    std::fs::create_dir_all(&other).unwrap();
    let mut wrong = swarmnet_pki::token::JoinToken::parse(&tokens.worker).unwrap();
    wrong.ca_digest = swarmnet_pki::ca::RootCa::generate("x")
        .unwrap()
        .digest()
        .unwrap();
    let bad = AssignmentFeed::start(feed_cfg(&other, &wrong.to_string()));
    wait_for(Duration::from_secs(20), "the CA mismatch", || {
        bad.error()
            .is_some_and(|e| e.contains("does not match the join token"))
    });
    assert!(!other.join("tls").exists());

    // The right token: a certificate, kept private, and the node's intent.
    let run = tmp.path().join("n2");
    std::fs::create_dir_all(&run).unwrap();
    let mut feed = AssignmentFeed::start(feed_cfg(&run, &tokens.worker));
    let mut intent = None;
    wait_for(Duration::from_secs(20), "the first assignment", || {
        intent = intent.take().or_else(|| feed.poll());
        intent.is_some()
    });
    assert!(intent.unwrap().nodes().any(|n| n.id.as_str() == "n2"));
    let crt = run.join("tls").join("node.crt");
    let mode = std::fs::metadata(run.join("tls").join("node.key"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let first = std::fs::read_to_string(&crt).unwrap();
    let info = swarmnet_pki::ca::identity_of_pem(&first).unwrap();
    assert_eq!(info.identity.id, "n2");
    assert_eq!(info.identity.role, swarmnet_pki::Role::Worker);

    // Renewed at half life (about 2 s), twice, and the stream goes on: a change still arrives.
    let mut seen = vec![first];
    wait_for(Duration::from_secs(30), "two renewals", || {
        let now = std::fs::read_to_string(&crt).unwrap_or_default();
        if !seen.contains(&now) {
            seen.push(now);
        }
        seen.len() >= 3
    });
    rt.block_on(async {
        let admin = ca::client_config_from(&ca::admin_dir(&dir)).unwrap();
        let ch = swarmnet_orchestrator::raft::network::channel(&addr, &admin).unwrap();
        pb::networks_client::NetworksClient::new(ch)
            .create(pb::NetworkCreate {
                name: "late".into(),
                ..Default::default()
            })
            .await
            .unwrap();
    });
    let mut got = false;
    wait_for(
        Duration::from_secs(20),
        "an assignment after the renewals",
        || {
            got = got
                || feed
                    .poll()
                    .is_some_and(|i| i.networks().any(|n| n.id.as_str() == "late"));
            got
        },
    );
    assert!(feed.error().is_none(), "{:?}", feed.error());
    rt.block_on(manager.shutdown());
}
