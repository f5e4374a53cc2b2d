//! Named fault-injection points for the fault tests, the way ClickHouse's `FailPoint`
//! lets its integration tests hit a race on purpose instead of hoping for it. A point is
//! armed by listing its name in `RTABLE_FAILPOINTS` (comma-separated) when the process
//! starts, and fires once. With the variable unset (production) nothing fires.

use std::collections::HashSet;
use std::sync::{Mutex, OnceLock};

/// After a commit multi succeeds, the committer acts as if its reply was lost when the
/// session ended: it waits for the next session and resolves the outcome from
/// `replicas/<me>/parts/<part>` like any lost reply.
pub const COMMIT_REPLY_LOST: &str = "commit_reply_lost";

/// After a fetched part is installed locally, the process dies before
/// `replicas/<me>/parts/<part>` is created (a crash in that gap).
pub const CRASH_BEFORE_RECORDING_FETCH: &str = "crash_before_recording_fetch";

/// A peer's fsync of a copy handed off to it fails (a disk that refuses it) after the
/// copy was verified and answered: the inserter's commit records the copy regardless.
pub const HANDOFF_FSYNC_FAILS: &str = "handoff_fsync_fails";

/// The queue executor panics once at its start, so a test sees the supervisor report it
/// (`/readyz`, `rtable_task_restarts_total`) and restart it.
pub const EXECUTOR_PANICS: &str = "executor_panics";

/// `None` when nothing is armed (production): then `fire` costs a load, no lock, on the
/// commit path it sits on.
fn armed() -> Option<&'static Mutex<HashSet<String>>> {
    static ARMED: OnceLock<Option<Mutex<HashSet<String>>>> = OnceLock::new();
    ARMED
        .get_or_init(|| {
            let set = parse(&std::env::var("RTABLE_FAILPOINTS").unwrap_or_default());
            (!set.is_empty()).then(|| Mutex::new(set))
        })
        .as_ref()
}

fn parse(spec: &str) -> HashSet<String> {
    spec.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect()
}

/// The failpoints still armed, sorted (logged at start, so a test's log shows them).
pub fn armed_names() -> Vec<String> {
    let mut names: Vec<String> = match armed().map(Mutex::lock) {
        Some(Ok(set)) => set.iter().cloned().collect(),
        _ => Vec::new(),
    };
    names.sort();
    names
}

/// True once for an armed point, then never again.
pub fn fire(name: &str) -> bool {
    match armed().map(Mutex::lock) {
        Some(Ok(mut set)) => set.remove(name),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_spec_lists_names_and_ignores_blanks() {
        let set = parse(" commit_reply_lost, ,other ");
        assert_eq!(set.len(), 2);
        assert!(set.contains(COMMIT_REPLY_LOST) && set.contains("other"));
        assert!(parse("").is_empty());
    }
}
