//! [`FakeFirewall`]: an in-memory [`FirewallPort`] holding the last applied ruleset text.
//!
//! `list_table` returns exactly what was applied (the real `nft list` normalises the text; tests
//! that compare listings across implementations must not depend on formatting).

use crate::port::{FirewallPort, PortResult};

#[derive(Debug, Clone, Default)]
pub struct FakeFirewall {
    table: Option<String>,
    applies: usize,
}

impl FakeFirewall {
    pub fn new() -> Self {
        Self::default()
    }
    /// How many times a ruleset was applied (one per transaction), for tests that check a
    /// round does not rewrite an unchanged table.
    pub fn applies(&self) -> usize {
        self.applies
    }
}

impl FirewallPort for FakeFirewall {
    fn list_table(&mut self) -> PortResult<Option<String>> {
        Ok(self.table.clone())
    }
    fn apply(&mut self, ruleset: &str) -> PortResult<()> {
        self.table = Some(ruleset.to_string());
        self.applies += 1;
        Ok(())
    }
    fn delete_table(&mut self) -> PortResult<()> {
        self.table = None;
        Ok(())
    }
}
