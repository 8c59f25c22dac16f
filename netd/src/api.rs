//! netd's local API: a unix socket (`<run_dir>/netd.sock`, mode 0600) speaking one JSON object
//! per line each way. It is how a container runtime plugs its own namespace in (attach/detach)
//! and how operators and `swarmnet inspect` read a node's status.
//!
//! ```text
//! → {"op": "attach", "task": "web1", "netns": "/proc/4242/ns/net"}
//! ← {"ok": true}
//! → {"op": "status"}
//! ← {"ok": true, "status": {...same as status.json...}}
//! → {"op": "inspect"}
//! ← {"ok": true, "inspect": {"drift": [...], "desired": {...}, "kernel": {...}, ...}}
//! ```
//!
//! Requests are handed to the daemon loop, which owns the reconciler; the listener thread never
//! touches kernel state.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt as _;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{Sender, channel};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use swarmnet_model::TaskId;
use tracing::warn;

/// A request on the local API.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// Plug a runtime's namespace in as the sandbox of an external task of this node.
    Attach {
        task: TaskId,
        netns: PathBuf,
    },
    /// Unplug it: netd removes its interfaces; the namespace itself stays with the runtime.
    Detach {
        task: TaskId,
    },
    Status {},
    /// What the node wants beside what its kernel holds, read fresh, with the drift
    /// (`Reconciler::inspect`).
    Inspect {},
    /// The node leaves its cluster (`swarmnet cluster leave`): netd stops its tasks and removes
    /// everything it made (sandboxes, networks, bridges, rules), answers what, if anything,
    /// could not be removed, and exits.
    Leave {},
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inspect: Option<serde_json::Value>,
}

impl Response {
    pub fn ok() -> Self {
        Self {
            ok: true,
            error: None,
            status: None,
            inspect: None,
        }
    }
    pub fn error(msg: impl Into<String>) -> Self {
        Self {
            ok: false,
            error: Some(msg.into()),
            status: None,
            inspect: None,
        }
    }
}

/// A request and where to send its answer.
pub type Call = (Request, Sender<Response>);

pub fn socket_path(run_dir: &Path) -> PathBuf {
    run_dir.join("netd.sock")
}

/// Binds the socket (replacing a stale one from an earlier netd) and serves it on a thread.
pub fn serve(run_dir: &Path, calls: Sender<Call>) -> std::io::Result<()> {
    let path = socket_path(run_dir);
    match std::fs::remove_file(&path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let listener = UnixListener::bind(&path)?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    std::thread::Builder::new()
        .name("netd-api".into())
        .spawn(move || {
            for conn in listener.incoming() {
                match conn {
                    Ok(stream) => {
                        let calls = calls.clone();
                        // One thread per connection: connections are rare (a runtime, an operator).
                        let _ = std::thread::Builder::new()
                            .name("netd-api-conn".into())
                            .spawn(move || handle(stream, &calls));
                    }
                    Err(e) => warn!(error = %e, "api accept failed"),
                }
            }
        })?;
    Ok(())
}

/// How long a call waits for the daemon loop's answer.
const ANSWER_WAIT: Duration = Duration::from_secs(30);
/// The same for `leave` (the daemon gives up on its objects after 60 s).
pub const LEAVE_ANSWER_WAIT: Duration = Duration::from_secs(90);

fn handle(stream: UnixStream, calls: &Sender<Call>) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(30)));
    let Ok(mut out) = stream.try_clone() else {
        return;
    };
    let reader = BufReader::new(stream.take_limit());
    for line in reader.lines() {
        let Ok(line) = line else { return };
        if line.trim().is_empty() {
            continue;
        }
        let resp = match serde_json::from_str::<Request>(&line) {
            Ok(req) => {
                // Leaving stops every task (each within its stop grace): it may take longer.
                let wait = if req == (Request::Leave {}) {
                    LEAVE_ANSWER_WAIT
                } else {
                    ANSWER_WAIT
                };
                let (tx, rx) = channel();
                if calls.send((req, tx)).is_err() {
                    return;
                }
                rx.recv_timeout(wait).unwrap_or_else(|_timeout| {
                    Response::error(format!("netd did not answer within {}s", wait.as_secs()))
                })
            }
            Err(e) => Response::error(format!("bad request: {e}")),
        };
        let mut text = serde_json::to_string(&resp).expect("response serializes");
        text.push('\n');
        if out.write_all(text.as_bytes()).is_err() {
            return;
        }
    }
}

trait TakeLimit {
    fn take_limit(self) -> std::io::Take<UnixStream>;
}

impl TakeLimit for UnixStream {
    /// Bounds what one connection may send (1 MiB), so a runaway client cannot grow memory.
    fn take_limit(self) -> std::io::Take<UnixStream> {
        std::io::Read::take(self, 1 << 20)
    }
}

/// Client side: one request, one answer.
pub fn call(run_dir: &Path, req: &Request) -> anyhow::Result<Response> {
    use anyhow::Context as _;
    let path = socket_path(run_dir);
    let mut s = UnixStream::connect(&path).with_context(|| {
        format!(
            "connecting to netd at {} (is netd running with this --run-dir?)",
            path.display()
        )
    })?;
    let wait = if *req == (Request::Leave {}) {
        LEAVE_ANSWER_WAIT
    } else {
        ANSWER_WAIT
    };
    s.set_read_timeout(Some(wait + Duration::from_secs(5)))?;
    let mut text = serde_json::to_string(req)?;
    text.push('\n');
    s.write_all(text.as_bytes())?;
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line)?;
    serde_json::from_str(&line).with_context(|| format!("bad answer from netd: {line:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_strict() {
        let r: Request =
            serde_json::from_str(r#"{"op":"attach","task":"web1","netns":"/proc/1/ns/net"}"#)
                .unwrap();
        assert_eq!(
            r,
            Request::Attach {
                task: TaskId::new("web1").unwrap(),
                netns: "/proc/1/ns/net".into()
            }
        );
        assert!(
            serde_json::from_str::<Request>(r#"{"op":"attach","task":"Web 1","netns":"/x"}"#)
                .is_err()
        );
        assert!(serde_json::from_str::<Request>(r#"{"op":"status","extra":1}"#).is_err());
        assert!(serde_json::from_str::<Request>(r#"{"op":"reboot"}"#).is_err());
    }

    #[test]
    fn leave_is_a_request() {
        let r: Request = serde_json::from_str(r#"{"op":"leave"}"#).unwrap();
        assert_eq!(r, Request::Leave {});
        assert!(serde_json::from_str::<Request>(r#"{"op":"leave","force":true}"#).is_err());
    }

    #[test]
    fn serve_and_call_roundtrip() {
        let dir = tempfile::tempdir().unwrap();
        let (tx, rx) = channel::<Call>();
        serve(dir.path(), tx).unwrap();
        std::thread::spawn(move || {
            while let Ok((req, reply)) = rx.recv() {
                let resp = match req {
                    Request::Status {} => Response {
                        status: Some(serde_json::json!({"round": 1})),
                        ..Response::ok()
                    },
                    _ => Response::error("no"),
                };
                let _ = reply.send(resp);
            }
        });
        let r = call(dir.path(), &Request::Status {}).unwrap();
        assert!(r.ok);
        assert_eq!(r.status.unwrap()["round"], 1);
        let r = call(
            dir.path(),
            &Request::Detach {
                task: TaskId::new("x").unwrap(),
            },
        )
        .unwrap();
        assert_eq!(r.error.as_deref(), Some("no"));
    }
}
