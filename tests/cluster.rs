//! One job across two processes of a timely cluster (2 processes × 2 workers on loopback):
//! deliveries against the naive reading of the job, a process killed mid-run and the cluster
//! re-run, a store split by one process count refused to another, bad cluster flags.

mod common;
mod naive;
mod redis_server;

use std::collections::{BTreeMap, BTreeSet};
use std::process::{Child, ExitStatus};
use std::time::{Duration, Instant};

use common::ports;
use common::*;
use naive::*;
use redis_server::RedisServer;

/// Two loopback addresses no one listens on, reserved (see `common::ports`) while the
/// returned ports live.
fn free_hostfile(s: &Scratch) -> Vec<ports::Port> {
    let reserved: Vec<ports::Port> = (0..2).map(|_| ports::reserve()).collect();
    s.write(
        "hosts.txt",
        format!(
            "# the test cluster\n127.0.0.1:{}\n127.0.0.1:{}\n",
            reserved[0].port, reserved[1].port
        ),
    );
    reserved
}

/// What [`cluster_until`] saw.
enum Outcome {
    /// Both still run and the condition holds: processes 0 and 1, and their ports' reservation.
    Running(Child, Child, Vec<ports::Port>),
    /// Both exited by themselves: (status, stderr) of processes 0 and 1.
    Exited([(ExitStatus, String); 2]),
}

/// Starts processes 1 and 0 on a fresh hostfile (each with its extra flags) and watches them
/// until both exit or, while both run, `enough` holds. A process that exits because its port
/// was taken by another program (reserved ports make that rare, not impossible) costs a retry
/// on fresh ports: the other is killed, and nothing was sent, as no cluster had formed.
fn cluster_until(
    s: &Scratch,
    extra0: &[&str],
    extra1: &[&str],
    enough: impl Fn() -> bool,
) -> Outcome {
    'attempt: for _ in 0..5 {
        let reserved = free_hostfile(s);
        let p1 = start(s, 1, extra1);
        let mut kids = [start(s, 0, extra0), p1];
        let mut exits: [Option<(ExitStatus, String)>; 2] = [None, None];
        let started = Instant::now();
        loop {
            for (kid, exit) in kids.iter_mut().zip(exits.iter_mut()) {
                if exit.is_none() && kid.try_wait().unwrap().is_some() {
                    *exit = Some(exit_in_time(kid));
                }
            }
            if exits
                .iter()
                .flatten()
                .any(|(_, err)| ports::says_address_in_use(err))
            {
                for kid in &mut kids {
                    kid.kill().ok();
                    kid.wait().ok();
                }
                continue 'attempt;
            }
            if let [Some(e0), Some(e1)] = &exits {
                return Outcome::Exited([e0.clone(), e1.clone()]);
            }
            if exits.iter().all(Option::is_none) && enough() {
                let [p0, p1] = kids;
                return Outcome::Running(p0, p1, reserved);
            }
            assert!(
                started.elapsed() < Duration::from_secs(120),
                "a cluster process hangs"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    panic!("the cluster lost its ports 5 times");
}

/// Runs both processes to completion on fresh ports: (status, stderr) of processes 0 and 1.
fn run_both(s: &Scratch, extra0: &[&str], extra1: &[&str]) -> [(ExitStatus, String); 2] {
    match cluster_until(s, extra0, extra1, || false) {
        Outcome::Exited(exits) => exits,
        Outcome::Running(..) => unreachable!("never enough"),
    }
}

/// `fanout run job.toml` as process `i` of 2, with its own delivery log `deliveries-i.jsonl`,
/// at `-w 2` unless `extra` says otherwise.
fn cluster_args(i: usize, extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = [
        "run",
        "job.toml",
        "--processes",
        "2",
        "--process",
        &i.to_string(),
        "--hostfile",
        "hosts.txt",
        "--provider",
        &format!("log:deliveries-{i}.jsonl"),
        "--quiet",
    ]
    .iter()
    .map(|a| a.to_string())
    .collect();
    if !extra.contains(&"-w") {
        args.extend(["-w".to_owned(), "2".to_owned()]);
    }
    args.extend(extra.iter().map(|a| a.to_string()));
    args
}

fn start(s: &Scratch, i: usize, extra: &[&str]) -> Child {
    let args = cluster_args(i, extra);
    s.start(&args.iter().map(String::as_str).collect::<Vec<_>>())
}

/// Waits for `child` to exit on its own (a hang fails the test instead of blocking it).
fn exit_in_time(child: &mut Child) -> (ExitStatus, String) {
    let started = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return (status, stderr_of(child));
        }
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "a cluster process hangs"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs both processes to completion; asserts both exit 0.
fn run_cluster(s: &Scratch, extra0: &[&str]) {
    run_cluster_with(s, extra0, &[]);
}

/// [`run_cluster`] with `extra1` for process 1.
fn run_cluster_with(s: &Scratch, extra0: &[&str], extra1: &[&str]) {
    for (i, (status, err)) in run_both(s, extra0, extra1).iter().enumerate() {
        assert!(status.success(), "process {i} failed ({status}):\n{err}");
    }
}

fn test_users(seed: u64, n: usize) -> String {
    let mut rng = Lcg(seed);
    let tags = ["sports", "mom", "gamer", "travel"];
    (0..n)
        .map(|_| {
            let id = 1 + rng.below(60_000);
            let t: Vec<String> = tags
                .iter()
                .filter(|_| rng.below(3) == 0)
                .map(|t| format!("\"{t}\""))
                .collect();
            format!(
                "{{\"id\": {id}, \"level\": {}, \"points\": {}, \"tags\": [{}], \"token\": \"t-{id}\"}}\n",
                rng.below(6),
                rng.below(5000),
                t.join(",")
            )
        })
        .collect()
}

fn job(bucket_size: u32) -> String {
    format!(
        r#"[inputs]
users = "users.jsonl"
logins = "logins.jsonl"
granted = "granted.jsonl"

[engine]
bucket_size = {bucket_size}
batch_max_messages = 20
now = "2026-03-02T00:00:00Z"

[store]
url = "file:store"

[provider]
url = "log:deliveries.jsonl"
concurrency = 64

[policy]
control_group = 0.05

[[campaign]]
id = "sporty"
kind = "promotion"
start = "2026-03-01T00:00:00Z"
end = "2026-03-08T00:00:00Z"
title = "Sale"
body = "Hi {{user.id}}"
[campaign.audience]
min_level = 2
tags_any = ["sports", "travel"]

[[campaign]]
id = "welcome"
kind = "coupon"
start = "2026-03-01T00:00:00Z"
end = "2026-03-05T00:00:00Z"
holdout = 0.2
title = "Welcome"
body = "{{coupon.id}} for {{user.id}}"
[campaign.coupon]
coupon_id = "W-1"
amount = 5
delivery = "on_login"
"#
    )
}

/// Users, logins (some of unknown users, some outside the coupon's window) and granted pairs.
fn inputs(s: &Scratch) -> BTreeMap<u64, TUser> {
    let users = test_users(7, 4000);
    s.write("users.jsonl", &users);
    let parsed = naive_users_jsonl(&users);
    let mut rng = Lcg(8);
    let logins: String = (0..3000)
        .map(|_| {
            let user = 1 + rng.below(61_000);
            let day = 1 + rng.below(6);
            format!("{{\"user\": {user}, \"ts\": \"2026-03-0{day}T10:00:00Z\"}}\n")
        })
        .collect();
    s.write("logins.jsonl", logins);
    let granted: String = parsed
        .keys()
        .step_by(9)
        .map(|u| format!("{{\"campaign\": \"sporty\", \"user\": {u}}}\n"))
        .collect();
    s.write("granted.jsonl", granted);
    parsed
}

#[test]
fn two_processes_deliver_the_naive_set_once_and_both_do_work() {
    let s = Scratch::new();
    let users = inputs(&s);
    let job = job(50);
    s.write("job.toml", &job);
    run_cluster(&s, &["--summary", "summary.json"]);

    let (want, held) = expected_outcomes_in(&job, s.dir.path(), &users);
    let d0 = delivered(&s.path("deliveries-0.jsonl"));
    let d1 = delivered(&s.path("deliveries-1.jsonl"));
    assert!(
        !d0.is_empty() && !d1.is_empty(),
        "both processes deliver: {} and {}",
        d0.len(),
        d1.len()
    );
    assert!(d0.is_disjoint(&d1), "a pair delivered by both processes");
    let all: BTreeSet<_> = d0.union(&d1).cloned().collect();
    assert_eq!(all, want);
    for c in ["sporty", "welcome"] {
        assert!(
            want.iter().any(|w| w.0 == c),
            "{c} should deliver something"
        );
    }

    // Process 0's summary speaks for the cluster.
    let summary = read_summary(&s.path("summary.json"));
    for c in ["sporty", "welcome"] {
        let n = want.iter().filter(|w| w.0 == c).count() as u64;
        assert_eq!(campaign_line(&summary, c)["delivered"], n, "{c}");
        let h = held.iter().filter(|w| w.0 == c).count() as u64;
        assert!(h > 0, "{c} should hold someone out");
        assert_eq!(campaign_line(&summary, c)["held_out"], h, "{c}");
    }
    assert_eq!(summary["users_scanned"], users.len() as u64);
    let granted_before = users
        .values()
        .step_by(9)
        .filter(|u| u.level >= 2 && u.tags.iter().any(|t| t == "sports" || t == "travel"))
        .count() as u64;
    assert_eq!(
        campaign_line(&summary, "sporty")["already_granted"],
        granted_before
    );
    let logins = logins_jsonl(&std::fs::read_to_string(s.path("logins.jsonl")).unwrap());
    let unknown = logins
        .iter()
        .filter(|(u, _)| !users.contains_key(u))
        .count() as u64;
    assert_eq!(summary["logins_unknown_user"], unknown);
    assert_eq!(summary["logins"], logins.len() as u64 - unknown);

    // `fanout grants` reads every process's part of the store; held-out users were granted
    // nothing.
    let out = s.fanout(&["grants", "--store", "file:store", "--campaign", "welcome"]);
    let printed: Vec<u64> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| l.parse().unwrap())
        .collect();
    let granted: Vec<u64> = want
        .iter()
        .filter(|w| w.0 == "welcome")
        .map(|w| w.2)
        .collect();
    assert_eq!(printed, granted);

    // Run again, with another worker count: nothing new anywhere (a bucket's process does not
    // depend on -w, so each process finds its users' ledger where it left it).
    run_cluster_with(&s, &["-w", "1"], &["-w", "1"]);
    let again = delivered(&s.path("deliveries-0.jsonl")).len()
        + delivered(&s.path("deliveries-1.jsonl")).len();
    assert_eq!(again, want.len(), "a re-run delivered again");
}

/// [`job`] under a cap of one send a day, with a bulk promotion to everyone listed before
/// `sporty` (normal): sporty's audience is capped for the blast, wherever each user's bucket
/// runs; the lazy coupon is not capped.
fn capped_job() -> String {
    job(50).replace(
        "[policy]\ncontrol_group = 0.05\n",
        "[policy]\ncontrol_group = 0.05\nfrequency_caps = [{ max = 1, per = \"24h\" }]\n\n\
         [[campaign]]\nid = \"blast\"\nkind = \"promotion\"\npriority = \"bulk\"\n\
         start = \"2026-03-01T00:00:00Z\"\nend = \"2026-03-08T00:00:00Z\"\ntitle = \"Blast\"\n\
         body = \"All in, {user.id}\"\n",
    )
}

#[test]
fn two_processes_apply_a_frequency_cap_as_the_naive_reading_says() {
    let s = Scratch::new();
    let users = inputs(&s);
    let job = capped_job();
    s.write("job.toml", &job);
    run_cluster(&s, &["--summary", "summary.json"]);

    let want = expected_run_in(&job, s.dir.path(), &users);
    let d0 = delivered(&s.path("deliveries-0.jsonl"));
    let d1 = delivered(&s.path("deliveries-1.jsonl"));
    assert!(d0.is_disjoint(&d1), "a pair delivered by both processes");
    let all: BTreeSet<_> = d0.union(&d1).cloned().collect();
    assert_eq!(all, want.delivered);
    let summary = read_summary(&s.path("summary.json"));
    let of = |set: &BTreeSet<Pair>, c: &str| set.iter().filter(|w| w.0 == c).count() as u64;
    assert!(of(&want.capped, "blast") > 0, "the cap should bind");
    for c in ["blast", "sporty", "welcome"] {
        let line = campaign_line(&summary, c);
        assert_eq!(line["delivered"], of(&want.delivered, c), "{c}: {line}");
        assert_eq!(line["capped"], of(&want.capped, c), "{c}: {line}");
        assert_eq!(line["held_out"], of(&want.held_out, c), "{c}: {line}");
    }

    // A re-run finds every pair settled, the capped ones included.
    run_cluster_with(&s, &["-w", "1", "--summary", "again.json"], &["-w", "1"]);
    let again = delivered(&s.path("deliveries-0.jsonl")).len()
        + delivered(&s.path("deliveries-1.jsonl")).len();
    assert_eq!(again, want.delivered.len(), "a re-run delivered again");
    for c in read_summary(&s.path("again.json"))["campaigns"]
        .as_array()
        .unwrap()
    {
        assert_eq!(c["eligible"], 0, "re-run: {c}");
    }
}

const USERS: u64 = 150_000;

fn slow_job() -> String {
    format!(
        r#"[inputs]
users = "synthetic:{USERS}:5"

[engine]
bucket_size = 1000
batch_max_messages = 50
now = "2026-03-02T00:00:00Z"

[store]
url = "file:store"

[provider]
url = "log:deliveries.jsonl"
concurrency = 64
rate_per_s = 15000

[[campaign]]
id = "all"
kind = "promotion"
start = "2026-03-01T00:00:00Z"
end = "2026-03-08T00:00:00Z"
body = "Hi {{user.id}} at level {{user.level}}"
"#
    )
}

#[test]
fn a_process_killed_mid_run_is_finished_by_rerunning_the_cluster() {
    kill_and_rerun(&[]);
}

/// The same on the Redis store, whose in-flight sets a re-run of the same process adopts;
/// then one process against the same store finds nothing left to send.
#[test]
fn on_redis_a_killed_process_is_finished_by_a_rerun_and_any_count_shares_the_ledger() {
    let redis = RedisServer::start();
    let store = redis.url(0);
    let s = kill_and_rerun(&["--store", &store]);
    s.fanout_ok(&[
        "run",
        "job.toml",
        "--store",
        &store,
        "--provider",
        "log:deliveries-single.jsonl",
        "--quiet",
        "--summary",
        "single.json",
    ]);
    assert!(read_deliveries(&s.path("deliveries-single.jsonl")).is_empty());
    let summary = read_summary(&s.path("single.json"));
    assert_eq!(campaign_line(&summary, "all")["already_granted"], USERS);
}

/// Kills process 1 of a 2-process run part-way, re-runs the cluster, and checks every user
/// was delivered, a repeat only for what was in flight. `extra` goes to every run.
fn kill_and_rerun(extra: &[&str]) -> Scratch {
    let s = Scratch::new();
    s.write("job.toml", slow_job());
    let lines = |f: &str| {
        std::fs::read(s.path(f))
            .map(|b| b.iter().filter(|&&c| c == b'\n').count())
            .unwrap_or(0)
    };
    let (mut p0, mut p1, _reserved) =
        match cluster_until(&s, extra, extra, || lines("deliveries-1.jsonl") >= 15_000) {
            Outcome::Running(p0, p1, reserved) => (p0, p1, reserved),
            Outcome::Exited(exits) => panic!("the run ended before 15000 lines: {exits:?}"),
        };
    p1.kill().expect("SIGKILL");
    p1.wait().unwrap();
    // The survivor notices its peer is gone and stops with exit 1, saying so.
    let (status, err) = exit_in_time(&mut p0);
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(err.contains("peer process"), "{err}");
    let first: usize = ["deliveries-0.jsonl", "deliveries-1.jsonl"]
        .iter()
        .map(|f| read_deliveries(&s.path(f)).len())
        .sum();
    assert!((first as u64) < USERS, "killed too late to prove anything");

    // Re-run at once (on Redis the re-run waits for the killed run's lease by itself, and the
    // survivor's exit 1 released its own), and at another worker count.
    let mut rerun = vec!["-w", "1", "--rate-per-s", "0", "--summary", "summary.json"];
    rerun.extend_from_slice(extra);
    let mut rerun1 = vec!["-w", "1"];
    rerun1.extend_from_slice(extra);
    run_cluster_with(&s, &rerun, &rerun1);
    let mut by_user: BTreeMap<u64, Vec<Rec>> = BTreeMap::new();
    for f in ["deliveries-0.jsonl", "deliveries-1.jsonl"] {
        for r in read_deliveries(&s.path(f)) {
            by_user.entry(r.user).or_default().push(r);
        }
    }
    // Promotion to all: the naive expectation is every id 1..=USERS.
    assert!(by_user.keys().copied().eq(1..=USERS), "users lost");
    let twice: Vec<_> = by_user.values().filter(|v| v.len() > 1).collect();
    for v in &twice {
        assert_eq!(v.len(), 2, "a user was delivered more than twice");
        assert_eq!(v[0], v[1], "a re-sent message differs (key, body)");
    }
    // Only what was in flight at the kill may repeat: a message holds one of its process's
    // 64 slots from its hand-off until its outcome is recorded, and both processes stopped
    // (one killed, one on losing its peer).
    let bound = 2 * 64;
    assert!(
        twice.len() <= bound,
        "{} users delivered twice",
        twice.len()
    );
    let summary = read_summary(&s.path("summary.json"));
    let delivered = campaign_line(&summary, "all")["delivered"]
        .as_u64()
        .unwrap();
    assert_eq!(delivered + (first - twice.len()) as u64, USERS);
    s
}

#[test]
fn a_file_store_refuses_another_process_count() {
    let s = Scratch::new();
    inputs(&s);
    s.write("job.toml", job(100));
    run_cluster(&s, &[]);
    for args in [
        vec!["run", "job.toml", "--quiet"],
        vec![
            "run",
            "job.toml",
            "--processes",
            "3",
            "--process",
            "2",
            "--quiet",
        ],
    ] {
        let out = s.fanout(&args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(
            err.contains("was written by a cluster of 2 process(es)")
                && err.contains("--processes 2"),
            "{err}"
        );
    }
    // A single process's store is not split by a cluster either.
    let s = Scratch::new();
    inputs(&s);
    s.write("job.toml", job(100));
    s.fanout_ok(&["run", "job.toml", "--quiet"]);
    // Refused before any port is bound.
    let _reserved = free_hostfile(&s);
    let out = s.fanout(
        &cluster_args(0, &[])
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    );
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn bad_cluster_flags_and_lonely_processes_are_clear_errors() {
    let s = Scratch::new();
    inputs(&s);
    s.write("job.toml", job(100));
    s.write("hosts.txt", "127.0.0.1:7001\n\nlocalhost-7002\n");
    let out = s.fanout(
        &cluster_args(0, &[])
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("hosts.txt:3: expected host:port"), "{err}");

    let out = s.fanout(&["run", "job.toml", "--processes", "2", "--quiet"]);
    assert_eq!(out.status.code(), Some(2));

    // Processes given different jobs refuse to run them (exit 2), having sent nothing.
    for (i, (status, err)) in run_both(&s, &[], &["--bucket-size", "77"])
        .iter()
        .enumerate()
    {
        assert_eq!(status.code(), Some(2), "process {i}: {err}");
        assert!(err.contains("runs another job than process"), "{err}");
        assert!(read_deliveries(&s.path(&format!("deliveries-{i}.jsonl"))).is_empty());
    }

    // A process whose peers never come gives up after --peer-wait, exit 1 (its port lost to
    // another program would say so instead: then try fresh ones).
    let mut out;
    let mut attempts = 0;
    loop {
        let _reserved = free_hostfile(&s);
        out = s.fanout(
            &cluster_args(1, &["--peer-wait", "1s"])
                .iter()
                .map(String::as_str)
                .collect::<Vec<_>>(),
        );
        attempts += 1;
        if attempts == 5 || !ports::says_address_in_use(&String::from_utf8_lossy(&out.stderr)) {
            break;
        }
    }
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("waited 1 s for its peers"), "{err}");
}
