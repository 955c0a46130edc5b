//! Golden tests against PyTorch + `transformers` on the tiny checkpoints in
//! `testdata/golden/` (GPT-2; Llama with grouped-query attention and an untied head; Qwen2 with
//! q/k/v biases and a tied head), in the style of llm.c's `test_gpt2.c`.
//!
//! The expected values were computed by `tools/make_golden.py`, which records the package
//! versions in `testdata/golden/versions.json`. To regenerate them:
//!
//!     python3 tools/make_golden.py
//!
//! Tolerances: sequence log-probs within 1e-4 relative (both sides compute in f32; the observed
//! error is far smaller); ε-DPO steps exactly equal; β_i and next β to 1e-12 (they follow from
//! the steps); losses within 1e-5 absolute; the 10-step traces within 2e-4 absolute on the
//! loss, where f32 rounding differences compound through AdamW.

mod common;

#[test]
fn tokenisation_follows_the_convention() -> common::TestResult {
    common::tokenisation_follows_the_convention()
}

#[test]
fn logps_losses_and_epsilon_steps_match_pytorch() -> common::TestResult {
    common::logps_losses_and_epsilon_steps_match_pytorch()
}

#[test]
fn dpo_gradient_norm_matches_pytorch() -> common::TestResult {
    common::dpo_gradient_norm_matches_pytorch()
}

#[test]
fn tdpo_matches_pytorch() -> common::TestResult {
    common::tdpo_matches_pytorch()
}

#[test]
fn ten_step_traces_match_pytorch() -> common::TestResult {
    common::ten_step_traces_match_pytorch()
}

#[test]
fn every_parameter_receives_a_finite_nonzero_gradient() -> common::TestResult {
    common::every_parameter_receives_a_finite_nonzero_gradient()
}

#[test]
fn log_probs_do_not_depend_on_batch_or_padding() -> common::TestResult {
    common::log_probs_do_not_depend_on_batch_or_padding()
}

#[test]
fn save_then_load_gives_identical_logits() -> common::TestResult {
    common::save_then_load_gives_identical_logits()
}

#[test]
fn sharded_steps_match_pytorch_and_the_unsplit_batch() -> common::TestResult {
    common::sharded_steps_match_pytorch_and_the_unsplit_batch()
}
