//! Users from CSV: a header row naming `id,level,points` and optionally `tags`, `token` and `tz`
//! (in any order; other columns are ignored), then one user per line, tags separated by `;`.
//!
//! The file is read line by line with the bounded reader, so each row is one line. A line
//! without quotes is split on commas directly; a quoted one goes through the `csv` crate.

use super::record::{
    check_id, check_level, check_points, check_tz, shorten, Bad, ID, LEVEL, POINTS,
};
use crate::model::User;

/// Where each known column sits, from the header row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Header {
    width: usize,
    id: usize,
    level: usize,
    points: usize,
    tags: Option<usize>,
    token: Option<usize>,
    tz: Option<usize>,
}

impl Header {
    /// Reads the header row. Column names are matched without surrounding spaces or case.
    pub fn parse(text: &str) -> Result<Header, Bad> {
        with_fields(text, |names| {
            let find = |want: &str| -> Result<Option<usize>, Bad> {
                let at: Vec<usize> = names
                    .iter()
                    .enumerate()
                    .filter(|(_, n)| n.trim().eq_ignore_ascii_case(want))
                    .map(|(i, _)| i)
                    .collect();
                match at.as_slice() {
                    [] => Ok(None),
                    [i] => Ok(Some(*i)),
                    _ => Err(Bad::field(want, "column named twice in the header")),
                }
            };
            let required = |want: &str| -> Result<usize, Bad> {
                find(want)?.ok_or_else(|| {
                    Bad::field(
                        want,
                        "missing column: the header must name id, level and points \
                         (and may name tags, token and tz)",
                    )
                })
            };
            Ok(Header {
                width: names.len(),
                id: required("id")?,
                level: required("level")?,
                points: required("points")?,
                tags: find("tags")?,
                token: find("token")?,
                tz: find("tz")?,
            })
        })
    }

    /// Parses one non-blank data row into a user.
    ///
    /// Numbers may have spaces around them; tags are trimmed and empty ones dropped; an empty
    /// token or tz cell means none.
    pub fn parse_row(&self, text: &str) -> Result<User, Bad> {
        with_fields(text, |cells| {
            if cells.len() != self.width {
                return Err(Bad::line(format!(
                    "expected {} columns as in the header, got {}",
                    self.width,
                    cells.len()
                )));
            }
            let int = |i: usize| cells[i].trim().parse::<u64>().ok();
            let got = |i: usize| move || format!("{:?}", shorten(cells[i]));
            let present = |i: usize, field: &str, expected: &str| {
                if cells[i].trim().is_empty() {
                    Err(Bad::missing(field, expected))
                } else {
                    Ok(())
                }
            };
            present(self.id, "id", ID)?;
            let id = check_id(int(self.id), got(self.id))?;
            present(self.level, "level", LEVEL)?;
            let level = check_level(int(self.level), got(self.level))?;
            present(self.points, "points", POINTS)?;
            let points = check_points(int(self.points), got(self.points))?;
            let tags = self
                .tags
                .map(|i| {
                    cells[i]
                        .split(';')
                        .map(str::trim)
                        .filter(|t| !t.is_empty())
                        .map(str::to_owned)
                        .collect()
                })
                .unwrap_or_default();
            let token = self
                .token
                .map(|i| cells[i])
                .filter(|t| !t.is_empty())
                .map(str::to_owned);
            let tz = match self.tz {
                Some(i) => check_tz(cells[i])?,
                None => None,
            };
            Ok(User {
                id,
                level,
                points,
                tags,
                token,
                tz,
            })
        })
    }
}

/// Calls `f` with the cells of one CSV line.
fn with_fields<T>(text: &str, f: impl FnOnce(&[&str]) -> Result<T, Bad>) -> Result<T, Bad> {
    if !text.contains('"') {
        let cells: Vec<&str> = text.split(',').collect();
        return f(&cells);
    }
    let mut reader = ::csv::ReaderBuilder::new()
        .has_headers(false)
        .flexible(true)
        .from_reader(text.as_bytes());
    let mut record = ::csv::StringRecord::new();
    let malformed = |e: ::csv::Error| Bad::line(format!("malformed CSV: {e}"));
    if !reader.read_record(&mut record).map_err(malformed)? {
        return Err(Bad::line("malformed CSV: no record"));
    }
    let mut extra = ::csv::StringRecord::new();
    if reader.read_record(&mut extra).map_err(malformed)? {
        return Err(Bad::line(
            "malformed CSV: a line must hold exactly one record",
        ));
    }
    let cells: Vec<&str> = record.iter().collect();
    f(&cells)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> Header {
        Header::parse("id,level,points,tags,token").unwrap()
    }

    fn fault(h: &Header, row: &str) -> (String, String) {
        let b = h.parse_row(row).unwrap_err();
        (b.field, b.msg)
    }

    #[test]
    fn reads_rows_by_header_name() {
        let h = Header::parse(" Token ,points,id,extra,level").unwrap();
        let u = h.parse_row("t-9,100,9,whatever,4").unwrap();
        assert_eq!(
            u,
            User {
                id: 9,
                level: 4,
                points: 100,
                tags: vec![],
                token: Some("t-9".into()),
                tz: None,
            }
        );
    }

    #[test]
    fn an_optional_tz_column_holds_zone_names() {
        let h = Header::parse("id,level,points,tags,token,TZ").unwrap();
        let u = h.parse_row("1,2,3,,t, America/New_York ").unwrap();
        assert_eq!(u.tz, Some(chrono_tz::Tz::America__New_York));
        assert_eq!(h.parse_row("1,2,3,,t,").unwrap().tz, None);
        let (field, msg) = fault(&h, "1,2,3,,t,Europe/Nowhere");
        assert_eq!(field, "tz");
        assert!(
            msg.starts_with("unknown time zone \"Europe/Nowhere\""),
            "{msg}"
        );
        assert_eq!(
            Header::parse("id,tz,level,points,tz").unwrap_err().field,
            "tz"
        );
    }

    #[test]
    fn tags_split_on_semicolons_and_empty_cells_mean_none() {
        let h = header();
        let u = h.parse_row("1,2,3,sports; мама;;运动,").unwrap();
        assert_eq!(u.tags, ["sports", "мама", "运动"]);
        assert_eq!(u.token, None);
        let u = h.parse_row("1,2,3,,t").unwrap();
        assert!(u.tags.is_empty());
        assert_eq!(u.token.as_deref(), Some("t"));
    }

    #[test]
    fn quoted_cells_go_through_the_csv_parser() {
        let h = header();
        let u = h.parse_row(r#""1",2,3,"a;b","tok,""x""""#).unwrap();
        assert_eq!(u.tags, ["a", "b"]);
        assert_eq!(u.token.as_deref(), Some(r#"tok,"x""#));
        let h = Header::parse(r#""id","level","points""#).unwrap();
        assert_eq!(h.parse_row("5,1,1").unwrap().id, 5);
    }

    #[test]
    fn a_missing_required_column_is_named() {
        for (hdr, field) in [
            ("level,points,tags", "id"),
            ("id,points", "level"),
            ("id,level", "points"),
        ] {
            let b = Header::parse(hdr).unwrap_err();
            assert_eq!(b.field, field, "{hdr}");
            assert!(b.msg.starts_with("missing column"));
        }
        assert_eq!(Header::parse("id,level,points,id").unwrap_err().field, "id");
    }

    #[test]
    fn wrong_column_count_faults_the_line() {
        let h = header();
        assert_eq!(
            fault(&h, "1,2,3"),
            (
                "".into(),
                "expected 5 columns as in the header, got 3".into()
            )
        );
        assert_eq!(fault(&h, "1,2,3,a,b,c").0, "");
    }

    #[test]
    fn numbers_are_checked_like_json() {
        let h = header();
        assert_eq!(
            fault(&h, "0,1,1,,"),
            (
                "id".into(),
                "expected an integer 1..=4294967295, got \"0\"".into()
            )
        );
        assert_eq!(fault(&h, "4294967296,1,1,,").0, "id");
        assert_eq!(fault(&h, "1.5,1,1,,").0, "id");
        assert_eq!(fault(&h, "abc,1,1,,").0, "id");
        assert!(fault(&h, ",1,1,,").1.starts_with("missing"));
        assert_eq!(
            fault(&h, "1,300,1,,"),
            (
                "level".into(),
                "expected an integer 0..=255, got \"300\"".into()
            )
        );
        assert_eq!(fault(&h, "1,1,-5,,").0, "points");
        assert_eq!(fault(&h, "1,1, ,,").0, "points");
        assert_eq!(h.parse_row(" 7 , 1 ,2,,").unwrap().id, 7);
    }
}
