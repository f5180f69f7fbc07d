//! The `granted` input: `{"campaign": "…", "user": 42}` per line, pairs granted before fanout.

use serde::Deserialize;

use crate::error::{InputError, Result};
use crate::sources::lines::for_each_line;

#[derive(Deserialize)]
struct Raw {
    campaign: Option<serde_json::Value>,
    user: Option<serde_json::Value>,
}

/// Reads the granted pairs at `path`; bad lines stop the load, or are skipped if `skip_bad`.
pub fn load(path: &str, skip_bad: bool) -> Result<Vec<(String, u32)>> {
    let mut pairs = Vec::new();
    for_each_line(path, skip_bad, |line_no, line| {
        let bad = |field: &str, msg: String| InputError::new(path, Some(line_no), field, msg);
        let raw: Raw = serde_json::from_str(line)
            .map_err(|e| bad("", format!("expected a JSON object: {e}")))?;
        let campaign = match raw.campaign {
            Some(serde_json::Value::String(s)) => s,
            Some(other) => return Err(bad("campaign", format!("expected a string, got {other}"))),
            None => return Err(bad("campaign", "missing".into())),
        };
        let user = match raw.user.as_ref().and_then(serde_json::Value::as_u64) {
            Some(u) if (1..=u64::from(u32::MAX)).contains(&u) => u as u32,
            Some(u) => {
                return Err(bad(
                    "user",
                    format!("expected an id 1..=4294967295, got {u}"),
                ))
            }
            None => return Err(bad("user", "missing or not a positive integer".into())),
        };
        pairs.push((campaign, user));
        Ok(())
    })?;
    Ok(pairs)
}
