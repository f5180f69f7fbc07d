//! Campaign records in the embedded store: `DIR/campaigns/<id>.json`, one JSON object per
//! campaign ([`CampaignRecord`]), `<id>` escaped as ledger keys are.
//!
//! A record is replaced whole: written to `<id>.json.tmp`, fsynced, renamed over the old one,
//! and the directory fsynced, so a crash leaves the old record or the new one. Only the lock
//! holder writes; a store opened read-only reads them.
//!
//! Control states ([`Control`]) live in `DIR/control.json`, replaced whole the same way. Its
//! writers (`fanout campaigns pause|resume|cancel`) are not the lock holder — a run holds
//! `DIR/LOCK` for its whole life — so they take `DIR/CONTROL.LOCK` instead, an exclusive
//! flock held only for one read-modify-write of the file (two operators at once both land,
//! and the version grows once for each). Readers take no lock: the rename makes every read
//! see an old file or a new one.

use std::fs::{self, File};
use std::io::{ErrorKind, Write};
use std::path::{Path, PathBuf};

use anyhow::Context;

use super::format::file_stem;
use super::FileStore;
use crate::error::{Error, Result};
use crate::store::campaigns::{
    check_transition, Activity, CampaignRecord, Control, State, Transition,
};

/// The largest record file read: a record is a few hundred bytes, and a bigger file is not one.
const MAX_RECORD_BYTES: u64 = 1 << 20;

/// The largest control file read: ~30 bytes a campaign.
const MAX_CONTROL_BYTES: u64 = 64 << 20;

impl FileStore {
    /// `DIR/campaigns`.
    fn campaigns_dir(&self) -> PathBuf {
        self.dir().join("campaigns")
    }

    /// `DIR`.
    fn dir(&self) -> &Path {
        self.ledgers_dir.parent().unwrap_or(Path::new("."))
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

impl FileStore {
    /// The control states (see the module docs); empty at version 0 when there is no file.
    pub fn control(&self) -> Result<Control> {
        read_control(self.dir())
    }

    /// Sets campaign `id`'s state under `DIR/CONTROL.LOCK` (see the module docs); durable
    /// when it returns. Works without the store's lock. A campaign without a record here is
    /// a usage error naming it.
    pub fn set_state(&self, id: &str, state: State) -> Result<Transition> {
        if self.campaign(id)?.is_none() {
            return Err(Error::Usage(format!(
                "store {} has no campaign {id:?}: no run or serve admitted it there",
                self.url
            )));
        }
        set_state_in(self.dir(), id, state)
    }

    /// The ids of every campaign with a record here, sorted; none when there is no
    /// `campaigns/` directory. Files that are not records (`.tmp`) are skipped.
    pub fn campaign_ids(&self) -> Result<Vec<String>> {
        let dir = self.campaigns_dir();
        let entries = match fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(super::io_error(e, "cannot list", &dir)),
        };
        let mut ids = Vec::new();
        for entry in entries {
            let entry = entry.with_context(|| format!("cannot list {}", dir.display()))?;
            let name = entry.file_name();
            let Some(stem) = name.to_str().and_then(|n| n.strip_suffix(".json")) else {
                continue;
            };
            if let Some(id) = unescape(stem) {
                ids.push(id);
            }
        }
        ids.sort();
        Ok(ids)
    }

    /// The ledger keys of campaign `id` that have files here (`id`, `id:occurrence`), sorted.
    pub fn ledger_keys(&self, id: &str) -> Result<Vec<String>> {
        let entries = match fs::read_dir(&self.ledgers_dir) {
            Ok(e) => e,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(super::io_error(e, "cannot list", &self.ledgers_dir)),
        };
        let occurrence_prefix = format!("{id}:");
        let mut keys = std::collections::BTreeSet::new();
        for entry in entries {
            let entry =
                entry.with_context(|| format!("cannot list {}", self.ledgers_dir.display()))?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            // `<stem>.snap`, `<stem>.log`, `<stem>.<k>.log`; a stem holds no `.`.
            let Some((stem, ext)) = name.split_once('.') else {
                continue;
            };
            if !(ext == "snap" || ext == "log" || ext.ends_with(".log")) {
                continue;
            }
            let Some(key) = unescape(stem) else { continue };
            if key == id || key.starts_with(&occurrence_prefix) {
                keys.insert(key);
            }
        }
        Ok(keys.into_iter().collect())
    }
}

/// The key a file stem names (the inverse of `format::file_stem`); `None` for a name no stem
/// is.
fn unescape(stem: &str) -> Option<String> {
    let bytes = stem.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = stem.get(i + 1..i + 3)?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b if b.is_ascii_alphanumeric() || b == b'_' || b == b'-' => {
                out.push(b);
                i += 1;
            }
            _ => return None,
        }
    }
    String::from_utf8(out).ok().filter(|s| !s.is_empty())
}

impl FileStore {
    /// The file of campaign `id`'s activity.
    fn activity_path(&self, id: &str) -> Result<PathBuf> {
        let dir = self
            .ledgers_dir
            .parent()
            .unwrap_or(Path::new("."))
            .join("activity");
        Ok(dir.join(format!("{}.json", file_stem(id)?)))
    }

    /// See [`crate::store::Store::activity`]; an unreadable file is a runtime error naming it.
    pub fn activity(&self, id: &str) -> Result<Activity> {
        let path = self.activity_path(id)?;
        match fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .with_context(|| format!("{} is not a campaign's activity", path.display()))
                .map_err(Error::from),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Activity::default()),
            Err(e) => Err(anyhow::Error::from(e)
                .context(format!("cannot read {}", path.display()))
                .into()),
        }
    }

    /// See [`crate::store::Store::note_activity`]: read, merged and replaced whole (only the
    /// writer holding the store writes it).
    pub fn note_activity(&self, id: &str, first_ms: i64, last_ms: i64, worker: &str) -> Result<()> {
        if self.lock.is_none() {
            return Err(Error::runtime(format!(
                "store {} is open read-only",
                self.url
            )));
        }
        let mut activity = self.activity(id)?;
        activity.merge(first_ms, last_ms, worker);
        let path = self.activity_path(id)?;
        if let Some(dir) = path.parent() {
            fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        }
        let mut text =
            serde_json::to_string_pretty(&activity).context("cannot serialize an activity")?;
        text.push('\n');
        replace(&path, text.as_bytes())
    }
}

/// The control states of the store in `dir` (`dir/control.json`); empty at version 0 when
/// there is none.
fn read_control(dir: &Path) -> Result<Control> {
    let path = dir.join("control.json");
    let file = match File::open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(Control::default()),
        Err(e) => return Err(super::io_error(e, "cannot open", &path)),
    };
    let mut text = String::new();
    std::io::Read::read_to_string(&mut std::io::Read::take(file, MAX_CONTROL_BYTES), &mut text)
        .with_context(|| format!("cannot read {}", path.display()))?;
    serde_json::from_str(&text)
        .map_err(|e| Error::runtime(format!("{} is not a control file: {e}", path.display())))
}

/// Sets campaign `id`'s state in the store directory `dir` (created if missing) under
/// `dir/CONTROL.LOCK`, whether or not `dir` holds a record of it — so that a part of a split
/// store that has not admitted the campaign yet holds the state before the process owning
/// it does ([`crate::control::set`]). Durable when it returns.
pub fn set_state_in(dir: &Path, id: &str, state: State) -> Result<Transition> {
    fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let lock_path = dir.join("CONTROL.LOCK");
    let lock = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&lock_path)
        .with_context(|| format!("cannot open {}", lock_path.display()))?;
    lock.lock()
        .map_err(|e| super::io_error(e, "cannot lock", &lock_path))?;
    let mut control = read_control(dir)?;
    let from = control.states.get(id).copied().unwrap_or_default();
    check_transition(id, from, state)?;
    if from == state {
        return Ok(Transition::Unchanged);
    }
    control.states.insert(id.to_owned(), state);
    control.version += 1;
    let mut text =
        serde_json::to_string_pretty(&control).context("cannot serialize the control file")?;
    text.push('\n');
    replace(&dir.join("control.json"), text.as_bytes())?;
    File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("cannot sync {}", dir.display()))?;
    // Dropping `lock` closes it, which releases the flock.
    drop(lock);
    Ok(Transition::Changed(from))
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
    fn control_states_round_trip_without_the_store_lock_and_cancel_is_final() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().to_str().unwrap();
        let writer = FileStore::open("file:s", path).unwrap();
        writer
            .save_campaigns(&[record("spring", 1, 1), record("hot-1", 2, 1)])
            .unwrap();
        // The writer holds DIR/LOCK; a reader beside it sets states all the same.
        let control = FileStore::open_read_only("file:s", path).unwrap();
        assert_eq!(control.control().unwrap(), Control::default());
        assert_eq!(
            control.set_state("spring", State::Paused).unwrap(),
            Transition::Changed(State::Running)
        );
        assert_eq!(
            control.set_state("spring", State::Paused).unwrap(),
            Transition::Unchanged
        );
        let seen = writer.control().unwrap();
        assert_eq!(seen.version, 1);
        assert_eq!(seen.states.get("spring"), Some(&State::Paused));
        control.set_state("spring", State::Running).unwrap();
        control.set_state("hot-1", State::Cancelled).unwrap();
        assert_eq!(writer.control().unwrap().version, 3);
        for to in [State::Running, State::Paused] {
            let err = control.set_state("hot-1", to).unwrap_err();
            assert_eq!(err.exit_code(), 2);
            assert!(err.to_string().contains("final"), "{err}");
        }
        let err = control.set_state("nope", State::Paused).unwrap_err();
        assert_eq!(err.exit_code(), 2);
        assert!(err.to_string().contains("\"nope\""), "{err}");
        assert_eq!(writer.control().unwrap().version, 3);
        assert!(!dir.path().join("control.json.tmp").exists());
        assert_eq!(control.campaign_ids().unwrap(), ["hot-1", "spring"]);
    }

    #[test]
    fn concurrent_control_writers_lose_no_change() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().to_str().unwrap().to_owned();
        let ids = ["a", "b", "c", "d"];
        let records: Vec<CampaignRecord> = ids.iter().map(|id| record(id, 1, 1)).collect();
        FileStore::open("file:s", &path)
            .unwrap()
            .save_campaigns(&records)
            .unwrap();
        std::thread::scope(|scope| {
            for id in ids {
                let path = &path;
                scope.spawn(move || {
                    let store = FileStore::open_read_only("file:s", path).unwrap();
                    for _ in 0..25 {
                        store.set_state(id, State::Paused).unwrap();
                        store.set_state(id, State::Running).unwrap();
                    }
                });
            }
        });
        let control = FileStore::open_read_only("file:s", &path)
            .unwrap()
            .control()
            .unwrap();
        assert_eq!(control.version, 4 * 50);
        assert!(control.states.values().all(|s| *s == State::Running));
        assert_eq!(control.states.len(), 4);
    }

    #[test]
    fn ledger_keys_find_a_campaigns_occurrences_and_no_other_campaigns() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().to_str().unwrap();
        let store = FileStore::open("file:s", path).unwrap();
        for key in [
            "hot",
            "hot:2026-03-02T00:00:00Z",
            "hot-1",
            "hot-1:2026-03-02T01:00:00Z",
        ] {
            store.ledger(key).unwrap().claim(&[1]).unwrap();
        }
        store.checkpoint().unwrap();
        assert_eq!(
            store.ledger_keys("hot").unwrap(),
            ["hot", "hot:2026-03-02T00:00:00Z"]
        );
        assert_eq!(
            store.ledger_keys("hot-1").unwrap(),
            ["hot-1", "hot-1:2026-03-02T01:00:00Z"]
        );
        assert!(store.ledger_keys("ho").unwrap().is_empty());
        assert_eq!(unescape("a%3Ab"), Some("a:b".to_owned()));
        assert_eq!(unescape("a%3"), None);
        assert_eq!(unescape("a.b"), None);
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
