//! `fanout serve`'s status page (SPEC "Campaign control and status"), end to end against a real
//! redis-server: the page, loaded in headless Chromium once a fan-out is done, shows for each
//! campaign the counts a naive reading of the generated users file expects, and `/metrics`
//! has them per campaign; its buttons' requests pause and cancel a campaign durably in the
//! store, and a request from any other origin is refused.
//!
//! These tests need `chromium` (CI installs it): without it they fail, saying so.

mod common;
mod naive;
mod redis_server;
mod serving;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use chrono::Utc;
use common::*;
use naive::*;
use redis_server::RedisServer;
use serde_json::Value;
use serving::*;

/// Users generated for the tests.
const USERS: &str = "2000";

/// A promotion to everyone with a holdout, and one to a persona in the bulk lane; both live
/// for years around now (serve uses the system clock).
fn job() -> String {
    r#"[inputs]
users = "users.jsonl"

[provider]
url = "log:deliveries.jsonl"

[[campaign]]
id = "spring-sale"
kind = "promotion"
start = "2020-01-01T00:00:00Z"
end = "2100-01-01T00:00:00Z"
holdout = 0.1
body = "Hi {user.id}"

[[campaign]]
id = "vip-sports"
kind = "promotion"
priority = "bulk"
start = "2020-01-01T00:00:00Z"
end = "2100-01-01T00:00:00Z"
body = "Level {user.level}"
[campaign.audience]
min_level = 4
tags_any = ["sports"]
"#
    .to_owned()
}

/// A scratch directory with the job and its generated users; the users as the test reads
/// them.
fn setup() -> (Scratch, std::collections::BTreeMap<u64, TUser>) {
    let s = Scratch::new();
    s.write("job.toml", job());
    s.fanout_ok(&[
        "gen",
        "users",
        "--count",
        USERS,
        "--seed",
        "17",
        "--out",
        "users.jsonl",
    ]);
    let users = naive_users_jsonl(&std::fs::read_to_string(s.path("users.jsonl")).unwrap());
    assert_eq!(users.len().to_string(), USERS);
    (s, users)
}

/// Users of `campaign` among `pairs`.
fn of(pairs: &BTreeSet<Pair>, campaign: &str) -> u64 {
    pairs.iter().filter(|(c, _, _)| c == campaign).count() as u64
}

/// The value of `name{campaign="…"}` on `/metrics`.
fn campaign_metric(port: u16, name: &str, campaign: &str) -> Option<u64> {
    let text = get(port, "/metrics");
    let prefix = format!("{name}{{campaign=\"{campaign}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|v| v.trim().parse().ok())
}

#[test]
fn the_page_shows_what_the_users_file_says_a_finished_fan_out_did() {
    let redis = RedisServer::start();
    let (s, users) = setup();
    let want = expected_run(&job(), &users, &[], &BTreeSet::new(), Some(Utc::now()));
    let campaigns = ["spring-sale", "vip-sports"];
    for c in campaigns {
        assert!(
            of(&want.delivered, c) > 0,
            "the test needs deliveries of {c}"
        );
    }
    assert!(of(&want.held_out, "spring-sale") > 0);
    let store = redis.url(1);
    let (serve, port, _reserved) = start_serve(&s, &["serve", "job.toml", "--store", &store]);
    let mut serve = KillOnDrop(serve);

    // The page is one self-contained document: nothing in it is fetched from elsewhere.
    let (status, head, html) = request_with(port, "GET", "/", &[]).unwrap();
    assert_eq!(status, 200, "{head}");
    let head = head.to_ascii_lowercase();
    assert!(head.contains("content-type: text/html"), "{head}");
    assert!(
        head.contains("content-security-policy: default-src 'none'"),
        "{head}"
    );
    for outside in ["src=", "href=", "<link", "@import", "url(", "//cdn"] {
        assert!(!html.contains(outside), "the page refers to {outside}…");
    }

    s.wait_for_lines("deliveries.jsonl", want.delivered.len(), &mut serve.0);
    // The page refreshes from a reading of the store kept for about a second: load it until
    // it shows the fan-out settled, then check every number on it.
    let profile = s.path("chromium-profile");
    let url = format!("http://127.0.0.1:{port}/");
    let started = Instant::now();
    let dom = loop {
        let dom = rendered_dom(&url, &profile, 3000);
        let settled = campaigns.iter().all(|c| {
            dom_count(&dom, c, "delivered") == Some(of(&want.delivered, c))
                && dom_count(&dom, c, "in_flight") == Some(0)
        });
        if settled {
            break dom;
        }
        assert!(
            started.elapsed() < Duration::from_secs(90),
            "the page never showed the finished fan-out:\n{dom}"
        );
        assert!(serve.0.try_wait().unwrap().is_none(), "serve exited");
    };
    for c in campaigns {
        let expect = [
            ("delivered", of(&want.delivered, c)),
            ("held_out", of(&want.held_out, c)),
            ("quiet_held", of(&want.quiet_held, c)),
            ("capped", of(&want.capped, c)),
            ("dead_lettered", of(&want.expired, c)),
            ("unreachable", 0),
            ("in_flight", 0),
        ];
        for (field, n) in expect {
            assert_eq!(
                dom_count(&dom, c, field),
                Some(n),
                "{c} {field} on the page"
            );
        }
        assert_eq!(dom_field(&dom, c, "state").as_deref(), Some("running"));
        assert_eq!(dom_field(&dom, c, "kind").as_deref(), Some("promotion"));
        assert_eq!(dom_field(&dom, c, "progress").as_deref(), Some("100%"));
        assert_eq!(dom_field(&dom, c, "eta_s").as_deref(), Some("0 s"));
        assert!(
            dom_field(&dom, c, "actions").is_some_and(|a| a.contains("pause")),
            "{c} offers pause"
        );
    }
    assert_eq!(
        dom_field(&dom, "vip-sports", "priority").as_deref(),
        Some("bulk")
    );
    // Both charts are drawn: deliveries per second from this process's samples, and the push
    // latency of every push it made.
    assert!(dom.contains("data-chart=\"deliveries\""), "{dom}");
    let total = dom
        .split("data-total=\"")
        .nth(1)
        .and_then(|t| t.split('"').next())
        .and_then(|t| t.parse::<u64>().ok());
    assert_eq!(
        total,
        Some(want.delivered.len() as u64),
        "the latency chart counts every push"
    );

    // /metrics has the same per campaign, over this process's generations.
    for c in campaigns {
        let delivered = campaign_metric(port, "fanout_campaign_delivered_total", c);
        assert_eq!(delivered, Some(of(&want.delivered, c)), "{c} on /metrics");
        let held_out = campaign_metric(port, "fanout_campaign_held_out_total", c);
        assert_eq!(held_out, Some(of(&want.held_out, c)), "{c} on /metrics");
        assert_eq!(
            campaign_metric(port, "fanout_campaign_in_flight", c),
            Some(0)
        );
    }
    let (status, _, _) = request_with(port, "GET", "/nothing", &[]).unwrap();
    assert_eq!(status, 404);
    let (status, head, _) = request_with(port, "POST", "/metrics", &[]).unwrap();
    assert_eq!(status, 405, "{head}");
    let api: Value = serde_json::from_str(&get(port, "/api/campaigns")).unwrap();
    assert_eq!(api["campaigns"].as_array().unwrap().len(), 2);
    let (status, _, err) = sigterm(&mut serve.0);
    assert!(status.success(), "serve after SIGTERM: {status:?}\n{err}");
}

/// `fanout campaigns show ID --json --store STORE`'s `stored_state`.
fn stored_state(s: &Scratch, store: &str, id: &str) -> String {
    let out = s.fanout(&["campaigns", "show", id, "--json", "--store", store]);
    assert!(out.status.success(), "{out:?}");
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    v["stored_state"].as_str().unwrap().to_owned()
}

#[test]
fn the_pages_buttons_pause_and_cancel_durably_and_other_origins_are_refused() {
    let redis = RedisServer::start();
    let (s, _) = setup();
    let store = redis.url(1);
    let (serve, port, _reserved) = start_serve(&s, &["serve", "job.toml", "--store", &store]);
    let mut serve = KillOnDrop(serve);
    let path = "/api/campaigns/spring-sale/pause";

    // Another site's page, a request with no origin, and a browser saying it is cross-site
    // are refused, and change nothing.
    let own = format!("http://127.0.0.1:{port}");
    for headers in [
        vec![("Origin", "http://evil.example")],
        vec![],
        vec![("Origin", own.as_str()), ("Sec-Fetch-Site", "cross-site")],
        vec![
            ("Origin", "http://127.0.0.1:1"),
            ("Sec-Fetch-Site", "same-origin"),
        ],
    ] {
        let (status, _, body) = request_with(port, "POST", path, &headers).unwrap();
        assert_eq!(status, 403, "{headers:?}: {body}");
    }
    assert_eq!(stored_state(&s, &store, "spring-sale"), "running");

    // As the page does it: the answer comes once the store has the state.
    let (status, body) = page_action(port, "spring-sale", "pause");
    assert_eq!(status, 200, "{body}");
    let answer: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        (answer["from"].as_str(), answer["state"].as_str()),
        (Some("running"), Some("paused"))
    );
    assert_eq!(stored_state(&s, &store, "spring-sale"), "paused");
    let (status, body) = page_action(port, "spring-sale", "cancel");
    assert_eq!(status, 200, "{body}");
    assert_eq!(stored_state(&s, &store, "spring-sale"), "cancelled");
    // Cancelling is final; the other campaign was not touched.
    let (status, body) = page_action(port, "spring-sale", "resume");
    assert_eq!(status, 409, "{body}");
    assert_eq!(stored_state(&s, &store, "spring-sale"), "cancelled");
    assert_eq!(stored_state(&s, &store, "vip-sports"), "running");

    // What is not a change of a known campaign's state.
    let (status, body) = page_action(port, "no-such-campaign", "pause");
    assert_eq!(status, 404, "{body}");
    let (status, body) = page_action(port, "not%20an%20id", "pause");
    assert_eq!(status, 400, "{body}");
    let long = "x".repeat(65);
    let (status, body) = page_action(port, &long, "pause");
    assert_eq!(status, 400, "{body}");
    let (status, body) = page_action(port, "vip-sports", "explode");
    assert_eq!(status, 404, "{body}");
    let (status, head, _) = request_with(port, "GET", path, &[]).unwrap();
    assert_eq!(status, 405, "{head}");
    assert!(head.to_ascii_lowercase().contains("allow: post"), "{head}");

    // The JSON the page reads says the same.
    let started = Instant::now();
    loop {
        let api: Value = serde_json::from_str(&get(port, "/api/campaigns")).unwrap();
        let state = api["campaigns"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["id"] == "spring-sale")
            .map(|c| c["state"].clone());
        if state == Some(Value::from("cancelled")) {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "/api/campaigns never said cancelled: {api}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let (status, _, err) = sigterm(&mut serve.0);
    assert!(status.success(), "serve after SIGTERM: {status:?}\n{err}");
}
