//! The `fcm:` provider end to end: the real `fanout` binary against a real HTTP server on
//! loopback playing FCM HTTP v1. The server checks every request field for field and answers
//! with FCM's error shapes by key; the access token never shows in logs, errors or files.

mod common;
mod http_server;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{campaign_line, read_summary, Scratch};
use http_server::{
    dead_letters, fanout, fault_bucket, serial, stderr, Reply, Req, RetryAfter, TestServer,
};
use serde_json::{json, Value};

const SECRET: &str = "ya29.c.test-ACCESS-token_9f8e7d";
const PROJECT: &str = "demo-proj";
const PATH: &str = "/v1/projects/demo-proj/messages:send";

/// Users 1..=n; every 20th has no push token; level = id % 7.
fn users(n: u64) -> String {
    (1..=n)
        .map(|id| {
            let mut u = json!({"id": id, "level": id % 7, "points": id * 3});
            if id % 20 != 0 {
                u["token"] = json!(token_of(id));
            }
            u.to_string() + "\n"
        })
        .collect()
}

fn token_of(id: u64) -> String {
    format!("dGVzdA:APA91b-{id}_x")
}

/// The job: campaign `promo`, and with `huge` a campaign whose messages are over FCM's limit.
fn job(endpoint: &str, concurrency: u64, huge: bool) -> String {
    let mut job = format!(
        r#"[inputs]
users = "users.jsonl"

[engine]
batch_max_messages = 40
now = "2026-03-02T00:00:00Z"

[store]
url = "file:store"

[provider]
url = "fcm:project={PROJECT},endpoint={endpoint}"
concurrency = {concurrency}
max_attempts = 4
dead_letter = "dead.jsonl"

[[campaign]]
id = "promo"
kind = "promotion"
start = "2026-03-01T00:00:00Z"
end = "2026-03-08T00:00:00Z"
title = "Promo"
body = "Hi {{user.id}}, level {{user.level}}"
"#
    );
    if huge {
        job.push_str(&format!(
            r#"
[[campaign]]
id = "huge"
kind = "promotion"
start = "2026-03-01T00:00:00Z"
end = "2026-03-08T00:00:00Z"
title = "Too big"
body = "{} {{user.id}}"
"#,
            "x".repeat(4100)
        ));
    }
    job
}

fn key_of(req: &Req) -> Option<String> {
    req.json()?["message"]["data"]["key"]
        .as_str()
        .map(str::to_owned)
}

/// Checks one request against FCM HTTP v1, field for field.
fn check(req: &Req, key: &str) -> Result<(), String> {
    let fail = |what: String| Err(format!("{key}: {what}"));
    if req.method != "POST" || req.path != PATH {
        return fail(format!("{} {}", req.method, req.path));
    }
    if req.header("authorization") != Some(&format!("Bearer {SECRET}")) {
        return fail("authorization".into());
    }
    if req.header("content-type") != Some("application/json") {
        return fail("content-type".into());
    }
    let Some(user) = key
        .strip_prefix("promo:")
        .and_then(|u| u.parse::<u64>().ok())
    else {
        return fail("key".into());
    };
    let want = json!({"message": {
        "token": token_of(user),
        "notification": {"title": "Promo", "body": format!("Hi {user}, level {}", user % 7)},
        "data": {"campaign": "promo", "key": key},
    }});
    match req.json() {
        Some(v) if v == want => Ok(()),
        other => fail(format!("body {other:?}")),
    }
}

fn fcm_error(code: u16, status: &str, detail: Value) -> String {
    json!({"error": {"code": code, "message": "from the test server", "status": status,
                     "details": [detail]}})
    .to_string()
}

fn fcm_detail(error_code: &str) -> Value {
    json!({"@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError", "errorCode": error_code})
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    Unregistered,
    InvalidArgument,
    QuotaExceeded,
    RateLimitExceeded,
    Unavailable,
    Internal,
    Dropped,
    None,
}

fn fault(key: &str) -> Fault {
    match fault_bucket(key, 1000) {
        0..=4 => Fault::Unregistered,
        5..=9 => Fault::InvalidArgument,
        10..=29 => Fault::QuotaExceeded,
        30..=49 => Fault::RateLimitExceeded,
        50..=69 => Fault::Unavailable,
        70..=89 => Fault::Internal,
        90..=99 => Fault::Dropped,
        _ => Fault::None,
    }
}

fn reply(fault: Fault, attempt: u32) -> Reply {
    let once = attempt == 1;
    match fault {
        Fault::Unregistered => Reply::status(
            404,
            &fcm_error(404, "NOT_FOUND", fcm_detail("UNREGISTERED")),
        ),
        Fault::InvalidArgument => Reply::status(
            400,
            &fcm_error(400, "INVALID_ARGUMENT", fcm_detail("INVALID_ARGUMENT")),
        ),
        Fault::QuotaExceeded if once => Reply::status(
            429,
            &fcm_error(429, "RESOURCE_EXHAUSTED", fcm_detail("QUOTA_EXCEEDED")),
        )
        .after(RetryAfter::Secs(1)),
        Fault::RateLimitExceeded if once => Reply::status(
            429,
            &fcm_error(
                429,
                "RESOURCE_EXHAUSTED",
                json!({"@type": "type.googleapis.com/google.rpc.ErrorInfo",
                       "reason": "RATE_LIMIT_EXCEEDED", "domain": "googleapis.com"}),
            ),
        )
        .after(RetryAfter::DateIn(Duration::from_secs(1))),
        Fault::Unavailable if once => Reply::status(
            503,
            &fcm_error(503, "UNAVAILABLE", fcm_detail("UNAVAILABLE")),
        ),
        Fault::Internal if once => {
            Reply::status(500, &fcm_error(500, "INTERNAL", fcm_detail("INTERNAL")))
        }
        Fault::Dropped if once => Reply::Drop,
        _ => Reply::status(
            200,
            &json!({"name": "projects/demo-proj/messages/0:1"}).to_string(),
        ),
    }
}

fn env() -> [(&'static str, &'static str); 3] {
    [
        ("FANOUT_FCM_TOKEN", SECRET),
        ("FANOUT_HTTP_TIMEOUT", "2s"),
        ("RUST_LOG", "debug"),
    ]
}

/// The access token appears nowhere fanout wrote.
fn assert_secret_kept(s: &Scratch, stderr: &str) {
    assert!(stderr.contains("DEBUG"), "debug logging was not on");
    assert!(!stderr.contains(SECRET), "the access token is in stderr");
    assert!(
        !stderr.contains("ACCESS-token"),
        "part of the access token is in stderr"
    );
    for file in ["dead.jsonl", "summary.json"] {
        let text = std::fs::read_to_string(s.path(file)).unwrap_or_default();
        assert!(!text.contains(SECRET), "the access token is in {file}");
    }
}

#[test]
fn fcm_requests_are_v1_and_every_error_shape_ends_delivered_or_dead() {
    let _serial = serial();
    const USERS: u64 = 3000;
    let violations = Arc::new(Mutex::new(Vec::new()));
    let server = {
        let violations = violations.clone();
        TestServer::start(key_of, move |req, key, attempt| match check(req, key) {
            Ok(()) => reply(fault(key), attempt),
            Err(v) => {
                violations.lock().unwrap().push(v);
                Reply::status(400, "{}")
            }
        })
    };
    let s = Scratch::new();
    s.write("users.jsonl", users(USERS));
    s.write("job.toml", job(&server.url(""), 100, true));
    let out = fanout(
        s.dir.path(),
        &[
            "run",
            "job.toml",
            "-w",
            "2",
            "--quiet",
            "--summary",
            "summary.json",
        ],
        &env(),
    );
    let err = stderr(&out);
    assert!(
        out.status.success(),
        "{}",
        &err[err.len().saturating_sub(3000)..]
    );
    assert_secret_kept(&s, &err);
    assert!(
        violations.lock().unwrap().is_empty(),
        "{:?}",
        violations.lock().unwrap()
    );
    assert!(
        server.early_retries().is_empty(),
        "retried before Retry-After"
    );

    let with_token: BTreeSet<String> = (1..=USERS)
        .filter(|id| id % 20 != 0)
        .map(|id| format!("promo:{id}"))
        .collect();
    let tokenless = USERS - with_token.len() as u64;
    let hits = server.hits();
    let mut tries: BTreeMap<&str, usize> = BTreeMap::new();
    for h in &hits {
        *tries.entry(&h.key).or_default() += 1;
    }
    // Only users with a token, only the campaign that fits, each as often as its fault says.
    assert_eq!(
        tries.keys().map(|k| k.to_string()).collect::<BTreeSet<_>>(),
        with_token
    );
    for (key, n) in &tries {
        let want = match fault(key) {
            Fault::None | Fault::Unregistered | Fault::InvalidArgument => 1,
            _ => 2,
        };
        assert_eq!(*n, want, "{key} ({:?})", fault(key));
    }

    let ok = server.ok_counts();
    assert!(ok.values().all(|&n| n == 1), "a key was answered 2xx twice");
    let ok_keys: BTreeSet<String> = ok.keys().cloned().collect();
    let (mut dead_promo, mut dead_huge) = (BTreeSet::new(), BTreeSet::new());
    for d in dead_letters(&s.path("dead.jsonl")) {
        let key = d["key"].as_str().unwrap().to_owned();
        let error = d["error"].as_str().unwrap();
        assert_eq!(d["attempts"], 1, "{d}");
        assert!(d.get("token").is_none(), "{d}");
        if d["campaign"] == "huge" {
            assert!(error.contains("over FCM's 4096-byte limit"), "{d}");
            assert!(dead_huge.insert(key));
        } else {
            let code = match fault(&key) {
                Fault::Unregistered => "HTTP 404 UNREGISTERED",
                Fault::InvalidArgument => "HTTP 400 INVALID_ARGUMENT",
                other => panic!("{key} dead-lettered for {other:?}: {d}"),
            };
            assert!(
                error.starts_with(&format!("fcm project {PROJECT}: {code}")),
                "{d}"
            );
            assert!(dead_promo.insert(key));
        }
    }
    assert!(ok_keys.is_disjoint(&dead_promo));
    assert_eq!(&ok_keys | &dead_promo, with_token);
    assert!(!dead_promo.is_empty());

    let summary = read_summary(&s.path("summary.json"));
    let promo = campaign_line(&summary, "promo");
    assert_eq!(promo["eligible"], USERS);
    assert_eq!(promo["delivered"], ok_keys.len() as u64);
    assert_eq!(promo["dead_lettered"], dead_promo.len() as u64);
    assert_eq!(promo["unreachable"], tokenless);
    assert_eq!(summary["invalid_tokens"], dead_promo.len() as u64);
    let huge = campaign_line(&summary, "huge");
    assert_eq!(huge["delivered"], 0);
    assert_eq!(huge["dead_lettered"], dead_huge.len() as u64);
    assert_eq!(huge["dead_lettered"], with_token.len() as u64);
    assert_eq!(huge["unreachable"], tokenless);
}

#[test]
fn fcm_refusing_our_credentials_stops_the_run_and_a_rerun_delivers_everyone() {
    let _serial = serial();
    const USERS: u64 = 1000;
    let fixed = Arc::new(AtomicBool::new(false));
    let server = {
        let fixed = fixed.clone();
        TestServer::start(key_of, move |_, _, attempt| {
            match (fixed.load(Ordering::SeqCst), attempt % 2) {
                (true, _) => Reply::ok(),
                (false, 1) => Reply::status(
                    401,
                    &fcm_error(401, "UNAUTHENTICATED", fcm_detail("THIRD_PARTY_AUTH_ERROR")),
                ),
                (false, _) => Reply::status(
                    403,
                    &fcm_error(403, "PERMISSION_DENIED", fcm_detail("SENDER_ID_MISMATCH")),
                ),
            }
        })
    };
    let s = Scratch::new();
    s.write("users.jsonl", users(USERS));
    s.write("job.toml", job(&server.url("/"), 20, false));
    let args = [
        "run",
        "job.toml",
        "-w",
        "2",
        "--quiet",
        "--summary",
        "summary.json",
    ];

    // Without the access token: a usage error before anything is sent.
    let out = fanout(s.dir.path(), &args, &[("FANOUT_FCM_TOKEN", "")]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("FANOUT_FCM_TOKEN"));
    assert!(server.hits().is_empty());

    let out = fanout(s.dir.path(), &args, &env());
    let err = stderr(&out);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        &err[err.len().saturating_sub(3000)..]
    );
    assert_secret_kept(&s, &err);
    let last = err.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("fanout: fcm project demo-proj: HTTP 40"),
        "{last}"
    );
    assert!(last.contains("refuses our credentials"), "{last}");
    assert!(
        !s.path("dead.jsonl").exists(),
        "something was dead-lettered"
    );
    // It stops long before trying everyone: the pushes already in flight when the third
    // refusal is counted still go out, and how many that is depends on scheduling (up to ~120
    // seen on a loaded machine with 20 in flight), so the bound is a share of the users.
    let refused = server.hits().len();
    assert!(
        (3..USERS as usize / 4).contains(&refused),
        "{refused} requests before stopping"
    );

    fixed.store(true, Ordering::SeqCst);
    let out = fanout(s.dir.path(), &args, &env());
    let err = stderr(&out);
    assert!(
        out.status.success(),
        "{}",
        &err[err.len().saturating_sub(3000)..]
    );
    assert_secret_kept(&s, &err);
    let summary = read_summary(&s.path("summary.json"));
    let promo = campaign_line(&summary, "promo");
    let tokenless = USERS / 20;
    assert_eq!(promo["delivered"], USERS - tokenless);
    assert_eq!(promo["dead_lettered"], 0);
    // A tokenless user needs no request: its outcome (unreachable) is recorded at once, so
    // the first run recorded some before it stopped, and those are already granted now.
    let unreachable = promo["unreachable"].as_u64().unwrap();
    assert!(unreachable <= tokenless, "{unreachable}");
    assert_eq!(promo["already_granted"], tokenless - unreachable);
    let ok = server.ok_counts();
    assert_eq!(ok.len() as u64, USERS - tokenless);
    assert!(ok.values().all(|&n| n == 1));
    assert!(!s.path("dead.jsonl").exists());
}
