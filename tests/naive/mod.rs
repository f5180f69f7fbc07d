//! A second, naive reading of a job file: what every campaign should deliver, computed with
//! plain loops over the inputs and none of fanout's code.
#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};

use chrono::{DateTime, SecondsFormat, Utc};
use toml::Value;

use crate::common::{Persona, TUser};

/// One campaign as the naive reading sees it.
#[derive(Debug, Clone)]
pub struct NCampaign {
    pub id: String,
    pub kind: String,
    pub start: DateTime<Utc>,
    pub end: DateTime<Utc>,
    pub persona: Persona,
    pub on_login: bool,
    pub every_s: Option<i64>,
    pub goods_name: Option<String>,
    /// Share held out of this campaign.
    pub holdout: f64,
    /// `priority = "transactional"`: the control group does not apply.
    pub transactional: bool,
}

fn time(v: &Value) -> DateTime<Utc> {
    let s = v
        .as_str()
        .map(str::to_owned)
        .unwrap_or_else(|| v.to_string());
    DateTime::parse_from_rfc3339(&s)
        .expect("test job times are RFC 3339")
        .with_timezone(&Utc)
}

fn strings(v: Option<&Value>) -> Vec<String> {
    v.and_then(Value::as_array)
        .map(|a| a.iter().map(|t| t.as_str().unwrap().to_owned()).collect())
        .unwrap_or_default()
}

fn every_seconds(s: &str) -> i64 {
    let (n, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap());
    let n: i64 = n.parse().unwrap();
    n * match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86400,
        other => panic!("unit {other} not understood by the naive reader"),
    }
}

/// The campaigns of a job file's text, and its `[engine] now`.
pub fn campaigns(job: &str) -> (Vec<NCampaign>, Option<DateTime<Utc>>) {
    let doc: Value = toml::from_str(job).expect("test job is TOML");
    let now = doc.get("engine").and_then(|e| e.get("now")).map(time);
    let list = doc
        .get("campaign")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let campaigns = list
        .iter()
        .map(|c| {
            let a = c.get("audience");
            let num = |k: &str| {
                a.and_then(|a| a.get(k))
                    .and_then(Value::as_integer)
                    .map(|v| v as u64)
            };
            NCampaign {
                id: c["id"].as_str().unwrap().to_owned(),
                kind: c["kind"].as_str().unwrap().to_owned(),
                start: time(&c["start"]),
                end: time(&c["end"]),
                persona: Persona {
                    min_level: num("min_level"),
                    max_level: num("max_level"),
                    min_points: num("min_points"),
                    max_points: num("max_points"),
                    tags_any: strings(a.and_then(|a| a.get("tags_any"))),
                    tags_all: strings(a.and_then(|a| a.get("tags_all"))),
                },
                on_login: c
                    .get("coupon")
                    .and_then(|k| k.get("delivery"))
                    .and_then(Value::as_str)
                    == Some("on_login"),
                every_s: c
                    .get("schedule")
                    .and_then(|s| s.get("every"))
                    .and_then(Value::as_str)
                    .map(every_seconds),
                goods_name: c
                    .get("goods")
                    .and_then(|g| g.get("name"))
                    .and_then(Value::as_str)
                    .map(str::to_owned),
                holdout: c.get("holdout").map(share).unwrap_or(0.0),
                transactional: c.get("priority").and_then(Value::as_str) == Some("transactional"),
            }
        })
        .collect();
    (campaigns, now)
}

/// A share as TOML writes it (`0.1`, or `0` as an integer).
fn share(v: &Value) -> f64 {
    v.as_float()
        .or_else(|| v.as_integer().map(|i| i as f64))
        .unwrap()
}

/// The job's `[policy] control_group` (0 without one).
pub fn control_group(job: &str) -> f64 {
    let doc: Value = toml::from_str(job).expect("test job is TOML");
    doc.get("policy")
        .and_then(|p| p.get("control_group"))
        .map(share)
        .unwrap_or(0.0)
}

/// FNV-1a, 64 bits, written out from its definition.
pub fn fnv1a(text: &str) -> u64 {
    let mut h: u64 = 14695981039346656037;
    for b in text.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(1099511628211);
    }
    h
}

/// SPEC "Holdouts": whether `user` is held out of `c` in a job whose control group is
/// `control`.
pub fn is_held_out(c: &NCampaign, control: f64, user: u64) -> bool {
    let cut = |share: f64| (share * 1e6).round() as u64;
    fnv1a(&format!("{}:{user}", c.id)) % 1_000_000 < cut(c.holdout)
        || (!c.transactional && fnv1a(&format!("control:{user}")) % 1_000_000 < cut(control))
}

/// The occurrence a scheduled campaign fires for at `now`: its tick's start.
pub fn tick(c: &NCampaign, now: DateTime<Utc>) -> String {
    let every = c.every_s.unwrap();
    let since = (now - c.start).num_seconds();
    let start = c.start + chrono::Duration::seconds(since / every * every);
    start.to_rfc3339_opts(SecondsFormat::Secs, true)
}

/// A login: user id and time.
pub type NLogin = (u64, DateTime<Utc>);

/// A (campaign, occurrence, user) pair.
pub type Pair = (String, Option<String>, u64);

/// What should be delivered: (campaign, occurrence, user).
pub fn expected(
    job: &str,
    users: &BTreeMap<u64, TUser>,
    logins: &[NLogin],
    granted: &BTreeSet<(String, u64)>,
    now: Option<DateTime<Utc>>,
) -> BTreeSet<Pair> {
    expected_outcomes(job, users, logins, granted, now).0
}

/// What should be (delivered, held out): the pairs of users in each campaign's audience and
/// window, not granted before, split by SPEC's holdout rule.
pub fn expected_outcomes(
    job: &str,
    users: &BTreeMap<u64, TUser>,
    logins: &[NLogin],
    granted: &BTreeSet<(String, u64)>,
    now: Option<DateTime<Utc>>,
) -> (BTreeSet<Pair>, BTreeSet<Pair>) {
    let (campaigns, job_now) = campaigns(job);
    let control = control_group(job);
    let now = now.or(job_now).expect("a clock");
    let mut want = BTreeSet::new();
    for c in &campaigns {
        let pre = |u: u64| granted.contains(&(c.id.clone(), u));
        if c.on_login {
            for &(user, ts) in logins {
                if let Some(u) = users.get(&user) {
                    if c.start <= ts && ts < c.end && c.persona.matches(u) && !pre(user) {
                        want.insert((c.id.clone(), None, user));
                    }
                }
            }
        } else if c.start <= now && now < c.end {
            let occurrence = (c.kind == "hot_product").then(|| tick(c, now));
            for u in users.values() {
                let granted_before = occurrence.is_none() && pre(u.id);
                if c.persona.matches(u) && !granted_before {
                    want.insert((c.id.clone(), occurrence.clone(), u.id));
                }
            }
        }
    }
    let held = want
        .iter()
        .filter(|(id, _, user)| {
            let c = campaigns.iter().find(|c| &c.id == id).unwrap();
            is_held_out(c, control, *user)
        })
        .cloned()
        .collect::<BTreeSet<Pair>>();
    (&want - &held, held)
}

/// What `job` should deliver with its logins and granted inputs read from `dir` (where the
/// job ran) and `now` from the job.
pub fn expected_in(
    job: &str,
    dir: &std::path::Path,
    users: &BTreeMap<u64, TUser>,
) -> BTreeSet<Pair> {
    expected_outcomes_in(job, dir, users).0
}

/// [`expected_outcomes`] with the inputs read from `dir`, as [`expected_in`] does.
pub fn expected_outcomes_in(
    job: &str,
    dir: &std::path::Path,
    users: &BTreeMap<u64, TUser>,
) -> (BTreeSet<Pair>, BTreeSet<Pair>) {
    let doc: Value = toml::from_str(job).expect("test job is TOML");
    let input = |k: &str| {
        doc["inputs"]
            .get(k)
            .and_then(Value::as_str)
            .map(|p| std::fs::read_to_string(dir.join(p)).unwrap_or_default())
    };
    let logins = input("logins")
        .map(|t| logins_jsonl(&t))
        .unwrap_or_default();
    let granted = input("granted")
        .map(|t| granted_jsonl(&t))
        .unwrap_or_default();
    expected_outcomes(job, users, &logins, &granted, None)
}

/// Reads login events the naive way.
pub fn logins_jsonl(text: &str) -> Vec<NLogin> {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (
                v["user"].as_u64().unwrap(),
                time(&Value::String(v["ts"].as_str().unwrap().into())),
            )
        })
        .collect()
}

/// Reads granted pairs the naive way.
pub fn granted_jsonl(text: &str) -> BTreeSet<(String, u64)> {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (
                v["campaign"].as_str().unwrap().to_owned(),
                v["user"].as_u64().unwrap(),
            )
        })
        .collect()
}

/// Deliveries as (campaign, occurrence, user), asserting none repeats.
pub fn delivered(path: &std::path::Path) -> BTreeSet<(String, Option<String>, u64)> {
    let mut seen = BTreeSet::new();
    let text = std::fs::read_to_string(path).unwrap_or_default();
    for l in text.lines() {
        let v: serde_json::Value = serde_json::from_str(l).unwrap();
        let rec = (
            v["campaign"].as_str().unwrap().to_owned(),
            v["occurrence"].as_str().map(str::to_owned),
            v["user"].as_u64().unwrap(),
        );
        let key = match &rec.1 {
            Some(o) => format!("{}:{o}:{}", rec.0, rec.2),
            None => format!("{}:{}", rec.0, rec.2),
        };
        assert_eq!(v["key"], key, "idempotency key of {l}");
        assert!(seen.insert(rec), "delivered twice: {l}");
    }
    seen
}

/// What one run of a sequence does, as the naive reading sees it.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct NRun {
    pub delivered: BTreeSet<Pair>,
    pub held_out: BTreeSet<Pair>,
    /// Held for quiet hours by this run (again, if an earlier run held them too).
    pub quiet_held: BTreeSet<Pair>,
    /// Dead-lettered: their campaign's window ended during their quiet hours.
    pub expired: BTreeSet<Pair>,
}

/// Each user's zone name, from users JSON Lines (users without one are absent; the last
/// line of an id wins, as for the rest of the user).
pub fn zones_jsonl(text: &str) -> BTreeMap<u64, String> {
    let mut zones = BTreeMap::new();
    for l in text.lines().filter(|l| !l.trim().is_empty()) {
        let v: serde_json::Value = serde_json::from_str(l).unwrap();
        zones.insert(
            v["id"].as_u64().unwrap(),
            v["tz"].as_str().map(str::to_owned),
        );
    }
    zones
        .into_iter()
        .filter_map(|(id, tz)| Some((id, tz?)))
        .collect()
}

/// `HH:MM` as minutes after midnight.
fn minutes(hhmm: &str) -> u32 {
    let (h, m) = hhmm.split_once(':').unwrap();
    h.parse::<u32>().unwrap() * 60 + m.parse::<u32>().unwrap()
}

/// SPEC "Quiet hours": whether `t` is inside `[start, end)` on the wall clock of `zone`.
fn is_quiet(zone: &str, t: DateTime<Utc>, (start, end): (u32, u32)) -> bool {
    use chrono::Timelike;
    let tz: chrono_tz::Tz = zone.parse().unwrap();
    let local = t.with_timezone(&tz);
    let m = local.hour() * 60 + local.minute();
    match start < end {
        true => start <= m && m < end,
        false => m >= start || m < end,
    }
}

/// Fan-out runs of `job` at each of `nows` in turn against one store, with the pairs of
/// `granted` granted before, holdouts, the control group and quiet hours (lazy coupons are
/// left out: quiet hours exempt them).
pub fn fan_out_runs(
    job: &str,
    users: &BTreeMap<u64, TUser>,
    zones: &BTreeMap<u64, String>,
    granted: &BTreeSet<(String, u64)>,
    nows: &[DateTime<Utc>],
) -> Vec<NRun> {
    let (campaigns, _) = campaigns(job);
    let control = control_group(job);
    let doc: Value = toml::from_str(job).unwrap();
    let policy = doc.get("policy");
    let quiet = policy.and_then(|p| p.get("quiet_hours")).map(|q| {
        (
            minutes(q["start"].as_str().unwrap()),
            minutes(q["end"].as_str().unwrap()),
        )
    });
    let default_tz = policy
        .and_then(|p| p.get("default_tz"))
        .and_then(Value::as_str)
        .unwrap_or("UTC")
        .to_owned();
    let zone = |u: u64| zones.get(&u).cloned().unwrap_or(default_tz.clone());
    // Every pair settled for good (sent, held out, dead-lettered), and those held now.
    // Granted pairs cover a campaign, not a scheduled campaign's occurrences.
    let mut settled: BTreeSet<Pair> = granted.iter().map(|(c, u)| (c.clone(), None, *u)).collect();
    let mut held: BTreeSet<Pair> = BTreeSet::new();
    let mut runs = Vec::new();
    for &t in nows {
        let mut run = NRun::default();
        for c in campaigns.iter().filter(|c| !c.on_login) {
            let quiet_now =
                |u: u64| quiet.is_some_and(|q| !c.transactional && is_quiet(&zone(u), t, q));
            let live = c.start <= t && t < c.end;
            let mine: Vec<Pair> = held.iter().filter(|p| p.0 == c.id).cloned().collect();
            if !live {
                if t >= c.end {
                    for p in mine {
                        held.remove(&p);
                        settled.insert(p.clone());
                        run.expired.insert(p);
                    }
                }
                continue;
            }
            let occurrence = (c.kind == "hot_product").then(|| tick(c, t));
            // Earlier occurrences' held users: sent now unless still quiet.
            for p in mine.into_iter().filter(|p| p.1 != occurrence) {
                if quiet_now(p.2) {
                    run.quiet_held.insert(p);
                } else {
                    held.remove(&p);
                    settled.insert(p.clone());
                    run.delivered.insert(p);
                }
            }
            for u in users.values().filter(|u| c.persona.matches(u)) {
                let p = (c.id.clone(), occurrence.clone(), u.id);
                if settled.contains(&p) {
                    continue;
                }
                if is_held_out(c, control, u.id) {
                    settled.insert(p.clone());
                    run.held_out.insert(p);
                } else if quiet_now(u.id) {
                    held.insert(p.clone());
                    run.quiet_held.insert(p);
                } else {
                    held.remove(&p);
                    settled.insert(p.clone());
                    run.delivered.insert(p);
                }
            }
        }
        runs.push(run);
    }
    runs
}
