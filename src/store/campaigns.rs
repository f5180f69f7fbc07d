//! Campaign records: what the store knows of each campaign it admitted, beyond its ledgers —
//! its kind, window, priority and holdout, and when it was first admitted — so that commands
//! that get no job file (`fanout report`) can still ask about a campaign.
//!
//! A record is written when a run or `serve` admits the campaign (right after the
//! repeated-campaign guard lets it in) and rewritten on every later admission of the same id:
//! the fields follow the newest admission, except `admitted_at`, which stays the first one's.
//! Records are where a campaign's state (running, paused, cancelled, done) will live, so they
//! are kept per campaign id, never per occurrence.
//!
//! The embedded store keeps one JSON file per campaign ([`file`](super::file) `campaigns/`);
//! Redis one hash per campaign (`fanout:campaign:{id}`, see [`redis`](super::redis)).

use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize};

use super::Store;
use crate::error::Result;
use crate::model::{Campaign, Kind, Priority};

/// What the store keeps of one admitted campaign.
///
/// Unknown fields are ignored when read, so a record written by a newer fanout (with the
/// campaign's state) still reads.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CampaignRecord {
    /// The campaign id.
    pub id: String,
    /// What it does.
    pub kind: Kind,
    /// Start of the valid window, inclusive.
    #[serde(with = "rfc3339")]
    pub start: DateTime<Utc>,
    /// End of the valid window, exclusive.
    #[serde(with = "rfc3339")]
    pub end: DateTime<Utc>,
    /// Its lane in the dispatcher.
    pub priority: Priority,
    /// Share of the audience held out as its control group, `0.0 ..= 1.0`.
    pub holdout: f64,
    /// When the store first admitted it (the system clock, not the job's `now`).
    #[serde(with = "rfc3339")]
    pub admitted_at: DateTime<Utc>,
}

impl CampaignRecord {
    /// The record of `campaign`, admitted at `at`.
    pub fn admitted(campaign: &Campaign, at: DateTime<Utc>) -> Self {
        CampaignRecord {
            id: campaign.id.clone(),
            kind: campaign.kind,
            start: campaign.start,
            end: campaign.end,
            priority: campaign.priority,
            holdout: campaign.holdout,
            admitted_at: at,
        }
    }
}

/// An instant as RFC 3339 with whole seconds or finer, UTC (`2026-03-01T00:00:00Z`).
pub(crate) fn rfc3339_text(t: &DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::AutoSi, true)
}

/// Serde for `DateTime<Utc>` as RFC 3339 text (chrono is built without its serde feature).
mod rfc3339 {
    use chrono::{DateTime, Utc};
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(t: &DateTime<Utc>, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&super::rfc3339_text(t))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<DateTime<Utc>, D::Error> {
        let text = String::deserialize(d)?;
        DateTime::parse_from_rfc3339(&text)
            .map(|t| t.to_utc())
            .map_err(|e| serde::de::Error::custom(format!("not an RFC 3339 time {text:?}: {e}")))
    }
}

impl Store {
    /// Records `campaigns` as admitted now (see the [module docs](self)): one record per id,
    /// each written whole (a crash leaves the old record or the new one, never a mix). Called
    /// right after [`Store::admit`] let them in; refused on a store opened read-only.
    pub async fn save_campaigns(&self, campaigns: &[&Campaign]) -> Result<()> {
        // Whole seconds: finer would only suggest a precision the record does not need.
        let now = chrono::SubsecRound::trunc_subsecs(Utc::now(), 0);
        let mut records: Vec<CampaignRecord> = Vec::with_capacity(campaigns.len());
        for c in campaigns {
            // A hot product admitted at several occurrences is still one campaign.
            if !records.iter().any(|r| r.id == c.id) {
                records.push(CampaignRecord::admitted(c, now));
            }
        }
        if records.is_empty() {
            return Ok(());
        }
        match self {
            Store::File(store) => {
                let store = std::sync::Arc::clone(store);
                super::off_runtime(move || store.save_campaigns(&records)).await
            }
            Store::Redis(store) => store.save_campaigns(&records).await,
        }
    }

    /// The record of campaign `id`; `None` if this store never admitted it (or admitted it
    /// before fanout kept records).
    pub async fn campaign(&self, id: &str) -> Result<Option<CampaignRecord>> {
        match self {
            Store::File(store) => store.campaign(id),
            Store::Redis(store) => store.campaign(id).await,
        }
    }
}
