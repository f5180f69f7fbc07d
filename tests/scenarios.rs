//! The four scenarios end to end, each against the naive reading of the same job and inputs
//! (tests/naive): the repository's own dataflows/*.toml, lazy coupons over many epochs and
//! runs, hot products over ticks, coupon grants to a segment.

mod common;
mod naive;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use chrono::{DateTime, TimeZone, Utc};
use common::*;
use naive::*;

fn repo(path: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// The repository's sample jobs, `dataflows/NAME.toml`.
const SAMPLE_JOBS: [&str; 5] = [
    "promotion-all-users",
    "coupon-on-login",
    "coupon-segment",
    "hot-products",
    "policy",
];

/// A scratch directory holding a copy of the repository's inputs/.
fn with_sample_inputs() -> Scratch {
    let s = Scratch::new();
    std::fs::create_dir(s.path("inputs")).unwrap();
    for f in ["users.jsonl", "logins.jsonl", "granted.jsonl"] {
        std::fs::copy(repo("inputs").join(f), s.path("inputs").join(f)).unwrap();
    }
    s
}

#[test]
fn every_sample_dataflow_runs_and_delivers_the_naive_set() {
    let users = naive_users_jsonl(&read(&repo("inputs/users.jsonl")));
    for name in SAMPLE_JOBS {
        let job = read(&repo(&format!("dataflows/{name}.toml")));
        for workers in ["1", "2"] {
            let s = with_sample_inputs();
            s.write("job.toml", &job);
            s.fanout_ok(&[
                "run",
                "job.toml",
                "-w",
                workers,
                "--quiet",
                "--summary",
                "summary.json",
            ]);
            let want = expected_in(&job, s.dir.path(), &users);
            assert!(!want.is_empty(), "{name} should deliver something");
            assert_eq!(
                delivered(&s.path("deliveries.jsonl")),
                want,
                "{name} at -w {workers}"
            );
            read_summary(&s.path("summary.json"));
        }
    }
}

/// `plan` and `run` read a job the same way. On every sample job, with granted pairs naming
/// every campaign (a hot product's included: they do not apply to its occurrences), each
/// fan-out's eligible count in the plan is what the naive reading delivers and what the run
/// then reports, and so is its granted count; a lazy coupon's run grants no more than the plan
/// counts; after the run, the plan finds every fan-out done; the run needs no more provider
/// batches than the plan counts.
#[test]
fn plan_and_run_agree_on_every_sample_job() {
    let users = naive_users_jsonl(&read(&repo("inputs/users.jsonl")));
    for name in SAMPLE_JOBS {
        let s = with_sample_inputs();
        let mut job: toml::Value = toml::from_str(&read(&repo(&format!("dataflows/{name}.toml"))))
            .expect("sample job is TOML");
        let mut granted = read(&s.path("inputs/granted.jsonl"));
        for c in job["campaign"].as_array().unwrap() {
            for id in users.keys().step_by(7) {
                granted.push_str(&format!("{{\"campaign\": {}, \"user\": {id}}}\n", c["id"]));
            }
        }
        s.write("inputs/all-granted.jsonl", &granted);
        job["inputs"]
            .as_table_mut()
            .unwrap()
            .insert("granted".into(), "inputs/all-granted.jsonl".into());
        let per_batch = (job.get("engine"))
            .and_then(|e| e.get("batch_max_messages"))
            .and_then(toml::Value::as_integer)
            .map_or(100, |n| n as u64);
        let job = toml::to_string(&job).unwrap();
        s.write("job.toml", &job);
        let plan_of = |file: &str| {
            s.fanout_ok(&["plan", "job.toml", "--summary", file]);
            serde_json::from_str::<serde_json::Value>(&read(&s.path(file))).expect("plan JSON")
        };
        let before = plan_of("plan.json");
        s.fanout_ok(&["run", "job.toml", "--quiet", "--summary", "summary.json"]);
        let run = read_summary(&s.path("summary.json"));
        let after = plan_of("plan-after.json");
        let want_run = expected_run_in(&job, s.dir.path(), &users);
        let (want, held, capped) = (want_run.delivered, want_run.held_out, want_run.capped);
        let lines = before["campaigns"].as_array().unwrap();
        assert!(!lines.is_empty(), "{name}: an empty plan");
        // The naive pairs of `set` for a plan line's campaign occurrence.
        let of_line = |line: &serde_json::Value, set: &std::collections::BTreeSet<Pair>| {
            set.iter()
                .filter(|(c, o, _)| {
                    Some(c.as_str()) == line["id"].as_str()
                        && o.as_deref() == line["occurrence"].as_str()
                })
                .count() as u64
        };
        for (k, line) in lines.iter().enumerate() {
            let id = line["id"].as_str().unwrap();
            let (ran, later) = (&run["campaigns"][k], &after["campaigns"][k]);
            assert_eq!(ran["id"], line["id"], "{name}: campaign order");
            let (naive_held, naive_capped) = (of_line(line, &held), of_line(line, &capped));
            let naive = of_line(line, &want) + naive_held + naive_capped;
            let n = |v: &serde_json::Value, k: &str| v[k].as_u64().unwrap_or(0);
            assert_eq!(n(ran, "eligible"), naive, "{name} {id}: run vs naive");
            assert_eq!(n(ran, "held_out"), naive_held, "{name} {id}: run vs naive");
            assert_eq!(n(ran, "capped"), naive_capped, "{name} {id}: run vs naive");
            if line["at_login"].as_bool() == Some(true) {
                assert!(
                    naive <= n(line, "eligible"),
                    "{name} {id}: lazy grants beyond plan"
                );
                continue;
            }
            assert_eq!(n(line, "eligible"), naive, "{name} {id}: plan vs naive");
            assert_eq!(
                n(line, "held_out"),
                naive_held,
                "{name} {id}: plan vs naive"
            );
            assert_eq!(
                n(line, "capped"),
                naive_capped,
                "{name} {id}: plan vs naive"
            );
            assert_eq!(
                n(line, "already_granted"),
                n(ran, "already_granted"),
                "{name} {id}: granted, plan vs run"
            );
            assert_eq!(n(later, "eligible"), 0, "{name} {id}: left after the run");
            assert_eq!(
                n(later, "already_granted"),
                n(line, "audience"),
                "{name} {id}"
            );
        }
        // Provider batches. The plan counts them per candidate batch of the scan (a stretch of
        // a bucket); a run merges a worker's stretches into push tasks (and capped campaigns'
        // users of a scan activation into one group) and cuts each task into batches, so it
        // needs at most the plan's count, and at least each campaign's sends in full batches.
        let at_login = lines.iter().any(|l| l["at_login"].as_bool() == Some(true));
        if !at_login {
            let planned: u64 = lines
                .iter()
                .map(|l| l["batches"].as_u64().unwrap_or(0))
                .sum();
            let ran = run["batches"].as_u64().unwrap();
            let full: u64 = (lines.iter())
                .map(|l| of_line(l, &want).div_ceil(per_batch))
                .sum();
            assert!(
                full <= ran && ran <= planned,
                "{name}: batches, run {ran} outside [{full}, plan {planned}]"
            );
        }
    }
}

const WINDOWS: &str = r#"
[[campaign]]
id = "welcome"
kind = "coupon"
start = "2026-03-01T00:00:00Z"
end = "2026-03-08T00:00:00Z"
body = "Hi {user.id}: {coupon.id} worth {coupon.amount}"
[campaign.coupon]
coupon_id = "C-1"
amount = 10
delivery = "on_login"

[[campaign]]
id = "sporty"
kind = "coupon"
start = "2026-03-03T00:00:00Z"
end = "2026-03-10T00:00:00Z"
body = "Hi {user.id}: {coupon.id}"
[campaign.audience]
tags_any = ["sports", "运动"]
min_level = 2
[campaign.coupon]
coupon_id = "C-2"
amount = 5.5
delivery = "on_login"

[[campaign]]
id = "moms"
kind = "coupon"
start = "2026-02-20T00:00:00Z"
end = "2026-03-05T00:00:00Z"
body = "Hi {user.id}: {coupon.id}"
[campaign.audience]
tags_all = ["mom"]
[campaign.coupon]
coupon_id = "C-3"
amount = 20
delivery = "on_login"
"#;

fn lazy_job(per_epoch: usize) -> String {
    format!(
        "[inputs]\nusers = \"users.jsonl\"\nlogins = \"logins.jsonl\"\ngranted = \"granted.jsonl\"\n\n[engine]\nnow = \"2026-03-04T00:00:00Z\"\nlogins_per_epoch = {per_epoch}\n\n[store]\nurl = \"file:store\"\n\n[provider]\nurl = \"log:deliveries.jsonl\"\nconcurrency = 8\n{WINDOWS}"
    )
}

fn test_users(seed: u64, n: usize) -> Vec<TUser> {
    let vocab = ["sports", "mom", "tech", "运动"];
    let mut r = Lcg(seed);
    (0..n)
        .map(|_| TUser {
            id: 1 + r.below(5000),
            level: r.below(6),
            points: r.below(10_000),
            tags: vocab
                .iter()
                .filter(|_| r.below(3) == 0)
                .map(|t| t.to_string())
                .collect(),
        })
        .collect()
}

fn users_jsonl(users: &[TUser]) -> String {
    users
        .iter()
        .map(|u| {
            let tags: Vec<String> = u.tags.iter().map(|t| format!("\"{t}\"")).collect();
            format!(
                "{{\"id\": {}, \"level\": {}, \"points\": {}, \"tags\": [{}]}}\n",
                u.id,
                u.level,
                u.points,
                tags.join(",")
            )
        })
        .collect()
}

/// Logins of known and unknown users, repeated, some outside every window.
fn test_logins(seed: u64, n: usize) -> Vec<NLogin> {
    let mut r = Lcg(seed);
    let base = Utc.with_ymd_and_hms(2026, 2, 18, 0, 0, 0).unwrap();
    (0..n)
        .map(|_| {
            let user = if r.below(10) == 0 {
                6000 + r.below(1000)
            } else {
                1 + r.below(5000)
            };
            (
                user,
                base + chrono::Duration::minutes(r.below(60 * 24 * 24) as i64),
            )
        })
        .collect()
}

fn logins_text(logins: &[NLogin]) -> String {
    logins
        .iter()
        .map(|(u, ts)| format!("{{\"user\": {u}, \"ts\": \"{}\"}}\n", ts.to_rfc3339()))
        .collect()
}

#[test]
fn lazy_coupons_equal_the_naive_grants_over_many_epochs() {
    let us = test_users(21, 3000);
    let users: BTreeMap<u64, TUser> = us.iter().map(|u| (u.id, u.clone())).collect();
    let logins = test_logins(22, 4000);
    let granted: BTreeSet<(String, u64)> = users
        .keys()
        .take(40)
        .map(|&u| ("welcome".to_string(), u))
        .collect();
    let granted_text: String = granted
        .iter()
        .map(|(c, u)| format!("{{\"campaign\": \"{c}\", \"user\": {u}}}\n"))
        .collect();
    let job = lazy_job(97);
    let want = expected(&job, &users, &logins, &granted, None);
    // The inputs exercise what they should: repeated logins, several coupons per user.
    let per_user = want
        .iter()
        .fold(BTreeMap::<u64, usize>::new(), |mut m, (_, _, u)| {
            *m.entry(*u).or_default() += 1;
            m
        });
    assert!(
        per_user.values().any(|&n| n >= 2),
        "some user gets several coupons"
    );
    assert!(want.len() < logins.len(), "logins repeat");
    let unknown = logins
        .iter()
        .filter(|(u, _)| !users.contains_key(u))
        .count() as u64;

    for workers in ["1", "2"] {
        let s = Scratch::new();
        s.write("users.jsonl", users_jsonl(&us));
        s.write("logins.jsonl", logins_text(&logins));
        s.write("granted.jsonl", &granted_text);
        s.write("job.toml", &job);
        s.fanout_ok(&[
            "run",
            "job.toml",
            "-w",
            workers,
            "--quiet",
            "--summary",
            "summary.json",
        ]);
        assert_eq!(
            delivered(&s.path("deliveries.jsonl")),
            want,
            "at -w {workers}"
        );
        let summary = read_summary(&s.path("summary.json"));
        assert_eq!(summary["logins_unknown_user"], unknown);
        assert_eq!(summary["logins"], logins.len() as u64 - unknown);
        for id in ["welcome", "sporty", "moms"] {
            let out = s.fanout(&["grants", "--store", "file:store", "--campaign", id]);
            let printed: Vec<u64> = String::from_utf8(out.stdout)
                .unwrap()
                .lines()
                .map(|l| l.parse().unwrap())
                .collect();
            let mine: Vec<u64> = want
                .iter()
                .filter(|(c, _, _)| c == id)
                .map(|(_, _, u)| *u)
                .collect();
            assert_eq!(printed, mine, "grants of {id}");
        }
    }
}

#[test]
fn each_batch_of_logins_grants_exactly_the_new_pairs() {
    // Logins arrive in three runs against one store (and many epochs inside each run): every
    // run must deliver exactly the pairs that became eligible with its logins, never one
    // granted before.
    let us = test_users(31, 2000);
    let users: BTreeMap<u64, TUser> = us.iter().map(|u| (u.id, u.clone())).collect();
    let logins = test_logins(32, 3000);
    let s = Scratch::new();
    s.write("users.jsonl", users_jsonl(&us));
    s.write("granted.jsonl", "");
    s.write("job.toml", lazy_job(50));
    let none = BTreeSet::new();
    let mut before = BTreeSet::new();
    let mut seen_lines = 0;
    for (k, part) in logins.chunks(1000).enumerate() {
        s.write("logins.jsonl", logins_text(part));
        s.fanout_ok(&["run", "job.toml", "-w", "2", "--quiet"]);
        let so_far = expected(
            &lazy_job(50),
            &users,
            &logins[..1000 * (k + 1)],
            &none,
            None,
        );
        let text = read(&s.path("deliveries.jsonl"));
        let new_lines: Vec<&str> = text.lines().skip(seen_lines).collect();
        seen_lines += new_lines.len();
        let new: BTreeSet<(String, Option<String>, u64)> = new_lines
            .iter()
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).unwrap();
                (
                    v["campaign"].as_str().unwrap().to_owned(),
                    None,
                    v["user"].as_u64().unwrap(),
                )
            })
            .collect();
        assert_eq!(new.len(), new_lines.len(), "run {k} delivered a pair twice");
        let want: BTreeSet<_> = so_far.difference(&before).cloned().collect();
        assert!(!want.is_empty());
        assert_eq!(new, want, "run {k}: exactly the new pairs");
        before = so_far;
    }
    // And the log as a whole holds each pair once.
    delivered(&s.path("deliveries.jsonl"));
}

const HOT: &str = r#"[inputs]
users = "users.jsonl"

[store]
url = "file:store"

[provider]
url = "log:deliveries.jsonl"

[[campaign]]
id = "trail"
kind = "hot_product"
start = "2026-03-02T00:00:00Z"
end = "2026-03-03T00:00:00Z"
title = "Hot: {goods.name}"
body = "{goods.name} for level {user.level}"
[campaign.audience]
tags_any = ["sports"]
[campaign.goods]
name = "Trail shoes"
[campaign.schedule]
every = "1h"

[[campaign]]
id = "watch"
kind = "hot_product"
start = "2026-03-01T00:00:00Z"
end = "2026-03-08T00:00:00Z"
body = "{goods.name}"
[campaign.audience]
min_level = 3
[campaign.goods]
name = "Smart watch"
[campaign.schedule]
every = "6h"
"#;

#[test]
fn hot_products_push_once_per_tick() {
    let us = test_users(41, 2000);
    let users: BTreeMap<u64, TUser> = us.iter().map(|u| (u.id, u.clone())).collect();
    let s = Scratch::new();
    s.write("users.jsonl", users_jsonl(&us));
    s.write("job.toml", HOT);
    let at =
        |t: &str| -> DateTime<Utc> { DateTime::parse_from_rfc3339(t).unwrap().with_timezone(&Utc) };
    let none = BTreeSet::new();
    let mut all = BTreeSet::new();
    // Two ticks of "trail", the second also a new tick of "watch"; a re-run inside a tick
    // pushes nothing new; after "trail"'s window only "watch" fires.
    for (now, new_tick) in [
        ("2026-03-02T09:10:00Z", true),
        ("2026-03-02T09:50:00Z", false),
        ("2026-03-02T12:05:00Z", true),
        ("2026-03-04T01:00:00Z", true),
    ] {
        let before = delivered(&s.path("deliveries.jsonl"));
        s.fanout_ok(&[
            "run",
            "job.toml",
            "--now",
            now,
            "-w",
            "2",
            "--quiet",
            "--summary",
            "summary.json",
        ]);
        let after = delivered(&s.path("deliveries.jsonl"));
        let want = expected(HOT, &users, &[], &none, Some(at(now)));
        assert!(want.is_subset(&after), "tick at {now} fully delivered");
        let new: BTreeSet<_> = after.difference(&before).cloned().collect();
        if new_tick {
            assert!(!new.is_empty());
            assert_eq!(
                new,
                want.difference(&all).cloned().collect(),
                "new pairs at {now}"
            );
        } else {
            assert!(new.is_empty(), "a re-run of the same tick pushed again");
        }
        all.extend(want);
        let summary = read_summary(&s.path("summary.json"));
        if now.starts_with("2026-03-04") {
            let trail = campaign_line(&summary, "trail");
            assert!(trail["skipped"].as_str().unwrap().contains("window"));
        }
    }
    // Bodies name the goods; occurrences are the tick starts.
    for l in read(&s.path("deliveries.jsonl")).lines() {
        let v: serde_json::Value = serde_json::from_str(l).unwrap();
        let goods = if v["campaign"] == "trail" {
            "Trail shoes"
        } else {
            "Smart watch"
        };
        assert!(v["body"].as_str().unwrap().starts_with(goods));
        let occurrence = v["occurrence"].as_str().unwrap();
        assert!(occurrence.ends_with(":00:00Z"), "{occurrence}");
    }
}
