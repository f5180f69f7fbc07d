//! Campaign records in the embedded store: `DIR/campaigns/<id>.json`, one JSON object per
//! campaign ([`CampaignRecord`]), `<id>` escaped as ledger keys are.
//!
//! A record is replaced whole: written to `<id>.json.tmp`, fsynced, renamed over the old one,
//! and the directory fsynced, so a crash leaves the old record or the new one. Only the lock
//! holder writes; a store opened read-only reads them.

use std::fs::{self, File};
use std::io::{ErrorKind, Write};
use std::path::{Path, PathBuf};

use anyhow::Context;

use super::format::file_stem;
use super::FileStore;
use crate::error::{Error, Result};
use crate::store::campaigns::CampaignRecord;

/// The largest record file read: a record is a few hundred bytes, and a bigger file is not one.
const MAX_RECORD_BYTES: u64 = 1 << 20;

impl FileStore {
    /// `DIR/campaigns`.
    fn campaigns_dir(&self) -> PathBuf {
        self.ledgers_dir
            .parent()
            .unwrap_or(Path::new("."))
            .join("campaigns")
    }

    /// The file of campaign `id`'s record.
    fn campaign_path(&self, id: &str) -> Result<PathBuf> {
        Ok(self
            .campaigns_dir()
            .join(format!("{}.json", file_stem(id)?)))
    }

    /// Writes each of `records`, keeping the `admitted_at` of a record already there.
    pub fn save_campaigns(&self, records: &[CampaignRecord]) -> Result<()> {
        if self.lock.is_none() {
            return Err(Error::runtime(format!(
                "store {} is open read-only",
                self.url
            )));
        }
        let dir = self.campaigns_dir();
        fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
        for record in records {
            let mut record = record.clone();
            if let Some(earlier) = self.campaign(&record.id)? {
                record.admitted_at = earlier.admitted_at;
            }
            let path = self.campaign_path(&record.id)?;
            let mut text = serde_json::to_string_pretty(&record)
                .context("cannot serialize a campaign record")?;
            text.push('\n');
            replace(&path, text.as_bytes())?;
        }
        // The renames are durable once the directory is.
        File::open(&dir)
            .and_then(|d| d.sync_all())
            .with_context(|| format!("cannot sync {}", dir.display()))?;
        Ok(())
    }

    /// The record of campaign `id`, `None` if there is none. An unreadable or malformed
    /// record is a runtime error naming its file.
    pub fn campaign(&self, id: &str) -> Result<Option<CampaignRecord>> {
        let path = self.campaign_path(id)?;
        let file = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(super::io_error(e, "cannot open", &path)),
        };
        let mut text = String::new();
        std::io::Read::read_to_string(&mut std::io::Read::take(file, MAX_RECORD_BYTES), &mut text)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let record: CampaignRecord = serde_json::from_str(&text).map_err(|e| {
            Error::runtime(format!(
                "store {}: {} is not a campaign record: {e}",
                self.url,
                path.display()
            ))
        })?;
        if record.id != id {
            return Err(Error::runtime(format!(
                "store {}: {} holds the record of campaign {:?}",
                self.url,
                path.display(),
                record.id
            )));
        }
        Ok(Some(record))
    }
}

/// Replaces `path` with `bytes`: temp file, fsync, rename.
fn replace(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let mut f = File::create(&tmp).with_context(|| format!("cannot write {}", tmp.display()))?;
    f.write_all(bytes)
        .and_then(|()| f.sync_all())
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    fs::rename(&tmp, path).with_context(|| format!("cannot replace {}", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use chrono::{TimeZone, Utc};

    use super::*;
    use crate::model::{Kind, Priority};

    fn record(id: &str, day: u32, at: u32) -> CampaignRecord {
        CampaignRecord {
            id: id.to_owned(),
            kind: Kind::HotProduct,
            start: Utc.with_ymd_and_hms(2026, 3, day, 0, 0, 0).unwrap(),
            end: Utc.with_ymd_and_hms(2026, 3, day + 7, 0, 0, 0).unwrap(),
            priority: Priority::Bulk,
            holdout: 0.05,
            admitted_at: Utc.with_ymd_and_hms(2026, 3, 1, at, 0, 0).unwrap(),
        }
    }

    #[test]
    fn records_round_trip_keep_the_first_admission_and_read_only_reads_them() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store");
        let path = path.to_str().unwrap();
        let url = format!("file:{path}");
        let store = FileStore::open(&url, path).unwrap();
        assert_eq!(store.campaign("spring").unwrap(), None);
        store
            .save_campaigns(&[record("spring", 1, 1), record("hot-1", 2, 1)])
            .unwrap();
        assert_eq!(
            store.campaign("spring").unwrap(),
            Some(record("spring", 1, 1))
        );
        // Re-admitted with another window: the window follows, the first admission stays.
        store.save_campaigns(&[record("spring", 3, 5)]).unwrap();
        let mut want = record("spring", 3, 5);
        want.admitted_at = record("spring", 1, 1).admitted_at;
        assert_eq!(store.campaign("spring").unwrap(), Some(want.clone()));
        let text = fs::read_to_string(dir.path().join("store/campaigns/spring.json")).unwrap();
        assert!(text.contains("\"kind\": \"hot_product\""), "{text}");
        assert!(
            text.contains("\"start\": \"2026-03-03T00:00:00Z\""),
            "{text}"
        );
        assert!(!dir.path().join("store/campaigns/spring.json.tmp").exists());

        // A reader beside the writer (no lock) sees the records; it may not write.
        let reader = FileStore::open_read_only(&url, path).unwrap();
        assert_eq!(reader.campaign("spring").unwrap(), Some(want));
        assert_eq!(
            reader.campaign("hot-1").unwrap(),
            Some(record("hot-1", 2, 1))
        );
        assert!(reader.save_campaigns(&[record("x", 1, 1)]).is_err());
        // A store directory that does not exist has no records.
        let missing = FileStore::open_read_only("file:nowhere", "/nonexistent/fanout").unwrap();
        assert_eq!(missing.campaign("spring").unwrap(), None);
    }

    #[test]
    fn a_malformed_or_misplaced_record_is_an_error_naming_its_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().to_str().unwrap();
        let store = FileStore::open("file:s", path).unwrap();
        fs::create_dir_all(dir.path().join("campaigns")).unwrap();
        fs::write(dir.path().join("campaigns/a.json"), "{\"id\": \"a\"").unwrap();
        let err = store.campaign("a").unwrap_err().to_string();
        assert!(
            err.contains("a.json") && err.contains("not a campaign record"),
            "{err}"
        );
        store.save_campaigns(&[record("b", 1, 1)]).unwrap();
        fs::rename(
            dir.path().join("campaigns/b.json"),
            dir.path().join("campaigns/c.json"),
        )
        .unwrap();
        let err = store.campaign("c").unwrap_err().to_string();
        assert!(err.contains("\"b\""), "{err}");
    }
}
