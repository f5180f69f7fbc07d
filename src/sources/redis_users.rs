//! Users on a Redis server (`redis://[user:pass@]host:port/db`), as SPEC's Redis layout has
//! them:
//!
//! ```text
//! fanout:users:max_id   string: the highest user id
//! fanout:user:{id}      hash: level, points, tags (`;`-joined), token, tz (an IANA zone name)
//! ```
//!
//! [`load`] reads ids `1..=max_id` bucket by bucket, one pipeline of `HGETALL`s per bucket
//! (a few pipelines in flight), into the same id-ordered [`UserTable`] a file loads into, so
//! the rest of the engine cannot tell the difference. A missing hash is no user. Only the
//! buckets the caller asks for are fetched: a process of a cluster loads its own share.
//! [`write`] is the other direction, for `fanout gen users --out redis://…`.
//!
//! Every call retries while the server is unreachable, for [`RETRY_BUDGET`](crate::store::redis::RETRY_BUDGET), then fails
//! (exit 1). The password (URL or `FANOUT_REDIS_PASSWORD`) is never printed.

use std::future::Future;
use std::time::Instant;

use futures::{stream, StreamExt, TryStreamExt};
use redis::aio::ConnectionManager;
use redis::{Pipeline, Value};

use super::record::{check_level, check_points, check_tz, shorten, Bad, LEVEL, POINTS};
use super::table::{TableBuilder, UserTable};
use super::{LoadOptions, LoadReport};
use crate::error::{Error, InputError, Result};
use crate::model::{Buckets, User};
use crate::store::redis::{connect, retrying_as, shown};

/// The key holding the highest user id.
pub const MAX_ID_KEY: &str = "fanout:users:max_id";
/// Ids per pipeline at most: a bucket larger than this is fetched in several.
const MAX_PIPELINE: u64 = 16_384;
/// Pipelines in flight at once on the one connection.
const IN_FLIGHT: usize = 4;
/// Users per pipeline when writing.
const WRITE_CHUNK: u32 = 1000;

/// The key of user `id`'s hash.
pub fn user_key(id: u32) -> String {
    format!("fanout:user:{id}")
}

/// Whether `spec` names a Redis server.
pub fn is_redis(spec: &str) -> bool {
    spec.starts_with("redis://") || spec.starts_with("rediss://")
}

/// Loads the users of every bucket (of `opts.bucket_size` ids) that `keep` accepts from the
/// server at `url`. Bad fields stop the load with the key and field named (exit 2), or with
/// `opts.skip_bad_lines` are skipped and counted like bad lines.
pub fn load(
    url: &str,
    opts: &LoadOptions,
    keep: &(dyn Fn(u32) -> bool + Sync),
) -> Result<(UserTable, LoadReport)> {
    on_own_runtime(|| load_async(url, opts, keep))
}

/// Writes `users` (in chunks of pipelined `HSET`s, every field each time so nothing of an
/// earlier user stays) and sets `fanout:users:max_id` to `max_id`. Returns how many users.
pub fn write(url: &str, max_id: u32, users: impl Iterator<Item = User> + Send) -> Result<u64> {
    on_own_runtime(|| write_async(url, max_id, users))
}

/// Runs `make()`'s future on a runtime of its own, on a thread of its own, so a caller may be
/// inside a tokio runtime or not.
fn on_own_runtime<T, F, Fut>(make: F) -> Result<T>
where
    T: Send,
    F: FnOnce() -> Fut + Send,
    Fut: Future<Output = Result<T>>,
{
    std::thread::scope(|s| {
        s.spawn(|| {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| Error::runtime(format!("cannot start tokio: {e}")))?;
            runtime.block_on(make())
        })
        .join()
        .map_err(|_| Error::runtime("the Redis users thread panicked"))?
    })
}

/// Retries `op` while the server is unreachable (see the store's `retrying_as`).
async fn retrying<T, F, Fut>(url: &str, what: &str, op: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = redis::RedisResult<T>>,
{
    retrying_as("users", &shown(url), what, op).await
}

/// Sends `pipe` (its per-command errors come back as [`Value::ServerError`]), retrying.
async fn query(
    url: &str,
    what: &str,
    con: &ConnectionManager,
    pipe: &Pipeline,
) -> Result<Vec<Value>> {
    retrying(url, what, || {
        let mut con = con.clone();
        async move { pipe.query_async::<Vec<Value>>(&mut con).await }
    })
    .await
}

/// A bad value of the users on Redis: `URL: KEY field FIELD: what was expected`.
fn bad_at(url: &str, key: &str, bad: Bad) -> InputError {
    let at = if bad.field.is_empty() {
        key.to_owned()
    } else {
        format!("{key} field {}", bad.field)
    };
    InputError::new(shown(url), None, at, bad.msg)
}

async fn load_async(
    url: &str,
    opts: &LoadOptions,
    keep: &(dyn Fn(u32) -> bool + Sync),
) -> Result<(UserTable, LoadReport)> {
    let started = Instant::now();
    let con = connect("users", url).await?;
    let max_id = read_max_id(url, &con).await?;
    let buckets = Buckets::new(opts.bucket_size);
    let last_bucket = buckets.bucket_of(max_id);
    // Each kept bucket's ids within 1..=max_id, cut into pipelines of at most MAX_PIPELINE.
    let pieces = (0..=last_bucket)
        .filter(|&b| max_id > 0 && keep(b))
        .flat_map(move |b| {
            let (lo, hi) = buckets.bucket_range(b);
            let (lo, hi) = (lo.max(1), hi.min(u64::from(max_id) + 1));
            (lo..hi)
                .step_by(MAX_PIPELINE as usize)
                .map(move |start| (start, (start + MAX_PIPELINE).min(hi)))
        });
    let mut replies = stream::iter(pieces)
        .map(|(lo, hi)| {
            let con = &con;
            async move {
                let mut pipe = redis::pipe();
                pipe.ignore_errors();
                for id in lo..hi {
                    pipe.cmd("HGETALL").arg(user_key(id as u32));
                }
                let values = query(url, "HGETALL", con, &pipe).await?;
                Ok::<_, Error>((lo..hi, values))
            }
        })
        .buffered(IN_FLIGHT);

    let mut table = TableBuilder::default();
    let mut report = LoadReport::default();
    while let Some((ids, values)) = replies.try_next().await? {
        for (value, id) in values.into_iter().zip(ids) {
            let id = id as u32; // at most max_id
            let Some(fields) = hash_fields(&value).transpose() else {
                continue; // no such user
            };
            report.lines += 1;
            match fields.and_then(|f| parse_user(id, &f)) {
                Ok(user) => table.push(&user)?,
                Err(bad) => {
                    let e = bad_at(url, &user_key(id), bad);
                    if !opts.skip_bad_lines {
                        return Err(e.into());
                    }
                    report.skip(e);
                }
            }
        }
    }
    let table = table.finish();
    report.users = table.len() as u64;
    let secs = started.elapsed().as_secs_f64();
    tracing::info!(
        users = report.users,
        skipped = report.skipped,
        "loaded users from {} in {secs:.2} s ({:.0} users/s)",
        shown(url),
        report.users as f64 / secs.max(1e-9)
    );
    Ok((table, report))
}

/// `fanout:users:max_id`, which must be set.
async fn read_max_id(url: &str, con: &ConnectionManager) -> Result<u32> {
    let mut pipe = redis::pipe();
    pipe.ignore_errors().cmd("GET").arg(MAX_ID_KEY);
    let value = query(url, "GET", con, &pipe).await?.pop();
    let bad = |msg: String| -> Error { bad_at(url, MAX_ID_KEY, Bad::line(msg)).into() };
    let text = match value {
        None | Some(Value::Nil) => {
            return Err(bad(
                "missing: set it to the highest user id (`fanout gen users --out redis://…` \
                 writes it)"
                    .to_owned(),
            ))
        }
        Some(Value::BulkString(b)) => String::from_utf8_lossy(&b).into_owned(),
        Some(Value::SimpleString(s)) => s,
        Some(Value::Int(n)) => n.to_string(),
        Some(Value::ServerError(e)) => return Err(bad(format!("cannot read: {e}"))),
        Some(other) => return Err(bad(format!("expected a string, got {other:?}"))),
    };
    text.trim().parse::<u32>().map_err(|_| {
        bad(format!(
            "expected an integer 0..=4294967295, got {:?}",
            shorten(&text)
        ))
    })
}

/// The fields fanout reads of one user's hash, borrowed from the reply.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Fields<'a> {
    level: Option<&'a [u8]>,
    points: Option<&'a [u8]>,
    tags: Option<&'a [u8]>,
    token: Option<&'a [u8]>,
    tz: Option<&'a [u8]>,
}

impl<'a> Fields<'a> {
    /// Takes field `k` if fanout knows it; a later one wins.
    fn put(&mut self, k: &[u8], v: &'a [u8]) {
        match k {
            b"level" => self.level = Some(v),
            b"points" => self.points = Some(v),
            b"tags" => self.tags = Some(v),
            b"token" => self.token = Some(v),
            b"tz" => self.tz = Some(v),
            _ => {}
        }
    }
}

/// The fields of an `HGETALL` reply (either protocol); `Ok(None)` for a missing hash. Fields
/// fanout does not know are ignored.
fn hash_fields(value: &Value) -> Result<Option<Fields<'_>>, Bad> {
    fn bytes(v: &Value) -> Result<&[u8], Bad> {
        match v {
            Value::BulkString(b) => Ok(b),
            Value::SimpleString(s) => Ok(s.as_bytes()),
            other => Err(Bad::line(format!("unexpected reply {other:?}"))),
        }
    }
    let mut f = Fields::default();
    let empty = match value {
        Value::Nil => true,
        Value::Map(pairs) => {
            for (k, v) in pairs {
                f.put(bytes(k)?, bytes(v)?);
            }
            pairs.is_empty()
        }
        Value::Array(flat) => {
            for kv in flat.chunks_exact(2) {
                f.put(bytes(&kv[0])?, bytes(&kv[1])?);
            }
            flat.is_empty()
        }
        Value::ServerError(e) => return Err(Bad::line(format!("cannot read as a hash: {e}"))),
        other => return Err(Bad::line(format!("unexpected reply {other:?}"))),
    };
    Ok((!empty).then_some(f))
}

/// User `id` from its hash's fields.
fn parse_user(id: u32, f: &Fields<'_>) -> Result<User, Bad> {
    fn text<'a>(name: &str, v: Option<&'a [u8]>) -> Result<Option<&'a str>, Bad> {
        v.map(|b| std::str::from_utf8(b).map_err(|_| Bad::field(name, "not valid UTF-8")))
            .transpose()
    }
    fn number<'a>(
        name: &str,
        expected: &str,
        v: Option<&'a [u8]>,
    ) -> Result<(Option<u64>, &'a str), Bad> {
        let t = text(name, v)?.ok_or_else(|| Bad::missing(name, expected))?;
        Ok((t.trim().parse::<u64>().ok(), t))
    }
    let got = |t: &str| format!("{:?}", shorten(t));
    let (level, t) = number("level", LEVEL, f.level)?;
    let level = check_level(level, || got(t))?;
    let (points, t) = number("points", POINTS, f.points)?;
    let points = check_points(points, || got(t))?;
    let tags = text("tags", f.tags)?
        .map(|t| {
            t.split(';')
                .map(str::trim)
                .filter(|t| !t.is_empty())
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default();
    let token = text("token", f.token)?
        .filter(|t| !t.is_empty())
        .map(str::to_owned);
    let tz = match text("tz", f.tz)? {
        Some(name) => check_tz(name)?,
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
}

async fn write_async(
    url: &str,
    max_id: u32,
    users: impl Iterator<Item = User> + Send,
) -> Result<u64> {
    let con = connect("users", url).await?;
    let mut users = users.peekable();
    let chunks = std::iter::from_fn(|| {
        users.peek()?;
        let mut pipe = redis::pipe();
        let mut n = 0u64;
        for u in users.by_ref().take(WRITE_CHUNK as usize) {
            pipe.cmd("HSET")
                .arg(user_key(u.id))
                .arg("level")
                .arg(u.level)
                .arg("points")
                .arg(u.points)
                .arg("tags")
                .arg(u.tags.join(";"))
                .arg("token")
                .arg(u.token.as_deref().unwrap_or(""))
                .arg("tz")
                .arg(u.tz.map_or("", |z| z.name()))
                .ignore();
            n += 1;
        }
        Some((pipe, n))
    });
    let written = stream::iter(chunks)
        .map(|(pipe, n)| {
            let con = &con;
            async move {
                retrying(url, "HSET", || {
                    let mut con = con.clone();
                    let pipe = &pipe;
                    async move { pipe.query_async::<()>(&mut con).await }
                })
                .await?;
                Ok::<u64, Error>(n)
            }
        })
        .buffered(IN_FLIGHT)
        .try_fold(0u64, |sum, n| async move { Ok(sum + n) })
        .await?;
    let mut pipe = redis::pipe();
    pipe.cmd("SET").arg(MAX_ID_KEY).arg(max_id).ignore();
    retrying(url, "SET", || {
        let mut con = con.clone();
        let pipe = &pipe;
        async move { pipe.query_async::<()>(&mut con).await }
    })
    .await?;
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An `HGETALL` reply (RESP2: a flat array) of these fields.
    fn reply(kv: &[(&str, &[u8])]) -> Value {
        let b = |s: &[u8]| Value::BulkString(s.to_vec());
        Value::Array(
            kv.iter()
                .flat_map(|(k, v)| [b(k.as_bytes()), b(v)])
                .collect(),
        )
    }

    fn parse(id: u32, kv: &[(&str, &[u8])]) -> Result<User, Bad> {
        let value = reply(kv);
        parse_user(id, &hash_fields(&value)?.expect("not empty"))
    }

    #[test]
    fn a_full_hash_parses() {
        let u = parse(
            7,
            &[
                ("level", b"3"),
                ("points", b" 1200 "),
                ("tags", b"sports; mom;;"),
                ("token", b"t-7"),
                ("tz", b"Asia/Shanghai"),
                ("other", b"ignored"),
                ("level", b"3"),
            ],
        )
        .unwrap();
        assert_eq!(
            u,
            User {
                id: 7,
                level: 3,
                points: 1200,
                tags: vec!["sports".into(), "mom".into()],
                token: Some("t-7".into()),
                tz: Some(chrono_tz::Tz::Asia__Shanghai),
            }
        );
        let bare = parse(
            8,
            &[
                ("level", b"0"),
                ("points", b"0"),
                ("token", b""),
                ("tz", b""),
            ],
        )
        .unwrap();
        assert_eq!((bare.token, bare.tz), (None, None));
    }

    #[test]
    fn bad_fields_name_the_field() {
        for (kv, field, msg) in [
            (
                vec![("level", &b"300"[..]), ("points", &b"1"[..])],
                "level",
                "expected an integer 0..=255, got \"300\"",
            ),
            (
                vec![("level", &b"x"[..]), ("points", &b"1"[..])],
                "level",
                "expected an integer 0..=255, got \"x\"",
            ),
            (
                vec![("level", &b"1"[..])],
                "points",
                "missing; expected a non-negative integer (at most 18446744073709551615)",
            ),
            (
                vec![("level", &b"1"[..]), ("points", &b"-1"[..])],
                "points",
                "expected a non-negative integer (at most 18446744073709551615), got \"-1\"",
            ),
            (
                vec![
                    ("level", &b"1"[..]),
                    ("points", &b"1"[..]),
                    ("token", &b"\xff"[..]),
                ],
                "token",
                "not valid UTF-8",
            ),
            (
                vec![
                    ("level", &b"1"[..]),
                    ("points", &b"1"[..]),
                    ("tz", &b"Mars/Base"[..]),
                ],
                "tz",
                "unknown time zone \"Mars/Base\": expected an IANA zone name like \"Asia/Shanghai\" or \"UTC\"",
            ),
            (
                vec![
                    ("level", &b"1"[..]),
                    ("points", &b"1"[..]),
                    ("tz", &b"\xff"[..]),
                ],
                "tz",
                "not valid UTF-8",
            ),
        ] {
            let bad = parse(42, &kv).unwrap_err();
            assert_eq!((bad.field.as_str(), bad.msg.as_str()), (field, msg));
        }
        let e = bad_at(
            "redis://u:secret@h:1/0",
            &user_key(42),
            Bad::field("level", "x"),
        );
        assert_eq!(
            e.to_string(),
            "redis://…@h:1/0: fanout:user:42 field level: x"
        );
    }

    #[test]
    fn replies_in_both_protocols_read_as_fields() {
        let b = |s: &str| Value::BulkString(s.as_bytes().to_vec());
        let flat = Value::Array(vec![
            b("level"),
            b("1"),
            b("x"),
            b("y"),
            b("points"),
            b("2"),
        ]);
        let map = Value::Map(vec![(b("level"), b("1")), (b("points"), b("2"))]);
        let want = Some(Fields {
            level: Some(b"1"),
            points: Some(b"2"),
            ..Fields::default()
        });
        assert_eq!(hash_fields(&flat).unwrap(), want);
        assert_eq!(hash_fields(&map).unwrap(), want);
        assert_eq!(hash_fields(&Value::Array(vec![])).unwrap(), None);
        assert_eq!(hash_fields(&Value::Nil).unwrap(), None);
        let wrong = hash_fields(&Value::Array(vec![Value::Int(1), b("1")])).unwrap_err();
        assert!(wrong.msg.starts_with("unexpected reply"), "{}", wrong.msg);
    }
}
