//! The memory scenarios: whether the server gives its memory back once its clients are gone
//! (`idle_return`), and whether its memory levels off under steady load that lasts longer than
//! its buffers' age (`soak`). Both sample the server's resident memory (`VmRSS` of
//! /proc/PID/status, children included, nodes added up) over time and report the samples, and
//! its anonymous part (`RssAnon`: the heap, without the executable's pages) at both ends.

use std::collections::HashMap;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::time::Instant;

use crate::stats::{Delivery, percentiles};
use crate::{ANSWER_TIMEOUT, Ctx, Workers, paths_for, round};

/// RSS is read this long after the topics' linger has passed (the sweep runs every 500 ms).
const SETTLE: Duration = Duration::from_secs(5);

/// One RSS sample: seconds since some start, KiB.
type Sample = (f64, u64);

fn sample(ctx: &Ctx, start: Instant) -> Sample {
    (round(start.elapsed().as_secs_f64(), 1), ctx.rss_kib())
}

/// Samples every second from `start` until `length` after it; the last sample is at `length`.
async fn sample_until(ctx: &Ctx, start: Instant, length: Duration) -> Vec<Sample> {
    let mut samples = Vec::new();
    let mut at = start;
    while at < start + length {
        at = (at + Duration::from_secs(1)).min(start + length);
        tokio::time::sleep_until(at).await;
        samples.push(sample(ctx, start));
    }
    samples
}

fn series(samples: &[Sample]) -> Value {
    json!(
        samples
            .iter()
            .map(|(t, kib)| json!([t, kib]))
            .collect::<Vec<_>>()
    )
}

/// `clients` hold one poll each over `topics` topics; one message per topic answers them all,
/// then the clients close. RSS is sampled every second from the close until the routes'
/// `linger` and [`SETTLE`] more have passed (so the topics have been swept), and compared with
/// the RSS before the clients came: a fresh, idle process is the baseline, so run this first.
pub async fn idle_return(ctx: &Ctx, clients: usize, topics: usize) -> Result<Value, String> {
    ctx.wait_held(|n| n == 0).await?;
    let (idle, idle_anon) = (ctx.rss_kib(), ctx.rss_anon_kib());
    let topics = ctx.topics("idle_return", topics);
    let mut workers = Workers::start(ctx, paths_for(ctx, &topics, clients), false).await?;
    let opened = workers.opened as u64;
    let held = ctx.wait_held(|n| n >= opened).await?;
    let rss_held = ctx.rss_kib();
    ctx.publish(topics.iter().cloned().zip(1..).collect())
        .await?;
    workers
        .wait_answered(Instant::now() + ANSWER_TIMEOUT)
        .await?;
    let seen = workers.stop().await?;
    let closed = Instant::now();
    let received = seen.iter().filter(|s| s.ids.len() == 1).count() as u64;
    let linger = Duration::from_secs(ctx.args.linger_secs);
    let samples = sample_until(ctx, closed, linger + SETTLE).await;
    let after = samples.last().map_or(0, |s| s.1);
    let after_anon = ctx.rss_anon_kib();
    Ok(json!({
        "scenario": format!("idle_return_{clients}"),
        "target": ctx.args.target,
        "clients": clients,
        "topics": topics.len(),
        "opened": opened,
        "held": held,
        "received": received,
        "lost": opened - received.min(opened),
        "linger_s": ctx.args.linger_secs,
        "rss_idle_kib": idle,
        "rss_held_kib": rss_held,
        "rss_kib_per_poll": round((rss_held as f64 - idle as f64) / opened.max(1) as f64, 2),
        "rss_after_linger_kib": after,
        "rss_after_linger_over_idle_kib": after as i64 - idle as i64,
        "rss_anon_idle_kib": idle_anon,
        "rss_anon_after_linger_kib": after_anon,
        "rss_kib_after_close": series(&samples),
    }))
}

/// How RSS moved under a steady load: the sample nearest `age` into it, the highest after, and
/// the highest in each half.
fn plateau(samples: &[Sample], age: f64) -> Value {
    let at_age = samples
        .iter()
        .min_by(|a, b| (a.0 - age).abs().total_cmp(&(b.0 - age).abs()))
        .map_or(0, |s| s.1);
    let end = samples.last().map_or(0.0, |s| s.0);
    let max = |keep: &dyn Fn(f64) -> bool| {
        samples
            .iter()
            .filter(|s| keep(s.0))
            .map(|s| s.1)
            .max()
            .unwrap_or(0)
    };
    let after_age = max(&|t| t >= age);
    json!({
        "rss_at_buffer_age_kib": at_age,
        "rss_max_after_buffer_age_kib": after_age,
        "rss_growth_after_buffer_age_kib": after_age as i64 - at_age as i64,
        "rss_max_first_half_kib": max(&|t| t <= end / 2.0),
        "rss_max_second_half_kib": max(&|t| t > end / 2.0),
    })
}

/// `clients` re-poll over `topics` topics while `--soak-rate` messages per second (all topics
/// together, `--payload-bytes` each) are published for `--soak-secs`: RSS every
/// `--sample-secs`, then every second once the clients have closed, until the linger and
/// [`SETTLE`] more have passed. Deliveries are checked as in the sustained scenario.
pub async fn soak(ctx: &Ctx, clients: usize, topics: usize) -> Result<Value, String> {
    ctx.wait_held(|n| n == 0).await?;
    let (idle, idle_anon) = (ctx.rss_kib(), ctx.rss_anon_kib());
    let topics = ctx.topics("soak", topics);
    let workers = Workers::start(ctx, paths_for(ctx, &topics, clients), true).await?;
    let opened = workers.opened as u64;
    ctx.wait_held(|n| n >= opened).await?;
    let rate = ctx.args.soak_rate.max(1);
    let total = rate * ctx.args.soak_secs;
    let every = Duration::from_secs(ctx.args.sample_secs.max(1));
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate as f64));
    let start = Instant::now();
    let mut samples = vec![sample(ctx, start)];
    let mut next_sample = start + every;
    let mut sent = HashMap::new();
    let mut by_topic = vec![Vec::new(); topics.len()];
    for id in 1..=total {
        tick.tick().await;
        let topic = id as usize % topics.len();
        sent.extend(ctx.publish(vec![(topics[topic].clone(), id)]).await?);
        by_topic[topic].push(id);
        if Instant::now() >= next_sample {
            samples.push(sample(ctx, start));
            next_sample += every;
        }
    }
    let load_secs = start.elapsed().as_secs_f64();
    samples.push(sample(ctx, start));
    tokio::time::sleep(Duration::from_secs(1)).await;
    let seen = workers.stop().await?;
    let closed = Instant::now();
    let mut latencies = Vec::new();
    let mut loss = Delivery::default();
    for (i, s) in seen.iter().enumerate() {
        for (id, at) in s.ids.iter().zip(&s.at_ns) {
            if let Some(t) = sent.get(id) {
                latencies.push(at.saturating_sub(*t) as f64 / 1e6);
            }
        }
        loss.add(Delivery::check(&by_topic[i % topics.len()], &s.ids));
    }
    let (p50, p99, _) = percentiles(&mut latencies);
    let linger = Duration::from_secs(ctx.args.linger_secs);
    let tail = sample_until(ctx, closed, linger + SETTLE).await;
    let after = tail.last().map_or(0, |s| s.1);
    let after_anon = ctx.rss_anon_kib();
    let mut row = json!({
        "scenario": format!("soak_{}s_{rate}msgs_per_s_{clients}", ctx.args.soak_secs),
        "target": ctx.args.target,
        "clients": clients,
        "topics": topics.len(),
        "opened": opened,
        "published": total,
        "payload_bytes": ctx.args.payload_bytes,
        "load_s": round(load_secs, 1),
        "deliveries": loss.received,
        "lost": loss.lost,
        "duplicated": loss.duplicated,
        "out_of_order": loss.out_of_order,
        "latency_p50_ms": round(p50, 2),
        "latency_p99_ms": round(p99, 2),
        "buffer_age_s": ctx.args.buffer_age_secs,
        "linger_s": ctx.args.linger_secs,
        "rss_idle_kib": idle,
        "rss_after_linger_kib": after,
        "rss_after_linger_over_idle_kib": after as i64 - idle as i64,
        "rss_anon_idle_kib": idle_anon,
        "rss_anon_after_linger_kib": after_anon,
        "rss_kib_under_load": series(&samples),
        "rss_kib_after_close": series(&tail),
    });
    if let (Some(row), Value::Object(figures)) = (
        row.as_object_mut(),
        plateau(&samples, ctx.args.buffer_age_secs as f64),
    ) {
        row.extend(figures);
    }
    Ok(row)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plateau_compares_the_load_after_the_buffer_age_with_the_sample_at_it() {
        let samples = [
            (0.0, 100),
            (10.0, 150),
            (20.0, 190),
            (30.0, 200),
            (40.0, 195),
        ];
        let p = plateau(&samples, 19.0);
        assert_eq!(p["rss_at_buffer_age_kib"], 190);
        assert_eq!(p["rss_max_after_buffer_age_kib"], 200);
        assert_eq!(p["rss_growth_after_buffer_age_kib"], 10);
        assert_eq!(p["rss_max_first_half_kib"], 190);
        assert_eq!(p["rss_max_second_half_kib"], 200);
        assert_eq!(plateau(&[], 1.0)["rss_growth_after_buffer_age_kib"], 0);
    }
}
