//! The combinators of restore policies and success criteria: one set of
//! types, named after the trait methods that build them (`.or()`,
//! `.and()`, `.not()`). Each trait gives them its own meaning: a
//! [`RestorePolicy`](crate::policy::RestorePolicy) implements itself for
//! [`Or`] and [`And`], a [`SuccessCriteria`](crate::policy::SuccessCriteria)
//! for all three. Re-exported from [`policy`](crate::policy).

/// Either of two policies or criteria: built by `a.or(b)` or `Or(a, b)`.
///
/// As a [`RestorePolicy`](crate::policy::RestorePolicy): resets when either
/// side says so. As a [`SuccessCriteria`](crate::policy::SuccessCriteria):
/// success when either succeeds, `Fatal` only when both are fatal.
#[derive(Clone, Copy, Debug)]
pub struct Or<A, B>(pub A, pub B);

/// Both of two policies or criteria: built by `a.and(b)` or `And(a, b)`.
///
/// As a [`RestorePolicy`](crate::policy::RestorePolicy): resets only when
/// both sides say so. As a [`SuccessCriteria`](crate::policy::SuccessCriteria):
/// success only when both succeed, otherwise the first failure (a `Fatal`
/// from either wins).
#[derive(Clone, Copy, Debug)]
pub struct And<A, B>(pub A, pub B);

/// The inverse of a criterion: built by `c.not()` or `Not(c)`.
///
/// As a [`SuccessCriteria`](crate::policy::SuccessCriteria): success where
/// the criterion asks for a retry and the other way round; `Fatal` stays
/// `Fatal`. (Restore policies have no negation: reset-unless is rarely
/// what a service wants, and a closure says it plainly.)
#[derive(Clone, Copy, Debug)]
pub struct Not<A>(pub A);
