//! Summaries: percentiles of one run's latencies, and over a mode's rounds the median with
//! min–max, the per-round difference to the baseline, and ratios of medians.

use crate::{Mode, scenarios::ByMode};

/// The `p`-quantile (0–1) of sorted values, nearest rank; NaN when there are none.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

/// Median, min and max of one measure over a mode's rounds.
#[derive(Clone, Copy, Debug)]
pub struct Stat {
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

impl Stat {
    /// Of the finite values; `None` if there are none.
    pub fn of(values: impl IntoIterator<Item = f64>) -> Option<Self> {
        let mut v: Vec<f64> = values.into_iter().filter(|x| x.is_finite()).collect();
        if v.is_empty() {
            return None;
        }
        v.sort_by(f64::total_cmp);
        let mid = v.len() / 2;
        let median = if v.len() % 2 == 1 {
            v[mid]
        } else {
            (v[mid - 1] + v[mid]) / 2.0
        };
        Some(Self {
            median,
            min: v[0],
            max: v[v.len() - 1],
        })
    }
}

/// `a`'s median over `b`'s, when both were measured.
pub fn ratio(a: &Result<Stat, String>, b: &Result<Stat, String>) -> Option<f64> {
    match (a, b) {
        (Ok(a), Ok(b)) => Some(a.median / b.median),
        _ => None,
    }
}

impl<T> ByMode<T> {
    /// A measure's statistics over a mode's rounds, or the reason it failed: the first failed
    /// round's, or "no data" when no round has the measure.
    pub fn stat(&self, mode: Mode, measure: impl Fn(&T) -> Option<f64>) -> Result<Stat, String> {
        if let Some(e) = self.failure(mode) {
            return Err(e.to_string());
        }
        Stat::of(self.rounds(mode).iter().filter_map(|o| measure(o.ok()?)))
            .ok_or_else(|| "no data".to_string())
    }

    /// Per-round difference mode − its baseline ([`Mode::baseline`]; the rounds ran back to
    /// back, so drift between rounds cancels), summarised.
    pub fn added(&self, mode: Mode, measure: impl Fn(&T) -> Option<f64>) -> Result<Stat, String> {
        if let Some(e) = self.failure(mode) {
            return Err(e.to_string());
        }
        if let Some(e) = self.failure(mode.baseline()) {
            return Err(format!("baseline failed: {e}"));
        }
        let (m, b) = (self.rounds(mode), self.rounds(mode.baseline()));
        Stat::of(
            m.iter()
                .zip(b)
                .filter_map(|(m, b)| Some(measure(m.ok()?)? - measure(b.ok()?)?)),
        )
        .ok_or_else(|| "no data".to_string())
    }
}
