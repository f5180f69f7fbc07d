//! `fanout serve` is safe to operate (issue #13): SIGTERM stops claiming at once and a restart
//! finishes the fan-out exactly once; Redis losing its streams is noticed and repaired;
//! `/healthz` says when the streams are unreachable.

mod common;
mod http_server;
mod redis_server;
mod serving;

use std::collections::BTreeSet;
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
