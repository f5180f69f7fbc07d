//! The `[policy]` table: good values read back, each bad value named by line and field.

use std::time::Duration;

use chrono_tz::Tz;

use super::{bad, ok, BASE};
use crate::policy::{Cap, Policy, QuietHours};

/// `BASE` (lines 1–8), then `[policy]` on line 9 and `lines` from line 10.
fn policy(lines: &str) -> String {
    format!("{BASE}[policy]\n{lines}\n")
}

const HOUR: Duration = Duration::from_secs(3600);

#[test]
fn no_policy_table_is_the_default_policy() {
    assert_eq!(ok(BASE).policy, Policy::default());
    assert_eq!(ok(&policy("")).policy, Policy::default());
}

#[test]
fn every_value_reads_back() {
    let job = ok(&policy(
        "frequency_caps = [{ max = 2, per = \"24h\" }, { max = 5, per = \"7d\" }]\n\
         quiet_hours = { start = \"21:00\", end = \"08:00\" }\n\
         default_tz = \"Asia/Shanghai\"\n\
         control_group = 0.25",
    ));
    let want = Policy {
        frequency_caps: vec![
            Cap {
                max: 2,
                per: 24 * HOUR,
            },
            Cap {
                max: 5,
                per: 7 * 24 * HOUR,
            },
        ],
        quiet_hours: Some(QuietHours {
            start: 21 * 60,
            end: 8 * 60,
        }),
        default_tz: Tz::Asia__Shanghai,
        control_group: 0.25,
    };
    assert_eq!(job.policy, want);
}

#[test]
fn other_spellings_of_good_values() {
    // Caps as an array of tables; an integer share; quiet hours inside one day; the edges.
    let job = ok(&format!(
        "{BASE}[policy]\ncontrol_group = 1\ndefault_tz = \"America/New_York\"\n\
         quiet_hours = {{ start = \"00:00\", end = \"23:59\" }}\n\
         [[policy.frequency_caps]]\nmax = 5\nper = \"1s\"\n\
         [[policy.frequency_caps]]\nmax = 1\nper = \"366d\"\n"
    ));
    let p = job.policy;
    assert_eq!(p.control_group, 1.0);
    assert_eq!(p.default_tz, Tz::America__New_York);
    assert_eq!(
        p.quiet_hours,
        Some(QuietHours {
            start: 0,
            end: 23 * 60 + 59
        })
    );
    assert_eq!(
        p.frequency_caps,
        [
            Cap {
                max: 5,
                per: Duration::from_secs(1)
            },
            Cap {
                max: 1,
                per: 366 * 24 * HOUR
            }
        ]
    );
    assert_eq!(
        ok(&policy("default_tz = \"UTC\"")).policy.default_tz,
        Tz::UTC
    );
    assert_eq!(ok(&policy("frequency_caps = []")).policy, Policy::default());
    let ten = ["{ max = 1, per = \"1h\" }"; 10].join(", ");
    let job = ok(&policy(&format!("frequency_caps = [{ten}]")));
    assert_eq!(job.policy.frequency_caps.len(), 10);
}

#[test]
fn bad_caps_name_the_cap_and_its_field() {
    let cap = |c: &str| {
        policy(&format!(
            "frequency_caps = [{{ max = 1, per = \"1h\" }}, {c}]"
        ))
    };
    for (c, field, msg) in [
        (
            "{ max = 0, per = \"1h\" }",
            "max",
            "expected a count of sends 1..=5 (the store keeps each user's last 5 sends), got 0",
        ),
        ("{ max = 6, per = \"1h\" }", "max", "got 6"),
        ("{ max = -2, per = \"1h\" }", "max", "got -2"),
        (
            "{ max = 4294967296, per = \"1h\" }",
            "max",
            "got 4294967296",
        ),
        (
            "{ max = 2, per = \"soon\" }",
            "per",
            "expected a duration like \"1h\"",
        ),
        ("{ max = 2, per = \"0s\" }", "per", "must be at least 1s"),
        ("{ max = 2, per = \"500ms\" }", "per", "must be at least 1s"),
        ("{ max = 2, per = \"367d\" }", "per", "must be at most 366d"),
        ("{ max = 2, per = \"\" }", "per", "expected a duration"),
    ] {
        bad(
            &cap(c),
            10,
            &format!("policy.frequency_caps[1].{field}"),
            msg,
        );
    }
    // Wrong types and missing or unknown keys: serde's words, on the cap's line.
    bad(
        &cap("{ max = 1.5, per = \"1h\" }"),
        10,
        "policy.frequency_caps.max",
        "invalid type",
    );
    bad(
        &cap("{ max = 2, per = 3600 }"),
        10,
        "policy.frequency_caps.per",
        "invalid type",
    );
    bad(
        &cap("{ max = 2 }"),
        10,
        "policy.frequency_caps.per",
        "missing field `per`",
    );
    bad(
        &cap("{ max = 2, per = \"1h\", every = \"1h\" }"),
        10,
        "policy.frequency_caps.every",
        "unknown field `every`",
    );
    let eleven = ["{ max = 1, per = \"1h\" }"; 11].join(",\n");
    bad(
        &policy(&format!("frequency_caps = [\n{eleven}]")),
        21,
        "policy.frequency_caps",
        "at most 10 caps, got 11",
    );
    bad(
        &policy("frequency_caps = { max = 1, per = \"1h\" }"),
        10,
        "policy.frequency_caps",
        "invalid type",
    );
}

#[test]
fn bad_quiet_hours_name_start_or_end() {
    let quiet = |s: &str, e: &str| {
        policy(&format!(
            "default_tz = \"UTC\"\nquiet_hours = {{ start = \"{s}\", end = \"{e}\" }}"
        ))
    };
    for (s, e, field, got) in [
        ("24:00", "08:00", "start", "\"24:00\""),
        ("21:60", "08:00", "start", "\"21:60\""),
        ("9:00", "08:00", "start", "\"9:00\""),
        ("21:00:00", "08:00", "start", "\"21:00:00\""),
        ("", "08:00", "start", "\"\""),
        ("21:00", "8h", "end", "\"8h\""),
        ("21:00", "-1:00", "end", "\"-1:00\""),
        ("21:00", "٠٨:٠٠", "end", "\"٠٨:٠٠\""),
    ] {
        bad(
            &quiet(s, e),
            11,
            &format!("policy.quiet_hours.{field}"),
            &format!("expected a local time HH:MM from 00:00 to 23:59, got {got}"),
        );
    }
    bad(
        &quiet("08:00", "08:00"),
        11,
        "policy.quiet_hours.end",
        "must differ from start (\"08:00\")",
    );
    bad(
        &policy("quiet_hours = { start = \"21:00\" }"),
        10,
        "policy.quiet_hours.end",
        "missing field `end`",
    );
    bad(
        &policy("quiet_hours = { start = \"21:00\", end = \"08:00\", tz = \"UTC\" }"),
        10,
        "policy.quiet_hours.tz",
        "unknown field `tz`",
    );
    bad(
        &policy("quiet_hours = { start = 2100, end = \"08:00\" }"),
        10,
        "policy.quiet_hours.start",
        "invalid type",
    );
}

#[test]
fn bad_zone_share_or_key() {
    for zone in ["Mars/Olympus_Mons", "", "Asia/shanghai", "UTC+8"] {
        bad(
            &policy(&format!("default_tz = \"{zone}\"")),
            10,
            "policy.default_tz",
            &format!("unknown time zone {zone:?}: expected an IANA zone name"),
        );
    }
    let long = "x".repeat(1000);
    bad(
        &policy(&format!("default_tz = \"{long}\"")),
        10,
        "policy.default_tz",
        &format!("unknown time zone \"{}…\"", "x".repeat(40)),
    );
    for share in ["1.5", "-0.1", "nan", "inf"] {
        bad(
            &policy(&format!("control_group = {share}")),
            10,
            "policy.control_group",
            "must be a share in 0..=1",
        );
    }
    bad(
        &policy("control_group = \"5%\""),
        10,
        "policy.control_group",
        "invalid type",
    );
    bad(
        &policy("control_group = 0.1\nquiet = 1"),
        11,
        "policy.quiet",
        "unknown field `quiet`",
    );
    bad(
        &policy("default_tz = 8"),
        10,
        "policy.default_tz",
        "invalid type",
    );
}
