//! One pair's contribution to a stateless objective: what each method's function returns and
//! [`crate::evaluate`] averages. Its own module so that the method files and the evaluator
//! depend on it, not on each other.

/// One pair's loss, the derivatives of *that pair's* loss with respect to `lw` and `ll` (the
/// 1/N of the batch mean is applied by [`crate::evaluate`]), and its implicit rewards.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct PairTerm {
    pub loss: f64,
    pub d_chosen: f64,
    pub d_rejected: f64,
    pub reward_chosen: f64,
    pub reward_rejected: f64,
}
