//! `edpo score`: the numbers of the foundation, exposed so anyone can check them against
//! their own implementation.

use anyhow::{bail, Context, Result};
use edpo_data::{read_jsonl_pairs, PairTokenizer, TokenizedPair};
use edpo_model::CausalLm;
use edpo_objectives::{dpo, epsilon_dpo, EpsilonBeta};
use serde_json::json;
use std::path::{Path, PathBuf};

/// Arguments of `edpo score`.
#[derive(clap::Args)]
pub struct ScoreArgs {
    /// Policy model directory (its tokenizer.json is used).
    #[arg(long)]
    policy: PathBuf,
    /// Reference model directory.
    #[arg(long)]
    reference: PathBuf,
    /// JSON lines with `prompt`, `chosen`, `rejected`.
    #[arg(long)]
    data: PathBuf,
    /// KL coefficient β.
    #[arg(long)]
    beta: f64,
    /// ε-DPO perturbation size.
    #[arg(long)]
    epsilon: f64,
    /// Pairs per forward pass.
    #[arg(long, default_value_t = 16)]
    batch_size: usize,
}

/// The model's EOS id: `eos_token_id` of `config.json`, else the `eos_token` of
/// `tokenizer_config.json` looked up in the tokenizer.
pub fn eos_id(model: &CausalLm, dir: &Path, tokenizer_path: &Path) -> Result<u32> {
    if let Some(id) = model.eos_token_id() {
        return Ok(id);
    }
    let tc = dir.join("tokenizer_config.json");
    let token = std::fs::read_to_string(&tc)
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .and_then(|v| match v.get("eos_token") {
            Some(serde_json::Value::String(s)) => Some(s.clone()),
            Some(obj) => obj
                .get("content")
                .and_then(|c| c.as_str())
                .map(str::to_string),
            None => None,
        });
    let tokenizer = PairTokenizer::from_file(tokenizer_path, 0)?;
    match token.and_then(|t| tokenizer.token_to_id(&t)) {
        Some(id) => Ok(id),
        None => bail!(
            "{}: no `eos_token_id`, and no usable `eos_token` in {}",
            dir.join("config.json").display(),
            tc.display()
        ),
    }
}

pub fn run(args: &ScoreArgs) -> Result<()> {
    if args.batch_size == 0 {
        bail!("--batch-size must be at least 1");
    }
    let device = edpo_experiment::device();
    let policy = CausalLm::load(&args.policy, &device, false)
        .with_context(|| format!("loading the policy from {}", args.policy.display()))?;
    let reference = CausalLm::load(&args.reference, &device, false)
        .with_context(|| format!("loading the reference from {}", args.reference.display()))?;
    // The policy's own directory: a snapshot for `hf:` names, the path given otherwise.
    let policy_dir = policy.source_dir().unwrap_or(&args.policy).to_path_buf();
    let tokenizer_path = policy_dir.join("tokenizer.json");
    let eos = eos_id(&policy, &args.policy, &tokenizer_path)?;
    let tokenizer = PairTokenizer::from_file(&tokenizer_path, eos)?;
    let pairs = read_jsonl_pairs(&args.data)?;
    if pairs.is_empty() {
        bail!("{}: no pairs", args.data.display());
    }
    let tokenized: Vec<TokenizedPair> = pairs
        .iter()
        .map(|p| {
            tokenizer
                .encode_pair(p)
                .with_context(|| format!("{}:{}", args.data.display(), p.line))
        })
        .collect::<Result<_>>()?;
    let mut scores: Option<edpo_train::PairScores> = None;
    for chunk in tokenized.chunks(args.batch_size) {
        let s = edpo_train::score_pairs(&policy, &reference, chunk, Some(args.epsilon))?;
        scores = Some(match scores {
            None => s,
            Some(mut acc) => {
                acc.policy_chosen.extend(s.policy_chosen);
                acc.policy_rejected.extend(s.policy_rejected);
                acc.reference_chosen.extend(s.reference_chosen);
                acc.reference_rejected.extend(s.reference_rejected);
                if let (Some(a), Some(b)) = (acc.ratios.as_mut(), s.ratios) {
                    a.extend(b);
                }
                acc
            }
        });
    }
    let Some(scores) = scores else {
        bail!("no pairs scored")
    };
    let ratios = scores.ratios.clone().unwrap_or_default();
    let plain = dpo(&scores.logps(), args.beta)?;
    let (eps_out, steps) = epsilon_dpo(&scores.logps(), &ratios, args.beta, args.epsilon)?;
    let mut state = EpsilonBeta::new(args.beta, args.epsilon)?;
    state.record(&steps);
    state.update();
    let rows: Vec<_> = (0..scores.policy_chosen.len())
        .map(|i| {
            json!({
                "chosen_logp": scores.policy_chosen[i],
                "rejected_logp": scores.policy_rejected[i],
                "ref_chosen_logp": scores.reference_chosen[i],
                "ref_rejected_logp": scores.reference_rejected[i],
                "step": steps[i],
                "beta_i": eps_out.betas[i],
            })
        })
        .collect();
    let out = json!({
        "pairs": rows,
        "dpo_loss": plain.loss(),
        "epsilon_dpo_loss": eps_out.loss(),
        "next_beta": state.beta(),
    });
    say!("{}", serde_json::to_string_pretty(&out)?);
    Ok(())
}
