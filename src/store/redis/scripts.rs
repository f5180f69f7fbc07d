//! The Lua scripts of the Redis store, and the byte masks its claims and marks travel as.
//!
//! A batch's ids are mostly consecutive, so a claim or mark does not send one offset per id
//! but [`Segments`]: runs of bitmap bytes `(first byte, mask)` whose set bits are the ids.
//! The scripts then work a byte (eight ids) at a time with Lua's bit operations, and read and
//! write each bitmap once per segment (GETRANGE / SETRANGE) instead of calling SETBIT per id
//! and bitmap — a Redis call from Lua costs more than the whole byte's arithmetic.

use std::sync::LazyLock;

use redis::Script;

/// Lua shared by [`CLAIM`], [`MARK`] and [`ADOPT`]: after their own leading ARGV, the rest is
/// `first byte, mask, first byte, mask, …`.
pub(super) const SEGMENTS: &str = r"
-- A byte string of n bytes as a table of numbers (0 past the string's end).
local function bytes(s, n)
  local t = {}
  for j = 1, n, 4000 do
    local part = {string.byte(s, j, math.min(j + 3999, n))}
    for k = 1, math.min(4000, n - j + 1) do t[j + k - 1] = part[k] or 0 end
  end
  return t
end

-- A table of byte values as a string.
local function text(t)
  local parts = {}
  for j = 1, #t, 4000 do
    parts[#parts + 1] = string.char(unpack(t, j, math.min(j + 3999, #t)))
  end
  return table.concat(parts)
end

-- The bytes of KEYS[k] under segment s's mask, as a table.
local function load(k, first, n)
  return bytes(redis.call('GETRANGE', KEYS[k], first, first + n - 1), n)
end
";

/// The error a script answers when the caller's lease key (KEYS named per script) no longer
/// holds its token: another run may have adopted its work, so nothing it does may count.
pub const FENCED: &str = "FENCED";

/// Lua shared by the scripts that act for a run: fails unless lease key `k` holds token `t`.
pub(super) const GUARD: &str = r"
local function guard(k, t)
  if redis.call('GET', KEYS[k]) ~= t then
    return redis.error_reply('FENCED lease lost')
  end
end
";

/// Claims one chunk's segments (ARGV[3..]) for the run whose lease (KEYS[4]) must hold token
/// ARGV[1]. A reply already stored under KEYS[5] (the call's nonce: a retry whose first reply
/// was lost) is answered again unchanged; else each masked bit is set in the granted bitmap
/// (KEYS[1]), and the answer per bit is "claimed" when it was not granted (it then joins the
/// run's in-flight bitmap, KEYS[2]) or when it is in the run's resend bitmap (KEYS[3]: adopted
/// from a dead run; cleared there, so it is answered once). The reply (per segment, the mask of
/// the claimed) is stored under KEYS[5] for ARGV[2] ms. When KEYS[6] is not empty (an outcome
/// bitmap: held out) the claimed ids are settled there in this same call instead: set in
/// KEYS[6], never in the in-flight bitmap (and a resent one is cleared from it).
const CLAIM: &str = r"
local fenced = guard(4, ARGV[1])
if fenced then return fenced end
local stored = redis.call('GET', KEYS[5])
if stored then return stored end
local out = {}
for s = 3, #ARGV, 2 do
  local first, want = tonumber(ARGV[s]), ARGV[s + 1]
  local n = #want
  local w, g, f, r = bytes(want, n), load(1, first, n), load(2, first, n), load(3, first, n)
  local settle = nil
  if KEYS[6] ~= '' then settle = load(6, first, n) end
  local claimed, resent = {}, false
  for j = 1, n do
    local new = bit.band(w[j], bit.bnot(g[j]))
    local again = bit.band(w[j], bit.band(g[j], r[j]))
    if again ~= 0 then resent = true end
    claimed[j] = bit.bor(new, again)
    g[j] = bit.bor(g[j], w[j])
    if settle then
      settle[j] = bit.bor(settle[j], claimed[j])
      f[j] = bit.band(f[j], bit.bnot(again))
    else
      f[j] = bit.bor(f[j], new)
    end
    r[j] = bit.band(r[j], bit.bnot(again))
  end
  redis.call('SETRANGE', KEYS[1], first, text(g))
  if settle then
    redis.call('SETRANGE', KEYS[6], first, text(settle))
    if resent then redis.call('SETRANGE', KEYS[2], first, text(f)) end
  else
    redis.call('SETRANGE', KEYS[2], first, text(f))
  end
  if resent then redis.call('SETRANGE', KEYS[3], first, text(r)) end
  out[#out + 1] = text(claimed)
end
local reply = table.concat(out)
redis.call('SET', KEYS[5], reply, 'PX', ARGV[2])
return reply
";

/// Marks one chunk's segments (ARGV[2..]) done for the run whose lease (KEYS[3]) must hold
/// token ARGV[1]: clears them in its in-flight bitmap (KEYS[2]) and, when KEYS[1] is given,
/// sets them in that outcome bitmap (dead, unreachable). Done is "claimed and in no in-flight bitmap", so no bitmap of
/// its own is kept. An emptied in-flight bitmap is deleted at the end of the run
/// ([`DROP_EMPTY`]), not here: counting its bits on every call would cost more than the marking.
const MARK: &str = r"
local fenced = guard(3, ARGV[1])
if fenced then return fenced end
for s = 2, #ARGV, 2 do
  local first, want = tonumber(ARGV[s]), ARGV[s + 1]
  local n = #want
  local w, f = bytes(want, n), load(2, first, n)
  local x = nil
  if KEYS[1] ~= '' then x = load(1, first, n) end
  for j = 1, n do
    f[j] = bit.band(f[j], bit.bnot(w[j]))
    if x then x[j] = bit.bor(x[j], w[j]) end
  end
  redis.call('SETRANGE', KEYS[2], first, text(f))
  if x then redis.call('SETRANGE', KEYS[1], first, text(x)) end
end
return 0
";

/// Holds one chunk's segments (ARGV[2..]) for their quiet hours, for the run whose lease
/// (KEYS[3]) must hold token ARGV[1]: each id not claimed (granted bitmap KEYS[1]) is set in
/// the quiet bitmap (KEYS[2]) and answered 1 (held); a claimed one is answered 0. Nothing is
/// claimed: a held user stays claimable for the run that finds it outside its quiet hours.
const HOLD_QUIET: &str = r"
local fenced = guard(3, ARGV[1])
if fenced then return fenced end
local out = {}
for s = 2, #ARGV, 2 do
  local first, want = tonumber(ARGV[s]), ARGV[s + 1]
  local n = #want
  local w, g, q = bytes(want, n), load(1, first, n), load(2, first, n)
  local held = {}
  for j = 1, n do
    held[j] = bit.band(w[j], bit.bnot(g[j]))
    q[j] = bit.bor(q[j], held[j])
  end
  redis.call('SETRANGE', KEYS[2], first, text(q))
  out[#out + 1] = text(held)
end
return table.concat(out)
";

/// Hands one chunk's segments (ARGV[2..]) out once more, for the run whose lease (KEYS[3])
/// must hold token ARGV[1]: each id in its in-flight bitmap (KEYS[1]) is set in its resend
/// bitmap (KEYS[2]), so its next claim answers it "claimed" once more.
const UNCLAIM: &str = r"
local fenced = guard(3, ARGV[1])
if fenced then return fenced end
for s = 2, #ARGV, 2 do
  local first, want = tonumber(ARGV[s]), ARGV[s + 1]
  local n = #want
  local w, f, r = bytes(want, n), load(1, first, n), load(2, first, n)
  for j = 1, n do
    r[j] = bit.bor(r[j], bit.band(w[j], f[j]))
  end
  redis.call('SETRANGE', KEYS[2], first, text(r))
end
return 0
";

/// Deletes the run's in-flight bitmap (KEYS[1]) if no bit is left in it.
pub const DROP_EMPTY: &str = r"
if redis.call('BITCOUNT', KEYS[1]) == 0 then redis.call('DEL', KEYS[1]) return 1 end
return 0
";

/// Rewrites each key (bitmaps) at its exact size, atomically (a copy of at most 2 MiB).
pub const COMPACT: &str = r"
for i = 1, #KEYS do
  local v = redis.call('GET', KEYS[i])
  if v then redis.call('SET', KEYS[i], v) end
end
return 0
";

/// Adopts the ids of segments ARGV[2..] (those the caller owns) from a dead run's in-flight
/// bitmap of one chunk (KEYS[1]), for the run whose lease (KEYS[6]) must hold token ARGV[1],
/// unless the dead run's lease (KEYS[5]) exists after all. Only ids still set there move (two
/// adopters of disjoint shares, or racing adopters of one share, never take an id twice): they
/// are cleared there and in its resend bitmap (KEYS[2]), and set in ours (KEYS[3]) and in our
/// resend bitmap (KEYS[4]), so our next claim hands each out once more. The orphan's keys go
/// once it is empty. Returns how many ids moved.
const ADOPT: &str = r"
local fenced = guard(6, ARGV[1])
if fenced then return fenced end
if redis.call('EXISTS', KEYS[5]) == 1 then return 0 end
local before = redis.call('BITCOUNT', KEYS[1])
local theirs_resend = redis.call('EXISTS', KEYS[2]) == 1
for s = 2, #ARGV, 2 do
  local first, want = tonumber(ARGV[s]), ARGV[s + 1]
  local n = #want
  local w, o = bytes(want, n), load(1, first, n)
  local m, r, x = load(3, first, n), load(4, first, n), load(2, first, n)
  local moved = false
  for j = 1, n do
    local mv = bit.band(w[j], o[j])
    if mv ~= 0 then
      moved = true
      o[j] = bit.band(o[j], bit.bnot(mv))
      x[j] = bit.band(x[j], bit.bnot(mv))
      m[j] = bit.bor(m[j], mv)
      r[j] = bit.bor(r[j], mv)
    end
  end
  if moved then
    redis.call('SETRANGE', KEYS[1], first, text(o))
    redis.call('SETRANGE', KEYS[3], first, text(m))
    redis.call('SETRANGE', KEYS[4], first, text(r))
    if theirs_resend then redis.call('SETRANGE', KEYS[2], first, text(x)) end
  end
end
local after = redis.call('BITCOUNT', KEYS[1])
if after == 0 then redis.call('DEL', KEYS[1], KEYS[2]) end
return before - after
";

/// Refreshes a run's lease (KEYS[1]) to ARGV[2] ms only while it holds the run's token
/// (ARGV[1]): an expired lease is never resurrected. Returns 1 if refreshed, 0 if lost.
pub const REFRESH: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
";

/// Drops a run's lease (KEYS[1]) only while it holds the run's token (ARGV[1]).
pub const RELEASE: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) return 1 end
return 0
";

/// The repeated-campaign guard over every pair of one call, atomically: KEYS[i] is
/// `fanout:admitted:{hash}` of the pair whose campaign id is ARGV[i + 1]. If a hash is held by
/// another id, or two pairs share a hash under different ids, nothing is admitted and the
/// answer is `{id, earlier id}`; else each key is set to its id for ARGV[1] s (the same id
/// refreshes) and the answer is empty.
pub const ADMIT: &str = r"
for i = 1, #KEYS do
  local id = ARGV[i + 1]
  local holder = redis.call('GET', KEYS[i])
  if holder and holder ~= id then return {id, holder} end
  for j = 1, i - 1 do
    if KEYS[j] == KEYS[i] and ARGV[j + 1] ~= id then return {id, ARGV[j + 1]} end
  end
end
for i = 1, #KEYS do
  redis.call('SET', KEYS[i], ARGV[i + 1], 'EX', ARGV[1])
end
return {}
";

/// Revives the dead offsets of one chunk: clears each in the dead (KEYS[1]) and granted
/// (KEYS[2]) bitmaps, so the next claim hands it out. Returns how many.
pub const REVIVE: &str = r"
local n = 0
local pos = redis.call('BITPOS', KEYS[1], 1)
while pos >= 0 do
  redis.call('SETBIT', KEYS[2], pos, 0)
  redis.call('SETBIT', KEYS[1], pos, 0)
  n = n + 1
  pos = redis.call('BITPOS', KEYS[1], 1, math.floor(pos / 8))
end
redis.call('DEL', KEYS[1])
return n
";

/// The claim script, hashed once.
pub static CLAIM_SCRIPT: LazyLock<Script> =
    LazyLock::new(|| Script::new(&format!("{SEGMENTS}{GUARD}{CLAIM}")));
/// The mark script, hashed once.
pub static MARK_SCRIPT: LazyLock<Script> =
    LazyLock::new(|| Script::new(&format!("{SEGMENTS}{GUARD}{MARK}")));
/// The quiet-hours hold script, hashed once.
pub static HOLD_QUIET_SCRIPT: LazyLock<Script> =
    LazyLock::new(|| Script::new(&format!("{SEGMENTS}{GUARD}{HOLD_QUIET}")));
/// The unclaim script, hashed once.
pub static UNCLAIM_SCRIPT: LazyLock<Script> =
    LazyLock::new(|| Script::new(&format!("{SEGMENTS}{GUARD}{UNCLAIM}")));
/// The adopt script, hashed once.
pub static ADOPT_SCRIPT: LazyLock<Script> =
    LazyLock::new(|| Script::new(&format!("{SEGMENTS}{GUARD}{ADOPT}")));

/// A gap of more than this many zero bytes between two ids starts a new segment: the bytes
/// in between would cost more to read and write than the segment's own two arguments.
const GAP: u32 = 64;

/// Bit offsets of one chunk as byte masks, sorted by first byte.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Segments(Vec<(u32, Vec<u8>)>);

/// Redis numbers the bits of a bitmap from the most significant bit of each byte.
fn bit(offset: u32) -> u8 {
    0x80 >> (offset % 8)
}

impl Segments {
    /// The segments holding `offsets` (any order; duplicates are one bit).
    pub fn new(offsets: &[u32]) -> Segments {
        let mut sorted = offsets.to_vec();
        sorted.sort_unstable();
        let mut segs: Vec<(u32, Vec<u8>)> = Vec::new();
        for o in sorted {
            let byte = o / 8;
            match segs.last_mut() {
                Some((first, mask)) if byte <= *first + mask.len() as u32 + GAP => {
                    let at = (byte - *first) as usize;
                    if at >= mask.len() {
                        mask.resize(at + 1, 0);
                    }
                    mask[at] |= bit(o);
                }
                _ => segs.push((byte, vec![bit(o)])),
            }
        }
        Segments(segs)
    }

    /// How many segments.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// How many mask bytes all segments hold together (a claim's reply is this long).
    pub fn bytes(&self) -> usize {
        self.0.iter().map(|(_, m)| m.len()).sum()
    }

    /// Adds the segments to a script call as `first byte, mask` argument pairs.
    pub fn args(&self, call: &mut redis::ScriptInvocation<'_>) {
        for (first, mask) in &self.0 {
            call.arg(*first).arg(&mask[..]);
        }
    }

    /// Reads a claim's reply (the claimed masks, concatenated in segment order): whether each
    /// of `offsets` was claimed, in order. A duplicate offset is claimed once, the first time.
    pub fn claimed(&self, offsets: &[u32], reply: &[u8]) -> Option<Vec<bool>> {
        if reply.len() != self.bytes() {
            return None;
        }
        let mut reply = reply.to_vec();
        let mut starts = Vec::with_capacity(self.0.len());
        let mut at = 0;
        for (_, mask) in &self.0 {
            starts.push(at);
            at += mask.len();
        }
        offsets
            .iter()
            .map(|&o| {
                let byte = o / 8;
                let seg = self.0.partition_point(|(first, _)| *first <= byte);
                let (first, mask) = self.0.get(seg.checked_sub(1)?)?;
                if (byte - first) as usize >= mask.len() {
                    return None;
                }
                let i = starts[seg - 1] + (byte - first) as usize;
                let yes = reply[i] & bit(o) != 0;
                reply[i] &= !bit(o);
                Some(yes)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segments_cover_each_offset_once_and_split_at_wide_gaps() {
        let s = Segments::new(&[9, 0, 7, 9, 8 * (GAP + 3), 8 * (GAP + 3) + 1, 1_000_000]);
        assert_eq!(
            s,
            Segments(vec![
                (0, vec![0x81, 0x40]),
                // byte GAP + 3 is more than GAP zero bytes after byte 1: a new segment
                (GAP + 3, vec![0xC0]),
                (125_000, vec![0x80]),
            ])
        );
    }

    #[test]
    fn a_reply_reads_back_per_offset_and_a_duplicate_is_claimed_once() {
        let offsets = [9, 0, 7, 9, 600, 1_000_000];
        let s = Segments::new(&offsets);
        // Every bit claimed: the reply is the masks themselves.
        let all: Vec<u8> = s.0.iter().flat_map(|(_, m)| m.clone()).collect();
        assert_eq!(
            s.claimed(&offsets, &all),
            Some(vec![true, true, true, false, true, true])
        );
        let none = vec![0; all.len()];
        assert_eq!(s.claimed(&offsets, &none), Some(vec![false; 6]));
        assert_eq!(s.claimed(&offsets, &all[1..]), None, "a short reply");
    }
}
