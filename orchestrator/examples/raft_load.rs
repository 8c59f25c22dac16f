//! Load generator for `bench/raft.sh`: N concurrent clients doing acknowledged writes for a
//! fixed time against swarmnet managers (`Services.Scale` of the client's own service,
//! alternating 1 and 2 replicas) or an etcd cluster (`KV.Put` of 256-byte values). Clients are
//! spread over the given endpoints round robin (swarmnet followers forward to the leader; etcd
//! followers do the same). Prints one JSON line: writes, errors, seconds, writes per second,
//! and the latency percentiles of the acknowledged writes.

use std::time::{Duration, Instant};

use swarmnet_orchestrator::pb;
use tonic::transport::Channel;

/// etcd's `PutRequest` / `PutResponse` (etcdserverpb, rpc.proto): only the fields used here.
#[derive(Clone, PartialEq, prost::Message)]
struct PutRequest {
    #[prost(bytes = "vec", tag = "1")]
    key: Vec<u8>,
    #[prost(bytes = "vec", tag = "2")]
    value: Vec<u8>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct PutResponse {}

async fn etcd_put(ch: &mut tonic::client::Grpc<Channel>, key: Vec<u8>, value: Vec<u8>) -> bool {
    if ch.ready().await.is_err() {
        return false;
    }
    let path = http::uri::PathAndQuery::from_static("/etcdserverpb.KV/Put");
    let codec: tonic::codec::ProstCodec<PutRequest, PutResponse> = Default::default();
    ch.unary(tonic::Request::new(PutRequest { key, value }), path, codec)
        .await
        .is_ok()
}

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

#[tokio::main(flavor = "multi_thread", worker_threads = 1)]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let target = arg(&args, "--target").unwrap_or_else(|| "swarmnet".into());
    let addrs: Vec<String> = arg(&args, "--addrs")
        .ok_or_else(|| anyhow::anyhow!("--addrs host:port,.. is required"))?
        .split(',')
        .map(String::from)
        .collect();
    let clients: usize = arg(&args, "--clients")
        .unwrap_or_else(|| "1".into())
        .parse()?;
    let seconds: f64 = arg(&args, "--seconds")
        .unwrap_or_else(|| "5".into())
        .parse()?;
    // swarmnet: mTLS with the administrator certificate in --tls-dir (the bootstrap manager's
    // `<data-dir>/tls/admin`); etcd: plaintext, as its benchmark runs.
    let channels: Vec<Channel> = if target == "swarmnet" {
        let dir = arg(&args, "--tls-dir")
            .ok_or_else(|| anyhow::anyhow!("--tls-dir DIR (the admin certificate) is required"))?;
        let tls = swarmnet_orchestrator::ca::client_config_from(std::path::Path::new(&dir))?;
        addrs
            .iter()
            .map(|a| swarmnet_orchestrator::raft::network::channel(a, &tls))
            .collect::<Result<_, _>>()?
    } else {
        addrs
            .iter()
            .map(|a| {
                Ok(tonic::transport::Endpoint::from_shared(format!("http://{a}"))?.connect_lazy())
            })
            .collect::<Result<_, tonic::transport::Error>>()?
    };
    if args.iter().any(|a| a == "--init") {
        // Create the cluster on the first manager; print the manager join token.
        let mut c = pb::cluster_client::ClusterClient::new(channels[0].clone());
        c.init(pb::InitRequest {
            node: Some(pb::JoinNodeRequest {
                id: "n1".into(),
                addr: "198.18.0.1".into(),
                role: "manager".into(),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await?;
        println!(
            "{}",
            c.join_tokens(pb::Empty {}).await?.into_inner().manager
        );
        return Ok(());
    }
    if args.iter().any(|a| a == "--wait") {
        // Wait for every manager to be a voter.
        let mut c = pb::cluster_client::ClusterClient::new(channels[0].clone());
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let info = c.info(pb::Empty {}).await?.into_inner();
            if info.managers.iter().filter(|m| m.voter).count() == addrs.len() {
                return Ok(());
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "managers did not all join: {info:?}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    if target == "swarmnet" {
        // Each client scales its own service; create them first (not timed).
        let mut s = pb::services_client::ServicesClient::new(channels[0].clone());
        for k in 0..clients {
            let _ = s
                .create(pb::ServiceSpec {
                    name: format!("bench{k}"),
                    replicas: 1,
                    argv: vec!["sleep".into(), "inf".into()],
                    ..Default::default()
                })
                .await;
        }
    }
    let end = Instant::now() + Duration::from_secs_f64(seconds);
    let started = Instant::now();
    let mut handles = Vec::new();
    for k in 0..clients {
        let ch = channels[k % channels.len()].clone();
        let target = target.clone();
        handles.push(tokio::spawn(async move {
            let (mut ok, mut err, mut lat) = (0u64, 0u64, Vec::new());
            let mut services = pb::services_client::ServicesClient::new(ch.clone());
            let mut grpc = tonic::client::Grpc::new(ch);
            let mut i = 0u64;
            while Instant::now() < end {
                i += 1;
                let t = Instant::now();
                let acked = if target == "etcd" {
                    etcd_put(
                        &mut grpc,
                        format!("bench/{k}/{i}").into_bytes(),
                        vec![b'x'; 256],
                    )
                    .await
                } else {
                    services
                        .scale(pb::ScaleRequest {
                            name: format!("bench{k}"),
                            replicas: 1 + (i % 2) as u32,
                        })
                        .await
                        .is_ok()
                };
                if acked {
                    ok += 1;
                    lat.push(t.elapsed());
                } else {
                    err += 1;
                }
            }
            (ok, err, lat)
        }));
    }
    let (mut ok, mut err, mut lat) = (0, 0, Vec::new());
    for h in handles {
        let (o, e, l) = h.await?;
        ok += o;
        err += e;
        lat.extend(l);
    }
    let secs = started.elapsed().as_secs_f64();
    lat.sort();
    let pct = |p: f64| {
        lat.get(((lat.len() as f64 * p) as usize).min(lat.len().saturating_sub(1)))
            .map(|d| d.as_secs_f64() * 1000.0)
            .unwrap_or(0.0)
    };
    println!(
        "{{\"target\":\"{target}\",\"clients\":{clients},\"writes\":{ok},\"errors\":{err},\"seconds\":{secs:.2},\"writes_per_s\":{:.0},\"p50_ms\":{:.2},\"p99_ms\":{:.2}}}",
        ok as f64 / secs,
        pct(0.5),
        pct(0.99)
    );
    Ok(())
}
