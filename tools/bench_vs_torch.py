"""The `edpo bench` workload in PyTorch on CPU: a bare training loop and TRL's DPOTrainer.

Runs the same fixed training workload as `edpo bench` (crates/edpo/src/bench.rs) and reports
its throughput in pairs per second, for comparison:

- a bare PyTorch loop, once with DPO and once with ε-DPO (ε = 0.01);
- Hugging Face TRL's `DPOTrainer` with the sigmoid (DPO) loss, its bf16 autocast, gradient
  checkpointing, gradient clipping and decaying learning rate turned off to match.

Workload: GPT-2 (vocabulary 4096, 256 positions, width 256, 4 layers, 4 heads, tied embeddings,
no dropout, f32, random initialisation seeded with 1234); the reference is a frozen copy of the
initial policy. Batch: 8 pairs of random ids (the same ids as `edpo bench`), prompt 32 tokens,
chosen and rejected 64 tokens each including EOS (id 4095), so no padding is needed. Step:
reference forward, policy forward and backward on chosen and rejected as one batch (chosen
first), DPO with β = 0.1, AdamW at learning rate 1e-5, no gradient clipping. Timing: 2 warm-up
steps, then `--steps` timed steps; pairs/s = 8·steps / seconds.

Run from the repository root in a Python environment with torch, transformers and trl
(`pip install torch transformers trl`; the versions measured are in the README):

    python3 tools/bench_vs_torch.py --threads 1 --steps 20

It prints one JSON object on stdout (progress goes to stderr). The bare loop and TRL each run
in a child process of their own, so that each peak RSS is its own; `--only bare` or
`--only trl` runs one of them in this process.

The workload must match crates/edpo/src/bench.rs: change the two together.
"""

import argparse
import contextlib
import copy
import json
import os
import resource
import subprocess
import sys
import tempfile
import time


def _threads_from_argv(argv):
    """The `--threads` value, read before torch is imported (its thread pools read the env)."""
    for i, arg in enumerate(argv):
        if arg == "--threads" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--threads="):
            return arg.split("=", 1)[1]
    return "1"


os.environ["OMP_NUM_THREADS"] = _threads_from_argv(sys.argv[1:])
os.environ["MKL_NUM_THREADS"] = os.environ["OMP_NUM_THREADS"]

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import transformers  # noqa: E402

PAIRS = 8
PROMPT = 32
RESPONSE = 64
VOCAB = 4096
EOS = VOCAB - 1
WARMUP = 2
BETA = 0.1
EPSILON = 0.01
LR = 1e-5
MODEL_SEED = 1234
DATA_SEED = 7
ATTN_IMPLEMENTATION = "sdpa"


def log(message):
    print(message, file=sys.stderr, flush=True)


def peak_rss_mib():
    """Peak resident set size of this process (ru_maxrss is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ---------------------------------------------------------------------------------------------
# Workload


def random_pairs(seed=DATA_SEED):
    """The pairs of `edpo bench`: the project's generator (SplitMix64), drawn in the same order."""
    state = seed
    mask = 2**64 - 1

    def next_id():
        nonlocal state
        state = (state + 0x9E3779B97F4A7C15) & mask
        z = state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
        return (z ^ (z >> 31)) % (VOCAB - 1)

    def response():
        return [next_id() for _ in range(RESPONSE - 1)] + [EOS]

    pairs = []
    for _ in range(PAIRS):
        prompt = [next_id() for _ in range(PROMPT)]
        chosen = response()
        rejected = response()
        pairs.append((prompt, chosen, rejected))
    return pairs


def pair_batch(pairs):
    """Input ids `(2·PAIRS, PROMPT + RESPONSE)`: every pair's chosen sequence, then the rejected ones."""
    rows = [p + c for p, c, _ in pairs] + [p + r for p, _, r in pairs]
    return torch.tensor(rows, dtype=torch.long)


def make_models():
    """A seeded random policy and its frozen copy as the reference."""
    config = transformers.GPT2Config(
        vocab_size=VOCAB,
        n_positions=256,
        n_embd=256,
        n_layer=4,
        n_head=4,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=EOS,
        eos_token_id=EOS,
        attn_implementation=ATTN_IMPLEMENTATION,
    )
    torch.manual_seed(MODEL_SEED)
    policy = transformers.GPT2LMHeadModel(config).to(torch.float32)
    assert policy.config._attn_implementation == ATTN_IMPLEMENTATION
    policy.train()
    reference = copy.deepcopy(policy).eval()
    reference.requires_grad_(False)
    return policy, reference


def setup_threads(threads):
    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # only allowed before any inter-op work has started
        log("note: could not set the inter-op thread count")


# ---------------------------------------------------------------------------------------------
# Bare PyTorch loop


def response_logits(model, ids):
    """Logits at the positions that predict the response tokens: `(N, RESPONSE, V)`."""
    return model(input_ids=ids, use_cache=False).logits[:, PROMPT - 1 : -1]


def sequence_logps(logits, targets):
    """Σ over response tokens of log_softmax(logits)[token], per sequence."""
    token_logps = logits.log_softmax(-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return token_logps.sum(-1)


def epsilon_steps(policy_logits, reference_logits, targets, h):
    """ε-DPO's per-pair step (+1, −1 or 0) from the perturbed log-ratios h⁺ and h⁻."""

    def ratio(logits):
        chosen, rejected = sequence_logps(logits, targets).chunk(2)
        return chosen - rejected

    h_plus = ratio((1 + EPSILON) * policy_logits - EPSILON * reference_logits)
    h_minus = ratio((1 - EPSILON) * policy_logits + EPSILON * reference_logits)
    up = (h_plus > h) & (h > h_minus)
    down = (h_minus > h) & (h > h_plus)
    return up.to(h.dtype) - down.to(h.dtype)


def train_step(policy, reference, optimizer, ids, beta, epsilon):
    """One optimizer step; returns the mean ε-DPO step (0 for DPO)."""
    targets = ids[:, PROMPT:]
    policy_logits = response_logits(policy, ids)
    with torch.no_grad():
        reference_logits = response_logits(reference, ids)
        reference_logps = sequence_logps(reference_logits, targets)
    policy_logps = sequence_logps(policy_logits, targets)
    lw, ll = policy_logps.chunk(2)
    rw, rl = reference_logps.chunk(2)

    if epsilon is None:
        betas = torch.full_like(lw, beta)
        steps = torch.zeros_like(lw)
    else:
        with torch.no_grad():
            steps = epsilon_steps(policy_logits, reference_logits, targets, h=lw - ll)
            betas = beta / (1 + epsilon * steps)

    loss = -F.logsigmoid(betas * ((lw - rw) - (ll - rl))).mean()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return steps.mean().item()


def measure_bare(steps, epsilon=None):
    policy, reference = make_models()
    optimizer = torch.optim.AdamW(policy.parameters(), lr=LR, weight_decay=0.0)
    ids = pair_batch(random_pairs())
    beta = BETA

    def step():
        nonlocal beta
        mean_step = train_step(policy, reference, optimizer, ids, beta, epsilon)
        if epsilon is not None:
            # ε-DPO moves the base β after each optimizer step, as edpo's trainer does.
            beta /= 1 + epsilon * mean_step

    for _ in range(WARMUP):
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return PAIRS * steps / (time.perf_counter() - start)


def run_bare(steps):
    log(f"bare loop, DPO: {WARMUP} + {steps} steps")
    dpo = measure_bare(steps)
    log(f"bare loop, ε-DPO: {WARMUP} + {steps} steps")
    eps = measure_bare(steps, epsilon=EPSILON)
    return {
        "bare_dpo_pairs_per_s": dpo,
        "bare_epsilon_dpo_pairs_per_s": eps,
        "bare_epsilon_over_dpo": eps / dpo,
        "bare_peak_rss_mib": peak_rss_mib(),
        "attn_implementation": ATTN_IMPLEMENTATION,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }


# ---------------------------------------------------------------------------------------------
# TRL


def word_level_tokenizer():
    """Token "t<i>" is id i; no special tokens are added, EOS is "t4095"."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"t{i}": i for i in range(VOCAB)}
    tokenizer = Tokenizer(models.WordLevel(vocab))  # no unknown token: a stray word is an error
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=f"t{EOS}")


def text(ids):
    return " ".join(f"t{i}" for i in ids)


def preference_dataset(pairs, repeats):
    """The pairs as text (TRL tokenises the dataset itself), repeated `repeats` times in order.

    Responses start with a space and already end in the EOS word, so TRL appends no EOS and
    prompt + response tokenises to exactly the intended ids.
    """
    from datasets import Dataset

    rows = {
        "prompt": [text(p) for p, _, _ in pairs],
        "chosen": [" " + text(c) for _, c, _ in pairs],
        "rejected": [" " + text(r) for _, _, r in pairs],
    }
    return Dataset.from_dict({key: column * repeats for key, column in rows.items()})


def check_tokenisation(dataset, pairs):
    for row, (prompt, chosen, rejected) in zip(dataset, pairs):
        got = (row["prompt_ids"], row["chosen_ids"], row["rejected_ids"])
        if got != (prompt, chosen, rejected):
            lengths = tuple(len(ids) for ids in got)
            raise SystemExit(f"TRL tokenised a pair differently (lengths {lengths}, expected 32/64/64)")


class StepTimes(transformers.TrainerCallback):
    """time.perf_counter() at the end of each optimizer step, by global step."""

    def __init__(self):
        self.times = {}

    def on_step_end(self, args, state, control, **kwargs):
        self.times[state.global_step] = time.perf_counter()


def run_trl(steps, threads):
    import trl

    total = WARMUP + steps
    pairs = random_pairs()
    policy, reference = make_models()
    timer = StepTimes()
    with tempfile.TemporaryDirectory() as output_dir:
        config = trl.DPOConfig(
            output_dir=output_dir,
            beta=BETA,
            loss_type="sigmoid",
            learning_rate=LR,
            lr_scheduler_type="constant",
            weight_decay=0.0,
            max_grad_norm=0.0,  # no clipping, as in edpo bench
            per_device_train_batch_size=PAIRS,
            gradient_accumulation_steps=1,
            max_steps=total,
            train_sampling_strategy="sequential",  # every batch is the 8 pairs, in order
            precompute_ref_log_probs=False,
            max_length=128,
            disable_dropout=True,
            # TRL's defaults are bf16 autocast and gradient checkpointing; the workload is f32
            # with neither.
            bf16=False,
            gradient_checkpointing=False,
            use_cpu=True,
            dataloader_num_workers=0,
            eval_strategy="no",
            save_strategy="no",
            report_to="none",
            logging_steps=10**9,
            disable_tqdm=True,
            seed=MODEL_SEED,
        )
        # The trainer prints its final log line on stdout, which is reserved for the JSON.
        with contextlib.redirect_stdout(sys.stderr):
            trainer = trl.DPOTrainer(
                model=policy,
                ref_model=reference,
                args=config,
                train_dataset=preference_dataset(pairs, repeats=total),
                processing_class=word_level_tokenizer(),
                callbacks=[timer],
            )
            check_tokenisation(trainer.train_dataset, pairs)
            log(f"TRL DPOTrainer: {WARMUP} + {steps} steps")
            trainer.train()
    if torch.get_num_threads() != threads:
        log(f"warning: torch now uses {torch.get_num_threads()} threads, not {threads}")
    seconds = timer.times[total] - timer.times[WARMUP]
    return {
        "trl_dpo_pairs_per_s": PAIRS * steps / seconds,
        "trl_peak_rss_mib": peak_rss_mib(),
        "trl_optim": getattr(config.optim, "value", config.optim),
        "trl": trl.__version__,
    }


# ---------------------------------------------------------------------------------------------
# Entry point


def run_child(which, args):
    """Runs `--only which` in a fresh process and returns its JSON object."""
    command = [sys.executable, os.path.abspath(__file__), "--only", which,
               "--threads", str(args.threads), "--steps", str(args.steps)]
    result = subprocess.run(command, stdout=subprocess.PIPE, text=True)
    if result.returncode != 0:
        raise SystemExit(f"the {which} run failed (exit status {result.returncode})")
    return json.loads(result.stdout.strip().splitlines()[-1])


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0], allow_abbrev=False)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps (default 20)")
    parser.add_argument("--only", choices=["bare", "trl"],
                        help="run one measurement in this process (default: both, each in a child)")
    args = parser.parse_args()
    if args.threads < 1 or args.steps < 1:
        parser.error("--threads and --steps must be at least 1")
    return args


def main():
    args = parse_args()
    out = {"threads": args.threads, "steps": args.steps}
    if args.only is None:
        out.update(run_child("bare", args))
        out.update(run_child("trl", args))
    else:
        setup_threads(args.threads)
        if args.only == "bare":
            out.update(run_bare(args.steps))
        else:
            out.update(run_trl(args.steps, args.threads))
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
