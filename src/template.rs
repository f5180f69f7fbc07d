//! Message templates: `"Hi {user.id}, {goods.name} is back"`.
//!
//! A template is parsed once, when the job is loaded, so an unknown placeholder is a job-file
//! error found before any push; rendering is then a walk over literal and placeholder parts.
//! `{{` and `}}` stand for literal braces.

use std::fmt::Write as _;

/// A value a template can name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Var {
    /// `{user.id}`
    UserId,
    /// `{user.level}`
    UserLevel,
    /// `{user.points}`
    UserPoints,
    /// `{campaign.id}`
    CampaignId,
    /// `{campaign.title}`
    CampaignTitle,
    /// `{occurrence}`: the schedule tick, for hot products.
    Occurrence,
    /// `{coupon.id}`
    CouponId,
    /// `{coupon.amount}`
    CouponAmount,
    /// `{goods.name}`
    GoodsName,
    /// `{goods.desc}`
    GoodsDesc,
    /// `{goods.keywords}`
    GoodsKeywords,
}

impl Var {
    /// Every placeholder name a template may use.
    pub const NAMES: &'static [(&'static str, Var)] = &[
        ("user.id", Var::UserId),
        ("user.level", Var::UserLevel),
        ("user.points", Var::UserPoints),
        ("campaign.id", Var::CampaignId),
        ("campaign.title", Var::CampaignTitle),
        ("occurrence", Var::Occurrence),
        ("coupon.id", Var::CouponId),
        ("coupon.amount", Var::CouponAmount),
        ("goods.name", Var::GoodsName),
        ("goods.desc", Var::GoodsDesc),
        ("goods.keywords", Var::GoodsKeywords),
    ];

    fn from_name(name: &str) -> Option<Var> {
        Var::NAMES.iter().find(|(n, _)| *n == name).map(|(_, v)| *v)
    }

    /// Whether the value differs from user to user.
    fn is_per_user(self) -> bool {
        matches!(self, Var::UserId | Var::UserLevel | Var::UserPoints)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Text(String),
    Var(Var),
}

/// One piece of a parsed template.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Piece<'a> {
    /// Literal text.
    Text(&'a str),
    /// A placeholder.
    Var(Var),
}

/// A parsed template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    source: String,
    parts: Vec<Part>,
}

/// The per-user values a template is rendered with.
#[derive(Debug, Clone, Copy)]
pub struct UserVars {
    /// `{user.id}`
    pub id: u32,
    /// `{user.level}`
    pub level: u8,
    /// `{user.points}`
    pub points: u64,
}

/// Why a template could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TemplateError {
    /// `{name}` is not a placeholder fanout knows.
    #[error("unknown placeholder {{{0}}} (known: {known})", known = known_names())]
    Unknown(String),
    /// A `{` without its `}`.
    #[error("unclosed '{{' at byte {0} (write '{{{{' for a literal brace)")]
    Unclosed(usize),
    /// A `}` without its `{`.
    #[error("stray '}}' at byte {0} (write '}}}}' for a literal brace)")]
    Stray(usize),
}

fn known_names() -> String {
    Var::NAMES
        .iter()
        .map(|(n, _)| format!("{{{n}}}"))
        .collect::<Vec<_>>()
        .join(" ")
}

impl Template {
    /// Parses `source`, refusing unknown placeholders.
    pub fn parse(source: &str) -> Result<Template, TemplateError> {
        let mut parts = Vec::new();
        let mut text = String::new();
        let mut chars = source.char_indices().peekable();
        while let Some((at, c)) = chars.next() {
            match c {
                '{' if matches!(chars.peek(), Some((_, '{'))) => {
                    chars.next();
                    text.push('{');
                }
                '}' if matches!(chars.peek(), Some((_, '}'))) => {
                    chars.next();
                    text.push('}');
                }
                '{' => {
                    let rest = &source[at + 1..];
                    let close = rest.find('}').ok_or(TemplateError::Unclosed(at))?;
                    let name = rest[..close].trim();
                    let var = Var::from_name(name)
                        .ok_or_else(|| TemplateError::Unknown(name.to_owned()))?;
                    if !text.is_empty() {
                        parts.push(Part::Text(std::mem::take(&mut text)));
                    }
                    parts.push(Part::Var(var));
                    // Skip the placeholder's characters.
                    while let Some((i, _)) = chars.peek() {
                        if *i > at + close + 1 {
                            break;
                        }
                        chars.next();
                    }
                }
                '}' => return Err(TemplateError::Stray(at)),
                c => text.push(c),
            }
        }
        if !text.is_empty() {
            parts.push(Part::Text(text));
        }
        Ok(Template {
            source: source.to_owned(),
            parts,
        })
    }

    /// The template as written.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Whether rendering depends on the user (otherwise render once per campaign).
    pub fn is_per_user(&self) -> bool {
        self.parts
            .iter()
            .any(|p| matches!(p, Part::Var(v) if v.is_per_user()))
    }

    /// The template as literal text and placeholders, in order.
    pub fn pieces(&self) -> impl Iterator<Item = Piece<'_>> + '_ {
        self.parts.iter().map(|p| match p {
            Part::Text(t) => Piece::Text(t),
            Part::Var(v) => Piece::Var(*v),
        })
    }

    /// The placeholders used, in order.
    pub fn vars(&self) -> impl Iterator<Item = Var> + '_ {
        self.parts.iter().filter_map(|p| match p {
            Part::Var(v) => Some(*v),
            Part::Text(_) => None,
        })
    }

    /// Appends the rendered template to `out`; `campaign` supplies every non-user value.
    pub fn render_into(&self, out: &mut String, user: UserVars, campaign: &dyn Fn(Var) -> String) {
        for part in &self.parts {
            match part {
                Part::Text(t) => out.push_str(t),
                Part::Var(Var::UserId) => {
                    let _ = write!(out, "{}", user.id);
                }
                Part::Var(Var::UserLevel) => {
                    let _ = write!(out, "{}", user.level);
                }
                Part::Var(Var::UserPoints) => {
                    let _ = write!(out, "{}", user.points);
                }
                Part::Var(v) => out.push_str(&campaign(*v)),
            }
        }
    }

    /// Resolves every non-user placeholder with `campaign`, leaving a template whose only
    /// placeholders are per-user: rendering per user then only formats numbers.
    pub fn bind(&self, campaign: &dyn Fn(Var) -> String) -> Template {
        let mut parts: Vec<Part> = Vec::new();
        for part in &self.parts {
            let piece = match part {
                Part::Var(v) if !v.is_per_user() => Part::Text(campaign(*v)),
                p => p.clone(),
            };
            match (parts.last_mut(), piece) {
                (Some(Part::Text(prev)), Part::Text(t)) => prev.push_str(&t),
                (_, p) => parts.push(p),
            }
        }
        Template {
            source: self.source.clone(),
            parts,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vals(v: Var) -> String {
        match v {
            Var::CampaignId => "spring".into(),
            Var::GoodsName => "Trail shoes".into(),
            _ => String::new(),
        }
    }

    fn render(t: &Template, id: u32) -> String {
        let mut s = String::new();
        t.render_into(
            &mut s,
            UserVars {
                id,
                level: 3,
                points: 1200,
            },
            &vals,
        );
        s
    }

    #[test]
    fn renders_user_and_campaign_values() {
        let t = Template::parse(
            "Hi {user.id} (L{user.level}, {user.points} pts): {goods.name} @ {campaign.id}",
        )
        .unwrap();
        assert_eq!(render(&t, 42), "Hi 42 (L3, 1200 pts): Trail shoes @ spring");
        assert!(t.is_per_user());
        let bound = t.bind(&vals);
        assert_eq!(render(&bound, 42), render(&t, 42));
    }

    #[test]
    fn braces_escape_and_unicode_text() {
        let t = Template::parse("{{literal}} — 优惠 {user.id}").unwrap();
        assert_eq!(render(&t, 7), "{literal} — 优惠 7");
        assert!(!Template::parse("no placeholders").unwrap().is_per_user());
    }

    #[test]
    fn refuses_unknown_and_unbalanced() {
        assert_eq!(
            Template::parse("Hi {user.nmae}"),
            Err(TemplateError::Unknown("user.nmae".into()))
        );
        assert!(matches!(
            Template::parse("Hi {user.id"),
            Err(TemplateError::Unclosed(3))
        ));
        assert!(matches!(
            Template::parse("Hi }"),
            Err(TemplateError::Stray(3))
        ));
    }
}
