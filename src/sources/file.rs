//! Reading a user file: its format by extension, the line loop, and what a bad line does.

use std::fs::File;
use std::io::{BufRead, BufReader};

use super::csv::Header;
use super::lines::LineReader;
use super::record::Bad;
use super::table::{TableBuilder, UserTable};
use super::{jsonl, LoadOptions, LoadReport};
use crate::error::{Error, InputError, Result};

/// A user file's format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Format {
    /// One JSON object per line (`.jsonl`, `.json`, `.ndjson`).
    JsonLines,
    /// A header row, then one user per line (`.csv`).
    Csv,
}

impl Format {
    /// The format a path's extension names, if any.
    pub fn of_path(path: &str) -> Option<Format> {
        let (_, ext) = path.rsplit_once('.')?;
        match ext.to_ascii_lowercase().as_str() {
            "jsonl" | "json" | "ndjson" => Some(Format::JsonLines),
            "csv" => Some(Format::Csv),
            _ => None,
        }
    }
}

/// Loads the user file at `path`.
pub(crate) fn load(
    path: &str,
    format: Format,
    opts: &LoadOptions,
) -> Result<(UserTable, LoadReport)> {
    let file = File::open(path)
        .map_err(|e| InputError::new(path, None, "", format!("cannot open: {e}")))?;
    read(path, BufReader::with_capacity(1 << 16, file), format, opts)
}

/// Loads users from `input`, naming it `path` in errors.
pub(crate) fn read(
    path: &str,
    input: impl BufRead,
    format: Format,
    opts: &LoadOptions,
) -> Result<(UserTable, LoadReport)> {
    let mut lines = LineReader::new(input);
    let mut table = TableBuilder::default();
    let mut report = LoadReport::default();
    let mut header: Option<Header> = None;
    loop {
        let next = lines
            .next_line()
            .map_err(|e| Error::runtime(format!("cannot read {path}: {e}")))?;
        let Some((no, line)) = next else { break };
        report.lines = no;
        let parsed = match line.text() {
            Err(msg) => Err(Bad::line(msg)),
            Ok(text) if text.trim().is_empty() => continue,
            Ok(text) => match (format, &header) {
                (Format::JsonLines, _) => jsonl::parse_line(text),
                (Format::Csv, Some(h)) => h.parse_row(text),
                (Format::Csv, None) => {
                    header = Some(Header::parse(text).map_err(|b| b.at(path, no))?);
                    continue;
                }
            },
        };
        match parsed {
            Ok(user) if opts.keep.is_none_or(|r| r.keeps(user.id)) => table.push(&user)?,
            Ok(_) => {} // another process's bucket
            Err(bad) => {
                let e = bad.at(path, no);
                // Without a header no CSV line can be read, so that one is never skipped.
                let fatal = format == Format::Csv && header.is_none();
                if !opts.skip_bad_lines || fatal {
                    return Err(e.into());
                }
                report.skip(e);
            }
        }
    }
    let table = table.finish();
    report.users = table.len() as u64;
    Ok((table, report))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::User;
    use crate::sources::lines::MAX_LINE;

    fn load_str(format: Format, text: &[u8], skip: bool) -> Result<(UserTable, LoadReport)> {
        let opts = LoadOptions {
            skip_bad_lines: skip,
            ..LoadOptions::default()
        };
        read("users.x", text, format, &opts)
    }

    /// The error a bad input stops with.
    fn stop(format: Format, text: &[u8]) -> InputError {
        match load_str(format, text, false) {
            Err(Error::BadInput(e)) => e,
            other => panic!("expected bad input, got {other:?}"),
        }
    }

    fn all(t: &UserTable) -> Vec<User> {
        t.ids().iter().map(|&id| t.get(id).unwrap()).collect()
    }

    #[test]
    fn formats_come_from_the_extension() {
        assert_eq!(Format::of_path("a/b.jsonl"), Some(Format::JsonLines));
        assert_eq!(Format::of_path("b.JSON"), Some(Format::JsonLines));
        assert_eq!(Format::of_path("b.ndjson"), Some(Format::JsonLines));
        assert_eq!(Format::of_path("b.csv"), Some(Format::Csv));
        assert_eq!(Format::of_path("b.txt"), None);
        assert_eq!(Format::of_path("csv"), None);
    }

    #[test]
    fn empty_files_hold_no_users() {
        for (format, text) in [
            (Format::JsonLines, &b""[..]),
            (Format::JsonLines, b"\n  \r\n"),
            (Format::Csv, b""),
            (Format::Csv, b"id,level,points\n"),
        ] {
            let (t, r) = load_str(format, text, false).unwrap();
            assert!(t.is_empty());
            assert_eq!((r.users, r.skipped), (0, 0));
        }
    }

    #[test]
    fn crlf_blank_lines_and_repeats_load_and_the_last_line_wins() {
        let text = b"{\"id\":5,\"level\":1,\"points\":2,\"tags\":[\"a\"]}\r\n\r\n   \n\
                     {\"id\":3,\"level\":0,\"points\":0}\r\n\
                     {\"id\":5,\"level\":7,\"points\":8,\"token\":\"t\"}";
        let (t, r) = load_str(Format::JsonLines, text, false).unwrap();
        assert_eq!((r.lines, r.users, r.skipped), (5, 2, 0));
        assert_eq!(t.ids(), [3, 5]);
        let five = t.get(5).unwrap();
        assert_eq!((five.level, five.points, five.tags.len()), (7, 8, 0));
        assert_eq!(t.token(5), Some("t"));
    }

    #[test]
    fn the_first_bad_line_stops_the_load_naming_file_line_and_field() {
        let text =
            b"{\"id\":1,\"level\":1,\"points\":1}\n\n{\"id\":2,\"level\":300,\"points\":1}\n";
        let e = stop(Format::JsonLines, text);
        assert_eq!(
            e.to_string(),
            "users.x:3: level: expected an integer 0..=255, got 300"
        );
        let e = stop(Format::Csv, b"id,level,points\n1,1,1\n2,2\n");
        assert_eq!((e.line, e.field.as_str()), (Some(3), ""));
        assert!(e.msg.contains("expected 3 columns"), "{}", e.msg);
    }

    #[test]
    fn over_long_and_non_utf8_lines_are_bad_input_in_both_formats() {
        let good_json = b"{\"id\":1,\"level\":1,\"points\":1}\n";
        for (format, head, good) in [
            (Format::JsonLines, &b""[..], &good_json[..]),
            (Format::Csv, b"id,level,points\n", b"1,1,1\n"),
        ] {
            let mut long = head.to_vec();
            long.extend(vec![b' '; MAX_LINE + 1]);
            long.push(b'\n');
            long.extend_from_slice(good);
            let e = stop(format, &long);
            assert!(e.msg.starts_with("line longer than 1 MiB"), "{}", e.msg);
            let (t, r) = load_str(format, &long, true).unwrap();
            assert_eq!((t.len(), r.skipped), (1, 1), "{format:?}");

            let mut bad = head.to_vec();
            bad.extend_from_slice(b"\xFF\xFE\n");
            bad.extend_from_slice(good);
            let e = stop(format, &bad);
            assert!(e.msg.starts_with("not valid UTF-8"), "{}", e.msg);
            assert_eq!(e.line, Some(if head.is_empty() { 1 } else { 2 }));
        }
    }

    #[test]
    fn skipping_counts_bad_lines_and_keeps_the_first_ten_errors() {
        let mut text = String::new();
        for id in 1..=30 {
            if id % 2 == 0 {
                text.push_str(&format!("{{\"id\":{id},\"level\":1,\"points\":-1}}\n"));
            } else {
                text.push_str(&format!("{{\"id\":{id},\"level\":1,\"points\":1}}\n"));
            }
        }
        let (t, r) = load_str(Format::JsonLines, text.as_bytes(), true).unwrap();
        assert_eq!((t.len(), r.users, r.skipped, r.lines), (15, 15, 15, 30));
        assert_eq!(r.first_errors.len(), 10);
        assert_eq!(r.first_errors[0].line, Some(2));
        assert_eq!(r.first_errors[9].line, Some(20));
        assert!(r.first_errors.iter().all(|e| e.field == "points"));
    }

    #[test]
    fn a_bad_csv_header_stops_the_load_even_when_skipping() {
        for skip in [false, true] {
            match load_str(Format::Csv, b"\nid,level\n1,1\n", skip) {
                Err(Error::BadInput(e)) => {
                    assert_eq!((e.line, e.field.as_str()), (Some(2), "points"));
                }
                other => panic!("expected bad input, got {other:?}"),
            }
        }
    }

    #[test]
    fn csv_and_json_lines_of_the_same_users_give_equal_tables() {
        let json = "\u{feff}{\"id\":4294967295,\"level\":2,\"points\":3,\"tags\":[\"运动\",\"мама\"],\"token\":\"x\"}\n\
                    {\"id\":7,\"level\":0,\"points\":18446744073709551615}\r\n\
                    {\"id\":1,\"level\":255,\"points\":0,\"tags\":[\"мама\"],\"token\":\"t-1\"}\n\
                    {\"id\":7,\"level\":1,\"points\":2,\"tags\":[\"sports\"]}\n";
        let csv = "\u{feff}token,id,level,points,tags\r\n\
                   x,4294967295,2,3,运动;мама\n\
                   ,7,0,18446744073709551615,\n\
                   \n\
                   t-1,1,255,0,мама\n\
                   ,7,1,2,sports\n";
        let (j, _) = load_str(Format::JsonLines, json.as_bytes(), false).unwrap();
        let (c, _) = load_str(Format::Csv, csv.as_bytes(), false).unwrap();
        assert_eq!(j.ids(), [1, 7, u32::MAX]);
        assert_eq!(all(&j), all(&c));
        assert_eq!(all(&j)[2].tags, ["мама", "运动"]);
        assert_eq!(j.tags().len(), 3);
    }

    #[test]
    fn each_process_keeps_exactly_its_buckets_and_together_every_user() {
        use crate::model::{Buckets, Placement, Route};
        let text: String = (1..=500u32)
            .rev()
            .map(|id| {
                format!(
                    "{{\"id\":{},\"level\":1,\"points\":2}}\n",
                    id * 7919 % 100_003
                )
            })
            .collect();
        let (whole, _) = load_str(Format::JsonLines, text.as_bytes(), false).unwrap();
        let buckets = Buckets::new(10);
        let (processes, workers) = (3, 2);
        let mut union = Vec::new();
        for p in 0..processes {
            let route = Route::process(buckets, processes, p);
            let opts = LoadOptions {
                skip_bad_lines: false,
                keep: Some(route),
                ..LoadOptions::default()
            };
            let (part, report) =
                read("users.x", text.as_bytes(), Format::JsonLines, &opts).unwrap();
            assert_eq!(report.users, part.len() as u64);
            for &id in part.ids() {
                let owner =
                    Placement::new(buckets, processes, workers).worker_of(buckets.bucket_of(id));
                assert_eq!(owner / workers, p, "user {id} loaded by the wrong process");
            }
            union.extend_from_slice(part.ids());
        }
        union.sort_unstable();
        assert_eq!(
            union,
            whole.ids(),
            "every user loaded by exactly one process"
        );
    }
}
