//! User sources: who a campaign can reach.
//!
//! - a JSON Lines (`jsonl.rs`) or CSV (`csv.rs`) file, read once with the bounded line reader
//!   ([`lines`]) into an id-ordered columnar [`table::UserTable`];
//! - [`synthetic`] users `1..=N`, computed from their id, held by nobody;
//! - hashes on a Redis server ([`redis_users`]), fetched bucket by bucket into the same table.
//!
//! All answer the same questions by id range ([`UserSource::count_in`],
//! [`UserSource::for_each_in`]), which is how the dataflow scans one bucket of users at a time.

mod csv;
mod file;
pub mod granted;
mod jsonl;
pub mod lines;
pub mod logins;
mod record;
pub mod redis_users;
pub mod synthetic;
pub mod table;

use std::sync::Arc;

use crate::error::{Error, InputError, Result};
use crate::model::{Buckets, Route, TagDict, User, UserId, UserRef};

use file::Format;
use synthetic::Synthetic;
use table::UserTable;

/// How many skipped lines' errors a [`LoadReport`] keeps.
const KEPT_ERRORS: usize = 10;

/// How to load users.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoadOptions {
    /// Skip a bad line (counting it) instead of stopping at the first one.
    pub skip_bad_lines: bool,
    /// Ids per bucket (the job's `bucket_size`): users on Redis are fetched one pipeline per
    /// bucket, and `keep` speaks of these buckets.
    pub bucket_size: u32,
    /// Keep only the users of these buckets (one process of a cluster); `None`: every user.
    /// A file is still read whole, line by line; the others' users are parsed and dropped.
    /// From Redis only the kept buckets are fetched.
    pub keep: Option<Route>,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            skip_bad_lines: false,
            bucket_size: 1000,
            keep: None,
        }
    }
}

/// What loading a source found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LoadReport {
    /// Lines read, blank ones included (0 for a synthetic source).
    pub lines: u64,
    /// Distinct users loaded: a repeated id counts once.
    pub users: u64,
    /// Bad lines skipped (only with `skip_bad_lines`).
    pub skipped: u64,
    /// The errors of the first skipped lines, at most 10.
    pub first_errors: Vec<InputError>,
}

impl LoadReport {
    /// Counts a skipped bad line (or user), keeping the first errors.
    pub fn skip(&mut self, e: InputError) {
        self.skipped += 1;
        if self.first_errors.len() < KEPT_ERRORS {
            self.first_errors.push(e);
        }
    }
}

/// Where the users come from. Cheap to clone: every worker holds one.
#[derive(Debug, Clone)]
pub enum UserSource {
    /// A file, loaded once per process and shared by the workers.
    Table(Arc<UserTable>),
    /// Users computed from their id.
    Synthetic(Synthetic),
}

/// What `open` accepts, for error messages.
const SPECS: &str = "expected synthetic:N, synthetic:N:SEED, redis://[user:pass@]host:port/db, \
                     or a .jsonl, .json, .ndjson or .csv file";

impl UserSource {
    /// Opens the source `spec` names: `synthetic:N` or `synthetic:N:SEED` (users `1..=N`,
    /// seed 0 by default), or a path ending in `.jsonl`, `.json`, `.ndjson` (JSON Lines) or
    /// `.csv`, or `redis://[user:pass@]host:port/db` ([`redis_users`]). Anything else is a
    /// usage error; a bad file or hash is [`Error::BadInput`].
    pub fn open(spec: &str, opts: &LoadOptions) -> Result<(UserSource, LoadReport)> {
        let route = opts.keep;
        UserSource::open_buckets(spec, opts, &move |b| {
            route.is_none_or(|r| r.keeps_bucket(b))
        })
    }

    /// [`UserSource::open`] for the users of some buckets (of `opts.bucket_size` ids): from
    /// Redis only the buckets `keep` accepts are fetched. A file keeps what `opts.keep` says;
    /// a synthetic source computes any user on demand.
    pub fn open_buckets(
        spec: &str,
        opts: &LoadOptions,
        keep: &(dyn Fn(u32) -> bool + Sync),
    ) -> Result<(UserSource, LoadReport)> {
        if redis_users::is_redis(spec) {
            let (table, report) = redis_users::load(spec, opts, keep)?;
            return Ok((UserSource::Table(Arc::new(table)), report));
        }
        if let Some(rest) = spec.strip_prefix("synthetic:") {
            let s = parse_synthetic(spec, rest)?;
            let report = LoadReport {
                users: u64::from(s.n()),
                ..LoadReport::default()
            };
            return Ok((UserSource::Synthetic(s), report));
        }
        match Format::of_path(spec) {
            Some(format) if !spec.contains("://") => {
                let (table, report) = file::load(spec, format, opts)?;
                Ok((UserSource::Table(Arc::new(table)), report))
            }
            _ => Err(Error::Usage(format!(
                "unsupported user source {spec:?}: {SPECS}"
            ))),
        }
    }

    /// The dictionary the tag ids of [`UserRef::tags`] refer to.
    pub fn tags(&self) -> &TagDict {
        match self {
            UserSource::Table(t) => t.tags(),
            UserSource::Synthetic(s) => s.tags(),
        }
    }

    /// Ascending ids of the buckets that hold at least one user (synthetic: every bucket
    /// covering `1..=N`).
    pub fn buckets(&self, b: Buckets) -> Vec<u32> {
        match self {
            UserSource::Table(t) => t.buckets(b),
            UserSource::Synthetic(s) => s.buckets(b),
        }
    }

    /// How many users there are (a repeated id counts once).
    pub fn len(&self) -> u64 {
        match self {
            UserSource::Table(t) => t.len() as u64,
            UserSource::Synthetic(s) => u64::from(s.n()),
        }
    }

    /// Whether there are no users.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// How many users have `lo <= id < hi`.
    pub fn count_in(&self, lo: u64, hi: u64) -> u64 {
        match self {
            UserSource::Table(t) => t.count_in(lo, hi),
            UserSource::Synthetic(s) => s.count_in(lo, hi),
        }
    }

    /// Calls `f` for every user with `lo <= id < hi`, in ascending id order, without
    /// allocating per user.
    pub fn for_each_in<F: FnMut(UserRef<'_>)>(&self, lo: u64, hi: u64, f: F) {
        match self {
            UserSource::Table(t) => t.for_each_in(lo, hi, f),
            UserSource::Synthetic(s) => s.for_each_in(lo, hi, f),
        }
    }

    /// User `id`'s push token; `None` if there is no such user or it has no token.
    pub fn token(&self, id: u32) -> Option<String> {
        match self {
            UserSource::Table(t) => t.token(id).map(str::to_owned),
            UserSource::Synthetic(s) => s.token(id),
        }
    }

    /// User `id`'s time zone; `None` if there is no such user or its input gave none (then
    /// the job's `default_tz` applies: [`Policy::zone`](crate::policy::Policy::zone)).
    /// Synthetic users have none.
    pub fn tz(&self, id: UserId) -> Option<chrono_tz::Tz> {
        match self {
            UserSource::Table(t) => t.tz(id),
            UserSource::Synthetic(_) => None,
        }
    }

    /// [`Self::tz`], where any user has a zone of their own; `None` where every user is in
    /// the job's `default_tz` (synthetic users, a file without zones), so that a caller
    /// decides once for all of them.
    pub fn zones(&self) -> Option<impl Fn(UserId) -> Option<chrono_tz::Tz> + '_> {
        match self {
            UserSource::Table(t) if t.zoned() => Some(move |id| t.tz(id)),
            _ => None,
        }
    }

    /// User `id` in full, its tags distinct and sorted by name.
    pub fn get(&self, id: u32) -> Option<User> {
        match self {
            UserSource::Table(t) => t.get(id),
            UserSource::Synthetic(s) => s.get(id),
        }
    }
}

/// `N` or `N:SEED`, the part of `spec` after `synthetic:`.
fn parse_synthetic(spec: &str, rest: &str) -> Result<Synthetic> {
    let usage = |what: &str| Error::Usage(format!("bad user source {spec:?}: {what}"));
    let (n, seed) = match rest.split_once(':') {
        Some((n, seed)) => (n, Some(seed)),
        None => (rest, None),
    };
    let n = n
        .parse::<u32>()
        .map_err(|_| usage("N must be a whole number 0..=4294967295 (synthetic:N[:SEED])"))?;
    let seed = match seed {
        None => 0,
        Some(s) => s
            .parse::<u64>()
            .map_err(|_| usage("SEED must be a whole number 0..=18446744073709551615"))?,
    };
    Ok(Synthetic::new(n, seed))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write as _;

    fn open(spec: &str) -> Result<(UserSource, LoadReport)> {
        UserSource::open(spec, &LoadOptions::default())
    }

    #[test]
    fn sources_are_shareable_between_workers() {
        fn shareable<T: Clone + Send + Sync + 'static>() {}
        shareable::<UserSource>();
    }

    #[test]
    fn synthetic_specs_parse() {
        let (s, r) = open("synthetic:1000").unwrap();
        assert_eq!((s.len(), r.users), (1000, 1000));
        assert_eq!(s.get(1), Some(synthetic::synthetic_user(0, 1)));
        let (s, _) = open("synthetic:10:77").unwrap();
        assert_eq!(s.get(10), Some(synthetic::synthetic_user(77, 10)));
        assert_eq!(s.token(10).as_deref(), Some("t-10"));
        assert_eq!(s.tags().len(), 8);
        for bad in [
            "synthetic:",
            "synthetic:x",
            "synthetic:-1",
            "synthetic:4294967296",
            "synthetic:10:",
            "synthetic:10:x",
            "synthetic:10:1:2",
        ] {
            let e = open(bad).unwrap_err();
            assert!(matches!(e, Error::Usage(_)), "{bad}: {e}");
            assert!(e.to_string().contains(bad), "{e}");
        }
    }

    #[test]
    fn unknown_specs_are_usage_errors() {
        for spec in ["users.txt", "users", "", "http://x/u.jsonl"] {
            let e = open(spec).unwrap_err();
            assert!(matches!(e, Error::Usage(_)), "{spec}: {e}");
            assert_eq!(e.exit_code(), 2);
        }
    }

    #[test]
    fn a_missing_file_is_bad_input_naming_it() {
        match open("/no/such/users.jsonl") {
            Err(Error::BadInput(e)) => {
                assert_eq!((e.file.as_str(), e.line), ("/no/such/users.jsonl", None));
                assert!(e
                    .to_string()
                    .starts_with("/no/such/users.jsonl: cannot open"));
            }
            other => panic!("expected bad input, got {other:?}"),
        }
    }

    #[test]
    fn every_bucket_of_a_file_source_yields_each_user_once() {
        let mut f = tempfile::Builder::new()
            .suffix(".jsonl")
            .tempfile()
            .unwrap();
        let ids = [4_294_967_295u32, 7, 1, 7, 123_456, 999, 1000, 1001];
        for id in ids {
            writeln!(f, r#"{{"id":{id},"level":1,"points":2,"tags":["a"]}}"#).unwrap();
        }
        f.flush().unwrap();
        let (src, report) = open(f.path().to_str().unwrap()).unwrap();
        assert_eq!((report.lines, report.users, src.len()), (8, 7, 7));
        let a = src.tags().get("a").unwrap();
        for size in [1, 10, 1000, 1 << 16] {
            let b = Buckets::new(size);
            let mut seen = Vec::new();
            for k in src.buckets(b) {
                let (lo, hi) = b.bucket_range(k);
                let before = seen.len();
                src.for_each_in(lo, hi, |u| {
                    assert_eq!(u.tags, [a]);
                    seen.push(u.id);
                });
                assert_eq!((seen.len() - before) as u64, src.count_in(lo, hi));
            }
            assert_eq!(
                seen,
                [1, 7, 999, 1000, 1001, 123_456, 4_294_967_295],
                "size {size}"
            );
        }
    }

    /// A file of `text` with extension `ext`.
    fn file(ext: &str, text: &str) -> tempfile::NamedTempFile {
        let mut f = tempfile::Builder::new().suffix(ext).tempfile().unwrap();
        f.write_all(text.as_bytes()).unwrap();
        f.flush().unwrap();
        f
    }

    #[test]
    fn zones_of_file_users_read_back_and_an_unknown_one_names_file_line_and_field() {
        use chrono_tz::Tz;
        let jsonl = file(
            ".jsonl",
            "{\"id\":2,\"level\":1,\"points\":1,\"tz\":\"Asia/Shanghai\"}\n\
             {\"id\":1,\"level\":1,\"points\":1}\n\
             {\"id\":3,\"level\":1,\"points\":1,\"tz\":\"America/New_York\",\"token\":\"t\"}\n",
        );
        let csv = file(
            ".csv",
            "id,level,points,tags,token,tz\n2,1,1,,,Asia/Shanghai\n1,1,1,,,\n\
             3,1,1,,t,America/New_York\n",
        );
        for f in [&jsonl, &csv] {
            let (src, _) = open(f.path().to_str().unwrap()).unwrap();
            assert_eq!(src.tz(1), None);
            assert_eq!(src.tz(2), Some(Tz::Asia__Shanghai));
            assert_eq!(src.tz(3), Some(Tz::America__New_York));
            assert_eq!(src.get(3).unwrap().tz, Some(Tz::America__New_York));
            assert_eq!(src.tz(4), None);
        }
        // A CSV file without the column: no user has a zone.
        let plain = file(".csv", "id,level,points\n1,1,1\n");
        assert_eq!(open(plain.path().to_str().unwrap()).unwrap().0.tz(1), None);
        // Synthetic users have none.
        assert_eq!(open("synthetic:10").unwrap().0.tz(3), None);

        let bad = file(
            ".jsonl",
            "{\"id\":1,\"level\":1,\"points\":1}\n\
             {\"id\":2,\"level\":1,\"points\":1,\"tz\":\"Asia/Shangai\"}\n\
             {\"id\":3,\"level\":1,\"points\":1}\n",
        );
        let path = bad.path().to_str().unwrap();
        match open(path) {
            Err(Error::BadInput(e)) => {
                assert_eq!(
                    (e.file.as_str(), e.line, e.field.as_str()),
                    (path, Some(2), "tz")
                );
                assert!(
                    e.msg.starts_with("unknown time zone \"Asia/Shangai\""),
                    "{e}"
                );
            }
            other => panic!("expected bad input, got {other:?}"),
        }
        let skip = LoadOptions {
            skip_bad_lines: true,
            ..LoadOptions::default()
        };
        let (src, report) = UserSource::open(path, &skip).unwrap();
        assert_eq!((report.skipped, src.len()), (1, 2));
        assert_eq!(report.first_errors[0].line, Some(2));
        assert_eq!(src.get(2), None);
    }
}
