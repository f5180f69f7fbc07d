//! Policy across campaigns against the naive reading (tests/naive): generated jobs mixing all
//! four campaign kinds, with per-campaign holdouts, a global control group and a
//! transactional campaign it must skip, at 1, 2 and 4 workers on the embedded store and on a
//! real redis-server. Every run's deliveries, per-campaign held-out counts and outcome sums
//! must equal what the naive reading computes; a re-run sends nothing more.

mod common;
mod naive;
mod redis_server;

use std::collections::{BTreeMap, BTreeSet};

use common::*;
use naive::*;
use redis_server::RedisServer;

const TAGS: [&str; 4] = ["sports", "travel", "mom", "tech"];

/// Users with random levels, points and tags; every seventh without a token.
fn users_jsonl(rng: &mut Lcg, n: u64) -> String {
    let mut out = String::new();
    for k in 0..n {
        let id = 1 + k * 3 + rng.below(3);
        let tags: Vec<String> = TAGS
            .iter()
            .filter(|_| rng.below(3) == 0)
            .map(|t| format!("\"{t}\""))
            .collect();
        let token = match id % 7 {
            0 => String::new(),
            _ => format!(", \"token\": \"t-{id}\""),
        };
        out.push_str(&format!(
            "{{\"id\": {id}, \"level\": {}, \"points\": {}, \"tags\": [{}]{token}}}\n",
            rng.below(6),
            rng.below(5000),
            tags.join(", ")
        ));
    }
    out
}

/// A share among a few, some of them 0.
fn share(rng: &mut Lcg) -> &'static str {
    ["0", "0.05", "0.1", "0.3"][rng.below(4) as usize]
}

/// A job of seed `seed` over `store`: every kind of campaign, holdouts, a control group.
fn job(rng: &mut Lcg, store: &str) -> String {
    let tag = |rng: &mut Lcg| TAGS[rng.below(4) as usize];
    let mut job = format!(
        r#"[inputs]
users = "users.jsonl"
logins = "logins.jsonl"

[engine]
bucket_size = {}
batch_max_messages = {}
now = "2026-03-02T10:30:00Z"

[store]
url = "{store}"

[provider]
url = "log:deliveries.jsonl"
concurrency = 32

[policy]
control_group = {}
"#,
        [50, 300, 1000][rng.below(3) as usize],
        [7, 100][rng.below(2) as usize],
        share(rng),
    );
    let window = "start = \"2026-03-01T00:00:00Z\"\nend = \"2026-03-08T00:00:00Z\"";
    job.push_str(&format!(
        "\n[[campaign]]\nid = \"promo\"\nkind = \"promotion\"\n{window}\nholdout = {}\n\
         priority = \"bulk\"\nbody = \"Hi {{user.id}}\"\n[campaign.audience]\nmin_level = {}\n",
        share(rng),
        rng.below(3)
    ));
    job.push_str(&format!(
        "\n[[campaign]]\nid = \"segment\"\nkind = \"coupon\"\n{window}\nholdout = {}\n\
         body = \"{{coupon.id}}\"\n[campaign.audience]\ntags_any = [\"{}\"]\n\
         [campaign.coupon]\ncoupon_id = \"S-1\"\namount = 5\ndelivery = \"push\"\n",
        share(rng),
        tag(rng)
    ));
    job.push_str(&format!(
        "\n[[campaign]]\nid = \"lazy\"\nkind = \"coupon\"\n{window}\nholdout = {}\n\
         body = \"{{coupon.id}}\"\n[campaign.audience]\ntags_all = [\"{}\"]\n\
         [campaign.coupon]\ncoupon_id = \"L-1\"\namount = 3\ndelivery = \"on_login\"\n",
        share(rng),
        tag(rng)
    ));
    job.push_str(&format!(
        "\n[[campaign]]\nid = \"hot\"\nkind = \"hot_product\"\n{window}\nholdout = {}\n\
         body = \"{{goods.name}}\"\n[campaign.audience]\nmin_points = {}\n\
         [campaign.goods]\nname = \"Shoes\"\n[campaign.schedule]\nevery = \"1h\"\n",
        share(rng),
        rng.below(3000)
    ));
    // Transactional: the control group does not apply; its own holdout does.
    job.push_str(&format!(
        "\n[[campaign]]\nid = \"receipt\"\nkind = \"promotion\"\n{window}\nholdout = {}\n\
         priority = \"transactional\"\nbody = \"Your order\"\n[campaign.audience]\n\
         tags_any = [\"{}\"]\n",
        ["0", "0.1"][rng.below(2) as usize],
        tag(rng)
    ));
    job
}

/// Logins of known and unknown users inside and outside the window.
fn logins_jsonl(rng: &mut Lcg, max_id: u64) -> String {
    (0..1500)
        .map(|_| {
            let user = 1 + rng.below(max_id + 100);
            let day = 1 + rng.below(9);
            format!("{{\"user\": {user}, \"ts\": \"2026-03-0{day}T09:00:00Z\"}}\n")
        })
        .collect()
}

/// Per campaign: how many pairs the naive reading holds out.
fn held_per_campaign(held: &BTreeSet<Pair>) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    for (c, _, _) in held {
        *out.entry(c.clone()).or_insert(0) += 1;
    }
    out
}

/// Runs one generated job at `workers` on `store`, twice, and checks both runs.
fn check(seed: u64, store: &str, workers: &str) {
    let mut rng = Lcg(seed);
    let s = Scratch::new();
    let users = users_jsonl(&mut rng, 3000);
    s.write("users.jsonl", &users);
    s.write("logins.jsonl", logins_jsonl(&mut rng, 9000));
    let job = job(&mut rng, store);
    s.write("job.toml", &job);
    let parsed = naive_users_jsonl(&users);
    let (want, held) = expected_outcomes_in(&job, s.dir.path(), &parsed);
    assert!(
        !held.is_empty(),
        "seed {seed}: the job should hold someone out"
    );
    assert!(
        !want.is_empty(),
        "seed {seed}: the job should deliver something"
    );

    let args = ["run", "job.toml", "-w", workers, "--quiet", "--summary"];
    s.fanout_ok(&[&args[..], &["first.json"]].concat());
    let got = delivered(&s.path("deliveries.jsonl"));
    // `log:` addresses no device: users without a token are delivered there too.
    assert_eq!(got, want, "seed {seed} -w {workers} {store}: deliveries");
    let summary = read_summary(&s.path("first.json"));
    let held_by = held_per_campaign(&held);
    for c in summary["campaigns"].as_array().unwrap() {
        let id = c["id"].as_str().unwrap();
        let held_here = held_by.get(id).copied().unwrap_or(0);
        assert_eq!(
            c["held_out"], held_here,
            "seed {seed}: held out of {id}: {c}"
        );
        let sent = want.iter().filter(|(w, _, _)| w == id).count() as u64;
        assert_eq!(
            c["eligible"],
            sent + held_here,
            "seed {seed}: eligible of {id}"
        );
    }
    // The store recorded who was held out, as `fanout report` reads it.
    for (id, n) in &held_by {
        let occurrence: Vec<&str> = held
            .iter()
            .filter(|(c, _, _)| c == id)
            .filter_map(|(_, o, _)| o.as_deref())
            .take(1)
            .collect();
        let mut report = vec!["report", "--store", store, "--campaign", id, "--json", "-"];
        if let Some(o) = occurrence.first() {
            report.extend(["--occurrence", o]);
        }
        let out = s.fanout(&report);
        assert!(out.status.success(), "{report:?}: {out:?}");
        let r: serde_json::Value = serde_json::from_slice(&out.stdout).expect("report JSON");
        assert_eq!(
            r["outcomes"]["held_out"], *n,
            "seed {seed}: report of {id}: {r}"
        );
    }

    // A re-run at another worker count: nothing new is sent or held; all already granted.
    std::fs::remove_file(s.path("deliveries.jsonl")).unwrap();
    let args = [
        "run",
        "job.toml",
        "-w",
        "3",
        "--quiet",
        "--summary",
        "second.json",
    ];
    s.fanout_ok(&args);
    assert!(delivered(&s.path("deliveries.jsonl")).is_empty());
    let again = read_summary(&s.path("second.json"));
    for c in again["campaigns"].as_array().unwrap() {
        assert_eq!(c["eligible"], 0, "seed {seed}: re-run of {c}");
        assert_eq!(c["held_out"], 0, "seed {seed}: re-run of {c}");
    }
}

#[test]
fn holdouts_and_the_control_group_equal_the_naive_reading_at_any_worker_count() {
    for (seed, workers) in [(11, "1"), (12, "2"), (13, "4"), (14, "2")] {
        check(seed, "file:store", workers);
    }
}

#[test]
fn holdouts_on_redis_equal_the_naive_reading() {
    let redis = RedisServer::start();
    for (db, (seed, workers)) in [(21, "2"), (22, "4")].into_iter().enumerate() {
        check(seed, &redis.url(db as u8), workers);
    }
}

#[test]
fn caps_are_refused_until_applied_not_silently_ignored() {
    let mut rng = Lcg(5);
    let s = Scratch::new();
    s.write("users.jsonl", users_jsonl(&mut rng, 100));
    s.write("logins.jsonl", "");
    let base = job(&mut rng, "file:store");
    for (extra, field) in [(
        "frequency_caps = [{ max = 1, per = \"24h\" }]\n",
        "policy.frequency_caps",
    )] {
        s.write(
            "job.toml",
            base.replace("[policy]\n", &format!("[policy]\n{extra}")),
        );
        for command in ["run", "plan"] {
            let out = s.fanout(&[command, "job.toml", "--quiet"]);
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(2), "{command}: {stderr}");
            assert!(stderr.contains(field), "{command}: {stderr}");
        }
        assert!(!s.path("deliveries.jsonl").exists(), "nothing may be sent");
    }
}

const ZONES: [&str; 6] = [
    "Asia/Shanghai",
    "America/New_York",
    "Europe/Berlin",
    "Asia/Kolkata",
    "Pacific/Auckland",
    "UTC",
];

/// Users across several zones (every seventh without one: `default_tz` applies).
fn zoned_users(rng: &mut Lcg, n: u64) -> String {
    users_jsonl(rng, n)
        .lines()
        .enumerate()
        .map(|(k, line)| {
            let zone = match k % 7 {
                6 => String::new(),
                z => format!(", \"tz\": \"{}\"", ZONES[z % ZONES.len()]),
            };
            format!("{}{zone}}}\n", line.trim_end_matches('}'))
        })
        .collect()
}

/// A job with quiet hours: a promotion (holdout), a coupon push ending between the runs, an
/// hourly hot product, a transactional promotion (exempt) and a lazy coupon (exempt).
fn quiet_job(rng: &mut Lcg, store: &str) -> String {
    let base = job(rng, store);
    // Past midnight, so users held at 22:30 UTC in some zones are still held when the
    // segment coupon's window ends.
    let quiet = "{ start = \"21:00\", end = \"08:00\" }";
    base.replace(
        "[policy]\n",
        &format!("[policy]\nquiet_hours = {quiet}\ndefault_tz = \"Europe/Berlin\"\n"),
    )
    // The segment coupon's window ends before the last run: its held users expire.
    .replace(
        "id = \"segment\"\nkind = \"coupon\"\nstart = \"2026-03-01T00:00:00Z\"\nend = \"2026-03-08T00:00:00Z\"",
        "id = \"segment\"\nkind = \"coupon\"\nstart = \"2026-03-01T00:00:00Z\"\nend = \"2026-03-03T00:00:00Z\"",
    )
}

/// Pairs of a summary's lines and of a delivery log, by outcome.
fn lines_of(summary: &serde_json::Value, field: &str) -> BTreeMap<(String, Option<String>), u64> {
    let mut out = BTreeMap::new();
    for c in summary["campaigns"].as_array().unwrap() {
        let key = (
            c["id"].as_str().unwrap().to_owned(),
            c["occurrence"].as_str().map(str::to_owned),
        );
        let n = c[field].as_u64().unwrap_or(0);
        if n > 0 {
            *out.entry(key).or_insert(0) += n;
        }
    }
    out
}

fn per_line(pairs: &BTreeSet<Pair>) -> BTreeMap<(String, Option<String>), u64> {
    let mut out = BTreeMap::new();
    for (c, o, _) in pairs {
        *out.entry((c.clone(), o.clone())).or_insert(0) += 1;
    }
    out
}

/// Runs a quiet-hours job at several times against one store and compares every run with
/// the naive reading: what it sends, holds, releases and dead-letters.
fn check_quiet(seed: u64, store: &str, workers: &str) {
    let mut rng = Lcg(seed);
    let s = Scratch::new();
    let users = zoned_users(&mut rng, 2500);
    s.write("users.jsonl", &users);
    s.write("logins.jsonl", "");
    let job = quiet_job(&mut rng, store);
    s.write("job.toml", &job);
    // Night in Europe and Asia first (held), then the segment coupon's window ends (those
    // still held expire), then morning releases the hot product's earlier occurrences.
    let nows = [
        "2026-03-02T22:30:00Z",
        "2026-03-03T06:00:00Z",
        "2026-03-03T10:30:00Z",
        "2026-03-03T13:10:00Z",
    ];
    let times: Vec<_> = nows
        .iter()
        .map(|t| chrono::DateTime::parse_from_rfc3339(t).unwrap().to_utc())
        .collect();
    let parsed = naive_users_jsonl(&users);
    let none = BTreeSet::new();
    let want = fan_out_runs(&job, &parsed, &zones_jsonl(&users), &none, &times);
    assert!(
        want.iter().any(|r| !r.quiet_held.is_empty()),
        "seed {seed}: nobody held"
    );
    assert!(
        want.iter().any(|r| !r.expired.is_empty()),
        "seed {seed}: nobody's window ended in quiet hours: {job}\n{:?}",
        want.iter()
            .map(|r| (r.delivered.len(), r.quiet_held.len(), r.expired.len()))
            .collect::<Vec<_>>()
    );
    // The plan says, before anything ran, whom the first run holds and holds out.
    s.fanout_ok(&[
        "plan",
        "job.toml",
        "--now",
        nows[0],
        "--summary",
        "plan.json",
    ]);
    let plan: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(s.path("plan.json")).unwrap()).unwrap();
    let planned = |field: &str| {
        lines_of(&plan, field)
            .into_iter()
            .filter(|((id, _), _)| id != "lazy")
            .collect::<BTreeMap<_, _>>()
    };
    assert_eq!(
        planned("quiet_held"),
        per_line(&want[0].quiet_held),
        "seed {seed}: plan"
    );
    assert_eq!(
        planned("held_out"),
        per_line(&want[0].held_out),
        "seed {seed}: plan"
    );
    let mut all_dead = BTreeSet::new();
    for (k, (now, want)) in nows.iter().zip(&want).enumerate() {
        let summary = format!("summary-{k}.json");
        let out = format!("deliveries-{k}.jsonl");
        let provider = format!("log:{out}");
        s.fanout_ok(&[
            "run",
            "job.toml",
            "-w",
            workers,
            "--quiet",
            "--now",
            now,
            "--provider",
            &provider,
            "--summary",
            &summary,
        ]);
        let run = format!("seed {seed} -w {workers} {store} run {k} at {now}");
        let got = delivered(&s.path(&out));
        // Lazy coupons are not part of this reading (logins are empty).
        assert_eq!(got, want.delivered, "{run}: deliveries");
        let summary = read_summary(&s.path(&summary));
        assert_eq!(
            lines_of(&summary, "quiet_held"),
            per_line(&want.quiet_held),
            "{run}: held"
        );
        assert_eq!(
            lines_of(&summary, "held_out"),
            per_line(&want.held_out),
            "{run}: held out"
        );
        assert_eq!(
            lines_of(&summary, "dead_lettered"),
            per_line(&want.expired),
            "{run}: expired"
        );
        all_dead.extend(want.expired.iter().cloned());
    }
    // The dead letters name why.
    let letters = std::fs::read_to_string(s.path("dead-letters.jsonl")).unwrap_or_default();
    let mut dead = BTreeSet::new();
    for l in letters.lines() {
        let v: serde_json::Value = serde_json::from_str(l).unwrap();
        assert_eq!(v["error"], "window ended during quiet hours", "{l}");
        dead.insert((
            v["campaign"].as_str().unwrap().to_owned(),
            v["occurrence"].as_str().map(str::to_owned),
            v["user"].as_u64().unwrap(),
        ));
    }
    assert_eq!(dead, all_dead, "seed {seed}: dead letters");
}

#[test]
fn quiet_hours_hold_release_and_expire_as_the_naive_reading_says() {
    for (seed, workers) in [(31, "1"), (32, "2"), (33, "4")] {
        check_quiet(seed, "file:store", workers);
    }
}

#[test]
fn quiet_hours_on_redis_equal_the_naive_reading() {
    let redis = RedisServer::start();
    check_quiet(41, &redis.url(0), "2");
}
