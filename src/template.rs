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
    /// `{campaign.title}`: the title as rendered for the same user and occurrence. The title is a
    /// template itself, so its value (from the `campaign` closure of [`Template::bind`] and
    /// [`Template::render_into`]) is template *source*: campaign values filled in, `user.*`
    /// placeholders left (see [`Template::to_source`]), rendered per user where it is inserted.
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

    /// The template written back as source that parses to the same template: literal braces
    /// doubled, placeholders by name.
    pub fn to_source(&self) -> String {
        let mut out = String::with_capacity(self.source.len());
        for part in &self.parts {
            match part {
                Part::Text(t) => {
                    for c in t.chars() {
                        match c {
                            '{' => out.push_str("{{"),
                            '}' => out.push_str("}}"),
                            c => out.push(c),
                        }
                    }
                }
                Part::Var(v) => {
                    let name = Var::NAMES
                        .iter()
                        .find(|(_, n)| n == v)
                        .map_or("", |(name, _)| name);
                    let _ = write!(out, "{{{name}}}");
                }
            }
        }
        out
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
                Part::Var(Var::CampaignTitle) => {
                    let title = title_template(campaign);
                    title.render_into(out, user, &|v| campaign_value_in_title(campaign, v));
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
            let pieces = match part {
                // The title's own user placeholders stay, to be rendered per user.
                Part::Var(Var::CampaignTitle) => {
                    title_template(campaign)
                        .bind(&|v| campaign_value_in_title(campaign, v))
                        .parts
                }
                Part::Var(v) if !v.is_per_user() => vec![Part::Text(campaign(*v))],
                p => vec![p.clone()],
            };
            for piece in pieces {
                match (parts.last_mut(), piece) {
                    (Some(Part::Text(prev)), Part::Text(t)) => prev.push_str(&t),
                    (_, p) => parts.push(p),
                }
            }
        }
        Template {
            source: self.source.clone(),
            parts,
        }
    }
}

/// The template `campaign` gives as the value of `{campaign.title}`; a value that does not
/// parse is taken as literal text.
fn title_template(campaign: &dyn Fn(Var) -> String) -> Template {
    let source = campaign(Var::CampaignTitle);
    Template::parse(&source).unwrap_or_else(|_| Template {
        parts: vec![Part::Text(source.clone())],
        source,
    })
}

/// A campaign value inside the title: the title cannot contain itself (the job refuses it),
/// and a closure that says otherwise must not recurse forever.
fn campaign_value_in_title(campaign: &dyn Fn(Var) -> String, v: Var) -> String {
    match v {
        Var::CampaignTitle => String::new(),
        v => campaign(v),
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
    fn campaign_title_renders_per_user() {
        let title = Template::parse("Hi {user.id}, {{new}} {goods.name}").unwrap();
        assert_eq!(Template::parse(&title.to_source()).unwrap(), title);
        let with_title = |v: Var| match v {
            Var::CampaignTitle => title.bind(&vals).to_source(),
            v => vals(v),
        };
        let body = Template::parse("{campaign.title}! L{user.level}").unwrap();
        let mut s = String::new();
        let user = UserVars {
            id: 42,
            level: 3,
            points: 0,
        };
        body.render_into(&mut s, user, &with_title);
        assert_eq!(s, "Hi 42, {new} Trail shoes! L3");
        let bound = body.bind(&with_title);
        let mut t = String::new();
        bound.render_into(&mut t, user, &|_| String::new());
        assert_eq!(t, s);
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
