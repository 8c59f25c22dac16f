//! Contexts, as `docker context`: a named file saying how to reach a cluster's managers. `lab up`
//! writes one for its lab and makes it current; `--context NAME` / `SWARMNET_CONTEXT` pick another.
//!
//! A manager is reached at `addr` (host:port), from inside the network namespace `netns` when set:
//! the lab's managers listen on their node's underlay address, which exists only inside the lab's
//! namespaces, so the CLI creates its connection there (see [`crate::api`]) and nothing is added to
//! the root namespace. Every connection is mTLS with the certificate in `tls_dir`.

use std::fs;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{CliError, Result};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ManagerEndpoint {
    /// The node it runs on.
    pub node: String,
    /// host:port of its gRPC API.
    pub addr: String,
    /// Namespace to connect from; absent for an address reachable from here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub netns: Option<PathBuf>,
    /// Directory with the client certificate (`node.key`, `node.crt`, `ca.crt`: an
    /// administrator certificate of the cluster CA) the CLI presents; the managers accept only
    /// mTLS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_dir: Option<PathBuf>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Context {
    pub name: String,
    /// Tried in order; the CLI fails over to the next when one does not answer.
    pub managers: Vec<ManagerEndpoint>,
    /// The lab this context belongs to, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lab: Option<String>,
}

fn path_of(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("{name}.json"))
}

impl Context {
    /// Loads `name`, or the current context when `None`.
    pub fn load(dir: &Path, name: Option<&str>) -> Result<Self> {
        let name = match name {
            Some(n) => n.to_owned(),
            None => fs::read_to_string(dir.join("current"))
                .map(|s| s.trim().to_owned())
                .map_err(|e| CliError::NoContext {
                    why: format!("no current context in {} ({e})", dir.display()),
                })?,
        };
        let path = path_of(dir, &name);
        let text = fs::read_to_string(&path).map_err(|e| CliError::NoContext {
            why: format!("context {name:?} does not exist ({}: {e})", path.display()),
        })?;
        serde_json::from_str(&text).map_err(|e| CliError::BadContext {
            name,
            path,
            source: e.into(),
        })
    }

    /// Writes the context (the current one stays as it is).
    pub fn save(&self, dir: &Path) -> Result<()> {
        let io = |what: &str| {
            let what = format!("{what} in {}", dir.display());
            move |e| CliError::io(what, e)
        };
        fs::create_dir_all(dir).map_err(io("creating the context directory"))?;
        let text = serde_json::to_string_pretty(self).expect("contexts serialize");
        fs::write(path_of(dir, &self.name), text).map_err(io("writing the context"))
    }

    /// Writes the context and makes it current.
    pub fn save_current(&self, dir: &Path) -> Result<()> {
        let io = |what: &str| {
            let what = format!("{what} in {}", dir.display());
            move |e| CliError::io(what, e)
        };
        fs::create_dir_all(dir).map_err(io("creating the context directory"))?;
        let text = serde_json::to_string_pretty(self).expect("contexts serialize");
        fs::write(path_of(dir, &self.name), text).map_err(io("writing the context"))?;
        fs::write(dir.join("current"), &self.name).map_err(io("writing the current context"))?;
        Ok(())
    }

    /// Removes context `name` (and `current` if it pointed there). Missing is fine.
    pub fn remove(dir: &Path, name: &str) {
        drop(fs::remove_file(path_of(dir, name)));
        if fs::read_to_string(dir.join("current")).is_ok_and(|c| c.trim() == name) {
            drop(fs::remove_file(dir.join("current")));
        }
        // The directory goes with its last context.
        drop(fs::remove_dir(dir));
    }
}
