//! Live progress of long commands (`lab up`, `service create` waiting for its tasks): one line per
//! step on stderr, stamped with the time since the command started, so stdout keeps only the
//! result (and stays machine-readable with `--format json`).

use std::io::Write;
use std::time::Instant;

#[derive(Debug)]
pub struct Progress {
    start: Instant,
    quiet: bool,
}

impl Progress {
    /// `quiet` drops every line (tests, or output nobody watches).
    pub fn new(quiet: bool) -> Self {
        Self {
            start: Instant::now(),
            quiet,
        }
    }

    pub fn step(&mut self, what: &str) {
        if self.quiet {
            return;
        }
        let t = self.start.elapsed().as_secs_f32();
        // Progress is best effort: a closed stderr must not fail the command.
        drop(writeln!(std::io::stderr(), "[{t:5.1}s] {what}"));
    }
}
