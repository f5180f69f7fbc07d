//! The ceiling the engine benchmark is measured against: a plain single-threaded loop doing
//! the same per-user work as `fanout run` — generate or read the user, test the audience,
//! claim a bit, render the message — with no dataflow, no store file and no provider.
//!
//! `cargo bench --bench ceiling -- JOB.toml [--users SPEC]` prints one JSON object.

use std::time::Instant;

use fanout::audience::AudienceFilter;
use fanout::job::{self, Overrides};
use fanout::model::Target;
use fanout::render::Renderer;
use fanout::sources::{LoadOptions, UserSource};
use fanout::template::UserVars;
use roaring::RoaringBitmap;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    // Without arguments (as `cargo test --all-targets` runs it): a small smoke run.
    let smoke = concat!(env!("CARGO_MANIFEST_DIR"), "/bench/jobs/engine.toml").to_owned();
    let path = args.first().cloned().unwrap_or(smoke);
    let users = args
        .iter()
        .position(|a| a == "--users")
        .and_then(|i| args.get(i + 1).cloned())
        .or_else(|| args.is_empty().then(|| "synthetic:100000".to_owned()));
    let overrides = Overrides {
        users,
        ..Overrides::default()
    };
    let job = job::load(std::path::Path::new(&path), &overrides)?;
    let (source, _) = UserSource::open(&job.inputs.users, &LoadOptions::default())?;
    let started = Instant::now();
    let mut delivered = 0u64;
    let mut bytes = 0u64;
    for campaign in &job.campaigns {
        let target = Target::new(campaign.clone(), None);
        let renderer = Renderer::new(&target);
        let filter = AudienceFilter::compile(&campaign.audience, source.tags());
        let mut claimed = RoaringBitmap::new();
        // One buffer reused for every message: the cheapest way to render.
        let mut json = String::with_capacity(renderer.typical_len());
        source.for_each_in(0, u64::MAX, |u| {
            if filter.matches(&u) && claimed.insert(u.id) {
                json.clear();
                renderer.render_into(
                    UserVars {
                        id: u.id,
                        level: u.level,
                        points: u.points,
                    },
                    &mut json,
                );
                bytes += json.len() as u64;
                delivered += 1;
            }
        });
    }
    let elapsed = started.elapsed().as_secs_f64();
    println!(
        "{{\"users\": {}, \"delivered\": {delivered}, \"bytes\": {bytes}, \"elapsed_s\": {elapsed:.4}, \"users_per_s\": {:.0}}}",
        source.len(),
        source.len() as f64 / elapsed
    );
    Ok(())
}
