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

/// SPEC "Frequency caps", with the store's limit: a user's last 5 sends are kept, so a cap
/// may allow 1 to 5 of them. Anything else is bad input naming the cap.
#[test]
fn a_cap_outside_one_to_five_is_refused_naming_its_field() {
    let mut rng = Lcg(5);
    let s = Scratch::new();
    s.write("users.jsonl", users_jsonl(&mut rng, 100));
    s.write("logins.jsonl", "");
    let base = job(&mut rng, "file:store");
    for (caps, field) in [
        (
            "[{ max = 2, per = \"24h\" }, { max = 6, per = \"7d\" }]",
            "policy.frequency_caps[1].max",
        ),
        (
            "[{ max = 0, per = \"24h\" }]",
            "policy.frequency_caps[0].max",
        ),
    ] {
        s.write(
            "job.toml",
            base.replace(
                "[policy]\n",
                &format!("[policy]\nfrequency_caps = {caps}\n"),
            ),
        );
        for command in ["run", "plan"] {
            let out = s.fanout(&[command, "job.toml", "--quiet"]);
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(2), "{command} {caps}: {stderr}");
            assert!(stderr.contains(field), "{command} {caps}: {stderr}");
        }
        assert!(!s.path("deliveries.jsonl").exists(), "nothing may be sent");
    }
}

/// A job whose campaigns open at 00:00 (`morning`) and 11:00 (the rest) on 2026-03-02, under
/// one cap of 2 a day: `blast` (bulk) listed before `deal` (normal), and a transactional
/// `receipt` that caps neither limit nor count.
fn priority_job(store: &str) -> String {
    let campaign = |id: &str, start: &str, priority: &str| {
        format!(
            "\n[[campaign]]\nid = \"{id}\"\nkind = \"promotion\"\nstart = \"2026-03-02T{start}:00Z\"\n\
             end = \"2026-03-08T00:00:00Z\"\npriority = \"{priority}\"\ntitle = \"{id}\"\n\
             body = \"{id} for {{user.id}}\"\n"
        )
    };
    format!(
        "[inputs]\nusers = \"users.jsonl\"\n\n[engine]\nbucket_size = 100\nbatch_max_messages = 20\n\
         \n[store]\nurl = \"{store}\"\n\n[provider]\nurl = \"log:deliveries.jsonl\"\nconcurrency = 16\n\
         \n[policy]\nfrequency_caps = [{{ max = 2, per = \"24h\" }}]\n{}{}{}\
         \n[[campaign]]\nid = \"deal\"\nkind = \"coupon\"\nstart = \"2026-03-02T11:00:00Z\"\n\
         end = \"2026-03-08T00:00:00Z\"\ntitle = \"deal\"\nbody = \"{{coupon.id}}\"\n\
         [campaign.coupon]\ncoupon_id = \"D-1\"\namount = 5\ndelivery = \"push\"\n",
        campaign("morning", "00:00", "normal"),
        campaign("blast", "11:00", "bulk"),
        campaign("receipt", "11:00", "transactional"),
    )
}

/// SPEC "Frequency caps": a run that offers a user more capped campaigns than a cap allows
/// takes them in priority order, then job-file order. `morning` used one of two daily sends at
/// 09:00; at 12:00 `deal` (normal) takes the last one although `blast` (bulk) comes first in
/// the file, and `receipt` (transactional) goes to everyone. A re-run offers nothing again.
fn check_priority_order(store: &str) {
    let mut rng = Lcg(71);
    let s = Scratch::new();
    let users = users_jsonl(&mut rng, 400);
    s.write("users.jsonl", &users);
    let job = priority_job(store);
    s.write("job.toml", &job);
    let parsed = naive_users_jsonl(&users);
    let n = parsed.len() as u64;
    let at = |t: &str| chrono::DateTime::parse_from_rfc3339(t).unwrap().to_utc();
    let nows = ["2026-03-02T09:00:00Z", "2026-03-02T12:00:00Z"];
    let want = fan_out_runs(
        &job,
        &parsed,
        &BTreeMap::new(),
        &BTreeSet::new(),
        &nows.map(at),
    );
    for (k, now) in nows.iter().enumerate() {
        let summary = format!("summary-{k}.json");
        let log = format!("log:deliveries-{k}.jsonl");
        let args = ["run", "job.toml", "--now", now, "-w", "2", "--quiet"];
        s.fanout_ok(&[&args[..], &["--provider", &log, "--summary", &summary]].concat());
        let got = delivered(&s.path(&format!("deliveries-{k}.jsonl")));
        assert_eq!(got, want[k].delivered, "{store} run at {now}: deliveries");
    }
    let summary = read_summary(&s.path("summary-1.json"));
    let count = |id: &str, field: &str| campaign_line(&summary, id)[field].as_u64().unwrap();
    assert_eq!(
        count("blast", "capped"),
        n,
        "{store}: blast yields the last slot"
    );
    assert_eq!(count("blast", "delivered"), 0, "{store}");
    assert_eq!(
        count("deal", "delivered") + count("deal", "unreachable"),
        n,
        "{store}: deal takes the last slot"
    );
    let sent = count("receipt", "delivered") + count("receipt", "unreachable");
    assert_eq!(sent, n, "{store}: receipt");
    assert_eq!(want[1].capped.len() as u64, n, "the naive reading agrees");
    let out = s.fanout(&[
        "report",
        "--store",
        store,
        "--campaign",
        "blast",
        "--json",
        "-",
    ]);
    assert!(out.status.success(), "report: {out:?}");
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).expect("report JSON");
    assert_eq!(r["outcomes"]["capped"], n, "{store}: report {r}");
    assert_eq!(r["outcomes"]["delivered"], 0, "{store}: report {r}");
    // Capped is final for the occurrence: the same run again offers nobody anything.
    let args = ["run", "job.toml", "--now", nows[1], "-w", "1", "--quiet"];
    let again = ["--provider", "log:again.jsonl", "--summary", "again.json"];
    s.fanout_ok(&[&args[..], &again[..]].concat());
    assert!(delivered(&s.path("again.jsonl")).is_empty(), "{store}");
    for c in read_summary(&s.path("again.json"))["campaigns"]
        .as_array()
        .unwrap()
    {
        assert_eq!(c["eligible"], 0, "{store}: re-run of {c}");
    }
}

#[test]
fn a_normal_campaign_takes_the_last_slot_before_a_bulk_one_listed_first() {
    check_priority_order("file:store");
    let redis = RedisServer::start();
    check_priority_order(&redis.url(0));
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

/// [`quiet_job`] with two frequency caps, a short one (a day or less, one or two sends) and a
/// long one, and the hot product at normal or bulk priority: the bulk promotion comes first
/// in the file, so a run's order of offers is not the file's.
fn capped_job(rng: &mut Lcg, store: &str) -> String {
    let job = quiet_job(rng, store);
    let caps = format!(
        "frequency_caps = [{{ max = {}, per = \"{}\" }}, {{ max = {}, per = \"{}\" }}]\n",
        1 + rng.below(2),
        ["6h", "12h", "24h"][rng.below(3) as usize],
        2 + rng.below(3),
        ["48h", "7d"][rng.below(2) as usize],
    );
    let hot = ["normal", "bulk"][rng.below(2) as usize];
    job.replace("[policy]\n", &format!("[policy]\n{caps}"))
        .replace(
            "id = \"hot\"\nkind = \"hot_product\"\n",
            &format!("id = \"hot\"\nkind = \"hot_product\"\npriority = \"{hot}\"\n"),
        )
}

/// Pairs of a summary's lines and of a delivery log, by outcome.
fn lines_of(summary: &serde_json::Value, field: &str) -> BTreeMap<(String, Option<String>), u64> {
    lines_sum(summary, &[field])
}

/// Per line of a summary, the sum of `fields` (lines where it is 0 left out).
fn lines_sum(
    summary: &serde_json::Value,
    fields: &[&str],
) -> BTreeMap<(String, Option<String>), u64> {
    let mut out = BTreeMap::new();
    for c in summary["campaigns"].as_array().unwrap() {
        let key = (
            c["id"].as_str().unwrap().to_owned(),
            c["occurrence"].as_str().map(str::to_owned),
        );
        let n: u64 = fields.iter().map(|f| c[f].as_u64().unwrap_or(0)).sum();
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

/// Every pair a naive run considers (its eligible pairs).
fn considered(run: &NRun) -> BTreeSet<Pair> {
    [
        &run.delivered,
        &run.held_out,
        &run.quiet_held,
        &run.expired,
        &run.capped,
    ]
    .into_iter()
    .flatten()
    .cloned()
    .collect()
}

/// The two kinds of sequence [`check_runs`] drives.
#[derive(Clone, Copy, PartialEq)]
enum Mix {
    /// [`quiet_job`] without logins.
    Quiet,
    /// [`capped_job`] with logins.
    Capped,
}

/// Runs a generated job at several increasing times against one store, then once more at
/// the last time, and compares every run with the naive reading: what it sends, holds,
/// releases, caps and dead-letters; then the plan of the first run, the store's report of
/// what was capped and held out, and the dead letters' reason.
fn check_runs(seed: u64, store: &str, workers: &str, mix: Mix) {
    let mut rng = Lcg(seed);
    let s = Scratch::new();
    let users = zoned_users(&mut rng, 2500);
    s.write("users.jsonl", &users);
    let logins = match mix {
        Mix::Quiet => String::new(),
        Mix::Capped => logins_jsonl(&mut rng, 7600),
    };
    s.write("logins.jsonl", &logins);
    let job = match mix {
        Mix::Quiet => quiet_job(&mut rng, store),
        Mix::Capped => capped_job(&mut rng, store),
    };
    s.write("job.toml", &job);
    // Night in Europe and Asia first (held), then the segment coupon's window ends (those
    // still held expire), then morning releases the hot product's earlier occurrences; the
    // last run again at its time offers nothing new.
    let nows = [
        "2026-03-02T22:30:00Z",
        "2026-03-03T06:00:00Z",
        "2026-03-03T10:30:00Z",
        "2026-03-03T13:10:00Z",
        "2026-03-03T13:10:00Z",
    ];
    let times: Vec<_> = nows
        .iter()
        .map(|t| chrono::DateTime::parse_from_rfc3339(t).unwrap().to_utc())
        .collect();
    let parsed = naive_users_jsonl(&users);
    let none = BTreeSet::new();
    let logins = naive::logins_jsonl(&logins);
    let zones = zones_jsonl(&users);
    let want = runs(&job, &parsed, &zones, &logins, &none, &times);
    let counts = || {
        want.iter()
            .map(|r| {
                let n = [&r.delivered, &r.quiet_held, &r.expired, &r.capped];
                n.map(BTreeSet::len)
            })
            .collect::<Vec<_>>()
    };
    assert!(
        want.iter().any(|r| !r.quiet_held.is_empty()),
        "seed {seed}: nobody held"
    );
    assert!(
        want.iter().any(|r| !r.expired.is_empty()),
        "seed {seed}: nobody's window ended in quiet hours: {job}\n{:?}",
        counts()
    );
    assert!(
        considered(&want[4]).is_subset(&want[4].quiet_held),
        "seed {seed}: the naive re-run offers something again"
    );
    if mix == Mix::Capped {
        // Caps bind in some run and allow sends after they bound in another.
        let capped = |r: &NRun| !r.capped.is_empty();
        assert!(
            want[1..].iter().any(capped),
            "seed {seed}: no cap bound after the first run: {:?}",
            counts()
        );
        assert!(
            want.iter().filter(|r| capped(r)).count() >= 2,
            "seed {seed}: caps bound in one run only: {:?}",
            counts()
        );
    }
    // The plan says, before anything ran, whom the first run holds, holds out and caps.
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
    let fan_outs = |pairs: &BTreeSet<Pair>| {
        per_line(pairs)
            .into_iter()
            .filter(|((id, _), _)| id != "lazy")
            .collect::<BTreeMap<_, _>>()
    };
    let planned = |field: &str| {
        lines_of(&plan, field)
            .into_iter()
            .filter(|((id, _), _)| id != "lazy")
            .collect::<BTreeMap<_, _>>()
    };
    for (field, pairs) in [
        ("quiet_held", &want[0].quiet_held),
        ("held_out", &want[0].held_out),
        ("capped", &want[0].capped),
    ] {
        assert_eq!(planned(field), fan_outs(pairs), "seed {seed}: plan {field}");
    }
    let mut all_dead = BTreeSet::new();
    for (k, (now, want)) in nows.iter().zip(&want).enumerate() {
        let summary = format!("summary-{k}.json");
        let out = format!("deliveries-{k}.jsonl");
        let provider = format!("log:{out}");
        // The repeated last run at another worker count.
        let w = if k == 4 { "3" } else { workers };
        s.fanout_ok(&[
            "run",
            "job.toml",
            "-w",
            w,
            "--quiet",
            "--now",
            now,
            "--provider",
            &provider,
            "--summary",
            &summary,
        ]);
        let run = format!("seed {seed} -w {w} {store} run {k} at {now}");
        let got = delivered(&s.path(&out));
        if got != want.delivered {
            let extra: Vec<_> = got.difference(&want.delivered).take(10).collect();
            let missing: Vec<_> = want.delivered.difference(&got).take(10).collect();
            panic!(
                "{run}: deliveries: {} sent, {} expected; sent and not expected (first 10): \
                 {extra:?}; expected and not sent (first 10): {missing:?}",
                got.len(),
                want.delivered.len()
            );
        }
        let summary = read_summary(&s.path(&summary));
        for (field, pairs) in [
            ("quiet_held", &want.quiet_held),
            ("held_out", &want.held_out),
            ("dead_lettered", &want.expired),
            ("capped", &want.capped),
        ] {
            assert_eq!(lines_of(&summary, field), per_line(pairs), "{run}: {field}");
        }
        assert_eq!(
            lines_sum(&summary, &["delivered", "unreachable"]),
            per_line(&want.delivered),
            "{run}: delivered or unreachable"
        );
        assert_eq!(
            lines_of(&summary, "eligible"),
            per_line(&considered(want)),
            "{run}: eligible"
        );
        all_dead.extend(want.expired.iter().cloned());
    }
    // The store recorded who was capped and held out, as `fanout report` reads it.
    let ever = |f: fn(&NRun) -> &BTreeSet<Pair>| -> BTreeMap<_, _> {
        per_line(&want.iter().flat_map(|r| f(r).iter().cloned()).collect())
    };
    let (capped, held_out) = (ever(|r| &r.capped), ever(|r| &r.held_out));
    for (id, occurrence) in capped.keys().chain(held_out.keys()) {
        let mut report = vec!["report", "--store", store, "--campaign", id, "--json", "-"];
        if let Some(o) = occurrence {
            report.extend(["--occurrence", o]);
        }
        let out = s.fanout(&report);
        assert!(out.status.success(), "{report:?}: {out:?}");
        let r: serde_json::Value = serde_json::from_slice(&out.stdout).expect("report JSON");
        let key = (id.clone(), occurrence.clone());
        for (field, want) in [("capped", &capped), ("held_out", &held_out)] {
            if field == "capped" && mix == Mix::Quiet {
                continue;
            }
            let n = want.get(&key).copied().unwrap_or(0);
            assert_eq!(r["outcomes"][field], n, "seed {seed}: report {key:?}: {r}");
        }
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
        check_runs(seed, "file:store", workers, Mix::Quiet);
    }
}

#[test]
fn quiet_hours_on_redis_equal_the_naive_reading() {
    let redis = RedisServer::start();
    check_runs(41, &redis.url(0), "2", Mix::Quiet);
}

/// Frequency caps over a sequence of runs with every other rule at work (holdouts, the
/// control group, quiet hours across zones, a transactional and a lazy coupon that caps
/// neither limit nor count): each run equals the naive reading at 1, 2 and 4 workers.
#[test]
fn frequency_caps_across_runs_equal_the_naive_reading() {
    for (seed, workers) in [(51, "1"), (52, "2"), (53, "4")] {
        check_runs(seed, "file:store", workers, Mix::Capped);
    }
}

#[test]
fn frequency_caps_on_redis_equal_the_naive_reading() {
    let redis = RedisServer::start();
    for (db, (seed, workers)) in [(61, "2"), (62, "4")].into_iter().enumerate() {
        check_runs(seed, &redis.url(db as u8), workers, Mix::Capped);
    }
}
