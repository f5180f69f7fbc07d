//! One `[[campaign]]` table: ids, kinds, windows, templates, sections, audience, hash.

use super::{bad, ok, with, BASE};
use crate::error::Error;
use crate::job::{content_hash, parse_campaign};
use crate::model::{CouponDelivery, Kind};

#[test]
fn campaign_ids_are_checked_and_unique() {
    bad(
        &with("id = \"spring sale\"", ""),
        4,
        "campaign[0].id",
        "[A-Za-z0-9_-]{1,64}",
    );
    bad(&with("id = \"\"", ""), 4, "campaign[0].id", "must match");
    bad(
        &with(&format!("id = \"{}\"", "a".repeat(65)), ""),
        4,
        "campaign[0].id",
        "must match",
    );
    ok(&with(&format!("id = \"{}\"", "a-Z_9".repeat(12)), ""));
    let twice = format!("{BASE}{}", &BASE[BASE.find("[[campaign]]").unwrap()..]);
    bad(
        &twice,
        10,
        "campaign \"spring\".id",
        "duplicate campaign id; first defined at line 4",
    );
}

#[test]
fn kind_and_window() {
    bad(
        &with("kind = \"promo\"", ""),
        5,
        "campaign \"spring\".kind",
        "unknown variant `promo`",
    );
    bad(
        &with("start = \"2026-03-01\"", ""),
        6,
        "campaign \"spring\".start",
        "RFC 3339",
    );
    bad(
        &with("end = 2026-03-08T00:00:00", ""),
        7,
        "campaign \"spring\".end",
        "RFC 3339",
    );
    bad(&with("end = 7", ""), 7, "campaign \"spring\".end", "got 7");
    bad(
        &with("end = \"2026-03-01T00:00:00Z\"", ""),
        7,
        "campaign \"spring\".end",
        "must be after start",
    );
    let job = ok(&with("end = 2026-03-08T08:00:00+08:00", ""));
    assert_eq!(
        job.campaigns[0].end.to_rfc3339(),
        "2026-03-08T00:00:00+00:00"
    );
}

#[test]
fn templates_parse_and_fit_the_kind() {
    bad(
        &with("body = \"Hi {user.nmae}\"", ""),
        8,
        "campaign \"spring\".body",
        "unknown placeholder {user.nmae}",
    );
    bad(
        &with("body = \"x\"", "title = \"50% {off\""),
        9,
        "campaign \"spring\".title",
        "unclosed",
    );
    bad(
        &with("body = \"{coupon.amount} off\"", ""),
        8,
        "campaign \"spring\".body",
        "{coupon.amount} is only available with kind = \"coupon\"",
    );
    bad(
        &with("body = \"{goods.name}\"", ""),
        8,
        "campaign \"spring\".body",
        "kind = \"hot_product\"",
    );
    bad(
        &with("body = \"x\"", "title = \"{occurrence}\""),
        9,
        "campaign \"spring\".title",
        "kind = \"hot_product\"",
    );
    bad(
        &with("body = \"x\"", "title = \"{campaign.title}\""),
        9,
        "campaign \"spring\".title",
        "itself",
    );
    let job = ok(&with(
        "body = \"{campaign.title}: {{50%}} for {user.level}\"",
        "title = \"Sale\"",
    ));
    assert_eq!(job.campaigns[0].title.source(), "Sale");
}

const COUPON: &str = "[campaign.coupon]\ncoupon_id = \"C-1\"\namount = 10\ndelivery = \"on_login\"";
const GOODS: &str = "[campaign.goods]\nname = \"Shoes\"\n[campaign.schedule]\nevery = \"1h\"";

#[test]
fn coupon_section_iff_coupon_kind() {
    let job = ok(&with("kind = \"coupon\"", COUPON));
    let c = job.campaigns[0].coupon.as_ref().unwrap();
    assert_eq!(
        (c.coupon_id.as_str(), c.amount, c.delivery),
        ("C-1", 10.0, CouponDelivery::OnLogin)
    );
    bad(
        &with("kind = \"coupon\"", ""),
        5,
        "campaign \"spring\".coupon",
        "needs a [campaign.coupon] table",
    );
    bad(
        &with("kind = \"promotion\"", COUPON),
        9,
        "campaign \"spring\".coupon",
        "only allowed with kind = \"coupon\"",
    );
    let neg = COUPON.replace("amount = 10", "amount = -0.5");
    bad(
        &with("kind = \"coupon\"", &neg),
        11,
        "campaign \"spring\".coupon.amount",
        "≥ 0",
    );
    let nan = COUPON.replace("amount = 10", "amount = nan");
    bad(
        &with("kind = \"coupon\"", &nan),
        11,
        "campaign \"spring\".coupon.amount",
        "≥ 0",
    );
    let mail = COUPON.replace("on_login", "mail");
    bad(
        &with("kind = \"coupon\"", &mail),
        12,
        "campaign \"spring\".coupon.delivery",
        "unknown variant",
    );
    let empty = COUPON.replace("C-1", "");
    bad(
        &with("kind = \"coupon\"", &empty),
        10,
        "campaign \"spring\".coupon.coupon_id",
        "empty",
    );
}

#[test]
fn goods_and_schedule_iff_hot_product() {
    let job = ok(&with("kind = \"hot_product\"", GOODS));
    let c = &job.campaigns[0];
    assert_eq!(c.goods.as_ref().unwrap().name, "Shoes");
    assert_eq!(c.every, Some(std::time::Duration::from_secs(3600)));
    bad(
        &with("kind = \"hot_product\"", ""),
        5,
        "campaign \"spring\".goods",
        "needs a [campaign.goods]",
    );
    let no_schedule = GOODS.split("[campaign.schedule]").next().unwrap();
    bad(
        &with("kind = \"hot_product\"", no_schedule),
        5,
        "campaign \"spring\".schedule",
        "needs",
    );
    bad(
        &with("kind = \"promotion\"", GOODS),
        9,
        "campaign \"spring\".goods",
        "only allowed",
    );
    for (every, msg) in [
        ("0s", "at least 1s"),
        ("500ms", "at least 1s"),
        ("hourly", "duration"),
    ] {
        let g = GOODS.replace("\"1h\"", &format!("\"{every}\""));
        bad(
            &with("kind = \"hot_product\"", &g),
            12,
            "campaign \"spring\".schedule.every",
            msg,
        );
    }
}

#[test]
fn audience_bounds() {
    let a = |body: &str| with("body = \"x\"", &format!("[campaign.audience]\n{body}"));
    let job = ok(&a("min_level = 0\nmax_level = 255\ntags_any = [\"运动\"]"));
    assert_eq!(job.campaigns[0].audience.max_level, Some(255));
    bad(
        &a("min_level = 300"),
        10,
        "campaign \"spring\".audience.min_level",
        "0..=255, got 300",
    );
    bad(
        &a("max_level = -1"),
        10,
        "campaign \"spring\".audience.max_level",
        "0..=255",
    );
    bad(
        &a("min_level = 5\nmax_level = 2"),
        11,
        "campaign \"spring\".audience.max_level",
        "min_level (5)",
    );
    bad(
        &a("max_points = 10\nmin_points = 20"),
        10,
        "campaign \"spring\".audience.max_points",
        "min_points (20)",
    );
}

#[test]
fn content_hash_ignores_only_the_id() {
    let hash = |text: &str| content_hash(&ok(text).campaigns[0]);
    let base = hash(BASE);
    assert_eq!(base.len(), 16);
    assert_eq!(hash(&with("id = \"autumn\"", "")), base);
    assert_ne!(hash(&with("body = \"Hi {user.id}!\"", "")), base);
    assert_ne!(hash(&with("end = \"2026-03-09T00:00:00Z\"", "")), base);
    assert_ne!(
        hash(&with(
            "body = \"Hi {user.id}\"",
            "[campaign.audience]\nmin_level = 1"
        )),
        base
    );
    // A default title is the id but hashes as "default": the guard still spots a copy.
    let titled = |id: &str| hash(&with(&format!("id = \"{id}\""), "title = \"Sale\""));
    assert_eq!(titled("a"), titled("b"));
    assert_ne!(titled("a"), base);
    let coupon = |amount: &str| hash(&with("kind = \"coupon\"", &COUPON.replace("10", amount)));
    assert_eq!(coupon("10"), coupon("10.0"));
    assert_ne!(coupon("10"), coupon("11"));
    // The value is pinned: it keys the guard in a shared store, across versions.
    assert_eq!(base, "2ceb3ff91228c6e4");
}

#[test]
fn one_campaign_from_a_stream_entry() {
    let bare = "id = \"flash\"\nkind = \"coupon\"\nstart = \"2026-03-01T00:00:00Z\"\nend = \"2026-03-02T00:00:00Z\"\nbody = \"{coupon.id}\"\n[coupon]\ncoupon_id = \"C\"\namount = 1\ndelivery = \"push\"\n";
    let c = parse_campaign("fanout:campaigns 1-0", bare).unwrap();
    assert_eq!((c.id.as_str(), c.kind), ("flash", Kind::Coupon));
    let wrapped = with("body = \"x\"", "");
    let wrapped = &wrapped[wrapped.find("[[campaign]]").unwrap()..];
    assert_eq!(parse_campaign("entry", wrapped).unwrap().id, "spring");
    let e = match parse_campaign(
        "entry",
        &bare.replace("amount = 1", "amount = 1\nextra = 2"),
    ) {
        Err(Error::BadInput(e)) => e,
        other => panic!("{other:?}"),
    };
    assert_eq!(
        (e.line, e.field.as_str()),
        (Some(9), "campaign \"flash\".coupon.extra")
    );
    let e = match parse_campaign("entry", &bare.replace("flash", "fl ash")) {
        Err(Error::BadInput(e)) => e,
        other => panic!("{other:?}"),
    };
    assert_eq!(
        e.to_string(),
        "entry:1: campaign[0].id: must match [A-Za-z0-9_-]{1,64}, got \"fl ash\""
    );
    assert!(parse_campaign("entry", &format!("{wrapped}\n{wrapped}")).is_err());
}
