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
}
