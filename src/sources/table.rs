//! A user file held in memory as id-ordered columns.
//!
//! One row per distinct id, sorted by id, so an id range is two binary searches and a scan of
//! contiguous memory. Tags are interned ids in one flat array; tokens share one string arena;
//! a time zone is chrono-tz's two-byte enum (`Option<Tz>` fits in the same two bytes).
//! About 27 bytes a user plus 4 per tag and the token text: 10 million synthetic users (tokens
//! `t-{id}`) take about 0.4 GB.

use std::fmt;
use std::ops::Range;

use chrono_tz::Tz;

use crate::error::{Error, Result};
use crate::model::{Buckets, TagDict, User, UserRef};

/// Users from a file, one row per distinct id, in ascending id order.
#[derive(Clone)]
pub struct UserTable {
    ids: Vec<u32>,
    levels: Vec<u8>,
    points: Vec<u64>,
    /// Every user's tag ids, back to back; each user's are sorted and distinct.
    tag_ids: Vec<u32>,
    /// User `i`'s tags are `tag_ids[tag_offsets[i]..tag_offsets[i + 1]]`.
    tag_offsets: Vec<u32>,
    /// Every user's token, back to back.
    tokens: String,
    /// User `i`'s token is `tokens[token_offsets[i]..token_offsets[i + 1]]`; empty is none.
    token_offsets: Vec<u64>,
    /// User `i`'s time zone, if the input gave one; empty where it gave none for any user.
    zones: Vec<Option<Tz>>,
    tags: TagDict,
}

impl fmt::Debug for UserTable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UserTable")
            .field("users", &self.ids.len())
            .field("tags", &self.tags.len())
            .field("first_id", &self.ids.first())
            .field("last_id", &self.ids.last())
            .finish()
    }
}

impl UserTable {
    /// How many users there are.
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    /// Whether there are no users.
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// The dictionary the users' tag ids refer to.
    pub fn tags(&self) -> &TagDict {
        &self.tags
    }

    /// Every user id, ascending.
    pub fn ids(&self) -> &[u32] {
        &self.ids
    }

    /// The rows of the users with `lo <= id < hi`.
    fn rows_in(&self, lo: u64, hi: u64) -> Range<usize> {
        let start = self.ids.partition_point(|&id| u64::from(id) < lo);
        let end = self.ids.partition_point(|&id| u64::from(id) < hi);
        start..end.max(start)
    }

    /// How many users have `lo <= id < hi`.
    pub fn count_in(&self, lo: u64, hi: u64) -> u64 {
        self.rows_in(lo, hi).len() as u64
    }

    /// Calls `f` for every user with `lo <= id < hi`, in ascending id order.
    pub fn for_each_in<F: FnMut(UserRef<'_>)>(&self, lo: u64, hi: u64, mut f: F) {
        let rows = self.rows_in(lo, hi);
        let offsets = &self.tag_offsets[rows.start..=rows.end];
        let columns = self.ids[rows.clone()]
            .iter()
            .zip(&self.levels[rows.clone()])
            .zip(&self.points[rows])
            .zip(offsets.windows(2));
        for (((&id, &level), &points), span) in columns {
            f(UserRef {
                id,
                level,
                points,
                tags: &self.tag_ids[span[0] as usize..span[1] as usize],
            });
        }
    }

    /// Ascending ids of the buckets that hold at least one user.
    pub fn buckets(&self, b: Buckets) -> Vec<u32> {
        let mut out: Vec<u32> = Vec::new();
        for &id in &self.ids {
            let bucket = b.bucket_of(id);
            if out.last() != Some(&bucket) {
                out.push(bucket);
            }
        }
        out
    }

    /// Gives back the room that growing the columns left over.
    fn shrink_to_fit(&mut self) {
        self.ids.shrink_to_fit();
        self.levels.shrink_to_fit();
        self.points.shrink_to_fit();
        self.tag_ids.shrink_to_fit();
        self.tag_offsets.shrink_to_fit();
        self.tokens.shrink_to_fit();
        self.token_offsets.shrink_to_fit();
        self.zones.shrink_to_fit();
    }

    fn row_of(&self, id: u32) -> Option<usize> {
        self.ids.binary_search(&id).ok()
    }

    fn token_at(&self, row: usize) -> Option<&str> {
        let span = self.token_offsets[row] as usize..self.token_offsets[row + 1] as usize;
        Some(&self.tokens[span]).filter(|t| !t.is_empty())
    }

    /// The push token of user `id`, if the user exists and has one.
    pub fn token(&self, id: u32) -> Option<&str> {
        self.row_of(id).and_then(|row| self.token_at(row))
    }

    /// Whether any user has a time zone of their own.
    pub fn zoned(&self) -> bool {
        !self.zones.is_empty()
    }

    /// The time zone of user `id`, if the user exists and has one.
    pub fn tz(&self, id: u32) -> Option<Tz> {
        self.row_of(id)
            .and_then(|row| self.zones.get(row).copied().flatten())
    }

    /// User `id` in full; its tags are distinct and sorted by name.
    pub fn get(&self, id: u32) -> Option<User> {
        let row = self.row_of(id)?;
        let span = self.tag_offsets[row] as usize..self.tag_offsets[row + 1] as usize;
        let mut tags: Vec<String> = self.tag_ids[span]
            .iter()
            .filter_map(|&t| self.tags.name(t).map(str::to_owned))
            .collect();
        tags.sort_unstable();
        Some(User {
            id,
            level: self.levels[row],
            points: self.points[row],
            tags,
            token: self.token_at(row).map(str::to_owned),
            tz: self.zones.get(row).copied().flatten(),
        })
    }
}

/// Collects users in input order, then sorts them into a [`UserTable`].
#[derive(Debug)]
pub(crate) struct TableBuilder {
    /// The rows so far, in input order (not yet sorted or deduplicated).
    rows: UserTable,
    /// Whether every id so far was greater than the one before, so no sort is needed.
    ascending: bool,
    scratch: Vec<u32>,
}

impl Default for TableBuilder {
    fn default() -> Self {
        TableBuilder {
            rows: UserTable {
                ids: Vec::new(),
                levels: Vec::new(),
                points: Vec::new(),
                tag_ids: Vec::new(),
                tag_offsets: vec![0],
                tokens: String::new(),
                token_offsets: vec![0],
                zones: Vec::new(),
                tags: TagDict::default(),
            },
            ascending: true,
            scratch: Vec::new(),
        }
    }
}

impl TableBuilder {
    /// Adds a user; a later user with the same id replaces it.
    pub fn push(&mut self, user: &User) -> Result<()> {
        let rows = &mut self.rows;
        // Rows are addressed by u32 in `finish`.
        if rows.ids.len() >= u32::MAX as usize {
            return Err(Error::runtime(
                "more than 4294967295 user lines in one file",
            ));
        }
        self.scratch.clear();
        self.scratch
            .extend(user.tags.iter().map(|t| rows.tags.intern(t)));
        self.scratch.sort_unstable();
        self.scratch.dedup();
        rows.tag_ids.extend_from_slice(&self.scratch);
        let tag_end = u32::try_from(rows.tag_ids.len())
            .map_err(|_| Error::runtime("more than 4294967295 user tags in one file"))?;
        rows.tag_offsets.push(tag_end);
        rows.tokens.push_str(user.token.as_deref().unwrap_or(""));
        rows.token_offsets.push(rows.tokens.len() as u64);
        if rows.ids.last().is_some_and(|&last| last >= user.id) {
            self.ascending = false;
        }
        rows.ids.push(user.id);
        rows.levels.push(user.level);
        rows.points.push(user.points);
        rows.zones.push(user.tz);
        Ok(())
    }

    /// The table: rows sorted by id, and of each id only the last one pushed.
    pub fn finish(self) -> UserTable {
        let mut rows = self.rows;
        if rows.zones.iter().all(Option::is_none) {
            rows.zones = Vec::new();
        }
        if self.ascending {
            rows.shrink_to_fit();
            return rows;
        }
        // Sorting by (id, input position) is a stable sort by id.
        let mut order: Vec<u32> = (0..rows.ids.len() as u32).collect();
        order.sort_unstable_by_key(|&r| (rows.ids[r as usize], r));
        let mut kept = 0;
        for i in 0..order.len() {
            let last_of_id = order
                .get(i + 1)
                .is_none_or(|&next| rows.ids[next as usize] != rows.ids[order[i] as usize]);
            if last_of_id {
                order[kept] = order[i];
                kept += 1;
            }
        }
        order.truncate(kept);
        gather(rows, &order)
    }
}

/// The rows `order` of `rows`, in that order. Each old column is freed once copied, to keep
/// the peak memory of a big load near one table plus one column.
fn gather(rows: UserTable, order: &[u32]) -> UserTable {
    let UserTable {
        ids,
        levels,
        points,
        tag_ids,
        tag_offsets,
        tokens,
        token_offsets,
        zones,
        tags,
    } = rows;
    let pick = |r: &u32| *r as usize;
    let new_ids = order.iter().map(|r| ids[pick(r)]).collect();
    drop(ids);
    let new_levels = order.iter().map(|r| levels[pick(r)]).collect();
    drop(levels);
    let new_points = order.iter().map(|r| points[pick(r)]).collect();
    drop(points);
    let new_zones = match zones.is_empty() {
        true => Vec::new(),
        false => order.iter().map(|r| zones[pick(r)]).collect(),
    };
    drop(zones);

    let mut new_tag_ids = Vec::new();
    let mut new_tag_offsets = Vec::with_capacity(order.len() + 1);
    new_tag_offsets.push(0);
    for r in order {
        let r = pick(r);
        let span = tag_offsets[r] as usize..tag_offsets[r + 1] as usize;
        new_tag_ids.extend_from_slice(&tag_ids[span]);
        // No more tags than before, which fit in u32.
        new_tag_offsets.push(new_tag_ids.len() as u32);
    }
    drop((tag_ids, tag_offsets));
    new_tag_ids.shrink_to_fit();

    let mut new_tokens = String::new();
    let mut new_token_offsets = Vec::with_capacity(order.len() + 1);
    new_token_offsets.push(0);
    for r in order {
        let r = pick(r);
        new_tokens.push_str(&tokens[token_offsets[r] as usize..token_offsets[r + 1] as usize]);
        new_token_offsets.push(new_tokens.len() as u64);
    }
    new_tokens.shrink_to_fit();

    UserTable {
        ids: new_ids,
        levels: new_levels,
        points: new_points,
        tag_ids: new_tag_ids,
        tag_offsets: new_tag_offsets,
        tokens: new_tokens,
        token_offsets: new_token_offsets,
        zones: new_zones,
        tags,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(id: u32, level: u8, tags: &[&str], token: Option<&str>) -> User {
        User {
            id,
            level,
            points: u64::from(id) * 10,
            tags: tags.iter().map(|t| t.to_string()).collect(),
            token: token.map(str::to_owned),
            tz: None,
        }
    }

    fn build(users: &[User]) -> UserTable {
        let mut b = TableBuilder::default();
        for u in users {
            b.push(u).unwrap();
        }
        b.finish()
    }

    /// `(id, level, tag names)` of every user in `[lo, hi)`, as `for_each_in` gives them.
    fn scan(t: &UserTable, lo: u64, hi: u64) -> Vec<(u32, u8, Vec<String>)> {
        let mut out = Vec::new();
        t.for_each_in(lo, hi, |u| {
            assert!(
                u.tags.windows(2).all(|w| w[0] < w[1]),
                "tags sorted, distinct"
            );
            let names = u.tags.iter().map(|&i| t.tags().name(i).unwrap().to_owned());
            out.push((u.id, u.level, names.collect()));
        });
        out
    }

    #[test]
    fn unsorted_repeated_sparse_ids_sort_and_the_last_line_wins() {
        let t = build(&[
            user(u32::MAX, 1, &["b", "a", "b"], Some("max")),
            user(7, 1, &["a"], Some("old")),
            user(1, 2, &[], None),
            user(7, 9, &["мама", "运动"], None),
            user(1000, 3, &["a"], Some("k")),
        ]);
        assert_eq!(t.ids(), [1, 7, 1000, u32::MAX]);
        assert_eq!(t.len(), 4);
        let seven = t.get(7).unwrap();
        assert_eq!((seven.level, seven.token), (9, None));
        assert_eq!(seven.tags, ["мама", "运动"]);
        assert_eq!(t.get(u32::MAX).unwrap().tags, ["a", "b"]);
        assert_eq!(t.token(u32::MAX), Some("max"));
        assert_eq!(t.token(1000), Some("k"));
        assert_eq!(t.token(1), None);
        assert_eq!(t.get(8), None);

        let ids = |lo, hi| {
            scan(&t, lo, hi)
                .into_iter()
                .map(|u| u.0)
                .collect::<Vec<_>>()
        };
        assert_eq!(ids(0, 1 << 32), [1, 7, 1000, u32::MAX]);
        assert_eq!(ids(2, 1000), [7]);
        assert_eq!(ids(7, 1001), [7, 1000]);
        assert_eq!(ids(u64::from(u32::MAX), 1 << 32), [u32::MAX]);
        assert!(ids(8, 1000).is_empty());
        assert!(ids(500, 10).is_empty());
        assert_eq!(t.count_in(0, 1 << 32), 4);
        assert_eq!(t.count_in(2, 1000), 1);
        assert_eq!(t.count_in(500, 10), 0);
        assert_eq!(scan(&t, 7, 8)[0].2, ["мама", "运动"]);
    }

    #[test]
    fn zones_follow_their_user_through_the_sort_and_take_two_bytes() {
        assert_eq!(std::mem::size_of::<Option<Tz>>(), 2);
        let zoned = |id, tz| User {
            tz,
            ..user(id, 1, &[], None)
        };
        let t = build(&[
            zoned(9, Some(Tz::Asia__Shanghai)),
            zoned(3, None),
            zoned(5, Some(Tz::America__New_York)),
            zoned(9, Some(Tz::Europe__Paris)),
            zoned(5, None),
        ]);
        assert_eq!(t.ids(), [3, 5, 9]);
        assert_eq!(
            (t.tz(3), t.tz(5), t.tz(9)),
            (None, None, Some(Tz::Europe__Paris))
        );
        assert_eq!(t.get(9).unwrap().tz, Some(Tz::Europe__Paris));
        assert_eq!(t.tz(4), None);
        let ascending = build(&[zoned(1, Some(Tz::UTC)), zoned(2, None)]);
        assert_eq!((ascending.tz(1), ascending.tz(2)), (Some(Tz::UTC), None));
    }

    #[test]
    fn ascending_input_needs_no_sort_and_gives_the_same_table() {
        let users = [user(1, 1, &["x"], Some("a")), user(5, 2, &[], None)];
        let sorted = build(&users);
        let reversed = build(&[users[1].clone(), users[0].clone()]);
        assert_eq!(scan(&sorted, 0, 10), scan(&reversed, 0, 10));
        assert_eq!(sorted.get(1), reversed.get(1));
        assert_eq!(sorted.get(5), reversed.get(5));
    }

    #[test]
    fn buckets_hold_users_and_cover_each_exactly_once() {
        let ids = [3u32, 9, 10, 11, 250, 251, 99_999, u32::MAX];
        let t = build(
            &ids.iter()
                .rev()
                .map(|&i| user(i, 0, &[], None))
                .collect::<Vec<_>>(),
        );
        for size in [1, 2, 10, 100, 1 << 20, u32::MAX] {
            let b = Buckets::new(size);
            let buckets = t.buckets(b);
            assert!(buckets.windows(2).all(|w| w[0] < w[1]));
            let mut seen = Vec::new();
            for &k in &buckets {
                let (lo, hi) = b.bucket_range(k);
                assert!(t.count_in(lo, hi) > 0, "bucket {k} of size {size} is empty");
                t.for_each_in(lo, hi, |u| seen.push(u.id));
            }
            assert_eq!(seen, ids, "size {size}");
        }
        assert!(build(&[]).buckets(Buckets::new(10)).is_empty());
    }
}
