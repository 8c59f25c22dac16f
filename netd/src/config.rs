//! netd's configuration: raw (flags and an optional TOML file, unknown keys refused) →
//! validated [`NetdConfig`]. Defaults live here and nowhere else. Nothing reads or changes the
//! process environment.

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::time::Duration;

use ipnet::Ipv4Net;
use serde::Deserialize;
use swarmnet_model::NodeId;

/// Where netd's intent comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IntentSource {
    /// A cluster intent file (JSON, see docs/intent-format.md), watched for changes.
    File(PathBuf),
    /// The orchestrator's assignment stream (see `assign.rs`): any of these managers
    /// (`host:port`), joined with this token.
    Managers {
        addrs: Vec<String>,
        join_token: String,
    },
}

/// Which load balancer implements service VIPs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum LbChoice {
    /// IPVS where the kernel has it, nftables otherwise.
    Auto,
    Nftables,
    Ipvs,
    Ebpf,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    Text,
    Json,
}

/// The validated configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetdConfig {
    pub node_id: NodeId,
    pub intent: IntentSource,
    /// If set, must equal this node's address in the intent (a guard against a mixed-up file).
    pub advertise_addr: Option<Ipv4Addr>,
    pub run_dir: PathBuf,
    pub vxlan_port: u16,
    pub full_reconcile_interval: Duration,
    pub gw_subnet: Ipv4Net,
    /// cgroup2 directory for this node's tasks; found from the cgroup2 mount when unset.
    pub cgroup_dir: Option<PathBuf>,
    pub stop_grace: Duration,
    /// `PATH` of task processes and health checks unless their environment sets one.
    pub task_path: String,
    pub log_format: LogFormat,
    /// Upstream resolvers for names outside the cluster; `None`: the node's /etc/resolv.conf.
    pub dns_upstreams: Option<Vec<std::net::SocketAddr>>,
    /// TTL of cluster answers, seconds. Short, so a changed DNSRR set does not linger.
    pub dns_ttl: u32,
    /// What sandboxes on internal networks get for names outside the cluster.
    pub dns_internal_answer: crate::dns::DenyAnswer,
    /// CPUs the resolver's threads are pinned to (bit i = CPU i); 0: not pinned. The
    /// resolver's threads do nothing else, and no other netd thread is pinned there.
    pub dns_cpu_mask: u64,
    pub lb: LbChoice,
    /// Idle timeouts of load-balanced connections; `None` keeps the kernel's (TCP 5 days).
    pub lb_timeouts: Option<crate::lb::IdleTimeouts>,
    /// Gossip of endpoint tables; `None` (no key file configured): intent alone.
    pub gossip: Option<GossipSettings>,
}

/// Gossip settings (issue 6). Seeds are the other nodes' addresses from the intent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GossipSettings {
    /// The keyring file (current key + accepted keys), re-read when it changes.
    pub key_file: PathBuf,
    /// UDP port, bound on this node's advertise address.
    pub port: u16,
    /// A stopped node's endpoints leave DNS, the LBs and the FDBs within this time.
    pub liveness_bound: Duration,
    /// Time between gossip rounds.
    pub interval: Duration,
}

pub const DEFAULT_GOSSIP_PORT: u16 = 7946;
/// The gossip key file under the run directory when the managers provide the keyring.
pub const MANAGED_GOSSIP_KEY_FILE: &str = "gossip-keys.toml";
pub const DEFAULT_GOSSIP_LIVENESS_BOUND: Duration = Duration::from_secs(10);
pub const DEFAULT_GOSSIP_INTERVAL: Duration = Duration::from_millis(500);

pub const DEFAULT_DNS_TTL: u32 = 5;

/// `1`, `0,2`, `2-3,6` → a CPU bit mask (CPUs 0..63).
fn parse_cpu_list(list: &str) -> Result<u64, String> {
    let bad = |m: String| format!("{m}; expected a CPU list like 1 or 2-3,6 (CPUs 0..63)");
    let cpu = |t: &str| -> Result<u32, String> {
        t.trim()
            .parse::<u32>()
            .ok()
            .filter(|c| *c < 64)
            .ok_or_else(|| bad(format!("{t:?} is not a CPU number")))
    };
    let mut mask = 0u64;
    for part in list.split(',') {
        let (lo, hi) = match part.split_once('-') {
            Some((a, b)) => (cpu(a)?, cpu(b)?),
            None => (cpu(part)?, cpu(part)?),
        };
        if lo > hi {
            return Err(bad(format!("{part:?} is an empty range")));
        }
        for c in lo..=hi {
            mask |= 1 << c;
        }
    }
    Ok(mask)
}

pub const DEFAULT_RUN_DIR: &str = "/run/swarmnet";
pub const DEFAULT_VXLAN_PORT: u16 = 4789;
pub const DEFAULT_FULL_RECONCILE: Duration = Duration::from_secs(30);
pub const DEFAULT_GW_SUBNET: &str = "172.30.0.0/16";
pub const DEFAULT_STOP_GRACE: Duration = Duration::from_secs(10);

/// The raw form, as the TOML file or the flags give it. Every field is optional here; flags win
/// over the file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    pub node_id: Option<String>,
    pub intent_file: Option<PathBuf>,
    /// Comma-separated `host:port` of managers; with it, intent comes from the orchestrator.
    pub managers: Option<String>,
    pub join_token: Option<String>,
    pub advertise_addr: Option<Ipv4Addr>,
    pub run_dir: Option<PathBuf>,
    pub vxlan_port: Option<u16>,
    pub full_reconcile_interval: Option<String>,
    pub gw_subnet: Option<String>,
    pub cgroup_dir: Option<PathBuf>,
    pub stop_grace: Option<String>,
    /// Colon-separated absolute directories.
    pub task_path: Option<String>,
    pub log_format: Option<LogFormat>,
    /// Comma-separated `ip[:port]` list, or `none` to forward nothing.
    pub dns_upstreams: Option<String>,
    pub dns_ttl: Option<u32>,
    /// `refused` or `nxdomain`.
    pub dns_internal_answer: Option<String>,
    /// CPU list for the resolver's threads, e.g. `1` or `2-3,6`.
    pub dns_cpus: Option<String>,
    pub lb: Option<LbChoice>,
    /// e.g. `2h`; established TCP connections through a VIP idle this long are forgotten.
    pub lb_tcp_idle_timeout: Option<String>,
    /// e.g. `120s`; UDP flows through a VIP idle this long are forgotten.
    pub lb_udp_idle_timeout: Option<String>,
    /// Enables gossip: the keyring file (TOML: `current` and `[[keys]]` with `id`, `secret`).
    pub gossip_key_file: Option<PathBuf>,
    pub gossip_port: Option<u16>,
    /// e.g. `10s`.
    pub gossip_liveness_bound: Option<String>,
    /// e.g. `500ms`.
    pub gossip_interval: Option<String>,
}

impl RawConfig {
    /// Fields set in `over` replace ours.
    pub fn overlay(self, over: RawConfig) -> RawConfig {
        RawConfig {
            node_id: over.node_id.or(self.node_id),
            intent_file: over.intent_file.or(self.intent_file),
            managers: over.managers.or(self.managers),
            join_token: over.join_token.or(self.join_token),
            advertise_addr: over.advertise_addr.or(self.advertise_addr),
            run_dir: over.run_dir.or(self.run_dir),
            vxlan_port: over.vxlan_port.or(self.vxlan_port),
            full_reconcile_interval: over
                .full_reconcile_interval
                .or(self.full_reconcile_interval),
            gw_subnet: over.gw_subnet.or(self.gw_subnet),
            cgroup_dir: over.cgroup_dir.or(self.cgroup_dir),
            stop_grace: over.stop_grace.or(self.stop_grace),
            task_path: over.task_path.or(self.task_path),
            log_format: over.log_format.or(self.log_format),
            dns_upstreams: over.dns_upstreams.or(self.dns_upstreams),
            dns_ttl: over.dns_ttl.or(self.dns_ttl),
            dns_internal_answer: over.dns_internal_answer.or(self.dns_internal_answer),
            dns_cpus: over.dns_cpus.or(self.dns_cpus),
            lb: over.lb.or(self.lb),
            lb_tcp_idle_timeout: over.lb_tcp_idle_timeout.or(self.lb_tcp_idle_timeout),
            lb_udp_idle_timeout: over.lb_udp_idle_timeout.or(self.lb_udp_idle_timeout),
            gossip_key_file: over.gossip_key_file.or(self.gossip_key_file),
            gossip_port: over.gossip_port.or(self.gossip_port),
            gossip_liveness_bound: over.gossip_liveness_bound.or(self.gossip_liveness_bound),
            gossip_interval: over.gossip_interval.or(self.gossip_interval),
        }
    }

    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError {
            field: "config file",
            message: e.to_string(),
        })
    }

    pub fn validate(self) -> Result<NetdConfig, ConfigError> {
        let err = |field: &'static str, message: String| ConfigError { field, message };
        let gossip = self.gossip_settings()?;
        let node_id = self
            .node_id
            .ok_or_else(|| err("node_id", "is required (--node-id)".into()))?;
        let node_id = NodeId::new(node_id).map_err(|e| err("node_id", e.to_string()))?;
        let intent = match (self.intent_file, self.managers) {
            (Some(_), Some(_)) => {
                return Err(err(
                    "managers",
                    "give either --intent FILE or --managers, not both".into(),
                ));
            }
            (Some(f), None) => IntentSource::File(f),
            (None, Some(m)) => {
                let addrs: Vec<String> = m
                    .split(',')
                    .map(str::trim)
                    .filter(|a| !a.is_empty())
                    .map(String::from)
                    .collect();
                if addrs.is_empty() {
                    return Err(err("managers", "lists no address".into()));
                }
                let join_token = self.join_token.clone().ok_or_else(|| {
                    err(
                        "join_token",
                        "is required with --managers (--join-token)".into(),
                    )
                })?;
                if self.advertise_addr.is_none() {
                    return Err(err(
                        "advertise_addr",
                        "is required with --managers: it is the address the node joins with".into(),
                    ));
                }
                IntentSource::Managers { addrs, join_token }
            }
            (None, None) => {
                return Err(err(
                    "intent_file",
                    "is required (--intent FILE), unless --managers is given".into(),
                ));
            }
        };
        let vxlan_port = self.vxlan_port.unwrap_or(DEFAULT_VXLAN_PORT);
        if vxlan_port == 0 {
            return Err(err("vxlan_port", "must not be 0".into()));
        }
        let full_reconcile_interval = match self.full_reconcile_interval {
            Some(s) => parse_duration(&s).map_err(|m| err("full_reconcile_interval", m))?,
            None => DEFAULT_FULL_RECONCILE,
        };
        if full_reconcile_interval < Duration::from_millis(100) {
            return Err(err(
                "full_reconcile_interval",
                "must be at least 100ms".into(),
            ));
        }
        let gw_subnet: Ipv4Net = self
            .gw_subnet
            .as_deref()
            .unwrap_or(DEFAULT_GW_SUBNET)
            .parse()
            .map_err(|e| {
                err(
                    "gw_subnet",
                    format!("{e}; expected a CIDR like 172.30.0.0/16"),
                )
            })?;
        if gw_subnet.prefix_len() > 29 {
            return Err(err(
                "gw_subnet",
                format!("{gw_subnet} is too small; use a /29 or larger"),
            ));
        }
        let task_path = match self.task_path {
            None => crate::linux::process::DEFAULT_TASK_PATH.to_string(),
            Some(p) => {
                if let Some(bad) = p.split(':').find(|d| !d.starts_with('/')) {
                    return Err(err(
                        "task_path",
                        format!(
                            "{bad:?} is not an absolute directory: give colon-separated absolute \
                             directories, e.g. /opt/app/bin:/usr/bin:/bin"
                        ),
                    ));
                }
                p
            }
        };
        let stop_grace = match self.stop_grace {
            Some(s) => parse_duration(&s).map_err(|m| err("stop_grace", m))?,
            None => DEFAULT_STOP_GRACE,
        };
        let dns_upstreams = match self.dns_upstreams.as_deref().map(str::trim) {
            None => None,
            Some("none") | Some("") => Some(Vec::new()),
            Some(list) => Some(
                list.split(',')
                    .map(|u| parse_upstream(u.trim()))
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|m| err("dns_upstreams", m))?,
            ),
        };
        let dns_internal_answer = match self.dns_internal_answer.as_deref() {
            None | Some("refused") => crate::dns::DenyAnswer::Refused,
            Some("nxdomain") => crate::dns::DenyAnswer::NxDomain,
            Some(other) => {
                return Err(err(
                    "dns_internal_answer",
                    format!("{other:?} is not refused or nxdomain"),
                ));
            }
        };
        let dns_cpu_mask = match self.dns_cpus.as_deref() {
            None => 0,
            Some(list) => parse_cpu_list(list).map_err(|m| err("dns_cpus", m))?,
        };
        let idle = |v: Option<String>, field: &'static str, default: Duration| match v {
            Some(s) => parse_duration(&s).map_err(|m| err(field, m)),
            None => Ok(default),
        };
        let lb_timeouts =
            if self.lb_tcp_idle_timeout.is_none() && self.lb_udp_idle_timeout.is_none() {
                None
            } else {
                // The one not given keeps the kernel's default.
                Some(crate::lb::IdleTimeouts {
                    tcp_established: idle(
                        self.lb_tcp_idle_timeout,
                        "lb_tcp_idle_timeout",
                        Duration::from_secs(432_000),
                    )?,
                    udp_stream: idle(
                        self.lb_udp_idle_timeout,
                        "lb_udp_idle_timeout",
                        Duration::from_secs(120),
                    )?,
                })
            };
        Ok(NetdConfig {
            node_id,
            intent,
            advertise_addr: self.advertise_addr,
            run_dir: self
                .run_dir
                .unwrap_or_else(|| PathBuf::from(DEFAULT_RUN_DIR)),
            vxlan_port,
            full_reconcile_interval,
            gw_subnet: gw_subnet.trunc(),
            cgroup_dir: self.cgroup_dir,
            stop_grace,
            task_path,
            log_format: self.log_format.unwrap_or(LogFormat::Text),
            dns_upstreams,
            dns_ttl: self.dns_ttl.unwrap_or(DEFAULT_DNS_TTL),
            dns_internal_answer,
            dns_cpu_mask,
            lb: self.lb.unwrap_or(LbChoice::Auto),
            lb_timeouts,
            gossip,
        })
    }

    fn gossip_settings(&self) -> Result<Option<GossipSettings>, ConfigError> {
        let err = |field: &'static str, message: String| ConfigError { field, message };
        // With managers, gossip is on by default: they distribute the keyring, and netd writes
        // it to this file (see assign.rs).
        let managed = self.managers.is_some().then(|| {
            self.run_dir
                .clone()
                .unwrap_or_else(|| PathBuf::from(DEFAULT_RUN_DIR))
                .join(MANAGED_GOSSIP_KEY_FILE)
        });
        let Some(key_file) = self.gossip_key_file.clone().or(managed) else {
            for (set, field) in [
                (self.gossip_port.is_some(), "gossip_port"),
                (
                    self.gossip_liveness_bound.is_some(),
                    "gossip_liveness_bound",
                ),
                (self.gossip_interval.is_some(), "gossip_interval"),
            ] {
                if set {
                    return Err(err(
                        field,
                        "is set but gossip is off; gossip needs --gossip-key-file".into(),
                    ));
                }
            }
            return Ok(None);
        };
        let port = self.gossip_port.unwrap_or(DEFAULT_GOSSIP_PORT);
        if port == 0 {
            return Err(err("gossip_port", "must not be 0".into()));
        }
        let dur = |v: &Option<String>, field: &'static str, default: Duration| match v {
            Some(s) => parse_duration(s).map_err(|m| err(field, m)),
            None => Ok(default),
        };
        let liveness_bound = dur(
            &self.gossip_liveness_bound,
            "gossip_liveness_bound",
            DEFAULT_GOSSIP_LIVENESS_BOUND,
        )?;
        let interval = dur(
            &self.gossip_interval,
            "gossip_interval",
            DEFAULT_GOSSIP_INTERVAL,
        )?;
        if interval < Duration::from_millis(10) {
            return Err(err("gossip_interval", "must be at least 10ms".into()));
        }
        // The failure detector needs several heartbeats within the bound to tell a slow node
        // from a dead one (see gossip::chitchat_config).
        if liveness_bound < 6 * interval {
            return Err(err(
                "gossip_liveness_bound",
                format!(
                    "{liveness_bound:?} is under 6 gossip intervals ({interval:?}); raise it or lower --gossip-interval"
                ),
            ));
        }
        Ok(Some(GossipSettings {
            key_file,
            port,
            liveness_bound,
            interval,
        }))
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("config: {field} {message}")]
pub struct ConfigError {
    pub field: &'static str,
    pub message: String,
}

/// `1.2.3.4` (port 53) or `1.2.3.4:5353`.
fn parse_upstream(s: &str) -> Result<std::net::SocketAddr, String> {
    if let Ok(ip) = s.parse::<std::net::IpAddr>() {
        return Ok(std::net::SocketAddr::new(ip, 53));
    }
    s.parse()
        .map_err(|_e| format!("{s:?} is not an address like 192.0.2.53 or 192.0.2.53:5353"))
}

/// Parses `500ms`, `2s`, `5m`, `1h`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_e| format!("{s:?} is not a duration like 500ms, 2s or 5m"))?;
    let d = match unit {
        "ms" => Duration::from_millis(n),
        "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n * 60),
        "h" => Duration::from_secs(n * 3600),
        _ => return Err(format!("{s:?} has unit {unit:?}; use ms, s, m or h")),
    };
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> RawConfig {
        RawConfig {
            node_id: Some("n1".into()),
            intent_file: Some("/x.json".into()),
            ..Default::default()
        }
    }

    #[test]
    fn defaults_in_one_place() {
        let c = base().validate().unwrap();
        assert_eq!(c.vxlan_port, 4789);
        assert_eq!(c.full_reconcile_interval, Duration::from_secs(30));
        assert_eq!(c.run_dir, PathBuf::from("/run/swarmnet"));
        assert_eq!(c.gw_subnet.to_string(), "172.30.0.0/16");
        assert_eq!(c.gossip, None, "gossip is off without a key file");
        assert_eq!(
            c.task_path,
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
        );
        for bad in ["", "bin:/usr/bin", "/usr/bin::/bin"] {
            let e = RawConfig {
                task_path: Some(bad.into()),
                ..base()
            }
            .validate()
            .unwrap_err();
            assert_eq!(e.field, "task_path", "{bad:?}");
        }
        let g = RawConfig {
            gossip_key_file: Some("/k.toml".into()),
            ..base()
        }
        .validate()
        .unwrap()
        .gossip
        .unwrap();
        assert_eq!(g.port, 7946);
        assert_eq!(g.liveness_bound, Duration::from_secs(10));
        assert_eq!(g.interval, Duration::from_millis(500));
    }

    #[test]
    fn gossip_settings_are_checked() {
        let e = RawConfig {
            gossip_port: Some(7000),
            ..base()
        }
        .validate()
        .unwrap_err();
        assert_eq!(e.field, "gossip_port");
        let e = RawConfig {
            gossip_key_file: Some("/k.toml".into()),
            gossip_liveness_bound: Some("1s".into()),
            gossip_interval: Some("500ms".into()),
            ..base()
        }
        .validate()
        .unwrap_err();
        assert_eq!(e.field, "gossip_liveness_bound");
        let file = RawConfig::from_toml(
            "node_id = \"n1\"\nintent_file = \"/a\"\ngossip_key_file = \"/k\"\ngossip_liveness_bound = \"4s\"\ngossip_interval = \"200ms\"\n",
        )
        .unwrap();
        let g = file.validate().unwrap().gossip.unwrap();
        assert_eq!(
            (g.liveness_bound, g.interval),
            (Duration::from_secs(4), Duration::from_millis(200))
        );
    }

    #[test]
    fn strict_file_and_flags_override() {
        let e = RawConfig::from_toml("node_id = \"n1\"\nvxlan_prot = 1\n").unwrap_err();
        assert!(e.to_string().contains("unknown field `vxlan_prot`"), "{e}");
        let file =
            RawConfig::from_toml("node_id = \"n1\"\nintent_file = \"/a\"\nvxlan_port = 4790\n")
                .unwrap();
        let c = file
            .overlay(RawConfig {
                vxlan_port: Some(4800),
                ..Default::default()
            })
            .validate()
            .unwrap();
        assert_eq!(c.vxlan_port, 4800);
    }

    #[test]
    fn managers_need_a_token_and_an_address_and_exclude_the_file() {
        let m = RawConfig {
            intent_file: None,
            managers: Some("10.0.0.1:4242, 10.0.0.2:4242".into()),
            ..base()
        };
        assert_eq!(m.clone().validate().unwrap_err().field, "join_token");
        let m = RawConfig {
            join_token: Some("SWMTKN-1-x".into()),
            ..m
        };
        assert_eq!(m.clone().validate().unwrap_err().field, "advertise_addr");
        let m = RawConfig {
            advertise_addr: Some("198.18.0.1".parse().unwrap()),
            ..m
        };
        assert_eq!(
            m.clone().validate().unwrap().intent,
            IntentSource::Managers {
                addrs: vec!["10.0.0.1:4242".into(), "10.0.0.2:4242".into()],
                join_token: "SWMTKN-1-x".into()
            }
        );
        let both = RawConfig {
            intent_file: Some("/x.json".into()),
            ..m
        };
        assert_eq!(both.validate().unwrap_err().field, "managers");
    }

    #[test]
    fn bad_values_name_the_field() {
        let e = RawConfig {
            full_reconcile_interval: Some("5 parsecs".into()),
            ..base()
        }
        .validate()
        .unwrap_err();
        assert_eq!(e.field, "full_reconcile_interval");
        let e = RawConfig {
            gw_subnet: Some("172.30.0.0/30".into()),
            ..base()
        }
        .validate()
        .unwrap_err();
        assert_eq!(e.field, "gw_subnet");
        let e = RawConfig {
            node_id: Some("N 1".into()),
            ..base()
        }
        .validate()
        .unwrap_err();
        assert_eq!(e.field, "node_id");
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        let e = RawConfig {
            dns_upstreams: Some("1.2.3.4,nope".into()),
            ..base()
        }
        .validate()
        .unwrap_err();
        assert_eq!(e.field, "dns_upstreams");
        let c = RawConfig {
            dns_upstreams: Some("198.18.0.9, 198.18.0.10:5353".into()),
            ..base()
        }
        .validate()
        .unwrap();
        assert_eq!(c.dns_upstreams.unwrap()[1].to_string(), "198.18.0.10:5353");
        let c = RawConfig {
            dns_upstreams: Some("none".into()),
            ..base()
        }
        .validate()
        .unwrap();
        assert_eq!(c.dns_upstreams, Some(vec![]));
        let c = RawConfig {
            dns_cpus: Some("1,4-5".into()),
            ..base()
        }
        .validate()
        .unwrap();
        assert_eq!(c.dns_cpu_mask, 0b11_0010);
        for bad in ["", "64", "3-1", "x"] {
            let e = RawConfig {
                dns_cpus: Some(bad.into()),
                ..base()
            }
            .validate()
            .unwrap_err();
            assert_eq!(e.field, "dns_cpus", "{bad:?}");
        }
    }
}
