//! Connections to a Redis server, shared by the store, the Redis user source and the
//! streams: the client (password, TLS), a reconnecting connection manager, and the retry loop
//! every call goes through while the server restarts.

use std::future::Future;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::IntoConnectionInfo;

use crate::error::{Error, Result};

/// How long a call keeps retrying an unreachable server before the run gives up, unless
/// [`RETRY_ENV`] says otherwise.
pub const RETRY_BUDGET: Duration = Duration::from_secs(30);

/// The environment variable that sets the retry budget (humantime: `30s`, `2m`).
pub const RETRY_ENV: &str = "FANOUT_REDIS_RETRY";

/// A duration from environment variable `name` (`value` is its value, `None` when unset):
/// humantime (`800ms`, `5s`), more than zero; `default` when unset or empty. A bad value is a
/// usage error naming the variable.
pub fn env_duration(name: &str, value: Option<&str>, default: Duration) -> Result<Duration> {
    let Some(text) = value.map(str::trim).filter(|v| !v.is_empty()) else {
        return Ok(default);
    };
    match humantime::parse_duration(text) {
        Ok(d) if !d.is_zero() => Ok(d),
        Ok(_) => Err(Error::Usage(format!(
            "{name}={text}: must be more than zero"
        ))),
        Err(e) => Err(Error::Usage(format!(
            "{name}={text}: not a duration like 800ms or 30s: {e}"
        ))),
    }
}

/// The retry budget: [`RETRY_ENV`], else [`RETRY_BUDGET`].
pub fn retry_budget() -> Result<Duration> {
    let value = std::env::var(RETRY_ENV).ok();
    env_duration(RETRY_ENV, value.as_deref(), RETRY_BUDGET)
}

/// A URL fit to print: without its password.
pub fn shown(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            format!("{}://…@{}", &url[..scheme], &url[at + 1..])
        }
        _ => url.to_owned(),
    }
}

/// The environment variable naming a PEM file of CA certificates that `rediss://` servers are
/// verified against instead of the system's roots (for a self-signed or private CA).
pub const CA_ENV: &str = "FANOUT_REDIS_CA";

/// Retries `op` with backoff while it fails, for up to the retry budget ([`retry_budget`]).
pub(crate) async fn retrying<T, F, Fut>(url: &str, what: &str, op: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = redis::RedisResult<T>>,
{
    retrying_as("store", url, what, op).await
}

/// [`retrying`] for any use of a Redis server: errors read `{role} {url}: {what} failed…`
/// (`url` as [`shown`]: no password).
pub(crate) async fn retrying_as<T, F, Fut>(
    role: &str,
    url: &str,
    what: &str,
    mut op: F,
) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = redis::RedisResult<T>>,
{
    let started = Instant::now();
    let mut wait = Duration::from_millis(50);
    // Read on the first failure only: the happy path stays free of environment lookups, and
    // [`connect`] has already refused a bad value.
    let mut budget = None;
    loop {
        match op().await {
            Ok(v) => return Ok(v),
            Err(e)
                if retryable(&e)
                    && started.elapsed()
                        < *budget.get_or_insert_with(|| retry_budget().unwrap_or(RETRY_BUDGET)) =>
            {
                if let Some(also) = RETRY_WARNINGS.admit(Instant::now()) {
                    tracing::warn!(
                        role, url, error = %e, also_retrying = also,
                        "redis {what} failed; retrying"
                    );
                }
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(2));
            }
            Err(e) => {
                let budget = match retryable(&e) {
                    true => match budget.unwrap_or(RETRY_BUDGET) {
                        b if b.subsec_millis() == 0 => format!(" for {} s", b.as_secs()),
                        b => format!(" for {} ms", b.as_millis()),
                    },
                    false => String::new(),
                };
                return Err(Error::runtime(format!(
                    "{role} {url}: {what} failed{budget}: {e}"
                )));
            }
        }
    }
}

/// The retry warning is written at most once a [`Throttle::EVERY`] in the whole process: an
/// outage under a few hundred claim and mark tasks would otherwise write a line per task per
/// backoff step (hundreds a second, enough to fill a stderr pipe nobody reads at once).
static RETRY_WARNINGS: Throttle = Throttle::new();

/// Admits one event a period and counts those it held back meanwhile.
struct Throttle {
    /// The next time an event is admitted (`None`: at once), and the events held back since
    /// the last one admitted.
    state: Mutex<(Option<Instant>, u64)>,
}

impl Throttle {
    const EVERY: Duration = Duration::from_secs(1);

    const fn new() -> Self {
        Throttle {
            state: Mutex::new((None, 0)),
        }
    }

    /// Whether an event at `now` is shown: `Some(n)` with the `n` events held back since the
    /// last one shown, or `None` (counted among them).
    fn admit(&self, now: Instant) -> Option<u64> {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let (next, held) = &mut *state;
        if next.is_some_and(|at| now < at) {
            *held += 1;
            return None;
        }
        *next = Some(now + Self::EVERY);
        Some(std::mem::take(held))
    }
}

/// A client for `url`: the password from `FANOUT_REDIS_PASSWORD` when the URL has none; TLS
/// for `rediss://`, verified against [`CA_ENV`]'s certificates when it is set, else the
/// system's roots. Errors are usage errors (exit 2) naming the URL as [`shown`].
pub fn client(url: &str) -> Result<redis::Client> {
    let show = shown(url);
    let bad_url = |e: redis::RedisError| Error::Usage(format!("redis URL {show}: {e}"));
    let mut info = url.into_connection_info().map_err(bad_url)?;
    if let (None, Ok(pw)) = (
        info.redis_settings().password(),
        std::env::var("FANOUT_REDIS_PASSWORD"),
    ) {
        let settings = info.redis_settings().clone().set_password(pw);
        info = info.set_redis_settings(settings);
    }
    let ca = std::env::var_os(CA_ENV).filter(|v| !v.is_empty());
    match ca {
        Some(path) if url.starts_with("rediss://") => {
            let path = std::path::PathBuf::from(path);
            let pem = std::fs::read(&path).map_err(|e| {
                Error::Usage(format!("{CA_ENV}={}: cannot read: {e}", path.display()))
            })?;
            if !String::from_utf8_lossy(&pem).contains("-----BEGIN CERTIFICATE-----") {
                return Err(Error::Usage(format!(
                    "{CA_ENV}={}: no PEM certificate in it",
                    path.display()
                )));
            }
            let certs = redis::TlsCertificates {
                client_tls: None,
                root_cert: Some(pem),
            };
            redis::Client::build_with_tls(info, certs)
                .map_err(|e| Error::Usage(format!("{CA_ENV}={}: {e}", path.display())))
        }
        _ => redis::Client::open(info).map_err(bad_url),
    }
}

/// Whether a failed call may succeed if tried again: the server restarting or unreachable,
/// loading its data, or refusing writes because it cannot persist them (`MISCONF`: its
/// append-only file's disk is full; it takes writes again on its own once a write succeeds,
/// and a refused script wrote nothing, as the refusal comes at its first write).
fn retryable(e: &redis::RedisError) -> bool {
    (e.is_io_error() && !refused_certificate(e))
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || e.is_timeout()
        || matches!(
            e.kind(),
            redis::ErrorKind::Server(redis::ServerErrorKind::BusyLoading)
        )
        || e.code() == Some("MISCONF")
}

/// Every key matching `pattern` (SCAN, so the server never blocks on it).
pub(super) async fn scan(con: &ConnectionManager, url: &str, pattern: &str) -> Result<Vec<String>> {
    retrying(url, "SCAN in-flight sets", || {
        let mut con = con.clone();
        async move {
            let mut found = Vec::new();
            let mut cursor = 0u64;
            loop {
                let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
                    .arg(cursor)
                    .arg("MATCH")
                    .arg(pattern)
                    .arg("COUNT")
                    .arg(1000)
                    .query_async(&mut con)
                    .await?;
                found.extend(batch);
                if next == 0 {
                    return Ok(found);
                }
                cursor = next;
            }
        }
    })
    .await
}

/// A connection manager for `url` (see [`client`]), retried for a while if the server is
/// not up yet; `role` names the use in errors (see [`retrying_as`]). It reconnects by itself
/// later.
pub async fn connect(role: &str, url: &str) -> Result<ConnectionManager> {
    // A bad budget is refused before anything is tried (exit 2).
    retry_budget()?;
    let show = shown(url);
    let client = client(url)?;
    let config = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(2)))
        .set_response_timeout(Some(Duration::from_secs(10)))
        .set_number_of_retries(2)
        .set_max_delay(Duration::from_secs(1));
    retrying_as(role, &show, "connect", || {
        client.get_connection_manager_with_config(config.clone())
    })
    .await
}

/// Whether `e` is a TLS handshake that failed on the certificate (an unknown issuer, a wrong
/// name): no retry fixes that.
fn refused_certificate(e: &redis::RedisError) -> bool {
    let text = e.to_string();
    text.contains("certificate") || text.contains("Certificate")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One event a period is shown, carrying how many were held back since the last.
    #[test]
    fn the_throttle_shows_one_event_a_period_and_counts_the_rest() {
        let t = Throttle::new();
        let t0 = Instant::now();
        let at = |ms| t0 + Duration::from_millis(ms);
        assert_eq!(t.admit(at(0)), Some(0));
        assert_eq!(t.admit(at(10)), None);
        assert_eq!(t.admit(at(999)), None);
        assert_eq!(t.admit(at(1000)), Some(2));
        assert_eq!(t.admit(at(1500)), None);
        assert_eq!(t.admit(at(5000)), Some(1));
        assert_eq!(t.admit(at(5001)), None);
    }
}
