//! The whole training path on candle's composed operations (`edpo_model::ops::set_composed`),
//! the path a device without the fused CPU kernels runs: the golden checks of `golden.rs`
//! (log-probs, losses and ε-DPO's steps, the gradient norm, TDPO, 10-step DPO and ε-DPO traces,
//! sharded steps, a finite non-zero gradient for every parameter) against the same PyTorch
//! values at the same tolerances. One test, in a binary of its own, because the switch is
//! process-wide.

mod common;

#[test]
fn training_on_the_composed_path_matches_pytorch() -> common::TestResult {
    edpo_model::ops::set_composed(true);
    common::tokenisation_follows_the_convention()?;
    common::logps_losses_and_epsilon_steps_match_pytorch()?;
    common::dpo_gradient_norm_matches_pytorch()?;
    common::tdpo_matches_pytorch()?;
    common::ten_step_traces_match_pytorch()?;
    common::every_parameter_receives_a_finite_nonzero_gradient()?;
    common::log_probs_do_not_depend_on_batch_or_padding()?;
    common::save_then_load_gives_identical_logits()?;
    common::sharded_steps_match_pytorch_and_the_unsplit_batch()?;
    Ok(())
}
