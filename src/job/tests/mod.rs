//! The job file's rules, each checked for its error's file, line and field.

use std::path::Path;

use super::*;
use crate::model::Kind;

mod campaign;
mod policy;

/// Lines 1–8 of a valid job; tests replace one of its lines or add lines after it.
const BASE: &str = r#"[inputs]
users = "inputs/users.jsonl"
[[campaign]]
id = "spring"
kind = "promotion"
start = "2026-03-01T00:00:00Z"
end = "2026-03-08T00:00:00Z"
body = "Hi {user.id}"
"#;

/// `BASE` with the line that sets the same key as `line` replaced by it, then `extra`.
fn with(line: &str, extra: &str) -> String {
    let key = line.split(" =").next().unwrap_or(line);
    let mut out: Vec<&str> = BASE
        .lines()
        .map(|l| {
            if l.starts_with(&format!("{key} =")) {
                line
            } else {
                l
            }
        })
        .collect();
    out.push(extra);
    out.join("\n")
}

fn ok(text: &str) -> Job {
    parse("job.toml", text, &Overrides::default()).unwrap_or_else(|e| panic!("{e}\n{text}"))
}

/// Asserts `text` is bad input at `line` in `field`, with `msg` in the message.
#[track_caller]
fn bad(text: &str, line: u64, field: &str, msg: &str) {
    bad_with(
        text,
        &Overrides::default(),
        ("job.toml", Some(line)),
        field,
        msg,
    );
}

#[track_caller]
fn bad_with(text: &str, o: &Overrides, (file, line): (&str, Option<u64>), field: &str, msg: &str) {
    match parse("job.toml", text, o) {
        Err(Error::BadInput(e)) => {
            assert_eq!(
                (e.file.as_str(), e.line, e.field.as_str()),
                (file, line, field),
                "{e}"
            );
            assert!(e.msg.contains(msg), "{e:?} lacks {msg:?}");
        }
        Err(e) => panic!("not BadInput: {e}"),
        Ok(_) => panic!("accepted:\n{text}"),
    }
}

#[test]
fn defaults_apply() {
    let job = ok(BASE);
    assert_eq!(job.path, "job.toml");
    assert_eq!(job.inputs.users, "inputs/users.jsonl");
    assert_eq!(
        (job.inputs.logins.as_deref(), job.inputs.granted.as_deref()),
        (None, None)
    );
    let e = &job.engine;
    assert_eq!(
        (e.bucket_size, e.batch_max_messages, e.batch_max_bytes),
        (1000, 100, 819_200)
    );
    // SPEC: the machine's cores.
    let cores = std::thread::available_parallelism().unwrap().get();
    assert_eq!(e.workers, cores);
    assert!((Utc::now() - e.now).num_seconds().abs() < 60);
    assert_eq!(job.store, "file:.fanout");
    let expected = ProviderConfig {
        url: "log:deliveries.jsonl".into(),
        concurrency: 1000,
        rate_per_s: 0,
        max_attempts: 5,
        dead_letter: "dead-letters.jsonl".into(),
    };
    assert_eq!(job.provider, expected);
    let c = &job.campaigns[0];
    assert_eq!(
        (c.id.as_str(), c.kind, c.title.source()),
        ("spring", Kind::Promotion, "spring")
    );
    assert_eq!(c.audience, Default::default());
}

const FULL: &str = r#"
[inputs]
users = "file-users.jsonl"
logins = "file-logins.jsonl"
granted = "file-granted.jsonl"
[engine]
bucket_size = 10
batch_max_messages = 20
batch_max_bytes = 30
now = 2026-01-01T00:00:00Z
workers = 3
[store]
url = "file:elsewhere"
[provider]
url = "mock:latency=1ms"
concurrency = 40
rate_per_s = 50
max_attempts = 6
dead_letter = "file-dead.jsonl"
"#;

#[test]
fn file_values_then_overrides_win() {
    let job = ok(FULL);
    assert_eq!(job.inputs.logins.as_deref(), Some("file-logins.jsonl"));
    assert_eq!((job.engine.bucket_size, job.engine.workers), (10, 3));
    assert_eq!(job.engine.now.to_rfc3339(), "2026-01-01T00:00:00+00:00");
    assert_eq!(
        (job.provider.concurrency, job.provider.rate_per_s),
        (40, 50)
    );
    assert_eq!(job.store, "file:elsewhere");

    let o = Overrides {
        users: Some("u".into()),
        logins: Some("l".into()),
        campaigns: Some("redis://c:6379/0".into()),
        granted: Some("g".into()),
        store: Some("redis://x:6379/0".into()),
        provider: Some("log:-".into()),
        concurrency: Some(7),
        workers: Some(4),
        now: Some("2026-03-02T08:00:00+08:00".into()),
        bucket_size: Some(11),
        batch_max_messages: Some(12),
        batch_max_bytes: Some(13),
        rate_per_s: Some(14),
        max_attempts: Some(15),
        dead_letter: Some("d".into()),
        logins_per_epoch: Some(16),
    };
    let job = parse("job.toml", FULL, &o).unwrap();
    let i = &job.inputs;
    assert_eq!(
        (i.users.as_str(), i.logins.as_deref(), i.granted.as_deref()),
        ("u", Some("l"), Some("g"))
    );
    assert_eq!(i.campaigns.as_deref(), Some("redis://c:6379/0"));
    let e = &job.engine;
    assert_eq!(
        (
            e.bucket_size,
            e.batch_max_messages,
            e.batch_max_bytes,
            e.workers
        ),
        (11, 12, 13, 4)
    );
    assert_eq!(e.logins_per_epoch, 16);
    assert_eq!(e.now.to_rfc3339(), "2026-03-02T00:00:00+00:00");
    assert_eq!(job.store, "redis://x:6379/0");
    let p = &job.provider;
    assert_eq!(
        (p.url.as_str(), p.concurrency, p.rate_per_s, p.max_attempts),
        ("log:-", 7, 14, 15)
    );
    assert_eq!(p.dead_letter, "d");
}

#[test]
fn users_input_is_required_unless_overridden() {
    let none = Overrides::default();
    bad_with("", &none, ("job.toml", None), "inputs.users", "required");
    bad_with(
        "[inputs]\nlogins = \"l\"\n",
        &none,
        ("job.toml", Some(1)),
        "inputs.users",
        "required",
    );
    let o = Overrides {
        users: Some("synthetic:100".into()),
        ..Default::default()
    };
    let job = parse("job.toml", "", &o).unwrap();
    assert_eq!(job.inputs.users, "synthetic:100");
    bad(
        "[inputs]\nusers = \"\"\n",
        2,
        "inputs.users",
        "must not be empty",
    );
}

#[test]
fn a_job_without_campaigns_is_bad_input() {
    // SPEC: "A job without campaigns is bad input". It parses (serve may get every campaign
    // from its stream), and the commands that need campaigns refuse it naming the file.
    let job = ok("[inputs]\nusers = \"u\"\n");
    match job.require_campaigns() {
        Err(Error::BadInput(e)) => {
            assert_eq!(
                (e.file.as_str(), e.line, e.field.as_str()),
                ("job.toml", None, "campaign")
            );
            assert!(e.msg.contains("at least one campaign"), "{e}");
        }
        other => panic!("{other:?}"),
    }
    assert!(ok(BASE).require_campaigns().is_ok());
}

/// Overrides with one URL flag set to `value`.
fn flag_set(flag: &str, value: &str) -> Overrides {
    let mut o = Overrides::default();
    let slot = match flag {
        "--provider" => &mut o.provider,
        "--store" => &mut o.store,
        "--campaigns" => &mut o.campaigns,
        _ => &mut o.logins,
    };
    *slot = Some(value.to_owned());
    o
}

#[test]
fn bad_urls_name_line_and_field_or_flag() {
    // Lines 9-10: the table header, then the bad value.
    for (table, key, flag, value, msg) in [
        (
            "provider",
            "url",
            "--provider",
            "bogus:x",
            "expected log:PATH",
        ),
        (
            "provider",
            "url",
            "--provider",
            "mock:latency=soon",
            "latency",
        ),
        ("provider", "url", "--provider", "http://", "URL"),
        ("store", "url", "--store", "ftp://x", "expected file:DIR"),
        ("store", "url", "--store", "file:", "expected file:DIR"),
        (
            "store",
            "url",
            "--store",
            "redis://h:port/0",
            "not a Redis URL",
        ),
        (
            "inputs",
            "campaigns",
            "--campaigns",
            "c.jsonl",
            "Redis stream",
        ),
        (
            "inputs",
            "logins",
            "--logins",
            "redis://h:x",
            "not a Redis URL",
        ),
    ] {
        let text = match table {
            // [inputs] is already open on line 1 of BASE: the key goes there.
            "inputs" => BASE.replacen("[inputs]\n", &format!("[inputs]\n{key} = \"{value}\"\n"), 1),
            _ => format!("{BASE}[{table}]\n{key} = \"{value}\"\n"),
        };
        let line = if table == "inputs" { 2 } else { 10 };
        bad(&text, line, &format!("{table}.{key}"), msg);
        // The same value as a flag names the flag; a good flag beats the bad file value.
        bad_with(
            BASE,
            &flag_set(flag, value),
            ("command line", None),
            flag,
            msg,
        );
        let good = match flag {
            "--provider" => "log:-",
            "--store" => "file:s",
            _ => "redis://127.0.0.1:6379/0",
        };
        let o = flag_set(flag, good);
        assert!(parse("job.toml", &text, &o).is_ok(), "{flag} {good}");
    }
}

#[test]
fn unknown_keys_name_key_and_line() {
    bad(
        &format!("colour = 1\n{BASE}"),
        1,
        "colour",
        "unknown field `colour`",
    );
    bad(
        &format!("{BASE}[engine]\nbuckets = 5\n"),
        10,
        "engine.buckets",
        "unknown field",
    );
    bad(
        &with("body = \"x\"", "titel = \"y\""),
        9,
        "campaign \"spring\".titel",
        "unknown field",
    );
    let audience = "[campaign.audience]\nmin_level = 1\nlevel = 2";
    bad(
        &with("body = \"x\"", audience),
        11,
        "campaign \"spring\".audience.level",
        "unknown field",
    );
    bad(
        &format!("{BASE}[provider]\nretries = 5\n"),
        10,
        "provider.retries",
        "unknown field",
    );
}

#[test]
fn toml_errors_keep_line_and_field() {
    bad(
        &format!("{BASE}[engine]\nbucket_size = -1\n"),
        10,
        "engine.bucket_size",
        "u32",
    );
    bad(
        &with("body = \"x\"", "audience = { min_level = \"high\" }"),
        9,
        "campaign \"spring\".audience.min_level",
        "invalid type",
    );
    bad("[inputs]\nusers = \"u\n", 2, "inputs.users", "");
    let no_body: String = BASE
        .lines()
        .filter(|l| !l.starts_with("body"))
        .collect::<Vec<_>>()
        .join("\n");
    bad(
        &no_body,
        3,
        "campaign \"spring\".body",
        "missing field `body`",
    );
}

#[test]
fn now_from_file_and_flag() {
    bad(
        &format!("{BASE}[engine]\nnow = \"yesterday\"\n"),
        10,
        "engine.now",
        "RFC 3339",
    );
    let o = Overrides {
        now: Some("soon".into()),
        ..Default::default()
    };
    bad_with(BASE, &o, ("command line", None), "--now", "RFC 3339");
}

#[test]
fn engine_and_provider_limits() {
    for (table, key, flag) in [
        ("engine", "bucket_size", "--bucket-size"),
        ("engine", "batch_max_messages", "--batch-max-messages"),
        ("engine", "batch_max_bytes", "--batch-max-bytes"),
        ("engine", "workers", "--workers"),
        ("provider", "concurrency", "--concurrency"),
        ("provider", "max_attempts", "--max-attempts"),
    ] {
        let text = format!("{BASE}[{table}]\n{key} = 0\n");
        bad(&text, 10, &format!("{table}.{key}"), "");
        // A good flag beats the bad file value.
        let mut o = Overrides::default();
        match key {
            "bucket_size" => o.bucket_size = Some(1),
            "batch_max_messages" => o.batch_max_messages = Some(1),
            "batch_max_bytes" => o.batch_max_bytes = Some(1),
            "workers" => o.workers = Some(1),
            "concurrency" => o.concurrency = Some(1),
            _ => o.max_attempts = Some(1),
        }
        assert!(parse("job.toml", &text, &o).is_ok(), "{flag}");
    }
    bad(
        &format!("{BASE}[engine]\nworkers = 1025\n"),
        10,
        "engine.workers",
        "1..=1024",
    );
    let o = Overrides {
        workers: Some(0),
        ..Default::default()
    };
    bad_with(BASE, &o, ("command line", None), "--workers", "1..=1024");
    let o = Overrides {
        concurrency: Some(0),
        ..Default::default()
    };
    bad_with(
        BASE,
        &o,
        ("command line", None),
        "--concurrency",
        "at least 1",
    );
}

#[test]
fn sample_jobs_validate() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    for name in [
        "promotion-all-users",
        "coupon-on-login",
        "coupon-segment",
        "hot-products",
    ] {
        let path = root.join("dataflows").join(format!("{name}.toml"));
        let job = load(&path, &Overrides::default()).unwrap_or_else(|e| panic!("{e}"));
        assert!(!job.campaigns.is_empty(), "{name}");
        let i = &job.inputs;
        for input in [Some(&i.users), i.logins.as_ref(), i.granted.as_ref()]
            .into_iter()
            .flatten()
        {
            assert!(root.join(input).is_file(), "{name}: {input} missing");
        }
        assert!(
            job.campaigns.iter().any(|c| c.is_live_at(job.engine.now)),
            "{name}"
        );
    }
}

#[test]
fn unreadable_job_file() {
    match load(Path::new("/nonexistent/job.toml"), &Overrides::default()) {
        Err(Error::BadInput(e)) => {
            assert_eq!((e.file.as_str(), e.line), ("/nonexistent/job.toml", None))
        }
        other => panic!("{other:?}"),
    }
}
