//! One `[[campaign]]` table: its serde form, its checks, and its content hash.

use std::ops::Range;
use std::time::Duration;

use chrono::{DateTime, SecondsFormat, Utc};
use serde::Deserialize;
use toml::Spanned;

use super::locate::{campaign_label, is_valid_id, Doc, Shape};
use crate::error::{Error, Result};
use crate::model::{Audience, Campaign, Coupon, CouponDelivery, Goods, Kind, Priority};
use crate::template::{Template, Var};

/// A campaign as written, each value with its span.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCampaign {
    pub(super) id: Spanned<String>,
    kind: Spanned<Kind>,
    start: Spanned<toml::Value>,
    end: Spanned<toml::Value>,
    title: Option<Spanned<String>>,
    body: Spanned<String>,
    audience: Option<RawAudience>,
    coupon: Option<Spanned<RawCoupon>>,
    goods: Option<Spanned<Goods>>,
    schedule: Option<Spanned<RawSchedule>>,
    #[serde(default)]
    priority: Priority,
    holdout: Option<Spanned<f64>>,
}

/// Levels are read wide so that 300 is our error ("must be 0..=255"), not serde's.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAudience {
    min_level: Option<Spanned<i64>>,
    max_level: Option<Spanned<i64>>,
    min_points: Option<Spanned<u64>>,
    max_points: Option<Spanned<u64>>,
    #[serde(default)]
    tags_any: Vec<String>,
    #[serde(default)]
    tags_all: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCoupon {
    coupon_id: Spanned<String>,
    amount: Spanned<f64>,
    delivery: CouponDelivery,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSchedule {
    every: Spanned<String>,
}

/// Parses one `[[campaign]]` table given as TOML text (the `fanout:campaigns` Redis stream
/// carries these); `label` names its source in errors.
///
/// The text is either the table's inside (`id = …`, then `[audience]`, `[coupon]`, …) or a
/// job-file fragment holding exactly one `[[campaign]]` (with `[campaign.audience]`, …).
pub fn parse_campaign(label: &str, text: &str) -> Result<Campaign> {
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct One {
        campaign: Vec<Spanned<RawCampaign>>,
    }
    let wrapped = match toml::from_str::<toml::Table>(text) {
        Ok(table) => table.contains_key("campaign"),
        Err(_) => text
            .lines()
            .any(|l| l.trim_start().starts_with("[[campaign]]")),
    };
    if !wrapped {
        let doc = Doc::new(label, text, Shape::Bare);
        return doc.deserialize::<RawCampaign>()?.validate(&doc, 0);
    }
    let doc = Doc::new(label, text, Shape::Job);
    let mut one: One = doc.deserialize()?;
    match one.campaign.pop() {
        Some(c) if one.campaign.is_empty() => c.into_inner().validate(&doc, 0),
        Some(c) => Err(doc.error(
            c.span().start,
            "campaign",
            format!(
                "expected one [[campaign]] table, found {}",
                one.campaign.len() + 1
            ),
        )),
        None => Err(doc.error(0, "campaign", "expected one [[campaign]] table, found none")),
    }
}

impl RawCampaign {
    /// Checks every rule of SPEC "Job file" for campaign number `i` of `doc`.
    pub(super) fn validate(self, doc: &Doc, i: usize) -> Result<Campaign> {
        let id = self.id.get_ref();
        if !is_valid_id(id) {
            return Err(doc.error(
                self.id.span().start,
                format!("{}.id", campaign_label(None, i)),
                format!("must match [A-Za-z0-9_-]{{1,64}}, got {id:?}"),
            ));
        }
        let name = campaign_label(Some(id), i);
        let at = |span: Range<usize>, field: &str, msg: String| -> Error {
            doc.error(span.start, format!("{name}.{field}"), msg)
        };
        let kind = *self.kind.get_ref();
        let start =
            time_value(self.start.get_ref()).map_err(|m| at(self.start.span(), "start", m))?;
        let end = time_value(self.end.get_ref()).map_err(|m| at(self.end.span(), "end", m))?;
        if start >= end {
            let msg = format!(
                "must be after start ({})",
                start.to_rfc3339_opts(SecondsFormat::Secs, true)
            );
            return Err(at(self.end.span(), "end", msg));
        }
        let template = |field: &str, source: &Spanned<String>| -> Result<Template> {
            let t = Template::parse(source.get_ref())
                .map_err(|e| at(source.span(), field, e.to_string()))?;
            for var in t.vars() {
                placeholder_fits(kind, field, var).map_err(|m| at(source.span(), field, m))?;
            }
            Ok(t)
        };
        let title = match &self.title {
            Some(t) => template("title", t)?,
            // An id is a valid template: it has no braces.
            None => template("title", &self.id)?,
        };
        let body = template("body", &self.body)?;
        let audience = match self.audience {
            Some(a) => {
                a.validate(&|span, field, msg| at(span, &format!("audience.{field}"), msg))?
            }
            None => Audience::default(),
        };

        // Each kind has its sections, and only its own.
        let sections = [
            (
                self.coupon.as_ref().map(Spanned::span),
                "coupon",
                Kind::Coupon,
            ),
            (
                self.goods.as_ref().map(Spanned::span),
                "goods",
                Kind::HotProduct,
            ),
            (
                self.schedule.as_ref().map(Spanned::span),
                "schedule",
                Kind::HotProduct,
            ),
        ];
        for (present, field, wanted) in sections {
            let wanted_name = kind_name(wanted);
            match present {
                None if kind == wanted => {
                    let msg = format!("kind = \"{wanted_name}\" needs a [campaign.{field}] table");
                    return Err(at(self.kind.span(), field, msg));
                }
                Some(span) if kind != wanted => {
                    let msg = format!("only allowed with kind = \"{wanted_name}\"");
                    return Err(at(span, field, msg));
                }
                _ => {}
            }
        }
        let coupon = match self.coupon {
            Some(c) => Some(
                c.into_inner()
                    .validate(&|span, field, msg| at(span, &format!("coupon.{field}"), msg))?,
            ),
            None => None,
        };
        let every = match self.schedule.map(Spanned::into_inner) {
            Some(s) => Some(
                period(s.every.get_ref()).map_err(|m| at(s.every.span(), "schedule.every", m))?,
            ),
            None => None,
        };
        let holdout = match &self.holdout {
            Some(h) if !(0.0..=1.0).contains(h.get_ref()) => {
                let msg = format!("must be a share in 0..=1, got {}", h.get_ref());
                return Err(at(h.span(), "holdout", msg));
            }
            Some(h) => *h.get_ref(),
            None => 0.0,
        };
        Ok(Campaign {
            priority: self.priority,
            holdout,
            id: self.id.into_inner(),
            kind,
            start,
            end,
            title,
            body,
            audience,
            coupon,
            goods: self.goods.map(Spanned::into_inner),
            every,
        })
    }
}

impl RawAudience {
    /// Range checks; `at(span, field, msg)` builds the error.
    fn validate(self, at: &dyn Fn(Range<usize>, &str, String) -> Error) -> Result<Audience> {
        let level = |v: Option<Spanned<i64>>, field: &str| -> Result<Option<(u8, Range<usize>)>> {
            match v {
                None => Ok(None),
                Some(v) => match u8::try_from(*v.get_ref()) {
                    Ok(l) => Ok(Some((l, v.span()))),
                    Err(_) => Err(at(
                        v.span(),
                        field,
                        format!("must be 0..=255, got {}", v.get_ref()),
                    )),
                },
            }
        };
        let min_level = level(self.min_level, "min_level")?;
        let max_level = level(self.max_level, "max_level")?;
        if let (Some((lo, _)), Some((hi, span))) = (&min_level, &max_level) {
            if lo > hi {
                return Err(at(
                    span.clone(),
                    "max_level",
                    format!("must be ≥ min_level ({lo}), got {hi}"),
                ));
            }
        }
        let points = |v: &Option<Spanned<u64>>| v.as_ref().map(|v| (*v.get_ref(), v.span()));
        if let (Some((lo, _)), Some((hi, span))) =
            (points(&self.min_points), points(&self.max_points))
        {
            if lo > hi {
                return Err(at(
                    span,
                    "max_points",
                    format!("must be ≥ min_points ({lo}), got {hi}"),
                ));
            }
        }
        Ok(Audience {
            min_level: min_level.map(|(l, _)| l),
            max_level: max_level.map(|(l, _)| l),
            min_points: self.min_points.map(Spanned::into_inner),
            max_points: self.max_points.map(Spanned::into_inner),
            tags_any: self.tags_any,
            tags_all: self.tags_all,
        })
    }
}

impl RawCoupon {
    /// Value checks; `at(span, field, msg)` builds the error.
    fn validate(self, at: &dyn Fn(Range<usize>, &str, String) -> Error) -> Result<Coupon> {
        if self.coupon_id.get_ref().trim().is_empty() {
            let msg = "must not be empty".to_owned();
            return Err(at(self.coupon_id.span(), "coupon_id", msg));
        }
        let amount = *self.amount.get_ref();
        if !(amount.is_finite() && amount >= 0.0) {
            let msg = format!("must be a number ≥ 0, got {amount}");
            return Err(at(self.amount.span(), "amount", msg));
        }
        Ok(Coupon {
            coupon_id: self.coupon_id.into_inner(),
            amount,
            delivery: self.delivery,
        })
    }
}

/// Whether `var` may appear in `field` of a campaign of `kind`.
fn placeholder_fits(kind: Kind, field: &str, var: Var) -> Result<(), String> {
    let name = Var::NAMES
        .iter()
        .find(|(_, v)| *v == var)
        .map_or("?", |(n, _)| n);
    let only = match var {
        Var::CouponId | Var::CouponAmount => Some(Kind::Coupon),
        Var::GoodsName | Var::GoodsDesc | Var::GoodsKeywords | Var::Occurrence => {
            Some(Kind::HotProduct)
        }
        Var::CampaignTitle if field == "title" => {
            return Err("{campaign.title} cannot be used in the title itself".to_owned())
        }
        _ => None,
    };
    match only {
        Some(k) if k != kind => Err(format!(
            "{{{name}}} is only available with kind = \"{}\"",
            kind_name(k)
        )),
        _ => Ok(()),
    }
}

fn kind_name(kind: Kind) -> &'static str {
    match kind {
        Kind::Promotion => "promotion",
        Kind::Coupon => "coupon",
        Kind::HotProduct => "hot_product",
    }
}

/// A period like `1h` or `15m` (a schedule's `every`, a cap's `per`): at least a second.
pub(super) fn period(text: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(text)
        .map_err(|e| format!("expected a duration like \"1h\" or \"15m\", got {text:?} ({e})"))?;
    if d < Duration::from_secs(1) {
        return Err(format!("must be at least 1s, got {text:?}"));
    }
    Ok(d)
}

/// An RFC 3339 time such as `2026-03-01T00:00:00Z`.
pub(super) fn rfc3339(text: &str) -> Result<DateTime<Utc>, String> {
    DateTime::parse_from_rfc3339(text)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|e| {
            format!("expected an RFC 3339 time like 2026-03-01T00:00:00Z, got {text:?} ({e})")
        })
}

/// A time written as an RFC 3339 string or as a TOML offset date-time.
pub(super) fn time_value(v: &toml::Value) -> Result<DateTime<Utc>, String> {
    match v {
        toml::Value::String(s) => rfc3339(s),
        toml::Value::Datetime(d) => rfc3339(&d.to_string()),
        other => Err(format!(
            "expected an RFC 3339 time like \"2026-03-01T00:00:00Z\", got {other}"
        )),
    }
}

/// A stable hex hash of a campaign's content — kind, audience, window, title and body sources,
/// coupon, goods, schedule, priority and holdout — but not its id: the repeated-campaign guard
/// (`fanout:admitted:{hash}`) uses it to spot the same campaign submitted under another id.
/// A title left to default (the id) hashes as "default", so it does not bring the id back in.
pub fn content_hash(c: &Campaign) -> String {
    let mut h = Fnv1a::default();
    h.field(kind_name(c.kind));
    let a = &c.audience;
    for bound in [
        a.min_level.map(u64::from),
        a.max_level.map(u64::from),
        a.min_points,
        a.max_points,
    ] {
        h.field(&bound.map_or_else(|| "-".to_owned(), |b| b.to_string()));
    }
    for tags in [&a.tags_any, &a.tags_all] {
        let mut tags: Vec<&str> = tags.iter().map(String::as_str).collect();
        tags.sort_unstable();
        tags.dedup();
        h.field(&tags.len().to_string());
        tags.iter().for_each(|t| h.field(t));
    }
    h.field(&c.start.to_rfc3339());
    h.field(&c.end.to_rfc3339());
    h.field(if c.title.source() == c.id {
        "\0default"
    } else {
        c.title.source()
    });
    h.field(c.body.source());
    match &c.coupon {
        Some(k) => {
            let delivery = match k.delivery {
                CouponDelivery::Push => "push",
                CouponDelivery::OnLogin => "on_login",
            };
            h.field("coupon");
            h.field(&k.coupon_id);
            // `+ 0.0` folds -0 into 0.
            h.field(&(k.amount + 0.0).to_bits().to_string());
            h.field(delivery);
        }
        None => h.field("-"),
    }
    match &c.goods {
        Some(g) => [&g.name, &g.desc, &g.keywords]
            .iter()
            .for_each(|s| h.field(s)),
        None => h.field("-"),
    }
    h.field(
        &c.every
            .map_or_else(|| "-".to_owned(), |d| d.as_millis().to_string()),
    );
    // Policy fields join the hash only when set, so a campaign without them hashes as it did
    // before they existed (admissions recorded then still match).
    if c.priority != Priority::Normal {
        h.field("priority");
        h.field(c.priority.name());
    }
    if c.holdout != 0.0 {
        h.field("holdout");
        h.field(&c.holdout.to_bits().to_string());
    }
    format!("{:016x}", h.0)
}

/// FNV-1a, 64 bits: tiny and the same on every platform and Rust version.
struct Fnv1a(u64);

impl Default for Fnv1a {
    fn default() -> Self {
        Fnv1a(0xcbf2_9ce4_8422_2325)
    }
}

impl Fnv1a {
    /// Adds one length-prefixed field, so `("ab", "c")` and `("a", "bc")` differ.
    fn field(&mut self, s: &str) {
        let len = (s.len() as u64).to_le_bytes();
        for b in len.iter().chain(s.as_bytes()) {
            self.0 = (self.0 ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
}
