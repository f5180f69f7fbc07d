//! Rendering a target's message straight into its JSON delivery record.
//!
//! This is the per-user hot path. Everything that is the same for every user of a target
//! (campaign id, occurrence, literal template text, the key's prefix) is JSON-escaped once,
//! when the renderer is built; per user, rendering appends those pieces and formats the user's
//! numbers into one string. The result is byte for byte what `serde_json` makes of the
//! [`Delivery`](crate::model::Delivery) that [`Target::render`] builds (a test checks).

use std::fmt::Write as _;

use crate::model::Target;
use crate::template::{Piece, Template, UserVars, Var};

/// A template as JSON string content: escaped literals and per-user numbers.
#[derive(Debug, Clone)]
struct JsonTemplate {
    pieces: Vec<JsonPiece>,
}

#[derive(Debug, Clone)]
enum JsonPiece {
    Escaped(String),
    Var(Var),
}

impl JsonTemplate {
    fn new(t: &Template) -> Self {
        let pieces = t
            .pieces()
            .map(|p| match p {
                Piece::Text(s) => JsonPiece::Escaped(escape(s)),
                Piece::Var(v) => JsonPiece::Var(v),
            })
            .collect();
        JsonTemplate { pieces }
    }

    /// Bytes of literal text.
    fn literal_len(&self) -> usize {
        self.pieces
            .iter()
            .map(|p| match p {
                JsonPiece::Escaped(s) => s.len(),
                JsonPiece::Var(_) => 0,
            })
            .sum()
    }

    fn render(&self, u: UserVars, id: &str, out: &mut String) {
        let mut num = itoa::Buffer::new();
        for p in &self.pieces {
            match p {
                JsonPiece::Escaped(s) => out.push_str(s),
                JsonPiece::Var(Var::UserId) => out.push_str(id),
                JsonPiece::Var(Var::UserLevel) => out.push_str(num.format(u.level)),
                JsonPiece::Var(Var::UserPoints) => out.push_str(num.format(u.points)),
                // A bound template holds only per-user placeholders.
                JsonPiece::Var(_) => {}
            }
        }
    }
}

/// JSON string content for `s`, without the quotes.
fn escape(s: &str) -> String {
    let quoted = serde_json::to_string(s).unwrap_or_else(|_| String::from("\"\""));
    quoted[1..quoted.len() - 1].to_owned()
}

/// Renders one target's delivery records.
#[derive(Debug, Clone)]
pub struct Renderer {
    /// `{"campaign":"…","occurrence":"…","user":`
    head: String,
    title: JsonTemplate,
    body: JsonTemplate,
    /// The key's escaped prefix: `campaign:` or `campaign:occurrence:`.
    key_prefix: String,
}

impl Renderer {
    /// A renderer for `target`.
    pub fn new(target: &Target) -> Self {
        let mut head = format!("{{\"campaign\":\"{}\"", escape(&target.campaign.id));
        if let Some(o) = &target.occurrence {
            let _ = write!(head, ",\"occurrence\":\"{}\"", escape(o));
        }
        head.push_str(",\"user\":");
        let key_prefix = escape(&target.key_prefix());
        Renderer {
            head,
            title: JsonTemplate::new(target.title()),
            body: JsonTemplate::new(target.body()),
            key_prefix,
        }
    }

    /// About how long one record is, for sizing buffers.
    pub fn typical_len(&self) -> usize {
        // Literals, plus room for the numbers and the fixed keys.
        self.head.len()
            + self.key_prefix.len()
            + self.title.literal_len()
            + self.body.literal_len()
            + 80
    }

    /// The delivery record of `user`, as one line of JSON (no newline).
    pub fn render(&self, u: UserVars) -> String {
        let mut out = String::with_capacity(self.head.len() + self.key_prefix.len() + 128);
        self.render_into(u, &mut out);
        out
    }

    /// Appends the delivery record of `user` to `out`.
    pub fn render_into(&self, u: UserVars, out: &mut String) {
        let mut num = itoa::Buffer::new();
        // The id is formatted once and copied wherever it appears.
        let id = num.format(u.id);
        out.push_str(&self.head);
        out.push_str(id);
        out.push_str(",\"title\":\"");
        self.title.render(u, id, out);
        out.push_str("\",\"body\":\"");
        self.body.render(u, id, out);
        out.push_str("\",\"key\":\"");
        out.push_str(&self.key_prefix);
        out.push_str(id);
        out.push_str("\"}");
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use chrono::{TimeZone, Utc};

    use super::*;
    use crate::model::{Audience, Campaign, Goods, Kind};

    fn target(body: &str, occurrence: Option<&str>) -> Target {
        target_titled("\"{goods.name}\" — 热卖", body, occurrence)
    }

    fn target_titled(title: &str, body: &str, occurrence: Option<&str>) -> Target {
        let c = Campaign {
            id: "hot-1".into(),
            kind: Kind::HotProduct,
            start: Utc.with_ymd_and_hms(2026, 3, 1, 0, 0, 0).unwrap(),
            end: Utc.with_ymd_and_hms(2026, 3, 8, 0, 0, 0).unwrap(),
            title: Template::parse(title).unwrap(),
            body: Template::parse(body).unwrap(),
            audience: Audience::default(),
            coupon: None,
            goods: Some(Goods {
                name: "Trail \\ shoes \u{1}".into(),
                desc: "Light,\n240 g".into(),
                keywords: "running".into(),
            }),
            every: Some(std::time::Duration::from_secs(3600)),
            priority: Default::default(),
            holdout: 0.0,
        };
        Target::new(Arc::new(c), occurrence.map(str::to_owned))
    }

    #[test]
    fn equals_serde_of_the_delivery() {
        for occurrence in [None, Some("2026-03-02T09:00:00Z")] {
            let t = target(
                "Hi {user.id} (L{user.level}, {user.points}): {goods.name} / {goods.desc} {{x}} {occurrence}",
                occurrence,
            );
            let r = Renderer::new(&t);
            for (id, level, points) in [(1, 0, 0), (42, 9, 123_456), (u32::MAX, 255, u64::MAX)] {
                let u = UserVars { id, level, points };
                let want = serde_json::to_string(&t.render(u, None)).unwrap();
                assert_eq!(r.render(u), want);
            }
        }
    }

    #[test]
    fn campaign_title_in_the_body_is_the_title_rendered_for_that_user() {
        let occurrence = Some("2026-03-02T09:00:00Z");
        let t = target_titled(
            "Hi {user.id}: {goods.name} {{new}} at {occurrence}",
            "{campaign.title} / L{user.level}",
            occurrence,
        );
        let r = Renderer::new(&t);
        let u = UserVars {
            id: 42,
            level: 7,
            points: 0,
        };
        let d = t.render(u, None);
        let title = "Hi 42: Trail \\ shoes \u{1} {new} at 2026-03-02T09:00:00Z";
        assert_eq!(d.title, title);
        assert_eq!(d.body, format!("{title} / L7"));
        assert_eq!(r.render(u), serde_json::to_string(&d).unwrap());
    }
}
