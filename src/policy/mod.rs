//! Restore policies: when to rewind a VM to its ready state; and
//! transactions: when to rewind it to a transaction's start and retry.
//!
//! Transactions ([`Transaction`], [`SuccessCriteria`], [`RetryPolicy`])
//! are described in `docs/transactions.md` and on [`Transaction`].
//!
//! After every call, a [`RestorePolicy`] looks at the call's
//! [`InvokeStats`] and decides to [`Decision::Keep`] the VM as it is or
//! [`Decision::Reset`] it to the ready snapshot. Three uses:
//!
//! - **Isolation** — [`Always`]: every request starts from the ready state;
//!   nothing one request leaves behind (data, secrets, corrupted state) is
//!   seen by the next.
//! - **Garbage by restore** — [`GuestGarbageAbove`]: instead of collecting
//!   garbage item by item, rewind to a snapshot taken before it
//!   accumulated, keeping what the guest asked to preserve
//!   (`snapvm_guest::preserve`).
//! - **Amortized resets** — [`EveryN`], [`DirtyAbove`], [`OnError`], and any
//!   combination ([`RestorePolicy::or`], [`RestorePolicy::and`]) or closure.
//!
//! Restore policies and success criteria share their combinators: [`Or`]
//! and [`And`] (and, for criteria, [`Not`]), the types their `.or()`,
//! `.and()` and `.not()` methods build, each judged by the trait of what
//! they combine.
//!
//! [`ManagedVm`] applies a policy to a VM. A reset rewinds only the pages
//! the guest wrote since the last reset (KVM dirty logging), so its cost
//! follows what a request touched, not the size of the guest; see
//! `docs/policies.md` for the mechanism and its measured cost.
//!
//! ```no_run
//! use snapvm::policy::{EveryN, ManagedVm, OnError, RestorePolicy};
//! use snapvm::{GuestProgram, VmConfig, VmInstance};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let config = VmConfig::new(GuestProgram::from_file("guest.elf")?).dirty_tracking(true);
//! let mut template = VmInstance::new(&config)?;
//! let ready = template.snapshot()?;
//! let mut vm = ManagedVm::new(
//!     VmInstance::restore(&config, &ready)?,
//!     ready,
//!     EveryN(100).or(OnError),
//! )?;
//! let out = vm.invoke("handle", b"request")?;
//! # Ok(()) }
//! ```

mod managed;
mod poll;
mod pool;

use std::time::Duration;

pub use crate::combinator::{And, Not, Or};
pub use crate::instance::{TxEnd, MAX_DEFERRED_CALLS};
pub use crate::tx::{
    Attempt, AttemptInfo, Committed, HostCheck, NoTimeout, OutputMatches, RetryPolicy, ReturnedOk,
    SuccessCriteria, Transaction, TxError, TxOutcome, Verdict,
};
pub use managed::ManagedVm;
pub use poll::{PollConfig, PollingVm, MAX_POLL_WINDOW, MIN_POLL_WINDOW};
pub use pool::{PooledVm, ReadyPool, ReadyPoolStats};

/// What a policy decides after a call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Keep the VM as the call left it.
    Keep,
    /// Rewind the VM to its ready snapshot (keeping preserved regions).
    Reset,
}

/// How a call ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Outcome {
    /// The function returned its output.
    Success,
    /// The call failed but the VM is still ready (e.g. output too large).
    Failed,
    /// The call poisoned the VM (panic, fault, timeout, …). A poisoned VM is
    /// always reset, whatever the policy says.
    Poisoned,
}

/// What a policy knows about the call that just ended.
#[derive(Clone, Copy, Debug)]
#[non_exhaustive]
pub struct InvokeStats<'a> {
    /// The function called.
    pub function: &'a str,
    /// How it ended.
    pub outcome: Outcome,
    /// Wall time of the call.
    pub elapsed: Duration,
    /// 4 KiB pages the guest wrote during this call. Counted for a policy
    /// whose [`RestorePolicy::reads_dirty_pages`] is true; for others the
    /// dirty log is not read after each call (an ioctl saved), and this and
    /// the next count may be 0.
    pub pages_dirtied: u64,
    /// Distinct 4 KiB pages written since the last reset (same condition).
    pub dirty_pages_since_reset: u64,
    /// Calls since the last reset, this one included.
    pub invocations_since_reset: u64,
    /// Guest heap bytes in use after the call.
    pub heap_used: u64,
    /// Heap growth since the ready state: memory allocated and not freed.
    pub heap_growth: u64,
    /// The guest's own garbage measure, if it reports one.
    pub guest_garbage: Option<u64>,
}

impl InvokeStats<'_> {
    /// The garbage measure policies use: the guest's own report if it made
    /// one, otherwise the heap growth since the ready state.
    pub fn garbage(&self) -> u64 {
        self.guest_garbage.unwrap_or(self.heap_growth)
    }
}

/// Decides, after each call, whether to keep or reset a VM.
///
/// Any `Fn(&InvokeStats) -> Decision` is a policy.
pub trait RestorePolicy: Send + Sync {
    /// The decision for the call described by `stats`.
    fn decide(&self, stats: &InvokeStats<'_>) -> Decision;

    /// Whether [`Self::decide`] reads [`InvokeStats::pages_dirtied`] or
    /// [`InvokeStats::dirty_pages_since_reset`]. Those counts come from
    /// KVM's dirty log, which only a stopped VM can report: a
    /// [`PollingVm`] (whose guest keeps running between calls) refuses a
    /// policy that reads them. The default, `true`, is the safe answer for
    /// a policy that does not say; the built-in policies answer exactly.
    fn reads_dirty_pages(&self) -> bool {
        true
    }

    /// Whether the regions the guest preserved (`snapvm_guest::preserve`)
    /// keep their bytes across this policy's resets. The default, `true`,
    /// is what preservation is for (state that outlives garbage-collecting
    /// resets). [`Always`] answers `false`: a request's bytes never reach
    /// the next request, not even through a preserved region the guest
    /// chose; wrap it in [`KeepPreserved`] (`Always.keeping_preserved()`)
    /// to declare that preserved bytes may cross requests.
    fn keeps_preserved(&self) -> bool {
        true
    }

    /// This policy with preserved regions kept across its resets (see
    /// [`Self::keeps_preserved`]).
    fn keeping_preserved(self) -> KeepPreserved<Self>
    where
        Self: Sized,
    {
        KeepPreserved(self)
    }

    /// Resets when either policy says so ([`Or`]).
    fn or<P: RestorePolicy>(self, other: P) -> Or<Self, P>
    where
        Self: Sized,
    {
        Or(self, other)
    }

    /// Resets only when both policies say so ([`And`]).
    fn and<P: RestorePolicy>(self, other: P) -> And<Self, P>
    where
        Self: Sized,
    {
        And(self, other)
    }
}

impl<F> RestorePolicy for F
where
    F: Fn(&InvokeStats<'_>) -> Decision + Send + Sync,
{
    fn decide(&self, stats: &InvokeStats<'_>) -> Decision {
        self(stats)
    }
}

impl RestorePolicy for Box<dyn RestorePolicy> {
    fn decide(&self, stats: &InvokeStats<'_>) -> Decision {
        (**self).decide(stats)
    }

    fn reads_dirty_pages(&self) -> bool {
        (**self).reads_dirty_pages()
    }

    fn keeps_preserved(&self) -> bool {
        (**self).keeps_preserved()
    }
}

fn reset_if(condition: bool) -> Decision {
    if condition {
        Decision::Reset
    } else {
        Decision::Keep
    }
}

/// Reset after every call: single-request isolation. Preserved regions
/// are reset too (nothing a request wrote reaches the next one) unless
/// declared with [`RestorePolicy::keeping_preserved`].
#[derive(Clone, Copy, Debug, Default)]
pub struct Always;

impl RestorePolicy for Always {
    fn decide(&self, _: &InvokeStats<'_>) -> Decision {
        Decision::Reset
    }

    fn reads_dirty_pages(&self) -> bool {
        false
    }

    fn keeps_preserved(&self) -> bool {
        false
    }
}

/// `P`, with the guest's preserved regions kept across its resets: the
/// declaration that preserved bytes may cross from one request to the
/// next (see [`RestorePolicy::keeps_preserved`]).
#[derive(Clone, Copy, Debug, Default)]
pub struct KeepPreserved<P>(pub P);

impl<P: RestorePolicy> RestorePolicy for KeepPreserved<P> {
    fn decide(&self, stats: &InvokeStats<'_>) -> Decision {
        self.0.decide(stats)
    }

    fn reads_dirty_pages(&self) -> bool {
        self.0.reads_dirty_pages()
    }

    fn keeps_preserved(&self) -> bool {
        true
    }
}

/// Never reset (except after a poisoning error, which always resets).
#[derive(Clone, Copy, Debug, Default)]
pub struct Never;

impl RestorePolicy for Never {
    fn decide(&self, _: &InvokeStats<'_>) -> Decision {
        Decision::Keep
    }

    fn reads_dirty_pages(&self) -> bool {
        false
    }
}

/// Reset after every `n` calls (`EveryN(1)` is [`Always`]).
#[derive(Clone, Copy, Debug)]
pub struct EveryN(pub u64);

impl RestorePolicy for EveryN {
    fn decide(&self, stats: &InvokeStats<'_>) -> Decision {
        reset_if(stats.invocations_since_reset >= self.0)
    }

    fn reads_dirty_pages(&self) -> bool {
        false
    }
}

/// Reset once more than this many bytes of guest memory were written since
/// the last reset (the cost of the next reset grows with it).
#[derive(Clone, Copy, Debug)]
pub struct DirtyAbove(pub u64);

impl RestorePolicy for DirtyAbove {
    fn decide(&self, stats: &InvokeStats<'_>) -> Decision {
        reset_if(stats.dirty_pages_since_reset * crate::abi::PAGE_SIZE > self.0)
    }
}

/// Reset once the guest's garbage exceeds this many bytes: the guest's own
/// report (`snapvm_guest::report_garbage`) if it makes one, otherwise the
/// heap growth since the ready state, which the `snapvm-guest` allocator
/// reports after every call.
#[derive(Clone, Copy, Debug)]
pub struct GuestGarbageAbove(pub u64);

impl RestorePolicy for GuestGarbageAbove {
    fn decide(&self, stats: &InvokeStats<'_>) -> Decision {
        reset_if(stats.garbage() > self.0)
    }

    fn reads_dirty_pages(&self) -> bool {
        false
    }
}

/// Reset after any failed call.
#[derive(Clone, Copy, Debug, Default)]
pub struct OnError;

impl RestorePolicy for OnError {
    fn decide(&self, stats: &InvokeStats<'_>) -> Decision {
        reset_if(stats.outcome != Outcome::Success)
    }

    fn reads_dirty_pages(&self) -> bool {
        false
    }
}

/// Resets when either policy says so.
impl<A: RestorePolicy, B: RestorePolicy> RestorePolicy for Or<A, B> {
    fn decide(&self, stats: &InvokeStats<'_>) -> Decision {
        reset_if(self.0.decide(stats) == Decision::Reset || self.1.decide(stats) == Decision::Reset)
    }

    fn reads_dirty_pages(&self) -> bool {
        self.0.reads_dirty_pages() || self.1.reads_dirty_pages()
    }

    /// Kept only if both keep them: resetting whenever either does, this
    /// isolates requests as much as the stricter of the two.
    fn keeps_preserved(&self) -> bool {
        self.0.keeps_preserved() && self.1.keeps_preserved()
    }
}

/// Resets only when both policies say so.
impl<A: RestorePolicy, B: RestorePolicy> RestorePolicy for And<A, B> {
    fn decide(&self, stats: &InvokeStats<'_>) -> Decision {
        reset_if(self.0.decide(stats) == Decision::Reset && self.1.decide(stats) == Decision::Reset)
    }

    fn reads_dirty_pages(&self) -> bool {
        self.0.reads_dirty_pages() || self.1.reads_dirty_pages()
    }

    /// Kept if either keeps them: resetting only when both do, this
    /// isolates requests no more than the looser of the two.
    fn keeps_preserved(&self) -> bool {
        self.0.keeps_preserved() || self.1.keeps_preserved()
    }
}

/// The former name of [`Or`] for restore policies.
#[deprecated(note = "renamed `Or` (`policy::Or`, built by `RestorePolicy::or`)")]
pub type Any<A, B> = Or<A, B>;

/// The former name of [`And`] for restore policies.
#[deprecated(note = "renamed `And` (`policy::And`, built by `RestorePolicy::and`)")]
pub type All<A, B> = And<A, B>;

/// A policy that resets when `a` or `b` does: `Or(a, b)`.
#[deprecated(note = "use `a.or(b)` or `Or(a, b)`")]
pub fn any<A: RestorePolicy, B: RestorePolicy>(a: A, b: B) -> Or<A, B> {
    Or(a, b)
}

/// A policy that resets only when both `a` and `b` do: `And(a, b)`.
#[deprecated(note = "use `a.and(b)` or `And(a, b)`")]
pub fn all<A: RestorePolicy, B: RestorePolicy>(a: A, b: B) -> And<A, B> {
    And(a, b)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stats(
        calls: u64,
        dirty: u64,
        growth: u64,
        garbage: Option<u64>,
        outcome: Outcome,
    ) -> InvokeStats<'static> {
        InvokeStats {
            function: "f",
            outcome,
            elapsed: Duration::ZERO,
            pages_dirtied: dirty,
            dirty_pages_since_reset: dirty,
            invocations_since_reset: calls,
            heap_used: growth,
            heap_growth: growth,
            guest_garbage: garbage,
        }
    }

    #[test]
    fn built_in_policies_decide_as_documented() {
        let ok = stats(3, 10, 1000, None, Outcome::Success);
        assert_eq!(Always.decide(&ok), Decision::Reset);
        assert_eq!(Never.decide(&ok), Decision::Keep);
        assert_eq!(EveryN(3).decide(&ok), Decision::Reset);
        assert_eq!(EveryN(4).decide(&ok), Decision::Keep);
        assert_eq!(DirtyAbove(10 * 4096).decide(&ok), Decision::Keep);
        assert_eq!(DirtyAbove(10 * 4096 - 1).decide(&ok), Decision::Reset);
        assert_eq!(GuestGarbageAbove(999).decide(&ok), Decision::Reset);
        assert_eq!(GuestGarbageAbove(1000).decide(&ok), Decision::Keep);
        // A guest-reported measure replaces the heap growth.
        let reported = stats(3, 10, 1000, Some(5), Outcome::Success);
        assert_eq!(GuestGarbageAbove(999).decide(&reported), Decision::Keep);
        assert_eq!(OnError.decide(&ok), Decision::Keep);
        assert_eq!(
            OnError.decide(&stats(1, 0, 0, None, Outcome::Failed)),
            Decision::Reset
        );
    }

    #[test]
    fn combinators_and_closures_compose() {
        let ok = stats(2, 0, 0, None, Outcome::Success);
        let failed = stats(2, 0, 0, None, Outcome::Failed);
        assert_eq!(EveryN(5).or(OnError).decide(&ok), Decision::Keep);
        assert_eq!(EveryN(5).or(OnError).decide(&failed), Decision::Reset);
        assert_eq!(And(EveryN(2), OnError).decide(&ok), Decision::Keep);
        assert_eq!(And(EveryN(2), OnError).decide(&failed), Decision::Reset);
        let even = |s: &InvokeStats<'_>| reset_if(s.invocations_since_reset % 2 == 0);
        assert_eq!(Or(Never, even).decide(&ok), Decision::Reset);
        let boxed: Box<dyn RestorePolicy> = Box::new(Never.and(Always));
        assert_eq!(boxed.decide(&ok), Decision::Keep);
    }

    #[test]
    #[allow(deprecated, reason = "the former names must keep compiling")]
    fn former_combinator_names_still_compile() {
        let failed = stats(2, 0, 0, None, Outcome::Failed);
        let either: Any<EveryN, OnError> = any(EveryN(5), OnError);
        let both: All<EveryN, OnError> = all(EveryN(5), OnError);
        assert_eq!(either.decide(&failed), Decision::Reset);
        assert_eq!(both.decide(&failed), Decision::Keep);
    }
}
