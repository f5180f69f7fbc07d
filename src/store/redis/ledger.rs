//! One campaign's ledger on Redis: claims, marks and counts, each one script call per batch
//! and chunk (the layout and the protocol: [`super`]).

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

use redis::aio::ConnectionManager;
use roaring::RoaringBitmap;

use super::*;

/// One ledger on Redis.
#[derive(Debug)]
pub struct RedisLedger {
    pub(super) url: String,
    pub(super) con: ConnectionManager,
    pub(super) granted: String,
    pub(super) dead: String,
    pub(super) unreachable: String,
    pub(super) held_out: String,
    pub(super) quiet: String,
    pub(super) capped: String,
    pub(super) cancelled: String,
    /// `fanout:inflight:{ledger}:`: every run's in-flight bitmaps of this ledger start so.
    pub(super) inflight_all: String,
    /// `fanout:inflight:{ledger}:{run}:`, ours.
    pub(super) inflight: String,
    /// `fanout:resend:{ledger}:{run}:`, ours.
    pub(super) resend: String,
    pub(super) read_only: bool,
    /// `None` when read-only.
    pub(super) lease: Option<Arc<Lease>>,
    /// The chunks this process claimed or marked in, to compact at the end of the run.
    pub(super) chunks: Mutex<BTreeSet<u32>>,
    /// The history strings (`id / HISTORY_USERS`) this process's capped claims wrote, likewise.
    pub(super) histories: Mutex<BTreeSet<u32>>,
}

impl RedisLedger {
    fn refuse_read_only(&self) -> Result<()> {
        match self.read_only {
            true => Err(Error::runtime(format!(
                "store {} is open read-only",
                self.url
            ))),
            false => Ok(()),
        }
    }

    /// Notes the chunks of `ids` as touched by this process.
    pub(super) fn touch(&self, ids: &[u32]) {
        let mut chunks = self.chunks.lock().unwrap_or_else(PoisonError::into_inner);
        chunks.extend(ids.iter().map(|id| id >> CHUNK_BITS));
    }

    /// Rewrites the bitmaps of the chunks this process touched at their exact size: Redis
    /// grows a string it extends by up to 1 MiB ahead, so a 10M-user bitmap built batch by
    /// batch holds ~1.8 MiB for its 1.25 MB of bits.
    pub(super) async fn compact(&self) -> Result<()> {
        let chunks: Vec<u32> = self
            .chunks
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .copied()
            .collect();
        let script = Script::new(COMPACT);
        for chunk in chunks {
            let keys = [
                &self.granted,
                &self.dead,
                &self.unreachable,
                &self.held_out,
                &self.quiet,
                &self.capped,
                &self.cancelled,
            ]
            .map(|set| format!("{set}{chunk}"));
            retrying(&self.url, "compact the ledger", || {
                let mut con = self.con.clone();
                let mut call = script.prepare_invoke();
                for k in &keys {
                    call.key(k);
                }
                async move { call.invoke_async::<i64>(&mut con).await }
            })
            .await?;
        }
        Ok(())
    }

    /// The lease claims and marks act under (a read-only ledger has none).
    pub(super) fn lease(&self) -> Result<&Lease> {
        self.refuse_read_only()?;
        self.lease
            .as_deref()
            .ok_or_else(|| Error::runtime(format!("store {} holds no lease", self.url)))
    }

    /// The atomic claim; see [`super::Ledger::claim`].
    pub async fn claim(&self, ids: &[u32]) -> Result<Claim> {
        self.claim_into(ids, None).await
    }

    /// The claim settled at once as held out; see [`super::Ledger::claim_held_out`].
    pub async fn claim_held_out(&self, ids: &[u32]) -> Result<Claim> {
        self.claim_into(ids, Some(&self.held_out)).await
    }

    /// The claim settled at once as cancelled; see [`super::Ledger::claim_cancelled`].
    pub async fn claim_cancelled(&self, ids: &[u32]) -> Result<Claim> {
        self.claim_into(ids, Some(&self.cancelled)).await
    }

    async fn claim_into(&self, ids: &[u32], settle: Option<&str>) -> Result<Claim> {
        let lease = self.lease()?;
        let nonces: Vec<u64> = by_chunk(ids)
            .iter()
            .map(|_| lease.nonce.fetch_add(1, Ordering::Relaxed))
            .collect();
        self.claim_with(ids, &nonces, settle).await
    }

    /// [`RedisLedger::claim`] with the nonce of each chunk's call given: a call repeated with
    /// the same nonce (a retry whose reply was lost) gets the first call's answer. With
    /// `settle` (an outcome bitmap's prefix) the claimed ids are settled there at once instead
    /// of joining the in-flight bitmap.
    pub(super) async fn claim_with(
        &self,
        ids: &[u32],
        nonces: &[u64],
        settle: Option<&str>,
    ) -> Result<Claim> {
        let lease = self.lease()?;
        self.touch(ids);
        let groups: Vec<(u32, Vec<u32>, Segments, String)> = by_chunk(ids)
            .into_iter()
            .zip(nonces)
            .map(|((chunk, offsets), nonce)| {
                let segments = Segments::new(&offsets);
                let reply = format!("fanout:reply:{}:{nonce}", lease.run);
                (chunk, offsets, segments, reply)
            })
            .collect();
        // One script call per chunk (a batch of ids is almost always one chunk); invoking a
        // script loads it on the server when missing. A retry repeats every call with the
        // same nonces, so the calls that had run answer as they did.
        let replies: Vec<Vec<u8>> = lease
            .guarded("claim", || {
                let mut con = self.con.clone();
                let groups = &groups;
                async move {
                    let mut replies = Vec::with_capacity(groups.len());
                    for (chunk, _, segments, reply) in groups {
                        let mut call = CLAIM_SCRIPT.prepare_invoke();
                        call.key(format!("{}{chunk}", self.granted))
                            .key(format!("{}{chunk}", self.inflight))
                            .key(format!("{}{chunk}", self.resend))
                            .key(&lease.key)
                            .key(reply)
                            .key(settle.map_or_else(String::new, |p| format!("{p}{chunk}")))
                            .arg(&lease.token)
                            .arg(REPLY_TTL_MS);
                        segments.args(&mut call);
                        replies.push(call.invoke_async(&mut con).await?);
                    }
                    Ok(replies)
                }
            })
            .await?;
        let mut claimed = Vec::with_capacity(ids.len());
        for ((_, offsets, segments, _), reply) in groups.iter().zip(&replies) {
            claimed.extend(self.answered("claim", segments, offsets, reply)?);
        }
        let mut out = Claim::default();
        for (&id, yes) in ids.iter().zip(claimed) {
            if yes {
                out.claimed.push(id);
            } else {
                out.already.push(id);
            }
        }
        Ok(out)
    }

    /// Per offset, whether a script's reply (a byte mask per segment) set its bit; an error if
    /// the reply does not fit the segments.
    fn answered(
        &self,
        script: &str,
        segments: &Segments,
        offsets: &[u32],
        reply: &[u8],
    ) -> Result<Vec<bool>> {
        segments.claimed(offsets, reply).ok_or_else(|| {
            Error::runtime(format!(
                "store {}: the {script} script answered {} bytes for {} segments",
                self.url,
                reply.len(),
                segments.len()
            ))
        })
    }

    /// See [`super::Ledger::unclaim`].
    pub async fn unclaim(&self, ids: &[u32]) -> Result<()> {
        self.per_chunk::<i64>("hand out again", &UNCLAIM_SCRIPT, ids, |chunk| {
            vec![
                format!("{}{chunk}", self.inflight),
                format!("{}{chunk}", self.resend),
            ]
        })
        .await
        .map(drop)
    }

    /// Runs `script` under the run's lease once per chunk of `ids` (none for no ids): its keys
    /// `keys(chunk)` and then the lease key, its arguments the lease token and the chunk's
    /// segments. Returns each chunk's offsets and segments with the script's reply.
    async fn per_chunk<T: redis::FromRedisValue>(
        &self,
        what: &str,
        script: &Script,
        ids: &[u32],
        keys: impl Fn(u32) -> Vec<String>,
    ) -> Result<Vec<(Vec<u32>, Segments, T)>> {
        let lease = self.lease()?;
        let groups: Vec<(Vec<String>, Vec<u32>, Segments)> = by_chunk(ids)
            .into_iter()
            .map(|(chunk, offsets)| {
                let segments = Segments::new(&offsets);
                (keys(chunk), offsets, segments)
            })
            .collect();
        if groups.is_empty() {
            return Ok(Vec::new());
        }
        let replies: Vec<T> = lease
            .guarded(what, || {
                let mut con = self.con.clone();
                let groups = &groups;
                async move {
                    let mut replies = Vec::with_capacity(groups.len());
                    for (keys, _, segments) in groups {
                        let mut call = script.prepare_invoke();
                        for key in keys {
                            call.key(key);
                        }
                        call.key(&lease.key).arg(&lease.token);
                        segments.args(&mut call);
                        replies.push(call.invoke_async(&mut con).await?);
                    }
                    Ok(replies)
                }
            })
            .await?;
        Ok(groups
            .into_iter()
            .zip(replies)
            .map(|((_, offsets, segments), reply)| (offsets, segments, reply))
            .collect())
    }

    /// Holds the unclaimed of `ids` for their quiet hours; see [`super::Ledger::hold_quiet`].
    /// Idempotent: a retry sets the same bits and answers the same (claims only add).
    pub async fn hold_quiet(&self, ids: &[u32]) -> Result<Claim> {
        self.touch(ids);
        let replies = self
            .per_chunk::<Vec<u8>>("hold for quiet hours", &HOLD_QUIET_SCRIPT, ids, |chunk| {
                vec![
                    format!("{}{chunk}", self.granted),
                    format!("{}{chunk}", self.quiet),
                ]
            })
            .await?;
        let mut open = Vec::with_capacity(ids.len());
        for (offsets, segments, reply) in &replies {
            open.extend(self.answered("quiet-hours", segments, offsets, reply)?);
        }
        let mut out = Claim::default();
        let mut seen = std::collections::HashSet::new();
        for (&id, yes) in ids.iter().zip(open) {
            if yes && seen.insert(id) {
                out.claimed.push(id);
            } else {
                out.already.push(id);
            }
        }
        Ok(out)
    }

    /// Settles `ids`: clears them from the run's in-flight bitmap and, with `outcome` (an
    /// outcome bitmap's prefix), sets them there.
    async fn mark(&self, ids: &[u32], outcome: Option<&str>) -> Result<()> {
        self.touch(ids);
        self.per_chunk::<i64>("mark done", &MARK_SCRIPT, ids, |chunk| {
            vec![
                outcome.map_or_else(String::new, |p| format!("{p}{chunk}")),
                format!("{}{chunk}", self.inflight),
            ]
        })
        .await
        .map(drop)
    }

    /// Records `ids` as delivered.
    pub async fn mark_done(&self, ids: &[u32]) -> Result<()> {
        self.mark(ids, None).await
    }

    /// Records `ids` as dead-lettered (and done).
    pub async fn mark_dead(&self, ids: &[u32]) -> Result<()> {
        self.mark(ids, Some(&self.dead)).await
    }

    /// Records `ids` as unreachable (and done).
    pub async fn mark_unreachable(&self, ids: &[u32]) -> Result<()> {
        self.mark(ids, Some(&self.unreachable)).await
    }

    /// Records claimed `ids` as cancelled before their push (and done).
    pub async fn mark_cancelled(&self, ids: &[u32]) -> Result<()> {
        self.mark(ids, Some(&self.cancelled)).await
    }

    /// Makes every dead-lettered id claimable again (`--retry-dead-letters`); returns how many.
    pub async fn revive_dead(&self) -> Result<u64> {
        self.lease()?.check_fenced()?;
        let script = Script::new(REVIVE);
        let mut revived = 0;
        for chunk in 0u32..(1 << (32 - CHUNK_BITS)) {
            let keys = [
                format!("{}{chunk}", self.dead),
                format!("{}{chunk}", self.granted),
            ];
            let n: u64 = retrying(&self.url, "revive dead letters", || {
                let mut con = self.con.clone();
                let mut call = script.prepare_invoke();
                call.key(&keys[0]).key(&keys[1]);
                async move { call.invoke_async(&mut con).await }
            })
            .await?;
            revived += n;
        }
        Ok(revived)
    }

    /// How many of `ids` are done.
    pub async fn count_done(&self, ids: &[u32]) -> Result<u64> {
        Ok(self.are_done(ids).await?.iter().filter(|&&d| d).count() as u64)
    }

    /// Whether each of `ids` is done: claimed (pipelined GETBITs) and in no run's in-flight
    /// bitmap.
    pub async fn are_done(&self, ids: &[u32]) -> Result<Vec<bool>> {
        let in_flight = self.in_flight().await?;
        let mut done = Vec::with_capacity(ids.len());
        for chunk in ids.chunks(10_000) {
            let bits: Vec<u8> = retrying(&self.url, "GETBIT granted", || {
                let mut con = self.con.clone();
                let mut pipe = redis::pipe();
                for &id in chunk {
                    pipe.cmd("GETBIT")
                        .arg(format!("{}{}", self.granted, id >> CHUNK_BITS))
                        .arg(id & 0xFF_FFFF);
                }
                async move { pipe.query_async(&mut con).await }
            })
            .await?;
            done.extend(
                chunk
                    .iter()
                    .zip(&bits)
                    .map(|(id, &b)| b == 1 && !in_flight.contains(*id)),
            );
        }
        Ok(done)
    }

    /// Every id in some run's in-flight bitmap of this ledger (claimed, not done).
    pub(super) async fn in_flight(&self) -> Result<RoaringBitmap> {
        let mut out = RoaringBitmap::new();
        let pattern = format!("{}*", glob_escape(&self.inflight_all));
        for key in scan(&self.con, &self.url, &pattern).await? {
            // Only this ledger's sets, not those of a `{ledger}:{occurrence}` ledger.
            let Some((_, chunk)) = run_chunk(&key, &self.inflight_all) else {
                continue;
            };
            out |= self.bits_of(&key, chunk).await?;
        }
        Ok(out)
    }

    /// The set of ids whose bit is set in the bitmaps under `prefix`.
    pub(super) async fn bits(&self, prefix: &str) -> Result<RoaringBitmap> {
        let mut out = RoaringBitmap::new();
        for chunk in 0u32..(1 << (32 - CHUNK_BITS)) {
            out |= self.bits_of(&format!("{prefix}{chunk}"), chunk).await?;
        }
        Ok(out)
    }

    /// The ids whose bit is set in bitmap `key` of chunk `chunk`.
    async fn bits_of(&self, key: &str, chunk: u32) -> Result<RoaringBitmap> {
        let mut out = RoaringBitmap::new();
        let bytes: Option<Vec<u8>> = retrying(&self.url, "GET ledger", || {
            let mut con = self.con.clone();
            async move { redis::cmd("GET").arg(key).query_async(&mut con).await }
        })
        .await?;
        if let Some(bytes) = bytes {
            out.extend(ids_of(&bytes, chunk));
        }
        Ok(out)
    }

    /// How many ids each set holds.
    pub async fn counts(&self) -> Result<LedgerCounts> {
        let claimed = self.bits(&self.granted).await?;
        let in_flight = self.in_flight().await?;
        Ok(LedgerCounts {
            claimed: claimed.len(),
            done: (claimed - in_flight).len(),
            dead: self.bits(&self.dead).await?.len(),
        })
    }
}
