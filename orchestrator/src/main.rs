//! `swarmnet-orchestrator`: one manager. Start the first with `--bootstrap` (a one-member Raft
//! group and a new root CA; the administrator certificate lands in `<data-dir>/tls/admin/`),
//! then create the cluster with the `Cluster.Init` call; start others with
//! `--join ADDR --join-token <manager token>` (they get a manager certificate from ADDR, then
//! an existing manager adds them as voters). A restart needs neither flag. Every connection is
//! mTLS; see the `ca` module for where key material lives.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use swarmnet_orchestrator::pb;
use swarmnet_orchestrator::raft::manager::{Manager, ManagerConfig};
use swarmnet_orchestrator::{api, ca};

#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// This manager's Raft id (unique, non-zero).
    #[arg(long)]
    id: u64,
    /// Address to listen on for the gRPC API (managers, CLI and netd).
    #[arg(long, default_value = "0.0.0.0:4242")]
    listen: String,
    /// Address the others reach this manager at; defaults to --listen.
    #[arg(long)]
    advertise: Option<String>,
    /// Directory for the manager's database.
    #[arg(long)]
    data_dir: PathBuf,
    /// Start a new one-member Raft group (idempotent on restart).
    #[arg(long)]
    bootstrap: bool,
    /// Ask the manager at this address to add this one (with --join-token).
    #[arg(long, requires = "join_token")]
    join: Option<String>,
    /// The manager join token (`swarmnet cluster join-token manager`), with --join.
    #[arg(long, env = "SWARMNET_JOIN_TOKEN", hide_env_values = true)]
    join_token: Option<String>,
    /// The name in this manager's certificate (CN); default `manager-<id>`.
    #[arg(long)]
    name: Option<String>,
    /// Lifetime of the node certificates this manager issues, in seconds (renewed at half).
    #[arg(long, default_value_t = swarmnet_pki::ca::DEFAULT_NODE_LIFETIME.as_secs())]
    cert_lifetime_secs: u64,
    /// Lifetime of the administrator certificate written at bootstrap, in seconds (the CLI
    /// renews it at half its life).
    #[arg(long, env = "SWARMNET_ADMIN_CERT_LIFETIME_SECS", default_value_t = ca::ADMIN_LIFETIME.as_secs())]
    admin_cert_lifetime_secs: u64,
    #[arg(long, default_value_t = 500)]
    election_timeout_ms: u64,
    /// A node silent this long is marked down and its tasks rescheduled.
    #[arg(long, default_value_t = 5000)]
    node_down_after_ms: u64,
    /// A removed task leaves every load balancer and DNS first and is stopped this much later.
    #[arg(long, default_value_t = 3000)]
    task_stop_grace_ms: u64,
    /// The leader rotates the gossip key when it is this old, in seconds (0: only on request,
    /// `swarmnet cluster gossip-key --rotate`).
    #[arg(long, default_value_t = swarmnet_orchestrator::raft::manager::GOSSIP_KEY_ROTATION.as_secs())]
    gossip_key_rotation_secs: u64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,openraft=warn".into()),
        )
        .init();
    let args = Args::parse();
    let listener = tokio::net::TcpListener::bind(&args.listen)
        .await
        .with_context(|| format!("listening on {}", args.listen))?;
    let advertise = args.advertise.clone().unwrap_or_else(|| {
        listener
            .local_addr()
            .map(|a| a.to_string())
            .unwrap_or_default()
    });
    let mut config = ManagerConfig::new(args.id, advertise.clone(), args.data_dir.clone());
    config.election_timeout = Duration::from_millis(args.election_timeout_ms);
    config.node_down_after = Duration::from_millis(args.node_down_after_ms);
    config.cert_lifetime = Duration::from_secs(args.cert_lifetime_secs.max(1));
    let name = args
        .name
        .clone()
        .unwrap_or_else(|| format!("manager-{}", args.id));
    let credentials = if args.bootstrap {
        ca::bootstrap_with_admin(
            &args.data_dir,
            &name,
            config.cert_lifetime,
            Duration::from_secs(args.admin_cert_lifetime_secs.max(1)),
        )?
    } else if let (Some(seed), Some(token)) = (&args.join, &args.join_token) {
        ca::join(&args.data_dir, seed, token, &name).await?
    } else {
        ca::existing(&args.data_dir)?
    };
    let tls = ca::ManagerTls::new(credentials)?;
    let client_tls = tls.client.clone();
    config.task_stop_grace = Duration::from_millis(args.task_stop_grace_ms);
    config.gossip_key_rotation = (args.gossip_key_rotation_secs > 0)
        .then(|| Duration::from_secs(args.gossip_key_rotation_secs));
    let manager = Manager::start(config, tls).await?;
    if args.bootstrap {
        manager.bootstrap().await?;
    }
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(api::serve(manager.clone(), listener, async {
        let _ = stop_rx.await;
    }));
    if let Some(seed) = &args.join {
        join(seed, args.id, &advertise, &client_tls).await?;
    }
    tracing::info!(id = args.id, %advertise, "manager running");
    tokio::signal::ctrl_c()
        .await
        .context("waiting for ctrl-c")?;
    manager.shutdown().await;
    let _ = stop_tx.send(());
    server.await.context("server task")??;
    Ok(())
}

/// Asks `seed` to add this manager, retrying while the cluster elects a leader.
async fn join(
    seed: &str,
    id: u64,
    advertise: &str,
    tls: &std::sync::Arc<swarmnet_pki::rustls::ClientConfig>,
) -> anyhow::Result<()> {
    let mut last = String::new();
    for _ in 0..60 {
        match swarmnet_orchestrator::raft::network::channel(seed, tls) {
            Ok(ch) => match pb::cluster_client::ClusterClient::new(ch)
                .add_manager(pb::AddManagerRequest {
                    id,
                    addr: advertise.to_string(),
                })
                .await
            {
                Ok(_) => return Ok(()),
                Err(s) => last = s.message().to_string(),
            },
            Err(e) => last = e.to_string(),
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    anyhow::bail!("could not join through {seed}: {last}")
}
