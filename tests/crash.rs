//! Kill a run with SIGKILL part-way, run it again: every eligible user delivered, none lost;
//! a user delivered twice was in flight at the kill and got the same message, same key.

mod common;

use std::collections::BTreeMap;

use common::*;

const USERS: u64 = 200_000;
const CONCURRENCY: u64 = 64;
const BATCH: u64 = 50;
const WORKERS: u64 = 2;

fn job() -> String {
    format!(
        r#"[inputs]
users = "synthetic:{USERS}:3"

[engine]
batch_max_messages = {BATCH}
now = "2026-03-02T00:00:00Z"

[store]
url = "file:store"

[provider]
url = "log:deliveries.jsonl"
concurrency = {CONCURRENCY}
rate_per_s = 40000

[[campaign]]
id = "all"
kind = "promotion"
start = "2026-03-01T00:00:00Z"
end = "2026-03-08T00:00:00Z"
body = "Hi {{user.id}} at level {{user.level}}"
"#
    )
}

fn lines_in(path: &std::path::Path) -> usize {
    std::fs::read(path)
        .map(|b| b.iter().filter(|&&c| c == b'\n').count())
        .unwrap_or(0)
}

#[test]
fn sigkill_then_rerun_loses_nothing() {
    let s = Scratch::new();
    s.write("job.toml", job());
    let deliveries = s.path("deliveries.jsonl");

    // Kill twice, each time once a good part, but not all, is out; then let a run finish.
    let mut at_kill = 0;
    for threshold in [30_000, 80_000] {
        let mut child = s.start(&["run", "job.toml", "-w", &WORKERS.to_string(), "--quiet"]);
        s.wait_for_lines("deliveries.jsonl", threshold, &mut child);
        child.kill().expect("SIGKILL");
        child.wait().unwrap();
        at_kill = lines_in(&deliveries);
        assert!(
            (at_kill as u64) < USERS,
            "killed too late to prove anything"
        );
    }

    s.fanout_ok(&[
        "run",
        "job.toml",
        "-w",
        "2",
        "--rate-per-s",
        "0",
        "--quiet",
        "--summary",
        "summary.json",
    ]);
    let summary = read_summary(&s.path("summary.json"));

    let recs = read_deliveries(&deliveries);
    let mut by_user: BTreeMap<u64, Vec<&Rec>> = BTreeMap::new();
    for r in &recs {
        by_user.entry(r.user).or_default().push(r);
    }
    // Promotion to all: the naive expectation is every id 1..=USERS.
    assert_eq!(by_user.len() as u64, USERS, "users lost");
    assert!(by_user.keys().copied().eq(1..=USERS));
    let twice: Vec<_> = by_user.values().filter(|v| v.len() > 1).collect();
    for v in &twice {
        assert_eq!(v.len(), 2, "a user was delivered more than twice");
        assert_eq!(v[0], v[1], "a re-sent message differs (key, body)");
    }
    // Only what was in flight at a kill may repeat: a message holds one of the process's
    // `concurrency` slots from its hand-off to the provider until its outcome is recorded in
    // the store, so each kill can leave at most that many written and not recorded.
    let in_flight_bound = 2 * CONCURRENCY;
    eprintln!(
        "{at_kill} lines at the kill, {} users delivered twice",
        twice.len()
    );
    assert!(
        twice.len() as u64 <= in_flight_bound,
        "{} users delivered twice, more than could be in flight ({in_flight_bound})",
        twice.len()
    );
    let line = campaign_line(&summary, "all");
    let first_run = at_kill as u64 - twice.len() as u64;
    assert_eq!(line["delivered"].as_u64().unwrap() + first_run, USERS);
}
