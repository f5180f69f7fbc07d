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
use crate::model::{Campaign, CouponDelivery, Kind};
use crate::store::redis::{connect, retrying_as, shown};
use crate::streams::{Entry, CAMPAIGNS};

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

/// Reads a stream entry as a campaign.
pub fn submitted(entry: &Entry) -> Submitted {
    let label = format!("{CAMPAIGNS} entry {}", entry.id);
    let job = entry.get("job").unwrap_or_default().to_owned();
    let campaign = if job.is_empty() {
        Err(format!("{label}: field job: missing or empty"))
    } else {
        parse_campaign(&label, &job)
            .map(Arc::new)
            .map_err(|e| e.to_string())
    };
    Submitted {
        entry: entry.id.clone(),
        campaign,
        job,
    }
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

    /// Every kept campaign; one that no longer parses is logged and left out. A campaign kept
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
                        parse_campaign(&format!("{hash} field {field}"), &k.job)
                            .map(|c| (Arc::new(c), k.job))
                            .map_err(|e| e.to_string())
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
