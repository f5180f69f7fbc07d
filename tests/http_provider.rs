//! The `http://…` provider end to end: the real `fanout` binary against a real HTTP server on
//! loopback that injects faults by key — retryable (503, 429 with `Retry-After` in seconds and
//! as a date, dropped connections, answers that never come) and permanent (404).
//!
//! Nothing here depends on how fast the machine is: the checks count requests and answers
//! (the rate check compares the count with the whole run's span, which a slow machine only
//! lengthens), and a timeout is provoked by an answer that never comes.

mod common;
mod http_server;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{campaign_line, read_summary, Scratch};
use http_server::{
    dead_letters, fanout, fault_bucket, serial, stderr, Answer, Reply, Req, RetryAfter, TestServer,
};

/// The client's request timeout in these tests (held answers never come, whatever it is).
const TIMEOUT: &str = "2s";
/// Credential refusals in a row that stop a run (the dispatcher's rule).
const UNAUTHORIZED_IN_A_ROW: usize = 3;

fn job(url: &str, users: u64, concurrency: u64, max_attempts: u32, rate_per_s: u64) -> String {
    format!(
        r#"[inputs]
users = "synthetic:{users}:5"

[engine]
batch_max_messages = 50
now = "2026-03-02T00:00:00Z"

[store]
url = "file:store"

[provider]
url = "{url}"
concurrency = {concurrency}
rate_per_s = {rate_per_s}
max_attempts = {max_attempts}
dead_letter = "dead.jsonl"

[[campaign]]
id = "all"
kind = "promotion"
start = "2026-03-01T00:00:00Z"
end = "2026-03-08T00:00:00Z"
title = "Sale"
body = "Hi {{user.id}}"
"#
    )
}

fn key_of(req: &Req) -> Option<String> {
    req.header("idempotency-key").map(str::to_owned)
}

/// What the server does to a key, by a hash of it: ~9% retryable, ~1% permanent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    /// 404 every time: dead after one attempt.
    NotFound,
    /// 503 every time: dead after `max_attempts`.
    AlwaysUnavailable,
    /// 503 once.
    Unavailable,
    /// 429 once, `Retry-After: 1`.
    TooManySecs,
    /// 429 once, `Retry-After: <HTTP-date>`.
    TooManyDate,
    /// The connection is closed without an answer, once.
    Dropped,
    /// No answer ever comes (the client's timeout fires), once.
    Held,
    None,
}

fn fault(key: &str) -> Fault {
    match fault_bucket(key, 1000) {
        0..=9 => Fault::NotFound,
        10..=11 => Fault::AlwaysUnavailable,
        12..=41 => Fault::Unavailable,
        42..=61 => Fault::TooManySecs,
        62..=71 => Fault::TooManyDate,
        72..=86 => Fault::Dropped,
        87..=99 => Fault::Held,
        _ => Fault::None,
    }
}

/// Checks one request against the contract: POST of the delivery record, its key as
/// `Idempotency-Key`, JSON content type.
fn check(req: &Req, key: &str) -> Result<(), String> {
    let fail = |what: &str| Err(format!("{key}: {what}"));
    if req.method != "POST" || req.path != "/hook" {
        return fail(&format!("{} {}", req.method, req.path));
    }
    if req.header("content-type") != Some("application/json") {
        return fail("content-type");
    }
    let Some(v) = req.json() else {
        return fail("body is not JSON");
    };
    let user = v["user"].as_u64().unwrap_or(0);
    let want = serde_json::json!({
        "campaign": "all", "user": user, "title": "Sale",
        "body": format!("Hi {user}"), "key": format!("all:{user}")
    });
    if v != want || key != format!("all:{user}") {
        return fail(&format!("body {v}"));
    }
    Ok(())
}

#[test]
fn every_key_is_delivered_exactly_once_or_dead_lettered_and_dead_letters_can_be_redriven() {
    let _serial = serial();
    const USERS: u64 = 4000;
    const MAX_ATTEMPTS: u32 = 4;
    let fixed = Arc::new(AtomicBool::new(false));
    let violations = Arc::new(Mutex::new(Vec::new()));
    let server = {
        let (fixed, violations) = (fixed.clone(), violations.clone());
        TestServer::start(key_of, move |req, key, attempt| {
            if let Err(v) = check(req, key) {
                violations.lock().unwrap().push(v);
                return Reply::status(400, "{}");
            }
            let fault = match fixed.load(Ordering::SeqCst) {
                true => Fault::None,
                false => fault(key),
            };
            match (fault, attempt) {
                (Fault::NotFound, _) => Reply::status(404, r#"{"error":"no such user"}"#),
                (Fault::AlwaysUnavailable, _) | (Fault::Unavailable, 1) => Reply::status(503, "{}"),
                (Fault::TooManySecs, 1) => Reply::status(429, "{}").after(RetryAfter::Secs(1)),
                (Fault::TooManyDate, 1) => {
                    Reply::status(429, "{}").after(RetryAfter::DateIn(Duration::from_secs(1)))
                }
                (Fault::Dropped, 1) => Reply::Drop,
                (Fault::Held, 1) => Reply::Hold,
                _ => Reply::status(200, r#"{"ok":true}"#),
            }
        })
    };
    let s = Scratch::new();
    s.write(
        "job.toml",
        job(&server.url("/hook"), USERS, 100, MAX_ATTEMPTS, 0),
    );
    let env = [("FANOUT_HTTP_TIMEOUT", TIMEOUT)];
    let run = |extra: &[&str], summary: &str| {
        let mut args = vec![
            "run",
            "job.toml",
            "-w",
            "2",
            "--quiet",
            "--summary",
            summary,
        ];
        args.extend_from_slice(extra);
        let out = fanout(s.dir.path(), &args, &env);
        assert!(out.status.success(), "fanout failed:\n{}", stderr(&out));
        read_summary(&s.path(summary))
    };

    let first = run(&[], "first.json");
    assert!(
        violations.lock().unwrap().is_empty(),
        "{:?}",
        violations.lock().unwrap()
    );
    let all_keys: BTreeSet<String> = (1..=USERS).map(|u| format!("all:{u}")).collect();
    let hits = server.hits();
    let mut by_key: BTreeMap<&str, Vec<&http_server::Hit>> = BTreeMap::new();
    for h in &hits {
        by_key.entry(&h.key).or_default().push(h);
    }
    // Each key was tried exactly as its fault says; every attempt carried the same record.
    for key in &all_keys {
        let tries = by_key.get(key.as_str()).map_or(&[][..], |v| &v[..]);
        let want = match fault(key) {
            Fault::None | Fault::NotFound => 1,
            Fault::AlwaysUnavailable => MAX_ATTEMPTS as usize,
            _ => 2,
        };
        assert_eq!(tries.len(), want, "{key} ({:?}): {tries:?}", fault(key));
        assert!(tries.iter().all(|h| h.req.body == tries[0].req.body));
    }
    assert!(
        server.early_retries().is_empty(),
        "retried before Retry-After: {:?}",
        server.early_retries()
    );

    let ok = server.ok_counts();
    assert!(ok.values().all(|&n| n == 1), "a key was answered 2xx twice");
    let dead = dead_letters(&s.path("dead.jsonl"));
    let mut dead_keys = BTreeSet::new();
    for d in &dead {
        let key = d["key"].as_str().unwrap().to_owned();
        let (attempts, error) = (
            d["attempts"].as_u64().unwrap(),
            d["error"].as_str().unwrap(),
        );
        match fault(&key) {
            Fault::NotFound => assert!(attempts == 1 && error.contains("HTTP 404"), "{d}"),
            Fault::AlwaysUnavailable => {
                assert!(
                    attempts == u64::from(MAX_ATTEMPTS) && error.contains("HTTP 503"),
                    "{d}"
                )
            }
            other => panic!("{key} dead-lettered for a {other:?} fault: {d}"),
        }
        assert!(error.starts_with(&format!("http provider {}", server.url("/hook"))));
        assert!(dead_keys.insert(key), "dead-lettered twice: {d}");
    }
    let ok_keys: BTreeSet<String> = ok.keys().cloned().collect();
    eprintln!(
        "{} requests, {} delivered, {} dead; e.g. {}",
        hits.len(),
        ok_keys.len(),
        dead_keys.len(),
        dead.first().map(|d| d.to_string()).unwrap_or_default()
    );
    assert!(
        ok_keys.is_disjoint(&dead_keys),
        "delivered and dead-lettered"
    );
    assert_eq!(
        &ok_keys | &dead_keys,
        all_keys,
        "a key was neither delivered nor dead"
    );
    let permanent = all_keys
        .iter()
        .filter(|k| matches!(fault(k), Fault::NotFound | Fault::AlwaysUnavailable))
        .count();
    assert_eq!(dead_keys.len(), permanent);
    assert!(permanent > 10, "the fault mix has permanent failures");

    let line = campaign_line(&first, "all");
    assert_eq!(line["eligible"], USERS);
    assert_eq!(line["delivered"], ok_keys.len() as u64);
    assert_eq!(line["dead_lettered"], dead_keys.len() as u64);
    assert_eq!(line["unreachable"], 0);
    assert_eq!(first["invalid_tokens"], 0);

    // Dead letters stay dead on a plain re-run…
    let requests = server.hits().len();
    let second = run(&[], "second.json");
    assert_eq!(campaign_line(&second, "all")["eligible"], 0);
    assert_eq!(server.hits().len(), requests, "a re-run sent something");
    // …and --retry-dead-letters sends exactly them again, once the receiver is fixed.
    fixed.store(true, Ordering::SeqCst);
    let third = run(&["--retry-dead-letters"], "third.json");
    let line = campaign_line(&third, "all");
    assert_eq!(line["eligible"], dead_keys.len() as u64);
    assert_eq!(line["delivered"], dead_keys.len() as u64);
    assert_eq!(line["dead_lettered"], 0);
    let redriven: BTreeSet<String> = server.hits()[requests..]
        .iter()
        .map(|h| h.key.clone())
        .collect();
    assert_eq!(redriven, dead_keys);
    let ok = server.ok_counts();
    assert!(ok.values().all(|&n| n == 1), "a key was answered 2xx twice");
    assert_eq!(ok.keys().cloned().collect::<BTreeSet<_>>(), all_keys);
}

/// The stop is bounded by counting, not timing: one message per provider batch (so each answer
/// is counted as it comes), and the server answers the first three requests with 401 and never
/// answers the rest. At most `CONCURRENCY` requests are ever unanswered at once, and only the
/// three answers free a slot before the stop: at most `CONCURRENCY + 3` requests before it.
/// A send that gets a slot freed by the stop checks for the halt before it goes.
#[test]
fn refused_credentials_stop_the_run_and_a_rerun_delivers_everyone() {
    let _serial = serial();
    const USERS: u64 = 2000;
    const CONCURRENCY: u64 = 20;
    let fixed = Arc::new(AtomicBool::new(false));
    let answered = Arc::new(AtomicUsize::new(0));
    let server = {
        let (fixed, answered) = (fixed.clone(), answered.clone());
        TestServer::start(key_of, move |_, _, _| {
            if fixed.load(Ordering::SeqCst) {
                Reply::ok()
            } else if answered.fetch_add(1, Ordering::SeqCst) < UNAUTHORIZED_IN_A_ROW {
                Reply::status(401, r#"{"error":"bad api key"}"#)
            } else {
                Reply::Hold
            }
        })
    };
    let s = Scratch::new();
    s.write(
        "job.toml",
        job(&server.url("/hook"), USERS, CONCURRENCY, 5, 0)
            .replace("batch_max_messages = 50", "batch_max_messages = 1"),
    );
    // Far longer than the run: a held request must not time out and come back as a retry.
    let env = [("FANOUT_HTTP_TIMEOUT", "300s")];
    let args = [
        "run",
        "job.toml",
        "-w",
        "2",
        "--quiet",
        "--summary",
        "summary.json",
    ];

    let out = fanout(s.dir.path(), &args, &env);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("refuses our credentials"), "{err}");
    assert!(err.contains("without dead-lettering anyone"), "{err}");
    assert!(err.contains("HTTP 401"), "{err}");
    assert!(err.contains(&server.url("/hook")), "{err}");
    assert!(
        !s.path("dead.jsonl").exists(),
        "something was dead-lettered"
    );
    assert!(!s.path("summary.json").exists());
    let hits = server.hits();
    let refused = hits
        .iter()
        .filter(|h| h.answer == Answer::Status(401))
        .count();
    assert_eq!(refused, UNAUTHORIZED_IN_A_ROW, "the stop rule's refusals");
    let bound = CONCURRENCY as usize + UNAUTHORIZED_IN_A_ROW;
    eprintln!(
        "{} requests before the stop (at most {bound}); fanout said:\n{err}",
        hits.len()
    );
    assert!(
        hits.len() <= bound,
        "{} requests before stopping: more than {CONCURRENCY} in flight and the \
         {UNAUTHORIZED_IN_A_ROW} refusals",
        hits.len()
    );

    fixed.store(true, Ordering::SeqCst);
    let out = fanout(s.dir.path(), &args, &env);
    assert!(out.status.success(), "{}", stderr(&out));
    let summary = read_summary(&s.path("summary.json"));
    let line = campaign_line(&summary, "all");
    assert_eq!(line["delivered"], USERS);
    assert_eq!(line["dead_lettered"], 0);
    let ok = server.ok_counts();
    assert_eq!(ok.len() as u64, USERS);
    assert!(ok.values().all(|&n| n == 1));
    assert!(!s.path("dead.jsonl").exists());
}

/// A webhook URL that 404s for everyone is the provider's fault, not the users': the run
/// stops with exit 1 naming it, dead-letters nobody, and once the URL works a re-run delivers
/// every user exactly once.
#[test]
fn a_url_that_404s_for_everyone_stops_the_run_and_a_rerun_delivers_everyone() {
    let _serial = serial();
    const USERS: u64 = 3000;
    let fixed = Arc::new(AtomicBool::new(false));
    let server = {
        let fixed = fixed.clone();
        TestServer::start(key_of, move |_, _, _| match fixed.load(Ordering::SeqCst) {
            true => Reply::ok(),
            false => Reply::status(404, r#"{"error":"no such route"}"#),
        })
    };
    let s = Scratch::new();
    s.write("job.toml", job(&server.url("/hook"), USERS, 50, 3, 0));
    let env = [("FANOUT_HTTP_TIMEOUT", TIMEOUT)];
    let args = [
        "run",
        "job.toml",
        "-w",
        "2",
        "--quiet",
        "--summary",
        "summary.json",
    ];

    let started = std::time::Instant::now();
    let out = fanout(s.dir.path(), &args, &env);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("404") && err.contains("not the users"),
        "{err}"
    );
    assert!(
        !s.path("dead.jsonl").exists(),
        "something was dead-lettered"
    );
    eprintln!(
        "stopped after {:?} and {} requests",
        started.elapsed(),
        server.hits().len()
    );

    fixed.store(true, Ordering::SeqCst);
    let out = fanout(s.dir.path(), &args, &env);
    assert!(out.status.success(), "{}", stderr(&out));
    let ok = server.ok_counts();
    assert_eq!(ok.len() as u64, USERS, "every user delivered");
    assert!(ok.values().all(|&n| n == 1), "each once");
    assert!(!s.path("dead.jsonl").exists());
}

#[test]
fn rate_per_s_holds_at_the_server() {
    let _serial = serial();
    const USERS: u64 = 3000;
    const RATE: u64 = 1000;
    let server = TestServer::start(key_of, |_, _, _| Reply::ok());
    let s = Scratch::new();
    s.write("job.toml", job(&server.url("/hook"), USERS, 200, 5, RATE));
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
        &[("FANOUT_HTTP_TIMEOUT", TIMEOUT)],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        campaign_line(&read_summary(&s.path("summary.json")), "all")["delivered"],
        USERS
    );
    let hits = server.hits();
    assert_eq!(hits.len() as u64, USERS);
    assert!(hits.iter().all(|h| h.answer == Answer::Status(200)));
    // Over the whole run, by the server's own arrival times: a slow machine only stretches the
    // span. The limiter lets one burst (a twentieth of a second's worth) go at once; the slack
    // covers the first request arriving late (connection set-up), which shortens the span.
    let (requests, span) = server.arrivals();
    let burst = RATE / 20;
    let allowed = RATE as f64 * span.as_secs_f64() * 1.05 + burst as f64 + 1.0;
    eprintln!("{requests} requests in {span:?}: at most {allowed:.0} allowed");
    assert!(
        requests as f64 <= allowed,
        "{requests} requests in {span:?} at rate_per_s = {RATE}"
    );
}

/// A failure while several epochs are open (600k users: three epochs) ends the run: the
/// workers drop the dataflow instead of waiting for epochs that will never complete.
#[test]
fn a_fatal_error_with_epochs_open_ends_the_run_instead_of_hanging() {
    let _serial = serial();
    let server = TestServer::start(key_of, |_, _, _| Reply::status(401, r#"{"error":"no"}"#));
    let s = Scratch::new();
    s.write("job.toml", job(&server.url("/hook"), 600_000, 20, 5, 0));
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_fanout"))
        .args(["run", "job.toml", "-w", "2", "--quiet"])
        .env("FANOUT_HTTP_TIMEOUT", TIMEOUT)
        .current_dir(s.dir.path())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // A liveness guard, not a timing: a hung run never exits.
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if std::time::Instant::now() > deadline {
            child.kill().ok();
            panic!("the run hung after its fatal error");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(status.code(), Some(1));
}
