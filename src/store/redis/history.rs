//! Frequency caps on the Redis store: the send-time table, each user's send history and the
//! capped claim, all in Lua that does what [`crate::history`] does (the reference).
//!
//! ```text
//! fanout:sendtimes                    hash: era, horizon (s), "1".."4095" → unix seconds
//! fanout:history:{id / 65528}         string: 8 bytes a user at (id % 65528) * 8
//! fanout:capped:{ledger}:{chunk}      bitmap: a cap bound (claimed and settled in one call)
//! ```
//! - **Send times** ([`SendTimes`]): [`RedisStore::send_slot`] runs [`ALLOC`], which fills
//!   and reuses the table's halves exactly as [`SendTimes::alloc`] does, atomically, so every
//!   run and process of a store agrees on what a slot means.
//! - **Histories** ([`crate::history::History`]): a little-endian u64 per user. Lua in Redis
//!   has doubles and 32-bit `bit` operations, so the scripts read and write it as sixteen
//!   4-bit nibbles (`tag`, then three per 12-bit slot), never as one number.
//! - **The capped claim** ([`claim_capped`]): one [`CLAIM_CAPPED`] call per chunk of ids,
//!   under the run's lease, with a nonce and a stored reply as the plain claim has, checks
//!   and records every member's users in the run's decision order.

use std::collections::BTreeSet;
use std::sync::atomic::Ordering;
use std::sync::{LazyLock, PoisonError};

use redis::Script;

use super::scripts::{Segments, GUARD, SEGMENTS};
use super::{retrying, RedisLedger, RedisStore, CHUNK_BITS, CHUNK_MASK, REPLY_TTL_MS};
use crate::error::{Error, Result};
use crate::history::{SendTimes, Window, SLOTS};
use crate::store::{CappedClaim, Ledger, SendAt};

/// The send-time table's key.
pub(super) const SEND_TIMES: &str = "fanout:sendtimes";

/// The largest send time the scripts compare exactly (Lua numbers are doubles).
const EXACT_S: i64 = 1 << 53;

/// Above this size a history string is not rewritten at the end of a run: Redis then grows a
/// string by at most 1 MiB ahead (≤ 1/8 here), and copying it would block the server longer.
const COMPACT_HISTORY_BYTES: u64 = 8 << 20;

/// Users per history string. 8 × 65,528 = 524,224 bytes, which with Redis's string header
/// fills jemalloc's 512 KiB size class exactly, so a full string costs 8 bytes a user (one
/// string per chunk of 2^24 users cost 8.4: the allocator rounds 80 MB up to 80 MiB). A
/// multiple of 8, so no byte of a ledger's bitmap straddles two history strings.
pub const HISTORY_USERS: u32 = 65_528;

/// The history string of the users `key × HISTORY_USERS ..` (`key = id / HISTORY_USERS`).
pub(super) fn history_key(key: u32) -> String {
    format!("fanout:history:{key}")
}

/// [`SendTimes::alloc`] on the table KEYS[1] for time ARGV[1] (unix seconds) and horizon
/// ARGV[2] (seconds): answers `{slot, ''}`, or `{0, why}` with alloc's own words. Slots are
/// fields "1".."4095" (absent: free), next to `era` and `horizon` (the longest ever given, kept
/// as given so the message prints it as alloc does). Times are compared as the decimal
/// strings Rust sends for equality, as numbers (exact below 2^53) for order.
const ALLOC: &str = r"
local t, h = tonumber(ARGV[1]), tonumber(ARGV[2])
if not t or t <= 0 then
  return {0, 'send time ' .. ARGV[1] .. ' is not after 1970'}
end
local hs = redis.call('HGET', KEYS[1], 'horizon') or '0'
if h > tonumber(hs) then
  redis.call('HSET', KEYS[1], 'horizon', ARGV[2])
  hs = ARGV[2]
end
local era = tonumber(redis.call('HGET', KEYS[1], 'era') or '0')
local times, text = {}, {}
local all = redis.call('HGETALL', KEYS[1])
for i = 1, #all, 2 do
  local s = tonumber(all[i])
  if s and all[i] ~= 'era' and all[i] ~= 'horizon' then
    times[s], text[s] = tonumber(all[i + 1]), all[i + 1]
  end
end
for s = 1, 4095 do
  if text[s] == ARGV[1] then return {s, ''} end
end
local lo, hi, nlo, nhi = 1, 2047, 2048, 4095
if era % 2 == 1 then lo, hi, nlo, nhi = 2048, 4095, 1, 2047 end
for s = lo, hi do
  if not times[s] then
    redis.call('HSET', KEYS[1], tostring(s), ARGV[1])
    return {s, ''}
  end
end
local newest = 0
for s = nlo, nhi do
  if times[s] and times[s] > newest then newest = times[s] end
end
if newest + tonumber(hs) > t then
  return {0, 'more than 4094 distinct send times within the longest frequency-cap window (' ..
    hs .. ' s): the send-time table cannot take another'}
end
local old = {}
for s = nlo, nhi do
  if times[s] then old[#old + 1] = tostring(s) end
  if #old == 500 then redis.call('HDEL', KEYS[1], unpack(old)) old = {} end
end
if #old > 0 then redis.call('HDEL', KEYS[1], unpack(old)) end
redis.call('HSET', KEYS[1], 'era', tostring(era + 1), tostring(nlo), ARGV[1])
return {nlo, ''}
";

/// [`crate::history::History`] in Lua, for the table KEYS[4] whose era is `era`: decoding,
/// the slots that still count, `admits` and `with_send`. `caps` is a list of `{max, per_s}`.
const HISTORY: &str = r"
-- A user's 8 history bytes of string h from position at (missing bytes: 0) as
-- its era tag and five slot numbers: nibble k is bits 4k..4k+3 of the little-endian u64.
local function decode(h, at)
  local b = {string.byte(h, at, at + 7)}
  local n = {}
  for j = 1, 8 do
    local v = b[j] or 0
    n[2 * j - 1] = v % 16
    n[2 * j] = math.floor(v / 16)
  end
  local slots = {}
  for i = 0, 4 do
    slots[i + 1] = n[2 + 3 * i] + 16 * n[3 + 3 * i] + 256 * n[4 + 3 * i]
  end
  return n[1], slots
end

-- The 8 bytes of tag and up to five {slot, time} pairs.
local function encode(tag, kept)
  local n = {tag}
  for i = 0, 4 do
    local s = 0
    if kept[i + 1] then s = kept[i + 1][1] end
    n[2 + 3 * i] = s % 16
    n[3 + 3 * i] = math.floor(s / 16) % 16
    n[4 + 3 * i] = math.floor(s / 256)
  end
  local b = {}
  for j = 1, 8 do b[j] = n[2 * j - 1] + 16 * n[2 * j] end
  return string.char(unpack(b))
end

local function history(era, caps, t)
  local lo, hi = 1, 2047
  if era % 2 == 1 then lo, hi = 2048, 4095 end
  local now, prev = era % 16, (era - 1) % 16
  local cache = {}
  -- A slot's time (0: free), read once per call.
  local function time_of(s)
    local v = cache[s]
    if v == nil then
      v = tonumber(redis.call('HGET', KEYS[4], tostring(s)) or '0') or 0
      cache[s] = v
    end
    return v
  end
  local h = {}
  -- The {slot, time} pairs that still count, in slot order (History::kept).
  function h.kept(tag, slots)
    local kept = {}
    for i = 1, 5 do
      local s = slots[i]
      local current
      if s >= lo and s <= hi then current = tag == now
      else current = era > 0 and (tag == now or tag == prev) end
      if s ~= 0 and current then
        local ts = time_of(s)
        if ts > 0 then kept[#kept + 1] = {s, ts} end
      end
    end
    return kept
  end
  -- History::admits.
  function h.admits(kept)
    local oldest = nil
    for _, k in ipairs(kept) do
      if oldest == nil or k[2] < oldest then oldest = k[2] end
    end
    for _, cap in ipairs(caps) do
      local from = t - cap[2]
      local within = 0
      for _, k in ipairs(kept) do
        if k[2] > from and k[2] <= t then within = within + 1 end
      end
      if within >= cap[1] then return false end
      if #kept == 5 and oldest > from then return false end
    end
    return true
  end
  -- History::with_send's bytes: the oldest-time pair swap-removed when five are kept.
  function h.with_send(kept, slot)
    if #kept == 5 then
      local m = 1
      for i = 2, 5 do
        if kept[i][2] < kept[m][2] then m = i end
      end
      kept[m] = kept[5]
      kept[5] = nil
    end
    kept[#kept + 1] = {slot, t}
    return encode(now, kept)
  end
  return h
end
";

/// The capped claim of one chunk for the run whose lease KEYS[1] must hold token ARGV[1]. A
/// reply stored under KEYS[2] (the call's nonce) is answered again unchanged. KEYS[3] is the
/// history string of the call's users, KEYS[4] the send-time table; then per member four
/// bitmaps: granted, the run's in-flight and resend, capped. ARGV: token, reply ms, slot, t,
/// the chunk offset of the history string's first user (a multiple of 8, maybe negative),
/// the number of caps, `max, per_s` per cap, then per member its segment count and segments.
/// Members run in order, each id as: granted and in resend → claimed (cleared there);
/// granted → already; else if its history admits a send at t → granted, in flight, claimed,
/// its history recording the send; else → granted, capped. The reply, per member: the
/// claimed masks of its segments, then the capped ones.
const CLAIM_CAPPED: &str = r"
local fenced = guard(1, ARGV[1])
if fenced then return fenced end
local stored = redis.call('GET', KEYS[2])
if stored then return stored end
if redis.call('HGET', KEYS[4], ARGV[3]) ~= ARGV[4] then
  return redis.error_reply('SENDTIME slot ' .. ARGV[3] ..
    ' of the send-time table no longer holds send time ' .. ARGV[4] ..
    ' (reused: more distinct send times than the table keeps within the longest cap window)')
end
local slot, t, hoff = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local era = tonumber(redis.call('HGET', KEYS[4], 'era') or '0')
local caps, a = {}, 7
for i = 1, tonumber(ARGV[6]) do
  caps[i] = {tonumber(ARGV[a]), tonumber(ARGV[a + 1])}
  a = a + 2
end
local h = history(era, caps, t)

-- Decides the candidates (cand: per byte j1..j2 of the segment at byte first) from their
-- histories, into adm (admitted) and cap; records the admitted sends.
local function decide(first, j1, j2, cand, adm, cap)
  local base = 64 * (first + j1 - 1) - 8 * hoff
  local hs = redis.call('GETRANGE', KEYS[3], base, base + 64 * (j2 - j1 + 1) - 1)
  local new, lo, hi = {}, nil, nil
  for j = j1, j2 do
    for k = 0, 7 do
      local m = bit.rshift(0x80, k)
      if bit.band(cand[j], m) ~= 0 then
        local u = 8 * (j - j1) + k
        local kept = h.kept(decode(hs, 8 * u + 1))
        if h.admits(kept) then
          adm[j] = bit.bor(adm[j], m)
          new[u] = h.with_send(kept, slot)
          lo = lo or u
          hi = u
        else
          cap[j] = bit.bor(cap[j], m)
        end
      end
    end
  end
  if lo then
    local parts = {}
    for u = lo, hi do
      local old = string.sub(hs, 8 * u + 1, 8 * u + 8)
      parts[#parts + 1] = new[u] or (old .. string.rep('\0', 8 - #old))
    end
    redis.call('SETRANGE', KEYS[3], base + 8 * lo, table.concat(parts))
  end
end

local out, m = {}, 0
while a <= #ARGV do
  local kg, kf, kr, kc = 5 + 4 * m, 6 + 4 * m, 7 + 4 * m, 8 + 4 * m
  m = m + 1
  if kc > #KEYS then return redis.error_reply('ERR more members than keys') end
  local capped = {}
  local nseg = tonumber(ARGV[a])
  a = a + 1
  for _ = 1, nseg do
    local first, want = tonumber(ARGV[a]), ARGV[a + 1]
    a = a + 2
    local n = #want
    local w, g, f = bytes(want, n), load(kg, first, n), load(kf, first, n)
    local r, c = load(kr, first, n), load(kc, first, n)
    local cand, again, adm, cap = {}, {}, {}, {}
    local any_cand, any_again = false, false
    for j = 1, n do
      cand[j] = bit.band(w[j], bit.bnot(g[j]))
      again[j] = bit.band(w[j], bit.band(g[j], r[j]))
      adm[j], cap[j] = 0, 0
      if cand[j] ~= 0 then any_cand = true end
      if again[j] ~= 0 then any_again = true end
    end
    local j = 1
    while j <= n do
      if cand[j] ~= 0 then
        local j2 = j
        while j2 < n and cand[j2 + 1] ~= 0 do j2 = j2 + 1 end
        decide(first, j, j2, cand, adm, cap)
        j = j2 + 1
      else
        j = j + 1
      end
    end
    local claimed, any_adm, any_cap = {}, false, false
    for j = 1, n do
      claimed[j] = bit.bor(again[j], adm[j])
      g[j] = bit.bor(g[j], w[j])
      f[j] = bit.bor(f[j], adm[j])
      c[j] = bit.bor(c[j], cap[j])
      r[j] = bit.band(r[j], bit.bnot(again[j]))
      if adm[j] ~= 0 then any_adm = true end
      if cap[j] ~= 0 then any_cap = true end
    end
    if any_cand then redis.call('SETRANGE', KEYS[kg], first, text(g)) end
    if any_adm then redis.call('SETRANGE', KEYS[kf], first, text(f)) end
    if any_cap then redis.call('SETRANGE', KEYS[kc], first, text(c)) end
    if any_again then redis.call('SETRANGE', KEYS[kr], first, text(r)) end
    out[#out + 1] = text(claimed)
    capped[#capped + 1] = text(cap)
  end
  out[#out + 1] = table.concat(capped)
end
local reply = table.concat(out)
redis.call('SET', KEYS[2], reply, 'PX', ARGV[2])
return reply
";

/// Rewrites the history string KEYS[1] at its exact size when it is at most ARGV[1] bytes.
const COMPACT_HISTORY: &str = r"
local n = redis.call('STRLEN', KEYS[1])
if n > 0 and n <= tonumber(ARGV[1]) then
  redis.call('SET', KEYS[1], redis.call('GET', KEYS[1]))
end
return 0
";

static ALLOC_SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(ALLOC));
static CLAIM_CAPPED_SCRIPT: LazyLock<Script> =
    LazyLock::new(|| Script::new(&format!("{SEGMENTS}{GUARD}{HISTORY}{CLAIM_CAPPED}")));

impl RedisStore {
    /// The slot of send time `t`, added if new; see [`crate::store::Store::send_slot`]. One
    /// atomic script: concurrent runs allocate consistently, and a retry finds its time.
    pub async fn send_slot(&self, t: i64, horizon_s: i64) -> Result<u16> {
        if self.read_only {
            return Err(Error::runtime(format!(
                "store {} is open read-only",
                self.url
            )));
        }
        if t >= EXACT_S {
            return Err(Error::runtime(format!(
                "send time {t} is past what the Redis store compares exactly (2^53 s)"
            )));
        }
        let (slot, why): (i64, String) = retrying(&self.url, "allocate a send time", || {
            let mut con = self.con.clone();
            let mut call = ALLOC_SCRIPT.prepare_invoke();
            call.key(SEND_TIMES).arg(t).arg(horizon_s.max(0));
            async move { call.invoke_async(&mut con).await }
        })
        .await?;
        match u16::try_from(slot) {
            Ok(slot) if slot > 0 && usize::from(slot) < SLOTS => Ok(slot),
            _ if !why.is_empty() => Err(Error::runtime(format!("store {}: {why}", self.url))),
            _ => Err(Error::runtime(format!(
                "store {}: the send-time script answered slot {slot}",
                self.url
            ))),
        }
    }

    /// The send-time table as the store holds it (empty when never used).
    pub async fn send_times(&self) -> Result<SendTimes> {
        let fields: Vec<(String, i64)> = retrying(&self.url, "read the send-time table", || {
            let mut con = self.con.clone();
            async move {
                redis::cmd("HGETALL")
                    .arg(SEND_TIMES)
                    .query_async(&mut con)
                    .await
            }
        })
        .await?;
        let mut times = vec![0; SLOTS];
        let (mut era, mut horizon) = (0, 0);
        let bad = || {
            Error::runtime(format!(
                "store {}: {SEND_TIMES} holds what is not a send-time table",
                self.url
            ))
        };
        for (field, value) in fields {
            match field.as_str() {
                "era" => era = u32::try_from(value).map_err(|_| bad())?,
                "horizon" => horizon = value,
                slot => {
                    let slot: usize = slot.parse().map_err(|_| bad())?;
                    *times.get_mut(slot).ok_or_else(bad)? = value;
                }
            }
        }
        SendTimes::from_parts(times, era, horizon).ok_or_else(bad)
    }

    /// The send histories of `ids` (sorted), as the store holds them (empty where none).
    pub async fn histories(&self, ids: &[u32]) -> Result<Vec<crate::history::History>> {
        let mut out = Vec::with_capacity(ids.len());
        for part in ids.chunk_by(|a, b| a / HISTORY_USERS == b / HISTORY_USERS) {
            let (first, last) = (
                part[0] % HISTORY_USERS,
                part[part.len() - 1] % HISTORY_USERS,
            );
            let key = history_key(part[0] / HISTORY_USERS);
            let (from, to) = (u64::from(first) * 8, u64::from(last) * 8 + 7);
            let bytes: Vec<u8> = retrying(&self.url, "read send histories", || {
                let (mut con, key) = (self.con.clone(), key.clone());
                async move {
                    redis::cmd("GETRANGE")
                        .arg(key)
                        .arg(from)
                        .arg(to)
                        .query_async(&mut con)
                        .await
                }
            })
            .await?;
            for &id in part {
                let at = (u64::from(id % HISTORY_USERS) * 8 - from) as usize;
                let mut word = [0u8; 8];
                if let Some(b) = bytes.get(at..at + 8) {
                    word.copy_from_slice(b);
                }
                out.push(crate::history::History(u64::from_le_bytes(word)));
            }
        }
        Ok(out)
    }

    /// Rewrites the history strings `keys` at their exact size (see [`COMPACT_HISTORY`]).
    pub(super) async fn compact_histories(&self, keys: &BTreeSet<u32>) -> Result<()> {
        let script = Script::new(COMPACT_HISTORY);
        for &key in keys {
            retrying(&self.url, "compact send histories", || {
                let mut con = self.con.clone();
                let mut call = script.prepare_invoke();
                call.key(history_key(key)).arg(COMPACT_HISTORY_BYTES);
                async move { call.invoke_async::<i64>(&mut con).await }
            })
            .await?;
        }
        Ok(())
    }
}

/// How the capped claim answered one id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Answer {
    Claimed,
    Capped,
    Already,
}

/// One member's ids in one chunk.
struct Part {
    offsets: Vec<u32>,
    segments: Segments,
}

/// Capped claims on Redis; see [`crate::store::claim_capped`]. One [`CLAIM_CAPPED`] call per
/// piece ([`pieces_of`]) holds every member's ids of that piece, so a user's checks and sends
/// across members are one atomic step, in member order.
pub async fn claim_capped(
    members: &[(Ledger, Vec<u32>)],
    at: SendAt,
    caps: &[Window],
) -> Result<Vec<CappedClaim>> {
    let Some((Ledger::Redis(first), _)) = members.first() else {
        return capped_with(members, at, caps, &[]).await;
    };
    let lease = first.lease()?;
    let nonces: Vec<u64> = pieces_of(members)
        .iter()
        .map(|_| lease.nonce.fetch_add(1, Ordering::Relaxed))
        .collect();
    capped_with(members, at, caps, &nonces).await
}

/// The piece of `id`: its ledger chunk and its history string.
fn piece(id: u32) -> (u32, u32) {
    (id >> CHUNK_BITS, id / HISTORY_USERS)
}

/// The pieces of every member's ids, sorted: one script call each.
fn pieces_of(members: &[(Ledger, Vec<u32>)]) -> Vec<(u32, u32)> {
    members
        .iter()
        .flat_map(|(_, ids)| ids.iter().map(|&id| piece(id)))
        .collect::<BTreeSet<(u32, u32)>>()
        .into_iter()
        .collect()
}

/// [`claim_capped`] with the nonce of each piece's call given (one per piece of
/// [`pieces_of`]): a call repeated with the same nonce (a retry whose reply was lost) gets the
/// first call's answer.
async fn capped_with(
    members: &[(Ledger, Vec<u32>)],
    at: SendAt,
    caps: &[Window],
    nonces: &[u64],
) -> Result<Vec<CappedClaim>> {
    let ledgers = members
        .iter()
        .map(|(ledger, _)| match ledger {
            Ledger::Redis(l) => Ok(l.as_ref()),
            Ledger::File(_) => Err(Error::runtime(
                "a capped claim mixes ledgers of the embedded and the Redis store",
            )),
        })
        .collect::<Result<Vec<&RedisLedger>>>()?;
    let Some(first) = ledgers.first() else {
        return Ok(Vec::new());
    };
    let lease = first.lease()?;
    for ledger in &ledgers {
        if ledger.lease()?.key != lease.key {
            return Err(Error::runtime(
                "a capped claim mixes ledgers of two Redis stores",
            ));
        }
    }
    let pieces = pieces_of(members);
    if pieces.len() != nonces.len() {
        return Err(Error::runtime(format!(
            "a capped claim over {} pieces got {} nonces",
            pieces.len(),
            nonces.len()
        )));
    }
    for (ledger, (_, ids)) in ledgers.iter().zip(members) {
        ledger.touch(ids);
        ledger
            .histories
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .extend(pieces.iter().map(|&(_, key)| key));
    }
    // Per piece: its call's reply key (a nonce) and each member's part.
    let calls: Vec<((u32, u32), String, Vec<Part>)> = pieces
        .iter()
        .zip(nonces)
        .map(|(&here, nonce)| {
            let parts = members
                .iter()
                .map(|(_, ids)| {
                    let offsets: Vec<u32> = ids
                        .iter()
                        .filter(|&&id| piece(id) == here)
                        .map(|id| id & CHUNK_MASK)
                        .collect();
                    let segments = Segments::new(&offsets);
                    Part { offsets, segments }
                })
                .collect();
            (here, format!("fanout:reply:{}:{nonce}", lease.run), parts)
        })
        .collect();
    // A retry repeats every call with the same nonces: those that had run answer as they did.
    let replies: Vec<Vec<u8>> = lease
        .guarded("capped claim", || {
            let mut con = first.con.clone();
            let calls = &calls;
            let ledgers = &ledgers;
            async move {
                let mut replies = Vec::with_capacity(calls.len());
                for ((chunk, key), reply, parts) in calls {
                    // Where the history string starts, in users from the chunk's start.
                    let hoff = i64::from(*key) * i64::from(HISTORY_USERS)
                        - (i64::from(*chunk) << CHUNK_BITS);
                    let mut call = CLAIM_CAPPED_SCRIPT.prepare_invoke();
                    call.key(&lease.key)
                        .key(reply)
                        .key(history_key(*key))
                        .key(SEND_TIMES)
                        .arg(&lease.token)
                        .arg(REPLY_TTL_MS)
                        .arg(at.slot)
                        .arg(at.t)
                        .arg(hoff)
                        .arg(caps.len());
                    for cap in caps {
                        call.arg(cap.max).arg(cap.per_s);
                    }
                    for (ledger, part) in ledgers.iter().zip(parts) {
                        call.key(format!("{}{chunk}", ledger.granted))
                            .key(format!("{}{chunk}", ledger.inflight))
                            .key(format!("{}{chunk}", ledger.resend))
                            .key(format!("{}{chunk}", ledger.capped))
                            .arg(part.segments.len());
                        part.segments.args(&mut call);
                    }
                    replies.push(call.invoke_async(&mut con).await?);
                }
                Ok(replies)
            }
        })
        .await?;
    // answers[member][call]: per offset of that member's part.
    let mut answers: Vec<Vec<std::vec::IntoIter<Answer>>> =
        members.iter().map(|_| Vec::new()).collect();
    for ((_, _, parts), reply) in calls.iter().zip(&replies) {
        let mut at = 0;
        for (m, part) in parts.iter().enumerate() {
            let n = part.segments.bytes();
            let decoded = reply.get(at..at + 2 * n).and_then(|mine| {
                let claimed = part.segments.claimed(&part.offsets, &mine[..n])?;
                let capped = part.segments.claimed(&part.offsets, &mine[n..])?;
                Some(
                    claimed
                        .into_iter()
                        .zip(capped)
                        .map(|answer| match answer {
                            (true, _) => Answer::Claimed,
                            (false, true) => Answer::Capped,
                            (false, false) => Answer::Already,
                        })
                        .collect::<Vec<Answer>>(),
                )
            });
            let decoded = decoded.ok_or_else(|| misfit(first, reply.len()))?;
            answers[m].push(decoded.into_iter());
            at += 2 * n;
        }
        if at != reply.len() {
            return Err(misfit(first, reply.len()));
        }
    }
    let mut out = Vec::with_capacity(members.len());
    for ((_, ids), mut per_call) in members.iter().zip(answers) {
        let mut claim = CappedClaim::default();
        for &id in ids {
            let call = pieces.binary_search(&piece(id)).ok();
            let answer = call
                .and_then(|c| per_call.get_mut(c))
                .and_then(Iterator::next)
                .ok_or_else(|| misfit(first, 0))?;
            match answer {
                Answer::Claimed => claim.claim.claimed.push(id),
                Answer::Capped => claim.capped.push(id),
                Answer::Already => claim.claim.already.push(id),
            }
        }
        out.push(claim);
    }
    Ok(out)
}

/// The error of a capped claim's reply that does not fit its call.
fn misfit(ledger: &RedisLedger, len: usize) -> Error {
    Error::runtime(format!(
        "store {}: the capped-claim script answered {len} bytes that do not fit its call",
        ledger.url
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::redis::redis_server::RedisServer;
    use crate::store::redis::LEASE;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_capped_claim_retried_with_its_nonces_gets_its_first_answer() {
        let redis = RedisServer::start();
        let store = RedisStore::open_with(&redis.url(0), false, None, LEASE)
            .await
            .unwrap();
        let slot = store.send_slot(1_000, 100).await.unwrap();
        let at = SendAt { slot, t: 1_000 };
        let caps = [Window { max: 1, per_s: 100 }];
        let members = [
            (
                Ledger::Redis(store.ledger("a").await.unwrap()),
                vec![1, 2, 1 << 24],
            ),
            (Ledger::Redis(store.ledger("b").await.unwrap()), vec![2, 3]),
        ];
        // The first call ran but its reply was lost; the retry repeats its nonces.
        let first = capped_with(&members, at, &caps, &[7, 8]).await.unwrap();
        assert_eq!(first[0].claim.claimed, [1, 2, 1 << 24]);
        assert_eq!(
            (first[1].claim.claimed.clone(), first[1].capped.clone()),
            (vec![3], vec![2])
        );
        let retried = capped_with(&members, at, &caps, &[7, 8]).await.unwrap();
        assert_eq!(retried, first);
        // Any other call finds them taken.
        let other = claim_capped(&members, at, &caps).await.unwrap();
        assert_eq!(other[0].claim.already, [1, 2, 1 << 24]);
        assert_eq!(other[1].claim.already, [2, 3]);
        // A slot that no longer holds its time is refused.
        let wrong = SendAt { slot, t: 2_000 };
        let only = [(Ledger::Redis(store.ledger("c").await.unwrap()), vec![5])];
        let err = claim_capped(&only, wrong, &caps).await.unwrap_err();
        assert!(
            err.to_string().contains("no longer holds send time 2000"),
            "{err}"
        );
    }

    /// Two runs allocating the same times at once agree on every slot; two runs offering
    /// the same users a send at once under a one-send cap send each user once.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_runs_share_one_table_and_one_history() {
        let redis = RedisServer::start();
        redis.cli(&["CONFIG", "SET", "appendfsync", "no"]);
        let url = redis.url(0);
        let (a, b) = tokio::join!(
            RedisStore::open_with(&url, false, None, LEASE),
            RedisStore::open_with(&url, false, None, LEASE)
        );
        let (a, b) = (
            std::sync::Arc::new(a.unwrap()),
            std::sync::Arc::new(b.unwrap()),
        );
        let times: Vec<i64> = (1..=300).map(|i| 1_000 + i).collect();
        let alloc = |store: std::sync::Arc<RedisStore>, times: Vec<i64>| {
            tokio::spawn(async move {
                let mut slots = std::collections::BTreeMap::new();
                for t in times {
                    slots.insert(t, store.send_slot(t, 100).await.unwrap());
                }
                slots
            })
        };
        let backwards = times.iter().rev().copied().collect();
        let (x, y) = (alloc(a.clone(), times.clone()), alloc(b.clone(), backwards));
        let (x, y) = (x.await.unwrap(), y.await.unwrap());
        assert_eq!(x, y);
        let table = a.send_times().await.unwrap();
        for (t, slot) in &x {
            assert_eq!(table.time(*slot), Some(*t));
        }
        let t = 1_300;
        let at = SendAt { slot: x[&t], t };
        let caps = [Window { max: 1, per_s: 100 }];
        let users: Vec<u32> = (0..2_000).collect();
        let offer = |store: std::sync::Arc<RedisStore>, key: &'static str, users: Vec<u32>| {
            tokio::spawn(async move {
                let mut sent = Vec::new();
                let ledger = Ledger::Redis(store.ledger(key).await.unwrap());
                for batch in users.chunks(100) {
                    let got = claim_capped(&[(ledger.clone(), batch.to_vec())], at, &caps)
                        .await
                        .unwrap();
                    sent.extend(got[0].claim.claimed.iter().copied());
                }
                sent
            })
        };
        let (x, y) = (
            offer(a.clone(), "a", users.clone()),
            offer(b.clone(), "b", users.iter().rev().copied().collect()),
        );
        let mut sent = x.await.unwrap();
        sent.extend(y.await.unwrap());
        sent.sort_unstable();
        assert_eq!(sent, users, "each user sent exactly once");
    }
}
