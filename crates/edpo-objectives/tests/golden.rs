//! Golden test of every objective against PyTorch, in the style of llm.c's `test_gpt2.c`: no
//! model, just per-pair numbers. `tools/make_objective_golden.py` evaluated each objective of
//! `docs/spec/baselines.md` in float64 with autograd on four seeded batches (one with Δ = ±300 to
//! exercise the stable log-sigmoid, one whose KTO KL estimate clamps to 0) and recorded the
//! per-pair losses, the batch loss, the gradients of the batch loss with respect to `lw` and
//! `ll`, and the statistics; β-DPO as runs of two consecutive batches with the sampled
//! ("kept") pairs recorded. To regenerate `testdata/objectives/golden.json`, from the
//! repository root (needs `pip install torch numpy`):
//!
//!     python3 tools/make_objective_golden.py
//!
//! Tolerance: a value `a` matches the expected `e` when `|a − e| ≤ 1e-9·|e|` or
//! `|a − e| ≤ 1e-12`; the run prints every value that needed the absolute floor. Today only
//! three do, all KTO on the extreme batch, where the reference computes `1 − σ(x)` and
//! `σ(x)·(1 − σ(x))` in float64 and gets exactly 0, while `σ(−x)` keeps the true ~1e-33. The
//! extreme batch's tiny losses and gradients elsewhere (down to ~1e-133) are held to the
//! relative bound alone by `losses_are_relatively_exact_on_the_extreme_batch`.

use edpo_objectives::{
    evaluate, AlphaDpo, BetaDpo, Method, ObjectiveOutput, PairInputs, PairLogps, ResponseScores,
    SequenceKl,
};
use serde_json::Value;
use std::collections::BTreeSet;

const RELATIVE: f64 = 1e-9;
const ABSOLUTE: f64 = 1e-12;

fn golden() -> Value {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../testdata/objectives/golden.json"
    );
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn floats(v: &Value) -> Vec<f64> {
    v.as_array()
        .unwrap_or_else(|| panic!("not an array: {v}"))
        .iter()
        .map(|x| x.as_f64().unwrap_or_else(|| panic!("not a number: {x}")))
        .collect()
}

fn counts(v: &Value) -> Vec<usize> {
    v.as_array()
        .unwrap_or_else(|| panic!("not an array: {v}"))
        .iter()
        .map(|x| x.as_u64().unwrap_or_else(|| panic!("not a count: {x}")) as usize)
        .collect()
}

fn number(v: &Value, key: &str) -> f64 {
    v[key]
        .as_f64()
        .unwrap_or_else(|| panic!("`{key}` is not a number in {v}"))
}

/// One recorded batch.
struct Batch {
    name: String,
    lw: Vec<f64>,
    ll: Vec<f64>,
    rw: Vec<f64>,
    rl: Vec<f64>,
    len_w: Vec<usize>,
    len_l: Vec<usize>,
    kl_logratios: Vec<f64>,
    score_w: Vec<f64>,
    score_l: Vec<f64>,
    kl_w: Vec<f64>,
    kl_l: Vec<f64>,
}

impl Batch {
    fn from_json(v: &Value) -> Self {
        Self {
            name: v["name"].as_str().unwrap_or("?").to_owned(),
            lw: floats(&v["lw"]),
            ll: floats(&v["ll"]),
            rw: floats(&v["rw"]),
            rl: floats(&v["rl"]),
            len_w: counts(&v["len_w"]),
            len_l: counts(&v["len_l"]),
            kl_logratios: floats(&v["kl_logratios"]),
            score_w: floats(&v["score_w"]),
            score_l: floats(&v["score_l"]),
            kl_w: floats(&v["kl_w"]),
            kl_l: floats(&v["kl_l"]),
        }
    }

    fn logps(&self) -> PairLogps<'_> {
        PairLogps {
            policy_chosen: &self.lw,
            policy_rejected: &self.ll,
            reference_chosen: &self.rw,
            reference_rejected: &self.rl,
        }
    }

    /// The inputs as a method sees them: reference-free methods get empty reference slices,
    /// so the test also shows they never read them.
    fn inputs(&self, method: &Method) -> PairInputs<'_> {
        let mut logps = self.logps();
        if !method.needs_reference() {
            logps.reference_chosen = &[];
            logps.reference_rejected = &[];
        }
        PairInputs {
            logps,
            chosen_lengths: &self.len_w,
            rejected_lengths: &self.len_l,
            kl_logratios: method
                .needs_kl_logratios()
                .then_some(&self.kl_logratios[..]),
            scores: method.needs_scores().then_some(ResponseScores {
                chosen: &self.score_w,
                rejected: &self.score_l,
            }),
            sequence_kl: method.needs_sequence_kl().then_some(SequenceKl {
                chosen: &self.kl_w,
                rejected: &self.kl_l,
            }),
        }
    }
}

/// The golden file's input batches.
fn batches(golden: &Value) -> Vec<Batch> {
    golden["batches"]
        .as_array()
        .expect("batches")
        .iter()
        .map(Batch::from_json)
        .collect()
}

/// The method a case names, built from its parameters; every parameter must be known.
fn method(name: &str, params: &Value) -> Method {
    let keys: BTreeSet<&str> = params
        .as_object()
        .unwrap_or_else(|| panic!("params of {name} are not an object"))
        .keys()
        .map(String::as_str)
        .filter(|k| *k != "sft_weight")
        .collect();
    let p = |key: &str| number(params, key);
    let (method, expected): (Method, &[&str]) = match name {
        "dpo" => (Method::Dpo { beta: p("beta") }, &["beta"]),
        "cdpo" => (
            Method::Cdpo {
                beta: p("beta"),
                label_smoothing: p("label_smoothing"),
            },
            &["beta", "label_smoothing"],
        ),
        "rdpo" => (
            Method::Rdpo {
                beta: p("beta"),
                label_smoothing: p("label_smoothing"),
            },
            &["beta", "label_smoothing"],
        ),
        "ipo" => (
            Method::Ipo {
                beta: p("beta"),
                average: params["average"]
                    .as_bool()
                    .unwrap_or_else(|| panic!("ipo's `average` is not a bool")),
            },
            &["average", "beta"],
        ),
        "hinge" => (Method::Hinge { beta: p("beta") }, &["beta"]),
        "slic" => (
            Method::Slic {
                delta: p("delta"),
                lambda: p("lambda"),
            },
            &["delta", "lambda"],
        ),
        "simpo" => (
            Method::Simpo {
                beta: p("beta"),
                gamma_ratio: p("gamma_ratio"),
            },
            &["beta", "gamma_ratio"],
        ),
        "rdpo_len" => (
            Method::RdpoLen {
                beta: p("beta"),
                alpha: p("alpha"),
            },
            &["alpha", "beta"],
        ),
        "cpo" => (
            Method::Cpo {
                beta: p("beta"),
                lambda: p("lambda"),
            },
            &["beta", "lambda"],
        ),
        "orpo" => (
            Method::Orpo {
                lambda: p("lambda"),
            },
            &["lambda"],
        ),
        "kto" => (
            Method::Kto {
                beta: p("beta"),
                desirable_weight: p("desirable_weight"),
                undesirable_weight: p("undesirable_weight"),
            },
            &["beta", "desirable_weight", "undesirable_weight"],
        ),
        "odpo" => (
            Method::Odpo {
                beta: p("beta"),
                alpha: p("alpha"),
                log_offset: params["log_offset"]
                    .as_bool()
                    .unwrap_or_else(|| panic!("odpo's `log_offset` is not a bool")),
            },
            &["alpha", "beta", "log_offset"],
        ),
        "hdpo" => (
            Method::Hdpo {
                beta: p("beta"),
                alpha: p("alpha"),
            },
            &["alpha", "beta"],
        ),
        "chipo" => (
            Method::Chipo {
                beta: p("beta"),
                r_max: p("r_max"),
            },
            &["beta", "r_max"],
        ),
        "sppo_hard" => (Method::SppoHard { beta: p("beta") }, &["beta"]),
        "repo" => (Method::Repo { gamma: p("gamma") }, &["gamma"]),
        "bpo" => (
            Method::Bpo {
                beta: p("beta"),
                lambda: p("lambda"),
                r_min: p("r_min"),
            },
            &["beta", "lambda", "r_min"],
        ),
        "tdpo1" => (Method::Tdpo1 { beta: p("beta") }, &["beta"]),
        "tdpo2" => (
            Method::Tdpo2 {
                beta: p("beta"),
                alpha: p("alpha"),
            },
            &["alpha", "beta"],
        ),
        other => panic!("unknown method `{other}` in the golden file"),
    };
    assert_eq!(
        keys,
        expected.iter().copied().collect(),
        "parameters of {name}"
    );
    assert_eq!(method.name(), name);
    method
}

/// Collects every mismatch so that one run reports them all.
#[derive(Default)]
struct Check {
    compared: usize,
    /// Matches that needed the absolute floor, with the context, for the summary.
    floored: Vec<String>,
    failures: Vec<String>,
}

impl Check {
    fn close(&mut self, what: &str, got: f64, expected: f64) {
        self.compared += 1;
        let error = (got - expected).abs();
        let line = format!("{what}: got {got:e}, expected {expected:e}");
        if error <= RELATIVE * expected.abs() {
            // Relatively exact.
        } else if error <= ABSOLUTE {
            self.floored.push(line);
        } else {
            self.failures.push(line);
        }
    }

    /// The losses, mean loss and gradients of `out` against a golden record.
    fn output(&mut self, what: &str, out: &ObjectiveOutput, record: &Value) {
        self.all_close(
            &format!("{what}: losses"),
            &out.losses,
            &floats(&record["losses"]),
        );
        self.close(&format!("{what}: loss"), out.loss(), number(record, "loss"));
        self.all_close(
            &format!("{what}: grad_lw"),
            &out.grad_policy_chosen,
            &floats(&record["grad_lw"]),
        );
        self.all_close(
            &format!("{what}: grad_ll"),
            &out.grad_policy_rejected,
            &floats(&record["grad_ll"]),
        );
        // The derivatives with respect to the sequential KLs, exactly where they are recorded.
        match (&out.grad_sequence_kl, record.get("grad_kl_w")) {
            (Some(grads), Some(expected_w)) => {
                let (w, l): (Vec<f64>, Vec<f64>) = grads.iter().map(|g| (g[0], g[1])).unzip();
                self.all_close(&format!("{what}: grad_kl_w"), &w, &floats(expected_w));
                self.all_close(
                    &format!("{what}: grad_kl_l"),
                    &l,
                    &floats(&record["grad_kl_l"]),
                );
            }
            (None, None) => {}
            (got, expected) => self.failures.push(format!(
                "{what}: sequential-KL gradients {} but {} recorded",
                if got.is_some() {
                    "returned"
                } else {
                    "not returned"
                },
                if expected.is_some() { "some" } else { "none" },
            )),
        }
    }

    fn all_close(&mut self, what: &str, got: &[f64], expected: &[f64]) {
        if got.len() != expected.len() {
            self.failures.push(format!(
                "{what}: {} values, expected {}",
                got.len(),
                expected.len()
            ));
            return;
        }
        for (i, (&g, &e)) in got.iter().zip(expected).enumerate() {
            self.close(&format!("{what}[{i}]"), g, e);
        }
    }

    fn finish(self, name: &str) {
        assert!(
            self.failures.is_empty(),
            "{name}: {} of {} comparisons failed (regenerate with \
             `python3 tools/make_objective_golden.py` if the reference changed):\n{}",
            self.failures.len(),
            self.compared,
            self.failures.join("\n")
        );
        eprintln!(
            "{name}: {} values match, {} of them only within the absolute floor:",
            self.compared,
            self.floored.len()
        );
        for line in &self.floored {
            eprintln!("  {line}");
        }
    }
}

#[test]
fn every_case_matches_pytorch() {
    let golden = golden();
    let batches = batches(&golden);
    let cases = golden["cases"].as_array().expect("cases");
    let mut check = Check::default();
    let mut methods_seen = BTreeSet::new();
    for case in cases {
        let name = case["method"].as_str().expect("method");
        let params = &case["params"];
        let method = method(name, params);
        methods_seen.insert(name);
        let sft_weight = params.get("sft_weight").map_or(0.0, |v| {
            v.as_f64()
                .unwrap_or_else(|| panic!("sft_weight is not a number"))
        });
        let batch = &batches[case["batch"].as_u64().expect("batch") as usize];
        let what = format!("{name} {params} on {}", batch.name);
        let out = evaluate(&method, &batch.inputs(&method), sft_weight)
            .unwrap_or_else(|e| panic!("{what}: {e}"));

        check.output(&what, &out, case);
        // The mean margin sums per-pair margins that may cancel at a size far above their mean
        // (χPO on the extreme batch: ±β·e¹⁵⁰); there its rounding depends on the summation
        // order, and it is compared to the rounding of the rewards' size.
        let reward_size = ["rewards/chosen", "rewards/rejected"]
            .iter()
            .filter_map(|k| case["stats"][*k].as_f64())
            .fold(0.0f64, |m, v| m.max(v.abs()));
        for (key, expected) in case["stats"].as_object().expect("stats") {
            match (expected.as_f64(), out.stat(key)) {
                (Some(e), Some(got))
                    if key == "rewards/margins"
                        && reward_size > 1e12
                        && (got - e).abs() <= 1e-12 * reward_size =>
                {
                    check.compared += 1;
                }
                (Some(e), Some(got)) => check.close(&format!("{what}: {key}"), got, e),
                (None, None) if expected.is_null() => {}
                (e, got) => check
                    .failures
                    .push(format!("{what}: {key}: got {got:?}, expected {e:?}")),
            }
        }
        // `beta/mean` is null exactly for the methods without a β, which return no betas.
        assert_eq!(
            case["stats"]["beta/mean"].is_null(),
            out.betas.is_empty(),
            "{what}: betas"
        );
    }
    let all: BTreeSet<&str> = [
        "dpo",
        "cdpo",
        "rdpo",
        "ipo",
        "hinge",
        "slic",
        "simpo",
        "rdpo_len",
        "cpo",
        "orpo",
        "kto",
        "odpo",
        "hdpo",
        "chipo",
        "sppo_hard",
        "repo",
        "bpo",
        "tdpo1",
        "tdpo2",
    ]
    .into_iter()
    .collect();
    assert_eq!(methods_seen, all, "every method has golden cases");
    assert!(check.compared > 1000, "only {} comparisons", check.compared);
    check.finish(&format!("{} cases", cases.len()));
}

/// On the extreme batch (Δ = ±300) the losses and gradients of the logistic objectives fall
/// to ~1e-133; a stable log-sigmoid gets them to full relative precision, so here they are
/// compared relatively with no absolute floor. (KTO is left out: its reference computes
/// `1 − σ(x)`, which is exactly 0 where ours keeps the digits of `σ(−x)`.)
#[test]
fn losses_are_relatively_exact_on_the_extreme_batch() {
    let golden = golden();
    let batches = golden["batches"].as_array().expect("batches");
    let extreme = batches
        .iter()
        .position(|b| b["name"] == "extreme")
        .expect("an extreme batch");
    let batch = Batch::from_json(&batches[extreme]);
    let mut compared = 0;
    let mut tiny = 0;
    for case in golden["cases"].as_array().expect("cases") {
        let name = case["method"].as_str().expect("method");
        if case["batch"].as_u64() != Some(extreme as u64) || name == "kto" {
            continue;
        }
        let method = method(name, &case["params"]);
        let sft_weight = case["params"].get("sft_weight").and_then(Value::as_f64);
        let out = evaluate(&method, &batch.inputs(&method), sft_weight.unwrap_or(0.0))
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        for (got, key) in [
            (&out.losses, "losses"),
            (&out.grad_policy_chosen, "grad_lw"),
            (&out.grad_policy_rejected, "grad_ll"),
        ] {
            for (i, (&g, &e)) in got.iter().zip(&floats(&case[key])).enumerate() {
                compared += 1;
                if e != 0.0 && e.abs() < 1e-30 {
                    tiny += 1;
                }
                assert!(
                    (g - e).abs() <= RELATIVE * e.abs(),
                    "{name} {}: {key}[{i}] = {g:e}, expected {e:e}",
                    case["params"]
                );
            }
        }
    }
    assert!(
        tiny > 0,
        "the extreme batch has no tiny values left to check"
    );
    eprintln!("extreme batch: {compared} values relatively exact, {tiny} of them below 1e-30");
}

#[test]
fn beta_dpo_runs_match_pytorch() {
    let golden = golden();
    let batches = batches(&golden);
    let runs = golden["beta_dpo"].as_array().expect("beta_dpo");
    assert!(!runs.is_empty());
    let mut check = Check::default();
    let mut clamped = false;
    for (r, run) in runs.iter().enumerate() {
        let p = &run["params"];
        let mut state = BetaDpo::new(
            number(p, "beta0"),
            number(p, "a"),
            number(p, "keep_fraction"),
            number(p, "momentum"),
        )
        .expect("β-DPO parameters");
        for (s, step) in run["steps"].as_array().expect("steps").iter().enumerate() {
            let batch = &batches[step["batch"].as_u64().expect("batch") as usize];
            let what = format!("β-DPO run {r} step {s} ({})", batch.name);
            let n = batch.lw.len();

            // The running estimates before the step (null: none yet).
            for (key, got) in [("m0", state.m0()), ("s0", state.s0())] {
                match (step[key].as_f64(), got) {
                    (Some(e), Some(g)) => check.close(&format!("{what}: {key}"), g, e),
                    (None, None) => {}
                    (e, g) => check
                        .failures
                        .push(format!("{what}: {key}: got {g:?}, expected {e:?}")),
                }
            }
            let deltas: Vec<f64> = (0..n).map(|i| batch.logps().delta(i)).collect();
            check.all_close(
                &format!("{what}: filter_weights"),
                &state.filter_weights(&deltas),
                &floats(&step["weights"]),
            );
            let kept = counts(&step["kept"]);
            assert_eq!(state.keep_count(n), kept.len(), "{what}: keep count");

            let (out, report) = state
                .step_with_kept(&batch.logps(), &kept)
                .unwrap_or_else(|e| panic!("{what}: {e}"));
            assert_eq!(report.kept, kept, "{what}: kept");
            for (key, got) in [
                ("m0_used", report.m0_used),
                ("s0_used", report.s0_used),
                ("batch_mean_a", report.batch_mean),
                ("batch_std_a", report.batch_std),
                ("beta_batch_unclamped", report.beta_unclamped),
                ("beta_batch", report.beta),
                ("m0_next", report.m0_next),
                ("s0_next", report.s0_next),
                ("loss", out.loss()),
            ] {
                check.close(&format!("{what}: {key}"), got, number(step, key));
            }
            let per_pair = floats(&step["per_pair_losses"]);
            check.all_close(
                &format!("{what}: per_pair_losses"),
                &report.per_pair_losses,
                &per_pair,
            );
            let kept_losses: Vec<f64> = kept.iter().map(|&i| per_pair[i]).collect();
            check.all_close(&format!("{what}: losses"), &out.losses, &kept_losses);
            check.all_close(
                &format!("{what}: weights"),
                &report.weights,
                &floats(&step["weights"]),
            );
            check.all_close(
                &format!("{what}: grad_lw"),
                &out.grad_policy_chosen,
                &floats(&step["grad_lw"]),
            );
            check.all_close(
                &format!("{what}: grad_ll"),
                &out.grad_policy_rejected,
                &floats(&step["grad_ll"]),
            );
            check.all_close(&format!("{what}: betas"), &out.betas, &vec![report.beta; n]);
            for (key, expected) in step["stats"].as_object().expect("stats") {
                let e = expected
                    .as_f64()
                    .unwrap_or_else(|| panic!("{what}: {key} is not a number"));
                match out.stat(key) {
                    Some(got) => check.close(&format!("{what}: {key}"), got, e),
                    None => check.failures.push(format!("{what}: no stat {key}")),
                }
            }
            // The update is the state the next step starts from.
            assert_eq!(state.m0(), Some(report.m0_next), "{what}");
            assert_eq!(state.s0(), Some(report.s0_next), "{what}");
            clamped |= report.beta_unclamped < BetaDpo::BETA_MIN;
        }
    }
    assert!(clamped, "no β-DPO step exercises the clamp");
    check.finish(&format!("{} β-DPO runs", runs.len()));
}

/// α-DPO over consecutive batches: its running statistics carried from batch to batch, the
/// losses, gradients and statistics of every step as PyTorch computes them.
#[test]
fn alpha_dpo_runs_match_pytorch() {
    let golden = golden();
    let batches = batches(&golden);
    let runs = golden["alpha_dpo"].as_array().expect("alpha_dpo");
    assert!(!runs.is_empty());
    let mut check = Check::default();
    for (r, run) in runs.iter().enumerate() {
        let p = &run["params"];
        let mut state = AlphaDpo::new(
            number(p, "beta"),
            number(p, "gamma_ratio"),
            number(p, "alpha"),
        )
        .expect("α-DPO parameters");
        for (s, step) in run["steps"].as_array().expect("steps").iter().enumerate() {
            let batch = &batches[step["batch"].as_u64().expect("batch") as usize];
            let what = format!("α-DPO run {r} step {s} ({})", batch.name);
            let out = state
                .step(&batch.logps(), &batch.len_w, &batch.len_l)
                .unwrap_or_else(|e| panic!("{what}: {e}"));
            let (mean, std) = state.estimates();
            check.close(&format!("{what}: mean"), mean, number(step, "mean"));
            check.close(&format!("{what}: std"), std, number(step, "std"));
            check.output(&what, &out, step);
            for key in step["stats"].as_object().expect("stats").keys() {
                let got = out
                    .stat(key)
                    .unwrap_or_else(|| panic!("{what}: no statistic {key}"));
                check.close(&format!("{what}: {key}"), got, number(&step["stats"], key));
            }
        }
    }
    check.finish("α-DPO runs");
}
