//! Provider failures through the whole engine: retries, dead letters, and the summary's
//! invariant `eligible = delivered + dead_lettered + unreachable`.

mod common;

use std::collections::BTreeSet;

use common::*;

const JOB: &str = r#"[inputs]
users = "synthetic:5000:9"

[engine]
batch_max_messages = 40
now = "2026-03-02T00:00:00Z"

[store]
url = "file:store"

[provider]
url = "mock:fail=0.3,permanent=0.05,latency=1ms"
concurrency = 200
max_attempts = 3
dead_letter = "dead.jsonl"

[[campaign]]
id = "all"
kind = "promotion"
start = "2026-03-01T00:00:00Z"
end = "2026-03-08T00:00:00Z"
body = "Hi {user.id}"
"#;

#[test]
fn failed_messages_are_retried_then_dead_lettered_once() {
    let s = Scratch::new();
    s.write("job.toml", JOB);
    s.fanout_ok(&[
        "run",
        "job.toml",
        "-w",
        "2",
        "--quiet",
        "--summary",
        "first.json",
    ]);
    let first = read_summary(&s.path("first.json"));
    let line = campaign_line(&first, "all");
    assert_eq!(line["eligible"], 5000);
    let dead_count = line["dead_lettered"].as_u64().unwrap();
    // P(dead) = 1 - P(delivered within 3 attempts) = 1 - 0.65 (1 + 0.3 + 0.09) ≈ 0.0965.
    assert!(
        (300..700).contains(&dead_count),
        "{dead_count} dead letters"
    );

    let text = std::fs::read_to_string(s.path("dead.jsonl")).unwrap();
    let mut users = BTreeSet::new();
    for l in text.lines() {
        let v: serde_json::Value = serde_json::from_str(l).unwrap();
        let user = v["user"].as_u64().unwrap();
        assert!((1..=5000).contains(&user));
        assert!(users.insert(user), "user {user} dead-lettered twice");
        assert_eq!(v["key"], format!("all:{user}"));
        assert_eq!(v["body"], format!("Hi {user}"));
        assert!(v["error"].as_str().unwrap().starts_with("mock:"));
        let attempts = v["attempts"].as_u64().unwrap();
        assert!((1..=3).contains(&attempts));
        if v["error"].as_str().unwrap().contains("transient") {
            assert_eq!(attempts, 3, "a transient failure is retried to the limit");
        }
    }
    assert_eq!(users.len() as u64, dead_count);

    // Dead letters are marked in the store: a re-run resends nothing.
    s.fanout_ok(&[
        "run",
        "job.toml",
        "-w",
        "2",
        "--quiet",
        "--summary",
        "second.json",
    ]);
    let second = read_summary(&s.path("second.json"));
    let line = campaign_line(&second, "all");
    assert_eq!(line["eligible"], 0);
    assert_eq!(line["already_granted"], 5000);
    assert_eq!(
        std::fs::read_to_string(s.path("dead.jsonl"))
            .unwrap()
            .lines()
            .count() as u64,
        dead_count
    );

    // `plan` tells the dead letters apart from the deliveries.
    let out = s.fanout(&["plan", "job.toml"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let plan = String::from_utf8_lossy(&out.stdout);
    let header: Vec<&str> = plan.lines().next().unwrap().split_whitespace().collect();
    let row: Vec<&str> = plan
        .lines()
        .find(|l| l.starts_with("all "))
        .unwrap()
        .split_whitespace()
        .collect();
    let column = |name: &str| row[header.iter().position(|h| *h == name).unwrap()];
    assert_eq!(column("dead"), users.len().to_string(), "{plan}");
    assert_eq!(column("granted"), "5000", "{plan}");
}

/// A provider nobody listens on: exit 1 within seconds naming the cause, nobody dead-lettered;
/// a re-run with a working provider delivers every user exactly once.
#[test]
fn a_refused_provider_stops_the_run_and_a_rerun_delivers_everyone_once() {
    let s = Scratch::new();
    s.write(
        "job.toml",
        JOB.replace(
            "mock:fail=0.3,permanent=0.05,latency=1ms",
            "http://127.0.0.1:1/push",
        ),
    );
    let started = std::time::Instant::now();
    let out = s.fanout(&["run", "job.toml", "-w", "2", "--quiet"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("Connection refused") && err.contains("not the users"),
        "{err}"
    );
    assert!(
        started.elapsed().as_secs() < 20,
        "took {:?}",
        started.elapsed()
    );
    assert!(
        !s.path("dead.jsonl").exists(),
        "something was dead-lettered"
    );

    s.fanout_ok(&[
        "run",
        "job.toml",
        "-w",
        "2",
        "--quiet",
        "--provider",
        "log:out.jsonl",
    ]);
    let recs = read_deliveries(&s.path("out.jsonl"));
    assert_eq!(recs.len(), 5000, "one delivery per user");
    assert_eq!(pairs_once(&recs).len(), 5000, "no user twice");
}

/// `log:-` piped into a reader that goes away: the broken pipe stops the run (exit 1) instead
/// of dead-lettering every later user.
#[test]
fn a_broken_pipe_on_log_stdout_is_fatal() {
    use std::io::{BufRead, BufReader};
    let s = Scratch::new();
    s.write(
        "job.toml",
        JOB.replace("mock:fail=0.3,permanent=0.05,latency=1ms", "log:-"),
    );
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_fanout"))
        .args(["run", "job.toml", "--users", "synthetic:200000", "--quiet"])
        .current_dir(s.dir.path())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut first)
        .unwrap();
    assert!(first.contains("\"campaign\""), "{first}");
    // The reader is gone (dropped with its BufReader).
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("Broken pipe"), "{err}");
    assert!(
        !s.path("dead.jsonl").exists(),
        "something was dead-lettered"
    );
}
