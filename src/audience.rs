//! Persona matching: does a user belong to a campaign's audience?
//!
//! An [`Audience`] names tags as strings; a source interns its users' tags, so the audience is
//! compiled once per source into integer tag ids and the per-user test compares integers.

use crate::model::{Audience, TagDict, UserRef};

/// An audience compiled against one source's tag dictionary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AudienceFilter {
    min_level: u8,
    max_level: u8,
    min_points: u64,
    max_points: u64,
    /// Sorted tag ids; the user needs one of them (empty: no condition).
    any: Vec<u32>,
    /// Sorted tag ids; the user needs all of them.
    all: Vec<u32>,
    /// A tag the audience requires is one no user has, or a tags_any list has no known tag.
    impossible: bool,
}

impl AudienceFilter {
    /// Compiles `audience` against `tags`.
    pub fn compile(audience: &Audience, tags: &TagDict) -> Self {
        let mut impossible = false;
        let mut all = Vec::new();
        for t in &audience.tags_all {
            match tags.get(t) {
                Some(id) => all.push(id),
                None => impossible = true,
            }
        }
        let mut any: Vec<u32> = audience
            .tags_any
            .iter()
            .filter_map(|t| tags.get(t))
            .collect();
        if !audience.tags_any.is_empty() && any.is_empty() {
            impossible = true;
        }
        all.sort_unstable();
        all.dedup();
        any.sort_unstable();
        any.dedup();
        AudienceFilter {
            min_level: audience.min_level.unwrap_or(0),
            max_level: audience.max_level.unwrap_or(u8::MAX),
            min_points: audience.min_points.unwrap_or(0),
            max_points: audience.max_points.unwrap_or(u64::MAX),
            any,
            all,
            impossible,
        }
    }

    /// Whether `user` is in the audience.
    #[inline]
    pub fn matches(&self, user: &UserRef<'_>) -> bool {
        !self.impossible
            && (self.min_level..=self.max_level).contains(&user.level)
            && (self.min_points..=self.max_points).contains(&user.points)
            && (self.any.is_empty() || self.any.iter().any(|t| user.tags.binary_search(t).is_ok()))
            && self.all.iter().all(|t| user.tags.binary_search(t).is_ok())
    }

    /// Whether the audience matches every user, whoever they are: it has no condition (the
    /// common "push to every user" campaign). A loop over users asks once, not per user.
    pub fn is_everyone(&self) -> bool {
        !self.impossible
            && (self.min_level, self.max_level) == (0, u8::MAX)
            && (self.min_points, self.max_points) == (0, u64::MAX)
            && self.any.is_empty()
            && self.all.is_empty()
    }

    /// Whether the audience can match nobody, whoever the users are.
    pub fn is_impossible(&self) -> bool {
        self.impossible || self.min_level > self.max_level || self.min_points > self.max_points
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dict() -> TagDict {
        let mut d = TagDict::default();
        for t in ["sports", "mom", "tech", "运动"] {
            d.intern(t);
        }
        d
    }

    fn user<'a>(level: u8, points: u64, tags: &'a [u32]) -> UserRef<'a> {
        UserRef {
            id: 1,
            level,
            points,
            tags,
        }
    }

    #[test]
    fn everyone_without_conditions() {
        let f = AudienceFilter::compile(&Audience::default(), &dict());
        assert!(f.matches(&user(0, 0, &[])));
        assert!(f.matches(&user(255, u64::MAX, &[0, 1])));
        assert!(f.is_everyone());
    }

    #[test]
    fn any_condition_is_not_everyone() {
        let conditions = [
            Audience {
                min_level: Some(1),
                ..Audience::default()
            },
            Audience {
                max_points: Some(10),
                ..Audience::default()
            },
            Audience {
                tags_any: vec!["mom".into()],
                ..Audience::default()
            },
            Audience {
                tags_all: vec!["no-such-tag".into()],
                ..Audience::default()
            },
        ];
        for audience in conditions {
            let f = AudienceFilter::compile(&audience, &dict());
            assert!(!f.is_everyone(), "{audience:?}");
            // The user no condition above admits all of.
            assert!(!f.matches(&user(0, u64::MAX, &[])), "{audience:?}");
        }
    }

    #[test]
    fn bounds_are_inclusive() {
        let a = Audience {
            min_level: Some(3),
            max_level: Some(5),
            min_points: Some(500),
            max_points: Some(1000),
            ..Audience::default()
        };
        let f = AudienceFilter::compile(&a, &dict());
        assert!(f.matches(&user(3, 500, &[])));
        assert!(f.matches(&user(5, 1000, &[])));
        assert!(!f.matches(&user(2, 600, &[])));
        assert!(!f.matches(&user(6, 600, &[])));
        assert!(!f.matches(&user(4, 499, &[])));
        assert!(!f.matches(&user(4, 1001, &[])));
    }

    #[test]
    fn tags_any_and_all() {
        let d = dict();
        let a = Audience {
            tags_any: vec!["sports".into(), "运动".into()],
            tags_all: vec!["mom".into()],
            ..Audience::default()
        };
        let f = AudienceFilter::compile(&a, &d);
        let (sports, mom, tech, yundong) = (0, 1, 2, 3);
        assert!(f.matches(&user(1, 1, &[sports, mom])));
        assert!(f.matches(&user(1, 1, &[mom, yundong])));
        assert!(!f.matches(&user(1, 1, &[sports])));
        assert!(!f.matches(&user(1, 1, &[mom, tech])));
    }

    #[test]
    fn unknown_tags_match_nobody() {
        let d = dict();
        let all = Audience {
            tags_all: vec!["never-seen".into()],
            ..Audience::default()
        };
        assert!(AudienceFilter::compile(&all, &d).is_impossible());
        let any = Audience {
            tags_any: vec!["never-seen".into()],
            ..Audience::default()
        };
        let f = AudienceFilter::compile(&any, &d);
        assert!(!f.matches(&user(1, 1, &[0, 1, 2, 3])));
        // An unknown tag among known ones in tags_any does not block the known ones.
        let mixed = Audience {
            tags_any: vec!["never-seen".into(), "tech".into()],
            ..Audience::default()
        };
        assert!(AudienceFilter::compile(&mixed, &d).matches(&user(1, 1, &[2])));
    }
}
