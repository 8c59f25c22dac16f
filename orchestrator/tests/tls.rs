//! The cluster PKI from the outside, against one manager on a loopback port: joins with a
//! wrong secret or a token pinning another CA are refused with clear errors; clients without a
//! certificate, with one of another CA, self-signed, or with a worker certificate on the
//! control API are refused; join-token rotation stops new joins with the old token while joined
//! nodes keep working; certificates with a lifetime of seconds are renewed (the node's over its
//! mTLS connection, the manager's own by itself) and an expired one is refused.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use swarmnet_orchestrator::raft::manager::{Manager, ManagerConfig};
use swarmnet_orchestrator::{api, ca, pb};
use swarmnet_pki::ca::{NodeMaterial, RootCa, identity_of_pem};
use swarmnet_pki::join::{JoinError, request_certificate};
use swarmnet_pki::rustls::ClientConfig;
use swarmnet_pki::tls::{Credentials, client_config, join_client_config};
use swarmnet_pki::token::JoinToken;
use swarmnet_pki::{Role, join};
use tonic::transport::Channel;

/// Lifetime of the node certificates in this test: renewal is due after about 2 s.
const LIFETIME: Duration = Duration::from_secs(4);
const TIMEOUT: Duration = Duration::from_secs(5);

struct One {
    _tmp: tempfile::TempDir,
    addr: String,
    manager: Arc<Manager>,
    admin: Arc<ClientConfig>,
    root: RootCa,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

async fn one_manager() -> One {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("m1");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let mut cfg = ManagerConfig::new(1, addr.clone(), dir.clone());
    cfg.node_down_after = Duration::from_secs(3600);
    cfg.cert_lifetime = LIFETIME;
    let creds = ca::bootstrap(&dir, "manager-1", LIFETIME).unwrap();
    let root = ca::pending_root_ca(&dir).unwrap();
    let manager = Manager::start(cfg, ca::ManagerTls::new(creds).unwrap())
        .await
        .unwrap();
    let (stop, rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(api::serve(manager.clone(), listener, async {
        let _ = rx.await;
    }));
    let admin = ca::client_config_from(&ca::admin_dir(&dir)).unwrap();
    let one = One {
        _tmp: tmp,
        addr,
        manager,
        admin,
        root,
        stop: Some(stop),
    };
    pb::cluster_client::ClusterClient::new(one.channel(&one.admin))
        .init(pb::InitRequest {
            cluster_id: "tls".into(),
            node: Some(pb::JoinNodeRequest {
                id: "n1".into(),
                addr: "198.18.0.1".into(),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .expect("init");
    one
}

impl One {
    fn channel(&self, tls: &Arc<ClientConfig>) -> Channel {
        swarmnet_orchestrator::raft::network::channel(&self.addr, tls).unwrap()
    }

    async fn tokens(&self) -> pb::JoinTokensResponse {
        pb::cluster_client::ClusterClient::new(self.channel(&self.admin))
            .join_tokens(pb::Empty {})
            .await
            .unwrap()
            .into_inner()
    }

    async fn shutdown(mut self) {
        self.manager.shutdown().await;
        let _ = self.stop.take().unwrap().send(());
    }
}

/// The server ends the connection during the handshake: with TLS 1.3 the client learns it
/// only when it sends its request, so tonic reports a broken transport, never an answer.
fn refused_at_handshake(what: &str, e: &tonic::Status) {
    assert!(
        matches!(
            e.code(),
            tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Cancelled
        ),
        "{what}: {e}"
    );
}

fn mtls(m: &NodeMaterial) -> Arc<ClientConfig> {
    client_config(Credentials::new(m.clone()).unwrap()).unwrap()
}

async fn heartbeat(ch: Channel, node: &str) -> Result<(), tonic::Status> {
    pb::dispatcher_client::DispatcherClient::new(ch)
        .heartbeat(pb::HeartbeatRequest {
            node_id: node.into(),
            gossip: None,
        })
        .await
        .map(|_| ())
}

async fn join_node(ch: Channel, node: &str, addr: &str) -> Result<pb::Node, tonic::Status> {
    pb::cluster_client::ClusterClient::new(ch)
        .join_node(pb::JoinNodeRequest {
            id: node.into(),
            addr: addr.into(),
            ..Default::default()
        })
        .await
        .map(|r| r.into_inner())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn joins_are_checked_against_the_token_and_calls_against_the_certificate() {
    let one = one_manager().await;
    let tokens = one.tokens().await;
    let digest = one.root.digest().unwrap();
    assert!(
        tokens.worker.starts_with(&format!("SWMTKN-1-{digest}-")),
        "{tokens:?}"
    );
    // The CA's key is in the replicated state, and no longer in a local file.
    assert!(one.manager.state.read(|a| a.state.root_ca.is_some()));
    assert!(ca::pending_root_ca(&one.manager.config.data_dir).is_none());

    // A wrong secret with the right CA digest: the manager refuses it.
    let wrong_secret = JoinToken::generate(&digest).unwrap().to_string();
    let e = request_certificate(&one.addr, &wrong_secret, "n2", TIMEOUT)
        .await
        .unwrap_err();
    match &e {
        JoinError::Refused { code, message, .. } => {
            assert_eq!(*code, tonic::Code::PermissionDenied);
            assert!(message.contains("invalid join token"), "{message}");
        }
        other => panic!("expected a refusal, got {other}"),
    }
    // The right secret pinning another CA: the client refuses the manager before sending it.
    let mut other_ca = JoinToken::parse(&tokens.worker).unwrap();
    other_ca.ca_digest = RootCa::generate("other").unwrap().digest().unwrap();
    let e = request_certificate(&one.addr, &other_ca.to_string(), "n2", TIMEOUT)
        .await
        .unwrap_err();
    assert!(
        e.to_string().contains("does not match the join token"),
        "{e}"
    );
    assert!(!e.is_transient(), "a CA mismatch is final: {e}");
    // A malformed token never leaves the node.
    let e = request_certificate(&one.addr, "SWMTKN-1-nope", "n2", TIMEOUT)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("invalid join token"), "{e}");

    // The worker token gives a worker certificate naming the node.
    let (worker, role) = request_certificate(&one.addr, &tokens.worker, "n2", TIMEOUT)
        .await
        .expect("join");
    assert_eq!(role, Role::Worker);
    let info = identity_of_pem(&worker.cert_pem).unwrap();
    assert_eq!(
        (info.identity.role, info.identity.id.as_str()),
        (Role::Worker, "n2")
    );
    let wch = one.channel(&mtls(&worker));
    // It joins its node (the certificate decides the role), heartbeats for itself...
    let node = join_node(wch.clone(), "n2", "198.18.0.2").await.unwrap();
    assert_eq!(node.role, "worker");
    heartbeat(wch.clone(), "n2").await.expect("own heartbeat");
    // ...but not for another node, and not on the control API or Raft.
    let e = heartbeat(wch.clone(), "n1").await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e}");
    let e = join_node(wch.clone(), "n3", "198.18.0.3")
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e}");
    let e = pb::services_client::ServicesClient::new(wch.clone())
        .list(pb::Empty {})
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e}");
    assert!(e.message().contains("swarm-worker"), "{e}");
    let e = pb::raft_client::RaftClient::new(wch.clone())
        .vote(pb::Json { data: vec![] })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e}");

    // No certificate (a client that checked the server like a joining node does): refused.
    let anonymous = one.channel(&join_client_config(&digest).unwrap());
    let e = pb::nodes_client::NodesClient::new(anonymous)
        .list(pb::Empty {})
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e}");
    assert!(e.message().contains("client certificate"), "{e}");

    // An admin certificate of another CA, and a self-signed one: the handshake fails.
    let foreign = RootCa::generate("foreign").unwrap();
    let mut other = foreign
        .issue_local("admin", Role::Admin, Duration::from_secs(3600))
        .unwrap();
    other.ca_pem = one.root.cert_pem.clone();
    let self_signed = {
        use swarmnet_pki::rustls::pki_types::PrivateKeyDer;
        use swarmnet_pki::rustls::pki_types::pem::PemObject;
        let mut roots = swarmnet_pki::rustls::RootCertStore::empty();
        roots
            .add(
                swarmnet_pki::ca::certs_of(&one.root.cert_pem)
                    .unwrap()
                    .remove(0),
            )
            .unwrap();
        let mut cfg = ClientConfig::builder_with_provider(swarmnet_pki::tls::provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_client_auth_cert(
                swarmnet_pki::ca::certs_of(&foreign.cert_pem).unwrap(),
                PrivateKeyDer::from_pem_slice(foreign.key_pem.as_bytes()).unwrap(),
            )
            .unwrap();
        cfg.alpn_protocols = vec![b"h2".to_vec()];
        Arc::new(cfg)
    };
    for (what, tls) in [("another CA", mtls(&other)), ("self-signed", self_signed)] {
        let r = pb::nodes_client::NodesClient::new(one.channel(&tls))
            .list(pb::Empty {})
            .await;
        refused_at_handshake(what, &r.expect_err(what));
    }
    // The administrator may.
    let nodes = pb::nodes_client::NodesClient::new(one.channel(&one.admin))
        .list(pb::Empty {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(nodes.nodes.len(), 2);

    // Rotating the worker token: the old one no longer joins, joined nodes keep working.
    let rotated = pb::cluster_client::ClusterClient::new(one.channel(&one.admin))
        .rotate_join_token(pb::RotateJoinTokenRequest {
            role: "worker".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_ne!(rotated.worker, tokens.worker);
    assert_eq!(
        rotated.manager, tokens.manager,
        "only the worker token changes"
    );
    let e = request_certificate(&one.addr, &tokens.worker, "n3", TIMEOUT)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("invalid join token"), "{e}");
    heartbeat(wch.clone(), "n2")
        .await
        .expect("a joined node keeps working after a rotation");
    let (_, role) = request_certificate(&one.addr, &rotated.worker, "n3", TIMEOUT)
        .await
        .expect("the new token joins");
    assert_eq!(role, Role::Worker);
    // The manager token makes managers.
    let (_, role) = request_certificate(&one.addr, &tokens.manager, "n4", TIMEOUT)
        .await
        .unwrap();
    assert_eq!(role, Role::Manager);
    one.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn short_lived_certificates_are_renewed_and_expired_ones_refused() {
    let one = one_manager().await;
    let tokens = one.tokens().await;
    let (first, _) = request_certificate(&one.addr, &tokens.worker, "n2", TIMEOUT)
        .await
        .unwrap();
    let first_info = identity_of_pem(&first.cert_pem).unwrap();
    let creds = Credentials::new(first.clone()).unwrap();
    let tls = client_config(creds.clone()).unwrap();
    let ch = one.channel(&tls);
    join_node(ch.clone(), "n2", "198.18.0.2").await.unwrap();

    // The node renews over its own mTLS channel and puts the new certificate in force.
    let renewed = join::renew(ch.clone(), &one.addr, &creds.material(), TIMEOUT)
        .await
        .expect("renewal");
    let info = identity_of_pem(&renewed.cert_pem).unwrap();
    assert_eq!(info.identity, first_info.identity);
    assert!(info.not_after >= first_info.not_after);
    assert_ne!(
        renewed.key_pem, first.key_pem,
        "a new key with every renewal"
    );
    creds.replace(renewed).unwrap();
    // A certificate of another CA is not put in force.
    let foreign = RootCa::generate("foreign")
        .unwrap()
        .issue_local("n2", Role::Worker, LIFETIME)
        .unwrap();
    assert!(creds.replace(foreign).is_err());

    // The manager renews its own certificate at half life, by itself.
    let own = one.manager.tls.credentials.info();
    let deadline = Instant::now() + Duration::from_secs(30);
    while one.manager.tls.credentials.info().not_after == own.not_after {
        assert!(
            Instant::now() < deadline,
            "the manager did not renew its certificate"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let stored = swarmnet_pki::store::load(&ca::tls_dir(&one.manager.config.data_dir))
        .unwrap()
        .unwrap();
    assert_eq!(
        stored,
        one.manager.tls.credentials.material(),
        "kept on disk"
    );

    // Past the first certificate's expiry, renewing at half life as netd does: a client
    // presenting the first one is refused, the renewed credentials keep working (each call
    // on a new channel: a new handshake).
    let until = first_info.not_after + Duration::from_secs(1);
    let mut renewals = 0;
    while SystemTime::now() < until {
        let info = creds.info();
        if SystemTime::now() >= swarmnet_pki::ca::renew_at(info.not_before, info.not_after) {
            let m = join::renew(one.channel(&tls), &one.addr, &creds.material(), TIMEOUT)
                .await
                .expect("renewal at half life");
            creds.replace(m).unwrap();
            renewals += 1;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(renewals >= 1);
    let e = heartbeat(one.channel(&mtls(&first)), "n2")
        .await
        .unwrap_err();
    refused_at_handshake("expired", &e);
    heartbeat(one.channel(&tls), "n2")
        .await
        .expect("renewed credentials keep working");
    one.shutdown().await;
}

/// `node rm` revokes the node's certificates: with the one it held, a removed node can neither
/// call the dispatcher, nor join itself again, nor renew. A certificate from a new join with a
/// token works; the administrator and other nodes are not touched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_nodes_certificate_is_revoked_until_it_joins_again_with_a_token() {
    let one = one_manager().await;
    let tokens = one.tokens().await;
    let mut channels = Vec::new();
    for (id, addr) in [("n2", "198.18.0.2"), ("n3", "198.18.0.3")] {
        let (m, _) = request_certificate(&one.addr, &tokens.worker, id, TIMEOUT)
            .await
            .unwrap();
        let ch = one.channel(&mtls(&m));
        join_node(ch.clone(), id, addr).await.unwrap();
        heartbeat(ch.clone(), id).await.unwrap();
        channels.push(ch);
    }
    let (n2, n3) = (channels[0].clone(), channels[1].clone());

    pb::nodes_client::NodesClient::new(one.channel(&one.admin))
        .remove(pb::RemoveNodeRequest {
            id: "n2".into(),
            force: true,
        })
        .await
        .expect("forced removal");

    let revoked = |what: &str, e: tonic::Status| {
        assert_eq!(e.code(), tonic::Code::Unauthenticated, "{what}: {e}");
        assert!(
            e.message().contains("revoked") && e.message().contains("join it again"),
            "{what}: {e}"
        );
    };
    // The connection made before the removal: every call is checked.
    revoked("heartbeat", heartbeat(n2.clone(), "n2").await.unwrap_err());
    revoked(
        "join itself again",
        join_node(n2.clone(), "n2", "198.18.0.2").await.unwrap_err(),
    );
    let csr = swarmnet_pki::ca::Csr::generate("n2").unwrap();
    revoked(
        "renew",
        pb::ca_client::CaClient::new(n2.clone())
            .renew_node_certificate(pb::RenewRequest { csr: csr.der })
            .await
            .unwrap_err(),
    );
    let listed = pb::nodes_client::NodesClient::new(one.channel(&one.admin))
        .list(pb::Empty {})
        .await
        .expect("the administrator is not touched")
        .into_inner();
    assert!(
        listed.nodes.iter().all(|n| n.id != "n2"),
        "n2 stays removed"
    );
    heartbeat(n3, "n3")
        .await
        .expect("another node is not touched");

    // A new join with the token: a certificate of the current epoch, which works.
    let (again, _) = request_certificate(&one.addr, &tokens.worker, "n2", TIMEOUT)
        .await
        .unwrap();
    assert!(identity_of_pem(&again.cert_pem).unwrap().identity.epoch >= 1);
    let ch = one.channel(&mtls(&again));
    join_node(ch.clone(), "n2", "198.18.0.2").await.unwrap();
    heartbeat(ch, "n2").await.unwrap();
    one.shutdown().await;
}
