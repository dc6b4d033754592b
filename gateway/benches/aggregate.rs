//! Cost of aggregation per reading: the pure aggregator fed as the writer feeds it (a batch of
//! datagrams, then the touched devices advanced), without SQLite. Compare with the writer's
//! cost per reading in BENCHMARKS.md.
//!
//! Run: `cargo bench -p gateway --bench aggregate`

use gateway::aggregate::window::{Aggregator, AggregatorConfig, LatePolicy, Sample};

#[allow(clippy::disallowed_types)]
fn main() {
    let devices = 1_000u32;
    let per_datagram = 16u64;
    let datagrams_per_batch = 64u64;
    let total: u64 = 20_000_000;
    let mut runs = Vec::new();
    for _ in 0..5 {
        let mut agg = Aggregator::new(AggregatorConfig {
            windows_ms: vec![10_000, 60_000],
            lateness_ms: 5_000,
            late: LatePolicy::Revise,
            idle_ms: 60_000,
            keep_closed_ms: 120_000,
        });
        let mut out = Vec::new();
        let mut emitted = 0usize;
        let start = std::time::Instant::now();
        let mut n = 0u64;
        let mut seq = 0u64;
        while n < total {
            let mut touched = Vec::with_capacity(datagrams_per_batch as usize);
            for _ in 0..datagrams_per_batch {
                let device = (seq % u64::from(devices)) as u32;
                // Each device sends 16 readings (4 sensors) every 100 ms of device time.
                let base = 1_800_000_000_000i64 + (seq / u64::from(devices)) as i64 * 100;
                for i in 0..per_datagram {
                    agg.push(
                        Sample {
                            device,
                            sensor: (i % 4) as u16,
                            ts: base + (i / 4) as i64 * 25,
                            seq,
                            idx: i as u16,
                            value: (seq as f64).sin() + i as f64,
                        },
                        0,
                        &mut out,
                    );
                }
                touched.push(device);
                seq += 1;
                n += per_datagram;
            }
            touched.sort_unstable();
            touched.dedup();
            for d in touched {
                agg.advance_device(d, &mut out);
            }
            emitted += out.len();
            out.clear();
        }
        let secs = start.elapsed().as_secs_f64();
        runs.push(total as f64 / secs);
        eprintln!(
            "{:.0} readings/s ({} windows emitted, {} open)",
            total as f64 / secs,
            emitted,
            agg.open_windows()
        );
    }
    runs.sort_by(f64::total_cmp);
    println!(
        "aggregator: median {:.2} M readings/s on one core ({:.0} ns per reading), 1,000 devices x 4 sensors, windows 10 s and 1 min",
        runs[2] / 1e6,
        1e9 / runs[2]
    );
}
