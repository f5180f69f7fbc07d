//! Campaign records on Redis: one hash per campaign,
//!
//! ```text
//! fanout:campaign:{id}   hash: id, kind, start, end, priority, holdout, admitted_at
//! ```
//! each field a [`CampaignRecord`] field as text (`kind = hot_product`, `start =
//! 2026-03-01T00:00:00Z`, `holdout = 0.05`), so `HGETALL` reads plainly in `redis-cli`.
//!
//! A hash rather than one JSON string, because records grow into campaign state: a state
//! change will be one `HSET` of its own field (and an epoch's check one `HGET`), never a
//! read-modify-write of the whole record racing another process. Saving is one `MULTI`: `HSET`
//! of every field but `admitted_at`, and `HSETNX` of `admitted_at`, so it stays the first
//! admission's. Fields a newer fanout adds are ignored when read.

use std::collections::HashMap;

use super::{retrying, RedisStore};
use crate::error::{Error, Result};
use crate::store::campaigns::CampaignRecord;

/// The key of campaign `id`'s record.
fn key(id: &str) -> String {
    format!("fanout:campaign:{id}")
}

/// The fields that hold numbers (every other one holds text).
const NUMBERS: [&str; 1] = ["holdout"];

/// `record` as hash fields: `(name, text)`, `admitted_at` last.
fn fields(record: &CampaignRecord) -> Result<Vec<(String, String)>> {
    let value = serde_json::to_value(record).map_err(anyhow::Error::from)?;
    let serde_json::Value::Object(map) = value else {
        return Err(Error::runtime("a campaign record is not a JSON object"));
    };
    let mut out: Vec<(String, String)> = map
        .into_iter()
        .map(|(name, v)| {
            let text = match v {
                serde_json::Value::String(s) => s,
                other => other.to_string(),
            };
            (name, text)
        })
        .collect();
    out.sort_by_key(|(name, _)| name == "admitted_at");
    Ok(out)
}

/// The record of hash fields `hash` (read from `key`); errors name the key and field.
fn from_fields(key: &str, hash: HashMap<String, String>) -> Result<CampaignRecord> {
    let bad = |what: String| Error::runtime(format!("{key} is not a campaign record: {what}"));
    let mut map = serde_json::Map::new();
    for (name, text) in hash {
        let value = if NUMBERS.contains(&name.as_str()) {
            let n: f64 = text
                .parse()
                .map_err(|_| bad(format!("{name} = {text:?} is not a number")))?;
            serde_json::Number::from_f64(n)
                .map(serde_json::Value::Number)
                .ok_or_else(|| bad(format!("{name} = {text:?} is not finite")))?
        } else {
            serde_json::Value::String(text)
        };
        map.insert(name, value);
    }
    serde_json::from_value(serde_json::Value::Object(map)).map_err(|e| bad(e.to_string()))
}

impl RedisStore {
    /// Writes every one of `records` in one transaction (see the module docs).
    pub async fn save_campaigns(&self, records: &[CampaignRecord]) -> Result<()> {
        if self.read_only {
            return Err(Error::runtime(format!(
                "store {} is open read-only",
                self.url
            )));
        }
        let mut pipe = redis::pipe();
        pipe.atomic();
        for record in records {
            let mut fields = fields(record)?;
            let Some((at_name, at)) = fields.pop() else {
                continue;
            };
            let key = key(&record.id);
            pipe.cmd("HSET").arg(&key).arg(fields).ignore();
            pipe.cmd("HSETNX").arg(&key).arg(at_name).arg(at).ignore();
        }
        retrying(&self.url, "save campaign records", || {
            let mut con = self.con.clone();
            let pipe = &pipe;
            async move { pipe.query_async::<()>(&mut con).await }
        })
        .await
    }

    /// The record of campaign `id`, `None` if there is none.
    pub async fn campaign(&self, id: &str) -> Result<Option<CampaignRecord>> {
        let key = key(id);
        let hash: HashMap<String, String> = retrying(&self.url, "read a campaign record", || {
            let mut con = self.con.clone();
            let key = &key;
            async move { redis::cmd("HGETALL").arg(key).query_async(&mut con).await }
        })
        .await?;
        if hash.is_empty() {
            return Ok(None);
        }
        from_fields(&key, hash).map(Some)
    }
}

#[cfg(test)]
mod tests {
    use chrono::{TimeZone, Utc};

    use super::*;
    use crate::model::{Kind, Priority};

    #[test]
    fn fields_read_back_as_the_record_and_name_what_is_wrong() {
        let record = CampaignRecord {
            id: "123".to_owned(),
            kind: Kind::Coupon,
            start: Utc.with_ymd_and_hms(2026, 3, 1, 0, 0, 0).unwrap(),
            end: Utc.with_ymd_and_hms(2026, 3, 8, 0, 0, 0).unwrap(),
            priority: Priority::Transactional,
            holdout: 0.05,
            admitted_at: Utc.with_ymd_and_hms(2026, 2, 1, 12, 30, 0).unwrap(),
        };
        let fields = fields(&record).unwrap();
        assert_eq!(fields.last().unwrap().0, "admitted_at");
        let text: HashMap<String, String> = fields.into_iter().collect();
        assert_eq!(text["kind"], "coupon");
        assert_eq!(text["priority"], "transactional");
        assert_eq!(text["holdout"], "0.05");
        assert_eq!(text["start"], "2026-03-01T00:00:00Z");
        // An id that looks like a number stays text.
        assert_eq!(text["id"], "123");
        let mut newer = text.clone();
        newer.insert("state".into(), "paused".into());
        assert_eq!(from_fields("k", newer).unwrap(), record);
        let mut bad = text.clone();
        bad.insert("holdout".into(), "lots".into());
        let err = from_fields("fanout:campaign:123", bad)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("fanout:campaign:123") && err.contains("holdout"),
            "{err}"
        );
        let mut missing = text;
        missing.remove("end");
        let err = from_fields("k", missing).unwrap_err().to_string();
        assert!(err.contains("end"), "{err}");
    }
}
