//! Users read from a real redis-server: `fanout gen users --out redis://…` then every sample
//! job equals the naive expectation over `synthetic_user` (the generator's own definition,
//! not fanout's loader); hand-written hashes (sparse, tagless, tokenless, zoned, one missing)
//! load as written; a bad field (an unknown tz too) stops the run naming key and field; only
//! the buckets asked for are fetched; Redis users with the Redis store.

mod common;
mod naive;
mod redis_server;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use common::*;
use fanout::model::User;
use fanout::sources::synthetic::synthetic_user;
use fanout::sources::{LoadOptions, UserSource};
use naive::*;
use redis_server::RedisServer;

fn repo(path: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn tuser(u: &User) -> TUser {
    TUser {
        id: u64::from(u.id),
        level: u64::from(u.level),
        points: u.points,
        tags: u.tags.clone(),
    }
}

/// A scratch directory holding the sample job `name` and the sample inputs.
fn sample(name: &str) -> (Scratch, String) {
    let s = Scratch::new();
    std::fs::create_dir(s.path("inputs")).unwrap();
    for f in ["users.jsonl", "logins.jsonl", "granted.jsonl"] {
        std::fs::copy(repo("inputs").join(f), s.path("inputs").join(f)).unwrap();
    }
    let job = std::fs::read_to_string(repo(&format!("dataflows/{name}.toml"))).unwrap();
    s.write("job.toml", &job);
    (s, job)
}

/// `redis-cli HSET key field value …`, asserting the server took it.
fn hset(redis: &RedisServer, db: u8, key: &str, fields: &[(&str, &str)]) {
    let db = db.to_string();
    let mut args = vec!["-n", &db, "HSET", key];
    for (k, v) in fields {
        args.extend([*k, *v]);
    }
    let out = redis.cli(&args);
    assert!(out.parse::<u64>().is_ok(), "HSET {key}: {out}");
}

fn set_max_id(redis: &RedisServer, db: u8, max_id: u32) {
    let (db, max) = (db.to_string(), max_id.to_string());
    assert_eq!(
        redis.cli(&["-n", &db, "SET", "fanout:users:max_id", &max]),
        "OK"
    );
}

#[test]
fn generated_users_in_redis_run_every_sample_job_like_the_naive_reading() {
    let redis = RedisServer::start();
    let (count, seed) = (2500u32, 7u64);
    let users_url = redis.url(0);
    let gen = Scratch::new();
    gen.fanout_ok(&[
        "gen",
        "users",
        "--count",
        &count.to_string(),
        "--seed",
        &seed.to_string(),
        "--out",
        &users_url,
    ]);
    assert_eq!(
        redis.cli(&["GET", "fanout:users:max_id"]),
        count.to_string()
    );
    let users: BTreeMap<u64, TUser> = (1..=count)
        .map(|id| (u64::from(id), tuser(&synthetic_user(seed, id))))
        .collect();

    for name in [
        "promotion-all-users",
        "coupon-segment",
        "coupon-on-login",
        "hot-products",
    ] {
        // The job's own bucket size, and a small one: many buckets, several pipelines.
        for bucket_size in ["1000", "7"] {
            let (s, job) = sample(name);
            s.fanout_ok(&[
                "run",
                "job.toml",
                "--users",
                &users_url,
                "-w",
                "2",
                "--bucket-size",
                bucket_size,
                "--quiet",
                "--summary",
                "summary.json",
            ]);
            let want = expected_in(&job, s.dir.path(), &users);
            assert!(!want.is_empty(), "{name}: the sample delivers something");
            assert_eq!(
                delivered(&s.path("deliveries.jsonl")),
                want,
                "{name}, bucket size {bucket_size}"
            );
            let summary = read_summary(&s.path("summary.json"));
            assert_eq!(summary["skipped_lines"], 0, "{name}");
        }
    }

    // `fanout plan` over the same users: the naive audience of each campaign.
    let (s, job) = sample("promotion-all-users");
    s.fanout_ok(&[
        "plan",
        "job.toml",
        "--users",
        &users_url,
        "--summary",
        "plan.json",
    ]);
    let plan: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(s.path("plan.json")).unwrap()).unwrap();
    assert_eq!(plan["users"], u64::from(count));
    let (campaigns, _) = campaigns(&job);
    for c in &campaigns {
        let audience = users.values().filter(|u| c.persona.matches(u)).count();
        let line = plan["campaigns"]
            .as_array()
            .unwrap()
            .iter()
            .find(|l| l["id"] == c.id.as_str())
            .unwrap();
        assert_eq!(line["audience"], audience as u64, "{}", c.id);
    }
}

/// Hashes written by hand: sparse ids, tags, no token, no tags, a missing hash in the middle,
/// a hash above `max_id` (not a user), fields fanout does not know.
fn write_hand_users(redis: &RedisServer, db: u8) -> Vec<User> {
    let user = |id: u32, level: u8, points: u64, tags: &[&str], token: Option<&str>| User {
        id,
        level,
        points,
        tags: tags.iter().map(|t| t.to_string()).collect(),
        token: token.map(str::to_owned),
        tz: None,
    };
    let mut want = vec![
        user(1, 3, 1200, &["mom", "sports"], Some("tok-1")),
        user(2, 0, 0, &[], None),
        user(4, 255, u64::MAX, &["sports"], Some("tok-4")),
        user(999, 5, 77, &["gaming"], None),
        user(1000, 9, 5, &["sports", "travel"], Some("tok-1000")),
        user(123_457, 1, 99_999, &[], Some("tok-123457")),
    ];
    hset(
        redis,
        db,
        "fanout:user:1",
        &[
            ("level", "3"),
            ("points", "1200"),
            ("tags", "sports;mom"),
            ("token", "tok-1"),
            ("tz", "Asia/Shanghai"),
            ("nickname", "ignored"),
        ],
    );
    hset(
        redis,
        db,
        "fanout:user:2",
        &[("level", "0"), ("points", "0")],
    );
    // fanout:user:3 is missing: no such user.
    hset(
        redis,
        db,
        "fanout:user:4",
        &[
            ("token", "tok-4"),
            ("points", "18446744073709551615"),
            ("level", "255"),
            ("tags", ";sports;"),
        ],
    );
    hset(
        redis,
        db,
        "fanout:user:999",
        &[
            ("level", "5"),
            ("points", "77"),
            ("tags", "gaming"),
            ("token", ""),
        ],
    );
    hset(
        redis,
        db,
        "fanout:user:1000",
        &[
            ("level", "9"),
            ("points", "5"),
            ("tags", "travel;sports"),
            ("token", "tok-1000"),
            ("tz", "America/New_York"),
        ],
    );
    hset(
        redis,
        db,
        "fanout:user:123457",
        &[
            ("level", "1"),
            ("points", "99999"),
            ("tags", ""),
            ("token", "tok-123457"),
        ],
    );
    // Above max_id: not a user.
    hset(
        redis,
        db,
        "fanout:user:200000",
        &[("level", "1"), ("points", "1")],
    );
    set_max_id(redis, db, 123_457);
    want[0].tz = Some(chrono_tz::Tz::Asia__Shanghai);
    want[4].tz = Some(chrono_tz::Tz::America__New_York);
    want
}

#[test]
fn hand_written_hashes_load_as_written_and_only_asked_buckets_are_fetched() {
    let redis = RedisServer::start();
    let want = write_hand_users(&redis, 0);
    let url = redis.url(0);

    // Read back through the library: every field, tokens included.
    let (src, report) = UserSource::open(&url, &LoadOptions::default()).unwrap();
    assert_eq!((report.users, report.skipped, src.len()), (6, 0, 6));
    for u in &want {
        assert_eq!(src.get(u.id).as_ref(), Some(u), "user {}", u.id);
        assert_eq!(src.token(u.id), u.token, "token of {}", u.id);
        assert_eq!(src.tz(u.id), u.tz, "tz of {}", u.id);
    }
    for missing in [3, 5, 200_000] {
        assert_eq!(src.get(missing), None);
    }

    // Only the buckets asked for: buckets of 10 ids, the even ones. Each id of those buckets
    // within 1..=max_id is one HGETALL, and no other is sent.
    let hgetall_calls = || -> u64 {
        let stats = redis.cli(&["INFO", "commandstats"]);
        stats
            .lines()
            .find_map(|l| l.strip_prefix("cmdstat_hgetall:calls="))
            .map(|rest| rest.split(',').next().unwrap().parse().unwrap())
            .unwrap_or(0)
    };
    redis.cli(&["CONFIG", "RESETSTAT"]);
    let opts = LoadOptions {
        bucket_size: 10,
        ..LoadOptions::default()
    };
    let keep = |b: u32| b.is_multiple_of(2);
    let (src, _) = UserSource::open_buckets(&url, &opts, &keep).unwrap();
    let kept: Vec<&User> = want.iter().filter(|u| keep(u.id / 10)).collect();
    assert_eq!(src.len(), kept.len() as u64);
    for u in kept {
        assert_eq!(src.get(u.id).as_ref(), Some(u));
    }
    let naive_calls = (1..=123_457u32).filter(|id| keep(id / 10)).count() as u64;
    assert_eq!(hgetall_calls(), naive_calls);

    // A run over them: what the naive reading of the job says, bodies included.
    let s = Scratch::new();
    let job = r#"
[inputs]
users = "unused.jsonl"
[engine]
now = "2026-03-02T00:00:00Z"
bucket_size = 100
[provider]
url = "log:deliveries.jsonl"
[[campaign]]
id = "all"
kind = "promotion"
start = "2026-03-01T00:00:00Z"
end = "2026-03-08T00:00:00Z"
body = "{user.id} {user.level} {user.points}"
[[campaign]]
id = "sporty"
kind = "promotion"
start = "2026-03-01T00:00:00Z"
end = "2026-03-08T00:00:00Z"
body = "hi"
[campaign.audience]
tags_any = ["sports"]
min_level = 2
"#;
    s.write("job.toml", job);
    s.fanout_ok(&["run", "job.toml", "--users", &url, "-w", "2", "--quiet"]);
    let users: BTreeMap<u64, TUser> = want.iter().map(|u| (u64::from(u.id), tuser(u))).collect();
    assert_eq!(
        delivered(&s.path("deliveries.jsonl")),
        expected(job, &users, &[], &Default::default(), None)
    );
    for r in read_deliveries(&s.path("deliveries.jsonl")) {
        if r.campaign == "all" {
            let u = &users[&r.user];
            assert_eq!(r.body, format!("{} {} {}", u.id, u.level, u.points));
        }
    }
}

#[test]
fn a_bad_field_stops_the_run_naming_key_and_field_and_nothing_is_delivered() {
    let redis = RedisServer::start();
    let mut db = 0u8;
    for (field, value, msg) in [
        ("level", "300", "expected an integer 0..=255, got \"300\""),
        ("level", "high", "expected an integer 0..=255, got \"high\""),
        (
            "points",
            "-5",
            "expected a non-negative integer (at most 18446744073709551615), got \"-5\"",
        ),
        ("tz", "Mars/Olympus", "unknown time zone \"Mars/Olympus\""),
    ] {
        write_hand_users(&redis, db);
        let mut fields = vec![("level", "1"), ("points", "1")];
        fields.retain(|(k, _)| *k != field);
        fields.push((field, value));
        hset(&redis, db, "fanout:user:42", &fields);
        let url = redis.url(db);
        let (s, _) = sample("promotion-all-users");
        let out = s.fanout(&["run", "job.toml", "--users", &url, "--quiet"]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{stderr}");
        assert!(
            stderr.contains(&format!("fanout:user:42 field {field}: {msg}")),
            "{stderr}"
        );
        assert!(read_deliveries(&s.path("deliveries.jsonl")).is_empty());

        // Skipping: user 42 is left out and counted, everyone else is delivered.
        s.fanout_ok(&[
            "run",
            "job.toml",
            "--users",
            &url,
            "--skip-bad-lines",
            "--quiet",
            "--summary",
            "summary.json",
        ]);
        assert_eq!(read_summary(&s.path("summary.json"))["skipped_lines"], 1);
        let got: Vec<u64> = read_deliveries(&s.path("deliveries.jsonl"))
            .into_iter()
            .filter(|r| r.campaign == "spring-sale-2026")
            .map(|r| r.user)
            .collect();
        let mut got = got;
        got.sort_unstable();
        assert_eq!(got, [1, 2, 4, 999, 1000, 123_457]);
        db += 1;
    }

    // Not a hash: named by its key.
    write_hand_users(&redis, db);
    let dbs = db.to_string();
    redis.cli(&["-n", &dbs, "SET", "fanout:user:7", "oops"]);
    let (s, _) = sample("promotion-all-users");
    let out = s.fanout(&["run", "job.toml", "--users", &redis.url(db), "--quiet"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("fanout:user:7: cannot read as a hash"),
        "{stderr}"
    );
}

#[test]
fn a_missing_max_id_or_server_or_password_is_a_clear_error() {
    let mut redis = RedisServer::start();
    let (s, _) = sample("promotion-all-users");

    // No fanout:users:max_id: bad input (exit 2) naming the key.
    let out = s.fanout(&["run", "job.toml", "--users", &redis.url(3), "--quiet"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("fanout:users:max_id: missing"), "{stderr}");

    // Not a number.
    redis.cli(&["-n", "3", "SET", "fanout:users:max_id", "lots"]);
    let out = s.fanout(&["plan", "job.toml", "--users", &redis.url(3)]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("fanout:users:max_id: expected an integer"),
        "{stderr}"
    );

    // A password from FANOUT_REDIS_PASSWORD works; a wrong one in the URL is refused (exit 1)
    // without being printed.
    write_hand_users(&redis, 0);
    assert_eq!(
        redis.cli(&["CONFIG", "SET", "requirepass", "s3cret-pw"]),
        "OK"
    );
    let run = |url: &str, env_pw: Option<&str>| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_fanout"));
        cmd.args(["plan", "job.toml", "--users", url])
            .current_dir(s.dir.path());
        match env_pw {
            Some(pw) => cmd.env("FANOUT_REDIS_PASSWORD", pw),
            None => cmd.env_remove("FANOUT_REDIS_PASSWORD"),
        };
        cmd.output().unwrap()
    };
    let ok = run(&redis.url(0), Some("s3cret-pw"));
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert!(String::from_utf8_lossy(&ok.stdout).contains("6 users"));
    let bad_url = format!("redis://:wrong-pw@127.0.0.1:{}/0", redis.port);
    let out = run(&bad_url, None);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(!stderr.contains("wrong-pw"), "{stderr}");
    assert!(stderr.contains("users redis://…@127.0.0.1"), "{stderr}");

    // Nothing listening: exit 1 after the bounded retry. The port stays reserved meanwhile.
    let port = redis.port;
    redis.stop();
    let out = s.fanout(&[
        "run",
        "job.toml",
        "--users",
        &format!("redis://127.0.0.1:{port}/0"),
        "--quiet",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("connect failed for 30 s"), "{stderr}");
    assert!(read_deliveries(&s.path("deliveries.jsonl")).is_empty());
}

#[test]
fn redis_users_with_the_redis_store_deliver_once() {
    let redis = RedisServer::start();
    let url = redis.url(0);
    let gen = Scratch::new();
    gen.fanout_ok(&[
        "gen", "users", "--count", "1500", "--seed", "3", "--out", &url,
    ]);
    let users: BTreeMap<u64, TUser> = (1..=1500u32)
        .map(|id| (u64::from(id), tuser(&synthetic_user(3, id))))
        .collect();
    for name in ["promotion-all-users", "coupon-segment"] {
        let (s, job) = sample(name);
        // Users and ledger on the same server and database.
        let args = [
            "run", "job.toml", "--users", &url, "--store", &url, "-w", "2", "--quiet",
        ];
        s.fanout_ok(&args);
        let want = expected_in(&job, s.dir.path(), &users);
        assert_eq!(delivered(&s.path("deliveries.jsonl")), want, "{name}");
        // Again: the Redis ledger has them all.
        s.fanout_ok(&args);
        assert_eq!(
            delivered(&s.path("deliveries.jsonl")),
            want,
            "{name} re-run"
        );
    }
}
