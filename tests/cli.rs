//! The command line beyond `run`: `plan`, `grants`, overrides — each checked against a naive
//! computation over the repository's sample inputs.

mod common;

use std::collections::BTreeSet;
use std::path::Path;

use common::*;

fn repo(path: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join(path)
        .to_string_lossy()
        .into_owned()
}

fn sample_users() -> Vec<TUser> {
    naive_users_jsonl(&std::fs::read_to_string(repo("inputs/users.jsonl")).unwrap())
        .into_values()
        .collect()
}

/// vip-c300 and tech-starter-c50 of dataflows/coupon-segment.toml, stated again here.
fn vip() -> Persona {
    Persona {
        min_level: Some(5),
        min_points: Some(20_000),
        ..Persona::default()
    }
}

fn tech_starter() -> Persona {
    Persona {
        max_level: Some(4),
        max_points: Some(5000),
        tags_all: vec!["tech".into()],
        ..Persona::default()
    }
}

fn granted_for(campaign: &str) -> BTreeSet<u64> {
    std::fs::read_to_string(repo("inputs/granted.jsonl"))
        .unwrap()
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v["campaign"] == campaign)
        .map(|v| v["user"].as_u64().unwrap())
        .collect()
}

#[test]
fn plan_counts_the_audience_and_pushes_nothing() {
    let s = Scratch::new();
    let job = repo("dataflows/coupon-segment.toml");
    let users = repo("inputs/users.jsonl");
    let granted = repo("inputs/granted.jsonl");
    let out = s.fanout(&[
        "plan",
        &job,
        "--users",
        &users,
        "--granted",
        &granted,
        "--summary",
        "plan.json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let plan: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(s.path("plan.json")).unwrap()).unwrap();
    let all = sample_users();
    for (id, persona) in [("vip-c300", vip()), ("tech-starter-c50", tech_starter())] {
        let audience: BTreeSet<u64> = all
            .iter()
            .filter(|u| persona.matches(u))
            .map(|u| u.id)
            .collect();
        let pre = granted_for(id);
        let line = plan["campaigns"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["id"] == id)
            .unwrap();
        assert_eq!(line["audience"], audience.len() as u64, "{id}");
        assert_eq!(
            line["already_granted"],
            audience.intersection(&pre).count() as u64,
            "{id}"
        );
        assert_eq!(
            line["eligible"],
            audience.difference(&pre).count() as u64,
            "{id}"
        );
    }
    assert_eq!(plan["users"], all.len() as u64);
    assert!(
        !s.path("deliveries.jsonl").exists(),
        "plan pushed something"
    );
    assert!(!s.path(".fanout").exists(), "plan wrote a store");
}

#[test]
fn grants_lists_exactly_the_naive_audience_minus_prior_grants() {
    let s = Scratch::new();
    let job = repo("dataflows/coupon-segment.toml");
    let users = repo("inputs/users.jsonl");
    let granted = repo("inputs/granted.jsonl");
    s.fanout_ok(&[
        "run",
        &job,
        "--users",
        &users,
        "--granted",
        &granted,
        "-w",
        "2",
        "--quiet",
    ]);
    let all = sample_users();
    for (id, persona) in [("vip-c300", vip()), ("tech-starter-c50", tech_starter())] {
        let out = s.fanout(&["grants", "--store", "file:.fanout", "--campaign", id]);
        assert!(out.status.success());
        let printed: Vec<u64> = String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .map(|l| l.parse().unwrap())
            .collect();
        let pre = granted_for(id);
        let want: Vec<u64> = all
            .iter()
            .filter(|u| persona.matches(u) && !pre.contains(&u.id))
            .map(|u| u.id)
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        assert!(!want.is_empty());
        assert_eq!(printed, want, "{id}: sorted grants");
    }
}

#[test]
fn overrides_beat_the_job_file() {
    let s = Scratch::new();
    let job = repo("dataflows/promotion-all-users.toml");
    let users = repo("inputs/users.jsonl");
    // Odd bucket and batch sizes, another provider path and store: same deliveries.
    s.fanout_ok(&[
        "run",
        &job,
        "--users",
        &users,
        "--bucket-size",
        "7",
        "--batch-max-messages",
        "3",
        "--batch-max-bytes",
        "700",
        "--provider",
        "log:other.jsonl",
        "--store",
        "file:elsewhere",
        "--concurrency",
        "5",
        "-w",
        "3",
        "--quiet",
        "--summary",
        "summary.json",
    ]);
    assert!(!s.path("deliveries.jsonl").exists());
    assert!(s.path("elsewhere").is_dir());
    let got = pairs_once(&read_deliveries(&s.path("other.jsonl")));
    let all = sample_users();
    let sports = Persona {
        min_level: Some(3),
        tags_any: vec!["sports".into(), "运动".into()],
        ..Persona::default()
    };
    let mut want = BTreeSet::new();
    for u in &all {
        want.insert(("spring-sale-2026".to_string(), u.id));
        if sports.matches(u) {
            want.insert(("sports-week-2026".to_string(), u.id));
        }
    }
    assert_eq!(got, want);
    let summary = read_summary(&s.path("summary.json"));
    // Batches of at most 3 messages: at least a third of the deliveries.
    assert!(summary["batches"].as_u64().unwrap() >= (want.len() as u64).div_ceil(3));

    // --now outside every window: nothing is sent, and the summary says why.
    s.fanout_ok(&[
        "run",
        &job,
        "--users",
        &users,
        "--now",
        "2027-01-01T00:00:00Z",
        "--provider",
        "log:late.jsonl",
        "--quiet",
        "--summary",
        "late.json",
    ]);
    assert!(read_deliveries(&s.path("late.jsonl")).is_empty());
    let late = read_summary(&s.path("late.json"));
    for c in late["campaigns"].as_array().unwrap() {
        assert!(c["skipped"].as_str().unwrap().contains("window"));
    }
}

#[test]
fn the_same_content_under_another_id_is_rejected_with_exit_3() {
    let s = Scratch::new();
    let users = repo("inputs/users.jsonl");
    let job = std::fs::read_to_string(repo("dataflows/promotion-all-users.toml")).unwrap();
    s.write("a.toml", &job);
    s.fanout_ok(&["run", "a.toml", "--users", &users, "--quiet"]);
    let first = read_deliveries(&s.path("deliveries.jsonl")).len();
    assert!(first > 0);

    // The same campaign content under a new id, in another job, against the same store.
    s.write(
        "b.toml",
        job.replace("id = \"spring-sale-2026\"", "id = \"spring-sale-copy\""),
    );
    let out = s.fanout(&["run", "b.toml", "--users", &users, "--quiet"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{stderr}");
    assert!(
        stderr.contains("spring-sale-copy") && stderr.contains("spring-sale-2026"),
        "{stderr}"
    );
    assert_eq!(
        read_deliveries(&s.path("deliveries.jsonl")).len(),
        first,
        "nothing more sent"
    );

    // The same id resumes (and finds everything delivered).
    s.fanout_ok(&["run", "a.toml", "--users", &users, "--quiet"]);
    assert_eq!(read_deliveries(&s.path("deliveries.jsonl")).len(), first);
}

#[test]
fn plan_covers_lazy_coupons_and_hot_products() {
    let s = Scratch::new();
    let users = repo("inputs/users.jsonl");
    let all = sample_users();
    // Lazy coupons: active, and the audience that would get one at its next login.
    let job = repo("dataflows/coupon-on-login.toml");
    let granted = repo("inputs/granted.jsonl");
    let logins = repo("inputs/logins.jsonl");
    s.fanout_ok(&[
        "plan",
        &job,
        "--users",
        &users,
        "--granted",
        &granted,
        "--logins",
        &logins,
        "--summary",
        "lazy.json",
    ]);
    let plan: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(s.path("lazy.json")).unwrap()).unwrap();
    assert_eq!(plan["active_lazy_coupons"], 2);
    let moms = Persona {
        tags_all: vec!["mom".into()],
        ..Persona::default()
    };
    let line = plan["campaigns"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["id"] == "mom-week-c200")
        .unwrap();
    assert_eq!(line["at_login"], true);
    let audience: BTreeSet<u64> = all
        .iter()
        .filter(|u| moms.matches(u))
        .map(|u| u.id)
        .collect();
    assert_eq!(line["audience"], audience.len() as u64);
    let pre = granted_for("mom-week-c200");
    assert_eq!(line["eligible"], audience.difference(&pre).count() as u64);

    // Hot products: the occurrence of `now`, and its audience.
    let job = repo("dataflows/hot-products.toml");
    s.fanout_ok(&[
        "plan",
        &job,
        "--users",
        &users,
        "--now",
        "2026-03-02T13:45:00Z",
        "--summary",
        "hot.json",
    ]);
    let plan: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(s.path("hot.json")).unwrap()).unwrap();
    let line = plan["campaigns"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["id"] == "smart-watch")
        .unwrap();
    assert_eq!(line["occurrence"], "2026-03-02T12:00:00Z");
    let watch = Persona {
        min_level: Some(2),
        tags_any: vec!["tech".into()],
        ..Persona::default()
    };
    assert_eq!(
        line["audience"],
        all.iter().filter(|u| watch.matches(u)).count() as u64
    );
    assert!(!s.path("deliveries.jsonl").exists());
}

/// Runs `fanout ARGS` in `s` and expects exit 2 with every one of `needles` on stderr and
/// nothing on stdout (an audit that cannot answer must not look like an empty answer).
#[track_caller]
fn expect_usage(s: &Scratch, args: &[&str], needles: &[&str]) {
    let out = s.fanout(args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
    assert!(out.stdout.is_empty(), "{args:?} printed to stdout");
    for n in needles {
        assert!(stderr.contains(n), "{args:?}: {n:?} not in:\n{stderr}");
    }
}

#[test]
fn grants_refuses_what_it_cannot_answer_with_exit_2() {
    let s = Scratch::new();
    let job = repo("dataflows/coupon-segment.toml");
    let users = repo("inputs/users.jsonl");
    let granted = repo("inputs/granted.jsonl");
    s.fanout_ok(&[
        "run",
        &job,
        "--users",
        &users,
        "--granted",
        &granted,
        "--quiet",
    ]);
    let grants = |store: &'static str, rest: &[&'static str]| {
        let mut args = vec!["grants", "--store", store];
        args.extend_from_slice(rest);
        args
    };
    // A store directory that does not exist (a typo) is not an empty store.
    expect_usage(
        &s,
        &grants("file:no-such-store", &["--campaign", "vip-c300"]),
        &["no-such-store", "no such directory"],
    );
    // Not a campaign id.
    expect_usage(
        &s,
        &grants("file:.fanout", &["--campaign", "vip c300!"]),
        &["--campaign", "vip c300!"],
    );
    // A campaign the store never admitted.
    expect_usage(
        &s,
        &grants("file:.fanout", &["--campaign", "vip-c301"]),
        &["vip-c301", "no ledger"],
    );
    // An occurrence that is not a time, and one the campaign never had.
    expect_usage(
        &s,
        &grants(
            "file:.fanout",
            &["--campaign", "vip-c300", "--occurrence", "tuesday"],
        ),
        &["--occurrence", "RFC 3339"],
    );
    expect_usage(
        &s,
        &grants(
            "file:.fanout",
            &[
                "--campaign",
                "vip-c300",
                "--occurrence",
                "2026-03-02T10:00:00Z",
            ],
        ),
        &["vip-c300", "2026-03-02T10:00:00Z"],
    );
    // The campaign it did admit still answers.
    let out = s.fanout(&grants("file:.fanout", &["--campaign", "vip-c300"]));
    assert!(out.status.success());
    assert!(!out.stdout.is_empty());
}

#[test]
fn grants_reads_a_hot_products_occurrence_in_any_rfc3339_spelling() {
    let s = Scratch::new();
    let job = repo("dataflows/hot-products.toml");
    let users = repo("inputs/users.jsonl");
    let now = ["--now", "2026-03-02T13:45:00Z"];
    s.fanout_ok(&["run", &job, "--users", &users, now[0], now[1], "--quiet"]);
    let deliveries = read_deliveries(&s.path("deliveries.jsonl"));
    let want: BTreeSet<u64> = deliveries
        .iter()
        .filter(|d| d.campaign == "smart-watch")
        .map(|d| d.user)
        .collect();
    assert!(!want.is_empty());
    for spelling in ["2026-03-02T12:00:00Z", "2026-03-02T20:00:00+08:00"] {
        let out = s.fanout(&[
            "grants",
            "--store",
            "file:.fanout",
            "--campaign",
            "smart-watch",
            "--occurrence",
            spelling,
        ]);
        assert!(
            out.status.success(),
            "{spelling}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let got: BTreeSet<u64> = String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .map(|l| l.parse().unwrap())
            .collect();
        assert_eq!(got, want, "{spelling}");
    }
    // Without the occurrence, the error says to pass one.
    expect_usage(
        &s,
        &[
            "grants",
            "--store",
            "file:.fanout",
            "--campaign",
            "smart-watch",
        ],
        &["smart-watch", "--occurrence"],
    );
}

/// `fanout ARGS` in `s` with `env` added to the environment.
fn fanout_env(s: &Scratch, args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_fanout"))
        .args(args)
        .envs(env.iter().copied())
        .current_dir(s.dir.path())
        .output()
        .expect("run fanout")
}

fn stdout_of(s: &Scratch, args: &[&str]) -> String {
    let out = s.fanout(args);
    assert!(out.status.success(), "{args:?}");
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn each_command_shows_and_accepts_only_its_own_flags() {
    let s = Scratch::new();
    let run = stdout_of(&s, &["run", "--help"]);
    let plan = stdout_of(&s, &["plan", "--help"]);
    let serve = stdout_of(&s, &["serve", "--help"]);
    for flag in [
        "--processes",
        "--hostfile",
        "--retry-dead-letters",
        "--summary",
        "--now",
    ] {
        assert!(run.contains(flag), "run --help lacks {flag}");
    }
    for flag in [
        "--processes",
        "--hostfile",
        "--retry-dead-letters",
        "--workers",
    ] {
        assert!(!plan.contains(flag), "plan --help shows {flag}");
    }
    for flag in ["--now", "--summary", "--processes", "--retry-dead-letters"] {
        assert!(!serve.contains(flag), "serve --help shows {flag}");
    }
    assert!(serve.contains("--campaigns") && !run.contains("--campaigns"));
    // A flag the command would ignore or refuse later is refused by the parser: exit 2.
    let job = repo("dataflows/promotion-all-users.toml");
    for args in [
        vec!["plan", &job, "--processes", "2"],
        vec!["serve", &job, "--now", "2026-03-02T00:00:00Z"],
        vec!["serve", &job, "--summary", "s.json"],
        vec!["run", &job, "--campaigns", "redis://127.0.0.1:1/0"],
    ] {
        let out = s.fanout(&args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(args[2]), "{args:?}: {stderr}");
    }
    assert!(!s.path("deliveries.jsonl").exists());
}

#[test]
fn help_lists_exit_codes_redis_inputs_and_environment_variables() {
    let s = Scratch::new();
    let help = stdout_of(&s, &["--help"]);
    for needle in [
        "Exit codes",
        "0    done",
        "2    bad usage or bad input",
        "3    a campaign rejected",
        "130",
        "redis://",
        "FANOUT_STORE",
        "FANOUT_REDIS_PASSWORD",
        "--log-format",
        "docs/cli.md",
    ] {
        assert!(help.contains(needle), "fanout --help lacks {needle:?}");
    }
    let run = stdout_of(&s, &["run", "--help"]);
    for needle in ["FANOUT_USERS", "FANOUT_WORKERS", "redis://", "Exit codes"] {
        assert!(run.contains(needle), "run --help lacks {needle:?}");
    }
}

#[test]
fn flags_come_from_fanout_environment_variables_and_the_flag_wins() {
    let s = Scratch::new();
    let job = repo("dataflows/promotion-all-users.toml");
    let users = repo("inputs/users.jsonl");
    let env = [
        ("FANOUT_USERS", users.as_str()),
        ("FANOUT_STORE", "file:env-store"),
        ("FANOUT_PROVIDER", "log:env.jsonl"),
        ("FANOUT_WORKERS", "2"),
        ("FANOUT_QUIET", "1"),
        ("FANOUT_SUMMARY", "summary.json"),
    ];
    let out = fanout_env(&s, &["run", &job], &env);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.is_empty(), "FANOUT_QUIET=1 is --quiet: {stderr}");
    assert!(s.path("env-store").is_dir());
    let delivered = read_deliveries(&s.path("env.jsonl")).len();
    assert_eq!(
        delivered as u64,
        sample_users().len() as u64 * 2 - skipped_sports()
    );
    assert!(s.path("summary.json").is_file());
    // The flag beats the variable.
    let out = fanout_env(&s, &["run", &job, "--store", "file:flag-store"], &env);
    assert!(out.status.success());
    assert!(s.path("flag-store").is_dir());
    // A bad value from the environment is refused like a bad flag.
    let out = fanout_env(&s, &["run", &job], &[("FANOUT_WORKERS", "many")]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("many"), "{stderr}");
}

/// Sample users who do not get sports-week-2026 (level < 3 or no sports tag).
fn skipped_sports() -> u64 {
    let sports = Persona {
        min_level: Some(3),
        tags_any: vec!["sports".into(), "运动".into()],
        ..Persona::default()
    };
    sample_users().iter().filter(|u| !sports.matches(u)).count() as u64
}

#[test]
fn log_format_json_writes_one_json_object_a_line() {
    let s = Scratch::new();
    let info = ("RUST_LOG", "info");
    for (args, env) in [
        (
            vec!["--log-format", "json", "gen", "users", "--count", "3"],
            vec![info],
        ),
        // Global: after the subcommand too; and from FANOUT_LOG_FORMAT.
        (
            vec!["gen", "users", "--count", "3", "--log-format", "json"],
            vec![info],
        ),
        (
            vec!["gen", "users", "--count", "3"],
            vec![info, ("FANOUT_LOG_FORMAT", "json")],
        ),
    ] {
        let out = fanout_env(&s, &args, &env);
        assert!(out.status.success(), "{args:?}");
        let stderr = String::from_utf8(out.stderr).unwrap();
        let lines: Vec<serde_json::Value> = stderr
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
            .collect();
        assert!(
            lines
                .iter()
                .any(|v| v["level"] == "INFO" && v["fields"]["message"] == "wrote 3 users"),
            "{args:?}: {stderr}"
        );
    }
    // Text stays the default.
    let out = fanout_env(&s, &["gen", "users", "--count", "3"], &[info]);
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(stderr.contains("wrote 3 users") && !stderr.trim_start().starts_with('{'));
}

/// `report --json` takes a path and `campaigns --json` is a switch: their variables differ,
/// so an environment that sets both serves both (one `FANOUT_JSON=true` used to make
/// `report` write a file named `true`).
#[test]
fn report_and_campaigns_read_their_own_json_variables() {
    let s = Scratch::new();
    let job = repo("dataflows/coupon-segment.toml");
    let users = repo("inputs/users.jsonl");
    let granted = repo("inputs/granted.jsonl");
    s.fanout_ok(&[
        "run",
        &job,
        "--users",
        &users,
        "--granted",
        &granted,
        "--store",
        "file:st",
        "--quiet",
    ]);
    let with_env = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_fanout"))
            .args(args)
            .current_dir(s.dir.path())
            .env("FANOUT_JSON", "report.json")
            .env("FANOUT_CAMPAIGNS_JSON", "true")
            .output()
            .unwrap()
    };
    let report = with_env(&["report", "--store", "file:st", "--campaign", "vip-c300"]);
    assert!(
        report.status.success(),
        "{}",
        String::from_utf8_lossy(&report.stderr)
    );
    let written: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(s.path("report.json")).unwrap()).unwrap();
    assert!(written.is_object(), "{written}");
    let listing = with_env(&["campaigns", "list", "--store", "file:st"]);
    assert!(
        listing.status.success(),
        "{}",
        String::from_utf8_lossy(&listing.stderr)
    );
    let listed: serde_json::Value = serde_json::from_slice(&listing.stdout).unwrap();
    let ids: Vec<&str> = (listed["campaigns"].as_array().unwrap().iter())
        .map(|c| c["id"].as_str().unwrap())
        .collect();
    assert!(ids.contains(&"vip-c300"), "{ids:?}");
}
