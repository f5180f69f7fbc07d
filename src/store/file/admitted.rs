//! The repeated-campaign guard of the embedded store: `DIR/admitted.jsonl`, one line per
//! admission `{"hash", "id", "at"}` (Unix seconds), one per (hash, id) pair, rewritten whole (temp file + rename) at
//! each admission with the expired lines dropped. Only the lock holder writes it.

use std::fs;
use std::io::Write;
use std::path::Path;

use anyhow::Context;
use serde::{Deserialize, Serialize};

use crate::error::Result;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
struct Admitted {
    hash: String,
    id: String,
    at: u64,
}

/// Admits `(content hash, campaign id)` pairs at `now` (Unix seconds), unless one's content was
/// admitted under another id less than `ttl_s` ago: then nothing is admitted and the answer is
/// `Err((id, earlier id))`.
pub fn admit(
    dir: &Path,
    campaigns: &[(String, String)],
    now: u64,
    ttl_s: u64,
) -> Result<std::result::Result<(), (String, String)>> {
    let path = dir.join("admitted.jsonl");
    let text = match fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => {
            return Err(anyhow::Error::from(e)
                .context(format!("cannot read {}", path.display()))
                .into())
        }
    };
    // A line that does not parse (a torn write) is dropped: it admitted nothing that counts.
    let mut live: Vec<Admitted> = text
        .lines()
        .filter_map(|l| serde_json::from_str::<Admitted>(l).ok())
        .filter(|a| a.at + ttl_s > now)
        .collect();
    // Earlier admissions, then this job's own campaigns in order: two campaigns of one job
    // with the same content are duplicates too.
    let mut seen: Vec<(&str, &str)> = live
        .iter()
        .map(|a| (a.hash.as_str(), a.id.as_str()))
        .collect();
    for (hash, id) in campaigns {
        if let Some((_, earlier)) = seen.iter().find(|(h, i)| h == hash && i != id) {
            return Ok(Err((id.clone(), (*earlier).to_owned())));
        }
        seen.push((hash, id));
    }
    // Only the same (content, id) is replaced (its time refreshed): an id re-admitted with other
    // content keeps its earlier admission, so that content stays guarded under it for the TTL.
    live.retain(|a| {
        !campaigns
            .iter()
            .any(|(hash, id)| *hash == a.hash && *id == a.id)
    });
    live.extend(campaigns.iter().map(|(hash, id)| Admitted {
        hash: hash.clone(),
        id: id.clone(),
        at: now,
    }));
    let tmp = dir.join("admitted.jsonl.tmp");
    let mut out = String::new();
    for a in &live {
        out.push_str(&serde_json::to_string(a).context("cannot serialize an admission")?);
        out.push('\n');
    }
    let mut f =
        fs::File::create(&tmp).with_context(|| format!("cannot write {}", tmp.display()))?;
    f.write_all(out.as_bytes())
        .and_then(|()| f.sync_all())
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    fs::rename(&tmp, &path).with_context(|| format!("cannot replace {}", path.display()))?;
    Ok(Ok(()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(hash: &str, id: &str) -> (String, String) {
        (hash.to_owned(), id.to_owned())
    }

    #[test]
    fn an_id_readmitted_with_other_content_keeps_guarding_its_first_content() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        assert_eq!(admit(d, &[pair("h1", "a")], 1000, 1800).unwrap(), Ok(()));
        assert_eq!(admit(d, &[pair("h2", "a")], 1010, 1800).unwrap(), Ok(()));
        assert_eq!(
            admit(d, &[pair("h1", "c")], 1020, 1800).unwrap(),
            Err(("c".to_owned(), "a".to_owned()))
        );
        // The same pair again refreshes its time rather than adding a line.
        assert_eq!(admit(d, &[pair("h1", "a")], 2000, 1800).unwrap(), Ok(()));
        let text = fs::read_to_string(d.join("admitted.jsonl")).unwrap();
        assert_eq!(text.lines().count(), 2, "{text}");
        assert_eq!(
            admit(d, &[pair("h1", "c")], 1000 + 1800, 1800).unwrap(),
            Err(("c".to_owned(), "a".to_owned()))
        );
        // h2 under `a` is still guarded, counted from its own admission.
        assert_eq!(
            admit(d, &[pair("h2", "e")], 1009 + 1800, 1800).unwrap(),
            Err(("e".to_owned(), "a".to_owned()))
        );
        assert_eq!(
            admit(d, &[pair("h2", "e")], 1010 + 1800, 1800).unwrap(),
            Ok(())
        );
    }

    #[test]
    fn same_content_under_another_id_is_refused_for_the_ttl() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        assert_eq!(
            admit(d, &[pair("h1", "a"), pair("h2", "b")], 1000, 1800).unwrap(),
            Ok(())
        );
        // The same id resumes.
        assert_eq!(admit(d, &[pair("h1", "a")], 1500, 1800).unwrap(), Ok(()));
        // Another id with h1's content, inside the window (counted from the last admission).
        assert_eq!(
            admit(d, &[pair("h3", "c"), pair("h1", "x")], 3200, 1800).unwrap(),
            Err(("x".to_owned(), "a".to_owned()))
        );
        // Nothing of a refused job was admitted: c's content is still free.
        assert_eq!(admit(d, &[pair("h3", "y")], 3200, 1800).unwrap(), Ok(()));
        // After the window, the content is free again.
        assert_eq!(
            admit(d, &[pair("h1", "x")], 1500 + 1800, 1800).unwrap(),
            Ok(())
        );
        // Two campaigns of one job with one content.
        assert_eq!(
            admit(d, &[pair("h9", "p"), pair("h9", "q")], 9000, 1800).unwrap(),
            Err(("q".to_owned(), "p".to_owned()))
        );
    }
}
