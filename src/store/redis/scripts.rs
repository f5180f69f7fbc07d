//! The Lua scripts of the Redis store, and the byte masks its claims and marks travel as.
//!
//! A batch's ids are mostly consecutive, so a claim or mark does not send one offset per id
//! but [`Segments`]: runs of bitmap bytes `(first byte, mask)` whose set bits are the ids.
//! The scripts then work a byte (eight ids) at a time with Lua's bit operations, and read and
//! write each bitmap once per segment (GETRANGE / SETRANGE) instead of calling SETBIT per id
//! and bitmap — a Redis call from Lua costs more than the whole byte's arithmetic.

use std::sync::LazyLock;

use redis::Script;

/// Lua shared by [`CLAIM`] and [`MARK`]: ARGV is `first byte, mask, first byte, mask, …`.
const SEGMENTS: &str = r"
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

/// Claims one chunk's segments: sets each masked bit in the granted bitmap (KEYS[1]); a newly
/// set one is recorded in the run's in-flight bitmap (KEYS[2]), and one already in that bitmap
/// is this run's (adopted from a dead run, or claimed by a call whose reply was lost and is
/// retried) and is answered as claimed again. Returns, per segment, the mask of the claimed.
const CLAIM: &str = r"
local out = {}
for s = 1, #ARGV, 2 do
  local first, want = tonumber(ARGV[s]), ARGV[s + 1]
  local n = #want
  local w, g, f = bytes(want, n), load(1, first, n), load(2, first, n)
  local claimed = {}
  for j = 1, n do
    local new = bit.band(w[j], bit.bnot(g[j]))
    claimed[j] = bit.bor(new, bit.band(w[j], bit.band(g[j], f[j])))
    g[j] = bit.bor(g[j], w[j])
    f[j] = bit.bor(f[j], new)
  end
  redis.call('SETRANGE', KEYS[1], first, text(g))
  redis.call('SETRANGE', KEYS[2], first, text(f))
  out[#out + 1] = text(claimed)
end
return table.concat(out)
";

/// Marks one chunk's segments done: clears them in the run's in-flight bitmap (KEYS[2]) and,
/// when KEYS[1] is given, sets them in the dead bitmap. Done is "claimed and in no in-flight
/// bitmap", so no bitmap of its own is kept. An emptied in-flight bitmap is deleted at the end
/// of the run ([`DROP_EMPTY`]), not here: counting its bits on every call would cost more than
/// the marking.
const MARK: &str = r"
for s = 1, #ARGV, 2 do
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

/// Adopts a dead run's in-flight bitmap of one chunk (KEYS[1]) into ours (KEYS[2]) unless its
/// lease (KEYS[3]) still lives: an id in it was claimed and never marked done (marking clears
/// it), so it joins our in-flight bitmap and our claims hand it out again. Returns how many.
pub const ADOPT: &str = r"
if redis.call('EXISTS', KEYS[3]) == 1 then return 0 end
local n = redis.call('BITCOUNT', KEYS[1])
redis.call('BITOP', 'OR', KEYS[2], KEYS[2], KEYS[1])
redis.call('DEL', KEYS[1])
return n
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
    LazyLock::new(|| Script::new(&format!("{SEGMENTS}{CLAIM}")));
/// The mark script, hashed once.
pub static MARK_SCRIPT: LazyLock<Script> =
    LazyLock::new(|| Script::new(&format!("{SEGMENTS}{MARK}")));

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

    /// Adds the segments to a script call as `first byte, mask` argument pairs.
    pub fn args(&self, call: &mut redis::ScriptInvocation<'_>) {
        for (first, mask) in &self.0 {
            call.arg(*first).arg(&mask[..]);
        }
    }

    /// Reads a claim's reply (the claimed masks, concatenated in segment order): whether each
    /// of `offsets` was claimed, in order. A duplicate offset is claimed once, the first time.
    pub fn claimed(&self, offsets: &[u32], reply: &[u8]) -> Option<Vec<bool>> {
        let total: usize = self.0.iter().map(|(_, m)| m.len()).sum();
        if reply.len() != total {
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
