//! SPEC Policy → Priority, end to end: a transactional campaign is never queued behind a bulk
//! one. One job: a bulk campaign to every one of 200,000 users, enough to keep the provider's
//! slots busy for seconds, and a transactional campaign to a few hundred of them; the
//! transactional messages are delivered about one provider latency after they are ready.

mod common;

use common::*;

const USERS: u64 = 200_000;
const LATENCY_MS: f64 = 50.0;
const CONCURRENCY: u64 = 1000;

fn job() -> String {
    format!(
        r#"[inputs]
users = "synthetic:{USERS}:7"

[engine]
now = "2026-03-02T00:00:00Z"

[store]
url = "file:store"

[provider]
url = "mock:latency={LATENCY_MS}ms"
concurrency = {CONCURRENCY}

[[campaign]]
id = "blast"
kind = "promotion"
priority = "bulk"
start = "2026-03-01T00:00:00Z"
end = "2026-03-08T00:00:00Z"
body = "Hi {{user.id}}, everything half off"

[[campaign]]
id = "receipts"
kind = "promotion"
priority = "transactional"
start = "2026-03-01T00:00:00Z"
end = "2026-03-08T00:00:00Z"
body = "Your order has shipped, {{user.id}}"
[campaign.audience]
max_points = 149
"#
    )
}

fn ms(v: &serde_json::Value) -> f64 {
    v.as_f64()
        .unwrap_or_else(|| panic!("a latency in ms, got {v}"))
}

#[test]
fn a_transactional_campaign_is_not_queued_behind_a_bulk_one() {
    let s = Scratch::new();
    s.write("job.toml", job());
    s.fanout_ok(&[
        "run",
        "job.toml",
        "-w",
        "2",
        "--summary",
        "summary.json",
        "--quiet",
    ]);
    let summary = read_summary(&s.path("summary.json"));
    let bulk = campaign_line(&summary, "blast");
    let tx = campaign_line(&summary, "receipts");
    assert_eq!(bulk["delivered"].as_u64(), Some(USERS));
    let tx_users = tx["delivered"].as_u64().unwrap();
    // Points are uniform in 0..100,000: about 0.15% of the users.
    assert!(
        (100..=600).contains(&tx_users),
        "{tx_users} transactional users"
    );

    let by = &summary["push_latency_ms_by_priority"];
    assert!(by.get("normal").is_none(), "no normal campaign sent: {by}");
    let tx_p99 = ms(&by["transactional"]["p99"]);
    let bulk_p99 = ms(&by["bulk"]["p99"]);
    // The bulk campaign alone needs at least users ÷ (concurrency ÷ latency) to go out; a
    // transactional user queued behind it would wait for the part of that ahead of them —
    // uniformly spread ids put the 99th percentile near the whole of it.
    let bulk_floor_ms = USERS as f64 / CONCURRENCY as f64 * LATENCY_MS;
    assert!(
        bulk_p99 > bulk_floor_ms / 2.0,
        "bulk was not saturating: {by}"
    );
    assert!(tx_p99 >= LATENCY_MS, "faster than the provider? {by}");
    // Not queued: within a few provider latencies (scheduling on a shared machine
    // included), a small fraction of what queueing would give.
    assert!(
        tx_p99 <= 6.0 * LATENCY_MS && tx_p99 <= bulk_floor_ms / 20.0,
        "transactional p99 {tx_p99} ms while bulk needed at least {bulk_floor_ms} ms: {by}"
    );
}
