//! Campaign control enforced, end to end: `fanout campaigns pause|resume|cancel` against a
//! `fanout run` and a `fanout serve` that hold the store (embedded, and a real redis-server),
//! with a real HTTP provider on loopback that records when each request arrived.
//!
//! The expectations are read from the inputs, not from the engine: the audience is every
//! user of the generated users file, and what the provider saw is what the server recorded.
//! "Nothing is sent after the command returned" is checked as: no request of that campaign
//! arrived later than [`GRACE`] after it returned (attempts already under way may still
//! arrive in that time; the engine polls the store every 50 ms).

mod common;
mod http_server;
mod redis_server;
mod serving;

use std::collections::{BTreeMap, BTreeSet};
use std::process::Child;
use std::time::{Duration, Instant};

use common::{campaign_line, naive_users_jsonl, read_summary, Scratch};
use http_server::{serial, Answer, Reply, Req, TestServer};
use redis_server::RedisServer;
use serving::{start_serve, wait_until};

/// Users in each test's audience.
const USERS: u64 = 3000;
/// How long the provider takes to answer each request.
const LATENCY: Duration = Duration::from_millis(30);
/// Longest a request of a paused or cancelled campaign may arrive after the command returned:
/// the engine's 50 ms poll, the attempts already under way ([`LATENCY`]) and a loaded
/// machine's scheduling, with room to spare. Without enforcement, hundreds arrive later.
const GRACE: Duration = Duration::from_secs(1);

fn key_of(req: &Req) -> Option<String> {
    req.header("idempotency-key").map(str::to_owned)
}

/// A provider answering 200 after [`LATENCY`].
fn provider() -> TestServer {
    TestServer::start(key_of, |_, _, _| Reply::OkAfter(LATENCY))
}

/// A promotion to everyone, live for years around now.
fn promotion(id: &str) -> String {
    format!(
        "[[campaign]]\nid = \"{id}\"\nkind = \"promotion\"\nstart = \"2020-01-01T00:00:00Z\"\n\
         end = \"2100-01-01T00:00:00Z\"\ntitle = \"Sale {id}\"\nbody = \"Hi {{user.id}}\"\n"
    )
}

/// A job over `users.jsonl` pushing to `url` on `store`, with `campaigns`.
fn job(url: &str, store: &str, campaigns: &str) -> String {
    format!(
        "[inputs]\nusers = \"users.jsonl\"\n[store]\nurl = \"{store}\"\n[engine]\n\
         batch_max_messages = 20\n[provider]\nurl = \"{url}\"\nconcurrency = 40\n{campaigns}"
    )
}

/// Writes `users.jsonl` (generated) and returns every user id in it: each campaign's audience.
fn users(s: &Scratch) -> BTreeSet<u64> {
    s.fanout_ok(&[
        "gen",
        "users",
        "--count",
        &USERS.to_string(),
        "--seed",
        "7",
        "--out",
        "users.jsonl",
    ]);
    let text = std::fs::read_to_string(s.path("users.jsonl")).unwrap();
    naive_users_jsonl(&text).into_keys().collect()
}

/// The user of an idempotency key `campaign:user` of campaign `id`.
fn user_of(key: &str, id: &str) -> Option<u64> {
    key.strip_prefix(id)?.strip_prefix(':')?.parse().ok()
}

/// Per user of campaign `id`: how many 2xx answers the provider gave, and when each of its
/// requests arrived.
fn seen(server: &TestServer, id: &str) -> (BTreeMap<u64, usize>, Vec<Instant>) {
    let (mut ok, mut at) = (BTreeMap::new(), Vec::new());
    for h in server.hits() {
        if let Some(user) = user_of(&h.key, id) {
            at.push(h.at);
            if matches!(h.answer, Answer::Status(200..=299)) {
                *ok.entry(user).or_default() += 1;
            }
        }
    }
    (ok, at)
}

/// Waits until the provider saw at least `n` requests of campaign `id`, while `child` runs.
fn wait_for_hits(server: &TestServer, id: &str, n: usize, child: &mut Child) {
    let started = Instant::now();
    while seen(server, id).1.len() < n {
        if let Some(status) = child.try_wait().unwrap() {
            let err = serving::stderr_of(child);
            panic!("exited ({status:?}) before {n} requests of {id}:\n{err}");
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "never {n} requests of {id}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// `fanout campaigns ACTION ID --store STORE`; the instant it returned (exit 0).
fn control(s: &Scratch, action: &str, id: &str, store: &str) -> Instant {
    s.fanout_ok(&["campaigns", action, id, "--store", store]);
    Instant::now()
}

/// Asserts that no request of campaign `id` arrived later than [`GRACE`] after `returned`.
fn nothing_after(server: &TestServer, id: &str, returned: Instant) {
    let late: Vec<Duration> = seen(server, id)
        .1
        .into_iter()
        .filter(|at| *at > returned + GRACE)
        .map(|at| at - returned)
        .collect();
    assert!(
        late.is_empty(),
        "{} requests of {id} arrived after the command returned (first at +{:?})",
        late.len(),
        late.first()
    );
}

/// `fanout ARGS` that must exit 0; its stdout.
fn stdout(s: &Scratch, args: &[&str]) -> String {
    let out = s.fanout(args);
    assert!(
        out.status.success(),
        "fanout {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Waits for `child` to exit and asserts exit 0.
fn finishes(child: &mut Child) {
    let started = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let err = serving::stderr_of(child);
            assert!(status.success(), "{status:?}\n{err}");
            return;
        }
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "the run never finished"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Every user of `audience` got exactly one 2xx answer for campaign `id`, and nobody else.
fn each_once(server: &TestServer, id: &str, audience: &BTreeSet<u64>) {
    let (ok, _) = seen(server, id);
    let users: BTreeSet<u64> = ok.keys().copied().collect();
    assert_eq!(&users, audience, "{id}: who was delivered");
    let twice: Vec<_> = ok.iter().filter(|(_, n)| **n > 1).collect();
    assert!(
        twice.is_empty(),
        "{id}: delivered more than once: {twice:?}"
    );
}

#[test]
fn a_paused_run_sends_nothing_of_it_until_resumed_then_finishes_exactly_once() {
    paused_then_resumed("file:store");
}

#[test]
fn a_paused_run_on_redis_sends_nothing_of_it_until_resumed_then_finishes_exactly_once() {
    let redis = RedisServer::start();
    paused_then_resumed(&redis.url(0));
}

/// Pauses campaign `a` of a run on `store` under way, checks that nothing of it goes out
/// while `b` goes on, resumes it and checks the end: both campaigns exactly once.
fn paused_then_resumed(store: &str) {
    let _one = serial();
    let server = provider();
    let s = Scratch::new();
    let audience = users(&s);
    let both = format!("{}{}", promotion("a"), promotion("b"));
    s.write("job.toml", job(&server.url("/push"), store, &both));
    let mut run = s.start(&["run", "job.toml", "--summary", "summary.json", "--quiet"]);
    wait_for_hits(&server, "a", 300, &mut run);
    let paused = control(&s, "pause", "a", store);
    let b_then = seen(&server, "b").1.len();
    // The run waits for `a`, and `b` goes on meanwhile (it shares a's lane).
    std::thread::sleep(GRACE + Duration::from_millis(1500));
    assert!(
        run.try_wait().unwrap().is_none(),
        "the run ended while paused"
    );
    nothing_after(&server, "a", paused);
    assert!(
        seen(&server, "b").1.len() > b_then,
        "b stalled while a was paused"
    );
    s.fanout_ok(&["campaigns", "resume", "a", "--store", store]);
    finishes(&mut run);
    each_once(&server, "a", &audience);
    each_once(&server, "b", &audience);
    let summary = read_summary(&s.path("summary.json"));
    for id in ["a", "b"] {
        let line = campaign_line(&summary, id);
        assert_eq!(line["delivered"], audience.len() as u64, "{line}");
        assert_eq!(line["cancelled"], 0, "{line}");
    }
}

/// Ctrl-C while a campaign is paused stops the run as ever (exit 130, nothing of the paused
/// campaign sent after the pause); a re-run after `resume` finishes it exactly once.
#[test]
fn an_interrupted_paused_run_exits_130_and_a_re_run_finishes_it() {
    let _one = serial();
    let server = provider();
    let s = Scratch::new();
    let audience = users(&s);
    s.write(
        "job.toml",
        job(&server.url("/push"), "file:store", &promotion("a")),
    );
    let mut run = s.start(&["run", "job.toml", "--quiet"]);
    wait_for_hits(&server, "a", 300, &mut run);
    let paused = control(&s, "pause", "a", "file:store");
    std::thread::sleep(Duration::from_millis(300));
    let pid = run.id().to_string();
    assert!(std::process::Command::new("kill")
        .args(["-INT", &pid])
        .status()
        .unwrap()
        .success());
    let started = Instant::now();
    let status = loop {
        if let Some(status) = run.try_wait().unwrap() {
            break status;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "a paused run did not stop on SIGINT"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(status.code(), Some(130), "{}", serving::stderr_of(&mut run));
    nothing_after(&server, "a", paused);
    s.fanout_ok(&["campaigns", "resume", "a", "--store", "file:store"]);
    s.fanout_ok(&["run", "job.toml", "--quiet"]);
    each_once(&server, "a", &audience);
}

#[test]
fn a_cancel_stops_a_run_and_settles_the_rest_as_cancelled() {
    cancelled_mid_run("file:store");
}

#[test]
fn a_cancel_stops_a_run_on_redis_and_settles_the_rest_as_cancelled() {
    let redis = RedisServer::start();
    cancelled_mid_run(&redis.url(0));
}

/// Cancels campaign `a` of a run on `store` under way: nothing of it after the command
/// returned, every user of its audience delivered (exactly those the provider answered) or
/// cancelled, `b` whole; a re-run sends nothing more.
fn cancelled_mid_run(store: &str) {
    let _one = serial();
    let server = provider();
    let s = Scratch::new();
    let audience = users(&s);
    let both = format!("{}{}", promotion("a"), promotion("b"));
    s.write("job.toml", job(&server.url("/push"), store, &both));
    let mut run = s.start(&["run", "job.toml", "--summary", "summary.json", "--quiet"]);
    wait_for_hits(&server, "a", 300, &mut run);
    let cancelled = control(&s, "cancel", "a", store);
    finishes(&mut run);
    nothing_after(&server, "a", cancelled);
    each_once(&server, "b", &audience);
    let (ok, _) = seen(&server, "a");
    let delivered: BTreeSet<u64> = ok.keys().copied().collect();
    assert!(ok.values().all(|n| *n == 1), "a delivered twice");
    let line = campaign_line(&read_summary(&s.path("summary.json")), "a").clone();
    let n = |k: &str| line[k].as_u64().unwrap();
    assert_eq!(n("eligible"), audience.len() as u64, "{line}");
    assert_eq!(n("delivered"), delivered.len() as u64, "{line}");
    assert_eq!(n("delivered") + n("cancelled"), n("eligible"), "{line}");
    assert!(n("cancelled") > 0, "{line}");
    // The store's record agrees: the grants are exactly the users the provider answered.
    let grants = stdout(&s, &["grants", "--store", store, "--campaign", "a"]);
    let granted: BTreeSet<u64> = grants.lines().map(|l| l.parse().unwrap()).collect();
    assert_eq!(granted, delivered);
    // Cancelling is final: a re-run sends nothing of it, and finds every user settled.
    let before = server.hits().len();
    s.fanout_ok(&["run", "job.toml", "--summary", "again.json", "--quiet"]);
    assert_eq!(server.hits().len(), before, "the re-run sent something");
    let again = campaign_line(&read_summary(&s.path("again.json")), "a").clone();
    assert_eq!(again["eligible"], 0, "{again}");
    assert_eq!(again["already_granted"], audience.len() as u64, "{again}");
    // The store tells when it was pushed and by whom: the first run only (the re-run pushed
    // nothing), over a span that holds the provider's own arrivals.
    let show = stdout(&s, &["campaigns", "show", "a", "--store", store, "--json"]);
    let show: serde_json::Value = serde_json::from_str(&show).unwrap();
    let workers = show["workers"].as_array().unwrap();
    assert_eq!(workers.len(), 1, "{show}");
    assert!(
        workers[0].as_str().unwrap().starts_with("run pid "),
        "{show}"
    );
    let at = |k: &str| chrono::DateTime::parse_from_rfc3339(show[k].as_str().unwrap()).unwrap();
    assert!(at("first_send") < at("last_send"), "{show}");
    assert!(show["rate_per_s"].as_f64().unwrap() > 0.0, "{show}");
}

/// A lazy coupon cancelled before the logins come grants nothing at them: every login of a
/// user in its audience is counted cancelled, and the provider hears of none.
#[test]
fn a_cancelled_lazy_coupon_grants_nothing_at_login() {
    let s = Scratch::new();
    let audience = users(&s);
    let coupon = "[[campaign]]\nid = \"gift\"\nkind = \"coupon\"\n\
                  start = \"2020-01-01T00:00:00Z\"\nend = \"2100-01-01T00:00:00Z\"\n\
                  body = \"A gift\"\n[campaign.coupon]\ncoupon_id = \"G-1\"\namount = 5\n\
                  delivery = \"on_login\"\n";
    let job = |logins: &str| {
        format!(
            "[inputs]\nusers = \"users.jsonl\"\n{logins}[store]\nurl = \"file:store\"\n\
             [provider]\nurl = \"log:deliveries.jsonl\"\n{coupon}"
        )
    };
    // Admitted (the store knows it), then cancelled, then the logins arrive.
    s.write("admit.toml", job(""));
    s.fanout_ok(&["run", "admit.toml", "--quiet"]);
    s.fanout_ok(&["campaigns", "cancel", "gift", "--store", "file:store"]);
    let logins: Vec<u64> = audience.iter().copied().step_by(7).collect();
    let text: String = logins
        .iter()
        .map(|u| format!("{{\"user\": {u}, \"ts\": \"2026-03-02T10:00:00Z\"}}\n"))
        .collect();
    s.write("logins.jsonl", text);
    s.write("job.toml", job("logins = \"logins.jsonl\"\n"));
    s.fanout_ok(&["run", "job.toml", "--summary", "summary.json", "--quiet"]);
    let delivered = std::fs::read_to_string(s.path("deliveries.jsonl")).unwrap_or_default();
    assert_eq!(delivered, "", "a cancelled coupon was granted");
    let line = campaign_line(&read_summary(&s.path("summary.json")), "gift").clone();
    assert_eq!(line["cancelled"], logins.len() as u64, "{line}");
    assert_eq!(line["delivered"], 0, "{line}");
}

/// `serve` on Redis: a submitted fan-out cancelled under way stops at once, settles the rest
/// as cancelled and its stream entry is acknowledged; another, paused and resumed, sends
/// nothing while paused and everything exactly once after.
#[test]
fn serve_honours_cancel_and_pause_of_submitted_fan_outs() {
    let _one = serial();
    let redis = RedisServer::start();
    let url = redis.url(0);
    let server = provider();
    let s = Scratch::new();
    let audience = users(&s);
    s.write("job.toml", job(&server.url("/push"), &url, ""));
    let args = ["serve", "job.toml", "--campaigns", &url, "--quiet"];
    let (mut serve, _port, _reserved) = start_serve(&s, &args);
    let pending = |redis: &RedisServer| -> u64 {
        let out = redis.cli(&["XPENDING", "fanout:campaigns", "fanout"]);
        out.lines()
            .next()
            .and_then(|l| l.trim().parse().ok())
            .unwrap_or(0)
    };

    redis.cli(&["XADD", "fanout:campaigns", "*", "job", &promotion("x")]);
    wait_for_hits(&server, "x", 300, &mut serve);
    let cancelled = control(&s, "cancel", "x", &url);
    wait_until("x's entry acknowledged", &mut serve, || {
        pending(&redis) == 0
    });
    nothing_after(&server, "x", cancelled);
    let show = stdout(&s, &["campaigns", "show", "x", "--store", &url, "--json"]);
    let show: serde_json::Value = serde_json::from_str(&show).unwrap();
    let o = &show["outcomes"];
    let (ok, _) = seen(&server, "x");
    assert_eq!(o["delivered"], ok.len() as u64, "{show}");
    assert_eq!(
        o["delivered"].as_u64().unwrap() + o["cancelled"].as_u64().unwrap(),
        audience.len() as u64,
        "{show}"
    );

    redis.cli(&["XADD", "fanout:campaigns", "*", "job", &promotion("y")]);
    wait_for_hits(&server, "y", 300, &mut serve);
    let paused = control(&s, "pause", "y", &url);
    std::thread::sleep(GRACE + Duration::from_millis(1500));
    nothing_after(&server, "y", paused);
    assert_eq!(
        pending(&redis),
        1,
        "a paused fan-out's entry was acknowledged"
    );
    s.fanout_ok(&["campaigns", "resume", "y", "--store", &url]);
    wait_until("y's entry acknowledged", &mut serve, || {
        pending(&redis) == 0
    });
    each_once(&server, "y", &audience);
    let (status, _, err) = serving::sigterm(&mut serve);
    assert!(status.success(), "{status:?}\n{err}");
}
