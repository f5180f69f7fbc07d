//! Campaigns submitted to `serve` on the `fanout:campaigns` stream, and the ones that outlive
//! their admission kept on the same Redis server: active lazy coupons in `fanout:coupons`
//! (SPEC: campaign id → campaign JSON) and scheduled hot products in `fanout:hot_products`
//! (campaign id → campaign JSON, an extension). The JSON is `{"campaign": ID, "job": TOML}`.
//!
//! A submitted promotion or pushed coupon is acknowledged once its fan-out is done; a lazy
//! coupon or hot product once it is kept in its hash, from which every later `serve` reads it.

use std::sync::Arc;

use redis::aio::ConnectionManager;
use redis::AsyncCommands;
use serde::{Deserialize, Serialize};

use crate::error::Result;
use crate::job::parse_campaign;
use crate::model::{Campaign, CouponDelivery, Kind, Target};
use crate::store::redis::{connect, retrying_as, shown};
use crate::streams::{Entry, CAMPAIGNS};
use crate::template::UserVars;

/// Active lazy coupons (SPEC).
pub const COUPONS: &str = "fanout:coupons";
/// Scheduled hot products.
pub const HOT_PRODUCTS: &str = "fanout:hot_products";

/// A campaign as kept in a hash.
#[derive(Debug, Serialize, Deserialize)]
struct Kept {
    campaign: String,
    job: String,
}

/// A campaign read from the stream, not yet admitted.
#[derive(Debug)]
pub struct Submitted {
    /// The stream entry to acknowledge.
    pub entry: String,
    /// The campaign, or why the entry is not one.
    pub campaign: std::result::Result<Arc<Campaign>, String>,
    /// Its TOML text.
    pub job: String,
}

/// Most bytes of a message title (SPEC's size limits of a submitted campaign).
pub const MAX_TITLE_BYTES: usize = 256;
/// Most bytes of a message body.
pub const MAX_BODY_BYTES: usize = 4 * 1024;
/// Most bytes of a whole stream entry (field names and values).
pub const MAX_ENTRY_BYTES: usize = 64 * 1024;

/// Reads a stream entry as a campaign: one over [`MAX_ENTRY_BYTES`] is refused unread.
pub fn submitted(entry: &Entry) -> Submitted {
    let label = format!("{CAMPAIGNS} entry {}", entry.id);
    let size: usize = entry.fields.iter().map(|(k, v)| k.len() + v.len()).sum();
    if size > MAX_ENTRY_BYTES {
        return Submitted {
            entry: entry.id.clone(),
            campaign: Err(format!(
                "{label}: {size} bytes, over the limit of {MAX_ENTRY_BYTES} bytes an entry"
            )),
            job: String::new(),
        };
    }
    let job = entry.get("job").unwrap_or_default().to_owned();
    let campaign = if job.is_empty() {
        Err(format!("{label}: field job: missing or empty"))
    } else {
        parse_campaign(&label, &job)
            .map(Arc::new)
            .map_err(|e| e.to_string())
            .and_then(|c| within_limits(&label, c))
    };
    Submitted {
        entry: entry.id.clone(),
        campaign,
        job,
    }
}

/// `c` if its title and body are within [`MAX_TITLE_BYTES`] and [`MAX_BODY_BYTES`], both as
/// written and as a user receives them with every placeholder filled in at its widest (so
/// `{goods.desc}` written many times cannot make a huge message of a small template).
pub fn within_limits(label: &str, c: Arc<Campaign>) -> std::result::Result<Arc<Campaign>, String> {
    let widest = UserVars {
        id: u32::MAX,
        level: u8::MAX,
        points: u64::MAX,
    };
    let occurrence = c.every.map(|_| "2026-01-01T00:00:00Z".to_owned());
    let message = Target::new(c.clone(), occurrence).render(widest, None);
    for (field, written, sent, max) in [
        (
            "title",
            c.title.source().len(),
            message.title.len(),
            MAX_TITLE_BYTES,
        ),
        (
            "body",
            c.body.source().len(),
            message.body.len(),
            MAX_BODY_BYTES,
        ),
    ] {
        let size = written.max(sent);
        if size > max {
            return Err(format!(
                "{label}: {field}: {size} bytes, over the limit of {max} bytes"
            ));
        }
    }
    Ok(c)
}

/// Where a campaign that outlives its admission is kept, and under which field: its campaign
/// id in both hashes (SPEC), so campaigns that share a coupon id are each kept.
pub fn kept_as(c: &Campaign) -> Option<(&'static str, String)> {
    match (&c.kind, &c.coupon) {
        (Kind::Coupon, Some(coupon)) if coupon.delivery == CouponDelivery::OnLogin => {
            Some((COUPONS, c.id.clone()))
        }
        (Kind::HotProduct, _) => Some((HOT_PRODUCTS, c.id.clone())),
        _ => None,
    }
}

/// The hashes of kept campaigns on one Redis server.
pub struct Registry {
    con: ConnectionManager,
    url: String,
}

impl Registry {
    /// Connects to `url`.
    pub async fn open(url: &str) -> Result<Registry> {
        Ok(Registry {
            con: connect("redis", url).await?,
            url: shown(url),
        })
    }

    /// Keeps `job` (the TOML of campaign `c`) if it outlives its admission; returns whether.
    pub async fn keep(&self, c: &Campaign, job: &str) -> Result<bool> {
        let Some((hash, field)) = kept_as(c) else {
            return Ok(false);
        };
        let value = serde_json::to_string(&Kept {
            campaign: c.id.clone(),
            job: job.to_owned(),
        })
        .map_err(anyhow::Error::from)?;
        retrying_as("redis", &self.url, "HSET", || {
            let (mut con, field, value) = (self.con.clone(), field.clone(), value.clone());
            async move { con.hset::<_, _, _, ()>(hash, field, value).await }
        })
        .await?;
        Ok(true)
    }

    /// Forgets `c` if it was kept (cancelled: no longer active); no error if it was not.
    pub async fn forget(&self, c: &Campaign) -> Result<()> {
        let Some((hash, field)) = kept_as(c) else {
            return Ok(());
        };
        retrying_as("redis", &self.url, "HDEL", || {
            let (mut con, field) = (self.con.clone(), field.clone());
            async move { con.hdel::<_, _, ()>(hash, field).await }
        })
        .await
    }

    /// Every kept campaign; one that no longer parses, or is over the size limits (kept before
    /// they were checked), is logged and left out. A campaign kept
    /// twice (under its coupon id by an older `serve`, and under its campaign id) is loaded once.
    pub async fn load(&self) -> Result<Vec<(Arc<Campaign>, String)>> {
        let mut out: Vec<(Arc<Campaign>, String)> = Vec::new();
        for hash in [COUPONS, HOT_PRODUCTS] {
            let all: Vec<(String, String)> = retrying_as("redis", &self.url, "HGETALL", || {
                let mut con = self.con.clone();
                async move { con.hgetall(hash).await }
            })
            .await?;
            for (field, value) in all {
                let parsed = serde_json::from_str::<Kept>(&value)
                    .map_err(|e| e.to_string())
                    .and_then(|k| {
                        let label = format!("{hash} field {field}");
                        parse_campaign(&label, &k.job)
                            .map_err(|e| e.to_string())
                            .and_then(|c| within_limits(&label, Arc::new(c)))
                            .map(|c| (c, k.job))
                    });
                match parsed {
                    Ok((c, _)) if out.iter().any(|(kept, _)| kept.id == c.id) => {}
                    Ok(c) => out.push(c),
                    Err(e) => tracing::warn!(hash, field, error = %e, "kept campaign left out"),
                }
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lazy_coupon(id: &str, tag: &str) -> Campaign {
        let toml = format!(
            "[[campaign]]\nid = \"{id}\"\nkind = \"coupon\"\nstart = \"2026-01-01T00:00:00Z\"\n\
             end = \"2026-12-01T00:00:00Z\"\ntitle = \"Gift\"\nbody = \"{{coupon.id}}\"\n\
             [campaign.audience]\ntags_any = [\"{tag}\"]\n[campaign.coupon]\n\
             coupon_id = \"C-9\"\namount = 5\ndelivery = \"on_login\"\n"
        );
        parse_campaign("test", &toml).unwrap()
    }

    fn promotion(title: &str, body: &str) -> Arc<Campaign> {
        let toml = format!(
            "[[campaign]]\nid = \"p\"\nkind = \"promotion\"\nstart = \"2026-01-01T00:00:00Z\"\n\
             end = \"2026-12-01T00:00:00Z\"\ntitle = \"{title}\"\nbody = \"{body}\"\n"
        );
        Arc::new(parse_campaign("test", &toml).unwrap())
    }

    #[test]
    fn titles_and_bodies_are_held_to_the_limits_as_written_and_as_sent() {
        let fits = |title: &str, body: &str| within_limits("e", promotion(title, body)).is_ok();
        assert!(fits(
            &"t".repeat(MAX_TITLE_BYTES),
            &"b".repeat(MAX_BODY_BYTES)
        ));
        assert!(!fits(&"t".repeat(MAX_TITLE_BYTES + 1), "b"));
        assert!(!fits("t", &"b".repeat(MAX_BODY_BYTES + 1)));
        // 13 bytes written, up to 20 digits sent: 300 of them fit as written, not as sent.
        let points = "{user.points}".repeat(300);
        assert!(points.len() <= MAX_BODY_BYTES);
        let e = within_limits("e", promotion("t", &points)).unwrap_err();
        assert_eq!(e, "e: body: 6000 bytes, over the limit of 4096 bytes");
        // A campaign value repeated: 12 bytes written, 1000 sent each time.
        let desc = "d".repeat(1000);
        let toml = format!(
            "[[campaign]]\nid = \"h\"\nkind = \"hot_product\"\nstart = \"2026-01-01T00:00:00Z\"\n\
             end = \"2026-12-01T00:00:00Z\"\nbody = \"{}\"\n[campaign.goods]\nname = \"n\"\n\
             desc = \"{desc}\"\n[campaign.schedule]\nevery = \"1h\"\n",
            "{goods.desc}".repeat(10)
        );
        let hot = Arc::new(parse_campaign("test", &toml).unwrap());
        assert!(within_limits("e", hot).is_err());
    }

    #[test]
    fn an_entry_over_the_size_limit_is_refused_unread() {
        let entry = Entry {
            id: "1-0".into(),
            fields: vec![("job".into(), "x".repeat(MAX_ENTRY_BYTES))],
        };
        let s = submitted(&entry);
        let e = s.campaign.unwrap_err();
        assert!(
            e.contains("65539 bytes, over the limit of 65536 bytes an entry"),
            "{e}"
        );
    }

    #[test]
    fn lazy_coupons_sharing_a_coupon_id_are_kept_under_their_campaign_ids() {
        let (a, b) = (
            lazy_coupon("lazy-a", "sports"),
            lazy_coupon("lazy-b", "mom"),
        );
        assert_eq!(kept_as(&a), Some((COUPONS, "lazy-a".to_owned())));
        assert_eq!(kept_as(&b), Some((COUPONS, "lazy-b".to_owned())));
    }
}
