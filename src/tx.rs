//! Transactions: success criteria, retry policies and the runner that
//! retries a guest transaction by rewinding the VM (see
//! `docs/transactions.md`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::combinator::{And, Not, Or};
use crate::instance::TxEnd;
use crate::snapshot::{Snapshot, SnapshotError, SnapshotId};
use crate::vm::VmError;
use crate::VmInstance;

/// What a [`SuccessCriteria`] decides about one attempt.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// The attempt succeeded: its effects stay, its deferred host calls are
    /// delivered, and the call returns.
    Success,
    /// The attempt failed for a reason that may pass (contention, a
    /// conflict, a timeout): rewind the VM to the transaction's start and
    /// run it again, if the [`RetryPolicy`] allows another attempt.
    Retry(String),
    /// The attempt failed for a reason that will not pass (invalid input,
    /// a broken invariant): stop now, without another attempt.
    Fatal(String),
}

/// What the criteria see about one attempt.
#[derive(Clone, Copy, Debug)]
#[non_exhaustive]
pub struct AttemptInfo<'a> {
    /// 1 for the first attempt.
    pub number: u32,
    /// Wall time of the attempt (for the first: the whole call so far).
    pub elapsed: Duration,
    /// How the guest ended its transaction (`tx::commit`/`tx::abort`), if
    /// it reached the end.
    pub tx: Option<&'a TxEnd>,
    /// The function's output, or the error the call ended with.
    pub result: Result<&'a [u8], &'a VmError>,
}

/// Judges a transaction attempt: [`Verdict::Success`], [`Verdict::Retry`]
/// or [`Verdict::Fatal`].
///
/// Any `Fn(&AttemptInfo) -> Verdict` is a criterion. Whatever a criterion
/// says, an attempt whose call failed is never a success (a `Success` for
/// it counts as `Retry` with the error as the reason), and some failures
/// are always fatal (see [`Transaction`]).
pub trait SuccessCriteria: Send + Sync {
    /// The verdict on `attempt`.
    fn judge(&self, attempt: &AttemptInfo<'_>) -> Verdict;

    /// Success only when both succeed; otherwise the first failure (a
    /// `Fatal` from either wins).
    fn and<C: SuccessCriteria>(self, other: C) -> And<Self, C>
    where
        Self: Sized,
    {
        And(self, other)
    }

    /// Success when either succeeds; `Fatal` only when both are fatal.
    fn or<C: SuccessCriteria>(self, other: C) -> Or<Self, C>
    where
        Self: Sized,
    {
        Or(self, other)
    }

    /// Success where this criterion asks for a retry and the other way
    /// round; `Fatal` stays `Fatal`.
    fn not(self) -> Not<Self>
    where
        Self: Sized,
    {
        Not(self)
    }
}

impl<F> SuccessCriteria for F
where
    F: Fn(&AttemptInfo<'_>) -> Verdict + Send + Sync,
{
    fn judge(&self, attempt: &AttemptInfo<'_>) -> Verdict {
        self(attempt)
    }
}

impl SuccessCriteria for Box<dyn SuccessCriteria> {
    fn judge(&self, attempt: &AttemptInfo<'_>) -> Verdict {
        (**self).judge(attempt)
    }
}

/// The guest committed its transaction (`tx::commit`). An abort is a
/// retry with the guest's reason; no end at all (the call failed first) a
/// retry too.
#[derive(Clone, Copy, Debug, Default)]
pub struct Committed;

impl SuccessCriteria for Committed {
    fn judge(&self, attempt: &AttemptInfo<'_>) -> Verdict {
        match attempt.tx {
            Some(TxEnd::Committed) => Verdict::Success,
            Some(TxEnd::Aborted(reason)) => Verdict::Retry(format!("aborted: {reason}")),
            None => Verdict::Retry("the transaction did not end".into()),
        }
    }
}

/// The function returned its output (no guest error, crash or timeout);
/// otherwise a retry with the error as the reason.
#[derive(Clone, Copy, Debug, Default)]
pub struct ReturnedOk;

impl SuccessCriteria for ReturnedOk {
    fn judge(&self, attempt: &AttemptInfo<'_>) -> Verdict {
        match attempt.result {
            Ok(_) => Verdict::Success,
            Err(e) => Verdict::Retry(e.to_string()),
        }
    }
}

/// The function returned an output for which the predicate holds.
#[derive(Clone, Copy, Debug)]
pub struct OutputMatches<F>(pub F);

impl<F: Fn(&[u8]) -> bool + Send + Sync> SuccessCriteria for OutputMatches<F> {
    fn judge(&self, attempt: &AttemptInfo<'_>) -> Verdict {
        match attempt.result {
            Ok(out) if (self.0)(out) => Verdict::Success,
            Ok(_) => Verdict::Retry("the output does not match".into()),
            Err(e) => Verdict::Retry(e.to_string()),
        }
    }
}

/// The attempt did not time out.
#[derive(Clone, Copy, Debug, Default)]
pub struct NoTimeout;

impl SuccessCriteria for NoTimeout {
    fn judge(&self, attempt: &AttemptInfo<'_>) -> Verdict {
        match attempt.result {
            Err(e @ VmError::Timeout { .. }) => Verdict::Retry(e.to_string()),
            _ => Verdict::Success,
        }
    }
}

/// A check of state outside the VM (a database row, a lock, a version):
/// `Ok(())` is success, `Err(reason)` a retry.
#[derive(Clone, Copy, Debug)]
pub struct HostCheck<F>(pub F);

impl<F: Fn() -> Result<(), String> + Send + Sync> SuccessCriteria for HostCheck<F> {
    fn judge(&self, _: &AttemptInfo<'_>) -> Verdict {
        match (self.0)() {
            Ok(()) => Verdict::Success,
            Err(reason) => Verdict::Retry(reason),
        }
    }
}

/// Success only when both succeed; otherwise the first failure (a `Fatal`
/// from either wins).
impl<A: SuccessCriteria, B: SuccessCriteria> SuccessCriteria for And<A, B> {
    fn judge(&self, attempt: &AttemptInfo<'_>) -> Verdict {
        match (self.0.judge(attempt), self.1.judge(attempt)) {
            (Verdict::Success, Verdict::Success) => Verdict::Success,
            (fatal @ Verdict::Fatal(_), _) | (_, fatal @ Verdict::Fatal(_)) => fatal,
            (Verdict::Success, retry) | (retry, _) => retry,
        }
    }
}

/// Success when either succeeds; `Fatal` only when both are fatal.
impl<A: SuccessCriteria, B: SuccessCriteria> SuccessCriteria for Or<A, B> {
    fn judge(&self, attempt: &AttemptInfo<'_>) -> Verdict {
        match (self.0.judge(attempt), self.1.judge(attempt)) {
            (Verdict::Success, _) | (_, Verdict::Success) => Verdict::Success,
            (Verdict::Fatal(a), Verdict::Fatal(_)) => Verdict::Fatal(a),
            (Verdict::Retry(a), _) | (_, Verdict::Retry(a)) => Verdict::Retry(a),
        }
    }
}

/// Success where the criterion asks for a retry and the other way round;
/// `Fatal` stays `Fatal`.
impl<A: SuccessCriteria> SuccessCriteria for Not<A> {
    fn judge(&self, attempt: &AttemptInfo<'_>) -> Verdict {
        match self.0.judge(attempt) {
            Verdict::Success => Verdict::Retry("a negated criterion held".into()),
            Verdict::Retry(_) => Verdict::Success,
            fatal @ Verdict::Fatal(_) => fatal,
        }
    }
}

/// Which failed attempts a [`RetryPolicy`] retries.
type Retryable = Arc<dyn Fn(&AttemptInfo<'_>) -> bool + Send + Sync>;

/// How often and how soon a failed attempt is retried.
///
/// The default: at most 3 attempts, exponential backoff from 1 ms doubling
/// up to 100 ms with jitter (each wait uniform between half and all of
/// the exponential delay), no overall deadline, and retries for attempts
/// whose call returned (the criteria asked for a retry), ended with a guest
/// error, or timed out — not for guest crashes (panic, fault, abort, out of
/// memory), which a retry would only repeat.
#[derive(Clone)]
pub struct RetryPolicy {
    max_attempts: u32,
    initial_backoff: Duration,
    max_backoff: Duration,
    jitter: bool,
    deadline: Option<Duration>,
    retryable: Option<Retryable>,
}

impl std::fmt::Debug for RetryPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RetryPolicy")
            .field("max_attempts", &self.max_attempts)
            .field("initial_backoff", &self.initial_backoff)
            .field("max_backoff", &self.max_backoff)
            .field("jitter", &self.jitter)
            .field("deadline", &self.deadline)
            .field("custom_retryable", &self.retryable.is_some())
            .finish()
    }
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 3,
            initial_backoff: Duration::from_millis(1),
            max_backoff: Duration::from_millis(100),
            jitter: true,
            deadline: None,
            retryable: None,
        }
    }
}

impl RetryPolicy {
    /// At most `n` attempts in all (at least 1).
    pub fn max_attempts(mut self, n: u32) -> Self {
        self.max_attempts = n.max(1);
        self
    }

    /// Exponential backoff: wait `initial` after the first failure,
    /// doubling after each further one, never more than `max`.
    pub fn backoff(mut self, initial: Duration, max: Duration) -> Self {
        self.initial_backoff = initial;
        self.max_backoff = max.max(initial);
        self
    }

    /// Retry at once, without waiting.
    pub fn no_backoff(self) -> Self {
        self.backoff(Duration::ZERO, Duration::ZERO)
    }

    /// Randomize each wait between half and all of its exponential delay
    /// (on by default), so contending VMs do not retry in lockstep.
    pub fn jitter(mut self, on: bool) -> Self {
        self.jitter = on;
        self
    }

    /// Give up once the transaction has run this long: no attempt starts
    /// (and no backoff waits) past it.
    pub fn deadline(mut self, limit: Duration) -> Self {
        self.deadline = Some(limit);
        self
    }

    /// Retry only failed attempts for which `f` is true (replaces the
    /// default rule; the rest are fatal).
    pub fn retry_if<F>(mut self, f: F) -> Self
    where
        F: Fn(&AttemptInfo<'_>) -> bool + Send + Sync + 'static,
    {
        self.retryable = Some(Arc::new(f));
        self
    }

    fn retries(&self, attempt: &AttemptInfo<'_>) -> bool {
        match &self.retryable {
            Some(f) => f(attempt),
            None => matches!(
                attempt.result,
                Ok(_) | Err(VmError::GuestError { .. } | VmError::Timeout { .. })
            ),
        }
    }

    /// The wait after failed attempt `number` (1-based).
    fn delay(&self, number: u32) -> Duration {
        let factor = 1u32 << number.saturating_sub(1).min(20);
        let delay = self
            .initial_backoff
            .saturating_mul(factor)
            .min(self.max_backoff);
        if !self.jitter || delay.is_zero() {
            return delay;
        }
        let mut bytes = [0u8; 8];
        if getrandom::fill(&mut bytes).is_err() {
            return delay;
        }
        let unit = (u64::from_le_bytes(bytes) >> 11) as f64 / (1u64 << 53) as f64;
        delay.mul_f64(0.5 + unit / 2.0)
    }
}

/// One attempt of a transaction, as the result reports it.
#[derive(Debug)]
#[non_exhaustive]
pub struct Attempt {
    /// 1 for the first attempt.
    pub number: u32,
    /// Wall time of the attempt (for the first: the whole call up to its
    /// end, code before `tx::begin` included).
    pub elapsed: Duration,
    /// Wall time of the rewind before this attempt (`None` for the first).
    pub rewind: Option<Duration>,
    /// How the guest ended its transaction, if it did.
    pub tx: Option<TxEnd>,
    /// The verdict (after the runner's own rules, see [`Transaction`]).
    pub verdict: Verdict,
    /// The error the call ended with, if it failed.
    pub error: Option<VmError>,
}

/// A transaction that succeeded.
#[derive(Debug)]
#[non_exhaustive]
pub struct TxOutcome {
    /// The output of the successful attempt.
    pub output: Vec<u8>,
    /// Every attempt, the successful one last.
    pub attempts: Vec<Attempt>,
    /// Deferred host calls delivered for the successful attempt.
    pub delivered: usize,
    /// Deferred host calls that failed on delivery: (function, message).
    /// The transaction stands; the guest already got its answer.
    pub delivery_failures: Vec<(String, String)>,
}

/// Why a transaction did not succeed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TxError {
    /// The VM does not track dirty pages against the given snapshot, so it
    /// cannot be rewound (build it with `VmConfig::dirty_tracking(true)`
    /// and take or restore `base` into it).
    #[error("the VM does not track written pages against snapshot {base}")]
    NotTracking {
        /// The snapshot given.
        base: SnapshotId,
    },
    /// Every attempt the [`RetryPolicy`] allows failed. The VM is as the
    /// last attempt left it.
    #[error("the transaction failed {} times; last: {}", attempts.len(), last_reason(attempts))]
    RetriesExhausted {
        /// Every attempt, with its failure.
        attempts: Vec<Attempt>,
    },
    /// The [`RetryPolicy`] deadline passed before another attempt could
    /// start. The VM is as the last attempt left it.
    #[error("the transaction's deadline passed after {} attempts; last: {}", attempts.len(), last_reason(attempts))]
    DeadlineExceeded {
        /// Every attempt, with its failure.
        attempts: Vec<Attempt>,
    },
    /// An attempt failed fatally (the criteria said so, the failure is not
    /// retryable, or the call failed before its transaction began). No
    /// further attempt ran; the VM is as that attempt left it.
    #[error("the transaction failed fatally: {reason}")]
    Fatal {
        /// Why.
        reason: String,
        /// Every attempt, the fatal one last.
        attempts: Vec<Attempt>,
    },
    /// Rewinding the VM failed; it is poisoned.
    #[error("rewinding the VM to the transaction's start failed")]
    Rewind(#[source] SnapshotError),
    /// Resetting a [`ManagedVm`](super::ManagedVm) before the transaction
    /// failed; no guest code ran.
    #[error("resetting the VM before the transaction failed")]
    Reset(#[source] SnapshotError),
}

fn last_reason(attempts: &[Attempt]) -> String {
    match attempts.last().map(|a| &a.verdict) {
        Some(Verdict::Retry(r) | Verdict::Fatal(r)) => r.clone(),
        _ => String::new(),
    }
}

impl TxError {
    /// Every attempt made, if the transaction ran.
    pub fn attempts(&self) -> &[Attempt] {
        match self {
            Self::RetriesExhausted { attempts }
            | Self::DeadlineExceeded { attempts }
            | Self::Fatal { attempts, .. } => attempts,
            Self::NotTracking { .. } | Self::Rewind(_) | Self::Reset(_) => &[],
        }
    }

    /// What kind of failure this is (see [`crate::ErrorKind`]): the kind of
    /// the last attempt's error if it had one, [`crate::ErrorKind::GuestError`]
    /// for a transaction the criteria rejected.
    pub fn kind(&self) -> crate::ErrorKind {
        match self {
            Self::NotTracking { .. } => crate::ErrorKind::Invalid,
            Self::Rewind(e) | Self::Reset(e) => e.kind(),
            Self::RetriesExhausted { .. } | Self::DeadlineExceeded { .. } | Self::Fatal { .. } => {
                self.vm_error()
                    .map_or(crate::ErrorKind::GuestError, VmError::kind)
            }
        }
    }

    /// The VM error inside, if any: the last attempt's, or the rewind's.
    pub fn vm_error(&self) -> Option<&VmError> {
        match self {
            Self::Rewind(e) | Self::Reset(e) => e.vm_error(),
            _ => self.attempts().last().and_then(|a| a.error.as_ref()),
        }
    }
}

/// Runs a guest function whose transaction (`snapvm_guest::tx`) is judged
/// by a [`SuccessCriteria`] and retried under a [`RetryPolicy`], rewinding
/// the VM to the transaction's start between attempts.
///
/// After each attempt (at the function's return, or at the error that
/// stopped it) the runner decides, in this order:
/// 1. **Always fatal**: the call was cancelled, the guest broke the
///    transaction protocol ([`VmError::Transaction`]), the host failed
///    (KVM, memory), or the call failed before `tx::begin` (nothing to
///    rewind to).
/// 2. The criteria's verdict; a `Success` for a call that failed counts as
///    `Retry` with the error as the reason.
/// 3. A `Retry` the policy does not retry ([`RetryPolicy::retry_if`]) is
///    fatal; one past the last attempt is
///    [`TxError::RetriesExhausted`], past the deadline
///    [`TxError::DeadlineExceeded`].
///
/// A function that begins no transaction runs once; it is judged as usual,
/// and a failure is fatal (there is no checkpoint to rewind to).
///
/// ```no_run
/// use std::time::Duration;
/// use snapvm::policy::{Committed, RetryPolicy, ReturnedOk, SuccessCriteria, Transaction};
/// use snapvm::{GuestProgram, VmConfig, VmInstance};
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let config = VmConfig::new(GuestProgram::from_file("guest.elf")?).dirty_tracking(true);
/// let mut vm = VmInstance::new(&config)?;
/// let base = vm.snapshot()?; // the VM now tracks written pages against it
/// let tx = Transaction::with_criteria(Committed.and(ReturnedOk))
///     .retry(RetryPolicy::default().max_attempts(5).deadline(Duration::from_secs(1)));
/// let done = tx.invoke(&mut vm, &base, "transfer", b"42")?;
/// println!("{} attempts", done.attempts.len());
/// # Ok(()) }
/// ```
#[derive(Clone, Debug)]
pub struct Transaction<C = And<Committed, ReturnedOk>> {
    criteria: C,
    retry: RetryPolicy,
}

impl Default for Transaction {
    fn default() -> Self {
        Self::new()
    }
}

impl Transaction {
    /// A transaction judged by the default criteria — the guest committed
    /// and the function returned `Ok` — under the default [`RetryPolicy`].
    pub fn new() -> Self {
        Self::with_criteria(Committed.and(ReturnedOk))
    }
}

impl<C: SuccessCriteria> Transaction<C> {
    /// A transaction judged by `criteria`, under the default
    /// [`RetryPolicy`].
    pub fn with_criteria(criteria: C) -> Self {
        Self {
            criteria,
            retry: RetryPolicy::default(),
        }
    }

    /// Replaces the retry policy.
    pub fn retry(mut self, policy: RetryPolicy) -> Self {
        self.retry = policy;
        self
    }

    /// Calls `name` with `input` on `vm`, which tracks written pages
    /// against `base` (a snapshot taken from it or restored into it, like
    /// a [`ManagedVm`](super::ManagedVm)'s ready snapshot).
    pub fn invoke<D>(
        &self,
        vm: &mut VmInstance<D>,
        base: &Snapshot,
        name: &str,
        input: &[u8],
    ) -> Result<TxOutcome, TxError> {
        self.run(vm, base, name, input, None)
    }

    /// Like [`Self::invoke`], with call data for the host functions (see
    /// [`VmInstance::invoke_with`]); deferred host calls see it on
    /// delivery too.
    pub fn invoke_with<D>(
        &self,
        vm: &mut VmInstance<D>,
        base: &Snapshot,
        name: &str,
        input: &[u8],
        call_data: &mut (dyn std::any::Any + Send),
    ) -> Result<TxOutcome, TxError> {
        self.run(vm, base, name, input, Some(call_data))
    }

    fn run<D>(
        &self,
        vm: &mut VmInstance<D>,
        base: &Snapshot,
        name: &str,
        input: &[u8],
        call_data: crate::vm::CallData<'_>,
    ) -> Result<TxOutcome, TxError> {
        if vm.tracking_base() != Some(base.id()) {
            return Err(TxError::NotTracking { base: base.id() });
        }
        vm.tx_arm(true);
        let result = self.attempts(vm, base, name, input, call_data);
        vm.tx_arm(false);
        result
    }

    fn attempts<D>(
        &self,
        vm: &mut VmInstance<D>,
        base: &Snapshot,
        name: &str,
        input: &[u8],
        mut call_data: crate::vm::CallData<'_>,
    ) -> Result<TxOutcome, TxError> {
        let start = Instant::now();
        let mut attempts = Vec::new();
        let mut rewind = None;
        let mut attempt_start = start;
        let mut result = vm.invoke_with_data(name, input, call_data.as_deref_mut());
        loop {
            let number = attempts.len() as u32 + 1;
            let elapsed = attempt_start.elapsed();
            let tx = vm.tx_end().cloned();
            let verdict = self.verdict(vm, number, elapsed, tx.as_ref(), &result);
            let (output, error) = match result {
                Ok(out) => (Some(out), None),
                Err(e) => (None, Some(e)),
            };
            attempts.push(Attempt {
                number,
                elapsed,
                rewind,
                tx,
                verdict: verdict.clone(),
                error,
            });
            match verdict {
                Verdict::Success => {
                    let (delivered, delivery_failures) = vm.tx_deliver(call_data);
                    return Ok(TxOutcome {
                        output: output.unwrap_or_default(),
                        delivered,
                        attempts,
                        delivery_failures,
                    });
                }
                Verdict::Fatal(reason) => return Err(TxError::Fatal { reason, attempts }),
                Verdict::Retry(_) => {}
            }
            if number >= self.retry.max_attempts {
                return Err(TxError::RetriesExhausted { attempts });
            }
            let delay = self.retry.delay(number);
            if let Some(limit) = self.retry.deadline {
                if start.elapsed() + delay >= limit {
                    return Err(TxError::DeadlineExceeded { attempts });
                }
            }
            if !delay.is_zero() {
                std::thread::sleep(delay);
            }
            let rewind_start = Instant::now();
            vm.tx_rewind(base).map_err(TxError::Rewind)?;
            rewind = Some(rewind_start.elapsed());
            attempt_start = Instant::now();
            result = vm.tx_resume(call_data.as_deref_mut());
        }
    }

    fn verdict<D>(
        &self,
        vm: &VmInstance<D>,
        number: u32,
        elapsed: Duration,
        tx: Option<&TxEnd>,
        result: &Result<Vec<u8>, VmError>,
    ) -> Verdict {
        let info = AttemptInfo {
            number,
            elapsed,
            tx,
            result: result.as_ref().map(Vec::as_slice),
        };
        if let Err(e) = result {
            let always_fatal = matches!(
                e,
                VmError::Cancelled | VmError::Transaction(_) | VmError::Poisoned { .. }
            ) || matches!(
                e.kind(),
                crate::ErrorKind::Host | crate::ErrorKind::Invalid | crate::ErrorKind::BadRequest
            );
            if always_fatal {
                return Verdict::Fatal(e.to_string());
            }
        }
        let verdict = match (self.criteria.judge(&info), result) {
            (Verdict::Success, Err(e)) => Verdict::Retry(e.to_string()),
            (verdict, _) => verdict,
        };
        match verdict {
            Verdict::Retry(reason) if !vm.tx_checkpointed() => Verdict::Fatal(format!(
                "{reason} (the call failed before its transaction began: nothing to rewind to)"
            )),
            Verdict::Retry(reason) if !self.retry.retries(&info) => {
                Verdict::Fatal(format!("{reason} (not retryable)"))
            }
            other => other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info<'a>(tx: Option<&'a TxEnd>, result: Result<&'a [u8], &'a VmError>) -> AttemptInfo<'a> {
        AttemptInfo {
            number: 1,
            elapsed: Duration::ZERO,
            tx,
            result,
        }
    }

    fn retry(v: &Verdict) -> bool {
        matches!(v, Verdict::Retry(_))
    }

    #[test]
    fn built_in_criteria_judge_as_documented() {
        let committed = TxEnd::Committed;
        let aborted = TxEnd::Aborted("busy".into());
        let timeout = VmError::Timeout {
            limit: Duration::from_secs(1),
            clock: crate::vm::TimeoutClock::Wall,
        };
        let ok = info(Some(&committed), Ok(b"yes"));
        assert_eq!(Committed.judge(&ok), Verdict::Success);
        assert_eq!(
            Committed.judge(&info(Some(&aborted), Ok(b""))),
            Verdict::Retry("aborted: busy".into())
        );
        assert!(retry(&Committed.judge(&info(None, Err(&timeout)))));
        assert_eq!(ReturnedOk.judge(&ok), Verdict::Success);
        assert!(retry(&ReturnedOk.judge(&info(None, Err(&timeout)))));
        let yes = OutputMatches(|out: &[u8]| out == b"yes");
        assert_eq!(yes.judge(&ok), Verdict::Success);
        assert!(retry(&yes.judge(&info(Some(&committed), Ok(b"no")))));
        assert_eq!(NoTimeout.judge(&ok), Verdict::Success);
        assert!(retry(&NoTimeout.judge(&info(None, Err(&timeout)))));
        assert_eq!(HostCheck(|| Ok(())).judge(&ok), Verdict::Success);
        assert_eq!(
            HostCheck(|| Err("locked".to_string())).judge(&ok),
            Verdict::Retry("locked".into())
        );
    }

    #[test]
    fn combinators_compose_verdicts() {
        let committed = TxEnd::Committed;
        let ok = info(Some(&committed), Ok(b""));
        let fatal = |_: &AttemptInfo<'_>| Verdict::Fatal("bad".into());
        let never = |_: &AttemptInfo<'_>| Verdict::Retry("never".into());
        assert_eq!(Committed.and(ReturnedOk).judge(&ok), Verdict::Success);
        assert_eq!(
            Committed.and(never).judge(&ok),
            Verdict::Retry("never".into())
        );
        assert_eq!(never.and(fatal).judge(&ok), Verdict::Fatal("bad".into()));
        assert_eq!(never.or(Committed).judge(&ok), Verdict::Success);
        assert_eq!(never.or(fatal).judge(&ok), Verdict::Retry("never".into()));
        assert_eq!(fatal.or(fatal).judge(&ok), Verdict::Fatal("bad".into()));
        assert!(retry(&Committed.not().judge(&ok)));
        assert_eq!(never.not().judge(&ok), Verdict::Success);
        assert_eq!(fatal.not().judge(&ok), Verdict::Fatal("bad".into()));
        let boxed: Box<dyn SuccessCriteria> = Box::new(Committed.and(ReturnedOk.not()));
        assert!(retry(&boxed.judge(&ok)));
    }

    #[test]
    fn backoff_grows_exponentially_within_its_bounds() {
        let policy = RetryPolicy::default()
            .backoff(Duration::from_millis(2), Duration::from_millis(10))
            .jitter(false);
        let delays: Vec<_> = (1..=5).map(|n| policy.delay(n).as_millis()).collect();
        assert_eq!(delays, [2, 4, 8, 10, 10]);
        let jittered = policy.jitter(true);
        for n in 1..=5 {
            let full = Duration::from_millis([2, 4, 8, 10, 10][n as usize - 1]);
            let d = jittered.delay(n);
            assert!(d >= full / 2 && d <= full, "{n}: {d:?}");
        }
        assert_eq!(RetryPolicy::default().no_backoff().delay(7), Duration::ZERO);
        assert_eq!(RetryPolicy::default().max_attempts(0).max_attempts, 1);
    }
}
