//! `fanout report` end to end: a real run, a conversions file, and the report checked against
//! an independent computation from the deliveries log, the conversions file and SPEC's
//! holdout rule — on the embedded store and on a real redis-server. Also the campaign
//! records both stores keep.

mod common;
mod redis_server;

use std::collections::BTreeSet;

use common::*;
use redis_server::RedisServer;
use serde_json::Value;

const USERS: u64 = 4000;
const HOLDOUT: f64 = 0.2;
const CAMPAIGN: &str = "spring-lift";

fn job() -> String {
    format!(
        r#"[inputs]
users = "synthetic:{USERS}:11"

[engine]
now = "2026-03-02T00:00:00Z"

[provider]
url = "log:deliveries.jsonl"

[[campaign]]
id = "{CAMPAIGN}"
kind = "promotion"
start = "2026-03-01T00:00:00Z"
end = "2026-03-08T00:00:00Z"
priority = "bulk"
holdout = {HOLDOUT}
body = "Hi {{user.id}}"

[[campaign]]
id = "hourly"
kind = "hot_product"
start = "2026-03-01T00:00:00Z"
end = "2026-03-08T00:00:00Z"
body = "{{goods.name}}"
[campaign.goods]
name = "Kettle"
desc = "1 l"
keywords = "tea"
[campaign.schedule]
every = "1h"
"#
    )
}

/// FNV-1a, 64 bits (written here from the published constants, not taken from fanout).
fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// SPEC "Holdouts": the users of 1..=USERS held out of `campaign` with share `holdout`.
fn expected_held_out(campaign: &str, holdout: f64) -> BTreeSet<u64> {
    let cut = (holdout * 1_000_000.0).round() as u64;
    (1..=USERS)
        .filter(|u| fnv1a64(format!("{campaign}:{u}").as_bytes()) % 1_000_000 < cut)
        .collect()
}

/// Conversion events for every user, some inside `[2026-03-01, 2026-03-15)` and some outside;
/// returns the file's text and the users with at least one event inside.
fn conversions() -> (String, BTreeSet<u64>) {
    let mut rng = Lcg(42);
    let mut text = String::new();
    let mut inside = BTreeSet::new();
    let times = [
        ("2026-02-28T23:59:59Z", false),
        ("2026-03-01T00:00:00Z", true),
        ("2026-03-05T12:00:00+08:00", true),
        ("2026-03-14T23:59:59Z", true),
        ("2026-03-15T00:00:00Z", false),
        ("2026-03-15T07:30:00+08:00", true),
        ("2026-04-01T00:00:00Z", false),
    ];
    for user in 1..=USERS {
        for _ in 0..rng.below(3) {
            let (ts, counts) = times[rng.below(times.len() as u64) as usize];
            text.push_str(&format!("{{\"user\": {user}, \"ts\": \"{ts}\"}}\n"));
            if counts {
                inside.insert(user);
            }
        }
        if rng.below(10) == 0 {
            text.push('\n');
        }
    }
    // A user who never was in the audience converts too: harmless.
    text.push_str("{\"user\": 4294967295, \"ts\": \"2026-03-02T00:00:00Z\"}\n");
    (text, inside)
}

/// The 95% interval by the textbook formula, written out here.
fn wald(c1: f64, n1: f64, c2: f64, n2: f64) -> (f64, f64, f64) {
    let (p1, p2) = (c1 / n1, c2 / n2);
    let d = p1 - p2;
    let se = (p1 * (1.0 - p1) / n1 + p2 * (1.0 - p2) / n2).sqrt();
    (d, d - 1.959_964 * se, d + 1.959_964 * se)
}

fn close(a: &Value, b: f64) -> bool {
    a.as_f64().is_some_and(|a| (a - b).abs() < 1e-6)
}

/// Runs the job against `store`, reports with conversions, and checks the report against
/// the deliveries log and the conversions file.
fn run_and_check_report(s: &Scratch, store: &str) {
    s.write("job.toml", job());
    let (text, converted) = conversions();
    s.write("conversions.jsonl", &text);
    s.fanout_ok(&["run", "job.toml", "--store", store, "-w", "2", "--quiet"]);
    let delivered: BTreeSet<u64> = pairs_once(&read_deliveries(&s.path("deliveries.jsonl")))
        .into_iter()
        .filter(|(c, _)| c == CAMPAIGN)
        .map(|(_, u)| u)
        .collect();
    assert!(!delivered.is_empty());
    let held = expected_held_out(CAMPAIGN, HOLDOUT);
    // The rule holds out about HOLDOUT of the users: the comparison below is meaningful.
    let share = held.len() as f64 / USERS as f64;
    assert!((share - HOLDOUT).abs() < 0.03, "held out {share}");

    let out = s.fanout(&[
        "report",
        "--store",
        store,
        "--campaign",
        CAMPAIGN,
        "--conversions",
        "conversions.jsonl",
        "--json",
        "report.json",
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: Value = serde_json::from_str(&std::fs::read_to_string(s.path("report.json")).unwrap())
        .expect("report JSON");
    assert_eq!(r["campaign"], CAMPAIGN);
    assert_eq!(r["record"]["kind"], "promotion");
    assert_eq!(r["record"]["priority"], "bulk");
    assert_eq!(r["record"]["start"], "2026-03-01T00:00:00Z");
    assert_eq!(r["record"]["end"], "2026-03-08T00:00:00Z");
    assert!(close(&r["record"]["holdout"], HOLDOUT));
    assert_eq!(r["outcomes"]["delivered"], delivered.len() as u64);
    assert_eq!(r["outcomes"]["in_flight"], 0);
    let c = &r["conversions"];
    assert_eq!(c["window_start"], "2026-03-01T00:00:00Z");
    assert_eq!(c["window_end"], "2026-03-15T00:00:00Z");
    assert_eq!(
        c["events"],
        text.lines().filter(|l| !l.trim().is_empty()).count() as u64
    );
    // The delivered group, from the log and the file alone.
    let d_conv = delivered.intersection(&converted).count() as u64;
    assert_eq!(c["delivered"]["users"], delivered.len() as u64);
    assert_eq!(c["delivered"]["converted"], d_conv);
    assert!(close(
        &c["delivered"]["rate"],
        d_conv as f64 / delivered.len() as f64
    ));
    // The held-out group as the store recorded it; the lift must follow from both groups by
    // the textbook formula whenever it is defined.
    let (h_users, h_conv) = (
        c["held_out"]["users"].as_u64().unwrap(),
        c["held_out"]["converted"].as_u64().unwrap(),
    );
    // The engine held out exactly SPEC's FNV-1a share, recorded it, and sent them nothing.
    assert_eq!(h_users, held.len() as u64);
    assert_eq!(h_conv, held.intersection(&converted).count() as u64);
    assert_eq!(r["outcomes"]["held_out"], held.len() as u64);
    assert!(delivered.is_disjoint(&held));
    assert_eq!(delivered.len() as u64 + held.len() as u64, USERS);
    if h_users == 0 {
        assert!(c["lift"]["absolute"].is_null() && c["lift"]["ci95"].is_null());
        assert!(c["lift"]["note"]
            .as_str()
            .unwrap()
            .contains("no held-out users"));
        assert!(stdout.contains("lift undefined"), "{stdout}");
    } else {
        let (d, low, high) = wald(
            d_conv as f64,
            delivered.len() as f64,
            h_conv as f64,
            h_users as f64,
        );
        assert!(close(&c["lift"]["absolute"], d));
        assert!(close(&c["lift"]["ci95"][0], low) && close(&c["lift"]["ci95"][1], high));
        assert!(close(
            &c["lift"]["relative"],
            d / (h_conv as f64 / h_users as f64)
        ));
        assert!(stdout.contains("95% CI"), "{stdout}");
    }
    assert!(c["lift"]["method"].as_str().unwrap().contains("Wald"));
    let count = delivered.len().to_string();
    assert!(
        stdout
            .lines()
            .any(|l| l.split_whitespace().eq(["delivered", count.as_str()])),
        "{stdout}"
    );

    // `--json -` writes the same JSON to stdout, and nothing else.
    let out = s.fanout(&[
        "report",
        "--store",
        store,
        "--campaign",
        CAMPAIGN,
        "--conversions",
        "conversions.jsonl",
        "--json",
        "-",
    ]);
    assert!(out.status.success());
    let again: Value = serde_json::from_slice(&out.stdout).expect("stdout is the JSON");
    assert_eq!(again, r);
}

#[test]
fn report_on_the_file_store_matches_the_deliveries_and_conversions() {
    let s = Scratch::new();
    run_and_check_report(&s, "file:.fanout");
    let record: Value = serde_json::from_str(
        &std::fs::read_to_string(s.path(".fanout/campaigns/spring-lift.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(record["id"], CAMPAIGN);
}

#[test]
fn report_on_redis_matches_the_deliveries_and_conversions() {
    let redis = RedisServer::start();
    let s = Scratch::new();
    run_and_check_report(&s, &redis.url(0));
    assert_eq!(
        redis.cli(&["HGET", "fanout:campaign:spring-lift", "kind"]),
        "promotion"
    );
}

#[test]
fn report_refuses_what_it_cannot_answer_with_exit_2() {
    let s = Scratch::new();
    s.write("job.toml", job());
    s.fanout_ok(&["run", "job.toml", "--quiet"]);
    let report = |args: &[&str]| {
        let mut all = vec!["report", "--store", "file:.fanout"];
        all.extend_from_slice(args);
        let out = s.fanout(&all);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert!(out.stdout.is_empty(), "{args:?}");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let err = report(&["--campaign", "never-run"]);
    assert!(
        err.contains("never-run") && err.contains("no campaign"),
        "{err}"
    );
    let err = report(&["--campaign", "not an id"]);
    assert!(err.contains("not a campaign id"), "{err}");
    let err = report(&["--campaign", "hourly"]);
    assert!(err.contains("--occurrence"), "{err}");
    let err = report(&[
        "--campaign",
        "hourly",
        "--occurrence",
        "2026-03-02T05:00:00Z",
    ]);
    assert!(err.contains("no ledger") && err.contains("05:00"), "{err}");
    s.write(
        "bad.jsonl",
        "{\"user\": 1, \"ts\": \"2026-03-02T00:00:00Z\"}\n\n{\"user\": 2, \"ts\": \"soon\"}\n",
    );
    let err = report(&["--campaign", CAMPAIGN, "--conversions", "bad.jsonl"]);
    assert!(err.contains("bad.jsonl:3: ts:"), "{err}");
    let err = report(&["--campaign", CAMPAIGN, "--conversions", "missing.jsonl"]);
    assert!(err.contains("missing.jsonl"), "{err}");
    let out = s.fanout(&["report", "--store", "file:nowhere", "--campaign", CAMPAIGN]);
    assert_eq!(out.status.code(), Some(2));

    // The occurrence the run fired reads in any RFC 3339 spelling.
    let out = s.fanout(&[
        "report",
        "--store",
        "file:.fanout",
        "--campaign",
        "hourly",
        "--occurrence",
        "2026-03-02T08:00:00+08:00",
        "--json",
        "-",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["occurrence"], "2026-03-02T00:00:00Z");
    assert_eq!(r["outcomes"]["delivered"], USERS);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_campaign_records_keep_the_first_admission_and_read_read_only() {
    use fanout::store::Store;
    let redis = RedisServer::start();
    let url = redis.url(3);
    let campaign = |end: &str| {
        fanout::job::parse_campaign(
            "test",
            &format!(
                "id = \"c-1\"\nkind = \"promotion\"\nstart = \"2026-03-01T00:00:00Z\"\n\
                 end = \"{end}\"\nbody = \"hi\"\nholdout = 0.05\n"
            ),
        )
        .unwrap()
    };
    let store = Store::connect(&url).await.unwrap();
    assert_eq!(store.campaign("c-1").await.unwrap(), None);
    let first = campaign("2026-03-08T00:00:00Z");
    store.save_campaigns(&[&first, &first]).await.unwrap();
    let saved = store.campaign("c-1").await.unwrap().unwrap();
    assert_eq!(saved.end.to_rfc3339(), "2026-03-08T00:00:00+00:00");
    assert_eq!(saved.holdout, 0.05);
    assert_eq!(
        redis.cli(&["-n", "3", "HGET", "fanout:campaign:c-1", "holdout"]),
        "0.05"
    );
    // Re-admitted with a longer window: the window follows, the first admission stays.
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    let longer = campaign("2026-03-09T00:00:00Z");
    store.save_campaigns(&[&longer]).await.unwrap();
    let reader = Store::connect_read_only(&url).await.unwrap();
    let now = reader.campaign("c-1").await.unwrap().unwrap();
    assert_eq!(now.end.to_rfc3339(), "2026-03-09T00:00:00+00:00");
    assert_eq!(now.admitted_at, saved.admitted_at);
    assert!(reader.save_campaigns(&[&longer]).await.is_err());
    // Every key is under fanout:.
    let keys = redis.cli(&["-n", "3", "KEYS", "*"]);
    assert!(keys.lines().all(|k| k.starts_with("fanout:")), "{keys}");
}
