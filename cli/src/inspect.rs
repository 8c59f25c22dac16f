//! `swarmnet inspect node|network|service|task NAME`: for one object, the intent the managers
//! hold, and on every node concerned what its netd wants (intent ⊕ gossip: the remote endpoints
//! it learned) beside what the kernel really holds (links, addresses, routes, FDB and neighbour
//! entries, LB entries), with every difference flagged as drift, the per-object reconcile status
//! and last error, and the published-port self-test. netd computes drift as the ops a full
//! reconcile round would run now (`netd/src/api.rs`, op `inspect`); this module only selects
//! what concerns the object ([`select`], pure) and renders it.

use std::collections::BTreeMap;

use serde::Serialize;
use serde_json::Value;

use crate::render::{Table, TaskView};

/// What is inspected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Node,
    Network {
        name: String,
    },
    /// A service and its tasks' ids.
    Service {
        name: String,
        tasks: Vec<String>,
    },
    Task {
        id: String,
    },
}

/// One node's view of the object.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct NodeInspect {
    pub node: String,
    /// Why netd could not be asked; the other fields are empty then.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// What netd wants for the object (from intent and gossip).
    pub desired: BTreeMap<String, Value>,
    /// What the kernel holds, by namespace (`node`, `net-<id>`, `sb-<task>`).
    pub kernel: BTreeMap<String, Value>,
    /// The ops a full round would run now: empty when the kernel matches.
    pub drift: Vec<Value>,
    /// Reconcile status per object (`ok`, or failing with the last error).
    pub status: BTreeMap<String, Value>,
    /// Published-port self-test results.
    pub published: BTreeMap<String, Value>,
    /// The embedded resolver per sandbox (task id): sockets, outside names, name → records.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub dns: BTreeMap<String, Value>,
}

/// The whole report.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Report {
    pub kind: String,
    pub name: String,
    /// The managers' record of the object.
    pub intent: Value,
    /// Its tasks (services and tasks).
    pub tasks: Vec<TaskView>,
    pub nodes: Vec<NodeInspect>,
    /// Whether any node shows drift or could not be asked.
    pub drift: bool,
}

fn objects_of(t: &Target) -> Vec<String> {
    match t {
        Target::Node => vec![],
        Target::Network { name } => vec![format!("network/{name}")],
        Target::Service { tasks, .. } => tasks.iter().map(|id| format!("sandbox/{id}")).collect(),
        Target::Task { id } => vec![format!("sandbox/{id}")],
    }
}

/// Selects from one netd `inspect` answer what concerns `target` (pure).
pub fn select(node: &str, target: &Target, inspect: &Value) -> NodeInspect {
    let objects = objects_of(target);
    let mine = |key: &str| matches!(target, Target::Node) || objects.iter().any(|o| o == key);
    let obj_map = |v: Option<&Value>| -> BTreeMap<String, Value> {
        v.and_then(Value::as_object)
            .map(|o| o.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
            .unwrap_or_default()
    };
    let kernel_all = obj_map(inspect.pointer("/kernel"));
    let desired_all = obj_map(inspect.pointer("/desired"));
    let (kernel, desired): (BTreeMap<String, Value>, BTreeMap<String, Value>) = match target {
        Target::Node => (kernel_all, desired_all),
        Target::Network { name } => {
            let d = inspect
                .pointer(&format!("/desired/networks/{name}"))
                .cloned();
            let ns = d
                .as_ref()
                .and_then(|d| d.get("netns"))
                .and_then(Value::as_str)
                .map_or_else(|| format!("net-{name}"), str::to_owned);
            (
                kernel_all.into_iter().filter(|(k, _)| *k == ns).collect(),
                d.map(|d| (name.clone(), d)).into_iter().collect(),
            )
        }
        Target::Service { .. } | Target::Task { .. } => {
            let sandboxes: Vec<String> = objects
                .iter()
                .filter_map(|o| o.strip_prefix("sandbox/"))
                .map(|id| format!("sb-{id}"))
                .collect();
            (
                kernel_all
                    .into_iter()
                    .filter(|(k, _)| sandboxes.contains(k))
                    .collect(),
                BTreeMap::new(),
            )
        }
    };
    let drift = inspect
        .pointer("/drift")
        .and_then(Value::as_array)
        .map(|d| {
            d.iter()
                .filter(|e| e.get("object").and_then(Value::as_str).is_some_and(mine))
                .cloned()
                .collect()
        })
        .unwrap_or_default();
    let status = obj_map(inspect.pointer("/status/objects"))
        .into_iter()
        .filter(|(k, _)| mine(k))
        .collect();
    let published = obj_map(inspect.pointer("/status/published"))
        .into_iter()
        .filter(|(_, v)| match target {
            Target::Node => true,
            Target::Service { name, .. } => v.get("service").and_then(Value::as_str) == Some(name),
            _ => false,
        })
        .collect();
    let dns = obj_map(inspect.pointer("/dns"))
        .into_iter()
        .filter(|(task, _)| mine(&format!("sandbox/{task}")))
        .collect();
    NodeInspect {
        node: node.to_owned(),
        error: None,
        desired,
        kernel,
        drift,
        status,
        published,
        dns,
    }
}

fn compact(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// The human form.
pub fn text(r: &Report) -> String {
    let mut out = format!("{} {}\n", r.kind, r.name);
    out.push_str(&format!("intent (managers): {}\n", compact(&r.intent)));
    if !r.tasks.is_empty() {
        out.push_str("tasks:\n");
        for line in crate::render::tasks_table(&r.tasks).lines() {
            out.push_str(&format!("  {line}\n"));
        }
    }
    let mut t = Table::new(&["NODE", "DRIFT", "STATUS", "PUBLISHED"]);
    for n in &r.nodes {
        let drift = match (&n.error, n.drift.len()) {
            (Some(_), _) => "unknown".to_string(),
            (None, 0) => "none".to_string(),
            (None, 1) => "DRIFT (1 object)".to_string(),
            (None, k) => format!("DRIFT ({k} objects)"),
        };
        let status: Vec<String> = n
            .status
            .iter()
            .map(|(k, v)| {
                let state = v.get("state").map(compact).unwrap_or_default();
                match v.get("error") {
                    Some(e) => format!("{k}={state}: {}", compact(e)),
                    None => format!("{k}={state}"),
                }
            })
            .collect();
        let published: Vec<String> = n
            .published
            .iter()
            .map(|(k, v)| {
                let ok = v.get("ok").and_then(Value::as_bool) == Some(true);
                format!("{k} {}", if ok { "ok" } else { "FAILING" })
            })
            .collect();
        t.row(vec![
            n.node.clone(),
            drift,
            if let Some(e) = &n.error {
                format!("netd not reachable: {e}")
            } else if status.is_empty() {
                "-".into()
            } else {
                status.join(", ")
            },
            if published.is_empty() {
                "-".into()
            } else {
                published.join(", ")
            },
        ]);
    }
    out.push_str(&t.render());
    for n in &r.nodes {
        for d in &n.drift {
            out.push_str(&format!(
                "drift on {}: {} needs {}\n",
                n.node,
                d.get("object").map(compact).unwrap_or_default(),
                d.get("ops").map(compact).unwrap_or_default()
            ));
        }
    }
    for n in &r.nodes {
        for (ns, k) in &n.kernel {
            out.push_str(&format!("kernel on {} ({ns}):\n", n.node));
            if let Some(o) = k.as_object() {
                for (what, v) in o {
                    out.push_str(&format!("  {what}: {}\n", compact(v)));
                }
            }
        }
    }
    for n in &r.nodes {
        for (task, d) in &n.dns {
            let listen = d.get("listen").map(compact).unwrap_or_default();
            let other = d.get("other_names").map(compact).unwrap_or_default();
            out.push_str(&format!(
                "dns on {} ({task}): {listen}, other names: {other}\n",
                n.node
            ));
            if let Some(e) = d.get("error") {
                out.push_str(&format!("  {}\n", compact(e)));
            }
            if let Some(recs) = d.get("records").and_then(Value::as_object) {
                for (name, rs) in recs {
                    out.push_str(&format!("  {name}: {}\n", compact(rs)));
                }
            }
        }
    }
    out.push_str(if r.drift {
        "result: DRIFT (netd repairs it on its next full round)\n"
    } else {
        "result: no drift\n"
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn self_test_and_status_are_selected_per_service() {
        let v = serde_json::json!({
            "drift": [{"object": "sandbox/t1", "ops": ["add link"]}, {"object": "network/app", "ops": ["x"]}],
            "kernel": {"sb-t1": {"links": []}, "sb-t9": {}, "net-app": {}},
            "status": {
                "objects": {"sandbox/t1": {"state": "failing", "error": "EEXIST"}, "sandbox/t9": {"state": "ok"}},
                "published": {"8080/tcp": {"ok": true, "service": "web"}, "9090/tcp": {"ok": false, "service": "api"}}
            }
        });
        let t = Target::Service {
            name: "web".into(),
            tasks: vec!["t1".into()],
        };
        let n = select("n1", &t, &v);
        assert_eq!(n.drift.len(), 1);
        assert_eq!(n.kernel.keys().collect::<Vec<_>>(), ["sb-t1"]);
        assert_eq!(n.status.keys().collect::<Vec<_>>(), ["sandbox/t1"]);
        assert_eq!(n.published.keys().collect::<Vec<_>>(), ["8080/tcp"]);
        let all = select("n1", &Target::Node, &v);
        assert_eq!(
            (all.drift.len(), all.kernel.len(), all.published.len()),
            (2, 3, 2)
        );
    }
}
