//! `fanout serve` against a real redis-server: logins XADDed while it runs (and while it was
//! killed) are granted exactly as the naive computation says, campaigns submitted on the
//! stream are admitted, kept and acknowledged, schedules fire, /metrics agrees with what was
//! delivered, and SIGTERM drains and exits 0.

mod common;
mod naive;
mod redis_server;
mod serving;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::{Duration, Instant};

use chrono::{DateTime, SecondsFormat, TimeZone, Utc};
use common::*;
use naive::*;
use redis_server::RedisServer;
use serving::*;

fn repo(path: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

/// A scratch directory holding the sample inputs.
fn scratch_with_inputs() -> Scratch {
    let s = Scratch::new();
    std::fs::create_dir(s.path("inputs")).unwrap();
    for f in ["users.jsonl", "granted.jsonl"] {
        std::fs::copy(repo("inputs").join(f), s.path("inputs").join(f)).unwrap();
    }
    s
}

fn ts(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Secs, true)
}

/// Logins of known (and a few unknown) users at times around the sample coupons' windows.
fn logins(rng: &mut Lcg, users: &[u64], n: usize) -> Vec<NLogin> {
    let from = Utc.with_ymd_and_hms(2026, 2, 28, 0, 0, 0).unwrap();
    (0..n)
        .map(|k| {
            let user = if k % 17 == 0 {
                9_000_000 + rng.below(1000)
            } else {
                users[rng.below(users.len() as u64) as usize]
            };
            (
                user,
                from + chrono::Duration::minutes(rng.below(12 * 24 * 60) as i64),
            )
        })
        .collect()
}

fn xadd_logins(redis: &RedisServer, logins: &[NLogin]) {
    for (user, t) in logins {
        redis.cli(&[
            "XADD",
            "fanout:logins",
            "*",
            "user",
            &user.to_string(),
            "ts",
            &ts(*t),
        ]);
    }
}

#[test]
fn logins_are_granted_exactly_once_while_serving_and_across_a_kill() {
    let redis = RedisServer::start();
    let s = scratch_with_inputs();
    let job = std::fs::read_to_string(repo("dataflows/coupon-on-login.toml")).unwrap();
    s.write("job.toml", &job);
    let users = naive_users_jsonl(&std::fs::read_to_string(s.path("inputs/users.jsonl")).unwrap());
    let granted = granted_jsonl(&std::fs::read_to_string(s.path("inputs/granted.jsonl")).unwrap());
    let ids: Vec<u64> = users.keys().copied().collect();
    let mut rng = Lcg(7);
    let (a, b, c) = (
        logins(&mut rng, &ids, 60),
        logins(&mut rng, &ids, 60),
        logins(&mut rng, &ids, 60),
    );
    let want = |parts: &[&[NLogin]]| {
        let all: Vec<NLogin> = parts.concat();
        expected(&job, &users, &all, &granted, None)
    };
    let (want_ab, want_all) = (want(&[&a, &b]), want(&[&a, &b, &c]));
    assert!(
        want_ab.len() < want_all.len(),
        "the test needs logins after the kill"
    );

    let streams = redis.url(0);
    let store = redis.url(1);
    let args = [
        "serve", "job.toml", "--logins", &streams, "--store", &store, "--quiet",
    ];
    // Logins before the first start, then while it runs.
    xadd_logins(&redis, &a);
    let (mut first, port, _reserved) = start_serve(&s, &args);
    xadd_logins(&redis, &b);
    s.wait_for_lines("deliveries.jsonl", want_ab.len(), &mut first);
    wait_until("every login acknowledged", &mut first, || {
        pending(&redis, "fanout:logins") == 0
    });
    assert_eq!(delivered(&s.path("deliveries.jsonl")), want_ab);
    assert_eq!(
        metric(port, "fanout_deliveries_total"),
        want_ab.len() as u64
    );
    assert_eq!(metric(port, "fanout_claims_total"), want_ab.len() as u64);
    first.kill().unwrap();
    first.wait().unwrap();

    // Logins while it is down, then a restart.
    xadd_logins(&redis, &c);
    let (mut second, port, _reserved) = start_serve(&s, &args);
    s.wait_for_lines("deliveries.jsonl", want_all.len(), &mut second);
    wait_until("every login acknowledged", &mut second, || {
        pending(&redis, "fanout:logins") == 0
    });
    assert_eq!(
        metric(port, "fanout_deliveries_total"),
        (want_all.len() - want_ab.len()) as u64,
        "the restarted process delivered only what was new"
    );
    terminate(second);
    assert_eq!(delivered(&s.path("deliveries.jsonl")), want_all);
    // The ledger agrees: each coupon's grants are its naive set.
    for campaign in ["welcome-back-c100", "mom-week-c200"] {
        let out = s.fanout(&["grants", "--store", &store, "--campaign", campaign]);
        let got: BTreeSet<u64> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| l.parse().unwrap())
            .collect();
        let expect: BTreeSet<u64> = want_all
            .iter()
            .filter(|(c, _, _)| c == campaign)
            .map(|(_, _, u)| *u)
            .collect();
        assert_eq!(got, expect, "grants of {campaign}");
    }
}

/// A campaign as a `[[campaign]]` TOML document, live for years around now.
fn promotion(id: &str, min_level: u8, body: &str) -> String {
    format!(
        "[[campaign]]\nid = \"{id}\"\nkind = \"promotion\"\nstart = \"2020-01-01T00:00:00Z\"\n\
         end = \"2100-01-01T00:00:00Z\"\ntitle = \"Sale\"\nbody = \"{body}\"\n\
         [campaign.audience]\nmin_level = {min_level}\n"
    )
}

fn base_job(extra: &str) -> String {
    format!(
        "[inputs]\nusers = \"inputs/users.jsonl\"\n[provider]\nurl = \"log:deliveries.jsonl\"\n{extra}"
    )
}

#[test]
fn campaigns_submitted_on_the_stream_are_admitted_kept_and_acknowledged() {
    let redis = RedisServer::start();
    let s = scratch_with_inputs();
    s.write("job.toml", base_job(""));
    let users = naive_users_jsonl(&std::fs::read_to_string(s.path("inputs/users.jsonl")).unwrap());
    let ids: Vec<u64> = users.keys().copied().collect();
    let url = redis.url(0);
    let args = [
        "serve",
        "job.toml",
        "--campaigns",
        &url,
        "--logins",
        &url,
        "--store",
        &url,
        "--quiet",
    ];
    let promo = promotion("promo-l3", 3, "Hi {user.id}");
    let coupon = "[[campaign]]\nid = \"lazy-c9\"\nkind = \"coupon\"\n\
        start = \"2026-01-01T00:00:00Z\"\nend = \"2026-12-01T00:00:00Z\"\ntitle = \"Gift\"\n\
        body = \"{coupon.id}\"\n[campaign.audience]\ntags_any = [\"sports\"]\n\
        [campaign.coupon]\ncoupon_id = \"C-9\"\namount = 5\ndelivery = \"on_login\"\n";
    // Another lazy coupon with the same coupon id: kept beside the first (SPEC keys
    // fanout:coupons by campaign id), and granted after the restart too.
    let coupon_b = coupon
        .replace("lazy-c9", "lazy-c9-mom")
        .replace("\"sports\"", "\"mom\"");
    let now = Utc::now();
    let want_promo = expected(&base_job(&promo), &users, &[], &BTreeSet::new(), Some(now));
    assert!(!want_promo.is_empty());

    let (mut serve, port, _reserved) = start_serve(&s, &args);
    redis.cli(&["XADD", "fanout:campaigns", "*", "job", &promo]);
    // Not TOML of a campaign; and the same content as promo-l3 under another id.
    redis.cli(&[
        "XADD",
        "fanout:campaigns",
        "*",
        "job",
        "[[campaign]]\nid = 3",
    ]);
    redis.cli(&[
        "XADD",
        "fanout:campaigns",
        "*",
        "job",
        &promotion("promo-copy", 3, "Hi {user.id}"),
    ]);
    redis.cli(&["XADD", "fanout:campaigns", "*", "job", coupon]);
    redis.cli(&["XADD", "fanout:campaigns", "*", "job", &coupon_b]);
    s.wait_for_lines("deliveries.jsonl", want_promo.len(), &mut serve);
    wait_until("both refusals counted", &mut serve, || {
        metric(port, "fanout_campaigns_rejected_total") == 2
    });
    wait_until("every campaign entry acknowledged", &mut serve, || {
        pending(&redis, "fanout:campaigns") == 0
    });
    // SPEC: fanout:coupons is a hash of campaign id → the campaign as JSON.
    for id in ["lazy-c9", "lazy-c9-mom"] {
        let kept = redis.cli(&["HGET", "fanout:coupons", id]);
        let kept: serde_json::Value =
            serde_json::from_str(&kept).unwrap_or_else(|e| panic!("{id}: {e}: {kept}"));
        assert_eq!(kept["campaign"], id);
        assert!(kept["job"]
            .as_str()
            .unwrap()
            .contains("coupon_id = \"C-9\""));
    }
    assert_eq!(redis.cli(&["HLEN", "fanout:coupons"]), "2");
    assert_eq!(delivered(&s.path("deliveries.jsonl")), want_promo);
    terminate(serve);

    // The kept coupon outlives the process: logins after a restart are granted it.
    let mut rng = Lcg(11);
    let from = Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap();
    let events: Vec<NLogin> = (0..80)
        .map(|_| {
            let u = ids[rng.below(ids.len() as u64) as usize];
            (
                u,
                from + chrono::Duration::hours(rng.below(24 * 400) as i64),
            )
        })
        .collect();
    let want_coupon = expected(
        &base_job(&format!("{coupon}{coupon_b}")),
        &users,
        &events,
        &BTreeSet::new(),
        Some(now),
    );
    for id in ["lazy-c9", "lazy-c9-mom"] {
        assert!(
            want_coupon.iter().any(|(c, _, _)| c == id),
            "{id} grants nobody"
        );
    }
    let (mut serve, _, _reserved) = start_serve(&s, &args);
    xadd_logins(&redis, &events);
    let mut want_all = want_promo.clone();
    want_all.extend(want_coupon);
    s.wait_for_lines("deliveries.jsonl", want_all.len(), &mut serve);
    wait_until("every login acknowledged", &mut serve, || {
        pending(&redis, "fanout:logins") == 0
    });
    terminate(serve);
    // The promotion is not sent again by the restarted process; the coupon went to the
    // naive set.
    assert_eq!(delivered(&s.path("deliveries.jsonl")), want_all);
}

#[test]
fn a_hot_product_fires_on_every_tick_of_its_schedule() {
    let redis = RedisServer::start();
    let s = scratch_with_inputs();
    let hot = "[[campaign]]\nid = \"hot-1s\"\nkind = \"hot_product\"\n\
        start = \"2020-01-01T00:00:00Z\"\nend = \"2100-01-01T00:00:00Z\"\ntitle = \"Hot\"\n\
        body = \"{goods.name}\"\n[campaign.audience]\ntags_any = [\"sports\"]\n\
        [campaign.goods]\nname = \"Shoes\"\n[campaign.schedule]\nevery = \"1s\"\n";
    let job = base_job(hot);
    s.write("job.toml", &job);
    let users = naive_users_jsonl(&std::fs::read_to_string(s.path("inputs/users.jsonl")).unwrap());
    let audience: BTreeSet<u64> = expected(&job, &users, &[], &BTreeSet::new(), Some(Utc::now()))
        .into_iter()
        .map(|(_, _, u)| u)
        .collect();
    assert!(!audience.is_empty());
    let store = redis.url(0);
    let (mut serve, _, _reserved) =
        start_serve(&s, &["serve", "job.toml", "--store", &store, "--quiet"]);
    // Ticks are wall-clock seconds, and a busy machine may cut one short (a generation ends at
    // the next tick) or run late: so wait, with a generous deadline, for what the ticks did,
    // two occurrences delivered to the whole audience, not for a count of lines.
    let by_tick = |s: &Scratch| {
        let text = std::fs::read_to_string(s.path("deliveries.jsonl")).unwrap_or_default();
        let mut by_tick: BTreeMap<String, BTreeSet<u64>> = BTreeMap::new();
        // Whole lines only: the last one may be being written.
        let whole = &text[..text.rfind('\n').map_or(0, |i| i + 1)];
        for line in whole.lines() {
            let d: serde_json::Value = serde_json::from_str(line).unwrap();
            let tick = d["occurrence"].as_str().expect("an occurrence").to_owned();
            by_tick
                .entry(tick)
                .or_default()
                .insert(d["user"].as_u64().unwrap());
        }
        by_tick
    };
    let complete = |t: &BTreeMap<String, BTreeSet<u64>>| {
        t.values().filter(|u| u.is_superset(&audience)).count()
    };
    let started = Instant::now();
    while complete(&by_tick(&s)) < 2 {
        assert!(
            serve.try_wait().unwrap().is_none(),
            "serve exited before two complete ticks"
        );
        assert!(
            started.elapsed() < Duration::from_secs(180),
            "never two complete ticks: {:?}",
            by_tick(&s)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    terminate(serve);
    // `delivered` asserts each (occurrence, user) at most once and the idempotency keys.
    let mut by_tick: BTreeMap<String, BTreeSet<u64>> = BTreeMap::new();
    for (_, occurrence, user) in delivered(&s.path("deliveries.jsonl")) {
        by_tick
            .entry(occurrence.expect("an occurrence"))
            .or_default()
            .insert(user);
    }
    let complete = by_tick.values().filter(|u| **u == audience).count();
    assert!(complete >= 2, "at least two complete ticks: {by_tick:?}");
    for (tick, got) in &by_tick {
        assert!(
            got.is_subset(&audience),
            "tick {tick} went outside the audience"
        );
        let t = DateTime::parse_from_rfc3339(tick).unwrap();
        assert_eq!(
            t.timestamp_subsec_millis(),
            0,
            "ticks start on whole seconds"
        );
    }
}

#[test]
fn run_reads_the_login_stream_once_and_acknowledges_it() {
    let redis = RedisServer::start();
    let s = scratch_with_inputs();
    let job = std::fs::read_to_string(repo("dataflows/coupon-on-login.toml")).unwrap();
    s.write("job.toml", &job);
    let users = naive_users_jsonl(&std::fs::read_to_string(s.path("inputs/users.jsonl")).unwrap());
    let granted = granted_jsonl(&std::fs::read_to_string(s.path("inputs/granted.jsonl")).unwrap());
    let ids: Vec<u64> = users.keys().copied().collect();
    let mut rng = Lcg(3);
    let (a, b) = (logins(&mut rng, &ids, 80), logins(&mut rng, &ids, 80));
    let url = redis.url(0);
    let run = [
        "run", "job.toml", "--logins", &url, "--store", &url, "--quiet",
    ];

    // A bad entry: exit 2 naming it and its field, nothing sent, nothing acknowledged.
    xadd_logins(&redis, &a);
    let bad = redis.cli(&["XADD", "fanout:logins", "*", "user", "42", "ts", "soon"]);
    let out = s.fanout(&run);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("fanout:logins entry {bad}: ts:")),
        "{err}"
    );
    assert!(read_deliveries(&s.path("deliveries.jsonl")).is_empty());
    redis.cli(&["XDEL", "fanout:logins", &bad]);

    s.fanout_ok(&run);
    assert_eq!(
        delivered(&s.path("deliveries.jsonl")),
        expected(&job, &users, &a, &granted, None)
    );
    assert_eq!(pending(&redis, "fanout:logins"), 0);
    // The next run reads only what was added since, and grants only what is new.
    xadd_logins(&redis, &b);
    s.fanout_ok(&run);
    let all: Vec<NLogin> = [a, b].concat();
    assert_eq!(
        delivered(&s.path("deliveries.jsonl")),
        expected(&job, &users, &all, &granted, None)
    );
    assert_eq!(pending(&redis, "fanout:logins"), 0);
}

/// SPEC "Priority": a transactional campaign submitted to `serve` while a bulk fan-out runs
/// starts delivering at once — the running generation is cut short (its queued bulk work
/// left unclaimed for the next one) — and still every user gets each campaign once.
#[test]
fn a_transactional_campaign_submitted_during_a_bulk_fan_out_starts_at_once() {
    const USERS: u64 = 200_000;
    let redis = RedisServer::start();
    let s = Scratch::new();
    let count_arg = USERS.to_string();
    s.fanout_ok(&[
        "gen",
        "users",
        "--count",
        &count_arg,
        "--seed",
        "3",
        "--out",
        "users.jsonl",
    ]);
    let users = naive_users_jsonl(&std::fs::read_to_string(s.path("users.jsonl")).unwrap());
    // The rate makes the bulk fan-out last (bulk gets 80% of it: ~20 s), the log provider
    // writes every delivery as it happens.
    s.write(
        "job.toml",
        "[inputs]\nusers = \"users.jsonl\"\n[provider]\nurl = \"log:deliveries.jsonl\"\n\
         rate_per_s = 12000\nconcurrency = 64\n",
    );
    let url = redis.url(0);
    let args = [
        "serve",
        "job.toml",
        "--campaigns",
        &url,
        "--store",
        &url,
        "--quiet",
    ];
    let bulk = promotion("blast", 0, "Hi {user.id}").replace(
        "[campaign.audience]",
        "priority = \"bulk\"\n[campaign.audience]",
    );
    let reset = promotion("password-reset", 0, "Reset {user.id}").replace(
        "[campaign.audience]\nmin_level = 0",
        "priority = \"transactional\"\n[campaign.audience]\nmin_level = 9",
    );
    let (serve, _port, _reserved) = start_serve(&s, &args);
    let mut serve = serving::KillOnDrop(serve);
    redis.cli(&["XADD", "fanout:campaigns", "*", "job", &bulk]);
    // Whole lines only: the file grows while it is read.
    let count = |campaign: &str| {
        let text = std::fs::read_to_string(s.path("deliveries.jsonl")).unwrap_or_default();
        let whole = &text[..text.rfind('\n').map_or(0, |i| i + 1)];
        let tag = format!("\"campaign\":\"{campaign}\"");
        whole
            .lines()
            .filter(|l| l.replace(' ', "").contains(&tag))
            .count() as u64
    };
    wait_until("the bulk fan-out delivers", &mut serve.0, || {
        count("blast") > 5_000
    });
    redis.cli(&["XADD", "fanout:campaigns", "*", "job", &reset]);
    let submitted = Instant::now();
    wait_until("the transactional campaign delivers", &mut serve.0, || {
        count("password-reset") > 0
    });
    let waited = submitted.elapsed();
    let bulk_then = count("blast");
    eprintln!("transactional after {waited:?}, the blast at {bulk_then} of {USERS}");
    // Queued behind the bulk generation it would wait for the rest of the blast, over 10 s.
    assert!(
        bulk_then < USERS * 8 / 10,
        "the blast was nearly done ({bulk_then}) before the transactional campaign started"
    );
    assert!(
        waited < Duration::from_secs(4),
        "the transactional campaign waited {waited:?}"
    );
    // Both finish, each user once.
    let resets = users.values().filter(|u| u.level >= 9).count() as u64;
    wait_until("both finish", &mut serve.0, || {
        count("blast") == users.len() as u64 && count("password-reset") == resets
    });
    let recs = read_deliveries(&s.path("deliveries.jsonl"));
    let pairs = pairs_once(&recs);
    assert_eq!(pairs.len(), recs.len(), "a pair delivered twice");
    let (status, _, err) = sigterm(&mut serve.0);
    assert!(status.success(), "{err}");
}

/// SPEC "Quiet hours": `serve` holds users inside their quiet hours and sends them on its own
/// clock once the hours end, without being told. Quiet hours are set to the next 30–90 s in
/// UTC (from this minute to a minute boundary at least 30 s away): users in UTC are held,
/// users in Pacific/Kiritimati (14 hours ahead, far outside them) are sent at once; the held
/// ones arrive once the hours end, each once.
#[test]
fn serve_sends_held_users_when_their_quiet_hours_end() {
    use chrono::Timelike;
    let redis = RedisServer::start();
    let s = Scratch::new();
    let mut users = String::new();
    for id in 1..=400u64 {
        let tz = if id % 2 == 0 {
            "UTC"
        } else {
            "Pacific/Kiritimati"
        };
        users.push_str(&format!(
            "{{\"id\": {id}, \"level\": 1, \"points\": 0, \"tz\": \"{tz}\"}}\n"
        ));
    }
    s.write("users.jsonl", users);
    let now = Utc::now();
    let hm = |t: DateTime<Utc>| format!("{:02}:{:02}", t.hour(), t.minute());
    let end = now + chrono::Duration::minutes(if now.second() < 30 { 1 } else { 2 });
    s.write(
        "job.toml",
        format!(
            "[inputs]\nusers = \"users.jsonl\"\n[provider]\nurl = \"log:deliveries.jsonl\"\n\
             [policy]\nquiet_hours = {{ start = \"{}\", end = \"{}\" }}\n\n{}",
            hm(now),
            hm(end),
            promotion("night-owl", 0, "Hi {user.id}")
        ),
    );
    let url = redis.url(0);
    let args = ["serve", "job.toml", "--store", &url, "--quiet"];
    let (serve, _port, _reserved) = start_serve(&s, &args);
    let mut serve = serving::KillOnDrop(serve);
    let delivered = || delivered(&s.path("deliveries.jsonl"));
    let ids = |d: &BTreeSet<Pair>| d.iter().map(|p| p.2).collect::<BTreeSet<u64>>();
    wait_until(
        "the users outside their quiet hours are sent",
        &mut serve.0,
        || delivered().len() == 200,
    );
    let first = ids(&delivered());
    assert!(
        first.iter().all(|id| id % 2 == 1),
        "a UTC user was sent in quiet hours"
    );
    // Held until the quiet hours end (the minute `end` starts), then sent without a prompt.
    let quiet_end = end.with_second(0).unwrap().with_nanosecond(0).unwrap();
    let started = Instant::now();
    while delivered().len() < 400 {
        assert!(
            Utc::now() < quiet_end + chrono::Duration::seconds(60),
            "held users not sent a minute after their quiet hours ended"
        );
        assert!(started.elapsed() < Duration::from_secs(200));
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(
        Utc::now() >= quiet_end,
        "held users sent before their quiet hours ended"
    );
    let all = ids(&delivered());
    assert_eq!(all, (1..=400).collect::<BTreeSet<u64>>());
    let (status, _, err) = sigterm(&mut serve.0);
    assert!(status.success(), "{err}");
}
