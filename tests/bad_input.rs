//! Bad input: exit 2, a message naming file, line and field, never a panic, nothing delivered.

mod common;

use common::*;

const GOOD_JOB: &str = r#"[inputs]
users = "users.jsonl"

[engine]
now = "2026-03-02T00:00:00Z"

[store]
url = "file:store"

[provider]
url = "log:deliveries.jsonl"

[[campaign]]
id = "spring"
kind = "promotion"
start = "2026-03-01T00:00:00Z"
end = "2026-03-08T00:00:00Z"
body = "Hi {user.id}"
"#;

const GOOD_LINE: &str = r#"{"id": 1, "level": 2, "points": 3}"#;

/// Runs the good job over `users` (good lines around one bad one) and expects exit 2 with
/// every `needles` in the message, and nothing delivered.
fn expect_bad(name: &str, job: &str, users: &[u8], needles: &[&str]) {
    let s = Scratch::new();
    s.write("users.jsonl", users);
    s.write("job.toml", job);
    let out = s.fanout(&["run", "job.toml", "--quiet"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(2),
        "{name}: exit code, stderr:\n{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{name}: panicked:\n{stderr}");
    for n in needles {
        assert!(stderr.contains(n), "{name}: {n:?} not in:\n{stderr}");
    }
    assert!(
        read_deliveries(&s.path("deliveries.jsonl")).is_empty(),
        "{name}: something was delivered"
    );
}

/// A users file whose third line is `bad`.
fn users_with(bad: &[u8]) -> Vec<u8> {
    let mut v = format!("{GOOD_LINE}\n{{\"id\": 2, \"level\": 0, \"points\": 0}}\n").into_bytes();
    v.extend_from_slice(bad);
    v.extend_from_slice(b"\n{\"id\": 9, \"level\": 1, \"points\": 1}\n");
    v
}

#[test]
fn bad_user_lines_name_file_line_and_field() {
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("missing id", br#"{"level": 1, "points": 1}"#.to_vec(), "id"),
        (
            "zero id",
            br#"{"id": 0, "level": 1, "points": 1}"#.to_vec(),
            "id",
        ),
        (
            "too-large id",
            br#"{"id": 4294967296, "level": 1, "points": 1}"#.to_vec(),
            "id",
        ),
        (
            "level over 255",
            br#"{"id": 5, "level": 256, "points": 1}"#.to_vec(),
            "level",
        ),
        (
            "negative points",
            br#"{"id": 5, "level": 1, "points": -4}"#.to_vec(),
            "points",
        ),
        (
            "string level",
            br#"{"id": 5, "level": "high", "points": 1}"#.to_vec(),
            "level",
        ),
        (
            "tags not a list",
            br#"{"id": 5, "level": 1, "points": 1, "tags": "sports"}"#.to_vec(),
            "tags",
        ),
        (
            "unknown tz",
            br#"{"id": 5, "level": 1, "points": 1, "tz": "Mars/Olympus"}"#.to_vec(),
            "tz: unknown time zone \"Mars/Olympus\"",
        ),
        (
            "tz not a string",
            br#"{"id": 5, "level": 1, "points": 1, "tz": 8}"#.to_vec(),
            "tz: expected a time zone name",
        ),
        ("not json", b"id=5 level=1".to_vec(), "users.jsonl:3"),
        (
            "invalid utf-8",
            b"{\"id\": 5, \"level\": 1, \"points\": 1, \"tags\": [\"\xff\xfe\"]}".to_vec(),
            "UTF-8",
        ),
    ];
    for (name, bad, field) in cases {
        expect_bad(name, GOOD_JOB, &users_with(&bad), &["users.jsonl:3", field]);
    }
}

#[test]
fn a_20_mb_line_is_refused_without_reading_it_whole() {
    let mut bad = b"{\"id\": 5, \"level\": 1, \"points\": 1, \"tags\": [\"".to_vec();
    bad.extend(std::iter::repeat_n(b'x', 20 * 1024 * 1024));
    bad.extend_from_slice(b"\"]}");
    expect_bad(
        "20 MB line",
        GOOD_JOB,
        &users_with(&bad),
        &["users.jsonl:3", "MiB"],
    );
}

#[test]
fn bad_job_files_name_line_and_field() {
    let users = format!("{GOOD_LINE}\n");
    let cases: Vec<(&str, String, Vec<&str>)> = vec![
        (
            "unknown key",
            GOOD_JOB.replace(
                "kind = \"promotion\"",
                "kind = \"promotion\"\ncolour = \"red\"",
            ),
            vec!["job.toml:16", "colour"],
        ),
        (
            "bad timestamp",
            GOOD_JOB.replace("2026-03-08T00:00:00Z", "next tuesday"),
            vec!["job.toml:17", "end"],
        ),
        (
            "bad provider url",
            GOOD_JOB.replace("log:deliveries.jsonl", "lgo:deliveries.jsonl"),
            vec!["job.toml:11", "provider.url", "expected log:PATH"],
        ),
        (
            "bad store url",
            GOOD_JOB.replace("file:store", "files:store"),
            vec!["job.toml:8", "store.url", "expected file:DIR"],
        ),
        (
            "unparsable redis store url",
            GOOD_JOB.replace("file:store", "redis://localhost:port/0"),
            vec!["job.toml:8", "store.url", "not a Redis URL"],
        ),
        (
            "unknown default_tz",
            format!("{GOOD_JOB}[policy]\ndefault_tz = \"Mars/Olympus\"\n"),
            vec![
                "job.toml:20",
                "policy.default_tz",
                "unknown time zone \"Mars/Olympus\"",
            ],
        ),
        (
            "bad quiet hours",
            format!("{GOOD_JOB}[policy]\nquiet_hours = {{ start = \"21:00\", end = \"8am\" }}\n"),
            vec!["job.toml:20", "policy.quiet_hours.end", "HH:MM"],
        ),
        (
            "unknown policy key",
            format!("{GOOD_JOB}[policy]\nquiet = true\n"),
            vec!["job.toml:20", "policy.quiet", "unknown field"],
        ),
        (
            "unknown placeholder",
            GOOD_JOB.replace("{user.id}", "{user.nmae}"),
            vec!["job.toml:18", "body", "user.nmae"],
        ),
    ];
    for (name, job, needles) in cases {
        expect_bad(name, &job, users.as_bytes(), &needles);
    }
}

#[test]
fn skip_bad_lines_counts_and_delivers_the_rest() {
    let s = Scratch::new();
    s.write(
        "users.jsonl",
        users_with(br#"{"id": 5, "level": 999, "points": 1}"#),
    );
    s.write("job.toml", GOOD_JOB);
    let stderr = s.fanout_ok(&[
        "run",
        "job.toml",
        "--skip-bad-lines",
        "--summary",
        "summary.json",
    ]);
    assert!(
        stderr.contains("users.jsonl:3"),
        "the skipped line is reported:\n{stderr}"
    );
    let summary = read_summary(&s.path("summary.json"));
    assert_eq!(summary["skipped_lines"], 1);
    let users: Vec<u64> = read_deliveries(&s.path("deliveries.jsonl"))
        .iter()
        .map(|r| r.user)
        .collect();
    assert_eq!(users.len(), 3);
    for id in [1, 2, 9] {
        assert!(users.contains(&id));
    }
}

#[test]
fn a_job_without_campaigns_is_bad_input_naming_the_file() {
    let s = Scratch::new();
    s.write("users.jsonl", format!("{GOOD_LINE}\n"));
    let job = &GOOD_JOB[..GOOD_JOB.find("[[campaign]]").unwrap()];
    s.write("empty.toml", job);
    // serve refuses it too when no campaigns stream could bring campaigns later.
    for command in ["run", "plan", "serve"] {
        let out = s.fanout(&[command, "empty.toml", "--quiet"]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{command}: {stderr}");
        for needle in ["empty.toml", "campaign"] {
            assert!(
                stderr.contains(needle),
                "{command}: {needle:?} not in {stderr}"
            );
        }
    }
    assert!(read_deliveries(&s.path("deliveries.jsonl")).is_empty());
    assert!(!s.path("store").exists(), "a store was written");
}

#[test]
fn an_unknown_tz_in_a_csv_stops_the_run_or_is_skipped() {
    let s = Scratch::new();
    s.write(
        "users.csv",
        "id,level,points,tags,token,tz\n1,2,3,,,Asia/Shanghai\n5,1,1,,,Asia/Shangai\n9,1,1,,,\n",
    );
    s.write(
        "job.toml",
        GOOD_JOB.replace("users = \"users.jsonl\"", "users = \"users.csv\""),
    );
    let out = s.fanout(&["run", "job.toml", "--quiet"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("users.csv:3: tz: unknown time zone \"Asia/Shangai\""),
        "{stderr}"
    );
    assert!(read_deliveries(&s.path("deliveries.jsonl")).is_empty());

    s.fanout_ok(&[
        "run",
        "job.toml",
        "--skip-bad-lines",
        "--quiet",
        "--summary",
        "summary.json",
    ]);
    assert_eq!(read_summary(&s.path("summary.json"))["skipped_lines"], 1);
    let mut users: Vec<u64> = read_deliveries(&s.path("deliveries.jsonl"))
        .iter()
        .map(|r| r.user)
        .collect();
    users.sort_unstable();
    assert_eq!(users, [1, 9]);
}
