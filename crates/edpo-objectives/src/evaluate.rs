//! One entry point for the stateless objectives: check the inputs a [`Method`] reads, compute
//! each pair's loss and derivatives with the method's own function, add the SFT term, divide
//! by N and log the statistics.

use crate::method::non_negative;
use crate::{
    batch_stats, bpo, check_len, check_lengths, chipo, cpo, dpo, hdpo, hinge, ipo, kto, math, odpo,
    orpo, repo, simpo, sppo, tdpo, Error, Method, ObjectiveOutput, PairLogps,
};

/// Everything a stateless objective may read for a batch of pairs.
///
/// Input rule: a method reads only what it needs, and only what it reads is checked (one entry
/// per pair, lengths ≥ 1). Reference-free methods ([`Method::needs_reference`] false) never read
/// `logps.reference_*`, so those may be empty; the lengths are read by the methods whose
/// [`Method::needs_lengths`] is true, and `chosen_lengths` also by a non-zero SFT weight;
/// `kl_logratios` only by KTO ([`Method::needs_kl_logratios`]), which needs at least one.
#[derive(Debug, Clone, Copy)]
pub struct PairInputs<'a> {
    /// Sequence log-probs of policy and reference.
    pub logps: PairLogps<'a>,
    /// `|y_w|`: tokens in each chosen response.
    pub chosen_lengths: &'a [usize],
    /// `|y_l|`: tokens in each rejected response.
    pub rejected_lengths: &'a [usize],
    /// KTO's policy-minus-reference log-ratios of mismatched prompt/completion pairs (any
    /// number of them; their clamped mean is the KL estimate `z₀`).
    pub kl_logratios: Option<&'a [f64]>,
    /// The responses' scores (a reward model's, a rating), read by ODPO
    /// ([`Method::needs_scores`]) only.
    pub scores: Option<ResponseScores<'a>>,
    /// Each response's sequential KL, read by TDPO ([`Method::needs_sequence_kl`]) only.
    pub sequence_kl: Option<SequenceKl<'a>>,
}

/// Each pair's two responses' sequential KL divergences
/// `K(x, y) = Σ_t KL(π_ref(·|x, y_<t) ‖ π_θ(·|x, y_<t))`, the full-vocabulary KL at each
/// response position summed over the response (finite; non-negative up to rounding).
#[derive(Debug, Clone, Copy)]
pub struct SequenceKl<'a> {
    /// `K_w` per pair.
    pub chosen: &'a [f64],
    /// `K_l` per pair.
    pub rejected: &'a [f64],
}

/// Each pair's two responses' scores.
#[derive(Debug, Clone, Copy)]
pub struct ResponseScores<'a> {
    /// `s_w`: the chosen response's score, per pair.
    pub chosen: &'a [f64],
    /// `s_l`: the rejected response's score, per pair.
    pub rejected: &'a [f64],
}

/// Evaluates `method` on a batch: `L = mean_i [ℓ_i + λ_sft·(−lw_i/|y_w,i|)]`, with `ℓ_i` the
/// method's pair loss and `λ_sft = sft_weight` ≥ 0 (RPO's "DPO + SFT"; 0 leaves the method as
/// it is). Returns the per-pair losses (SFT term included), `∂L/∂lw_i`, `∂L/∂ll_i`, the β of
/// each pair (empty for `slic` and `orpo`), and statistics: those of every objective (rewards
/// by the method's own definition, see each function), `sft/nll` (mean of `−lw/|y_w|`) when
/// `sft_weight > 0`, and KTO's `kl` (`z₀`).
pub fn evaluate(
    method: &Method,
    inputs: &PairInputs<'_>,
    sft_weight: f64,
) -> Result<ObjectiveOutput, Error> {
    method.validate()?;
    non_negative("sft_weight", sft_weight)?;
    check_inputs(method, inputs, sft_weight)?;

    let logps = &inputs.logps;
    let (lw, ll) = (logps.policy_chosen, logps.policy_rejected);
    let (len_w, len_l) = (inputs.chosen_lengths, inputs.rejected_lengths);
    let mut extra = Vec::new();
    let mut grad_sequence_kl = None;
    let terms = match *method {
        Method::Dpo { beta } => dpo::dpo_terms(logps, beta),
        Method::Cdpo {
            beta,
            label_smoothing,
        } => dpo::cdpo(logps, beta, label_smoothing),
        Method::Rdpo {
            beta,
            label_smoothing,
        } => dpo::rdpo(logps, beta, label_smoothing),
        Method::RdpoLen { beta, alpha } => dpo::rdpo_len(logps, len_w, len_l, beta, alpha),
        Method::Ipo {
            beta,
            average: true,
        } => ipo::ipo_averaged(logps, len_w, len_l, beta),
        Method::Ipo {
            beta,
            average: false,
        } => ipo::ipo(logps, beta),
        Method::Hinge { beta } => hinge::hinge(logps, beta),
        Method::Slic { delta, lambda } => hinge::slic(lw, ll, delta, lambda),
        Method::Simpo { beta, gamma_ratio } => {
            simpo::simpo(lw, ll, len_w, len_l, beta, gamma_ratio)
        }
        Method::Cpo { beta, lambda } => cpo::cpo(lw, ll, beta, lambda),
        Method::Orpo { lambda } => orpo::orpo(lw, ll, len_w, len_l, lambda),
        Method::Odpo {
            beta,
            alpha,
            log_offset,
        } => {
            // check_inputs has made sure the scores are there.
            let s = inputs.scores.unwrap_or(ResponseScores {
                chosen: &[],
                rejected: &[],
            });
            odpo::odpo(logps, s.chosen, s.rejected, beta, alpha, log_offset)
        }
        Method::Hdpo { beta, alpha } => hdpo::hdpo(logps, beta, alpha),
        Method::Chipo { beta, r_max } => chipo::chipo(logps, beta, r_max),
        Method::SppoHard { beta } => sppo::sppo_hard(logps, beta),
        Method::Repo { gamma } => repo::repo(lw, ll, len_w, len_l, gamma),
        Method::Bpo {
            beta,
            lambda,
            r_min,
        } => bpo::bpo(logps, beta, lambda, r_min),
        Method::Tdpo1 { beta } | Method::Tdpo2 { beta, .. } => {
            // check_inputs has made sure the sequence KLs are there.
            let kl = inputs.sequence_kl.unwrap_or(SequenceKl {
                chosen: &[],
                rejected: &[],
            });
            let variant = match *method {
                Method::Tdpo2 { alpha, .. } => tdpo::Variant::Two { alpha },
                _ => tdpo::Variant::One,
            };
            let (terms, d_kl) = tdpo::tdpo(logps, kl.chosen, kl.rejected, beta, variant);
            let n = terms.len() as f64;
            grad_sequence_kl = Some(d_kl.iter().map(|[w, l]| [w / n, l / n]).collect());
            extra.extend([
                ("tdpo/kl_chosen", math::mean(kl.chosen)),
                ("tdpo/kl_rejected", math::mean(kl.rejected)),
            ]);
            terms
        }
        Method::Kto {
            beta,
            desirable_weight,
            undesirable_weight,
        } => {
            // check_inputs has made sure KTO's log-ratios are there.
            let kl_logratios = inputs.kl_logratios.unwrap_or_default();
            let (terms, z0) = kto::kto(
                logps,
                kl_logratios,
                beta,
                desirable_weight,
                undesirable_weight,
            );
            extra.push(("kl", z0));
            terms
        }
    };

    let n = terms.len() as f64;
    let mut losses = Vec::with_capacity(terms.len());
    let mut grad_chosen = Vec::with_capacity(terms.len());
    let mut grad_rejected = Vec::with_capacity(terms.len());
    for t in &terms {
        losses.push(t.loss);
        grad_chosen.push(t.d_chosen / n);
        grad_rejected.push(t.d_rejected / n);
    }

    let betas = method
        .beta()
        .map_or_else(Vec::new, |b| vec![b; terms.len()]);
    let rewards_chosen: Vec<f64> = terms.iter().map(|t| t.reward_chosen).collect();
    let rewards_rejected: Vec<f64> = terms.iter().map(|t| t.reward_rejected).collect();
    let mut stats = batch_stats(logps, &rewards_chosen, &rewards_rejected, &betas);
    stats.extend(extra);
    let mut out = ObjectiveOutput {
        losses,
        grad_policy_chosen: grad_chosen,
        grad_policy_rejected: grad_rejected,
        grad_sequence_kl,
        betas,
        stats,
    };
    add_sft(&mut out, lw, len_w, sft_weight)?;
    Ok(out)
}

/// Adds the SFT term `λ_sft·(−lw_i/|y_w,i|)` to each pair's loss, its derivative
/// `−λ_sft/(N·|y_w,i|)` to `∂L/∂lw_i`, and the statistic `sft/nll` (mean of `−lw/|y_w|`);
/// nothing when `weight` is 0. For objectives whose per-pair losses cover every pair (all but
/// β-DPO, whose losses are those of its kept pairs only).
pub fn add_sft(
    out: &mut ObjectiveOutput,
    lw: &[f64],
    len_w: &[usize],
    weight: f64,
) -> Result<(), Error> {
    non_negative("sft_weight", weight)?;
    if weight == 0.0 {
        return Ok(());
    }
    let n = lw.len();
    check_len("chosen_lengths", len_w, n)?;
    if out.losses.len() != n || out.grad_policy_chosen.len() != n {
        return Err(Error::Length {
            name: "losses",
            found: out.losses.len(),
            expected: n,
        });
    }
    let mut nll = Vec::with_capacity(n);
    for i in 0..n {
        let len = len_w[i] as f64;
        if len_w[i] == 0 {
            return Err(Error::Input {
                name: "chosen_lengths",
                index: i,
                value: 0.0,
                message: "must be at least 1",
            });
        }
        out.losses[i] += weight * (-lw[i] / len);
        out.grad_policy_chosen[i] -= weight / (len * n as f64);
        nll.push(-lw[i] / len);
    }
    out.stats.push(("sft/nll", math::mean(&nll)));
    Ok(())
}

/// Checks exactly the inputs `method` (and the SFT term) will read; see [`PairInputs`].
fn check_inputs(method: &Method, inputs: &PairInputs<'_>, sft_weight: f64) -> Result<(), Error> {
    let logps = &inputs.logps;
    if method.needs_reference() {
        logps.check()?;
    } else {
        logps.check_policy()?;
    }
    let n = logps.len();
    let mut lengths = Vec::new();
    if method.needs_lengths() || sft_weight > 0.0 {
        lengths.push(("chosen_lengths", inputs.chosen_lengths));
    }
    if method.needs_lengths() {
        lengths.push(("rejected_lengths", inputs.rejected_lengths));
    }
    for (name, s) in lengths {
        check_lengths(name, s, n)?;
    }
    if method.needs_kl_logratios() && inputs.kl_logratios.is_none_or(<[f64]>::is_empty) {
        return Err(Error::Missing {
            name: "kl_logratios",
            method: method.name(),
        });
    }
    if method.needs_sequence_kl() {
        let kl = inputs.sequence_kl.ok_or(Error::Missing {
            name: "sequence_kl",
            method: method.name(),
        })?;
        for (name, side) in [("chosen_kl", kl.chosen), ("rejected_kl", kl.rejected)] {
            check_len(name, side, n)?;
            // Non-negative in exact arithmetic; computed in the model's precision it may fall
            // below 0 by rounding where the policy is the reference, so only finiteness is
            // required.
            if let Some(index) = side.iter().position(|v| !v.is_finite()) {
                return Err(Error::Input {
                    name,
                    index,
                    value: side[index],
                    message: "a sequential KL must be finite",
                });
            }
        }
    }
    if let Method::Orpo { .. } = method {
        orpo::check_log_probs(logps, inputs.chosen_lengths, inputs.rejected_lengths)?;
    }
    if method.needs_scores() {
        let s = inputs.scores.ok_or(Error::Missing {
            name: "scores",
            method: method.name(),
        })?;
        check_len("chosen_scores", s.chosen, n)?;
        check_len("rejected_scores", s.rejected, n)?;
        for (name, side) in [("chosen_scores", s.chosen), ("rejected_scores", s.rejected)] {
            if let Some(index) = side.iter().position(|v| !v.is_finite()) {
                return Err(Error::Input {
                    name,
                    index,
                    value: side[index],
                    message: "a score must be finite",
                });
            }
        }
        if let Method::Odpo {
            log_offset: true, ..
        } = method
        {
            if let Some(index) = (0..n).find(|&i| s.chosen[i] <= s.rejected[i]) {
                return Err(Error::Input {
                    name: "chosen_scores",
                    index,
                    value: s.chosen[index] - s.rejected[index],
                    message: "ODPO's log offset needs the chosen response's score above the \
                              rejected one's (log_offset: false takes the plain difference)",
                });
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const LW: [f64; 3] = [-10.0, -3.0, -25.0];
    // No pair sits on a hinge or SLiC kink (δ − lw + ll ≠ 0, 1 − β·Δ ≠ 0).
    const LL: [f64; 3] = [-11.3, -2.0, -24.0];
    const RW: [f64; 3] = [-10.5, -3.2, -26.0];
    const RL: [f64; 3] = [-10.2, -2.5, -23.5];
    const LEN_W: [usize; 3] = [4, 2, 9];
    const LEN_L: [usize; 3] = [5, 3, 7];
    const KL: [f64; 4] = [0.3, -0.1, 0.5, 0.2];

    fn all_methods() -> Vec<Method> {
        vec![
            Method::Dpo { beta: 0.3 },
            Method::Cdpo {
                beta: 0.3,
                label_smoothing: 0.2,
            },
            Method::Rdpo {
                beta: 0.3,
                label_smoothing: 0.2,
            },
            Method::Ipo {
                beta: 0.5,
                average: true,
            },
            Method::Ipo {
                beta: 0.5,
                average: false,
            },
            Method::Hinge { beta: 0.7 },
            Method::Slic {
                delta: 1.0,
                lambda: 0.1,
            },
            Method::Simpo {
                beta: 2.0,
                gamma_ratio: 0.5,
            },
            Method::RdpoLen {
                beta: 0.3,
                alpha: 0.1,
            },
            Method::Cpo {
                beta: 0.3,
                lambda: 0.5,
            },
            Method::Orpo { lambda: 0.7 },
            Method::Kto {
                beta: 0.3,
                desirable_weight: 1.0,
                undesirable_weight: 1.5,
            },
            Method::Hdpo {
                beta: 0.3,
                alpha: 0.9,
            },
            Method::Chipo {
                beta: 0.2,
                r_max: 5.0,
            },
            Method::SppoHard { beta: 0.5 },
            Method::Repo { gamma: 0.4 },
            Method::Bpo {
                beta: 0.3,
                lambda: 1.2,
                r_min: 0.01,
            },
            Method::Bpo {
                beta: 0.3,
                lambda: -0.5,
                r_min: 0.01,
            },
        ]
    }

    fn loss(method: &Method, lw: &[f64], ll: &[f64], sft_weight: f64) -> f64 {
        let inputs = PairInputs {
            logps: PairLogps {
                policy_chosen: lw,
                policy_rejected: ll,
                reference_chosen: &RW,
                reference_rejected: &RL,
            },
            chosen_lengths: &LEN_W,
            rejected_lengths: &LEN_L,
            kl_logratios: Some(&KL),
            scores: None,
            sequence_kl: None,
        };
        evaluate(method, &inputs, sft_weight).unwrap().loss()
    }

    /// Every method's analytic gradient against central differences of its mean loss.
    #[test]
    fn gradients_match_finite_differences() {
        let h = 1e-6;
        for method in all_methods() {
            for sft_weight in [0.0, 0.4] {
                let inputs = PairInputs {
                    logps: PairLogps {
                        policy_chosen: &LW,
                        policy_rejected: &LL,
                        reference_chosen: &RW,
                        reference_rejected: &RL,
                    },
                    chosen_lengths: &LEN_W,
                    rejected_lengths: &LEN_L,
                    kl_logratios: Some(&KL),
                    scores: None,
                    sequence_kl: None,
                };
                let out = evaluate(&method, &inputs, sft_weight).unwrap();
                for i in 0..LW.len() {
                    let (mut up, mut down) = (LW, LW);
                    up[i] += h;
                    down[i] -= h;
                    let fd = (loss(&method, &up, &LL, sft_weight)
                        - loss(&method, &down, &LL, sft_weight))
                        / (2.0 * h);
                    let g = out.grad_policy_chosen[i];
                    assert!((fd - g).abs() < 1e-6, "{method:?} d/dlw[{i}]: {g} vs {fd}");
                    let (mut up, mut down) = (LL, LL);
                    up[i] += h;
                    down[i] -= h;
                    let fd = (loss(&method, &LW, &up, sft_weight)
                        - loss(&method, &LW, &down, sft_weight))
                        / (2.0 * h);
                    let g = out.grad_policy_rejected[i];
                    assert!((fd - g).abs() < 1e-6, "{method:?} d/dll[{i}]: {g} vs {fd}");
                }
            }
        }
    }

    /// Reference-free methods run with empty reference slices, and absent lengths are fine
    /// where nothing reads them.
    #[test]
    fn reference_free_methods_never_read_the_reference() {
        for method in all_methods() {
            let inputs = PairInputs {
                logps: PairLogps {
                    policy_chosen: &LW,
                    policy_rejected: &LL,
                    reference_chosen: &[],
                    reference_rejected: &[],
                },
                chosen_lengths: if method.needs_lengths() { &LEN_W } else { &[] },
                rejected_lengths: if method.needs_lengths() { &LEN_L } else { &[] },
                kl_logratios: Some(&KL),
                scores: None,
                sequence_kl: None,
            };
            let result = evaluate(&method, &inputs, 0.0);
            if method.needs_reference() {
                assert!(matches!(result, Err(Error::Length { .. })), "{method:?}");
            } else {
                assert!(result.is_ok(), "{method:?}: {result:?}");
            }
        }
    }

    #[test]
    fn missing_or_bad_inputs_are_errors() {
        let logps = PairLogps {
            policy_chosen: &LW,
            policy_rejected: &LL,
            reference_chosen: &RW,
            reference_rejected: &RL,
        };
        let kto = Method::Kto {
            beta: 0.1,
            desirable_weight: 1.0,
            undesirable_weight: 1.0,
        };
        let inputs = PairInputs {
            logps,
            chosen_lengths: &[],
            rejected_lengths: &[],
            kl_logratios: None,
            scores: None,
            sequence_kl: None,
        };
        assert_eq!(
            evaluate(&kto, &inputs, 0.0),
            Err(Error::Missing {
                name: "kl_logratios",
                method: "kto"
            })
        );
        // The SFT term reads the chosen lengths.
        assert!(matches!(
            evaluate(&Method::Dpo { beta: 0.1 }, &inputs, 0.5),
            Err(Error::Length {
                name: "chosen_lengths",
                ..
            })
        ));
        let zero = PairInputs {
            chosen_lengths: &[4, 0, 9],
            rejected_lengths: &LEN_L,
            ..inputs
        };
        assert!(matches!(
            evaluate(&Method::Orpo { lambda: 0.1 }, &zero, 0.0),
            Err(Error::Input { index: 1, .. })
        ));
        assert!(matches!(
            evaluate(&Method::Dpo { beta: 0.1 }, &inputs, -1.0),
            Err(Error::Parameter {
                name: "sft_weight",
                ..
            })
        ));
    }

    #[test]
    fn beta_free_methods_report_no_beta() {
        let inputs = PairInputs {
            logps: PairLogps {
                policy_chosen: &LW,
                policy_rejected: &LL,
                reference_chosen: &[],
                reference_rejected: &[],
            },
            chosen_lengths: &LEN_W,
            rejected_lengths: &LEN_L,
            kl_logratios: None,
            scores: None,
            sequence_kl: None,
        };
        let out = evaluate(&Method::Orpo { lambda: 0.1 }, &inputs, 0.0).unwrap();
        assert!(out.betas.is_empty());
        assert_eq!(out.stat("beta/mean"), None);
        let out = evaluate(
            &Method::Simpo {
                beta: 2.0,
                gamma_ratio: 0.5,
            },
            &inputs,
            0.0,
        )
        .unwrap();
        assert_eq!(out.betas, vec![2.0; 3]);
        assert_eq!(out.stat("beta/mean"), Some(2.0));
    }

    #[test]
    fn odpo_reads_scores_and_its_log_offset_needs_ordered_ones() {
        let logps = PairLogps {
            policy_chosen: &LW,
            policy_rejected: &LL,
            reference_chosen: &RW,
            reference_rejected: &RL,
        };
        let odpo = |log_offset| Method::Odpo {
            beta: 0.1,
            alpha: 1.0,
            log_offset,
        };
        let inputs = |chosen: &'static [f64], rejected: &'static [f64]| PairInputs {
            logps,
            chosen_lengths: &LEN_W,
            rejected_lengths: &LEN_L,
            kl_logratios: None,
            scores: Some(ResponseScores { chosen, rejected }),
            sequence_kl: None,
        };
        let none = PairInputs {
            scores: None,
            sequence_kl: None,
            ..inputs(&[], &[])
        };
        assert_eq!(
            evaluate(&odpo(true), &none, 0.0),
            Err(Error::Missing {
                name: "scores",
                method: "odpo"
            })
        );
        let unordered = inputs(&[2.0, 1.0, 3.0], &[1.0, 1.5, 0.5]);
        assert!(matches!(
            evaluate(&odpo(true), &unordered, 0.0),
            Err(Error::Input {
                name: "chosen_scores",
                index: 1,
                ..
            })
        ));
        // The plain difference takes any order; a zero offset is DPO.
        assert!(evaluate(&odpo(false), &unordered, 0.0).is_ok());
        let zero = Method::Odpo {
            beta: 0.1,
            alpha: 0.0,
            log_offset: false,
        };
        let dpo = evaluate(&Method::Dpo { beta: 0.1 }, &none, 0.0).expect("dpo");
        let same = evaluate(&zero, &unordered, 0.0).expect("odpo");
        assert_eq!(same.losses, dpo.losses);
        assert_eq!(same.grad_policy_chosen, dpo.grad_policy_chosen);
    }

    /// TDPO reads the sequential KLs: missing ones are an error naming them, a non-finite one
    /// names its pair, and a value below 0 by rounding (the policy at the reference) is taken.
    #[test]
    fn tdpo_checks_its_sequential_kls() {
        let logps = PairLogps {
            policy_chosen: &LW,
            policy_rejected: &LL,
            reference_chosen: &RW,
            reference_rejected: &RL,
        };
        let inputs = |chosen: &'static [f64], rejected: &'static [f64]| PairInputs {
            logps,
            chosen_lengths: &LEN_W,
            rejected_lengths: &LEN_L,
            kl_logratios: None,
            scores: None,
            sequence_kl: Some(SequenceKl { chosen, rejected }),
        };
        let tdpo = Method::Tdpo2 {
            beta: 0.1,
            alpha: 0.5,
        };
        let missing = PairInputs {
            sequence_kl: None,
            ..inputs(&[], &[])
        };
        assert_eq!(
            evaluate(&tdpo, &missing, 0.0),
            Err(Error::Missing {
                name: "sequence_kl",
                method: "tdpo2"
            })
        );
        assert!(matches!(
            evaluate(&tdpo, &inputs(&[0.1, f64::NAN, 0.2], &[0.0, 0.0, 0.0]), 0.0),
            Err(Error::Input {
                name: "chosen_kl",
                index: 1,
                ..
            })
        ));
        let out = evaluate(&tdpo, &inputs(&[-1e-9, 0.0, 0.3], &[0.0, -2e-16, 0.1]), 0.0)
            .expect("rounding-level negatives are taken");
        let kl = out.grad_sequence_kl.expect("TDPO returns KL derivatives");
        assert!(kl.iter().all(|g| g[0] == 0.0 && g[1] > 0.0));
    }
}
