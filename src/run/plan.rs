//! `fanout plan`: what a run would do, without pushing anything.

use std::collections::HashSet;
use std::time::Duration;

use serde::Serialize;

use super::prepare::{granted_covers, Sizing};
use super::targets::Admission;
use super::{load, RunOptions};
use crate::audience::AudienceFilter;
use crate::error::Result;
use crate::job::Job;
use crate::model::Buckets;
use crate::providers::ProviderSpec;
use crate::store::Store;

/// One campaign's line of the plan.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct PlanLine {
    /// Campaign id.
    pub id: String,
    /// Occurrence, for scheduled campaigns.
    pub occurrence: Option<String>,
    /// Why it would send nothing.
    pub skipped: Option<String>,
    /// A lazy coupon: `eligible` users get it at their next login inside its window.
    pub at_login: bool,
    /// Users in the audience.
    pub audience: u64,
    /// Of those, already granted (granted input or store).
    pub already_granted: u64,
    /// Of the campaign's grants in the store, dead-lettered ones: granted, never delivered
    /// (`run --retry-dead-letters` sends them again).
    pub dead_lettered: u64,
    /// Users a run would push to.
    pub eligible: u64,
    /// Provider batches that takes (at least).
    pub batches: u64,
}

/// The plan of a job.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Plan {
    /// Per campaign.
    pub campaigns: Vec<PlanLine>,
    /// Users in the source.
    pub users: u64,
    /// Buckets holding users.
    pub buckets: u64,
    /// Lazy coupons waiting for logins.
    pub active_lazy_coupons: u64,
    /// Estimated seconds to push everything: eligible ÷ min(concurrency ÷ latency, rate).
    pub eta_s: f64,
}

/// Computes the plan of `job`; opens the store read-only.
pub fn plan(job: &Job, opts: &RunOptions) -> Result<Plan> {
    let provider = ProviderSpec::parse(&job.provider.url)?;
    let loaded = load(job, opts)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| crate::error::Error::runtime(format!("cannot start tokio: {e}")))?;
    let store = runtime.block_on(Store::connect_read_only(&job.store))?;
    let buckets = Buckets::new(job.engine.bucket_size);
    let sizing = Sizing::of(job);
    let source = &loaded.source;
    let mut lines = Vec::new();
    let mut total = 0u64;
    for (campaign, admission) in job.campaigns.iter().zip(loaded.admissions) {
        let (target, at_login) = match admission {
            Admission::Skip(why) => {
                lines.push(PlanLine {
                    id: campaign.id.clone(),
                    occurrence: None,
                    skipped: Some(why),
                    at_login: false,
                    audience: 0,
                    already_granted: 0,
                    dead_lettered: 0,
                    eligible: 0,
                    batches: 0,
                });
                continue;
            }
            Admission::Run(t) => (t, false),
            Admission::AtLogin(t) => (t, true),
        };
        let ledger = runtime.block_on(store.ledger(&target.ledger_key()))?;
        // The same pairs `run` drops (none for a hot product's occurrence).
        let pre: HashSet<u32> = loaded
            .granted
            .iter()
            .filter(|(c, _)| granted_covers(c, &target))
            .map(|(_, u)| *u)
            .collect();
        let filter = AudienceFilter::compile(&campaign.audience, source.tags());
        let mut members = Vec::new();
        source.for_each_in(0, u64::MAX, |u| {
            if filter.matches(&u) {
                members.push(u.id);
            }
        });
        let audience = members.len() as u64;
        members.retain(|id| !pre.contains(id));
        let granted =
            (audience - members.len() as u64) + runtime.block_on(ledger.count_done(&members))?;
        let eligible = audience - granted;
        let dead_lettered = runtime.block_on(ledger.counts())?.dead;
        if !at_login {
            total += eligible;
        }
        lines.push(PlanLine {
            id: campaign.id.clone(),
            occurrence: target.occurrence.as_deref().map(str::to_owned),
            skipped: None,
            at_login,
            audience,
            already_granted: granted,
            dead_lettered,
            eligible,
            batches: eligible.div_ceil(sizing.batch_max_messages as u64),
        });
    }
    let latency = provider.typical_latency().max(Duration::from_micros(1));
    let mut per_s = job.provider.concurrency as f64 / latency.as_secs_f64();
    if job.provider.rate_per_s > 0 {
        per_s = per_s.min(job.provider.rate_per_s as f64);
    }
    let active_lazy_coupons = lines.iter().filter(|l| l.at_login).count() as u64;
    Ok(Plan {
        active_lazy_coupons,
        campaigns: lines,
        users: source.len(),
        buckets: source.buckets(buckets).len() as u64,
        eta_s: total as f64 / per_s,
    })
}

/// The plan as a table for people.
pub fn render(plan: &Plan) -> String {
    let mut out = format!(
        "{:<32} {:>10} {:>10} {:>10} {:>10} {:>8}\n",
        "campaign", "audience", "granted", "dead", "eligible", "batches"
    );
    for l in &plan.campaigns {
        let name = super::display_name(&l.id, l.occurrence.as_deref());
        match &l.skipped {
            Some(why) => out.push_str(&format!("{name:<32} skipped: {why}\n")),
            None => out.push_str(&format!(
                "{name:<32} {:>10} {:>10} {:>10} {:>10} {:>8}{}\n",
                l.audience,
                l.already_granted,
                l.dead_lettered,
                l.eligible,
                l.batches,
                if l.at_login { "  (at next login)" } else { "" }
            )),
        }
    }
    if plan.campaigns.iter().any(|l| l.dead_lettered > 0) {
        out.push_str("granted counts dead letters too (`dead`: never delivered; `fanout run --retry-dead-letters` sends them again)\n");
    }
    out.push_str(&format!(
        "{} users in {} buckets; {} lazy coupons active; estimated push time {:.1} s\n",
        plan.users, plan.buckets, plan.active_lazy_coupons, plan.eta_s
    ));
    out
}
