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
use redis_server::{Persist, RedisServer};

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
        "policy",
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
        // A campaign this store never admitted is an error, not an empty list.
        let out = s.fanout(&["grants", "--store", &store, "--campaign", "never-run"]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{name}: {stderr}");
        assert!(stderr.contains("never-run"), "{name}: {stderr}");
        assert!(out.stdout.is_empty(), "{name}");
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
    let (status, err) = exit_of(&mut child);
    assert!(status.success(), "{err}");
    let m = by_user(&[&s.path("deliveries.jsonl")]);
    assert!(m.keys().copied().eq(1..=USERS), "users lost");
    assert!(m.values().all(|v| v.len() == 1), "a user delivered twice");
}

/// A Redis whose disk fills refuses every write (`MISCONF`) until it has room again. The run
/// waits that out within its retry budget: its claims and marks are retried, so the messages
/// already sent keep their slots and at most `concurrency` (64) more go out meanwhile; once the
/// disk has room it ends well, each user delivered once.
#[test]
fn a_redis_disk_full_for_a_while_holds_the_run_and_loses_nothing() {
    let mut redis =
        RedisServer::start_on_tmpfs(Persist::EverySec).unwrap_or_else(|e| panic!("{e}"));
    let s = Scratch::new();
    s.write("job.toml", rated_job(20_000));
    let store = redis.url(0);
    let mut child = s.start(&["run", "job.toml", "-w", "2", "--store", &store]);
    s.wait_for_lines("deliveries.jsonl", 10_000, &mut child);
    redis.fill_disk().unwrap_or_else(|e| panic!("{e}"));
    let started = std::time::Instant::now();
    while !redis.refusing() {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "redis never failed a write on its full disk"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let at_refusal = lines_in(&s.path("deliveries.jsonl"));
    std::thread::sleep(Duration::from_millis(1500));
    let at_room = lines_in(&s.path("deliveries.jsonl"));
    assert!(redis.refusing(), "redis took writes again on a full disk");
    redis.grow_disk().unwrap_or_else(|e| panic!("{e}"));
    let (status, err) = exit_of(&mut child);
    assert!(status.success(), "{err}");
    assert!(
        err.contains("MISCONF"),
        "the run never met a refused write: {err}"
    );
    assert!(
        at_room - at_refusal <= 64,
        "{} messages went out while no outcome could be recorded (concurrency 64)",
        at_room - at_refusal
    );
    let m = by_user(&[&s.path("deliveries.jsonl")]);
    assert!(m.keys().copied().eq(1..=USERS), "users lost");
    assert!(m.values().all(|v| v.len() == 1), "a user delivered twice");
}

/// Redis losing its data mid-run (here FLUSHALL; a restart without persistence does the
/// same) must not end in a silent exit 0: the ledger bits written before are gone, and a later
/// run may send those users again. With a lease too long for a heartbeat to notice in time,
/// the next fenced claim or mark finds the lease gone — or, past the last of them, the run's
/// end does: exit 1, saying so.
#[test]
fn data_lost_by_redis_mid_run_is_an_error_not_a_silent_success() {
    let redis = RedisServer::start();
    let s = Scratch::new();
    s.write("job.toml", rated_job(20_000));
    let store = redis.url(0);
    let mut child = Command::new(env!("CARGO_BIN_EXE_fanout"))
        .args(["run", "job.toml", "-w", "2", "--store", &store, "--quiet"])
        .env("FANOUT_LEASE", "120s")
        .current_dir(s.dir.path())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    s.wait_for_lines("deliveries.jsonl", 5_000, &mut child);
    redis.cli(&["FLUSHALL"]);
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("lease lost") || err.contains("lease was gone when it ended"),
        "{err}"
    );
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
    // Re-run at once: it waits for the dead run's lease to expire, then re-sends what was in
    // flight.
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
    // At most what the killed run had in flight: a message holds one of the 64 slots from
    // its hand-off until its outcome is recorded.
    assert!(twice.len() <= 64, "{} twice", twice.len());
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
    let (mut unreachable, mut held) = (HashSet::new(), HashSet::new());
    for (i, batch) in mixed_batches().iter().enumerate() {
        // Every fifth batch is held out: claimed and settled in one call.
        let holds = i % 5 == 4;
        let got = match holds {
            true => ledger.claim_held_out(batch).await.unwrap(),
            false => ledger.claim(batch).await.unwrap(),
        };
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
        // Of the rest, every third batch fails for good, every seventh has no token; the
        // others are delivered.
        if holds {
            held.extend(got.claimed);
        } else if i % 3 == 2 {
            ledger.mark_dead(&got.claimed).await.unwrap();
            dead.extend(got.claimed);
        } else if i % 7 == 0 {
            ledger.mark_unreachable(&got.claimed).await.unwrap();
            unreachable.extend(got.claimed);
        } else {
            ledger.mark_done(&got.claimed).await.unwrap();
        }
    }
    let outcomes = store.outcomes("mixed").await.unwrap();
    let set = |s: &HashSet<u32>| s.iter().copied().collect::<roaring::RoaringBitmap>();
    assert_eq!(outcomes.held_out, set(&held));
    assert_eq!(outcomes.dead_lettered, set(&dead));
    assert_eq!(outcomes.unreachable, set(&unreachable));
    let rest = &(&(&set(&claimed) - &set(&held)) - &set(&dead)) - &set(&unreachable);
    assert_eq!(outcomes.delivered, rest);
    assert!(outcomes.in_flight.is_empty());
    // `fanout grants` lists no held-out user.
    let granted: HashSet<u32> = store.granted("mixed").await.unwrap().into_iter().collect();
    assert_eq!(granted, &claimed - &held);
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

    // A run dies with users in flight; the next run holds them out (its claim of an adopted
    // user settles it held out, and it leaves no in-flight bit behind).
    let fresh: Vec<u32> = (400_000..400_100).collect();
    let dying = Store::connect(&redis.url(0)).await.unwrap();
    let claimed_by_dead = dying
        .ledger("mixed")
        .await
        .unwrap()
        .claim(&fresh)
        .await
        .unwrap();
    assert_eq!(claimed_by_dead.claimed, fresh);
    dying.abandon().await.unwrap();
    let next = Store::connect(&redis.url(0)).await.unwrap();
    let got = next
        .ledger("mixed")
        .await
        .unwrap()
        .claim_held_out(&fresh)
        .await
        .unwrap();
    assert_eq!(got.claimed, fresh, "adopted users are handed out once more");
    let outcomes = next.outcomes("mixed").await.unwrap();
    assert!(outcomes.in_flight.is_empty(), "{:?}", outcomes.in_flight);
    assert!(fresh.iter().all(|id| outcomes.held_out.contains(*id)));
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

// ---- Leases, adoption, fencing: each scenario runs stores in their own tokio runtimes, so
// dropping one (or not driving a current-thread one) is a killed (or stopped) process. ----

mod lease {
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use fanout::model::{Buckets, Route};
    use fanout::store::redis::RedisStore;
    use fanout::store::{Member, Store};

    use super::redis_server::RedisServer;

    /// A runtime whose tasks (the heartbeat) run on their own thread.
    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap()
    }

    /// A runtime whose tasks run only inside `block_on`: not driving it stops the process.
    fn stoppable() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    async fn open(url: &str, member: Option<Member>, lease: Duration) -> Store {
        Store::Redis(Arc::new(
            RedisStore::open_with(url, false, member, lease)
                .await
                .unwrap(),
        ))
    }

    fn ids(range: std::ops::RangeInclusive<u32>) -> Vec<u32> {
        range.collect()
    }

    #[test]
    fn an_immediate_rerun_after_a_kill_re_sends_the_dead_runs_in_flight_users() {
        let redis = RedisServer::start();
        let url = redis.url(0);
        let lease = Duration::from_millis(1500);
        let dead = runtime();
        dead.block_on(async {
            let store = open(&url, None, lease).await;
            let ledger = store.ledger("k").await.unwrap();
            assert_eq!(
                ledger.claim(&ids(1..=100)).await.unwrap().claimed.len(),
                100
            );
            ledger.mark_done(&ids(1..=50)).await.unwrap();
        });
        drop(dead); // kill -9: no close, the heartbeat stops, the lease lives on for a while
        assert_ne!(
            redis.cli(&["KEYS", "fanout:run:*"]),
            "",
            "the dead run's lease"
        );
        runtime().block_on(async {
            let started = Instant::now();
            let store = open(&url, None, lease).await;
            let ledger = store.ledger("k").await.unwrap();
            let waited = started.elapsed();
            // It waited for the dead run's lease to expire, and not much longer.
            // (The slack is for a loaded machine; a wait of a whole lease is what is avoided.)
            assert!(waited < lease + Duration::from_secs(2), "{waited:?}");
            let got = ledger.claim(&ids(1..=100)).await.unwrap();
            assert_eq!(got.claimed, ids(51..=100), "the in-flight ones, once more");
            // Handed out once: a later claim (another epoch) finds them taken.
            let again = ledger.claim(&ids(51..=100)).await.unwrap();
            assert!(again.claimed.is_empty(), "{:?}", again.claimed);
            ledger.mark_done(&ids(51..=100)).await.unwrap();
            store.checkpoint().await.unwrap();
        });
        assert_eq!(redis.cli(&["KEYS", "fanout:inflight:*"]), "");
        assert_eq!(redis.cli(&["KEYS", "fanout:resend:*"]), "");
    }

    #[test]
    fn a_live_runs_in_flight_users_are_left_alone_and_an_abandoned_runs_are_adopted_at_once() {
        let redis = RedisServer::start();
        let url = redis.url(0);
        let lease = Duration::from_secs(5);
        let live = runtime();
        let (a, la) = live.block_on(async {
            let store = open(&url, None, lease).await;
            let ledger = store.ledger("k").await.unwrap();
            ledger.claim(&ids(1..=10)).await.unwrap();
            (store, ledger)
        });
        runtime().block_on(async {
            let started = Instant::now();
            let store = open(&url, None, lease).await;
            let ledger = store.ledger("k").await.unwrap();
            // A heartbeat (every lease/5) proved the run alive well before its lease ran out.
            assert!(started.elapsed() < lease / 2, "{:?}", started.elapsed());
            let got = ledger.claim(&ids(1..=10)).await.unwrap();
            assert!(got.claimed.is_empty(), "a live run's users sent twice");
            store.abandon().await.unwrap();
        });
        // The run fails and abandons: the next run takes its users over without waiting.
        live.block_on(a.abandon()).unwrap();
        let err = live.block_on(la.claim(&[11])).unwrap_err().to_string();
        assert!(err.contains("lease lost"), "{err}");
        runtime().block_on(async {
            let started = Instant::now();
            let store = open(&url, None, lease).await;
            let ledger = store.ledger("k").await.unwrap();
            assert!(started.elapsed() < lease / 2, "{:?}", started.elapsed());
            let got = ledger.claim(&ids(1..=11)).await.unwrap();
            assert_eq!(got.claimed, ids(1..=11));
        });
    }

    #[test]
    fn a_run_never_hands_out_its_own_in_flight_user_twice() {
        let redis = RedisServer::start();
        runtime().block_on(async {
            let store = open(&redis.url(0), None, Duration::from_secs(5)).await;
            let ledger = store.ledger("k").await.unwrap();
            let first = ledger.claim(&ids(1..=10)).await.unwrap();
            assert_eq!(first.claimed, ids(1..=10));
            // A later epoch while the first pushes are unanswered (two logins of one user).
            let second = ledger.claim(&ids(5..=15)).await.unwrap();
            assert_eq!(second.claimed, ids(11..=15));
            assert_eq!(second.already, ids(5..=10));
        });
    }

    #[test]
    fn a_stopped_run_past_its_lease_is_fenced_and_sends_nothing_more() {
        let redis = RedisServer::start();
        let url = redis.url(0);
        let lease = Duration::from_millis(600);
        let stopped = stoppable();
        let (a, la) = stopped.block_on(async {
            let store = open(&url, None, lease).await;
            let ledger = store.ledger("k").await.unwrap();
            ledger.claim(&ids(1..=10)).await.unwrap();
            (store, ledger)
        });
        let fence = a.fence();
        fence.check().unwrap();
        // `stopped` is not driven from here on: SIGSTOP. Another run takes over once its
        // lease expires.
        runtime().block_on(async {
            let store = open(&url, None, lease).await;
            let ledger = store.ledger("k").await.unwrap();
            let got = ledger.claim(&ids(1..=20)).await.unwrap();
            assert_eq!(got.claimed, ids(1..=20));
        });
        // Its lease may have expired: the local guard says so before the process even runs.
        let err = fence.check().unwrap_err().to_string();
        assert!(err.contains("lease"), "{err}");
        // SIGCONT: every claim and mark now fails, at once after the first.
        let err = stopped.block_on(la.claim(&ids(21..=30))).unwrap_err();
        assert!(err.to_string().contains("lease lost"), "{err}");
        let started = Instant::now();
        let err = stopped.block_on(la.mark_done(&ids(1..=10))).unwrap_err();
        assert!(err.to_string().contains("lease lost"), "{err}");
        // No server round trip, no retry: the store knows it is fenced.
        assert!(started.elapsed() < Duration::from_millis(500));
        assert!(fence.check().is_err());
        // Nothing it tried took a user.
        runtime().block_on(async {
            let store = open(&url, None, lease).await;
            let ledger = store.ledger("k").await.unwrap();
            assert_eq!(
                ledger.claim(&ids(21..=30)).await.unwrap().claimed,
                ids(21..=30)
            );
        });
        drop(a);
    }

    #[test]
    fn a_dead_cluster_processs_users_are_adopted_by_a_cluster_of_another_size() {
        let redis = RedisServer::start();
        let url = redis.url(0);
        let lease = Duration::from_millis(500);
        let buckets = Buckets::new(100);
        let member = |process, processes| Member {
            process,
            processes,
            route: Route::process(buckets, processes, process),
        };
        let all = ids(1..=5000);
        let dead = runtime();
        dead.block_on(async {
            let store = open(&url, Some(member(0, 2)), lease).await;
            let ledger = store.ledger("k").await.unwrap();
            ledger.claim(&all).await.unwrap();
        });
        drop(dead);
        // Three processes of one worker each, adopting at the same time.
        let got: Vec<(Route, Vec<u32>)> = runtime().block_on(async {
            let tasks: Vec<_> = (0..3)
                .map(|p| {
                    let (url, all, m) = (url.clone(), all.clone(), member(p, 3));
                    tokio::spawn(async move {
                        let store = open(&url, Some(m), lease).await;
                        let ledger = store.ledger("k").await.unwrap();
                        (m.route, ledger.claim(&all).await.unwrap().claimed)
                    })
                })
                .collect();
            let mut out = Vec::new();
            for t in tasks {
                out.push(t.await.unwrap());
            }
            out
        });
        let mut seen = std::collections::BTreeSet::new();
        for (route, claimed) in &got {
            let mine: Vec<u32> = all.iter().copied().filter(|&id| route.keeps(id)).collect();
            assert_eq!(claimed, &mine, "a process re-sends exactly its own users");
            for id in claimed {
                assert!(seen.insert(*id), "{id} adopted twice");
            }
        }
        assert_eq!(seen.len(), all.len());
    }

    #[test]
    fn racing_admissions_of_one_content_admit_exactly_one() {
        let redis = RedisServer::start();
        let url = redis.url(0);
        let wins = runtime().block_on(async {
            let mut stores = Vec::new();
            for _ in 0..16 {
                stores.push(Store::connect_read_only(&url).await.unwrap());
            }
            let tasks: Vec<_> = stores
                .into_iter()
                .enumerate()
                .map(|(i, store)| {
                    tokio::spawn(async move {
                        let pairs = [("same-content".to_owned(), format!("campaign-{i}"))];
                        store.admit(&pairs).await
                    })
                })
                .collect();
            let mut wins = 0;
            for t in tasks {
                match t.await.unwrap() {
                    Ok(()) => wins += 1,
                    Err(fanout::Error::Duplicate { .. }) => {}
                    Err(e) => panic!("{e}"),
                }
            }
            wins
        });
        assert_eq!(wins, 1);
    }

    #[test]
    fn a_ledger_never_adopts_or_counts_the_sets_of_its_occurrence_ledgers() {
        let redis = RedisServer::start();
        let url = redis.url(0);
        let lease = Duration::from_secs(5);
        let occurrence = "x:2026-03-02T10:00:00+00:00";
        runtime().block_on(async {
            let store = open(&url, None, lease).await;
            let x = store.ledger("x").await.unwrap();
            x.claim(&ids(1..=100)).await.unwrap();
            x.mark_done(&ids(1..=100)).await.unwrap();
            let hot = store.ledger(occurrence).await.unwrap();
            hot.claim(&ids(1..=50)).await.unwrap();
            store.abandon().await.unwrap(); // dead at once, its sets left behind
        });
        runtime().block_on(async {
            let store = open(&url, None, lease).await;
            let x = store.ledger("x").await.unwrap();
            let counts = x.counts().await.unwrap();
            assert_eq!((counts.claimed, counts.done), (100, 100));
            assert_eq!(x.count_done(&ids(1..=100)).await.unwrap(), 100);
            let got = x.claim(&ids(1..=50)).await.unwrap();
            assert!(got.claimed.is_empty(), "another ledger's users re-sent");
            let hot = store.ledger(occurrence).await.unwrap();
            assert_eq!(hot.counts().await.unwrap().done, 0);
            assert_eq!(hot.claim(&ids(1..=50)).await.unwrap().claimed, ids(1..=50));
        });
    }

    #[test]
    fn lease_and_retry_budget_come_from_the_environment_and_bad_values_name_the_variable() {
        use fanout::store::redis::{env_duration, LEASE, LEASE_ENV, RETRY_ENV};
        assert_eq!(env_duration(LEASE_ENV, None, LEASE).unwrap(), LEASE);
        assert_eq!(
            env_duration(LEASE_ENV, Some("800ms"), LEASE).unwrap(),
            Duration::from_millis(800)
        );
        for bad in ["soon", "0s", "-1s"] {
            let err = env_duration(RETRY_ENV, Some(bad), LEASE).unwrap_err();
            assert!(matches!(err, fanout::Error::Usage(_)), "{err}");
            assert!(err.to_string().contains("FANOUT_REDIS_RETRY"), "{err}");
        }
        // The variable reaches a run: a bad one is refused before anything is sent (exit 2).
        let redis = RedisServer::start();
        let s = super::Scratch::new();
        s.write("job.toml", super::rated_job(0));
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_fanout"))
            .args(["run", "job.toml", "--store", &redis.url(0), "--quiet"])
            .env(LEASE_ENV, "soon")
            .current_dir(s.dir.path())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{stderr}");
        assert!(stderr.contains("FANOUT_LEASE"), "{stderr}");
    }
}
