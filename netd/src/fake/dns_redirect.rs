//! [`FakeDnsRedirect`]: an in-memory [`DnsRedirectPort`] modelling one redirect table per
//! namespace and the namespace's ruleset generation (bumped by every change, ours or a
//! "foreign" edit made through [`FakeDnsRedirect::foreign`]), held to the same contract suite as
//! the Linux port (`netd/tests/dns_redirect_contract.rs`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use crate::dns::redirect::{DnsRedirect, DnsRedirectPort, RuleSeen};
use crate::port::{ErrorKind, PortError, PortResult};

#[derive(Debug, Default)]
struct Ns {
    /// `None`: no table. `Some(rules)`: the table with its chain's rules.
    table: Option<Vec<RuleSeen>>,
    generation: u32,
}

/// Namespaces exist once [`FakeDnsRedirect::add_netns`] made them; calls on any other path
/// fail with `NotFound`, as opening a missing namespace file does.
#[derive(Debug, Clone, Default)]
pub struct FakeDnsRedirect {
    state: Arc<Mutex<BTreeMap<PathBuf, Ns>>>,
}

/// Edits made behind the port's back, as an operator or another tool would.
#[derive(Debug, Clone)]
pub enum ForeignEdit {
    DeleteTable,
    FlushChain,
    AppendRule(RuleSeen),
}

impl FakeDnsRedirect {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn add_netns(&self, netns: &Path) {
        self.lock().entry(netns.to_path_buf()).or_default();
    }
    pub fn foreign(&self, netns: &Path, edit: ForeignEdit) {
        let mut st = self.lock();
        let Some(ns) = st.get_mut(netns) else { return };
        match edit {
            ForeignEdit::DeleteTable => ns.table = None,
            ForeignEdit::FlushChain => {
                if let Some(t) = &mut ns.table {
                    t.clear();
                }
            }
            ForeignEdit::AppendRule(r) => ns.table.get_or_insert_with(Vec::new).push(r),
        }
        ns.generation = ns.generation.wrapping_add(1);
    }
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<PathBuf, Ns>> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
    fn with<T>(
        &self,
        op: &'static str,
        netns: &Path,
        f: impl FnOnce(&mut Ns) -> T,
    ) -> PortResult<T> {
        let mut st = self.lock();
        let ns = st.get_mut(netns).ok_or_else(|| {
            PortError::new(
                op,
                format!("redirect table in {}", netns.display()),
                ErrorKind::NotFound,
                "no such network namespace",
            )
        })?;
        Ok(f(ns))
    }
}

impl DnsRedirectPort for FakeDnsRedirect {
    fn ensure(&self, netns: &Path, want: &DnsRedirect) -> PortResult<()> {
        self.with("apply", netns, |ns| {
            ns.table = Some(want.rules());
            ns.generation = ns.generation.wrapping_add(1);
        })
    }
    fn delete(&self, netns: &Path) -> PortResult<()> {
        self.with("delete", netns, |ns| {
            if ns.table.take().is_some() {
                ns.generation = ns.generation.wrapping_add(1);
            }
        })
    }
    fn read(&self, netns: &Path) -> PortResult<Option<Vec<RuleSeen>>> {
        self.with("read", netns, |ns| ns.table.clone())
    }
    fn generation(&self, netns: &Path) -> PortResult<u32> {
        self.with("read generation of", netns, |ns| ns.generation)
    }
}
