//! Synthetic users: user `id`'s attributes are a hash of `id` and a seed, so a run over
//! millions of users needs no input file and no worker holds any user.

use std::sync::Arc;

use crate::model::{Buckets, TagDict, User, UserRef};

/// The tags synthetic users draw from; tag id `i` in [`Synthetic::tags`] is `VOCABULARY[i]`.
pub const VOCABULARY: [&str; 8] = [
    "sports", "mom", "tech", "beauty", "travel", "food", "pets", "gaming",
];

/// Users `1..=n`, computed on demand by [`synthetic_user`].
#[derive(Debug, Clone)]
pub struct Synthetic {
    n: u32,
    seed: u64,
    tags: Arc<TagDict>,
}

/// A synthetic user's attributes, without allocating.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Attrs {
    /// Member level, 0–9.
    pub level: u8,
    /// Loyalty points, below 100 000.
    pub points: u64,
    /// Bit `i` set: the user has tag `VOCABULARY[i]`.
    pub tag_bits: u8,
}

/// SplitMix64's finaliser: a fast, well-mixed 64-bit hash.
fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The attributes of user `id` under `seed`.
pub(crate) fn attrs(seed: u64, id: u32) -> Attrs {
    let h = splitmix64(splitmix64(seed) ^ u64::from(id));
    let t = splitmix64(h);
    let mut tag_bits = 0u8;
    for i in 0..VOCABULARY.len() {
        // Two independent bits both set: probability 1/4.
        if (t >> (2 * i)) & 3 == 3 {
            tag_bits |= 1 << i;
        }
    }
    Attrs {
        level: ((h >> 32) % 10) as u8,
        points: (h & 0xFFFF_FFFF) % 100_000,
        tag_bits,
    }
}

/// The tag names of `tag_bits`, sorted by name (the order a table's `get` gives them in).
pub(crate) fn tag_names(tag_bits: u8) -> Vec<&'static str> {
    let mut names: Vec<&str> = (0..VOCABULARY.len())
        .filter(|i| tag_bits & (1 << i) != 0)
        .map(|i| VOCABULARY[i])
        .collect();
    names.sort_unstable();
    names
}

/// The attributes of synthetic user `id` under `seed`: a pure function, the same on every
/// worker and every run. Level 0..=9, points 0..100_000, each [`VOCABULARY`] tag with
/// probability 1/4 (sorted by name), token `t-{id}`, no time zone (the job's `default_tz`
/// applies to every synthetic user).
pub fn synthetic_user(seed: u64, id: u32) -> User {
    let a = attrs(seed, id);
    User {
        id,
        level: a.level,
        points: a.points,
        tags: tag_names(a.tag_bits)
            .into_iter()
            .map(str::to_owned)
            .collect(),
        token: Some(format!("t-{id}")),
        tz: None,
    }
}

impl Synthetic {
    /// Users `1..=n` under `seed`.
    pub fn new(n: u32, seed: u64) -> Self {
        let mut tags = TagDict::default();
        for t in VOCABULARY {
            tags.intern(t);
        }
        Synthetic {
            n,
            seed,
            tags: Arc::new(tags),
        }
    }

    /// How many users there are (ids `1..=n`).
    pub fn n(&self) -> u32 {
        self.n
    }

    /// The seed the users are drawn with.
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// The fixed dictionary of [`VOCABULARY`].
    pub fn tags(&self) -> &TagDict {
        &self.tags
    }

    /// The ids `[lo, hi)` holds, as an inclusive range of `u32`.
    fn ids_in(&self, lo: u64, hi: u64) -> Option<(u32, u32)> {
        let first = lo.max(1);
        let last = hi.min(u64::from(self.n) + 1).checked_sub(1)?;
        // Both lie in 1..=n here, so they fit in u32.
        (first <= last).then_some((first as u32, last as u32))
    }

    /// Every bucket covering ids `1..=n`, ascending.
    pub fn buckets(&self, b: Buckets) -> Vec<u32> {
        match self.ids_in(1, u64::from(self.n) + 1) {
            Some((first, last)) => (b.bucket_of(first)..=b.bucket_of(last)).collect(),
            None => Vec::new(),
        }
    }

    /// How many users have `lo <= id < hi`.
    pub fn count_in(&self, lo: u64, hi: u64) -> u64 {
        self.ids_in(lo, hi)
            .map_or(0, |(first, last)| u64::from(last - first) + 1)
    }

    /// Calls `f` for every user with `lo <= id < hi`, in ascending id order.
    pub fn for_each_in<F: FnMut(UserRef<'_>)>(&self, lo: u64, hi: u64, mut f: F) {
        let Some((first, last)) = self.ids_in(lo, hi) else {
            return;
        };
        let mut tags = [0u32; VOCABULARY.len()];
        for id in first..=last {
            let a = attrs(self.seed, id);
            let mut k = 0;
            for i in 0..VOCABULARY.len() {
                if a.tag_bits & (1 << i) != 0 {
                    tags[k] = i as u32;
                    k += 1;
                }
            }
            f(UserRef {
                id,
                level: a.level,
                points: a.points,
                tags: &tags[..k],
            });
        }
    }

    /// Whether user `id` exists.
    fn has(&self, id: u32) -> bool {
        (1..=self.n).contains(&id)
    }

    /// User `id`'s token, `t-{id}`.
    pub fn token(&self, id: u32) -> Option<String> {
        self.has(id).then(|| format!("t-{id}"))
    }

    /// User `id` in full.
    pub fn get(&self, id: u32) -> Option<User> {
        self.has(id).then(|| synthetic_user(self.seed, id))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn users_are_a_pure_function_of_seed_and_id() {
        assert_eq!(synthetic_user(7, 12345), synthetic_user(7, 12345));
        let a: Vec<User> = (1..200).map(|id| synthetic_user(0, id)).collect();
        let b: Vec<User> = (1..200).map(|id| synthetic_user(1, id)).collect();
        assert_ne!(a, b, "the seed matters");
        let s = Synthetic::new(100, 3);
        assert_eq!(s.get(5), Some(synthetic_user(3, 5)));
        assert_eq!(s.token(5).as_deref(), Some("t-5"));
        assert_eq!((s.get(0), s.get(101), s.token(101)), (None, None, None));
    }

    #[test]
    fn attributes_have_the_promised_ranges_and_rates() {
        let n = 40_000u32;
        let mut per_tag = [0u32; 8];
        let mut levels = [0u32; 10];
        for id in 1..=n {
            let u = synthetic_user(0, id);
            assert!(u.level <= 9 && u.points < 100_000);
            assert!(u.tags.windows(2).all(|w| w[0] < w[1]));
            levels[u.level as usize] += 1;
            for t in &u.tags {
                let i = VOCABULARY.iter().position(|v| v == t).unwrap();
                per_tag[i] += 1;
            }
        }
        for c in per_tag {
            assert!((9_000..11_000).contains(&c), "tag rate {c} of {n}");
        }
        assert!(levels.iter().all(|&c| c > 3_000), "{levels:?}");
    }

    #[test]
    fn iteration_matches_count_and_get() {
        let s = Synthetic::new(1000, 9);
        for (lo, hi) in [
            (0, 1 << 32),
            (0, 1),
            (1, 2),
            (500, 600),
            (999, 5000),
            (600, 500),
        ] {
            let mut seen = Vec::new();
            s.for_each_in(lo, hi, |u| {
                let full = synthetic_user(9, u.id);
                let names: Vec<&str> = u.tags.iter().map(|&t| s.tags().name(t).unwrap()).collect();
                assert!(u.tags.windows(2).all(|w| w[0] < w[1]));
                let mut sorted = names.clone();
                sorted.sort_unstable();
                assert_eq!(
                    (u.level, u.points, sorted),
                    (
                        full.level,
                        full.points,
                        full.tags.iter().map(String::as_str).collect()
                    )
                );
                seen.push(u.id);
            });
            assert_eq!(seen.len() as u64, s.count_in(lo, hi), "[{lo}, {hi})");
            assert!(seen.windows(2).all(|w| w[0] + 1 == w[1]));
        }
        assert_eq!(s.count_in(0, 1 << 32), 1000);
        assert_eq!(Synthetic::new(0, 0).count_in(0, 1 << 32), 0);
        let max = Synthetic::new(u32::MAX, 0);
        assert_eq!(max.count_in(u64::from(u32::MAX) - 1, 1 << 32), 2);
    }

    #[test]
    fn buckets_cover_every_user_once() {
        let s = Synthetic::new(1234, 1);
        for size in [1, 7, 1000, 5000] {
            let b = Buckets::new(size);
            let buckets = s.buckets(b);
            let mut next = 1;
            for &k in &buckets {
                let (lo, hi) = b.bucket_range(k);
                assert!(s.count_in(lo, hi) > 0);
                s.for_each_in(lo, hi, |u| {
                    assert_eq!(u.id, next);
                    next += 1;
                });
            }
            assert_eq!(next, 1235, "size {size}");
        }
        assert!(Synthetic::new(0, 0).buckets(Buckets::new(10)).is_empty());
        assert_eq!(
            Synthetic::new(u32::MAX, 0).buckets(Buckets::new(u32::MAX)),
            [0, 1]
        );
    }
}
