//! What read commands print, as pure functions of view types: a Docker-like table (`--format
//! table`, the default) or JSON (`--format json`, a stable, documented shape: the view types
//! serialized as they are). The views are the CLI's own, converted from the API's messages in
//! [`crate::api`], so that what users script against does not change with the wire format.
//! Every form is pinned by a golden file (`cli/tests/golden/`).

use std::collections::BTreeMap;

use serde::Serialize;

/// `--format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Default)]
pub enum Format {
    #[default]
    Table,
    Json,
}

/// A text table: upper-case headers, columns left-aligned and separated by three spaces, no
/// trailing blanks.
#[derive(Debug, Clone, Default)]
pub struct Table {
    headers: Vec<&'static str>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(headers: &[&'static str]) -> Self {
        Self {
            headers: headers.to_vec(),
            rows: Vec::new(),
        }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        debug_assert_eq!(cells.len(), self.headers.len());
        self.rows.push(cells);
    }

    pub fn render(&self) -> String {
        let n = self.headers.len();
        let mut widths: Vec<usize> = self.headers.iter().map(|h| h.chars().count()).collect();
        for r in &self.rows {
            for (w, c) in widths.iter_mut().zip(r) {
                *w = (*w).max(c.chars().count());
            }
        }
        let mut out = String::new();
        let header: Vec<String> = self.headers.iter().map(|h| h.to_string()).collect();
        for cells in std::iter::once(&header).chain(&self.rows) {
            let mut line = String::new();
            for (i, c) in cells.iter().enumerate() {
                line.push_str(c);
                if i + 1 < n {
                    let pad = widths[i] - c.chars().count() + 3;
                    line.extend(std::iter::repeat_n(' ', pad));
                }
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }
}

/// Renders `value` as pretty JSON with a final newline.
pub fn json<T: Serialize + ?Sized>(value: &T) -> String {
    let mut s = serde_json::to_string_pretty(value).expect("views serialize");
    s.push('\n');
    s
}

fn or_dash(s: &str) -> String {
    if s.is_empty() { "-".into() } else { s.into() }
}

// ---------------------------------------------------------------------------------- views

/// One node, as `node ls` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NodeView {
    pub id: String,
    pub hostname: String,
    /// Underlay (advertise) address.
    pub addr: String,
    pub role: String,
    pub availability: String,
    /// "ready" | "down".
    pub status: String,
    /// For managers: "leader" | "reachable" | "unreachable"; empty for workers.
    pub manager_status: String,
    pub labels: BTreeMap<String, String>,
}

pub fn nodes_table(nodes: &[NodeView]) -> String {
    let mut t = Table::new(&[
        "ID",
        "HOSTNAME",
        "ADDRESS",
        "STATUS",
        "AVAILABILITY",
        "MANAGER STATUS",
        "LABELS",
    ]);
    for n in nodes {
        let labels: Vec<String> = n.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        t.row(vec![
            n.id.clone(),
            n.hostname.clone(),
            n.addr.clone(),
            n.status.clone(),
            n.availability.clone(),
            n.manager_status.clone(),
            labels.join(","),
        ]);
    }
    t.render()
}

/// One network.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NetworkView {
    pub name: String,
    pub subnet: String,
    pub gateway: String,
    pub vni: u32,
    pub mtu: u32,
    pub internal: bool,
    pub attachable: bool,
    pub ingress: bool,
    pub addresses_in_use: u32,
    pub addresses_total: u32,
}

pub fn networks_table(nets: &[NetworkView]) -> String {
    let mut t = Table::new(&["NAME", "SUBNET", "GATEWAY", "VNI", "OPTIONS", "ADDRESSES"]);
    for n in nets {
        let opts: Vec<&str> = [
            (n.ingress, "ingress"),
            (n.internal, "internal"),
            (n.attachable, "attachable"),
        ]
        .into_iter()
        .filter_map(|(on, name)| on.then_some(name))
        .collect();
        t.row(vec![
            n.name.clone(),
            n.subnet.clone(),
            n.gateway.clone(),
            n.vni.to_string(),
            if opts.is_empty() {
                "-".into()
            } else {
                opts.join(",")
            },
            format!("{}/{}", n.addresses_in_use, n.addresses_total),
        ]);
    }
    t.render()
}

/// One port of a service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PortView {
    pub target: u32,
    /// 0 when not published.
    pub published: u32,
    pub protocol: String,
    /// "ingress" | "host".
    pub mode: String,
    /// "local" for an ingress port served by the local tasks only; absent: "cluster".
    #[serde(skip_serializing_if = "String::is_empty")]
    pub traffic_policy: String,
}

impl PortView {
    fn render(&self) -> String {
        let host = if self.mode == "host" { "host:" } else { "*:" };
        if self.published == 0 {
            format!("{}/{}", self.target, self.protocol)
        } else {
            let local = if self.traffic_policy == "local" {
                " (local)"
            } else {
                ""
            };
            format!(
                "{host}{}->{}/{}{local}",
                self.published, self.target, self.protocol
            )
        }
    }
}

/// One service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ServiceView {
    pub name: String,
    /// "replicated" | "global".
    pub mode: String,
    pub replicas_running: u32,
    pub replicas_desired: u32,
    pub endpoint_mode: String,
    pub ports: Vec<PortView>,
    /// Network name -> VIP.
    pub vips: BTreeMap<String, String>,
    pub networks: Vec<String>,
    pub argv: Vec<String>,
    /// Empty when no update ran.
    pub update_state: String,
    pub update_message: String,
}

pub fn services_table(svcs: &[ServiceView]) -> String {
    let mut t = Table::new(&["NAME", "MODE", "REPLICAS", "ENDPOINT", "PORTS", "COMMAND"]);
    for s in svcs {
        let ports: Vec<String> = s.ports.iter().map(PortView::render).collect();
        t.row(vec![
            s.name.clone(),
            s.mode.clone(),
            format!("{}/{}", s.replicas_running, s.replicas_desired),
            s.endpoint_mode.clone(),
            or_dash(&ports.join(",")),
            or_dash(&s.argv.join(" ")),
        ]);
    }
    t.render()
}

/// One task.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct TaskView {
    pub id: String,
    /// `<service>.<slot>`, what `task exec` accepts besides the id.
    pub name: String,
    pub service: String,
    pub slot: u32,
    /// Empty while pending without a node.
    pub node: String,
    pub state: String,
    /// `running`, or `shutdown` for a replaced task the service keeps in its history.
    #[serde(default = "running")]
    pub desired_state: String,
    /// `starting` | `healthy` | `unhealthy` as its node reported; empty without a check.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub health: String,
    /// Why it is pending or failed (an exit code, a failing health check, an exhausted
    /// network).
    pub message: String,
    /// Network name -> address.
    pub addresses: BTreeMap<String, String>,
}

fn running() -> String {
    "running".into()
}

pub fn tasks_table(tasks: &[TaskView]) -> String {
    let mut t = Table::new(&[
        "ID",
        "NAME",
        "NODE",
        "DESIRED",
        "STATE",
        "HEALTH",
        "ADDRESSES",
        "MESSAGE",
    ]);
    for k in tasks {
        let addrs: Vec<String> = k
            .addresses
            .iter()
            .map(|(n, a)| format!("{n}={a}"))
            .collect();
        t.row(vec![
            k.id.clone(),
            k.name.clone(),
            or_dash(&k.node),
            k.desired_state.clone(),
            k.state.clone(),
            or_dash(&k.health),
            or_dash(&addrs.join(",")),
            k.message.clone(),
        ]);
    }
    t.render()
}

/// One manager as the cluster sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ManagerView {
    pub id: u64,
    pub addr: String,
    pub voter: bool,
    /// "leader" | "reachable" | "unreachable".
    pub status: String,
}

/// The cluster (`cluster init` / `cluster info`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ClusterView {
    pub cluster_id: String,
    /// 0 when no leader is known.
    pub leader: u64,
    pub term: u64,
    pub index: u64,
    pub managers: Vec<ManagerView>,
    /// Oldest first.
    pub gossip_keys: Vec<GossipKeyView>,
    /// "" (none in progress), "distributing" or "retiring".
    pub gossip_rotation: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct GossipKeyView {
    /// The key's id (hex), never the key.
    pub id: String,
    pub primary: bool,
    /// Unix ms; 0 when unknown.
    pub created_ms: u64,
}

/// `YYYY-MM-DD HH:MM UTC` for Unix milliseconds ("-" for 0).
pub fn utc(ms: u64) -> String {
    if ms == 0 {
        return "-".into();
    }
    let secs = ms / 1000;
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    // Civil date from days since 1970-01-01 (proleptic Gregorian; H. Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02} UTC",
        rem / 3600,
        rem % 3600 / 60
    )
}

pub fn cluster_text(c: &ClusterView) -> String {
    let mut out = format!(
        "cluster {}: term {}, index {}, leader {}\n",
        c.cluster_id,
        c.term,
        c.index,
        if c.leader == 0 {
            "none".to_string()
        } else {
            c.leader.to_string()
        }
    );
    let mut t = Table::new(&["MANAGER", "ADDRESS", "VOTER", "STATUS"]);
    for m in &c.managers {
        t.row(vec![
            m.id.to_string(),
            m.addr.clone(),
            if m.voter { "yes" } else { "no" }.into(),
            m.status.clone(),
        ]);
    }
    out.push_str(&t.render());
    out.push('\n');
    out.push_str(&gossip_keys_text(c));
    out
}

/// The gossip keyring part of `cluster info` (also `cluster gossip-key`).
pub fn gossip_keys_text(c: &ClusterView) -> String {
    let mut out = String::new();
    out.push_str(&match c.gossip_rotation.as_str() {
        "" => "gossip keyring: no rotation in progress\n".to_string(),
        "distributing" => "gossip keyring: rotating, the new key is accepted and waits for every \
                           ready node to hold it\n"
            .to_string(),
        "retiring" => "gossip keyring: rotating, the new key seals and the old one goes once \
                       every ready node seals with it\n"
            .to_string(),
        other => format!("gossip keyring: rotation {other}\n"),
    });
    let mut k = Table::new(&["GOSSIP KEY", "PRIMARY", "CREATED"]);
    for key in &c.gossip_keys {
        k.row(vec![
            key.id.clone(),
            if key.primary { "yes" } else { "no" }.into(),
            utc(key.created_ms),
        ]);
    }
    out.push_str(&k.render());
    out
}

#[cfg(test)]
mod tests {
    use super::utc;

    #[test]
    fn utc_dates() {
        assert_eq!(utc(0), "-");
        assert_eq!(utc(1_000), "1970-01-01 00:00 UTC");
        // A leap day, and the last minute of a leap year.
        assert_eq!(utc(951_782_400_000), "2000-02-29 00:00 UTC");
        assert_eq!(utc(1_735_689_599_000), "2024-12-31 23:59 UTC");
    }
}
