//! The objective's running state across steps: ε-DPO's base β, β-DPO's running estimates and
//! filter generator, TR-DPO's count of reference updates; and the evaluation of the objective
//! on one micro-batch's scores with that state.

use crate::scoring::PairScores;
use crate::{Error, Result};
use edpo_data::rng::SplitMix64;
use edpo_objectives::{
    self as objectives, add_sft, AlphaDpo, BetaDpo, EpsilonBeta, Method, Objective, ObjectiveOutput,
};

/// The objective's running state.
pub(crate) enum State {
    Stateless,
    Epsilon(EpsilonBeta),
    BetaDpo(BetaDpo, SplitMix64),
    /// α-DPO's running statistics of its margins.
    AlphaDpo(AlphaDpo),
    TrDpo {
        updates: usize,
    },
}

/// The objective's state at the start of training, after checking its parameters.
pub(crate) fn initial_state(objective: &Objective, sft_weight: f64) -> Result<State> {
    objective.validate(sft_weight)?;
    Ok(match *objective {
        Objective::EpsilonDpo { beta, epsilon } => State::Epsilon(EpsilonBeta::new(beta, epsilon)?),
        Objective::Dpo { .. } | Objective::Method(_) => State::Stateless,
        Objective::BetaDpo {
            beta0,
            a,
            keep_fraction,
            momentum,
            seed,
        } => State::BetaDpo(
            BetaDpo::new(beta0, a, keep_fraction, momentum)?,
            SplitMix64(seed),
        ),
        Objective::TrDpo { .. } => State::TrDpo { updates: 0 },
        Objective::AlphaDpo {
            beta,
            gamma_ratio,
            alpha,
        } => State::AlphaDpo(AlphaDpo::new(beta, gamma_ratio, alpha)?),
    })
}

impl State {
    /// Evaluates `objective` on one micro-batch's scores, updating the running state.
    pub(crate) fn evaluate(
        &mut self,
        objective: &Objective,
        sft: f64,
        scores: &PairScores,
    ) -> Result<(ObjectiveOutput, Vec<i8>)> {
        match (*objective, self) {
            (Objective::Dpo { beta } | Objective::TrDpo { beta, .. }, _) => Ok((
                objectives::evaluate(&Method::Dpo { beta }, &scores.inputs(), sft)?,
                Vec::new(),
            )),
            (Objective::Method(m), _) => {
                Ok((objectives::evaluate(&m, &scores.inputs(), sft)?, Vec::new()))
            }
            (Objective::EpsilonDpo { epsilon, .. }, State::Epsilon(state)) => {
                let ratios = scores
                    .ratios
                    .as_deref()
                    .ok_or_else(|| Error::Config("ε-DPO needs the perturbed log-ratios".into()))?;
                let (mut out, steps) =
                    objectives::epsilon_dpo(&scores.logps(), ratios, state.beta(), epsilon)?;
                add_sft(&mut out, &scores.policy_chosen, &scores.chosen_lengths, sft)?;
                state.record(&steps);
                Ok((out, steps))
            }
            (Objective::BetaDpo { .. }, State::BetaDpo(state, rng)) => {
                let (out, _report) = state.step(&scores.logps(), &mut || rng.uniform())?;
                Ok((out, Vec::new()))
            }
            (Objective::AlphaDpo { .. }, State::AlphaDpo(state)) => {
                let mut out = state.step(
                    &scores.logps(),
                    &scores.chosen_lengths,
                    &scores.rejected_lengths,
                )?;
                add_sft(&mut out, &scores.policy_chosen, &scores.chosen_lengths, sft)?;
                Ok((out, Vec::new()))
            }
            _ => Err(Error::Config("objective and its state disagree".into())),
        }
    }
}
