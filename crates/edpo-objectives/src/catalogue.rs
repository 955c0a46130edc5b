//! The objective catalogue: every objective a run can train with, in one table.
//!
//! An [`Entry`] gives an objective's config name (`kind`), the label reports print, its
//! parameters (name, type, default, symbol) and how to build an [`Objective`] from their
//! values. [`Objective`] is the one type the trainer runs, and [`Objective::needs`] declares
//! what the trainer must compute from the model for it ([`Needs`]), so the trainer computes
//! exactly that. The config layer, the trainer and the report read names, parameters and
//! labels from here and repeat none of them.
//!
//! A new objective is one file (its loss, as a pure function of log-probs) plus one entry in
//! [`CATALOGUE`] (and, if it is stateless, one [`Method`] variant).

use crate::method::positive;
use crate::{EpsilonBeta, Error, Method};

/// What a parameter's value is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParamType {
    /// A real number.
    Real,
    /// A non-negative integer (written without a fraction in configs).
    Integer,
    /// A yes/no switch (`true` = 1, `false` = 0 among the values).
    Flag,
}

/// One parameter of an objective.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Param {
    /// The config key (`objective.<name>`).
    pub name: &'static str,
    /// Its type.
    pub kind: ParamType,
    /// The default (`None`: required); a flag's default is 1 (true) or 0 (false).
    pub default: Option<f64>,
}

const fn real(name: &'static str, default: Option<f64>) -> Param {
    Param {
        name,
        kind: ParamType::Real,
        default,
    }
}

/// What the trainer must compute from the model for an objective.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Needs {
    /// Reference log-probs of the chosen and rejected responses.
    pub reference: bool,
    /// Whether log-probs computed once before training may stand in for the reference
    /// forward pass (not when the reference's logits are needed every step, nor when the
    /// reference moves).
    pub precomputed_reference: bool,
    /// ε-DPO's three preference log-ratios from mixtures of policy and reference logits
    /// ([`Objective::mixed_logit_weights`]).
    pub mixed_logit_ratios: bool,
    /// Response lengths in tokens.
    pub lengths: bool,
    /// Policy-minus-reference log-ratios on mismatched prompt/response pairs (KTO's KL
    /// estimate).
    pub kl_logratios: bool,
    /// Each pair's response scores (ODPO's offset): from the data, not the model.
    pub scores: bool,
    /// Each response's sequential KL `Σ_t KL(π_ref ‖ π_θ)` from both models' full-vocabulary
    /// distributions at its positions, in the autograd graph (TDPO), so the reference's logits
    /// are needed every step.
    pub sequence_kl: bool,
    /// The reference is moved towards the policy during training (TR-DPO).
    pub reference_updates: bool,
}

/// The objective of a run, with its parameters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Objective {
    /// DPO at a fixed β.
    Dpo {
        /// KL coefficient.
        beta: f64,
    },
    /// ε-DPO starting at base coefficient `beta`.
    EpsilonDpo {
        /// Initial base KL coefficient.
        beta: f64,
        /// Perturbation size.
        epsilon: f64,
    },
    /// A stateless baseline (cDPO, robust DPO, IPO, hinge, SLiC, SimPO, R-DPO, CPO, ORPO, KTO).
    Method(Method),
    /// β-DPO: batch-level β and its data filter, with running estimates.
    BetaDpo {
        /// Base coefficient β₀.
        beta0: f64,
        /// Scale `a` of the β adjustment.
        a: f64,
        /// Fraction of pairs the filter keeps.
        keep_fraction: f64,
        /// Momentum of the running estimates.
        momentum: f64,
        /// Seed of the filter's sampling.
        seed: u64,
    },
    /// α-DPO: SimPO's loss with a per-pair margin from the policy's length-normalised log-ratio
    /// gap, normalised by running batch statistics.
    AlphaDpo {
        /// β.
        beta: f64,
        /// `γ/β`.
        gamma_ratio: f64,
        /// The weight α of the adaptive margin (0: SimPO).
        alpha: f64,
    },
    /// TR-DPO: the DPO loss, and every `tau` optimizer steps the reference becomes
    /// `α·θ + (1 − α)·θ_ref` (α = 1: a hard update).
    TrDpo {
        /// KL coefficient.
        beta: f64,
        /// Mixing weight of the policy.
        alpha: f64,
        /// Optimizer steps between reference updates.
        tau: usize,
    },
}

/// The parameter values an entry builds its objective from (every parameter of the entry,
/// defaults filled).
pub struct Values<'a> {
    values: &'a [(&'a str, f64)],
}

impl Values<'_> {
    /// The value of `name` (NaN if absent, which every range check rejects).
    pub fn get(&self, name: &str) -> f64 {
        self.values
            .iter()
            .find(|(n, _)| *n == name)
            .map_or(f64::NAN, |&(_, v)| v)
    }
}

/// One objective of the catalogue.
pub struct Entry {
    /// The config name (`objective.kind`).
    pub kind: &'static str,
    /// The name reports and papers use.
    pub label: &'static str,
    /// Its parameters.
    pub params: &'static [Param],
    /// Builds the objective from its parameter values and the run seed.
    pub build: fn(&Values<'_>, u64) -> Objective,
}

/// Every objective, in the order reports list them (DPO, ε-DPO, then the baselines).
pub const CATALOGUE: &[Entry] = &[
    Entry {
        kind: "dpo",
        label: "DPO",
        params: &[real("beta", None)],
        build: |v, _| Objective::Dpo {
            beta: v.get("beta"),
        },
    },
    Entry {
        kind: "epsilon_dpo",
        label: "ε-DPO",
        params: &[real("beta", None), real("epsilon", None)],
        build: |v, _| Objective::EpsilonDpo {
            beta: v.get("beta"),
            epsilon: v.get("epsilon"),
        },
    },
    Entry {
        kind: "cdpo",
        label: "cDPO",
        params: &[real("beta", None), real("label_smoothing", Some(0.1))],
        build: |v, _| {
            Objective::Method(Method::Cdpo {
                beta: v.get("beta"),
                label_smoothing: v.get("label_smoothing"),
            })
        },
    },
    Entry {
        kind: "rdpo",
        label: "rDPO",
        params: &[real("beta", None), real("label_smoothing", Some(0.1))],
        build: |v, _| {
            Objective::Method(Method::Rdpo {
                beta: v.get("beta"),
                label_smoothing: v.get("label_smoothing"),
            })
        },
    },
    Entry {
        kind: "ipo",
        label: "IPO",
        params: &[
            real("beta", None),
            Param {
                name: "average",
                kind: ParamType::Flag,
                default: Some(1.0),
            },
        ],
        build: |v, _| {
            Objective::Method(Method::Ipo {
                beta: v.get("beta"),
                average: v.get("average") != 0.0,
            })
        },
    },
    Entry {
        kind: "hinge",
        label: "Hinge",
        params: &[real("beta", None)],
        build: |v, _| {
            Objective::Method(Method::Hinge {
                beta: v.get("beta"),
            })
        },
    },
    Entry {
        kind: "slic",
        label: "SLiC",
        params: &[real("delta", Some(1.0)), real("lambda", Some(0.1))],
        build: |v, _| {
            Objective::Method(Method::Slic {
                delta: v.get("delta"),
                lambda: v.get("lambda"),
            })
        },
    },
    Entry {
        kind: "simpo",
        label: "SimPO",
        params: &[real("beta", Some(2.0)), real("gamma_ratio", Some(0.5))],
        build: |v, _| {
            Objective::Method(Method::Simpo {
                beta: v.get("beta"),
                gamma_ratio: v.get("gamma_ratio"),
            })
        },
    },
    Entry {
        kind: "rdpo_len",
        label: "R-DPO",
        params: &[real("beta", None), real("alpha", Some(0.2))],
        build: |v, _| {
            Objective::Method(Method::RdpoLen {
                beta: v.get("beta"),
                alpha: v.get("alpha"),
            })
        },
    },
    Entry {
        kind: "cpo",
        label: "CPO",
        params: &[real("beta", Some(0.1)), real("lambda", Some(1.0))],
        build: |v, _| {
            Objective::Method(Method::Cpo {
                beta: v.get("beta"),
                lambda: v.get("lambda"),
            })
        },
    },
    Entry {
        kind: "orpo",
        label: "ORPO",
        params: &[real("lambda", Some(0.1))],
        build: |v, _| {
            Objective::Method(Method::Orpo {
                lambda: v.get("lambda"),
            })
        },
    },
    Entry {
        kind: "kto",
        label: "KTO",
        params: &[
            real("beta", None),
            real("desirable_weight", Some(1.0)),
            real("undesirable_weight", Some(1.0)),
        ],
        build: |v, _| {
            Objective::Method(Method::Kto {
                beta: v.get("beta"),
                desirable_weight: v.get("desirable_weight"),
                undesirable_weight: v.get("undesirable_weight"),
            })
        },
    },
    Entry {
        kind: "beta_dpo",
        label: "β-DPO",
        params: &[
            real("beta0", Some(0.1)),
            real("a", Some(0.6)),
            real("keep_fraction", Some(0.8)),
            real("momentum", Some(0.9)),
        ],
        build: |v, seed| Objective::BetaDpo {
            beta0: v.get("beta0"),
            a: v.get("a"),
            keep_fraction: v.get("keep_fraction"),
            momentum: v.get("momentum"),
            seed,
        },
    },
    Entry {
        kind: "tr_dpo",
        label: "TR-DPO",
        params: &[
            real("beta", None),
            real("alpha", Some(0.6)),
            Param {
                name: "tau",
                kind: ParamType::Integer,
                default: Some(8.0),
            },
        ],
        build: |v, _| Objective::TrDpo {
            beta: v.get("beta"),
            alpha: v.get("alpha"),
            tau: v.get("tau") as usize,
        },
    },
    Entry {
        kind: "alpha_dpo",
        label: "α-DPO",
        params: &[
            real("beta", Some(2.5)),
            real("gamma_ratio", Some(0.6)),
            real("alpha", Some(0.2)),
        ],
        build: |v, _| Objective::AlphaDpo {
            beta: v.get("beta"),
            gamma_ratio: v.get("gamma_ratio"),
            alpha: v.get("alpha"),
        },
    },
    Entry {
        kind: "odpo",
        label: "ODPO",
        params: &[
            real("beta", None),
            real("alpha", Some(1.0)),
            Param {
                name: "log_offset",
                kind: ParamType::Flag,
                default: Some(1.0),
            },
        ],
        build: |v, _| {
            Objective::Method(Method::Odpo {
                beta: v.get("beta"),
                alpha: v.get("alpha"),
                log_offset: v.get("log_offset") != 0.0,
            })
        },
    },
    Entry {
        kind: "hdpo",
        label: "H-DPO",
        params: &[real("beta", None), real("alpha", None)],
        build: |v, _| {
            Objective::Method(Method::Hdpo {
                beta: v.get("beta"),
                alpha: v.get("alpha"),
            })
        },
    },
    Entry {
        kind: "chipo",
        label: "χPO",
        params: &[real("beta", None), real("r_max", Some(5.0))],
        build: |v, _| {
            Objective::Method(Method::Chipo {
                beta: v.get("beta"),
                r_max: v.get("r_max"),
            })
        },
    },
    Entry {
        kind: "sppo_hard",
        label: "SPPO",
        params: &[real("beta", None)],
        build: |v, _| {
            Objective::Method(Method::SppoHard {
                beta: v.get("beta"),
            })
        },
    },
    Entry {
        kind: "repo",
        label: "RePO",
        params: &[real("gamma", Some(0.4))],
        build: |v, _| {
            Objective::Method(Method::Repo {
                gamma: v.get("gamma"),
            })
        },
    },
    Entry {
        kind: "bpo",
        label: "BPO",
        params: &[
            real("beta", None),
            real("lambda", Some(-0.5)),
            real("r_min", Some(0.01)),
        ],
        build: |v, _| {
            Objective::Method(Method::Bpo {
                beta: v.get("beta"),
                lambda: v.get("lambda"),
                r_min: v.get("r_min"),
            })
        },
    },
    Entry {
        kind: "tdpo1",
        label: "TDPO1",
        params: &[real("beta", None)],
        build: |v, _| {
            Objective::Method(Method::Tdpo1 {
                beta: v.get("beta"),
            })
        },
    },
    Entry {
        kind: "tdpo2",
        label: "TDPO2",
        params: &[real("beta", None), real("alpha", Some(0.5))],
        build: |v, _| {
            Objective::Method(Method::Tdpo2 {
                beta: v.get("beta"),
                alpha: v.get("alpha"),
            })
        },
    },
];

/// The catalogue entry of `kind`.
pub fn entry(kind: &str) -> Option<&'static Entry> {
    CATALOGUE.iter().find(|e| e.kind == kind)
}

/// The label of `kind` (the kind itself if it is not in the catalogue).
pub fn label(kind: &str) -> &str {
    entry(kind).map_or(kind, |e| e.label)
}

/// The symbol a parameter is shown with in reports (β, ε, λ, …; the name itself otherwise).
pub fn symbol(name: &str) -> &str {
    match name {
        "beta" => "β",
        "epsilon" => "ε",
        "beta0" => "β₀",
        "alpha" => "α",
        "lambda" => "λ",
        "delta" => "δ",
        "tau" => "τ",
        "gamma_ratio" => "γ/β",
        "label_smoothing" => "ℓ",
        "gamma" => "γ",
        "r_max" => "R_max",
        "r_min" => "R_min",
        other => other,
    }
}

impl Entry {
    /// Builds the objective from `values` (every parameter of the entry; see
    /// [`Entry::params`]); [`Objective::validate`] checks the ranges.
    pub fn objective(&self, values: &[(&str, f64)], seed: u64) -> Objective {
        (self.build)(&Values { values }, seed)
    }
}

impl Objective {
    /// The config name of the objective.
    pub fn kind(&self) -> &'static str {
        match self {
            Objective::Dpo { .. } => "dpo",
            Objective::EpsilonDpo { .. } => "epsilon_dpo",
            Objective::Method(m) => m.name(),
            Objective::BetaDpo { .. } => "beta_dpo",
            Objective::TrDpo { .. } => "tr_dpo",
            Objective::AlphaDpo { .. } => "alpha_dpo",
        }
    }

    /// What the trainer must compute from the model for this objective.
    pub fn needs(&self) -> Needs {
        match self {
            Objective::Dpo { .. } | Objective::BetaDpo { .. } => Needs {
                reference: true,
                precomputed_reference: true,
                ..Needs::default()
            },
            Objective::EpsilonDpo { .. } => Needs {
                reference: true,
                mixed_logit_ratios: true,
                ..Needs::default()
            },
            Objective::TrDpo { .. } => Needs {
                reference: true,
                reference_updates: true,
                ..Needs::default()
            },
            Objective::AlphaDpo { .. } => Needs {
                reference: true,
                precomputed_reference: true,
                lengths: true,
                ..Needs::default()
            },
            Objective::Method(m) => Needs {
                reference: m.needs_reference(),
                precomputed_reference: m.needs_reference() && !m.needs_sequence_kl(),
                lengths: m.needs_lengths(),
                kl_logratios: m.needs_kl_logratios(),
                scores: m.needs_scores(),
                sequence_kl: m.needs_sequence_kl(),
                ..Needs::default()
            },
        }
    }

    /// ε-DPO's logit mixtures `(a, b)` for `a·z_θ + b·z_ref`: the policy itself, the
    /// relaxed-penalty estimate and the stronger-penalty estimate; `None` for every other
    /// objective. In the model's precision (f32, from `ε` rounded to f32 first), as the
    /// golden traces were computed.
    pub fn mixed_logit_weights(&self) -> Option<[(f32, f32); 3]> {
        match *self {
            Objective::EpsilonDpo { epsilon, .. } => {
                let e = epsilon as f32;
                Some([(1.0, 0.0), (1.0 + e, -e), (1.0 - e, e)])
            }
            _ => None,
        }
    }

    /// The objective's fixed or initial β (β₀ for β-DPO), if it has one.
    pub fn beta(&self) -> Option<f64> {
        match *self {
            Objective::Dpo { beta }
            | Objective::EpsilonDpo { beta, .. }
            | Objective::TrDpo { beta, .. }
            | Objective::AlphaDpo { beta, .. } => Some(beta),
            Objective::BetaDpo { beta0, .. } => Some(beta0),
            Objective::Method(m) => m.beta(),
        }
    }

    /// Checks every parameter's range, and that an SFT term of weight `sft_weight` may be
    /// added.
    pub fn validate(&self, sft_weight: f64) -> Result<(), Error> {
        if !(sft_weight >= 0.0 && sft_weight.is_finite()) {
            return Err(Error::Parameter {
                name: "sft_weight",
                value: sft_weight,
                message: "must be non-negative",
            });
        }
        match *self {
            Objective::Dpo { beta } => positive("beta", beta),
            Objective::EpsilonDpo { beta, epsilon } => EpsilonBeta::new(beta, epsilon).map(|_| ()),
            Objective::Method(m) => m.validate(),
            Objective::AlphaDpo {
                beta,
                gamma_ratio,
                alpha,
            } => crate::AlphaDpo::new(beta, gamma_ratio, alpha).map(|_| ()),
            Objective::BetaDpo {
                beta0,
                a,
                keep_fraction,
                momentum,
                ..
            } => {
                if sft_weight != 0.0 {
                    return Err(Error::Parameter {
                        name: "sft_weight",
                        value: sft_weight,
                        message: "must be 0 with β-DPO (it averages its loss over the pairs its filter keeps)",
                    });
                }
                crate::BetaDpo::new(beta0, a, keep_fraction, momentum).map(|_| ())
            }
            Objective::TrDpo { beta, alpha, tau } => {
                positive("beta", beta)?;
                if !(alpha > 0.0 && alpha <= 1.0) {
                    return Err(Error::Parameter {
                        name: "alpha",
                        value: alpha,
                        message: "must lie in (0, 1]",
                    });
                }
                if tau == 0 {
                    return Err(Error::Parameter {
                        name: "tau",
                        value: 0.0,
                        message: "must be at least 1",
                    });
                }
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_entry_builds_its_own_kind_from_its_defaults() {
        for e in CATALOGUE {
            let values: Vec<(&str, f64)> = e
                .params
                .iter()
                .map(|p| (p.name, p.default.unwrap_or(0.1)))
                .collect();
            let o = e.objective(&values, 7);
            if let Err(err) = o.validate(0.0) {
                panic!("{}: {err}", e.kind);
            }
            assert_eq!(o.kind(), e.kind);
            assert_eq!(label(e.kind), e.label);
            let needs = o.needs();
            assert!(
                !needs.precomputed_reference || needs.reference,
                "{}",
                e.kind
            );
            assert_eq!(
                o.mixed_logit_weights().is_some(),
                needs.mixed_logit_ratios,
                "{}",
                e.kind
            );
        }
        let kinds: std::collections::BTreeSet<&str> = CATALOGUE.iter().map(|e| e.kind).collect();
        assert_eq!(kinds.len(), CATALOGUE.len(), "kinds are unique");
    }

    #[test]
    fn needs_follow_the_objective() {
        let eps = Objective::EpsilonDpo {
            beta: 0.1,
            epsilon: 0.01,
        };
        assert!(eps.needs().mixed_logit_ratios && !eps.needs().precomputed_reference);
        let simpo = entry("simpo")
            .map(|e| e.objective(&[("beta", 2.0), ("gamma_ratio", 0.5)], 0))
            .expect("simpo");
        assert!(!simpo.needs().reference && simpo.needs().lengths);
        let tr = Objective::TrDpo {
            beta: 0.1,
            alpha: 0.6,
            tau: 0,
        };
        assert!(matches!(
            tr.validate(0.0),
            Err(Error::Parameter { name: "tau", .. })
        ));
        let beta_dpo = Objective::BetaDpo {
            beta0: 0.1,
            a: 0.6,
            keep_fraction: 0.8,
            momentum: 0.9,
            seed: 0,
        };
        assert!(beta_dpo.validate(0.1).is_err());
        assert_eq!(label("nonexistent"), "nonexistent");
    }
}
