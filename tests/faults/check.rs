//! The checks of a schedule, against the naive reading (and, for a cancelled campaign, what
//! the store recorded of it).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use serde_json::Value;

use crate::common::OUTCOMES;
use crate::naive::{keeps_caps, NCap};

/// One delivery as the provider saw it.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub campaign: String,
    pub occurrence: Option<String>,
    pub user: u64,
    pub key: String,
    pub record: Value,
    /// Where it was seen (log file or "http").
    pub source: String,
    /// The run that sent it (the first run for a key sent again).
    pub run: usize,
}

/// Parses a delivery record; None if it is not one (a torn line).
pub fn parse(bytes: &[u8]) -> Option<Delivery> {
    let v: Value = serde_json::from_slice(bytes).ok()?;
    Some(Delivery {
        campaign: v.get("campaign")?.as_str()?.to_owned(),
        occurrence: v
            .get("occurrence")
            .and_then(Value::as_str)
            .map(str::to_owned),
        user: v.get("user")?.as_u64()?,
        key: v.get("key")?.as_str()?.to_owned(),
        record: v,
        source: String::new(),
        run: 0,
    })
}

pub type Pair = (String, Option<String>, u64);

fn show(p: &Pair) -> String {
    match &p.1 {
        Some(o) => format!("{}@{o}:{}", p.0, p.2),
        None => format!("{}:{}", p.0, p.2),
    }
}

fn examples<'a>(it: impl Iterator<Item = &'a Pair>) -> String {
    it.take(4).map(show).collect::<Vec<_>>().join(" ")
}

/// Lost, unexpected, repeated keys with differing records, and duplicates beyond `bound`
/// (None: re-sends of expected pairs are allowed, after a Redis that forgot). A `cancelled`
/// campaign's pairs cannot be lost (the engine chose which were sent before the cancel:
/// [`cancelled`] checks them); with `may_lose`, no pair can (`want` is every eligible pair,
/// not those to send, and [`settled`] accounts for them). Returns a one-line account.
#[allow(clippy::too_many_arguments)]
pub fn deliveries(
    got: &[Delivery],
    want: &BTreeSet<Pair>,
    cancelled: &BTreeSet<String>,
    may_lose: bool,
    bound: Option<u64>,
    interruptions: &[String],
    violations: &mut Vec<String>,
) -> String {
    let mut by_key: BTreeMap<&str, Vec<&Delivery>> = BTreeMap::new();
    let mut bad_keys = 0;
    for d in got {
        let key = match &d.occurrence {
            Some(o) => format!("{}:{o}:{}", d.campaign, d.user),
            None => format!("{}:{}", d.campaign, d.user),
        };
        if key != d.key && bad_keys < 3 {
            bad_keys += 1;
            violations.push(format!("key {} of a delivery to {key}", d.key));
        }
        by_key.entry(&d.key).or_default().push(d);
    }
    let mut differing = 0;
    for (key, ds) in &by_key {
        if ds.iter().any(|d| d.record != ds[0].record) {
            differing += 1;
            if differing <= 2 {
                violations.push(format!(
                    "key {key} delivered with different records: {} ({}) / {} ({})",
                    ds[0].record,
                    ds[0].source,
                    ds.iter().find(|d| d.record != ds[0].record).unwrap().record,
                    ds.iter().find(|d| d.record != ds[0].record).unwrap().source,
                ));
            }
        }
    }
    let got_set: BTreeSet<Pair> = got
        .iter()
        .map(|d| (d.campaign.clone(), d.occurrence.clone(), d.user))
        .collect();
    let lost: Vec<&Pair> = want
        .difference(&got_set)
        .filter(|p| !may_lose && !cancelled.contains(&p.0))
        .collect();
    let extra: Vec<&Pair> = got_set.difference(want).collect();
    if !lost.is_empty() {
        violations.push(format!(
            "lost {} of {} (e.g. {})",
            lost.len(),
            want.len(),
            examples(lost.iter().copied())
        ));
    }
    if !extra.is_empty() {
        violations.push(format!(
            "{} unexpected deliveries (e.g. {})",
            extra.len(),
            examples(extra.iter().copied())
        ));
    }
    let dups: u64 = by_key.values().map(|v| v.len() as u64 - 1).sum();
    let most = by_key.values().map(Vec::len).max().unwrap_or(0);
    if let Some(bound) = bound {
        if dups > bound {
            let sample: Vec<String> = by_key
                .iter()
                .filter(|(_, v)| v.len() > 1)
                .take(3)
                .map(|(k, v)| {
                    let srcs: Vec<&str> = v.iter().map(|d| d.source.as_str()).collect();
                    format!("{k} in {}", srcs.join("+"))
                })
                .collect();
            violations.push(format!(
                "{dups} duplicates > in-flight bound {bound} ({} interruptions: [{}]; e.g. {})",
                interruptions.len(),
                interruptions.join("; "),
                sample.join(", ")
            ));
        }
    }
    format!(
        "{} deliveries, {} distinct, {} expected, {} lost, {} unexpected, {dups} duplicates \
         (bound {}), at most {most} per key; interruptions: [{}]",
        got.len(),
        got_set.len(),
        want.len(),
        lost.len(),
        extra.len(),
        bound.map_or("none: redis forgot".to_owned(), |b| b.to_string()),
        interruptions.join("; ")
    )
}

/// The final run's summary: for every campaign, eligible is the sum of SPEC's outcomes.
pub fn summary(path: &Path, violations: &mut Vec<String>) {
    let Ok(text) = std::fs::read_to_string(path) else {
        violations.push(format!("no summary {}", path.display()));
        return;
    };
    let Ok(v) = serde_json::from_str::<Value>(&text) else {
        violations.push(format!("summary {} is not JSON", path.display()));
        return;
    };
    let Some(campaigns) = v["campaigns"].as_array() else {
        violations.push("summary without campaigns".into());
        return;
    };
    for c in campaigns {
        let n = |k: &str| c[k].as_u64();
        let sum: Option<u64> = OUTCOMES.iter().map(|k| n(k)).sum();
        if n("eligible").is_none() || n("eligible") != sum {
            violations.push(format!(
                "summary: eligible != the sum of the outcomes in {c}"
            ));
        }
    }
}

/// A final run's summary sends nothing for a cancelled campaign: every user of it is settled
/// already or settled now as cancelled.
pub fn summary_cancelled(path: &Path, cancelled: &BTreeSet<String>, violations: &mut Vec<String>) {
    let Some(v) = std::fs::read_to_string(path)
        .ok()
        .and_then(|t| serde_json::from_str::<Value>(&t).ok())
    else {
        return;
    };
    for c in v["campaigns"].as_array().into_iter().flatten() {
        let id = c["id"].as_str().unwrap_or_default();
        let sent = ["delivered", "dead_lettered", "unreachable"]
            .iter()
            .map(|k| c[k].as_u64().unwrap_or(0))
            .sum::<u64>();
        if cancelled.contains(id) && sent > 0 {
            violations.push(format!(
                "the clean run after the cancel of {id} pushed {sent} of it: {c}"
            ));
        }
    }
}

/// What the store holds of one campaign: each outcome's pairs (`fanout::store::Outcomes`
/// over its ledgers, every part of a split store).
pub type StoreOutcomes = BTreeMap<&'static str, BTreeSet<Pair>>;

/// A campaign, against the naive reading and the provider: the store settled each of its
/// `eligible` pairs exactly once (delivered, cancelled, held out, capped, …) and no other,
/// nothing left in flight, and every pair it records as delivered was sent. Returns the
/// pairs sent and not recorded delivered (in flight at an interruption).
fn accounted(
    campaign: &str,
    store: &StoreOutcomes,
    eligible: &BTreeSet<Pair>,
    got: &[Delivery],
    violations: &mut Vec<String>,
) -> (BTreeSet<Pair>, BTreeSet<Pair>) {
    let empty = BTreeSet::new();
    let of = |name: &str| store.get(name).unwrap_or(&empty);
    let mut all: BTreeSet<Pair> = BTreeSet::new();
    let mut counted = 0;
    for set in store.values() {
        counted += set.len();
        all.extend(set.iter().cloned());
    }
    let mine: BTreeSet<Pair> = eligible
        .iter()
        .filter(|p| p.0 == campaign)
        .cloned()
        .collect();
    if counted != all.len() {
        violations.push(format!(
            "{campaign}: the store's outcomes overlap ({counted} counted, {} pairs)",
            all.len()
        ));
    }
    if !of("in_flight").is_empty() {
        violations.push(format!(
            "{campaign}: {} still in flight after the clean runs (e.g. {})",
            of("in_flight").len(),
            examples(of("in_flight").iter())
        ));
    }
    let missing: Vec<&Pair> = mine.difference(&all).collect();
    let extra: Vec<&Pair> = all.difference(&mine).collect();
    if !missing.is_empty() || !extra.is_empty() {
        violations.push(format!(
            "{campaign}: the store settles {} pairs, the naive reading {} eligible: \
             {} unsettled (e.g. {}), {} not eligible (e.g. {})",
            all.len(),
            mine.len(),
            missing.len(),
            examples(missing.iter().copied()),
            extra.len(),
            examples(extra.iter().copied())
        ));
    }
    let sent: BTreeSet<Pair> = got
        .iter()
        .filter(|d| d.campaign == campaign)
        .map(|d| (d.campaign.clone(), d.occurrence.clone(), d.user))
        .collect();
    let unsent: Vec<&Pair> = of("delivered").difference(&sent).collect();
    if !unsent.is_empty() {
        violations.push(format!(
            "{campaign}: {} recorded delivered, never sent (e.g. {})",
            unsent.len(),
            examples(unsent.iter().copied())
        ));
    }
    let unrecorded = sent.difference(of("delivered")).cloned().collect();
    (sent, unrecorded)
}

/// The one-line account of what [`accounted`] found for `who`.
fn account(who: &str, store: &StoreOutcomes, sent: usize, unrecorded: usize) -> String {
    let counts: Vec<String> = (store.iter())
        .filter(|(_, s)| !s.is_empty())
        .map(|(k, s)| format!("{k} {}", s.len()))
        .collect();
    format!(
        "{who}: store {}; {sent} sent, {unrecorded} of them not recorded delivered",
        counts.join(", ")
    )
}

/// A campaign not cancelled: [`accounted`] for, and at most `bound` of its pairs sent and
/// not recorded delivered. Where the naive reading is exact (`unsent`: not capped beside an
/// operator's commands, which reorder who is offered first), each outcome it names (held
/// out, capped) holds exactly its pairs. Returns a one-line account.
pub fn settled(
    campaign: &str,
    store: &StoreOutcomes,
    eligible: &BTreeSet<Pair>,
    unsent: Option<&StoreOutcomes>,
    got: &[Delivery],
    bound: u64,
    violations: &mut Vec<String>,
) -> String {
    let (sent, unrecorded) = accounted(campaign, store, eligible, got, violations);
    for (outcome, naive) in unsent.into_iter().flatten() {
        let empty = BTreeSet::new();
        let kept = store.get(outcome).unwrap_or(&empty);
        let mine: BTreeSet<&Pair> = naive.iter().filter(|p| p.0 == campaign).collect();
        let missing: Vec<&Pair> = mine.iter().copied().filter(|p| !kept.contains(p)).collect();
        let extra: Vec<&Pair> = kept.iter().filter(|p| !mine.contains(p)).collect();
        if !missing.is_empty() || !extra.is_empty() {
            violations.push(format!(
                "{campaign}: the store's {outcome} holds {} pairs, the naive reading {}: \
                 {} missing (e.g. {}), {} not {outcome} there (e.g. {})",
                kept.len(),
                mine.len(),
                missing.len(),
                examples(missing.iter().copied()),
                extra.len(),
                examples(extra.iter().copied())
            ));
        }
    }
    if unrecorded.len() as u64 > bound {
        violations.push(format!(
            "{campaign}: {} sent and not recorded delivered, over the in-flight bound {bound} \
             (e.g. {})",
            unrecorded.len(),
            examples(unrecorded.iter())
        ));
    }
    account(campaign, store, sent.len(), unrecorded.len())
}

/// A cancelled campaign, against the naive reading and the provider: [`accounted`] for, and
/// the pairs sent beyond those recorded delivered (in flight at an interruption, then settled
/// as cancelled by the run that claimed them again) are cancelled in the store and within
/// `bound`. Returns a one-line account.
pub fn cancelled(
    campaign: &str,
    store: &StoreOutcomes,
    eligible: &BTreeSet<Pair>,
    got: &[Delivery],
    bound: u64,
    violations: &mut Vec<String>,
) -> String {
    let (sent, unrecorded) = accounted(campaign, store, eligible, got, violations);
    let not_cancelled: Vec<&Pair> = match store.get("cancelled") {
        Some(cancelled) => unrecorded.difference(cancelled).collect(),
        None => unrecorded.iter().collect(),
    };
    if !not_cancelled.is_empty() || unrecorded.len() as u64 > bound {
        violations.push(format!(
            "cancelled {campaign}: {} sent and not recorded delivered (in-flight bound {bound}), \
             {} of them not cancelled either (e.g. {})",
            unrecorded.len(),
            not_cancelled.len(),
            examples(unrecorded.iter())
        ));
    }
    let who = format!("cancelled {campaign}");
    account(&who, store, sent.len(), unrecorded.len())
}

/// SPEC "Frequency caps", on what was actually sent: each user's distinct deliveries of the
/// `capped` campaigns, each at the `--now` of the first run that sent it (`ticks[run]`), keep
/// every cap, whatever crashed between a claim and its record in the send history.
pub fn caps(
    got: &[Delivery],
    ticks: &[String],
    caps: &[NCap],
    capped: &BTreeSet<String>,
    violations: &mut Vec<String>,
) {
    let mut first: BTreeMap<Pair, usize> = BTreeMap::new();
    for d in got.iter().filter(|d| capped.contains(&d.campaign)) {
        let run = first
            .entry((d.campaign.clone(), d.occurrence.clone(), d.user))
            .or_insert(d.run);
        *run = (*run).min(d.run);
    }
    let mut sends: BTreeMap<u64, Vec<(chrono::DateTime<chrono::Utc>, &Pair)>> = BTreeMap::new();
    for (pair, run) in &first {
        let t = chrono::DateTime::parse_from_rfc3339(&ticks[*run]).unwrap();
        sends.entry(pair.2).or_default().push((t.to_utc(), pair));
    }
    let over: Vec<String> = sends
        .iter()
        .filter(|(_, s)| !keeps_caps(caps, &s.iter().map(|(t, _)| *t).collect::<Vec<_>>()))
        .take(3)
        .map(|(user, s)| {
            let list: Vec<String> = s
                .iter()
                .map(|(t, p)| format!("{} at {t}", show(p)))
                .collect();
            format!("user {user}: {}", list.join(", "))
        })
        .collect();
    if !over.is_empty() {
        violations.push(format!(
            "a frequency cap {caps:?} exceeded: {}",
            over.join("; ")
        ));
    }
}

/// SPEC "Frequency caps", on what the store recorded `capped`: a cap binds only on sends, so
/// each capped pair had, at some run's `--now` t, at least `max` of its user's other capped
/// pairs' sends in `(t − per, t]` for one cap. `store` holds every capped campaign's outcomes.
/// A send counts at its claim, at the run's `--now`, and when is over-approximated: a pair
/// sent was claimed between the first tick and the run that first sent it; one claimed and
/// not sent (dead-lettered, unreachable, cancelled after its claim) at any tick. So a capped
/// pair this rejects was withheld on sends that cannot have been counted: a lost message.
pub fn capped_justified(
    store: &StoreOutcomes,
    got: &[Delivery],
    ticks: &[String],
    caps: &[NCap],
    violations: &mut Vec<String>,
) {
    let Some(capped) = store.get("capped").filter(|c| !c.is_empty()) else {
        return;
    };
    let time = |t: &String| chrono::DateTime::parse_from_rfc3339(t).unwrap().to_utc();
    let at: Vec<_> = ticks.iter().map(time).collect();
    let Some(&last) = at.iter().max() else {
        return;
    };
    let mut sent_by: BTreeMap<Pair, chrono::DateTime<chrono::Utc>> = BTreeMap::new();
    for d in got {
        let pair = (d.campaign.clone(), d.occurrence.clone(), d.user);
        let t = at[d.run];
        let e = sent_by.entry(pair).or_insert(t);
        *e = (*e).min(t);
    }
    // Per user, each counted send's pair and the span its time lies in.
    let mut sends: BTreeMap<u64, Vec<(&Pair, chrono::DateTime<chrono::Utc>)>> = BTreeMap::new();
    for outcome in ["delivered", "dead_lettered", "unreachable", "cancelled"] {
        for pair in store.get(outcome).into_iter().flatten() {
            let latest = match outcome {
                "delivered" => sent_by.get(pair).copied().unwrap_or(last),
                _ => last,
            };
            sends.entry(pair.2).or_default().push((pair, latest));
        }
    }
    let none = Vec::new();
    let binds = |pair: &Pair| {
        let others: Vec<_> = (sends.get(&pair.2).unwrap_or(&none).iter())
            .filter(|(p, _)| (&p.0, &p.1) != (&pair.0, &pair.1))
            .collect();
        caps.iter().any(|cap| {
            at.iter().any(|&t| {
                let from = t - chrono::Duration::seconds(cap.per_s);
                // Each may lie at or before t (none is before the first tick).
                others.iter().filter(|(_, latest)| from < *latest).count() >= cap.max
            })
        })
    };
    let unjust: Vec<&Pair> = capped.iter().filter(|p| !binds(p)).collect();
    if !unjust.is_empty() {
        violations.push(format!(
            "{} recorded capped with fewer sends of their users than any cap {caps:?} binds on \
             (e.g. {})",
            unjust.len(),
            examples(unjust.iter().copied())
        ));
    }
}
