//! `fanout campaigns list|show|pause|resume|cancel` end to end, on the embedded store and on a
//! real redis-server: the listing agrees with the run summaries, state changes round-trip and
//! persist, cancel is final, an unknown id exits 2, and a change made by the command reaches a
//! process that holds the store (the embedded store's lock; a second Redis client).

mod common;
mod naive;
mod redis_server;

use std::collections::BTreeMap;
use std::process::{Command, Output};

use common::*;
use fanout::store::campaigns::State;
use fanout::store::Store;
use redis_server::RedisServer;
use serde_json::Value;

const USERS: u64 = 1500;

/// A promotion whose window has ended (so it reads `done`), a hot product fired at two
/// occurrences (its counts are summed), and a coupon whose window is still open.
fn job() -> String {
    format!(
        r#"[inputs]
users = "synthetic:{USERS}:5"

[provider]
url = "log:deliveries.jsonl"

[[campaign]]
id = "spring"
kind = "promotion"
start = "2026-03-01T00:00:00Z"
end = "2026-03-08T00:00:00Z"
priority = "bulk"
holdout = 0.1
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

[[campaign]]
id = "gift"
kind = "coupon"
start = "2026-03-01T00:00:00Z"
end = "2099-01-01T00:00:00Z"
body = "A gift"
[campaign.coupon]
coupon_id = "G-1"
amount = 5
delivery = "push"
[campaign.audience]
min_level = 3
"#
    )
}

/// The outcome fields the listing and the summary share.
const OUTCOMES: [&str; 6] = [
    "delivered",
    "dead_lettered",
    "unreachable",
    "held_out",
    "capped",
    "quiet_held",
];

/// Runs the job twice (two hot-product occurrences) and sums each campaign's outcomes over
/// both summaries' entries.
fn run_twice(s: &Scratch, store: &str) -> BTreeMap<String, BTreeMap<&'static str, u64>> {
    s.write("job.toml", job());
    let mut sums: BTreeMap<String, BTreeMap<&'static str, u64>> = BTreeMap::new();
    for (i, now) in ["2026-03-02T00:00:00Z", "2026-03-02T01:00:00Z"]
        .iter()
        .enumerate()
    {
        let summary = format!("summary-{i}.json");
        s.fanout_ok(&[
            "run",
            "job.toml",
            "--store",
            store,
            "--now",
            now,
            "-w",
            "2",
            "--quiet",
            "--summary",
            &summary,
        ]);
        let v: Value =
            serde_json::from_str(&std::fs::read_to_string(s.path(&summary)).unwrap()).unwrap();
        for c in v["campaigns"].as_array().unwrap() {
            let sum = sums
                .entry(c["id"].as_str().unwrap().to_owned())
                .or_default();
            for name in OUTCOMES {
                *sum.entry(name).or_default() += c[name].as_u64().unwrap();
            }
        }
    }
    sums
}

/// `fanout campaigns ARGS --store STORE`, in `s`.
fn campaigns(s: &Scratch, store: &str, args: &[&str]) -> Output {
    let mut all = vec!["campaigns"];
    all.extend_from_slice(args);
    all.extend_from_slice(&["--store", store]);
    s.fanout(&all)
}

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "exit {:?}: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn listing(s: &Scratch, store: &str) -> BTreeMap<String, Value> {
    let v: Value = serde_json::from_str(&ok(&campaigns(s, store, &["list", "--json"]))).unwrap();
    v["campaigns"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| (c["id"].as_str().unwrap().to_owned(), c.clone()))
        .collect()
}

/// Every check that reads the same on both stores.
fn check_listing_and_changes(s: &Scratch, store: &str) {
    let sums = run_twice(s, store);
    let list = listing(s, store);
    assert_eq!(
        list.keys().collect::<Vec<_>>(),
        ["gift", "hourly", "spring"],
        "{list:?}"
    );
    for (id, sum) in &sums {
        let c = &list[id];
        for (name, n) in sum {
            assert_eq!(c["outcomes"][name], *n, "{id} {name}: {c}");
        }
        assert_eq!(c["outcomes"]["in_flight"], 0, "{id}");
    }
    assert!(sums["spring"]["delivered"] > 0 && sums["spring"]["held_out"] > 0);
    assert_eq!(sums["hourly"]["delivered"], 2 * USERS);
    assert_eq!(list["hourly"]["ledgers"].as_array().unwrap().len(), 2);
    assert_eq!(list["spring"]["kind"], "promotion");
    assert_eq!(list["spring"]["priority"], "bulk");
    assert_eq!(list["spring"]["end"], "2026-03-08T00:00:00Z");
    // Window ended and nothing in flight: done; the coupon's window is open: running.
    assert_eq!(list["spring"]["state"], "done");
    assert_eq!(list["spring"]["stored_state"], "running");
    assert_eq!(list["gift"]["state"], "running");

    // The table: one line per campaign, with its state and delivered count.
    let table = ok(&campaigns(s, store, &["list"]));
    let delivered = sums["spring"]["delivered"].to_string();
    assert!(
        table.lines().any(|l| {
            let words: Vec<&str> = l.split_whitespace().collect();
            words.first() == Some(&"spring")
                && words.contains(&"done")
                && words.contains(&delivered.as_str())
        }),
        "{table}"
    );

    // Pause, pause again, resume: each durable, each read back by a new process.
    let out = ok(&campaigns(s, store, &["pause", "gift"]));
    assert!(out.contains("running → paused"), "{out}");
    let out = ok(&campaigns(s, store, &["pause", "gift"]));
    assert!(out.contains("already paused"), "{out}");
    assert_eq!(listing(s, store)["gift"]["state"], "paused");
    let shown: Value =
        serde_json::from_str(&ok(&campaigns(s, store, &["show", "gift", "--json"]))).unwrap();
    assert_eq!(shown["state"], "paused");
    assert_eq!(shown["outcomes"], list["gift"]["outcomes"]);
    let text = ok(&campaigns(s, store, &["show", "spring"]));
    assert!(text.contains("state        done"), "{text}");
    assert!(text.contains(&delivered), "{text}");
    ok(&campaigns(s, store, &["resume", "gift"]));
    assert_eq!(listing(s, store)["gift"]["state"], "running");
    // A paused campaign whose window ended stays paused (it says more than done).
    ok(&campaigns(s, store, &["pause", "spring"]));
    assert_eq!(listing(s, store)["spring"]["state"], "paused");

    // Cancel is final: resume and pause are refused (exit 2) and change nothing.
    ok(&campaigns(s, store, &["cancel", "hourly"]));
    for cmd in ["resume", "pause"] {
        let out = campaigns(s, store, &[cmd, "hourly"]);
        assert_eq!(out.status.code(), Some(2), "{cmd}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("hourly") && err.contains("final"), "{err}");
    }
    let out = ok(&campaigns(s, store, &["cancel", "hourly"]));
    assert!(out.contains("already cancelled"), "{out}");
    assert_eq!(listing(s, store)["hourly"]["state"], "cancelled");

    // Unknown or malformed ids: exit 2 naming them, nothing printed on stdout.
    for cmd in ["show", "pause", "resume", "cancel"] {
        for id in ["never-run", "not an id"] {
            let out = campaigns(s, store, &[cmd, id]);
            assert_eq!(out.status.code(), Some(2), "{cmd} {id}");
            assert!(out.stdout.is_empty());
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(err.contains(id), "{err}");
        }
    }
}

/// The states a store opened in this process reads.
fn states(url: &str) -> (u64, BTreeMap<String, State>) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let store = Store::connect_read_only(url).await.unwrap();
        (
            store.control_version().await.unwrap(),
            store.states().await.unwrap(),
        )
    })
}

#[test]
fn file_store_listing_matches_the_summaries_and_changes_round_trip() {
    let s = Scratch::new();
    check_listing_and_changes(&s, "file:.fanout");
    // pause gift, resume gift, pause spring, cancel hourly: four changes.
    let url = format!("file:{}", s.path(".fanout").display());
    let (version, states) = states(&url);
    assert_eq!(version, 4);
    assert_eq!(
        states,
        BTreeMap::from([
            ("gift".to_owned(), State::Running),
            ("hourly".to_owned(), State::Cancelled),
            ("spring".to_owned(), State::Paused),
        ])
    );
    let control: Value =
        serde_json::from_str(&std::fs::read_to_string(s.path(".fanout/control.json")).unwrap())
            .unwrap();
    assert_eq!(control["states"]["hourly"], "cancelled");
    // A store that was never used: exit 2, and nothing is created.
    let out = campaigns(&s, "file:nowhere", &["list"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(!s.path("nowhere").exists());
}

#[test]
fn file_store_changes_reach_the_process_holding_the_lock() {
    let s = Scratch::new();
    s.write("job.toml", job());
    s.fanout_ok(&[
        "run",
        "job.toml",
        "--store",
        "file:.fanout",
        "--now",
        "2026-03-02T00:00:00Z",
        "--quiet",
    ]);
    let url = format!("file:{}", s.path(".fanout").display());
    let rt = tokio::runtime::Runtime::new().unwrap();
    // This process holds DIR/LOCK for the rest of the test, as a run or serve would.
    let holder = rt.block_on(Store::connect(&url)).unwrap();
    let out = s.fanout(&["run", "job.toml", "--store", "file:.fanout", "--quiet"]);
    assert_eq!(out.status.code(), Some(1), "the store is held");
    assert!(String::from_utf8_lossy(&out.stderr).contains("in use"));

    let before = rt.block_on(holder.control_version()).unwrap();
    ok(&campaigns(&s, "file:.fanout", &["pause", "gift"]));
    assert_eq!(rt.block_on(holder.control_version()).unwrap(), before + 1);
    assert_eq!(
        rt.block_on(holder.states()).unwrap().get("gift"),
        Some(&State::Paused)
    );
    // FANOUT_STORE stands in for --store; the holder sees the cancel too.
    let out = Command::new(env!("CARGO_BIN_EXE_fanout"))
        .args(["campaigns", "cancel", "gift"])
        .env("FANOUT_STORE", "file:.fanout")
        .current_dir(s.dir.path())
        .output()
        .unwrap();
    ok(&out);
    assert_eq!(
        rt.block_on(holder.states()).unwrap().get("gift"),
        Some(&State::Cancelled)
    );
    assert_eq!(rt.block_on(holder.control_version()).unwrap(), before + 2);
    // The listing reads while the lock is held.
    let list: Value =
        serde_json::from_str(&ok(&campaigns(&s, "file:.fanout", &["list", "--json"]))).unwrap();
    assert_eq!(list["campaigns"][0]["id"], "gift");
    assert_eq!(list["campaigns"][0]["state"], "cancelled");
    drop(holder);
    // Reopened for writing: the states are still there.
    let reopened = rt.block_on(Store::connect(&url)).unwrap();
    assert_eq!(
        rt.block_on(reopened.states()).unwrap().get("gift"),
        Some(&State::Cancelled)
    );
}

#[test]
fn redis_listing_matches_the_summaries_and_changes_round_trip() {
    let redis = RedisServer::start();
    let s = Scratch::new();
    let url = redis.url(0);
    check_listing_and_changes(&s, &url);
    let (version, states) = states(&url);
    assert_eq!(version, 4);
    assert_eq!(states.get("hourly"), Some(&State::Cancelled));
    assert_eq!(states.get("spring"), Some(&State::Paused));
    assert_eq!(
        redis.cli(&["HGET", "fanout:control", "hourly"]),
        "cancelled"
    );
    assert_eq!(redis.cli(&["GET", "fanout:control:version"]), "4");
    // Every key is under fanout:.
    let keys = redis.cli(&["KEYS", "*"]);
    assert!(keys.lines().all(|k| k.starts_with("fanout:")), "{keys}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_changes_reach_another_process_and_survive_a_reconnect() {
    let mut redis = RedisServer::start();
    let s = Scratch::new();
    let url = redis.url(2);
    s.write("job.toml", job());
    s.fanout_ok(&[
        "run",
        "job.toml",
        "--store",
        &url,
        "--now",
        "2026-03-02T00:00:00Z",
        "--quiet",
    ]);
    // A writer (with its lease), as a run or serve holds the store.
    let writer = Store::connect(&url).await.unwrap();
    assert_eq!(writer.control_version().await.unwrap(), 0);
    assert!(writer.states().await.unwrap().is_empty());
    let out = tokio::task::spawn_blocking({
        let s_dir = s.dir.path().to_owned();
        let url = url.clone();
        move || {
            Command::new(env!("CARGO_BIN_EXE_fanout"))
                .args(["campaigns", "pause", "spring", "--store", &url])
                .current_dir(s_dir)
                .output()
                .unwrap()
        }
    })
    .await
    .unwrap();
    ok(&out);
    assert_eq!(writer.control_version().await.unwrap(), 1);
    assert_eq!(
        writer.states().await.unwrap().get("spring"),
        Some(&State::Paused)
    );
    drop(writer);
    // A restarted server (append-only file) and a new connection still read it.
    redis.restart_after(std::time::Duration::from_millis(100));
    let again = Store::connect_read_only(&url).await.unwrap();
    let control = again.control().await.unwrap();
    assert_eq!(control.version, 1);
    assert_eq!(control.states.get("spring"), Some(&State::Paused));
    // `done` is derived, never set.
    let err = again.set_state("spring", State::Done).await.unwrap_err();
    assert_eq!(err.exit_code(), 2);
}

#[test]
fn an_unreachable_redis_store_exits_1() {
    let s = Scratch::new();
    let port = common::ports::reserve();
    let out = Command::new(env!("CARGO_BIN_EXE_fanout"))
        .args(["campaigns", "list", "--json"])
        .env("FANOUT_STORE", format!("redis://127.0.0.1:{}/0", port.port))
        .env("FANOUT_REDIS_RETRY", "1s")
        .current_dir(s.dir.path())
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.stdout.is_empty());
}

#[test]
fn a_split_file_store_is_read_and_changed_part_by_part() {
    let s = Scratch::new();
    s.write("job.toml", job());
    // Two parts as a cluster leaves them (here both saw every user: their sets join).
    for i in 0..2 {
        s.fanout_ok(&[
            "run",
            "job.toml",
            "--store",
            &format!("file:split/process-{i}"),
            "--now",
            "2026-03-02T00:00:00Z",
            "--quiet",
            "--summary",
            "summary.json",
        ]);
    }
    s.write("split/PROCESSES", "2\n");
    let summary: Value =
        serde_json::from_str(&std::fs::read_to_string(s.path("summary.json")).unwrap()).unwrap();
    let spring = summary["campaigns"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["id"] == "spring")
        .unwrap()
        .clone();
    let list = listing(&s, "file:split");
    assert_eq!(list["spring"]["outcomes"]["delivered"], spring["delivered"]);
    assert_eq!(list["spring"]["outcomes"]["held_out"], spring["held_out"]);
    ok(&campaigns(&s, "file:split", &["pause", "gift"]));
    for i in 0..2 {
        let (version, states) = states(&format!(
            "file:{}",
            s.path(&format!("split/process-{i}")).display()
        ));
        assert_eq!(version, 1, "part {i}");
        assert_eq!(states.get("gift"), Some(&State::Paused), "part {i}");
    }
    assert_eq!(listing(&s, "file:split")["gift"]["state"], "paused");
}

/// A cluster's part whose process has not admitted a campaign yet (it has not started, or is
/// behind) gets the state too: otherwise that process would send its share of a cancelled
/// campaign. An id no part knows is still refused.
#[test]
fn a_change_reaches_the_parts_of_a_split_store_that_do_not_know_the_campaign_yet() {
    let s = Scratch::new();
    s.write("job.toml", job());
    s.fanout_ok(&[
        "run",
        "job.toml",
        "--store",
        "file:split/process-0",
        "--now",
        "2026-03-02T00:00:00Z",
        "--quiet",
    ]);
    s.write("split/PROCESSES", "2\n");
    ok(&campaigns(&s, "file:split", &["cancel", "spring"]));
    let part1 = format!("file:{}", s.path("split/process-1").display());
    let (version, states_1) = states(&part1);
    assert_eq!(
        (version, states_1.get("spring")),
        (1, Some(&State::Cancelled))
    );
    let out = campaigns(&s, "file:split", &["cancel", "nobody"]);
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(states(&part1).0, 1, "an unknown id changed a part");
}

/// `fanout plan` reads the control states as a run applies them: a cancelled campaign's
/// eligible users are all `cancelled` (none held out, no batches), a paused one is marked,
/// and the next run settles exactly what the plan said. The counts come from the naive
/// reading of the users (the users the first run saw, taken from the rest).
#[test]
fn plan_reads_the_control_states_and_the_run_agrees() {
    let s = Scratch::new();
    let all = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/inputs/users.jsonl"))
        .unwrap();
    let first: String = all.lines().take(80).map(|l| format!("{l}\n")).collect();
    s.write("users.jsonl", &all);
    s.write("first.jsonl", &first);
    let job = r#"[inputs]
users = "users.jsonl"

[provider]
url = "log:deliveries.jsonl"

[engine]
now = "2026-03-02T00:00:00Z"

[[campaign]]
id = "keep"
kind = "promotion"
start = "2026-03-01T00:00:00Z"
end = "2026-03-08T00:00:00Z"
holdout = 0.1
body = "Hi {{user.id}}"
[campaign.audience]
min_level = 2

[[campaign]]
id = "stop"
kind = "promotion"
start = "2026-03-01T00:00:00Z"
end = "2026-03-08T00:00:00Z"
holdout = 0.2
body = "Stop {{user.id}}"

[[campaign]]
id = "wait"
kind = "coupon"
start = "2026-03-01T00:00:00Z"
end = "2099-01-01T00:00:00Z"
body = "A gift"
[campaign.coupon]
coupon_id = "G-1"
amount = 5
delivery = "push"
"#;
    s.write("job.toml", job);
    let store = format!("file:{}", s.path("store").display());
    let run = |users: &str, summary: &str| {
        s.fanout_ok(&[
            "run",
            "job.toml",
            "--users",
            users,
            "--store",
            &store,
            "--quiet",
            "--summary",
            summary,
        ]);
        read_summary(&s.path(summary))
    };
    run("first.jsonl", "first.json");
    ok(&campaigns(&s, &store, &["cancel", "stop"]));
    ok(&campaigns(&s, &store, &["pause", "wait"]));
    s.fanout_ok(&[
        "plan",
        "job.toml",
        "--store",
        &store,
        "--summary",
        "plan.json",
    ]);
    let plan: Value =
        serde_json::from_str(&std::fs::read_to_string(s.path("plan.json")).unwrap()).unwrap();
    let text = ok(&s.fanout(&["plan", "job.toml", "--store", &store]));
    assert!(text.contains("cancelled: nothing sent"), "{text}");
    assert!(text.contains("paused: a run waits"), "{text}");

    // What is left for each campaign: its pairs over every user less those over the first.
    let left = |id: &str| {
        let pairs = |text: &str| {
            let run = naive::expected_run(
                job,
                &naive_users_jsonl(text),
                &[],
                &Default::default(),
                None,
            );
            let settled = run.delivered.into_iter().chain(run.held_out);
            settled
                .filter(|(c, _, _)| c == id)
                .map(|(_, _, u)| u)
                .collect::<std::collections::BTreeSet<u64>>()
        };
        let (every, seen) = (pairs(&all), pairs(&first));
        assert!(seen.is_subset(&every));
        (every.len() - seen.len()) as u64
    };
    let line = |id: &str| {
        plan["campaigns"]
            .as_array()
            .unwrap()
            .iter()
            .find(|l| l["id"] == id)
            .unwrap()
            .clone()
    };
    let n = |v: &Value, k: &str| v[k].as_u64().unwrap();
    let stop = line("stop");
    assert_eq!(stop["state"], "cancelled");
    assert!(left("stop") > 0);
    assert_eq!(n(&stop, "eligible"), left("stop"));
    assert_eq!(n(&stop, "cancelled"), left("stop"));
    assert_eq!((n(&stop, "held_out"), n(&stop, "batches")), (0, 0));
    let (keep, wait) = (line("keep"), line("wait"));
    assert_eq!(
        (keep["state"].as_str(), wait["state"].as_str()),
        (Some("running"), Some("paused"))
    );
    assert_eq!((n(&keep, "cancelled"), n(&wait, "cancelled")), (0, 0));
    assert_eq!(n(&keep, "eligible"), left("keep"));
    assert_eq!(n(&wait, "eligible"), left("wait"));

    ok(&campaigns(&s, &store, &["resume", "wait"]));
    let second = run("users.jsonl", "second.json");
    for id in ["keep", "stop", "wait"] {
        let (ran, planned) = (campaign_line(&second, id), line(id));
        for k in ["eligible", "held_out", "cancelled"] {
            assert_eq!(
                ran[k].as_u64().unwrap_or(0),
                n(&planned, k),
                "{id} {k}: run vs plan"
            );
        }
    }
    assert_eq!(n(campaign_line(&second, "stop"), "delivered"), 0);
}
