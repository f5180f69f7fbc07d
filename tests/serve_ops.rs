//! `fanout serve` is safe to operate (issue #13): SIGTERM stops claiming at once and a restart
//! finishes the fan-out exactly once; Redis losing its streams is noticed and repaired;
//! `/healthz` says when the streams are unreachable; a poison campaign entry is refused or
//! dead-lettered instead of crashing every start; the listener holds no idle connection long
//! and never more than its cap.

mod common;
mod http_server;
mod redis_server;
mod serving;

use std::collections::BTreeSet;
use std::io::{Read as _, Write as _};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::Scratch;
use http_server::{Reply, Req, TestServer};
use redis_server::RedisServer;
use serving::*;

/// Users of the SIGTERM test's fan-out, all of them in one epoch.
const USERS: u64 = 10_000;
/// The SIGTERM test's `concurrency`: pushes in flight at once.
const CONCURRENCY: usize = 250;

fn key_of(req: &Req) -> Option<String> {
    req.header("idempotency-key").map(str::to_owned)
}

/// A job over `users` synthetic users with a file store, pushing through `provider`.
fn job(users: u64, provider: &str, concurrency: usize, campaigns: &str) -> String {
    format!(
        "[inputs]\nusers = \"synthetic:{users}\"\n[store]\nurl = \"file:store\"\n\
         [provider]\nurl = \"{provider}\"\nconcurrency = {concurrency}\n{campaigns}"
    )
}

/// A job with the log provider.
fn log_job(users: u64, campaigns: &str) -> String {
    job(users, "log:deliveries.jsonl", 1000, campaigns)
}

/// A promotion as one `[[campaign]]` TOML document, live for years around now; `audience`
/// is the body of its `[campaign.audience]` table (empty: everyone).
fn promotion(id: &str, title: &str, body: &str, audience: &str) -> String {
    format!(
        "[[campaign]]\nid = \"{id}\"\nkind = \"promotion\"\nstart = \"2020-01-01T00:00:00Z\"\n\
         end = \"2100-01-01T00:00:00Z\"\ntitle = \"{title}\"\nbody = \"{body}\"\n\
         [campaign.audience]\n{audience}\n"
    )
}

#[test]
fn sigterm_stops_claiming_at_once_and_a_restart_finishes_exactly_once() {
    sigterm_then_restart(&[]);
}

#[test]
fn sigterm_stops_claiming_at_once_and_a_restart_finishes_exactly_once_on_redis() {
    let redis = RedisServer::start();
    sigterm_then_restart(&["--store", &redis.url(0)]);
}

/// SIGTERM in the middle of a fan-out, then a restart, with `store` flags.
fn sigterm_then_restart(store: &[&str]) {
    let server = TestServer::start(key_of, |_, _, _| Reply::OkAfter(Duration::from_millis(200)));
    let s = Scratch::new();
    let promo = promotion("promo", "Sale", "Hi {user.id}", "");
    s.write(
        "job.toml",
        job(USERS, &server.url("/push"), CONCURRENCY, &promo),
    );
    let args = [&["serve", "job.toml", "--quiet"], store].concat();
    let (mut first, _, _reserved) = start_serve(&s, &args);
    wait_until("a fifth of the fan-out sent", &mut first, || {
        server.hits().len() as u64 >= USERS / 5
    });
    let signalled = Instant::now();
    let (status, took, err) = sigterm(&mut first);
    assert!(status.success(), "serve after SIGTERM: {status:?}\n{err}");
    // In flight at the signal: at most `concurrency` pushes of 200 ms each.
    assert!(
        took < Duration::from_secs(3),
        "SIGTERM took {took:?} to stop serve"
    );
    let hits = server.hits();
    let after = hits.iter().filter(|h| h.at > signalled).count();
    assert!(
        after <= CONCURRENCY,
        "{after} pushes started after SIGTERM (concurrency {CONCURRENCY})"
    );
    assert!(
        (hits.len() as u64) < USERS,
        "the fan-out finished before the signal"
    );

    // A restart sends the rest: every user exactly once, across both processes.
    let (mut second, _, _reserved) = start_serve(&s, &args);
    wait_until("every user sent", &mut second, || {
        server.ok_counts().len() as u64 == USERS
    });
    // Anything sent twice would come now, as the restart finishes.
    std::thread::sleep(Duration::from_millis(500));
    terminate(second);
    let counts = server.ok_counts();
    let twice: Vec<_> = counts.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "sent more than once: {twice:?}");
    let want: BTreeSet<String> = (1..=USERS).map(|u| format!("promo:{u}")).collect();
    let got: BTreeSet<String> = counts.into_keys().collect();
    assert_eq!(got, want);
}

/// A lazy coupon for every user, live for years around now.
const LAZY_COUPON: &str = "[[campaign]]\nid = \"lazy\"\nkind = \"coupon\"\n\
    start = \"2020-01-01T00:00:00Z\"\nend = \"2100-01-01T00:00:00Z\"\ntitle = \"Gift\"\n\
    body = \"{coupon.id}\"\n[campaign.coupon]\ncoupon_id = \"C-1\"\namount = 5\n\
    delivery = \"on_login\"\n";

fn xadd_login(redis: &RedisServer, user: u64) {
    redis.cli(&[
        "XADD",
        "fanout:logins",
        "*",
        "user",
        &user.to_string(),
        "ts",
        "2026-03-02T10:00:00Z",
    ]);
}

#[test]
fn a_stream_whose_group_redis_lost_is_recreated_and_read_again() {
    let redis = RedisServer::start();
    let s = Scratch::new();
    s.write("job.toml", log_job(1000, LAZY_COUPON));
    let url = redis.url(0);
    let args = ["serve", "job.toml", "--logins", &url, "--quiet"];
    let (mut serve, port, _reserved) = start_serve(&s, &args);
    xadd_login(&redis, 5);
    s.wait_for_lines("deliveries.jsonl", 1, &mut serve);
    // The stream is gone, with its group and pending list: as after a restart without
    // persistence. A login added afterwards must still be read.
    redis.cli(&["DEL", "fanout:logins"]);
    std::thread::sleep(Duration::from_millis(500));
    xadd_login(&redis, 6);
    s.wait_for_lines("deliveries.jsonl", 2, &mut serve);
    assert_eq!(metric(port, "fanout_stream_groups_recreated_total"), 1);
    wait_until("the login acknowledged", &mut serve, || {
        pending(&redis, "fanout:logins") == 0
    });
    let (status, _, err) = sigterm(&mut serve);
    assert!(status.success(), "{status:?}\n{err}");
    let said = err
        .lines()
        .filter(|l| l.contains("ERROR") && l.contains("consumer group was gone"))
        .count();
    assert_eq!(said, 1, "the loss is logged as an error once:\n{err}");
    let users: BTreeSet<u64> = common::read_deliveries(&s.path("deliveries.jsonl"))
        .iter()
        .map(|r| r.user)
        .collect();
    assert_eq!(users, BTreeSet::from([5, 6]));
}

/// Polls `/healthz` until it answers `status`; its body.
fn health_becomes(port: u16, status: u16, child: &mut std::process::Child) -> String {
    let mut body = String::new();
    wait_until(&format!("/healthz {status}"), child, || {
        match request(port, "/healthz") {
            Some((s, b)) if s == status => {
                body = b;
                true
            }
            _ => false,
        }
    });
    body
}

#[test]
fn healthz_is_503_while_redis_is_down_and_200_once_it_is_back() {
    let mut redis = RedisServer::start();
    let s = Scratch::new();
    s.write("job.toml", log_job(1000, LAZY_COUPON));
    let url = redis.url(0);
    let args = ["serve", "job.toml", "--logins", &url, "--quiet"];
    let (mut serve, port, _reserved) = start_serve(&s, &args);
    assert_eq!(request(port, "/healthz").map(|r| r.0), Some(200));
    redis.stop();
    let body = health_becomes(port, 503, &mut serve);
    assert!(body.contains("logins") && body.contains(&url), "{body}");
    // The rest of the listener still answers.
    assert_eq!(request(port, "/metrics").map(|r| r.0), Some(200));
    redis.restart_after(Duration::ZERO);
    health_becomes(port, 200, &mut serve);
    // And serve works again: a login is granted.
    xadd_login(&redis, 7);
    s.wait_for_lines("deliveries.jsonl", 1, &mut serve);
    terminate(serve);
}

#[test]
fn campaigns_over_the_size_limits_are_refused_and_acknowledged() {
    let redis = RedisServer::start();
    let s = Scratch::new();
    s.write("job.toml", log_job(1000, ""));
    let url = redis.url(0);
    let args = ["serve", "job.toml", "--campaigns", &url, "--quiet"];
    let (mut serve, port, _reserved) = start_serve(&s, &args);
    // Audiences nobody is in: whatever became of them, nothing would be sent.
    let nobody = "min_level = 255\ntags_all = [\"nobody\"]";
    let submit = |job: &str| xadd_job(&redis, job);
    let mib = "x".repeat(1 << 20);
    submit(&promotion("whole-entry", "Sale", &mib, nobody));
    submit(&promotion("long-body", "Sale", &"b".repeat(5000), nobody));
    submit(&promotion("long-title", &"t".repeat(300), "Hi", nobody));
    // Small as written, but each user's message would be 1000 user ids long.
    let ids = "{user.id}".repeat(500);
    submit(&promotion("long-message", "Sale", &ids, nobody));
    submit(&promotion("fits", "Sale", "Hi {user.id}", ""));
    s.wait_for_lines("deliveries.jsonl", 1000, &mut serve);
    wait_until("four refusals counted", &mut serve, || {
        metric(port, "fanout_campaigns_rejected_total") == 4
    });
    wait_until("every campaign entry acknowledged", &mut serve, || {
        pending(&redis, "fanout:campaigns") == 0
    });
    assert_eq!(metric(port, "fanout_campaigns_admitted_total"), 1);
    let (status, _, err) = sigterm(&mut serve);
    assert!(status.success(), "{status:?}\n{err}");
    for id in ["whole-entry", "long-body", "long-title", "long-message"] {
        assert!(
            !err.contains(&format!("campaign={id}")),
            "{id} admitted:\n{err}"
        );
    }
    assert!(
        err.contains("over the limit of 65536 bytes an entry"),
        "{err}"
    );
    assert!(
        err.contains("title: 300 bytes, over the limit of 256"),
        "{err}"
    );
}

/// `XADD fanout:campaigns * job JOB`, the job through stdin (an argument holds 128 KiB at
/// most); the entry id.
fn xadd_job(redis: &RedisServer, job: &str) -> String {
    let mut cli = std::process::Command::new("redis-cli")
        .args(["-p", &redis.port.to_string(), "-x"])
        .args(["XADD", "fanout:campaigns", "*", "job"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("redis-cli");
    cli.stdin.take().unwrap().write_all(job.as_bytes()).unwrap();
    let out = cli.wait_with_output().unwrap();
    assert!(out.status.success());
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// `HGET fanout:campaigns:attempts ENTRY` as a number (0 when absent).
fn attempts(redis: &RedisServer, entry: &str) -> u64 {
    redis
        .cli(&["HGET", "fanout:campaigns:attempts", entry])
        .parse()
        .unwrap_or(0)
}

#[test]
fn a_campaign_that_three_processes_died_on_is_set_aside_not_retried_forever() {
    let redis = RedisServer::start();
    let s = Scratch::new();
    // A fan-out slow enough to be under way whenever a process is killed.
    s.write("job.toml", job(100_000, "mock:latency=200ms", 100, ""));
    let url = redis.url(0);
    let args = ["serve", "job.toml", "--campaigns", &url, "--quiet"];
    let slow = promotion("slow", "Sale", "Hi {user.id}", "");
    let entry = redis.cli(&["XADD", "fanout:campaigns", "*", "job", &slow]);
    // Three processes die working on the entry; one stops in order in between, which does
    // not count.
    for (stop, counted) in [("kill", 1), ("kill", 2), ("term", 2), ("kill", 3)] {
        let (mut serve, port, _reserved) = start_serve(&s, &args);
        wait_until("the fan-out under way", &mut serve, || {
            metric(port, "fanout_claims_total") > 0
        });
        match stop {
            "kill" => {
                serve.kill().unwrap();
                serve.wait().unwrap();
            }
            _ => terminate(serve),
        }
        assert_eq!(attempts(&redis, &entry), counted, "after a {stop}");
        assert_eq!(pending(&redis, "fanout:campaigns"), 1);
    }
    let (mut serve, port, _reserved) = start_serve(&s, &args);
    wait_until("the entry set aside", &mut serve, || {
        metric(port, "fanout_campaigns_dead_lettered_total") == 1
    });
    wait_until("the entry acknowledged", &mut serve, || {
        pending(&redis, "fanout:campaigns") == 0
    });
    assert_eq!(metric(port, "fanout_campaigns_admitted_total"), 0);
    assert_eq!(metric(port, "fanout_claims_total"), 0);
    assert_eq!(attempts(&redis, &entry), 0);
    terminate(serve);
    let dead = redis.cli(&["XRANGE", "fanout:campaigns:dead", "-", "+"]);
    let fields: Vec<&str> = dead.lines().collect();
    let field = |name: &str| {
        let at = fields.iter().position(|f| *f == name).expect(name);
        fields[at + 1]
    };
    assert_eq!(field("entry"), entry);
    assert!(dead.contains(slow.trim_end()), "{dead}");
    assert_eq!(field("attempts"), "3");
    assert!(field("error").contains("3 processes died"), "{dead}");
}

/// Whether the server has closed `c` (end of stream or reset), without waiting.
fn closed(mut c: &TcpStream) -> bool {
    c.set_nonblocking(true).unwrap();
    let mut byte = [0u8; 1];
    match c.read(&mut byte) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => e.kind() != std::io::ErrorKind::WouldBlock,
    }
}

/// `n` connections to `port`, every other one sending the start of a request and no more.
fn idle_connections(port: u16, n: usize) -> Vec<TcpStream> {
    (0..n)
        .map(|k| {
            let mut c = TcpStream::connect(("127.0.0.1", port)).unwrap();
            if k % 2 == 1 {
                c.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
                    .unwrap();
            }
            c
        })
        .collect()
}

#[test]
fn the_listener_caps_connections_and_closes_idle_ones() {
    /// The listener's cap and header timeout (`serve/http.rs`).
    const CAP: usize = 256;
    const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
    let s = Scratch::new();
    // One small campaign: a serve job needs one (or a campaigns stream).
    let promo = promotion("promo", "Sale", "Hi {user.id}", "");
    s.write("job.toml", log_job(100, &promo));
    let (serve, port, _reserved) = start_serve(&s, &["serve", "job.toml", "--quiet"]);
    let opened = Instant::now();
    let mut idle = idle_connections(port, 100);
    // Under the cap, a new request is answered while the idle ones wait.
    assert_eq!(request(port, "/healthz").map(|r| r.0), Some(200));
    // Over it, what is accepted past the cap is closed at once.
    idle.extend(idle_connections(port, 300));
    std::thread::sleep(Duration::from_millis(300));
    let shut = idle.iter().filter(|c| closed(c)).count();
    assert!(opened.elapsed() < HEADER_TIMEOUT, "the test was too slow");
    assert!(
        shut >= idle.len() - CAP,
        "{shut} of {} connections closed at once (cap {CAP})",
        idle.len()
    );
    // Past the header timeout every idle connection is closed, and requests are answered.
    std::thread::sleep((HEADER_TIMEOUT + Duration::from_secs(2)).saturating_sub(opened.elapsed()));
    let open = idle.iter().filter(|c| !closed(c)).count();
    assert_eq!(
        open, 0,
        "idle connections still open after the header timeout"
    );
    assert_eq!(request(port, "/metrics").map(|r| r.0), Some(200));
    terminate(serve);
}
