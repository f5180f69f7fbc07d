//! The promotion scenario end to end: the real binary, real files, the embedded store; every
//! expectation computed naively from the same inputs.

mod common;

use std::collections::{BTreeMap, BTreeSet};

use common::*;

const WINDOW: &str = "start = \"2026-03-01T00:00:00Z\"\nend = \"2026-03-08T00:00:00Z\"";

/// The campaigns of the test job and their personas.
fn campaigns() -> Vec<(&'static str, Persona, &'static str)> {
    vec![
        ("all", Persona::default(), ""),
        (
            "persona",
            Persona {
                min_level: Some(3),
                max_points: Some(80_000),
                tags_any: vec!["sports".into(), "运动".into()],
                ..Persona::default()
            },
            "[campaign.audience]\nmin_level = 3\nmax_points = 80000\ntags_any = [\"sports\", \"运动\"]\n",
        ),
        (
            "moms",
            Persona {
                tags_all: vec!["mom".into(), "tech".into()],
                max_level: Some(7),
                min_points: Some(100),
                ..Persona::default()
            },
            "[campaign.audience]\ntags_all = [\"mom\", \"tech\"]\nmax_level = 7\nmin_points = 100\n",
        ),
    ]
}

fn job(users: &str, extra_engine: &str) -> String {
    let mut s = format!(
        "[inputs]\nusers = \"{users}\"\n\n[engine]\nbucket_size = 50\nbatch_max_messages = 7\nnow = \"2026-03-02T00:00:00Z\"\n{extra_engine}\n\n[store]\nurl = \"file:store\"\n\n[provider]\nurl = \"log:deliveries.jsonl\"\nconcurrency = 16\n"
    );
    for (id, _, audience) in campaigns() {
        s.push_str(&format!(
            "\n[[campaign]]\nid = \"{id}\"\nkind = \"promotion\"\n{WINDOW}\ntitle = \"Sale {{campaign.id}}\"\nbody = \"Hi {{user.id}} L{{user.level}} P{{user.points}}\"\n{audience}"
        ));
    }
    // A campaign outside its window sends nothing.
    s.push_str("\n[[campaign]]\nid = \"expired\"\nkind = \"promotion\"\nstart = \"2026-02-01T00:00:00Z\"\nend = \"2026-02-08T00:00:00Z\"\nbody = \"too late\"\n");
    s
}

/// Users with sparse, unsorted, repeated ids, unicode tags; as (user, token) in file order.
fn users(seed: u64, n: usize) -> Vec<TUser> {
    let vocab = ["sports", "mom", "tech", "运动", "мама", "travel"];
    let mut r = Lcg(seed);
    let mut out = Vec::new();
    for i in 0..n {
        let id = match i % 97 {
            0 => 4_294_967_295 - r.below(3),
            1 if i > 10 => out
                .get(r.below(i as u64) as usize)
                .map(|u: &TUser| u.id)
                .unwrap_or(1),
            _ => 1 + r.below(60_000),
        };
        let tags = vocab
            .iter()
            .filter(|_| r.below(3) == 0)
            .map(|t| t.to_string())
            .collect();
        out.push(TUser {
            id,
            level: r.below(10),
            points: r.below(100_001),
            tags,
        });
    }
    out
}

fn to_jsonl(users: &[TUser]) -> String {
    let mut s = String::new();
    for (i, u) in users.iter().enumerate() {
        let tags: Vec<String> = u.tags.iter().map(|t| format!("\"{t}\"")).collect();
        s.push_str(&format!(
            "{{\"id\": {}, \"level\": {}, \"points\": {}, \"tags\": [{}], \"token\": \"t-{}\", \"extra\": {{\"ignored\": true}}}}",
            u.id,
            u.level,
            u.points,
            tags.join(", "),
            u.id
        ));
        s.push_str(if i % 3 == 0 { "\r\n" } else { "\n" });
        if i % 50 == 0 {
            s.push_str("\n   \r\n");
        }
    }
    s
}

fn to_csv(users: &[TUser]) -> String {
    let mut s = String::from("id,level,points,tags,token\r\n");
    for (i, u) in users.iter().enumerate() {
        s.push_str(&format!(
            "{},{},{},{},t-{}",
            u.id,
            u.level,
            u.points,
            u.tags.join(";"),
            u.id
        ));
        s.push_str(if i % 2 == 0 { "\r\n" } else { "\n" });
    }
    s
}

/// The last line of each id wins.
fn latest(users: &[TUser]) -> BTreeMap<u64, TUser> {
    users.iter().map(|u| (u.id, u.clone())).collect()
}

/// What every campaign should deliver, naively.
fn expected(users: &BTreeMap<u64, TUser>) -> BTreeSet<(String, u64)> {
    let mut want = BTreeSet::new();
    for (id, persona, _) in campaigns() {
        for u in users.values().filter(|u| persona.matches(u)) {
            want.insert((id.to_string(), u.id));
        }
    }
    want
}

fn check_bodies(recs: &[Rec], users: &BTreeMap<u64, TUser>) {
    for r in recs {
        let u = &users[&r.user];
        assert_eq!(r.body, format!("Hi {} L{} P{}", u.id, u.level, u.points));
        assert_eq!(r.title, format!("Sale {}", r.campaign));
        assert_eq!(r.key, format!("{}:{}", r.campaign, r.user));
    }
}

/// Runs job.toml at `workers` workers with a summary; returns the deliveries.
fn run_job(s: &Scratch, workers: &str) -> Vec<Rec> {
    s.fanout_ok(&[
        "run",
        "job.toml",
        "-w",
        workers,
        "--summary",
        "summary.json",
        "--quiet",
    ]);
    read_deliveries(&s.path("deliveries.jsonl"))
}

fn run_and_compare(users_file: &str, content: &str, naive: &BTreeMap<u64, TUser>) {
    let want = expected(naive);
    assert!(want.len() > 100, "the test input should select many users");
    for workers in ["1", "2", "4"] {
        let s = Scratch::new();
        s.write(users_file, content);
        s.write("job.toml", job(users_file, ""));
        let recs = run_job(&s, workers);
        let got = pairs_once(&recs);
        assert_eq!(
            got, want,
            "deliveries at -w {workers} differ from the naive filter"
        );
        check_bodies(&recs, naive);
        let summary = read_summary(&s.path("summary.json"));
        for (id, _, _) in campaigns() {
            let n = want.iter().filter(|(c, _)| c == id).count() as u64;
            assert_eq!(
                campaign_line(&summary, id)["delivered"],
                n,
                "{id} at -w {workers}"
            );
        }
        let expired = campaign_line(&summary, "expired");
        assert_eq!(expired["delivered"], 0);
        assert!(expired["skipped"].as_str().unwrap().contains("window"));
        assert_eq!(summary["users_scanned"], naive.len() as u64);
    }
}

#[test]
fn jsonl_deliveries_equal_the_naive_filter_at_1_2_4_workers() {
    let us = users(11, 3000);
    run_and_compare("users.jsonl", &to_jsonl(&us), &latest(&us));
}

#[test]
fn csv_deliveries_equal_the_naive_filter_at_1_2_4_workers() {
    let us = users(12, 3000);
    run_and_compare("users.csv", &to_csv(&us), &latest(&us));
}

#[test]
fn synthetic_deliveries_equal_the_naive_filter_over_the_generated_file() {
    // `gen users` writes the very users `synthetic:N:SEED` generates; the expectation is a
    // naive filter over that file.
    let s = Scratch::new();
    s.fanout_ok(&[
        "gen",
        "users",
        "--count",
        "20000",
        "--seed",
        "7",
        "--out",
        "gen.jsonl",
    ]);
    let text = std::fs::read_to_string(s.path("gen.jsonl")).unwrap();
    let naive = naive_users_jsonl(&text);
    assert_eq!(naive.len(), 20_000);
    let want = expected(&naive);
    for workers in ["1", "2", "4"] {
        let s = Scratch::new();
        s.write("job.toml", job("synthetic:20000:7", ""));
        let recs = run_job(&s, workers);
        assert_eq!(pairs_once(&recs), want, "synthetic at -w {workers}");
        check_bodies(&recs, &naive);
        read_summary(&s.path("summary.json"));
    }
}

#[test]
fn a_second_run_delivers_nothing_new() {
    let us = users(13, 2000);
    let naive = latest(&us);
    let s = Scratch::new();
    s.write("users.jsonl", to_jsonl(&us));
    s.write("job.toml", job("users.jsonl", ""));
    s.fanout_ok(&[
        "run",
        "job.toml",
        "-w",
        "2",
        "--summary",
        "first.json",
        "--quiet",
    ]);
    let first = read_summary(&s.path("first.json"));
    let after_first = read_deliveries(&s.path("deliveries.jsonl")).len();
    assert_eq!(after_first, expected(&naive).len());

    s.fanout_ok(&[
        "run",
        "job.toml",
        "-w",
        "2",
        "--summary",
        "second.json",
        "--quiet",
    ]);
    let second = read_summary(&s.path("second.json"));
    assert_eq!(
        read_deliveries(&s.path("deliveries.jsonl")).len(),
        after_first,
        "nothing new"
    );
    for (id, _, _) in campaigns() {
        let (a, b) = (campaign_line(&first, id), campaign_line(&second, id));
        assert_eq!(b["delivered"], 0);
        assert_eq!(b["eligible"], 0);
        assert_eq!(b["already_granted"], a["delivered"], "{id}");
    }
}

#[test]
fn granted_input_pairs_are_never_delivered() {
    let us = users(14, 1500);
    let naive = latest(&us);
    let s = Scratch::new();
    s.write("users.jsonl", to_jsonl(&us));
    // Every third user of "all" and a few of "persona" were granted before fanout existed;
    // unknown users and campaigns are harmless.
    let mut granted = String::new();
    let mut pre = BTreeSet::new();
    for (i, u) in naive.values().enumerate() {
        if i % 3 == 0 {
            granted.push_str(&format!("{{\"campaign\": \"all\", \"user\": {}}}\n", u.id));
            pre.insert(("all".to_string(), u.id));
        }
    }
    granted.push_str(
        "{\"campaign\": \"all\", \"user\": 99999999}\n{\"campaign\": \"nope\", \"user\": 1}\n",
    );
    s.write("granted.jsonl", granted);
    s.write(
        "job.toml",
        job("users.jsonl", "")
            .replace("[engine]", "[engine]\n")
            .replace("[inputs]\n", "[inputs]\ngranted = \"granted.jsonl\"\n"),
    );
    s.fanout_ok(&[
        "run",
        "job.toml",
        "-w",
        "2",
        "--summary",
        "summary.json",
        "--quiet",
    ]);
    let got = pairs_once(&read_deliveries(&s.path("deliveries.jsonl")));
    let want: BTreeSet<_> = expected(&naive).difference(&pre).cloned().collect();
    assert_eq!(got, want);
    let summary = read_summary(&s.path("summary.json"));
    assert_eq!(
        campaign_line(&summary, "all")["already_granted"],
        pre.len() as u64
    );
}

/// With stderr not a terminal (cron, Kubernetes), progress is logged every
/// `FANOUT_PROGRESS_EVERY` and once at the end, counting settled pairs against every pair:
/// a re-run whose users were all granted before settles every pair too.
#[test]
fn progress_is_logged_when_stderr_is_not_a_terminal() {
    let s = Scratch::new();
    s.write(
        "job.toml",
        r#"[inputs]
users = "synthetic:3000"
[engine]
now = "2026-03-02T00:00:00Z"
[store]
url = "file:store"
[provider]
url = "mock:latency=20ms"
concurrency = 50
[[campaign]]
id = "p"
kind = "promotion"
start = "2026-03-01T00:00:00Z"
end = "2026-03-08T00:00:00Z"
body = "Hi {user.id}"
"#,
    );
    let progress = |out: &std::process::Output| -> Vec<(u64, u64)> {
        String::from_utf8_lossy(&out.stderr)
            .lines()
            .filter(|l| l.contains("pairs settled"))
            .map(|l| {
                let n = l.split(" pairs settled").next().unwrap();
                let (settled, total) = n.rsplit(' ').next().unwrap().split_once('/').unwrap();
                (settled.parse().unwrap(), total.parse().unwrap())
            })
            .collect()
    };
    let run = || {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_fanout"))
            .args(["run", "job.toml", "-w", "2", "--provider", "log:out.jsonl"])
            .env("FANOUT_PROGRESS_EVERY", "100ms")
            .current_dir(s.dir.path())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        out
    };
    // A slow provider: 3000 pushes, 50 at a time, 20 ms each, take over a second.
    let first = std::process::Command::new(env!("CARGO_BIN_EXE_fanout"))
        .args(["run", "job.toml", "-w", "2"])
        .env("FANOUT_PROGRESS_EVERY", "100ms")
        .current_dir(s.dir.path())
        .output()
        .unwrap();
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    let lines = progress(&first);
    assert!(lines.len() >= 3, "{lines:?}");
    assert!(
        lines.windows(2).all(|w| w[0].0 <= w[1].0),
        "settled never goes back: {lines:?}"
    );
    assert!(lines
        .iter()
        .all(|&(settled, total)| total == 3000 && settled <= total));
    assert_eq!(
        *lines.last().unwrap(),
        (3000, 3000),
        "the last line: everything settled"
    );
    // Everyone was granted: the re-run settles every pair as already granted.
    let again = progress(&run());
    assert_eq!(again.last(), Some(&(3000, 3000)), "{again:?}");
}

/// SIGINT drains: nothing more is claimed, the pushes in flight finish, the store is
/// checkpointed and the partial summary written; "interrupted: N delivered, re-run to finish",
/// exit 130. The re-run delivers exactly the users the first run did not.
#[test]
fn sigint_drains_writes_the_partial_summary_and_exits_130() {
    const USERS: u64 = 20_000;
    let s = Scratch::new();
    s.write(
        "job.toml",
        format!(
            r#"[inputs]
users = "synthetic:{USERS}"
[engine]
now = "2026-03-02T00:00:00Z"
[store]
url = "file:store"
[provider]
url = "mock:latency=200ms"
concurrency = 100
[[campaign]]
id = "p"
kind = "promotion"
start = "2026-03-01T00:00:00Z"
end = "2026-03-08T00:00:00Z"
body = "Hi {{user.id}}"
"#
        ),
    );
    // 20,000 pushes, 100 at a time, 200 ms each: 40 s if left alone.
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_fanout"))
        .args(["run", "job.toml", "--summary", "first.json"])
        .current_dir(s.dir.path())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(1500));
    let signalled = std::time::Instant::now();
    let kill = std::process::Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let out = child.wait_with_output().unwrap();
    let took = signalled.elapsed();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{err}");
    assert!(took.as_secs() < 5, "the drain took {took:?}");
    let first = read_summary(&s.path("first.json"));
    assert_eq!(first["interrupted"], true);
    let delivered = campaign_line(&first, "p")["delivered"].as_u64().unwrap();
    assert!(
        err.contains(&format!(
            "interrupted: {delivered} delivered, re-run to finish"
        )),
        "{err}"
    );
    assert!(
        delivered > 0 && delivered < USERS,
        "{delivered} delivered before the signal"
    );

    s.fanout_ok(&[
        "run",
        "job.toml",
        "--quiet",
        "--provider",
        "log:rest.jsonl",
        "--summary",
        "second.json",
    ]);
    let second = read_summary(&s.path("second.json"));
    assert_eq!(second["interrupted"], false);
    let rest = read_deliveries(&s.path("rest.jsonl"));
    assert_eq!(
        rest.len() as u64,
        USERS - delivered,
        "the re-run sends the rest"
    );
    assert_eq!(
        pairs_once(&rest).len() as u64,
        USERS - delivered,
        "each once"
    );
    // Each summary accounts for the users its run settled (SPEC "Outcomes": eligible is the
    // sum of the outcomes, per run and summed over runs): the users the first run claimed
    // and never attempted are the second run's, not counted twice.
    let eligible = |summary: &serde_json::Value| {
        let line = campaign_line(summary, "p");
        let sum: u64 = [
            "delivered",
            "dead_lettered",
            "unreachable",
            "capped",
            "quiet_held",
        ]
        .iter()
        .chain(&["held_out", "cancelled"])
        .map(|k| line[*k].as_u64().unwrap())
        .sum();
        assert_eq!(line["eligible"].as_u64(), Some(sum), "{line}");
        sum
    };
    assert_eq!(eligible(&first), delivered);
    assert_eq!(eligible(&first) + eligible(&second), USERS);
}
