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
    /// `priority = "transactional"`: the control group, quiet hours and caps do not apply.
    pub transactional: bool,
    /// The order a run offers a user capped campaigns in: 0 transactional, 1 normal (the
    /// default), 2 bulk.
    pub priority: u8,
}

impl NCampaign {
    /// SPEC "Frequency caps": whether caps limit this campaign's sends and count them
    /// (fan-outs of normal or bulk priority; not lazy coupons, not transactional ones).
    pub fn capped(&self) -> bool {
        !self.on_login && !self.transactional
    }
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
                priority: match c.get("priority").and_then(Value::as_str) {
                    Some("transactional") => 0,
                    None | Some("normal") => 1,
                    Some("bulk") => 2,
                    Some(other) => panic!("priority {other} not understood by the naive reader"),
                },
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

/// What should be (delivered, held out): [`expected_run`]'s delivered and held-out pairs.
pub fn expected_outcomes(
    job: &str,
    users: &BTreeMap<u64, TUser>,
    logins: &[NLogin],
    granted: &BTreeSet<(String, u64)>,
    now: Option<DateTime<Utc>>,
) -> (BTreeSet<Pair>, BTreeSet<Pair>) {
    let run = expected_run(job, users, logins, granted, now);
    (run.delivered, run.held_out)
}

/// One run of `job` at `now` (else the job's `[engine] now`) against a fresh store: the pairs
/// of users in each campaign's audience and window, not granted before, by outcome ([`runs`]
/// with every user in `default_tz`).
pub fn expected_run(
    job: &str,
    users: &BTreeMap<u64, TUser>,
    logins: &[NLogin],
    granted: &BTreeSet<(String, u64)>,
    now: Option<DateTime<Utc>>,
) -> NRun {
    let now = now.or(campaigns(job).1).expect("a clock");
    let mut all = runs(job, users, &BTreeMap::new(), logins, granted, &[now]);
    all.pop().unwrap()
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
    let run = expected_run_in(job, dir, users);
    (run.delivered, run.held_out)
}

/// [`expected_run`] with the inputs read from `dir`, as [`expected_in`] does.
pub fn expected_run_in(job: &str, dir: &std::path::Path, users: &BTreeMap<u64, TUser>) -> NRun {
    let (logins, granted) = inputs_in(job, dir);
    expected_run(job, users, &logins, &granted, None)
}

/// The job's logins and granted pairs, read from `dir` (none where the job names none).
pub fn inputs_in(job: &str, dir: &std::path::Path) -> (Vec<NLogin>, BTreeSet<(String, u64)>) {
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
    (logins, granted)
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
    /// Sent (with the `log:` provider, users without a token too).
    pub delivered: BTreeSet<Pair>,
    pub held_out: BTreeSet<Pair>,
    /// Held for quiet hours by this run (again, if an earlier run held them too).
    pub quiet_held: BTreeSet<Pair>,
    /// Dead-lettered: their campaign's window ended during their quiet hours.
    pub expired: BTreeSet<Pair>,
    /// A frequency cap bound: never sent for this occurrence.
    pub capped: BTreeSet<Pair>,
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

/// A `{ max, per }` frequency cap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NCap {
    pub max: usize,
    pub per_s: i64,
}

/// The job's `[policy] frequency_caps` (none without).
pub fn frequency_caps(job: &str) -> Vec<NCap> {
    let doc: Value = toml::from_str(job).expect("test job is TOML");
    doc.get("policy")
        .and_then(|p| p.get("frequency_caps"))
        .and_then(Value::as_array)
        .map(|caps| {
            caps.iter()
                .map(|c| NCap {
                    max: c["max"].as_integer().unwrap() as usize,
                    per_s: every_seconds(c["per"].as_str().unwrap()),
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Every capped send of every user so far, with its time: exact, unlike a store's.
#[derive(Debug, Default, Clone)]
pub struct SendHistory(BTreeMap<u64, Vec<DateTime<Utc>>>);

impl SendHistory {
    /// SPEC "Frequency caps": a send to `user` at `t` is allowed iff, for every cap, fewer
    /// than `max` of the user's sends fall in `(t − per, t]`.
    pub fn allows(&self, caps: &[NCap], user: u64, t: DateTime<Utc>) -> bool {
        let sends = self.0.get(&user).map(Vec::as_slice).unwrap_or_default();
        caps.iter().all(|cap| {
            let from = t - chrono::Duration::seconds(cap.per_s);
            sends.iter().filter(|&&s| from < s && s <= t).count() < cap.max
        })
    }

    pub fn record(&mut self, user: u64, t: DateTime<Utc>) {
        self.0.entry(user).or_default().push(t);
    }
}

/// Whether `sends` (the times of one user's capped sends) keep every cap: no window
/// `(s − per, s]` ending at a send holds more than `max` of them.
pub fn keeps_caps(caps: &[NCap], sends: &[DateTime<Utc>]) -> bool {
    caps.iter().all(|cap| {
        sends.iter().all(|&t| {
            let from = t - chrono::Duration::seconds(cap.per_s);
            sends.iter().filter(|&&s| from < s && s <= t).count() <= cap.max
        })
    })
}

/// The job's `[policy]` as the naive reading applies it.
struct NPolicy {
    control: f64,
    quiet: Option<(u32, u32)>,
    default_tz: String,
    caps: Vec<NCap>,
}

impl NPolicy {
    fn of(job: &str) -> NPolicy {
        let doc: Value = toml::from_str(job).unwrap();
        let policy = doc.get("policy");
        NPolicy {
            control: control_group(job),
            quiet: policy.and_then(|p| p.get("quiet_hours")).map(|q| {
                (
                    minutes(q["start"].as_str().unwrap()),
                    minutes(q["end"].as_str().unwrap()),
                )
            }),
            default_tz: policy
                .and_then(|p| p.get("default_tz"))
                .and_then(Value::as_str)
                .unwrap_or("UTC")
                .to_owned(),
            caps: frequency_caps(job),
        }
    }
}

/// Fan-out runs of `job` at each of `nows` in turn against one store (lazy coupons are left
/// out): [`runs`] without logins.
pub fn fan_out_runs(
    job: &str,
    users: &BTreeMap<u64, TUser>,
    zones: &BTreeMap<u64, String>,
    granted: &BTreeSet<(String, u64)>,
    nows: &[DateTime<Utc>],
) -> Vec<NRun> {
    runs(job, users, zones, &[], granted, nows)
}

/// Runs of `job` at each of `nows` in turn (non-decreasing) against one store, with the pairs
/// of `granted` granted before: the one place of SPEC's order of decisions. For a pair
/// matching the audience: already settled (granted, held out, capped, sent, expired) → held
/// out (the campaign's holdout, then the control group, which skips transactional campaigns)
/// → quiet hours (held; released by a later run outside them, its caps checked then) →
/// frequency caps → sent. A run decides each user's capped offers in priority order (normal
/// before bulk), then job-file order, then tick order (a hot product's released occurrences
/// before the current one); every allowed capped send is recorded at the run's time, whatever
/// the push then does. Lazy coupons (exempt from quiet hours and caps, counted by no cap) are
/// granted to `logins` by the first run.
pub fn runs(
    job: &str,
    users: &BTreeMap<u64, TUser>,
    zones: &BTreeMap<u64, String>,
    logins: &[NLogin],
    granted: &BTreeSet<(String, u64)>,
    nows: &[DateTime<Utc>],
) -> Vec<NRun> {
    assert!(nows.is_sorted(), "runs at non-decreasing times");
    let (campaigns, _) = campaigns(job);
    let policy = NPolicy::of(job);
    let zone = |u: u64| zones.get(&u).unwrap_or(&policy.default_tz);
    // Every pair settled for good (sent, held out, capped, dead-lettered), and those held
    // now. Granted pairs cover a campaign, not a scheduled campaign's occurrences.
    let mut settled: BTreeSet<Pair> = granted.iter().map(|(c, u)| (c.clone(), None, *u)).collect();
    let mut held: BTreeSet<Pair> = BTreeSet::new();
    let mut history = SendHistory::default();
    let mut out = Vec::new();
    for (k, &t) in nows.iter().enumerate() {
        let mut run = NRun::default();
        if k == 0 {
            for c in campaigns.iter().filter(|c| c.on_login) {
                for &(user, ts) in logins {
                    let p = (c.id.clone(), None, user);
                    let in_window = c.start <= ts && ts < c.end;
                    let fits = users.get(&user).is_some_and(|u| c.persona.matches(u));
                    if in_window && fits && settled.insert(p.clone()) {
                        match is_held_out(c, policy.control, user) {
                            true => run.held_out.insert(p),
                            false => run.delivered.insert(p),
                        };
                    }
                }
            }
        }
        // Pairs past every rule but the caps, with their campaign's position in the job.
        let mut offers: Vec<(usize, Pair)> = Vec::new();
        for (at, c) in campaigns.iter().enumerate().filter(|(_, c)| !c.on_login) {
            let quiet_now = |u: u64| {
                policy
                    .quiet
                    .is_some_and(|q| !c.transactional && is_quiet(zone(u), t, q))
            };
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
            // Earlier occurrences' held users: offered now unless still quiet.
            for p in mine.into_iter().filter(|p| p.1 != occurrence) {
                if quiet_now(p.2) {
                    run.quiet_held.insert(p);
                } else {
                    offers.push((at, p));
                }
            }
            for u in users.values().filter(|u| c.persona.matches(u)) {
                let p = (c.id.clone(), occurrence.clone(), u.id);
                if settled.contains(&p) {
                    continue;
                }
                if is_held_out(c, policy.control, u.id) {
                    settled.insert(p.clone());
                    run.held_out.insert(p);
                } else if quiet_now(u.id) {
                    held.insert(p.clone());
                    run.quiet_held.insert(p);
                } else {
                    offers.push((at, p));
                }
            }
        }
        // Users are independent: one sort puts each user's offers in SPEC's order (an
        // occurrence is its tick's RFC 3339 time, so its text sorts by time).
        offers.sort_by_key(|(at, p)| (p.2, campaigns[*at].priority, *at, p.1.clone()));
        for (at, p) in offers {
            held.remove(&p);
            settled.insert(p.clone());
            let user = p.2;
            if !campaigns[at].capped() {
                run.delivered.insert(p);
            } else if history.allows(&policy.caps, user, t) {
                history.record(user, t);
                run.delivered.insert(p);
            } else {
                run.capped.insert(p);
            }
        }
        out.push(run);
    }
    out
}
