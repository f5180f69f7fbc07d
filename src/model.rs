//! Plain data shared by every part of fanout: users, tags, buckets, campaigns, deliveries.
//!
//! Nothing here does I/O. The bucket math lives here and only here.

use std::collections::HashMap;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::template::{Template, UserVars, Var};

/// A user id: `1 ..= u32::MAX`, like an auto-increment key.
pub type UserId = u32;

/// The name of a campaign occurrence's ledger in the store: `campaign`, or
/// `campaign:occurrence` for a scheduled campaign (what `fanout grants` reads).
pub fn ledger_key(campaign: &str, occurrence: Option<&str>) -> String {
    match occurrence {
        Some(o) => format!("{campaign}:{o}"),
        None => campaign.to_owned(),
    }
}

/// The id of the occurrence of a scheduled campaign that ticks at `tick`: its start in
/// RFC 3339, UTC, to the second (`2026-03-02T12:00:00Z`).
pub fn occurrence_id(tick: DateTime<Utc>) -> String {
    tick.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

/// One user as read from an input line, before it is stored column-wise.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    /// The user's id (never 0).
    pub id: UserId,
    /// Member level, 0–255.
    pub level: u8,
    /// Loyalty points.
    pub points: u64,
    /// Persona tags, as written in the input.
    pub tags: Vec<String>,
    /// Push token, if the user has one.
    pub token: Option<String>,
    /// The user's time zone, if the input gave one (quiet hours are read in it).
    pub tz: Option<chrono_tz::Tz>,
}

/// A borrowed view of one user, as the sources hand users to the dataflow.
///
/// Tags are interned: `tags` holds sorted, distinct ids from the source's [`TagDict`].
#[derive(Debug, Clone, Copy)]
pub struct UserRef<'a> {
    /// The user's id.
    pub id: UserId,
    /// Member level.
    pub level: u8,
    /// Loyalty points.
    pub points: u64,
    /// Sorted, distinct tag ids.
    pub tags: &'a [u32],
}

/// Tag strings interned to small integers, so a persona test compares integers.
#[derive(Debug, Clone, Default)]
pub struct TagDict {
    ids: HashMap<String, u32>,
    names: Vec<String>,
}

impl TagDict {
    /// The id of `tag`, adding it if new.
    pub fn intern(&mut self, tag: &str) -> u32 {
        if let Some(&id) = self.ids.get(tag) {
            return id;
        }
        let id = self.names.len() as u32;
        self.ids.insert(tag.to_owned(), id);
        self.names.push(tag.to_owned());
        id
    }

    /// The id of `tag`, if any user has it.
    pub fn get(&self, tag: &str) -> Option<u32> {
        self.ids.get(tag).copied()
    }

    /// The tag string of `id`.
    pub fn name(&self, id: u32) -> Option<&str> {
        self.names.get(id as usize).map(String::as_str)
    }

    /// How many distinct tags there are.
    pub fn len(&self) -> usize {
        self.names.len()
    }

    /// Whether no tag was interned.
    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }
}

/// Users are sharded into buckets of consecutive ids: bucket `b` holds ids
/// `b * size .. (b + 1) * size`. A bucket is the unit the dataflow exchanges between workers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Buckets {
    /// Users (ids) per bucket.
    pub size: u32,
}

impl Buckets {
    /// Buckets of `size` ids each (`size` ≥ 1).
    pub fn new(size: u32) -> Self {
        Buckets { size: size.max(1) }
    }

    /// The bucket holding `id`.
    #[inline]
    pub fn bucket_of(&self, id: UserId) -> u32 {
        id / self.size
    }

    /// The id range `[lo, hi)` of bucket `b` (`hi` may be 2^32).
    #[inline]
    pub fn bucket_range(&self, b: u32) -> (u64, u64) {
        let lo = u64::from(b) * u64::from(self.size);
        (lo, lo + u64::from(self.size))
    }

    /// How many buckets cover ids `1 ..= max_id`.
    pub fn count_for(&self, max_id: UserId) -> u32 {
        if max_id == 0 {
            0
        } else {
            self.bucket_of(max_id) + 1
        }
    }
}

/// Where buckets live in a cluster of `processes` × `workers` worker threads. Bucket `b`
/// belongs to process `b % processes` — whatever the worker count, so a re-run with another
/// `-w` finds each bucket's share of the ledger and its in-flight users on the same process —
/// and, within that process, to its worker `(b / processes) % workers`. Every exchange of
/// buckets and of per-user records (by their bucket) routes with [`Placement::exchange_key`],
/// so a bucket and its users always meet on one worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Placement {
    /// The bucket size.
    pub buckets: Buckets,
    /// Processes in the cluster (1: a single process).
    pub processes: usize,
    /// Worker threads per process (timely gives every process the same number).
    pub workers: usize,
}

impl Placement {
    /// `processes` × `workers` (each at least 1) over `buckets`.
    pub fn new(buckets: Buckets, processes: usize, workers: usize) -> Self {
        Placement {
            buckets,
            processes: processes.max(1),
            workers: workers.max(1),
        }
    }

    /// The process that owns bucket `b`.
    #[inline]
    pub fn process_of(&self, b: u32) -> usize {
        (b as usize) % self.processes
    }

    /// The worker (timely's global index: process `p` has workers `p * workers ..`) that
    /// owns bucket `b`.
    #[inline]
    pub fn worker_of(&self, b: u32) -> usize {
        let b = b as usize;
        (b % self.processes) * self.workers + (b / self.processes) % self.workers
    }

    /// The key every timely exchange of per-user records routes with: timely sends key `k`
    /// to worker `k % peers`, and this key is already the owner's index (< peers).
    #[inline]
    pub fn exchange_key(&self, id: UserId) -> u64 {
        self.worker_of(self.buckets.bucket_of(id)) as u64
    }
}

/// Which users one process of a cluster owns: those of the buckets [`Placement`] gives it.
/// Loading keeps only these users, adoption of a dead run's in-flight users takes only these,
/// and every exchange sends a bucket's records to one of this process's workers, so all three
/// agree by construction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Route {
    /// The bucket size.
    pub buckets: Buckets,
    /// Processes in the cluster.
    pub processes: usize,
    /// This process's index.
    pub process: usize,
}

impl Route {
    /// The buckets of process `process` of a cluster of `processes`.
    pub fn process(buckets: Buckets, processes: usize, process: usize) -> Self {
        Route {
            buckets,
            processes: processes.max(1),
            process,
        }
    }

    /// Whether bucket `b` is owned here.
    #[inline]
    pub fn keeps_bucket(&self, b: u32) -> bool {
        Placement::new(self.buckets, self.processes, 1).process_of(b) == self.process
    }

    /// Whether user `id` (its bucket) is owned here.
    #[inline]
    pub fn keeps(&self, id: UserId) -> bool {
        self.keeps_bucket(self.buckets.bucket_of(id))
    }
}

/// What kind of campaign this is (SPEC "The four scenarios").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// A push to every matching user.
    Promotion,
    /// A coupon grant, pushed now or granted at the next login.
    Coupon,
    /// A hot product pushed on every schedule tick.
    HotProduct,
}

impl Kind {
    /// The name as written in job files.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Promotion => "promotion",
            Kind::Coupon => "coupon",
            Kind::HotProduct => "hot_product",
        }
    }
}

/// A campaign's lane in the dispatcher (SPEC "Policy"): transactional messages are never
/// queued behind normal or bulk ones. Ordered as the lanes are served: `Transactional` first.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum Priority {
    /// Password resets, order updates: own budget, may borrow idle capacity; no caps, no
    /// quiet hours, no control group.
    Transactional,
    /// The default.
    #[default]
    Normal,
    /// Mass blasts: never take transactional's share.
    Bulk,
}

impl Priority {
    /// Every priority, in lane order.
    pub const ALL: [Priority; 3] = [Priority::Transactional, Priority::Normal, Priority::Bulk];

    /// The name as written in job files.
    pub fn name(self) -> &'static str {
        match self {
            Priority::Transactional => "transactional",
            Priority::Normal => "normal",
            Priority::Bulk => "bulk",
        }
    }

    /// The lane's index (`0` transactional … `2` bulk).
    pub fn lane(self) -> usize {
        self as usize
    }
}

/// The persona a campaign targets. Every bound is inclusive and optional.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Audience {
    /// Lowest member level, inclusive.
    pub min_level: Option<u8>,
    /// Highest member level, inclusive.
    pub max_level: Option<u8>,
    /// Fewest points, inclusive.
    pub min_points: Option<u64>,
    /// Most points, inclusive.
    pub max_points: Option<u64>,
    /// The user has at least one of these tags (ignored when empty).
    #[serde(default)]
    pub tags_any: Vec<String>,
    /// The user has every one of these tags.
    #[serde(default)]
    pub tags_all: Vec<String>,
}

/// How a coupon reaches its users.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CouponDelivery {
    /// Grant now and notify.
    Push,
    /// Grant at the user's next login inside the window.
    OnLogin,
}

/// The coupon a `coupon` campaign grants.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Coupon {
    /// The coupon's id in the shop.
    pub coupon_id: String,
    /// Its face value.
    pub amount: f64,
    /// Push now, or grant at next login.
    pub delivery: CouponDelivery,
}

/// The product a `hot_product` campaign pushes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Goods {
    /// Product name.
    pub name: String,
    /// Short description.
    #[serde(default)]
    pub desc: String,
    /// Search keywords.
    #[serde(default)]
    pub keywords: String,
}

/// A validated campaign, ready to run.
#[derive(Debug, Clone)]
pub struct Campaign {
    /// `[A-Za-z0-9_-]{1,64}`, unique in a job.
    pub id: String,
    /// What it does.
    pub kind: Kind,
    /// Start of the valid window, inclusive.
    pub start: DateTime<Utc>,
    /// End of the valid window, exclusive.
    pub end: DateTime<Utc>,
    /// Message title template.
    pub title: Template,
    /// Message body template.
    pub body: Template,
    /// Who it targets.
    pub audience: Audience,
    /// The coupon (`kind = "coupon"` only).
    pub coupon: Option<Coupon>,
    /// The product (`kind = "hot_product"` only).
    pub goods: Option<Goods>,
    /// Schedule period (`kind = "hot_product"` only).
    pub every: Option<std::time::Duration>,
    /// Its lane, and whether policy (caps, quiet hours, control group) applies.
    pub priority: Priority,
    /// Share of the audience held out as this campaign's control group, `0.0 ..= 1.0`.
    pub holdout: f64,
}

impl Campaign {
    /// Whether it is a coupon granted at the user's next login (never fanned out).
    pub fn is_lazy(&self) -> bool {
        self.coupon.as_ref().map(|c| c.delivery) == Some(CouponDelivery::OnLogin)
    }

    /// Whether `t` lies in the campaign's window `[start, end)`.
    pub fn is_live_at(&self, t: DateTime<Utc>) -> bool {
        self.start <= t && t < self.end
    }
}

/// One campaign occurrence that the dataflow fans out: a campaign, and for hot products the
/// schedule tick it fires for. Each target has its own ledger in the store.
#[derive(Debug)]
pub struct Target {
    /// The campaign.
    pub campaign: Arc<Campaign>,
    /// The occurrence id (a tick's start, RFC 3339) for scheduled campaigns.
    pub occurrence: Option<Arc<str>>,
    /// `campaign.id` as a shared string, cloned into every delivery.
    pub campaign_id: Arc<str>,
    /// The title with every campaign value filled in.
    title: Template,
    /// The body with every campaign value filled in.
    body: Template,
}

impl Target {
    /// A target for `campaign` at `occurrence`.
    pub fn new(campaign: Arc<Campaign>, occurrence: Option<String>) -> Self {
        let campaign_id: Arc<str> = Arc::from(campaign.id.as_str());
        let value = |v: Var| campaign_value(&campaign, occurrence.as_deref(), v);
        let title = campaign.title.bind(&value);
        let body = campaign.body.bind(&value);
        Target {
            occurrence: occurrence.map(Arc::from),
            campaign_id,
            title,
            body,
            campaign,
        }
    }

    /// The message of this target to one user.
    pub fn render(&self, user: UserVars, token: Option<String>) -> Delivery {
        let none = |_: Var| String::new();
        let mut title = String::new();
        self.title.render_into(&mut title, user, &none);
        let mut body = String::with_capacity(self.body.source().len() + 16);
        self.body.render_into(&mut body, user, &none);
        Delivery {
            campaign: self.campaign_id.clone(),
            occurrence: self.occurrence.clone(),
            user: user.id,
            title,
            body,
            key: self.delivery_key(user.id),
            token,
        }
    }

    /// The name of this target's ledger (see [`ledger_key`]).
    pub fn ledger_key(&self) -> String {
        ledger_key(&self.campaign.id, self.occurrence.as_deref())
    }

    /// What every idempotency key of this target starts with: `campaign:` or
    /// `campaign:occurrence:`.
    pub fn key_prefix(&self) -> String {
        match &self.occurrence {
            Some(o) => format!("{}:{}:", self.campaign.id, o),
            None => format!("{}:", self.campaign.id),
        }
    }

    /// The idempotency key of this target's message to `user`: unique per occurrence and user.
    pub fn delivery_key(&self, user: UserId) -> String {
        format!("{}{user}", self.key_prefix())
    }

    /// The title template with every campaign value filled in.
    pub fn title(&self) -> &Template {
        &self.title
    }

    /// The body template with every campaign value filled in.
    pub fn body(&self) -> &Template {
        &self.body
    }
}

/// The value of a campaign placeholder (every [`Var`] but the `user.*` ones).
pub fn campaign_value(c: &Campaign, occurrence: Option<&str>, v: Var) -> String {
    let coupon = c.coupon.as_ref();
    let goods = c.goods.as_ref();
    match v {
        Var::CampaignId => c.id.clone(),
        // The title is a template of its own: as template source with this campaign's values
        // filled in and its `user.*` placeholders left for the user it is rendered for.
        Var::CampaignTitle => c
            .title
            .bind(&|v| match v {
                // Refused by the job's validation; no recursion if a campaign is built by hand.
                Var::CampaignTitle => String::new(),
                v => campaign_value(c, occurrence, v),
            })
            .to_source(),
        Var::Occurrence => occurrence.unwrap_or_default().to_owned(),
        Var::CouponId => coupon.map(|k| k.coupon_id.clone()).unwrap_or_default(),
        Var::CouponAmount => coupon.map(|k| k.amount.to_string()).unwrap_or_default(),
        Var::GoodsName => goods.map(|g| g.name.clone()).unwrap_or_default(),
        Var::GoodsDesc => goods.map(|g| g.desc.clone()).unwrap_or_default(),
        Var::GoodsKeywords => goods.map(|g| g.keywords.clone()).unwrap_or_default(),
        Var::UserId | Var::UserLevel | Var::UserPoints => String::new(),
    }
}

/// One message to one user, as the `log:` provider writes it (SPEC "deliveries").
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Delivery {
    /// The campaign id.
    pub campaign: Arc<str>,
    /// The occurrence, for scheduled campaigns.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub occurrence: Option<Arc<str>>,
    /// The recipient.
    pub user: UserId,
    /// Rendered title.
    pub title: String,
    /// Rendered body.
    pub body: String,
    /// Idempotency key: the same on every attempt and every re-run.
    pub key: String,
    /// The user's push token, for providers that address devices (never written to logs).
    #[serde(skip)]
    pub token: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_partition_ids() {
        let b = Buckets::new(1000);
        assert_eq!(b.bucket_of(1), 0);
        assert_eq!(b.bucket_of(999), 0);
        assert_eq!(b.bucket_of(1000), 1);
        assert_eq!(b.bucket_range(1), (1000, 2000));
        assert_eq!(b.count_for(1000), 2);
        assert_eq!(b.count_for(999), 1);
        let last = b.bucket_of(u32::MAX);
        assert_eq!(b.bucket_range(last).1, 4_294_968_000);
    }

    #[test]
    fn tags_intern_once() {
        let mut d = TagDict::default();
        let a = d.intern("sports");
        assert_eq!(d.intern("sports"), a);
        let b = d.intern("мама");
        assert_ne!(a, b);
        assert_eq!(d.get("мама"), Some(b));
        assert_eq!(d.name(b), Some("мама"));
        assert_eq!(d.get("nope"), None);
    }
}
