//! What every data-path bench shares: how samples are taken in rounds and summarised, and
//! how the empty program's cost is subtracted.

/// Calls per path before moving to the next path: small enough that drift (frequency, noisy
/// neighbours) hits every path alike, large enough to keep caches warm within a round.
pub const ROUND: usize = 1_000;

/// Median and p99 of one path's samples, in ns.
#[derive(Clone, Copy)]
pub struct Stats {
    pub median: u64,
    pub p99: u64,
}

pub fn stats(mut samples: Vec<u64>) -> Stats {
    samples.sort_unstable();
    Stats {
        median: percentile(&samples, 0.50),
        p99: percentile(&samples, 0.99),
    }
}

/// Nearest-rank percentile of sorted, non-empty samples.
fn percentile(sorted: &[u64], q: f64) -> u64 {
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Raw minus the floor's statistic of the same rank, at least 0: the program's own cost.
pub fn over(raw: Stats, floor: Stats) -> Stats {
    Stats {
        median: raw.median.saturating_sub(floor.median),
        p99: raw.p99.saturating_sub(floor.p99),
    }
}
