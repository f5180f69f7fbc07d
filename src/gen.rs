//! `fanout gen users`: writes synthetic users to a file or a Redis server, for benchmarks and
//! examples.
//!
//! The output holds exactly what `synthetic:N:SEED` would compute, so a run over it and a run
//! over the synthetic source must agree.

use std::fs::File;
use std::io::{self, BufWriter, Write};

use crate::error::{Error, Result};
use crate::sources::redis_users;
use crate::sources::synthetic::{attrs, synthetic_user, tag_names};

/// Writes synthetic users `1..=count` (exactly `synthetic_user(seed, id)`) to `out` as JSON
/// Lines, or as CSV when `out` ends in `.csv`, or as hashes (and `fanout:users:max_id`) when
/// `out` is `redis://…`; `None` or `"-"` writes to stdout. Returns how many users were
/// written.
pub fn gen_users(count: u32, seed: u64, out: Option<&str>) -> Result<u64> {
    match out {
        Some(url) if redis_users::is_redis(url) => {
            let users = (1..=count).map(move |id| synthetic_user(seed, id));
            redis_users::write(url, count, users)
        }
        None | Some("-") => write_users(io::stdout().lock(), count, seed, false)
            .map_err(|e| Error::runtime(format!("cannot write users to stdout: {e}"))),
        Some(path) => {
            let file = File::create(path)
                .map_err(|e| Error::runtime(format!("cannot create {path}: {e}")))?;
            let csv = path.to_ascii_lowercase().ends_with(".csv");
            write_users(file, count, seed, csv)
                .map_err(|e| Error::runtime(format!("cannot write {path}: {e}")))
        }
    }
}

fn write_users(out: impl Write, count: u32, seed: u64, csv: bool) -> io::Result<u64> {
    let mut w = BufWriter::with_capacity(1 << 20, out);
    // Every tag set as it is written, by tag bits: formatted once, not once per user.
    let tag_sets: Vec<String> = (0..=u8::MAX)
        .map(|bits| {
            let names = tag_names(bits);
            if csv {
                names.join(";")
            } else {
                let quoted: Vec<String> = names.iter().map(|n| format!("\"{n}\"")).collect();
                format!("[{}]", quoted.join(","))
            }
        })
        .collect();
    if csv {
        writeln!(w, "id,level,points,tags,token")?;
    }
    for id in 1..=count {
        let a = attrs(seed, id);
        let tags = &tag_sets[usize::from(a.tag_bits)];
        if csv {
            writeln!(w, "{id},{},{},{tags},t-{id}", a.level, a.points)?;
        } else {
            writeln!(
                w,
                "{{\"id\":{id},\"level\":{},\"points\":{},\"tags\":{tags},\"token\":\"t-{id}\"}}",
                a.level, a.points
            )?;
        }
    }
    w.flush()?;
    Ok(u64::from(count))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sources::{LoadOptions, UserSource};

    #[test]
    fn written_users_read_back_as_the_synthetic_ones() {
        let dir = tempfile::tempdir().unwrap();
        for name in ["users.jsonl", "users.csv"] {
            let path = dir.path().join(name);
            let path = path.to_str().unwrap();
            assert_eq!(gen_users(500, 42, Some(path)).unwrap(), 500);
            let (src, report) = UserSource::open(path, &LoadOptions::default()).unwrap();
            assert_eq!((report.users, report.skipped, src.len()), (500, 0, 500));
            for id in 1..=500 {
                assert_eq!(
                    src.get(id),
                    Some(synthetic_user(42, id)),
                    "{name} user {id}"
                );
            }
            assert_eq!(src.get(501), None);
        }
    }

    #[test]
    fn json_lines_match_the_spec_format() {
        let mut out = Vec::new();
        write_users(&mut out, 2, 0, false).unwrap();
        let text = String::from_utf8(out).unwrap();
        let first: serde_json::Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
        let u = synthetic_user(0, 1);
        assert_eq!(first["id"], 1);
        assert_eq!(first["level"], u.level);
        assert_eq!(first["points"], u.points);
        assert_eq!(first["tags"], serde_json::json!(u.tags));
        assert_eq!(first["token"], "t-1");
        assert_eq!(text.lines().count(), 2);
    }

    #[test]
    fn an_unwritable_path_is_a_runtime_error_naming_it() {
        let e = gen_users(1, 0, Some("/nonexistent-dir/x.jsonl")).unwrap_err();
        assert_eq!(e.exit_code(), 1);
        assert!(e.to_string().contains("/nonexistent-dir/x.jsonl"), "{e}");
    }
}
