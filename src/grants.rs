//! `fanout grants`: the coupon audit trail — the users a campaign occurrence was granted to,
//! read from the store without writing to it.
//!
//! An audit answers a question about a campaign the store knows; so a question it cannot
//! answer (a store directory that does not exist, an id that is not a campaign id, a campaign
//! or occurrence the store has no ledger for) is a usage error (exit 2), never an empty list.

use std::path::Path;

use chrono::DateTime;

use crate::error::{Error, Result};
use crate::job::is_valid_id;
use crate::model::{ledger_key, occurrence_id};
use crate::store::Store;

/// Every user id ever claimed for `campaign` (at `occurrence`, for a scheduled campaign) in
/// the store at `url` — every process's part of a store a cluster split — sorted, once each.
pub fn granted(url: &str, campaign: &str, occurrence: Option<&str>) -> Result<Vec<u32>> {
    let occurrence = check_question(url, campaign, occurrence)?;
    let key = ledger_key(campaign, occurrence.as_deref());
    let runtime = reading_runtime()?;
    let mut ids = Vec::new();
    let mut known = false;
    for part in crate::run::cluster::store_parts(url)? {
        runtime.block_on(async {
            let store = Store::connect_read_only(&part).await?;
            if store.has_ledger(&key).await? {
                known = true;
                ids.extend(store.granted(&key).await?);
            }
            Ok::<_, Error>(())
        })?;
    }
    if !known {
        return Err(Error::Usage(unknown(url, campaign, occurrence.as_deref())));
    }
    ids.sort_unstable();
    ids.dedup();
    Ok(ids)
}

/// Checks the question a read-only command (`grants`, `report`) asks about `campaign` at
/// `occurrence` in the store at `url`, without opening the store: the id's form, the
/// occurrence's (returned as the occurrence id it names), and that a store directory exists.
pub(crate) fn check_question(
    url: &str,
    campaign: &str,
    occurrence: Option<&str>,
) -> Result<Option<String>> {
    if !is_valid_id(campaign) {
        return Err(Error::Usage(format!(
            "--campaign {campaign:?}: not a campaign id: expected [A-Za-z0-9_-], 1 to 64 characters"
        )));
    }
    // An occurrence is named by its tick's start; any RFC 3339 spelling of it will do.
    let occurrence = occurrence
        .map(|o| {
            DateTime::parse_from_rfc3339(o)
                .map(|t| occurrence_id(t.to_utc()))
                .map_err(|e| {
                    Error::Usage(format!(
                        "--occurrence {o:?}: expected the tick's start in RFC 3339, e.g. 2026-03-02T10:00:00Z ({e})"
                    ))
                })
        })
        .transpose()?;
    if let Some(dir) = crate::store::file_dir(url) {
        if !Path::new(dir).is_dir() {
            return Err(Error::Usage(format!(
                "store {url}: no such directory (no run has used this store)"
            )));
        }
    }
    Ok(occurrence)
}

/// A runtime for a command that only reads the store.
pub(crate) fn reading_runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Error::runtime(format!("cannot start tokio: {e}")))
}

/// Why the store has no ledger for the campaign occurrence, and what may help.
fn unknown(url: &str, campaign: &str, occurrence: Option<&str>) -> String {
    let shown = crate::store::redis::shown(url);
    let what = match occurrence {
        Some(o) => format!("campaign {campaign:?} at occurrence {o}"),
        None => format!("campaign {campaign:?}"),
    };
    let mut msg = format!("store {shown} has no ledger for {what}: no run admitted it there");
    if crate::store::file_dir(url).is_none() {
        msg.push_str(", or nobody was ever granted it");
    }
    if occurrence.is_none() {
        msg.push_str(
            " (a hot product's grants are per occurrence: pass --occurrence, the tick's start)",
        );
    }
    msg
}
