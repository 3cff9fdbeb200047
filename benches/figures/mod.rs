//! The figures of `cargo bench --bench report`, one module per primitive.
//! Each module exposes `pub fn measure(ctx: &Ctx) -> Vec<Figure>`; a module
//! whose figures are judged against another module's baselines also takes
//! the figures measured so far (`measure(ctx, &so_far)`).

pub mod executor;
pub mod fleet;
pub mod gateway;
pub mod net;
pub mod ondemand;
pub mod poll;
pub mod reset;
pub mod snapshot;
pub mod store;
pub mod trace;
pub mod tx;
pub mod vm;

#[path = "../../tests/common/mod.rs"]
pub mod common;

use std::time::{Duration, Instant};

/// Settings shared by every figure of one report run.
pub struct Ctx {
    /// `--quick`: fewer samples, so the whole report stays under a minute.
    pub quick: bool,
}

impl Ctx {
    /// Number of samples: `full` normally, `quick` with `--quick`.
    pub fn samples(&self, full: usize, quick: usize) -> usize {
        if self.quick {
            quick
        } else {
            full
        }
    }
}

/// How a figure is judged against its target.
#[derive(Clone, Copy, Debug)]
pub enum Target {
    /// `value / baseline` (or `value` when there is no baseline) must be <= this.
    AtMost(f64),
    /// `value / baseline` (or `value`) must be >= this.
    #[allow(dead_code, reason = "for throughput figures, e.g. the store's")]
    AtLeast(f64),
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::AtMost(limit) => write!(f, "<= {limit}"),
            Target::AtLeast(limit) => write!(f, ">= {limit}"),
        }
    }
}

/// One line of the report.
#[derive(Clone, Debug)]
pub struct Figure {
    /// Stable name, e.g. `invoke.warm_us`.
    pub name: String,
    /// The measured value (a median unless the name says otherwise).
    pub value: f64,
    /// Unit, e.g. `us`, `MB/s`, `KiB`, `x`.
    pub unit: &'static str,
    /// The in-run baseline it is judged against: (name, value).
    pub baseline: Option<(String, f64)>,
    /// The target, if the figure has one.
    pub target: Option<Target>,
    /// The noise around `value`: its 10th and 90th percentiles, when the
    /// value is a median of samples.
    pub spread: Option<(f64, f64)>,
    /// Number of samples behind `value`, when it is a statistic of samples.
    pub samples: Option<usize>,
}

impl Figure {
    /// A figure with no baseline and no target.
    pub fn plain(name: &str, value: f64, unit: &'static str) -> Self {
        Self {
            name: name.to_string(),
            value,
            unit,
            baseline: None,
            target: None,
            spread: None,
            samples: None,
        }
    }

    /// A figure whose value is the median of `stats`, with its spread.
    pub fn of(name: &str, stats: &Stats, unit: &'static str) -> Self {
        let mut figure = Self::plain(name, stats.median, unit);
        figure.spread = Some((stats.p10, stats.p90));
        figure.samples = Some(stats.count);
        figure
    }

    /// Adds the baseline figure `base` (its name and value).
    pub fn against(mut self, base: &Figure) -> Self {
        self.baseline = Some((base.name.clone(), base.value));
        self
    }

    /// Adds a target.
    pub fn target(mut self, target: Target) -> Self {
        self.target = Some(target);
        self
    }

    /// `value / baseline`, when there is a baseline.
    pub fn ratio(&self) -> Option<f64> {
        self.baseline.as_ref().map(|(_, b)| self.value / b)
    }

    /// Whether the figure meets its target (`None` without a target).
    pub fn meets_target(&self) -> Option<bool> {
        let judged = self.ratio().unwrap_or(self.value);
        self.target.map(|t| match t {
            Target::AtMost(limit) => judged <= limit,
            Target::AtLeast(limit) => judged >= limit,
        })
    }
}

/// Median and spread of a set of samples.
#[derive(Clone, Copy, Debug)]
pub struct Stats {
    /// The median.
    pub median: f64,
    /// The 10th percentile.
    pub p10: f64,
    /// The 90th percentile.
    pub p90: f64,
    /// How many samples.
    pub count: usize,
}

impl Stats {
    /// Statistics of `values` (sorted in place).
    pub fn of(values: &mut [f64]) -> Self {
        assert!(!values.is_empty(), "no samples");
        values.sort_by(f64::total_cmp);
        let at = |q: f64| values[((values.len() - 1) as f64 * q).round() as usize];
        let (p10, p90) = (at(0.1), at(0.9));
        Self {
            median: median(values),
            p10,
            p90,
            count: values.len(),
        }
    }
}

/// Whether KVM is usable for the `what` figures. Without it, prints one
/// line saying they are skipped and returns false — unless
/// `SNAPVM_REQUIRE_KVM` is set, in which case it panics.
pub fn kvm_usable(what: &str) -> bool {
    match snapvm::vm::check_kvm() {
        Ok(()) => true,
        Err(e) if std::env::var_os("SNAPVM_REQUIRE_KVM").is_some() => {
            panic!("SNAPVM_REQUIRE_KVM is set but KVM is unusable: {e}")
        }
        Err(e) => {
            println!("skipping the {what} figures: {e}");
            false
        }
    }
}

/// Wall time of one run of `f`, in µs.
pub fn time_us(f: impl FnOnce()) -> f64 {
    let start = Instant::now();
    f();
    start.elapsed().as_secs_f64() * 1e6
}

/// Median of `samples` in microseconds.
#[allow(
    dead_code,
    reason = "helper for the figure modules; not every module uses it"
)]
pub fn median_us(samples: &mut [Duration]) -> f64 {
    assert!(!samples.is_empty(), "no samples");
    samples.sort_unstable();
    samples[samples.len() / 2].as_secs_f64() * 1e6
}

/// Runs `f` `n` times and returns the median wall time of one run, in µs.
#[allow(
    dead_code,
    reason = "helper for the figure modules; not every module uses it"
)]
pub fn time_median_us(n: usize, mut f: impl FnMut()) -> f64 {
    let mut samples: Vec<Duration> = (0..n)
        .map(|_| {
            let start = Instant::now();
            f();
            start.elapsed()
        })
        .collect();
    median_us(&mut samples)
}

/// Median of plain values.
pub fn median(values: &mut [f64]) -> f64 {
    assert!(!values.is_empty(), "no samples");
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}
