//! The stateless objectives as one enum, with their hyper-parameters and what each reads.
//!
//! Variant and field names are part of the configuration interface (`Objective` in the
//! trainer's config maps onto them); the formulas live on the functions that compute them and
//! are repeated here in short. Depends only on the crate's [`Error`].

use crate::Error;

/// A stateless preference objective and its hyper-parameters (`docs/spec/baselines.md`).
///
/// Notation: `Δ = (lw − rw) − (ll − rl)`, `|y|` a response's length in tokens.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Method {
    /// DPO: `−log σ(β·Δ)`.
    Dpo {
        /// β > 0.
        beta: f64,
    },
    /// Conservative DPO: `−(1−ℓ)·log σ(β·Δ) − ℓ·log σ(−β·Δ)`.
    Cdpo {
        /// β > 0.
        beta: f64,
        /// ℓ ∈ [0, 0.5).
        label_smoothing: f64,
    },
    /// Robust DPO (noisy labels): `[−(1−ℓ)·log σ(β·Δ) + ℓ·log σ(−β·Δ)] / (1 − 2ℓ)`.
    Rdpo {
        /// β > 0.
        beta: f64,
        /// ℓ ∈ [0, 0.5).
        label_smoothing: f64,
    },
    /// IPO: `(Δ̄ − 1/(2β))²`, `Δ̄` from token-averaged log-probs (TRL) or the plain `Δ`.
    Ipo {
        /// β (the IPO paper's τ) > 0.
        beta: f64,
        /// Whether `Δ̄` uses `lw/|y_w|`, `rw/|y_w|`, `ll/|y_l|`, `rl/|y_l|` (TRL) rather than
        /// the summed log-probs (the IPO paper).
        average: bool,
    },
    /// Hinge (RSO; SLiC with a reference): `max(0, 1 − β·Δ)`.
    Hinge {
        /// β > 0.
        beta: f64,
    },
    /// SLiC-HF, reference-free: `max(0, δ − lw + ll) − λ·lw`.
    Slic {
        /// The margin δ ≥ 0.
        delta: f64,
        /// The weight λ ≥ 0 of the chosen response's NLL.
        lambda: f64,
    },
    /// SimPO, reference-free: `−log σ(β·lw/|y_w| − β·ll/|y_l| − γ)`, `γ = γ_ratio·β`.
    Simpo {
        /// β > 0.
        beta: f64,
        /// `γ/β` ≥ 0.
        gamma_ratio: f64,
    },
    /// R-DPO, length-regularised: `−log σ(β·Δ + α·|y_w| − α·|y_l|)`.
    RdpoLen {
        /// β > 0.
        beta: f64,
        /// α ≥ 0.
        alpha: f64,
    },
    /// CPO, reference-free: `−log σ(β·(lw − ll)) − λ·lw`.
    Cpo {
        /// β > 0.
        beta: f64,
        /// The weight λ ≥ 0 of the chosen response's NLL.
        lambda: f64,
    },
    /// ORPO, reference-free: `−lw/|y_w| − λ·log σ(odds_w − odds_l)`,
    /// `odds = p̄ − log(1 − e^p̄)`, `p̄ = log π/|y|`.
    Orpo {
        /// The weight λ ≥ 0 of the odds-ratio term.
        lambda: f64,
    },
    /// KTO on paired data (chosen desirable, rejected undesirable):
    /// `½·[w_d·(1 − σ(β·(lw − rw − z₀))) + w_u·(1 − σ(β·(z₀ − ll + rl)))]`,
    /// `z₀ = max(0, mean of the mismatched-pair log-ratios)`, a constant.
    Kto {
        /// β > 0.
        beta: f64,
        /// `w_d` > 0.
        desirable_weight: f64,
        /// `w_u` > 0.
        undesirable_weight: f64,
    },
    /// ODPO: `−log σ(β·Δ − Δ_r)`, `Δ_r = α·log(s_w − s_l)` or `α·(s_w − s_l)` from the two
    /// responses' scores.
    Odpo {
        /// β > 0.
        beta: f64,
        /// α ≥ 0, the offset's scale.
        alpha: f64,
        /// `Δ_r = α·log(s_w − s_l)` (the paper's; needs `s_w > s_l`) rather than `α·(s_w − s_l)`.
        log_offset: bool,
    },
    /// H-DPO: `−log σ(αβ·(lw − ll) − β·(rw − rl))` (α = 1: DPO).
    Hdpo {
        /// β > 0.
        beta: f64,
        /// α > 0, the weight of the policy's log-probability (its entropy).
        alpha: f64,
    },
    /// χPO: `−log σ(clip_{2R_max}(β·(e^{u_w} + u_w) − β·(e^{u_l} + u_l)))`, `u = log π − log π_ref`.
    Chipo {
        /// β > 0.
        beta: f64,
        /// R_max > 0: the logit is clipped to `[−2R_max, 2R_max]`.
        r_max: f64,
    },
    /// SPPO with hard labels: `(u_w − 1/(2β))² + (u_l + 1/(2β))²`.
    SppoHard {
        /// β > 0 (`η = 1/β`).
        beta: f64,
    },
    /// RePO, reference-free: `max(0, γ − (lw/|y_w| − ll/|y_l|))`.
    Repo {
        /// The margin γ ≥ 0.
        gamma: f64,
    },
    /// BPO (SBA instance): `R^{λ+1}/(4(λ+1)) − R^{−λ}/(4λ)`, `R = max(e^{−β·Δ}, R_min)`.
    Bpo {
        /// β > 0.
        beta: f64,
        /// λ > −1, λ ≠ 0.
        lambda: f64,
        /// R_min ∈ (0, 1]: the lower clamp of the ratio.
        r_min: f64,
    },
    /// TDPO1: `−log σ(β·((u_w − u_l) − (K_l − K_w)))`, `u = log π − log π_ref`, `K` a response's
    /// sequential KL `Σ_t KL(π_ref ‖ π_θ)` over its positions.
    Tdpo1 {
        /// β > 0.
        beta: f64,
    },
    /// TDPO2: `−log σ(β·((u_w − u_l) − α·(K_l − sg(K_w))))`, the chosen response's KL detached.
    Tdpo2 {
        /// β > 0.
        beta: f64,
        /// α ≥ 0, the weight of the KL difference.
        alpha: f64,
    },
}

impl Method {
    /// The method's name in configs and logs (snake case).
    pub fn name(&self) -> &'static str {
        match self {
            Self::Dpo { .. } => "dpo",
            Self::Cdpo { .. } => "cdpo",
            Self::Rdpo { .. } => "rdpo",
            Self::Ipo { .. } => "ipo",
            Self::Hinge { .. } => "hinge",
            Self::Slic { .. } => "slic",
            Self::Simpo { .. } => "simpo",
            Self::RdpoLen { .. } => "rdpo_len",
            Self::Cpo { .. } => "cpo",
            Self::Orpo { .. } => "orpo",
            Self::Kto { .. } => "kto",
            Self::Odpo { .. } => "odpo",
            Self::Hdpo { .. } => "hdpo",
            Self::Chipo { .. } => "chipo",
            Self::SppoHard { .. } => "sppo_hard",
            Self::Repo { .. } => "repo",
            Self::Bpo { .. } => "bpo",
            Self::Tdpo1 { .. } => "tdpo1",
            Self::Tdpo2 { .. } => "tdpo2",
        }
    }

    /// Whether the method reads the reference log-probs (false for `slic`, `simpo`, `cpo`,
    /// `orpo`, `repo`, which never touch them, so they may be empty).
    pub fn needs_reference(&self) -> bool {
        !matches!(
            self,
            Self::Slic { .. }
                | Self::Simpo { .. }
                | Self::Cpo { .. }
                | Self::Orpo { .. }
                | Self::Repo { .. }
        )
    }

    /// Whether the method reads the response lengths (`ipo` with `average`, `simpo`,
    /// `rdpo_len`, `orpo`, `repo`). A non-zero SFT weight reads the chosen lengths for any
    /// method.
    pub fn needs_lengths(&self) -> bool {
        matches!(
            self,
            Self::Ipo { average: true, .. }
                | Self::Simpo { .. }
                | Self::RdpoLen { .. }
                | Self::Orpo { .. }
                | Self::Repo { .. }
        )
    }

    /// Whether the method reads the responses' scores (`odpo`, for its offset).
    pub fn needs_scores(&self) -> bool {
        matches!(self, Self::Odpo { .. })
    }

    /// Whether the method reads each response's sequential KL `Σ_t KL(π_ref ‖ π_θ)` over its
    /// positions (`tdpo1`, `tdpo2`), and returns its derivatives with respect to them.
    pub fn needs_sequence_kl(&self) -> bool {
        matches!(self, Self::Tdpo1 { .. } | Self::Tdpo2 { .. })
    }

    /// Whether the method reads the mismatched-pair log-ratios (`kto`, for its KL estimate).
    pub fn needs_kl_logratios(&self) -> bool {
        matches!(self, Self::Kto { .. })
    }

    /// The method's β, if it has one (all but `slic`, `orpo` and `repo`).
    pub fn beta(&self) -> Option<f64> {
        match *self {
            Self::Dpo { beta }
            | Self::Cdpo { beta, .. }
            | Self::Rdpo { beta, .. }
            | Self::Ipo { beta, .. }
            | Self::Hinge { beta }
            | Self::Simpo { beta, .. }
            | Self::RdpoLen { beta, .. }
            | Self::Cpo { beta, .. }
            | Self::Kto { beta, .. }
            | Self::Odpo { beta, .. }
            | Self::Hdpo { beta, .. }
            | Self::Chipo { beta, .. }
            | Self::SppoHard { beta }
            | Self::Bpo { beta, .. }
            | Self::Tdpo1 { beta }
            | Self::Tdpo2 { beta, .. } => Some(beta),
            Self::Slic { .. } | Self::Orpo { .. } | Self::Repo { .. } => None,
        }
    }

    /// Checks every hyper-parameter's range: β > 0, ℓ ∈ [0, 0.5), δ, λ, α, γ_ratio, γ ≥ 0,
    /// KTO's weights > 0, H-DPO's α > 0, TDPO2's α ≥ 0, χPO's R_max > 0, BPO's λ > −1 and ≠ 0 and
    /// R_min ∈ (0, 1], all finite.
    pub fn validate(&self) -> Result<(), Error> {
        if let Some(beta) = self.beta() {
            positive("beta", beta)?;
        }
        match *self {
            Self::Cdpo {
                label_smoothing, ..
            }
            | Self::Rdpo {
                label_smoothing, ..
            } => smoothing(label_smoothing),
            Self::Slic { delta, lambda } => {
                non_negative("delta", delta)?;
                non_negative("lambda", lambda)
            }
            Self::Simpo { gamma_ratio, .. } => non_negative("gamma_ratio", gamma_ratio),
            Self::RdpoLen { alpha, .. } => non_negative("alpha", alpha),
            Self::Cpo { lambda, .. } | Self::Orpo { lambda } => non_negative("lambda", lambda),
            Self::Kto {
                desirable_weight,
                undesirable_weight,
                ..
            } => {
                positive("desirable_weight", desirable_weight)?;
                positive("undesirable_weight", undesirable_weight)
            }
            Self::Odpo { alpha, .. } | Self::Tdpo2 { alpha, .. } => non_negative("alpha", alpha),
            Self::Hdpo { alpha, .. } => positive("alpha", alpha),
            Self::Chipo { r_max, .. } => positive("r_max", r_max),
            Self::Repo { gamma } => non_negative("gamma", gamma),
            Self::Bpo { lambda, r_min, .. } => {
                if !(lambda > -1.0 && lambda != 0.0 && lambda.is_finite()) {
                    return Err(Error::Parameter {
                        name: "lambda",
                        value: lambda,
                        message: "must be above −1 and not 0",
                    });
                }
                if !(r_min > 0.0 && r_min <= 1.0) {
                    return Err(Error::Parameter {
                        name: "r_min",
                        value: r_min,
                        message: "must lie in (0, 1]",
                    });
                }
                Ok(())
            }
            Self::Dpo { .. }
            | Self::Ipo { .. }
            | Self::Hinge { .. }
            | Self::SppoHard { .. }
            | Self::Tdpo1 { .. } => Ok(()),
        }
    }
}

/// `value` must be positive and finite.
pub(crate) fn positive(name: &'static str, value: f64) -> Result<(), Error> {
    if value > 0.0 && value.is_finite() {
        Ok(())
    } else {
        Err(Error::Parameter {
            name,
            value,
            message: "must be positive and finite",
        })
    }
}

/// `value` must be non-negative and finite.
pub(crate) fn non_negative(name: &'static str, value: f64) -> Result<(), Error> {
    if value >= 0.0 && value.is_finite() {
        Ok(())
    } else {
        Err(Error::Parameter {
            name,
            value,
            message: "must be non-negative and finite",
        })
    }
}

/// Label smoothing ℓ must lie in [0, 0.5): robust DPO divides by `1 − 2ℓ`, and at ℓ = ½
/// conservative DPO no longer prefers the chosen response.
fn smoothing(value: f64) -> Result<(), Error> {
    if (0.0..0.5).contains(&value) {
        Ok(())
    } else {
        Err(Error::Parameter {
            name: "label_smoothing",
            value,
            message: "must lie in [0, 0.5)",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn out_of_range_parameters_are_errors() {
        let bad = [
            Method::Dpo { beta: 0.0 },
            Method::Cdpo {
                beta: 0.1,
                label_smoothing: 0.5,
            },
            Method::Rdpo {
                beta: 0.1,
                label_smoothing: -0.1,
            },
            Method::Ipo {
                beta: f64::NAN,
                average: true,
            },
            Method::Hinge { beta: -1.0 },
            Method::Slic {
                delta: 1.0,
                lambda: -0.1,
            },
            Method::Simpo {
                beta: 2.0,
                gamma_ratio: f64::INFINITY,
            },
            Method::RdpoLen {
                beta: 0.1,
                alpha: -0.05,
            },
            Method::Cpo {
                beta: 0.1,
                lambda: f64::NAN,
            },
            Method::Orpo { lambda: -1.0 },
            Method::Kto {
                beta: 0.1,
                desirable_weight: 0.0,
                undesirable_weight: 1.0,
            },
        ];
        for m in bad {
            assert!(
                matches!(m.validate(), Err(Error::Parameter { .. })),
                "{m:?}"
            );
        }
        assert_eq!(
            Method::Cdpo {
                beta: 0.1,
                label_smoothing: 0.0
            }
            .validate(),
            Ok(())
        );
    }

    #[test]
    fn names_and_needs() {
        let slic = Method::Slic {
            delta: 1.0,
            lambda: 0.1,
        };
        assert_eq!(slic.name(), "slic");
        assert!(!slic.needs_reference());
        assert_eq!(slic.beta(), None);
        let kto = Method::Kto {
            beta: 0.1,
            desirable_weight: 1.0,
            undesirable_weight: 1.0,
        };
        assert!(kto.needs_reference() && kto.needs_kl_logratios() && !kto.needs_lengths());
        assert_eq!(
            Method::RdpoLen {
                beta: 0.1,
                alpha: 0.1
            }
            .name(),
            "rdpo_len"
        );
        assert!(!Method::Ipo {
            beta: 0.1,
            average: false
        }
        .needs_lengths());
    }
}
