//! A run's lease on the Redis store: its token, the heartbeat that extends it only while it
//! still holds that token, the fencing that follows once it does not, and the local clock the
//! dispatcher checks before every attempt (see the module docs of [`super`]).

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Weak;
use std::time::{Duration, Instant};

use redis::aio::ConnectionManager;
use redis::Script;

use super::conn::retrying;
use super::scripts::{FENCED, REFRESH, RELEASE};
use crate::error::{Error, Result};

/// Whether a script failed because the caller's lease no longer holds its token.
pub(super) fn is_fenced(e: &redis::RedisError) -> bool {
    e.code() == Some(FENCED) || e.to_string().contains("FENCED lease lost")
}

/// A run's lease on the store, shared by the store, its ledgers, the heartbeat and every
/// [`crate::store::Fence`].
#[derive(Debug)]
pub struct Lease {
    pub(super) url: String,
    pub(super) run: String,
    /// `fanout:run:{run}`.
    pub(super) key: String,
    pub(super) token: String,
    pub(super) duration: Duration,
    /// The origin of `refreshed_ns`.
    pub(super) base: Instant,
    /// When the last successful refresh (or the creation) was *sent*, in ns after `base`:
    /// the lease lasts at least `duration` from then. `Instant` keeps counting while the
    /// process is stopped, so a woken process sees the time it lost.
    pub(super) refreshed_ns: AtomicU64,
    /// Set once the server refused our token: every later call fails at once.
    pub(super) fenced: AtomicBool,
    /// Set by close/abandon: the heartbeat stops and a missing lease is no fault.
    pub(super) ended: AtomicBool,
    /// The next claim call's nonce.
    pub(super) nonce: AtomicU64,
}

impl Lease {
    pub(super) fn refreshed(&self, sent: Instant) {
        let ns = sent.saturating_duration_since(self.base).as_nanos();
        self.refreshed_ns
            .fetch_max(u64::try_from(ns).unwrap_or(u64::MAX), Ordering::AcqRel);
    }

    pub(super) fn fence(&self) {
        if !self.fenced.swap(true, Ordering::AcqRel) {
            tracing::error!(run = %self.run, "lease lost: gone from the store");
        }
    }

    pub(crate) fn is_fenced(&self) -> bool {
        self.fenced.load(Ordering::Acquire)
    }

    /// Err ("lease lost") once fenced.
    pub(super) fn check_fenced(&self) -> Result<()> {
        match self.is_fenced() {
            true => Err(self.lost()),
            false => Ok(()),
        }
    }

    /// The error of every call once fenced.
    pub(crate) fn lost(&self) -> Error {
        Error::runtime(format!(
            "store {}: lease lost: run {}'s lease ({} ms) is gone from the store (it expired \
             while this process or the store was stalled, or the store lost its data), so \
             another run may be taking its users over; stopping so that no user is sent twice",
            self.url,
            self.run,
            self.duration.as_millis()
        ))
    }

    /// Ok while this run may act: not fenced, and less than lease − lease/5 since the send
    /// time of the last successful refresh (past that, the lease may have expired on the
    /// server and another run may be adopting our users). It may pass again after a refresh.
    pub fn check(&self) -> Result<()> {
        self.check_fenced()?;
        let refreshed = Duration::from_nanos(self.refreshed_ns.load(Ordering::Acquire));
        let since = self.base.elapsed().saturating_sub(refreshed);
        let safe = self.duration - self.duration / 5;
        if since > safe {
            return Err(Error::runtime(format!(
                "store {}: run {}'s lease may have expired (no refresh for {} ms, lease {} ms); \
                 sending nothing more",
                self.url,
                self.run,
                since.as_millis(),
                self.duration.as_millis()
            )));
        }
        Ok(())
    }

    /// Runs `op` as [`retrying`] does, but fails at once when fenced, and fences (with the
    /// "lease lost" error) when a script answers that our lease is no longer ours.
    pub(super) async fn guarded<T, F, Fut>(&self, what: &str, mut op: F) -> Result<T>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = redis::RedisResult<T>>,
    {
        self.check_fenced()?;
        let out = retrying(&self.url, what, || {
            let call = op();
            async move {
                let r = call.await;
                if matches!(&r, Err(e) if is_fenced(e)) {
                    self.fence();
                }
                r
            }
        })
        .await;
        match out {
            Err(_) if self.is_fenced() => Err(self.lost()),
            other => other,
        }
    }

    /// Drops the lease if it still holds our token (the end of a run, clean or not).
    /// Drops the lease if it still holds our token; returns whether it did (`false`: the lease
    /// was gone — expired, taken over, or lost with the server's data).
    pub(super) async fn release(&self, con: &ConnectionManager) -> Result<bool> {
        self.ended.store(true, Ordering::Release);
        let script = Script::new(RELEASE);
        let released = retrying(&self.url, "DEL run lease", || {
            let mut con = con.clone();
            let mut call = script.prepare_invoke();
            call.key(&self.key).arg(&self.token);
            async move { call.invoke_async::<i64>(&mut con).await }
        })
        .await?;
        Ok(released == 1)
    }
}

/// Refreshes the lease every lease/5 while it lives (see [`Lease`]); stops once the lease
/// ends, is dropped, or is found lost (then the store is fenced).
pub(super) fn spawn_heartbeat(con: ConnectionManager, lease: Weak<Lease>, period: Duration) {
    tokio::spawn(async move {
        let script = Script::new(REFRESH);
        let mut con = con;
        loop {
            tokio::time::sleep(period).await;
            let Some(lease) = lease.upgrade() else { return };
            if lease.ended.load(Ordering::Acquire) || lease.is_fenced() {
                return;
            }
            let sent = Instant::now();
            let mut call = script.prepare_invoke();
            call.key(&lease.key)
                .arg(&lease.token)
                .arg(lease.duration.as_millis() as u64);
            // Bounded by the lease: a refresh answered later is worth nothing more.
            match tokio::time::timeout(lease.duration, call.invoke_async::<i64>(&mut con)).await {
                Ok(Ok(1)) => lease.refreshed(sent),
                Ok(Ok(_)) => {
                    if !lease.ended.load(Ordering::Acquire) {
                        lease.fence();
                    }
                    return;
                }
                Ok(Err(e)) => tracing::warn!(error = %e, "cannot refresh the run's lease in redis"),
                Err(_) => tracing::warn!("refreshing the run's lease in redis timed out"),
            }
        }
    });
}
