//! The figures of `cargo bench --bench report`, one module per primitive.
//! Each module exposes `pub fn measure(ctx: &Ctx) -> Vec<Figure>`.

pub mod store;
pub mod vm;

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
    AtLeast(f64),
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
}

impl Figure {
    /// A figure with no baseline and no target.
    pub fn plain(name: &str, value: f64, unit: &'static str) -> Self {
        Self { name: name.to_string(), value, unit, baseline: None, target: None }
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

/// Median of `samples` in microseconds.
pub fn median_us(samples: &mut [Duration]) -> f64 {
    assert!(!samples.is_empty(), "no samples");
    samples.sort_unstable();
    samples[samples.len() / 2].as_secs_f64() * 1e6
}

/// Runs `f` `n` times and returns the median wall time of one run, in µs.
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
