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
//!
//! Control states ([`Control`]) are kept apart from the records, where a run polls them:
//!
//! ```text
//! fanout:control            hash: campaign id → running | paused | cancelled
//! fanout:control:version    counter: grows by one on every change of any state
//! ```
//! One script ([`SET_STATE`]) checks that the record exists and that the change is allowed
//! (cancelled is final), and writes the state and bumps the version together; it writes
//! nothing when the state is already the one asked for, so a retried call is harmless. It
//! needs no lease: a control command is not a run.

use std::collections::HashMap;

use super::{conn::scan, retrying, RedisStore};
use crate::error::{Error, Result};
use crate::store::campaigns::{
    check_transition, Activity, CampaignRecord, Control, State, Transition, MAX_WORKERS,
};

/// The hash of control states.
const CONTROL: &str = "fanout:control";
/// The control version counter.
const CONTROL_VERSION: &str = "fanout:control:version";

/// KEYS: the campaign's record, [`CONTROL`], [`CONTROL_VERSION`]; ARGV: id, new state.
/// Answers `{"unknown"}` (no record), `{"refused", from}` (leaving cancelled),
/// `{"unchanged"}`, or `{"changed", from}`.
const SET_STATE: &str = r#"
if redis.call('EXISTS', KEYS[1]) == 0 then return {'unknown'} end
local from = redis.call('HGET', KEYS[2], ARGV[1])
if not from then from = 'running' end
if from == ARGV[2] then return {'unchanged'} end
if from == 'cancelled' then return {'refused', from} end
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
redis.call('INCR', KEYS[3])
return {'changed', from}
"#;

/// KEYS: `fanout:activity:{id}`, its `:workers` list; ARGV: first ms, last ms, worker, how
/// many workers to keep. Merges one worker's pushes (see [`crate::store::campaigns`]).
const NOTE_ACTIVITY: &str = r#"
local first, last = ARGV[1], ARGV[2]
local f = redis.call('HGET', KEYS[1], 'first')
if f and tonumber(f) < tonumber(first) then first = f end
local l = redis.call('HGET', KEYS[1], 'last')
if l and tonumber(l) > tonumber(last) then last = l end
redis.call('HSET', KEYS[1], 'first', first, 'last', last)
redis.call('LREM', KEYS[2], 0, ARGV[3])
redis.call('RPUSH', KEYS[2], ARGV[3])
redis.call('LTRIM', KEYS[2], -tonumber(ARGV[4]), -1)
return 0
"#;

/// The key of campaign `id`'s activity (its workers: the same with `:workers`).
fn activity_key(id: &str) -> String {
    format!("fanout:activity:{id}")
}

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

impl RedisStore {
    /// See [`crate::store::Store::note_activity`].
    pub async fn note_activity(
        &self,
        id: &str,
        first_ms: i64,
        last_ms: i64,
        worker: &str,
    ) -> Result<()> {
        if self.read_only {
            return Err(Error::runtime(format!(
                "store {} is open read-only",
                self.url
            )));
        }
        let key = activity_key(id);
        let script = redis::Script::new(NOTE_ACTIVITY);
        retrying(&self.url, "record a campaign's activity", || {
            let mut con = self.con.clone();
            let mut call = script.prepare_invoke();
            call.key(&key).key(format!("{key}:workers"));
            call.arg(first_ms).arg(last_ms).arg(worker).arg(MAX_WORKERS);
            async move { call.invoke_async::<i64>(&mut con).await }
        })
        .await
        .map(drop)
    }

    /// See [`crate::store::Store::activity`].
    pub async fn activity(&self, id: &str) -> Result<Activity> {
        let key = activity_key(id);
        let (span, workers): (HashMap<String, i64>, Vec<String>) =
            retrying(&self.url, "read a campaign's activity", || {
                let mut con = self.con.clone();
                let mut pipe = redis::pipe();
                pipe.cmd("HGETALL").arg(&key);
                pipe.cmd("LRANGE")
                    .arg(format!("{key}:workers"))
                    .arg(0)
                    .arg(-1);
                async move { pipe.query_async(&mut con).await }
            })
            .await?;
        Ok(Activity {
            first_send_ms: span.get("first").copied(),
            last_send_ms: span.get("last").copied(),
            workers,
        })
    }
}

impl RedisStore {
    /// Sets campaign `id`'s state (see the module docs); works on a store opened read-only.
    pub async fn set_state(&self, id: &str, state: State) -> Result<Transition> {
        let script = redis::Script::new(SET_STATE);
        let record = key(id);
        let answer: Vec<String> = retrying(&self.url, "set a campaign state", || {
            let mut con = self.con.clone();
            let mut call = script.prepare_invoke();
            call.key(&record)
                .key(CONTROL)
                .key(CONTROL_VERSION)
                .arg(id)
                .arg(state.name());
            async move { call.invoke_async(&mut con).await }
        })
        .await?;
        let from = |text: &str| {
            text.parse::<State>()
                .map_err(|e| Error::runtime(format!("store {}: {CONTROL} {id}: {e}", self.url)))
        };
        match answer.as_slice() {
            [verdict] if verdict == "unknown" => Err(Error::Usage(format!(
                "store {} has no campaign {id:?}: no run or serve admitted it there",
                self.url
            ))),
            [verdict] if verdict == "unchanged" => Ok(Transition::Unchanged),
            [verdict, was] if verdict == "refused" => {
                check_transition(id, from(was)?, state)?;
                Err(Error::runtime(format!(
                    "store {}: the state script refused {id:?} {was} → {state}",
                    self.url
                )))
            }
            [verdict, was] if verdict == "changed" => Ok(Transition::Changed(from(was)?)),
            other => Err(Error::runtime(format!(
                "store {}: the state script answered {other:?}",
                self.url
            ))),
        }
    }

    /// Every stored state and the version, read in one transaction.
    pub async fn control(&self) -> Result<Control> {
        let (hash, version): (HashMap<String, String>, Option<u64>) =
            retrying(&self.url, "read the campaign states", || {
                let mut con = self.con.clone();
                async move {
                    redis::pipe()
                        .atomic()
                        .cmd("HGETALL")
                        .arg(CONTROL)
                        .cmd("GET")
                        .arg(CONTROL_VERSION)
                        .query_async(&mut con)
                        .await
                }
            })
            .await?;
        let mut states = std::collections::BTreeMap::new();
        for (id, text) in hash {
            let state = text
                .parse::<State>()
                .map_err(|e| Error::runtime(format!("store {}: {CONTROL} {id}: {e}", self.url)))?;
            states.insert(id, state);
        }
        Ok(Control {
            version: version.unwrap_or(0),
            states,
        })
    }

    /// The control version: one `GET`.
    pub async fn control_version(&self) -> Result<u64> {
        let version: Option<u64> = retrying(&self.url, "read the control version", || {
            let mut con = self.con.clone();
            async move {
                redis::cmd("GET")
                    .arg(CONTROL_VERSION)
                    .query_async(&mut con)
                    .await
            }
        })
        .await?;
        Ok(version.unwrap_or(0))
    }

    /// The ids of every campaign with a record, sorted (a `SCAN` of `fanout:campaign:*`).
    pub async fn campaign_ids(&self) -> Result<Vec<String>> {
        let keys = scan(&self.con, &self.url, "fanout:campaign:*").await?;
        let mut ids: Vec<String> = keys
            .iter()
            .filter_map(|k| k.strip_prefix("fanout:campaign:"))
            .filter(|id| crate::job::is_valid_id(id))
            .map(str::to_owned)
            .collect();
        ids.sort();
        ids.dedup();
        Ok(ids)
    }

    /// The ledger keys of campaign `id` with a claimed or quiet-held user, sorted: a `SCAN` of
    /// `fanout:granted:{id}:*` and `fanout:quiet:{id}:*`, each key read as `{ledger}:{chunk}`.
    pub async fn ledger_keys(&self, id: &str) -> Result<Vec<String>> {
        let mut ledgers = std::collections::BTreeSet::new();
        for set in ["granted", "quiet"] {
            let prefix = format!("fanout:{set}:");
            // Ids are [A-Za-z0-9_-]: nothing in them is a glob character.
            for k in scan(&self.con, &self.url, &format!("{prefix}{id}:*")).await? {
                let Some((ledger, chunk)) = k
                    .strip_prefix(&prefix)
                    .and_then(|rest| rest.rsplit_once(':'))
                else {
                    continue;
                };
                let occurrence_of_id = ledger
                    .strip_prefix(id)
                    .is_some_and(|rest| rest.is_empty() || rest.starts_with(':'));
                if occurrence_of_id && chunk.parse::<u32>().is_ok() {
                    ledgers.insert(ledger.to_owned());
                }
            }
        }
        Ok(ledgers.into_iter().collect())
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
