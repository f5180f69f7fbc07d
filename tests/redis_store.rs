//! The shared store against a real redis-server: every scenario equals the naive expectation,
//! concurrent runs share one "at most once", a Redis restart or a killed run loses nothing.

mod common;
mod naive;
mod redis_server;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use naive::*;
use redis_server::RedisServer;

fn repo(path: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

#[test]
fn every_sample_dataflow_on_redis_equals_the_naive_set() {
    let redis = RedisServer::start();
    let users = naive_users_jsonl(&read(&repo("inputs/users.jsonl")));
    let names = [
        "promotion-all-users",
        "coupon-on-login",
        "coupon-segment",
        "hot-products",
    ];
    for (db, name) in names.iter().enumerate() {
        let job = read(&repo(&format!("dataflows/{name}.toml")));
        let s = Scratch::new();
        std::fs::create_dir(s.path("inputs")).unwrap();
        for f in ["users.jsonl", "logins.jsonl", "granted.jsonl"] {
            std::fs::copy(repo("inputs").join(f), s.path("inputs").join(f)).unwrap();
        }
        s.write("job.toml", &job);
        let store = redis.url(db as u8);
        s.fanout_ok(&["run", "job.toml", "-w", "2", "--store", &store, "--quiet"]);
        let want = expected_in(&job, s.dir.path(), &users);
        assert_eq!(
            delivered(&s.path("deliveries.jsonl")),
            want,
            "{name} on redis"
        );
        // A second run against the same Redis delivers nothing new.
        s.fanout_ok(&[
            "run",
            "job.toml",
            "--store",
            &store,
            "--quiet",
            "--summary",
            "again.json",
        ]);
        assert_eq!(
            delivered(&s.path("deliveries.jsonl")),
            want,
            "{name}: re-run"
        );
        let again = read_summary(&s.path("again.json"));
        for c in again["campaigns"].as_array().unwrap() {
            assert_eq!(c["delivered"], 0, "{name}: {c}");
        }
        // `fanout grants` reads the bitmaps back.
        for (campaign, _, _) in want.iter().filter(|(_, o, _)| o.is_none()).take(1) {
            let out = s.fanout(&["grants", "--store", &store, "--campaign", campaign]);
            let ids: Vec<u64> = String::from_utf8(out.stdout)
                .unwrap()
                .lines()
                .map(|l| l.parse().unwrap())
                .collect();
            let mine: Vec<u64> = want
                .iter()
                .filter(|(c, _, _)| c == campaign)
                .map(|(_, _, u)| *u)
                .collect();
            assert_eq!(ids, mine, "{name}: grants of {campaign}");
        }
    }
}

const USERS: u64 = 60_000;

fn rated_job(rate: u32) -> String {
    format!(
        r#"[inputs]
users = "synthetic:{USERS}:5"

[engine]
batch_max_messages = 50
now = "2026-03-02T00:00:00Z"

[provider]
url = "log:deliveries.jsonl"
concurrency = 64
rate_per_s = {rate}

[[campaign]]
id = "all"
kind = "promotion"
start = "2026-03-01T00:00:00Z"
end = "2026-03-08T00:00:00Z"
body = "Hi {{user.id}}"
"#
    )
}

fn lines_in(path: &Path) -> usize {
    read(path).lines().count()
}

/// (user → deliveries) over the given logs.
fn by_user(paths: &[&Path]) -> BTreeMap<u64, Vec<Rec>> {
    let mut m: BTreeMap<u64, Vec<Rec>> = BTreeMap::new();
    for p in paths {
        for r in read_deliveries(p) {
            m.entry(r.user).or_default().push(r);
        }
    }
    m
}

#[test]
fn two_runs_at_once_deliver_each_user_once_in_total() {
    let redis = RedisServer::start();
    let s = Scratch::new();
    s.write("job.toml", rated_job(30_000));
    let store = redis.url(0);
    let spawn = |log: &str| {
        Command::new(env!("CARGO_BIN_EXE_fanout"))
            .args([
                "run",
                "job.toml",
                "-w",
                "2",
                "--store",
                &store,
                "--provider",
                log,
                "--quiet",
            ])
            .current_dir(s.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (a, b) = (spawn("log:a.jsonl"), spawn("log:b.jsonl"));
    for child in [a, b] {
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let m = by_user(&[&s.path("a.jsonl"), &s.path("b.jsonl")]);
    assert!(m.keys().copied().eq(1..=USERS), "every user delivered");
    assert!(m.values().all(|v| v.len() == 1), "a user delivered twice");
    let (na, nb) = (lines_in(&s.path("a.jsonl")), lines_in(&s.path("b.jsonl")));
    assert!(na > 0 && nb > 0, "both runs did work ({na}, {nb})");
}

#[test]
fn a_redis_restart_mid_run_loses_and_duplicates_nothing() {
    let mut redis = RedisServer::start();
    let s = Scratch::new();
    s.write("job.toml", rated_job(20_000));
    let store = redis.url(0);
    let mut child = s.start(&["run", "job.toml", "-w", "2", "--store", &store, "--quiet"]);
    s.wait_for_lines("deliveries.jsonl", 10_000, &mut child);
    redis.restart_after(Duration::from_millis(1500));
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let m = by_user(&[&s.path("deliveries.jsonl")]);
    assert!(m.keys().copied().eq(1..=USERS), "users lost");
    assert!(m.values().all(|v| v.len() == 1), "a user delivered twice");
}

#[test]
fn a_killed_run_is_finished_by_the_next_one() {
    let redis = RedisServer::start();
    let s = Scratch::new();
    s.write("job.toml", rated_job(20_000));
    let store = redis.url(0);
    let mut child = s.start(&["run", "job.toml", "-w", "2", "--store", &store, "--quiet"]);
    s.wait_for_lines("deliveries.jsonl", 10_000, &mut child);
    child.kill().unwrap();
    child.wait().unwrap();
    // The dead run's lease must expire before its in-flight claims are handed out again.
    std::thread::sleep(Duration::from_secs(6));
    s.fanout_ok(&[
        "run",
        "job.toml",
        "-w",
        "2",
        "--store",
        &store,
        "--rate-per-s",
        "0",
        "--quiet",
    ]);
    let m = by_user(&[&s.path("deliveries.jsonl")]);
    assert!(m.keys().copied().eq(1..=USERS), "users lost");
    let twice: Vec<_> = m.values().filter(|v| v.len() > 1).collect();
    for v in &twice {
        assert_eq!(v.len(), 2);
        assert_eq!(v[0], v[1], "a re-sent message differs");
    }
    // At most what the killed run had handed to push tasks (concurrency + 16 tasks of 32
    // batches, per worker).
    assert!(
        twice.len() <= 2 * (64 + 16 * 32 * 50),
        "{} twice",
        twice.len()
    );
    assert_eq!(
        redis.cli(&["KEYS", "fanout:inflight:*"]),
        "",
        "in-flight sets left behind"
    );
}

#[test]
fn dead_letters_on_redis_are_marked_and_can_be_redriven() {
    let redis = RedisServer::start();
    let s = Scratch::new();
    s.write("job.toml", rated_job(0));
    let store = redis.url(0);
    let run = |provider: &str, extra: &[&str], summary: &str| {
        let mut args = vec![
            "run",
            "job.toml",
            "-w",
            "2",
            "--store",
            &store,
            "--provider",
            provider,
        ];
        args.extend_from_slice(extra);
        args.extend_from_slice(&["--quiet", "--summary", summary]);
        s.fanout_ok(&args);
        read_summary(&s.path(summary))
    };
    let first = run("mock:permanent=0.05", &[], "first.json");
    let dead = campaign_line(&first, "all")["dead_lettered"]
        .as_u64()
        .unwrap();
    assert!(dead > 1000, "{dead}");
    // A plain re-run resends nothing; --retry-dead-letters re-drives exactly the dead ones.
    let second = run("mock:", &[], "second.json");
    assert_eq!(campaign_line(&second, "all")["eligible"], 0);
    let third = run("mock:", &["--retry-dead-letters"], "third.json");
    assert_eq!(
        campaign_line(&third, "all")["delivered"].as_u64().unwrap(),
        dead
    );
}

/// Batches as the engine's tasks make them (runs of consecutive ids) and as it never does
/// (unsorted, duplicated, sparse across chunks), for the ledger tests below.
fn mixed_batches() -> Vec<Vec<u32>> {
    let mut rng = Lcg(7);
    let mut batches = Vec::new();
    for b in 0..60u32 {
        let batch: Vec<u32> = match b % 4 {
            0 => {
                let start = 1 + rng.below(200_000) as u32;
                (start..start + 1 + rng.below(3000) as u32).collect()
            }
            1 => (0..500).map(|_| 1 + rng.below(5_000) as u32).collect(),
            2 => (0..300).map(|_| rng.next() as u32 | 1).collect(),
            _ => {
                let mut v: Vec<u32> = (0..2000).map(|_| 1 + rng.below(300_000) as u32).collect();
                v.sort_unstable();
                v
            }
        };
        batches.push(batch);
    }
    batches
}

fn bitcount(redis: &RedisServer, set: &str, ledger: &str) -> u64 {
    (0..256)
        .map(|chunk| {
            let n = redis.cli(&["BITCOUNT", &format!("fanout:{set}:{ledger}:{chunk}")]);
            n.parse::<u64>().unwrap()
        })
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ledger_claims_and_marks_on_redis_equal_a_naive_set() {
    use fanout::store::Store;
    use std::collections::HashSet;
    let redis = RedisServer::start();
    let store = Store::connect(&redis.url(0)).await.unwrap();
    let ledger = store.ledger("mixed").await.unwrap();
    let (mut claimed, mut dead) = (HashSet::new(), HashSet::new());
    for (i, batch) in mixed_batches().iter().enumerate() {
        let got = ledger.claim(batch).await.unwrap();
        let (mut want, mut taken) = (Vec::new(), Vec::new());
        for &id in batch {
            if claimed.insert(id) {
                want.push(id);
            } else {
                taken.push(id);
            }
        }
        assert_eq!(got.claimed, want, "batch {i}: claimed");
        assert_eq!(got.already, taken, "batch {i}: already");
        // Every third batch fails for good; the rest are delivered.
        if i % 3 == 2 {
            ledger.mark_dead(&got.claimed).await.unwrap();
            dead.extend(got.claimed);
        } else {
            ledger.mark_done(&got.claimed).await.unwrap();
        }
    }
    let n = claimed.len() as u64;
    assert_eq!(bitcount(&redis, "granted", "mixed"), n);
    // Done is "claimed and in no in-flight set": no bitmap of its own.
    assert_eq!(redis.cli(&["KEYS", "fanout:done:*"]), "");
    let counts = ledger.counts().await.unwrap();
    assert_eq!((counts.claimed, counts.done), (n, n));
    assert_eq!(bitcount(&redis, "dead", "mixed"), dead.len() as u64);
    let sample: Vec<u32> = claimed.iter().copied().take(50).collect();
    assert_eq!(ledger.count_done(&sample).await.unwrap(), 50);
    store.checkpoint().await.unwrap();
    assert_eq!(
        redis.cli(&["KEYS", "fanout:inflight:*"]),
        "",
        "emptied in-flight sets left behind"
    );
    // Another run finds every one of them taken.
    let other = Store::connect(&redis.url(0)).await.unwrap();
    let again = other.ledger("mixed").await.unwrap();
    let all: Vec<u32> = claimed.iter().copied().collect();
    let got = again.claim(&all).await.unwrap();
    assert!(
        got.claimed.is_empty(),
        "{} claimed twice",
        got.claimed.len()
    );
}

#[test]
fn the_store_over_tls_trusts_the_ca_it_is_given_and_equals_the_naive_set() {
    let redis = RedisServer::start_tls();
    let users = naive_users_jsonl(&read(&repo("inputs/users.jsonl")));
    let job = read(&repo("dataflows/promotion-all-users.toml"));
    let s = Scratch::new();
    std::fs::create_dir(s.path("inputs")).unwrap();
    for f in ["users.jsonl", "logins.jsonl", "granted.jsonl"] {
        std::fs::copy(repo("inputs").join(f), s.path("inputs").join(f)).unwrap();
    }
    s.write("job.toml", &job);
    let store = redis.url(0);
    assert!(store.starts_with("rediss://"));
    let run = |ca: Option<&Path>| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_fanout"));
        cmd.args(["run", "job.toml", "--store", &store, "--quiet"])
            .current_dir(s.dir.path())
            .env_remove("FANOUT_REDIS_CA");
        if let Some(ca) = ca {
            cmd.env("FANOUT_REDIS_CA", ca);
        }
        cmd.output().unwrap()
    };
    // The system's roots do not hold the test's CA: refused at once, nothing sent.
    let out = run(None);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("certificate"), "{stderr}");
    assert!(delivered(&s.path("deliveries.jsonl")).is_empty());
    // A CA file that is not one is a usage error naming it.
    s.write("not-a-ca.pem", "hello");
    let out = run(Some(&s.path("not-a-ca.pem")));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("not-a-ca.pem"), "{stderr}");
    // With it, the run equals the naive set, and the ledger lives on the TLS server.
    let out = run(Some(&redis.ca()));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let want = expected_in(&job, s.dir.path(), &users);
    assert_eq!(delivered(&s.path("deliveries.jsonl")), want);
    let granted: u64 = redis
        .cli(&["KEYS", "fanout:granted:*"])
        .lines()
        .map(|key| redis.cli(&["BITCOUNT", key]).parse::<u64>().unwrap())
        .sum();
    assert_eq!(granted, want.len() as u64);
}
