//! An exactly solvable bandit (the IPO paper's illustrative setting, scaled up): prompts with
//! a handful of candidate responses each, a softmax policy over them, a known reward, π_ref
//! given. Everything is exact:
//! - the KL-regularised optimum `π*_β(y) ∝ π_ref(y)·exp(r(y)/β)` in closed form ([`optimum`]);
//! - the exact KL and expected reward of any policy, and the optimal reward-vs-KL frontier
//!   (the optima `π*_b` over `b`), so a policy's distance below the frontier is exact
//!   ([`frontier_gap`]);
//! - the exact gradient of every objective: its `∂L/∂log π(y)` (from `edpo-objectives`, the
//!   same functions the trainer uses) through the softmax, `∂log π(y)/∂θ_k = 1[k = y] − π_k`.
//!
//! A response is one token, so ε-DPO's perturbed log-ratios are exact too: under the logit
//! mixture `a·z_θ + b·z_ref` the log-ratio of two responses is `a·(θ_w − θ_l) + b·(φ_w − φ_l)`;
//! and TDPO's sequential KL of either response is `KL(π_ref(·|x) ‖ π(·|x))`, whose gradient in
//! the logits is `π − π_ref` (so TDPO1 is DPO here, and TDPO2 is DPO plus a pull of weight
//! `αβ·σ(−z)` towards π_ref in forward KL).
//!
//! Offline datasets: pairs of distinct responses drawn from π_ref, labelled by a
//! Bradley–Terry draw on the reward or deterministically (the higher reward wins). Training is
//! full-batch Adam over the dataset; ε-DPO's base β is updated after every step as in the
//! trainer.

use anyhow::{bail, Result};
use edpo_data::rng::SplitMix64;
use edpo_objectives::{
    self as objectives, EpsilonBeta, Method, Objective, PairInputs, PairLogps, PerturbedRatios,
    ResponseScores, SequenceKl,
};

/// How pairs are labelled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Labels {
    /// `P(y₁ ≻ y₂) = σ(r₁ − r₂)`.
    BradleyTerry,
    /// The response with the higher reward wins.
    Deterministic,
}

/// A bandit problem's size and draw.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BanditConfig {
    /// Prompts.
    pub prompts: usize,
    /// Candidate responses per prompt.
    pub responses: usize,
    /// Labelled pairs per prompt in the dataset.
    pub pairs_per_prompt: usize,
    /// Rewards are `reward_scale · N(0, 1)`.
    pub reward_scale: f64,
    /// π_ref's logits are `reference_scale · N(0, 1)`.
    pub reference_scale: f64,
    /// Labels.
    pub labels: Labels,
    /// Adam's learning rate.
    pub lr: f64,
    /// Full-batch steps (when `batch` is `None`).
    pub steps: usize,
    /// `Some(b)`: one pass over the shuffled pairs in minibatches of `b`, each pair seen once
    /// (the paper's regime); `None`: `steps` full-batch steps over the whole dataset, every
    /// pair seen at every step (the memorising regime).
    pub batch: Option<usize>,
}

impl Default for BanditConfig {
    fn default() -> Self {
        Self {
            prompts: 64,
            responses: 6,
            pairs_per_prompt: 8,
            reward_scale: 1.0,
            reference_scale: 1.0,
            labels: Labels::BradleyTerry,
            lr: 0.05,
            steps: 400,
            batch: None,
        }
    }
}

/// One drawn problem and its dataset.
#[derive(Debug, Clone)]
pub struct Problem {
    /// `r[p][k]`.
    pub rewards: Vec<Vec<f64>>,
    /// π_ref's logits `φ[p][k]`.
    pub reference: Vec<Vec<f64>>,
    /// Pairs `(prompt, chosen, rejected)`.
    pub pairs: Vec<(usize, usize, usize)>,
}

fn softmax(z: &[f64]) -> Vec<f64> {
    let m = z.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let e: Vec<f64> = z.iter().map(|x| (x - m).exp()).collect();
    let s: f64 = e.iter().sum();
    e.into_iter().map(|x| x / s).collect()
}

fn log_softmax(z: &[f64]) -> Vec<f64> {
    let m = z.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let lse = m + z.iter().map(|x| (x - m).exp()).sum::<f64>().ln();
    z.iter().map(|x| x - lse).collect()
}

/// Draws a problem: rewards, π_ref and the labelled pairs, from `seed`.
pub fn problem(cfg: &BanditConfig, seed: u64) -> Result<Problem> {
    if cfg.responses < 2 || cfg.prompts == 0 || cfg.pairs_per_prompt == 0 {
        bail!("a bandit needs prompts, pairs and at least two responses per prompt");
    }
    let mut rng = SplitMix64(seed ^ 0xBA_4D17);
    let draw = |rng: &mut SplitMix64, scale: f64| -> Vec<Vec<f64>> {
        (0..cfg.prompts)
            .map(|_| (0..cfg.responses).map(|_| scale * rng.normal()).collect())
            .collect()
    };
    let rewards = draw(&mut rng, cfg.reward_scale);
    let reference = draw(&mut rng, cfg.reference_scale);
    let mut pairs = Vec::new();
    for p in 0..cfg.prompts {
        let probs = softmax(&reference[p]);
        for _ in 0..cfg.pairs_per_prompt {
            let a = rng.categorical(&probs);
            let mut b = rng.categorical(&probs);
            while b == a {
                b = rng.categorical(&probs);
            }
            let (ra, rb) = (rewards[p][a], rewards[p][b]);
            let a_wins = match cfg.labels {
                Labels::Deterministic => ra > rb || (ra == rb && a < b),
                Labels::BradleyTerry => rng.uniform() < 1.0 / (1.0 + (rb - ra).exp()),
            };
            pairs.push(if a_wins { (p, a, b) } else { (p, b, a) });
        }
    }
    Ok(Problem {
        rewards,
        reference,
        pairs,
    })
}

/// `π*_β(·|p) ∝ π_ref(·|p)·exp(r(·)/β)` for every prompt.
pub fn optimum(problem: &Problem, beta: f64) -> Vec<Vec<f64>> {
    problem
        .reference
        .iter()
        .zip(&problem.rewards)
        .map(|(phi, r)| {
            let z: Vec<f64> = phi.iter().zip(r).map(|(f, r)| f + r / beta).collect();
            softmax(&z)
        })
        .collect()
}

/// Mean over prompts of `KL(π‖ρ)`.
pub fn kl(pi: &[Vec<f64>], rho: &[Vec<f64>]) -> f64 {
    let total: f64 = pi
        .iter()
        .zip(rho)
        .map(|(a, b)| {
            a.iter()
                .zip(b)
                .filter(|(x, _)| **x > 0.0)
                .map(|(x, y)| x * (x / y).ln())
                .sum::<f64>()
        })
        .sum();
    total / pi.len() as f64
}

/// Mean over prompts of the expected reward.
pub fn reward(pi: &[Vec<f64>], problem: &Problem) -> f64 {
    pi.iter()
        .zip(&problem.rewards)
        .map(|(a, r)| a.iter().zip(r).map(|(x, r)| x * r).sum::<f64>())
        .sum::<f64>()
        / pi.len() as f64
}

fn reference_probs(problem: &Problem) -> Vec<Vec<f64>> {
    problem.reference.iter().map(|z| softmax(z)).collect()
}

/// How far below the optimal reward-vs-KL frontier a policy with mean KL `k` to π_ref and
/// mean reward `r` lies: the reward of the optimum `π*_b` whose KL is `k`, minus `r` (found by
/// bisection on `log b`; the optima's KL falls as `b` grows).
pub fn frontier_gap(problem: &Problem, k: f64, r: f64) -> f64 {
    let refp = reference_probs(problem);
    let (mut lo, mut hi) = (-12.0f64, 12.0f64); // log b
    for _ in 0..100 {
        let mid = 0.5 * (lo + hi);
        let pi = optimum(problem, mid.exp());
        if kl(&pi, &refp) > k {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    reward(&optimum(problem, (0.5 * (lo + hi)).exp()), problem) - r
}

/// The optimal frontier: mean KL to π_ref and mean reward of the optima `π*_b` for each `b`.
pub fn frontier_curve(problem: &Problem, bs: &[f64]) -> Vec<(f64, f64)> {
    let refp = reference_probs(problem);
    bs.iter()
        .map(|&b| {
            let pi = optimum(problem, b);
            (kl(&pi, &refp), reward(&pi, problem))
        })
        .collect()
}

/// What training reached.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    /// The final policy, `π[p][k]`.
    pub policy: Vec<Vec<f64>>,
    /// Mean `KL(π‖π_ref)`.
    pub kl_reference: f64,
    /// Mean expected reward.
    pub reward: f64,
    /// Mean `KL(π‖π*_β)` for the objective's (initial) β.
    pub kl_optimum: f64,
    /// Reward below the optimal frontier at the policy's KL.
    pub frontier_gap: f64,
    /// The final base β (ε-DPO's moves; the fixed β otherwise).
    pub final_beta: f64,
}

/// Mean loss and `∂(mean loss)/∂θ` at logits `theta` (exact), with ε-DPO's steps when it is
/// the objective; `beta` is ε-DPO's current base β.
fn loss_and_gradient(
    problem: &Problem,
    pairs: &[(usize, usize, usize)],
    objective: &Objective,
    theta: &[Vec<f64>],
    beta: f64,
) -> Result<(f64, Vec<Vec<f64>>, Vec<i8>)> {
    let logp: Vec<Vec<f64>> = theta.iter().map(|z| log_softmax(z)).collect();
    let logref: Vec<Vec<f64>> = problem.reference.iter().map(|z| log_softmax(z)).collect();
    let n = pairs.len();
    // The responses' scores (ODPO's offset): their true rewards.
    let (sw, sl): (Vec<f64>, Vec<f64>) = pairs
        .iter()
        .map(|&(p, w, l)| (problem.rewards[p][w], problem.rewards[p][l]))
        .unzip();
    let scores = ResponseScores {
        chosen: &sw,
        rejected: &sl,
    };
    let (mut lw, mut ll, mut rw, mut rl) = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    );
    for &(p, w, l) in pairs {
        lw.push(logp[p][w]);
        ll.push(logp[p][l]);
        rw.push(logref[p][w]);
        rl.push(logref[p][l]);
    }
    let logps = PairLogps {
        policy_chosen: &lw,
        policy_rejected: &ll,
        reference_chosen: &rw,
        reference_rejected: &rl,
    };
    let ones = vec![1usize; n];
    // TDPO's sequential KL of a one-token response: KL(π_ref(·|x) ‖ π(·|x)), the same for both
    // responses of a pair; its gradient in θ is π − π_ref. Computed for the objectives that
    // read it only.
    let reads_kl = matches!(objective, Objective::Method(m) if m.needs_sequence_kl());
    let pair_kl: Vec<f64> = if reads_kl {
        let prompt_kl: Vec<f64> = logp
            .iter()
            .zip(&logref)
            .map(|(lp, lr)| lr.iter().zip(lp).map(|(r, q)| r.exp() * (r - q)).sum())
            .collect();
        pairs.iter().map(|&(p, _, _)| prompt_kl[p]).collect()
    } else {
        Vec::new()
    };
    let sequence_kl = reads_kl.then_some(SequenceKl {
        chosen: &pair_kl,
        rejected: &pair_kl,
    });
    let inputs = |logps| inputs(logps, &ones, scores, sequence_kl);
    let (out, steps) = match *objective {
        Objective::Dpo { beta } => (
            objectives::evaluate(&Method::Dpo { beta }, &inputs(logps), 0.0)?,
            Vec::new(),
        ),
        Objective::Method(m) => (objectives::evaluate(&m, &inputs(logps), 0.0)?, Vec::new()),
        Objective::EpsilonDpo { epsilon, .. } => {
            let ratios: Vec<PerturbedRatios> = pairs
                .iter()
                .map(|&(p, w, l)| {
                    let h = theta[p][w] - theta[p][l];
                    let href = problem.reference[p][w] - problem.reference[p][l];
                    PerturbedRatios {
                        h,
                        h_relaxed: (1.0 + epsilon) * h - epsilon * href,
                        h_stronger: (1.0 - epsilon) * h + epsilon * href,
                    }
                })
                .collect();
            objectives::epsilon_dpo(&logps, &ratios, beta, epsilon)?
        }
        _ => bail!("the bandit runs DPO, ε-DPO and the stateless baselines"),
    };
    let probs: Vec<Vec<f64>> = theta.iter().map(|z| softmax(z)).collect();
    let mut grad: Vec<Vec<f64>> = theta.iter().map(|z| vec![0.0; z.len()]).collect();
    for (i, &(p, w, l)) in pairs.iter().enumerate() {
        let pi = &probs[p];
        for (k, g) in grad[p].iter_mut().enumerate() {
            let (dw, dl) = (
                f64::from(u8::from(k == w)) - pi[k],
                f64::from(u8::from(k == l)) - pi[k],
            );
            *g += out.grad_policy_chosen[i] * dw + out.grad_policy_rejected[i] * dl;
        }
        if let Some(d) = &out.grad_sequence_kl {
            let reference = &logref[p];
            for (k, g) in grad[p].iter_mut().enumerate() {
                *g += (d[i][0] + d[i][1]) * (pi[k] - reference[k].exp());
            }
        }
    }
    Ok((out.loss(), grad, steps))
}

fn inputs<'a>(
    logps: PairLogps<'a>,
    ones: &'a [usize],
    scores: ResponseScores<'a>,
    sequence_kl: Option<SequenceKl<'a>>,
) -> PairInputs<'a> {
    PairInputs {
        logps,
        chosen_lengths: ones,
        rejected_lengths: ones,
        kl_logratios: None,
        scores: Some(scores),
        sequence_kl,
    }
}

/// Trains a softmax policy, started at π_ref, on `problem`'s pairs with `objective` (Adam;
/// full batch or one pass, [`BanditConfig::batch`]), and measures where it ends. `seed`
/// shuffles the pairs for one pass (the same order for every objective of a seed).
pub fn train(
    problem: &Problem,
    objective: &Objective,
    cfg: &BanditConfig,
    seed: u64,
) -> Result<Outcome> {
    let target_beta = objective
        .beta()
        .ok_or_else(|| anyhow::anyhow!("the bandit needs an objective with a β"))?;
    let mut eps_state = match *objective {
        Objective::EpsilonDpo { beta, epsilon } => Some(EpsilonBeta::new(beta, epsilon)?),
        _ => None,
    };
    let mut theta = problem.reference.clone();
    let mut m: Vec<Vec<f64>> = theta.iter().map(|z| vec![0.0; z.len()]).collect();
    let mut v = m.clone();
    let (b1, b2, eps) = (0.9f64, 0.999f64, 1e-8);
    let batches: Vec<Vec<(usize, usize, usize)>> = match cfg.batch {
        None => vec![problem.pairs.clone(); cfg.steps],
        Some(b) => {
            let mut order = problem.pairs.clone();
            SplitMix64(seed ^ 0x0DE2).shuffle(&mut order);
            order.chunks_exact(b.max(1)).map(<[_]>::to_vec).collect()
        }
    };
    for (t, batch) in (1i32..).zip(&batches) {
        let beta = eps_state.as_ref().map_or(target_beta, EpsilonBeta::beta);
        let (_, grad, steps) = loss_and_gradient(problem, batch, objective, &theta, beta)?;
        for p in 0..theta.len() {
            for k in 0..theta[p].len() {
                let g = grad[p][k];
                m[p][k] = b1 * m[p][k] + (1.0 - b1) * g;
                v[p][k] = b2 * v[p][k] + (1.0 - b2) * g * g;
                let mh = m[p][k] / (1.0 - b1.powi(t));
                let vh = v[p][k] / (1.0 - b2.powi(t));
                theta[p][k] -= cfg.lr * mh / (vh.sqrt() + eps);
            }
        }
        if let Some(state) = &mut eps_state {
            state.record(&steps);
            state.update();
        }
    }
    let policy: Vec<Vec<f64>> = theta.iter().map(|z| softmax(z)).collect();
    let kl_reference = kl(&policy, &reference_probs(problem));
    let r = reward(&policy, problem);
    Ok(Outcome {
        kl_optimum: kl(&policy, &optimum(problem, target_beta)),
        frontier_gap: frontier_gap(problem, kl_reference, r),
        kl_reference,
        reward: r,
        final_beta: eps_state.as_ref().map_or(target_beta, EpsilonBeta::beta),
        policy,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn small() -> BanditConfig {
        BanditConfig {
            prompts: 8,
            responses: 4,
            pairs_per_prompt: 6,
            ..BanditConfig::default()
        }
    }

    #[test]
    fn the_closed_form_optimum_maximises_reward_minus_beta_kl() {
        let pb = problem(&small(), 3).expect("problem");
        let beta = 0.5;
        let refp = reference_probs(&pb);
        let value = |pi: &[Vec<f64>]| reward(pi, &pb) - beta * kl(pi, &refp);
        let star = optimum(&pb, beta);
        let best = value(&star);
        let mut rng = SplitMix64(9);
        for _ in 0..50 {
            let moved: Vec<Vec<f64>> = star
                .iter()
                .map(|row| {
                    let z: Vec<f64> = row.iter().map(|x| x.ln() + 0.3 * rng.normal()).collect();
                    softmax(&z)
                })
                .collect();
            assert!(value(&moved) < best + 1e-12);
        }
        // On the frontier: no gap.
        let k = kl(&star, &refp);
        assert!(frontier_gap(&pb, k, reward(&star, &pb)).abs() < 1e-6);
    }

    /// A small problem and logits moved away from π_ref's.
    fn perturbed_problem() -> (Problem, Vec<Vec<f64>>) {
        let pb = problem(&small(), 5).expect("problem");
        let mut rng = SplitMix64(11);
        let theta: Vec<Vec<f64>> = pb
            .reference
            .iter()
            .map(|z| z.iter().map(|x| x + 0.5 * rng.normal()).collect())
            .collect();
        (pb, theta)
    }

    #[test]
    fn gradients_equal_finite_differences_for_dpo_and_ipo() {
        let (pb, theta) = perturbed_problem();
        for objective in [
            Objective::Dpo { beta: 0.3 },
            Objective::Method(Method::Ipo {
                beta: 0.3,
                average: false,
            }),
            // Both responses' sequential KLs are the prompt's KL: TDPO1's terms cancel.
            Objective::Method(Method::Tdpo1 { beta: 0.3 }),
        ] {
            let (_, grad, _) =
                loss_and_gradient(&pb, &pb.pairs, &objective, &theta, 0.3).expect("grad");
            for (p, k) in [(0, 0), (1, 2), (3, 1), (7, 3)] {
                let h = 1e-6;
                let mut plus = theta.clone();
                plus[p][k] += h;
                let mut minus = theta.clone();
                minus[p][k] -= h;
                let fd = (loss_and_gradient(&pb, &pb.pairs, &objective, &plus, 0.3)
                    .expect("l")
                    .0
                    - loss_and_gradient(&pb, &pb.pairs, &objective, &minus, 0.3)
                        .expect("l")
                        .0)
                    / (2.0 * h);
                assert!(
                    (fd - grad[p][k]).abs() < 1e-6,
                    "{objective:?} ({p},{k}): {fd} vs {}",
                    grad[p][k]
                );
            }
        }
    }

    /// TDPO2's loss equals DPO's (the KL difference is 0 in value), its gradient is DPO's plus,
    /// per prompt, a multiple of `π − π_ref` (the detached chosen KL leaves the rejected one's
    /// gradient, `αβ·σ(−z)/N` per pair).
    #[test]
    fn tdpo2_adds_a_pull_towards_the_reference() {
        let (pb, theta) = perturbed_problem();
        let (dpo_loss, dpo, _) =
            loss_and_gradient(&pb, &pb.pairs, &Objective::Dpo { beta: 0.3 }, &theta, 0.3)
                .expect("dpo");
        let tdpo2 = Objective::Method(Method::Tdpo2 {
            beta: 0.3,
            alpha: 0.5,
        });
        let (loss, grad, _) =
            loss_and_gradient(&pb, &pb.pairs, &tdpo2, &theta, 0.3).expect("tdpo2");
        assert!((loss - dpo_loss).abs() < 1e-12);
        for p in 0..theta.len() {
            let pi = softmax(&theta[p]);
            let rho = softmax(&pb.reference[p]);
            let extra: Vec<f64> = (0..pi.len()).map(|k| grad[p][k] - dpo[p][k]).collect();
            let direction: Vec<f64> = (0..pi.len()).map(|k| pi[k] - rho[k]).collect();
            let scale = extra[0] / direction[0];
            assert!(scale > 0.0, "prompt {p}: a pull towards π_ref");
            for k in 0..pi.len() {
                assert!(
                    (extra[k] - scale * direction[k]).abs() < 1e-12,
                    "prompt {p}, {k}"
                );
            }
        }
    }

    #[test]
    fn dpo_on_plentiful_bradley_terry_pairs_approaches_the_optimum() {
        let cfg = BanditConfig {
            prompts: 4,
            responses: 3,
            pairs_per_prompt: 2000,
            reward_scale: 1.0,
            steps: 600,
            ..BanditConfig::default()
        };
        let pb = problem(&cfg, 1).expect("problem");
        let beta = 1.0;
        let start = kl(&reference_probs(&pb), &optimum(&pb, beta));
        let out = train(&pb, &Objective::Dpo { beta }, &cfg, 1).expect("train");
        assert!(
            out.kl_optimum < 0.1 * start,
            "KL to π*: {} (start {start})",
            out.kl_optimum
        );
    }

    #[test]
    fn epsilon_dpo_moves_its_base_beta_and_deterministic_labels_push_dpo_past_the_optimum() {
        let cfg = BanditConfig {
            labels: Labels::Deterministic,
            ..small()
        };
        let pb = problem(&cfg, 2).expect("problem");
        let dpo = train(&pb, &Objective::Dpo { beta: 0.5 }, &cfg, 2).expect("dpo");
        let eps = train(
            &pb,
            &Objective::EpsilonDpo {
                beta: 0.5,
                epsilon: 0.01,
            },
            &cfg,
            2,
        )
        .expect("ε-DPO");
        assert!(eps.final_beta != 0.5);
        // Deterministic preferences: DPO drives the policy far beyond π*_β (the IPO paper's
        // point): its KL to the reference exceeds the optimum's.
        let refp = reference_probs(&pb);
        assert!(dpo.kl_reference > kl(&optimum(&pb, 0.5), &refp));
    }
}
