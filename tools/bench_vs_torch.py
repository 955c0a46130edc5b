"""The `edpo bench` workloads in PyTorch on CPU: a bare loop, a same-FLOPs loop and TRL.

Runs the fixed training workloads of `edpo bench` (crates/edpo/src/bench.rs) and reports
their throughput in pairs per second, for comparison:

- `bare`: a bare PyTorch loop over the `transformers` model, once with DPO and once with ε-DPO
  (ε = 0.01): chosen and rejected as two sequences each, logits at every response position;
- `samef` (and `samef-compiled`, under `torch.compile`): the same loop written with the FLOP
  savings edpo uses, so that a lead over it comes from the kernels and not the algorithm: each
  pair one row `prompt ++ chosen ++ rejected` with a tree attention mask (the rejected branch
  sees the prompt and itself, at positions that continue the prompt), the LM head only at the
  positions that predict a response token, PyTorch's SDPA; its log-probs are checked against
  the `transformers` forward before timing;
- `trl`: Hugging Face TRL's `DPOTrainer` with the sigmoid (DPO) loss, its bf16 autocast,
  gradient checkpointing, gradient clipping and decaying learning rate turned off to match
  (with PEFT for `--lora`);
- `sampling` (`--workload smollm2`): `model.generate` with the key/value cache, tokens/s.

Workloads (`--workload`):
- `gpt2` (default): GPT-2 (vocabulary 4096, 256 positions, width 256, 4 layers, 4 heads, tied
  embeddings), 8 pairs of prompt 32 + chosen 64 + rejected 64 tokens;
- `smollm2`: SmolLM2-135M's architecture (Llama: 30 layers, width 576, 9 query and 3
  key/value heads, SwiGLU 1536, vocabulary 49,152, tied embeddings), 4 pairs of 64 + 64 + 64.

Both: no dropout, f32, random initialisation seeded with 1234; the reference is a frozen copy
of the initial policy (with `--lora R`: LoRA adapters of rank R, alpha 2R, on every attention
and MLP projection, only they trained, the reference being the base model with the adapters
disabled). The pairs are the ids of `edpo bench` (the project's SplitMix64, drawn in the same
order), responses ending with EOS (the last id), so no padding is needed. Step: reference
forward, policy forward and backward, DPO with β = 0.1 (or ε-DPO), AdamW at learning rate
1e-5, no gradient clipping. Timing: 2 warm-up steps, then `--steps` timed steps; pairs/s =
pairs·steps / seconds, and each timed step's seconds beside it (`*_step_seconds`): on a machine
where PyTorch's allocator makes some steps fault their memory in again, one slow step moves a
two-step mean by a third.

Run from the repository root in a Python environment with torch, transformers, peft, trl and
datasets (`pip install torch transformers peft trl datasets`; versions are printed):

    python3 tools/bench_vs_torch.py --workload smollm2 --threads 1 --steps 3

It prints one JSON object on stdout (progress goes to stderr). Each measurement runs in a
child process of its own, so that each peak RSS is its own; `--only NAME` runs one of them in
this process.

The workloads must match crates/edpo/src/bench.rs: change the two together.
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

WARMUP = 2
BETA = 0.1
EPSILON = 0.01
LR = 1e-5
MODEL_SEED = 1234
DATA_SEED = 7
ATTN_IMPLEMENTATION = "sdpa"


class Workload:
    """A bench workload: the model and the batch shape (as `Workload::named` in bench.rs)."""

    def __init__(self, name, lora):
        self.name = name
        self.lora = lora
        if name == "gpt2":
            self.pairs, self.prompt, self.response, self.vocab = 8, 32, 64, 4096
            self.lora_targets = ["c_attn", "c_proj", "c_fc"]
        elif name == "smollm2":
            self.pairs, self.prompt, self.response, self.vocab = 4, 64, 64, 49152
            self.lora_targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                 "down_proj"]
        else:
            raise SystemExit(f"--workload: `{name}` is not one of gpt2, smollm2")
        self.eos = self.vocab - 1

    def config(self):
        if self.name == "gpt2":
            return transformers.GPT2Config(
                vocab_size=self.vocab, n_positions=256, n_embd=256, n_layer=4, n_head=4,
                resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=self.eos,
                eos_token_id=self.eos, attn_implementation=ATTN_IMPLEMENTATION)
        return transformers.LlamaConfig(
            vocab_size=self.vocab, hidden_size=576, intermediate_size=1536,
            num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
            rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True,
            max_position_embeddings=8192, bos_token_id=1, eos_token_id=self.eos,
            attention_dropout=0.0, attn_implementation=ATTN_IMPLEMENTATION)


def log(message):
    print(message, file=sys.stderr, flush=True)


def peak_rss_mib():
    """Peak resident set size of this process (ru_maxrss is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ---------------------------------------------------------------------------------------------
# Workload


def random_pairs(work, seed=DATA_SEED, count=None):
    """The pairs of `edpo bench`: the project's generator (SplitMix64), drawn in the same order."""
    state = seed
    mask = 2**64 - 1

    def next_id():
        nonlocal state
        state = (state + 0x9E3779B97F4A7C15) & mask
        z = state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
        return (z ^ (z >> 31)) % (work.vocab - 1)

    def response():
        return [next_id() for _ in range(work.response - 1)] + [work.eos]

    pairs = []
    for _ in range(work.pairs if count is None else count):
        prompt = [next_id() for _ in range(work.prompt)]
        chosen = response()
        rejected = response()
        pairs.append((prompt, chosen, rejected))
    return pairs


def pair_batch(pairs):
    """Input ids `(2·pairs, prompt + response)`: every pair's chosen sequence, then the rejected ones."""
    rows = [p + c for p, c, _ in pairs] + [p + r for p, _, r in pairs]
    return torch.tensor(rows, dtype=torch.long)


def make_models(work):
    """A seeded random policy and its reference: a frozen copy, or with LoRA the base itself
    (the reference forward then runs with the adapters disabled)."""
    torch.manual_seed(MODEL_SEED)
    model = transformers.AutoModelForCausalLM.from_config(work.config()).to(torch.float32)
    assert model.config._attn_implementation == ATTN_IMPLEMENTATION
    if work.lora is None:
        model.train()
        reference = copy.deepcopy(model).eval()
        reference.requires_grad_(False)
        return model, reference
    import peft

    config = peft.LoraConfig(r=work.lora, lora_alpha=2 * work.lora, lora_dropout=0.0,
                             target_modules=work.lora_targets, bias="none",
                             fan_in_fan_out=work.name == "gpt2")
    policy = peft.get_peft_model(model, config)
    policy.train()
    return policy, None


@contextlib.contextmanager
def reference_mode(policy, reference):
    """The reference model to run under `torch.no_grad()`: the copy, or the base with the
    adapters disabled."""
    with torch.no_grad():
        if reference is not None:
            yield reference
        else:
            with policy.disable_adapter():
                yield policy


def setup_threads(threads):
    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # only allowed before any inter-op work has started
        log("note: could not set the inter-op thread count")


def versions():
    import peft

    return {"torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__}


# ---------------------------------------------------------------------------------------------
# Shared pieces of the loops


def sequence_logps(logits, targets):
    """Σ over response tokens of log_softmax(logits)[token], per sequence; `(S, R, V)`."""
    token_logps = logits.log_softmax(-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return token_logps.sum(-1)


def epsilon_steps(ratio, policy_logits, reference_logits, h):
    """ε-DPO's per-pair step (+1, −1 or 0) from the perturbed log-ratios h⁺ and h⁻;
    `ratio(logits)` is the chosen-minus-rejected log-prob of logits laid out as the loop's."""
    h_plus = ratio((1 + EPSILON) * policy_logits - EPSILON * reference_logits)
    h_minus = ratio((1 - EPSILON) * policy_logits + EPSILON * reference_logits)
    up = (h_plus > h) & (h > h_minus)
    down = (h_minus > h) & (h > h_plus)
    return up.to(h.dtype) - down.to(h.dtype)


def dpo_update(optimizer, lw, ll, rw, rl, h_steps, beta, epsilon):
    """The DPO (or ε-DPO) loss, backward and AdamW step; returns the mean ε-DPO step."""
    if epsilon is None:
        betas = torch.full_like(lw, beta)
        steps = torch.zeros_like(lw)
    else:
        with torch.no_grad():
            steps = h_steps()
            betas = beta / (1 + epsilon * steps)
    loss = -F.logsigmoid(betas * ((lw - rw) - (ll - rl))).mean()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return steps.mean().item()


def timed(work, step_fn, steps, epsilon):
    """pairs/s of `step_fn(beta) -> mean step` after the warm-up, β moved as edpo moves it, and
    each timed step's wall time in seconds (a mean over few steps hides one slow step among
    fast ones; the records keep the steps so a reader can tell)."""
    beta = BETA

    def step():
        nonlocal beta
        mean_step = step_fn(beta)
        if epsilon is not None:
            # ε-DPO moves the base β after each optimizer step, as edpo's trainer does.
            beta /= 1 + epsilon * mean_step

    for _ in range(WARMUP):
        step()
    start = time.perf_counter()
    seconds = []
    for _ in range(steps):
        begun = time.perf_counter()
        step()
        seconds.append(time.perf_counter() - begun)
    return work.pairs * steps / (time.perf_counter() - start), seconds


def trainable(policy):
    return [p for p in policy.parameters() if p.requires_grad]


# ---------------------------------------------------------------------------------------------
# Bare PyTorch loop


def measure_bare(work, steps, epsilon=None):
    policy, reference = make_models(work)
    optimizer = torch.optim.AdamW(trainable(policy), lr=LR, weight_decay=0.0)
    ids = pair_batch(random_pairs(work))
    targets = ids[:, work.prompt:]

    def logits_of(model):
        return model(input_ids=ids, use_cache=False).logits[:, work.prompt - 1: -1]

    def ratio(logits):
        chosen, rejected = sequence_logps(logits, targets).chunk(2)
        return chosen - rejected

    def step(beta):
        policy_logits = logits_of(policy)
        with reference_mode(policy, reference) as ref:
            reference_logits = logits_of(ref)
            rw, rl = sequence_logps(reference_logits, targets).chunk(2)
        lw, ll = sequence_logps(policy_logits, targets).chunk(2)
        return dpo_update(
            optimizer, lw, ll, rw, rl,
            lambda: epsilon_steps(ratio, policy_logits, reference_logits, lw - ll),
            beta, epsilon)

    return timed(work, step, steps, epsilon)


def run_bare(work, steps):
    log(f"bare loop, DPO: {WARMUP} + {steps} steps")
    dpo, dpo_steps = measure_bare(work, steps)
    log(f"bare loop, ε-DPO: {WARMUP} + {steps} steps")
    eps, eps_steps = measure_bare(work, steps, epsilon=EPSILON)
    return {
        "bare_dpo_pairs_per_s": dpo,
        "bare_epsilon_dpo_pairs_per_s": eps,
        "bare_dpo_step_seconds": dpo_steps,
        "bare_epsilon_dpo_step_seconds": eps_steps,
        "bare_epsilon_over_dpo": eps / dpo,
        "bare_peak_rss_mib": peak_rss_mib(),
        "attn_implementation": ATTN_IMPLEMENTATION,
        **versions(),
    }


# ---------------------------------------------------------------------------------------------
# Same-FLOPs loop: one row per pair, tree mask, the LM head at response positions only


def tree_layout(work):
    """Positions `(T,)`, the boolean attention mask `(T, T)` (True: may attend), and for each
    response token (chosen then rejected) the index of the position that predicts it."""
    p, r = work.prompt, work.response
    t = p + 2 * r
    branch = torch.tensor([0] * p + [1] * r + [2] * r)
    positions = torch.cat([torch.arange(p + r), torch.arange(p, p + r)])
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    same = (branch[None, :] == 0) | (branch[None, :] == branch[:, None])
    predictors = [p + k - 1 for k in range(r)] + [p - 1] + [p + r + k - 1 for k in range(1, r)]
    return positions, causal & same, torch.tensor(predictors)


def base_model(policy):
    """The `transformers` model under a PEFT wrapper (its adapted modules still in place)."""
    return policy.get_base_model() if hasattr(policy, "get_base_model") else policy


def rotate_half(x):
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


def hidden_states(model, ids, positions, mask):
    """Final hidden states `(B, T, d)` of a GPT-2 or Llama `transformers` model run through its
    own modules (LoRA-wrapped ones included), with explicit positions and a boolean mask."""
    cfg = model.config
    if cfg.model_type == "gpt2":
        t = model.transformer
        x = t.wte(ids) + t.wpe(positions)[None]
        nh = cfg.n_head
        for block in t.h:
            b, s, d = x.shape
            q, k, v = block.attn.c_attn(block.ln_1(x)).split(d, dim=-1)
            q, k, v = (u.view(b, s, nh, d // nh).transpose(1, 2) for u in (q, k, v))
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            x = x + block.attn.c_proj(o.transpose(1, 2).reshape(b, s, d))
            x = x + block.mlp(block.ln_2(x))
        return t.ln_f(x)
    m = model.model
    nh, nkv = cfg.num_attention_heads, cfg.num_key_value_heads
    hd = cfg.hidden_size // nh
    inv_freq = m.rotary_emb.inv_freq.to(torch.float32)  # the model's own rotary frequencies
    angles = positions.to(torch.float32)[:, None] * inv_freq[None]
    angles = torch.cat((angles, angles), dim=-1)
    cos, sin = angles.cos(), angles.sin()
    x = m.embed_tokens(ids)
    for layer in m.layers:
        a = layer.self_attn
        h = layer.input_layernorm(x)
        b, s, _ = h.shape
        q = a.q_proj(h).view(b, s, nh, hd).transpose(1, 2)
        k = a.k_proj(h).view(b, s, nkv, hd).transpose(1, 2)
        v = a.v_proj(h).view(b, s, nkv, hd).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        x = x + a.o_proj(o.transpose(1, 2).reshape(b, s, nh * hd))
        x = x + layer.mlp(layer.post_attention_layernorm(x))
    return m.norm(x)


def head_weight(model):
    return model.get_output_embeddings().weight


def check_same_flops(work, policy, samef_logits, ids_tree):
    """The tree layout's log-probs equal the `transformers` forward on separate sequences."""
    pairs = random_pairs(work)
    ids = pair_batch(pairs)
    with torch.no_grad():
        separate = sequence_logps(
            policy(input_ids=ids, use_cache=False).logits[:, work.prompt - 1: -1],
            ids[:, work.prompt:])
        logits, targets = samef_logits(policy, ids_tree)
        ours = torch.cat([logits_pairs_sum(logits, targets, work, 0),
                          logits_pairs_sum(logits, targets, work, 1)])
    gap = (ours - separate).abs().max().item()
    if gap > 1e-3 * max(1.0, separate.abs().max().item()):
        raise SystemExit(f"same-FLOPs loop: log-probs differ from transformers' by {gap}")
    return gap


def logits_pairs_sum(logits, targets, work, which):
    """Σ log-probs of the chosen (`which` 0) or rejected (1) responses, per pair."""
    r = work.response
    lp = logits.log_softmax(-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return lp[:, which * r:(which + 1) * r].sum(-1)


def measure_same_flops(work, steps, epsilon=None, compiled=False):
    policy, reference = make_models(work)
    optimizer = torch.optim.AdamW(trainable(policy), lr=LR, weight_decay=0.0)
    pairs = random_pairs(work)
    ids = torch.tensor([p + c + r for p, c, r in pairs], dtype=torch.long)
    positions, mask, predictors = tree_layout(work)
    targets = torch.tensor([c + r for _, c, r in pairs], dtype=torch.long)  # (B, 2R)
    body = torch.compile(hidden_states, dynamic=False) if compiled else hidden_states

    def samef_logits(model, ids):
        h = body(base_model(model), ids, positions, mask)[:, predictors]  # (B, 2R, d)
        return h @ head_weight(base_model(model)).t(), targets

    gap = check_same_flops(work, policy, samef_logits, ids)

    def ratio(logits):
        return (logits_pairs_sum(logits, targets, work, 0)
                - logits_pairs_sum(logits, targets, work, 1))

    def step(beta):
        policy_logits, _ = samef_logits(policy, ids)
        with reference_mode(policy, reference) as ref:
            reference_logits, _ = samef_logits(ref, ids)
            rw = logits_pairs_sum(reference_logits, targets, work, 0)
            rl = logits_pairs_sum(reference_logits, targets, work, 1)
        lw = logits_pairs_sum(policy_logits, targets, work, 0)
        ll = logits_pairs_sum(policy_logits, targets, work, 1)
        return dpo_update(
            optimizer, lw, ll, rw, rl,
            lambda: epsilon_steps(ratio, policy_logits, reference_logits, lw - ll),
            beta, epsilon)

    return timed(work, step, steps, epsilon), gap


def run_same_flops(work, steps, compiled):
    name = "samef_compiled" if compiled else "samef"
    log(f"same-FLOPs loop{' (compiled)' if compiled else ''}, DPO: {WARMUP} + {steps} steps")
    (dpo, dpo_steps), gap = measure_same_flops(work, steps, compiled=compiled)
    log(f"same-FLOPs loop{' (compiled)' if compiled else ''}, ε-DPO: {WARMUP} + {steps} steps")
    (eps, eps_steps), _ = measure_same_flops(work, steps, epsilon=EPSILON, compiled=compiled)
    return {
        f"{name}_dpo_pairs_per_s": dpo,
        f"{name}_epsilon_dpo_pairs_per_s": eps,
        f"{name}_dpo_step_seconds": dpo_steps,
        f"{name}_epsilon_dpo_step_seconds": eps_steps,
        f"{name}_epsilon_over_dpo": eps / dpo,
        f"{name}_peak_rss_mib": peak_rss_mib(),
        f"{name}_logp_gap_to_transformers": gap,
        **versions(),
    }


# ---------------------------------------------------------------------------------------------
# TRL


def word_level_tokenizer(work):
    """Token "t<i>" is id i; no special tokens are added, EOS is the last id."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"t{i}": i for i in range(work.vocab)}
    tokenizer = Tokenizer(models.WordLevel(vocab))  # no unknown token: a stray word is an error
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer,
                                                eos_token=f"t{work.eos}")


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
            raise SystemExit(f"TRL tokenised a pair differently (lengths {lengths})")


class StepTimes(transformers.TrainerCallback):
    """time.perf_counter() at the end of each optimizer step, by global step."""

    def __init__(self):
        self.times = {}

    def on_step_end(self, args, state, control, **kwargs):
        self.times[state.global_step] = time.perf_counter()


def run_trl(work, steps, threads):
    import trl

    total = WARMUP + steps
    pairs = random_pairs(work)
    torch.manual_seed(MODEL_SEED)
    model = transformers.AutoModelForCausalLM.from_config(work.config()).to(torch.float32)
    if work.lora is None:
        reference, peft_config = copy.deepcopy(model).eval(), None
    else:
        import peft

        reference = None  # TRL runs the reference with the adapters disabled
        peft_config = peft.LoraConfig(r=work.lora, lora_alpha=2 * work.lora, lora_dropout=0.0,
                                      target_modules=work.lora_targets, bias="none",
                                      fan_in_fan_out=work.name == "gpt2", task_type="CAUSAL_LM")
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
            per_device_train_batch_size=work.pairs,
            gradient_accumulation_steps=1,
            max_steps=total,
            train_sampling_strategy="sequential",  # every batch is the same pairs, in order
            precompute_ref_log_probs=False,
            max_length=work.prompt + work.response,
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
                model=model,
                ref_model=reference,
                args=config,
                train_dataset=preference_dataset(pairs, repeats=total),
                processing_class=word_level_tokenizer(work),
                callbacks=[timer],
                peft_config=peft_config,
            )
            check_tokenisation(trainer.train_dataset, pairs)
            log(f"TRL DPOTrainer: {WARMUP} + {steps} steps")
            trainer.train()
    if torch.get_num_threads() != threads:
        log(f"warning: torch now uses {torch.get_num_threads()} threads, not {threads}")
    seconds = timer.times[total] - timer.times[WARMUP]
    return {
        "trl_dpo_pairs_per_s": work.pairs * steps / seconds,
        "trl_dpo_step_seconds": [timer.times[s + 1] - timer.times[s]
                                 for s in range(WARMUP, total)],
        "trl_peak_rss_mib": peak_rss_mib(),
        "trl_optim": getattr(config.optim, "value", config.optim),
        "trl": trl.__version__,
    }


# ---------------------------------------------------------------------------------------------
# Sampling


def run_sampling(work, steps):
    """`generate` tokens/s: 8 prompts of the workload's prompt length (the prompts of
    `edpo bench`'s sampling measurement), 64 new tokens each at temperature 1 (no top-k or
    top-p), the key/value cache on; the better of two runs, as `edpo bench` reports."""
    torch.manual_seed(MODEL_SEED)
    model = transformers.AutoModelForCausalLM.from_config(work.config()).to(torch.float32).eval()
    prompts = torch.tensor([p for p, _, _ in random_pairs(work, seed=100, count=8)])
    best = 0.0
    for _ in range(2):
        start = time.perf_counter()
        with torch.no_grad():
            out = model.generate(prompts, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                                 max_new_tokens=64, use_cache=True, pad_token_id=work.eos,
                                 eos_token_id=work.eos)
        seconds = time.perf_counter() - start
        new = out[:, prompts.shape[1]:]
        # Tokens up to and including each row's first EOS (rows stop there).
        ends = [(row == work.eos).nonzero() for row in new]
        tokens = sum(int(e[0]) + 1 if len(e) else new.shape[1] for e in ends)
        best = max(best, tokens / seconds)
    return {"generate_tokens_per_s": best, **versions()}


# ---------------------------------------------------------------------------------------------
# Entry point

MEASUREMENTS = ["bare", "samef", "samef-compiled", "trl", "sampling"]


def run_child(which, args):
    """Runs `--only which` in a fresh process and returns its JSON object (None on failure)."""
    command = [sys.executable, os.path.abspath(__file__), "--only", which,
               "--threads", str(args.threads), "--steps", str(args.steps),
               "--workload", args.workload]
    if args.lora is not None:
        command += ["--lora", str(args.lora)]
    result = subprocess.run(command, stdout=subprocess.PIPE, text=True)
    if result.returncode != 0:
        log(f"the {which} run failed (exit status {result.returncode})")
        return {f"{which}_failed": result.returncode}
    return json.loads(result.stdout.strip().splitlines()[-1])


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0], allow_abbrev=False)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps (default 20)")
    parser.add_argument("--workload", choices=["gpt2", "smollm2"], default="gpt2")
    parser.add_argument("--lora", type=int, help="train LoRA adapters of this rank")
    parser.add_argument("--only", choices=MEASUREMENTS,
                        help="run one measurement in this process (default: every one, each in a "
                             "child; sampling with --workload smollm2 only)")
    args = parser.parse_args()
    if args.threads < 1 or args.steps < 1:
        parser.error("--threads and --steps must be at least 1")
    return args


def main():
    args = parse_args()
    work = Workload(args.workload, args.lora)
    out = {"threads": args.threads, "steps": args.steps, "workload": args.workload,
           "lora_rank": args.lora}
    if args.only is None:
        for which in MEASUREMENTS:
            if which == "sampling" and (args.workload != "smollm2" or args.lora is not None):
                continue
            out.update(run_child(which, args))
    else:
        setup_threads(args.threads)
        if args.only == "bare":
            out.update(run_bare(work, args.steps))
        elif args.only == "samef":
            out.update(run_same_flops(work, args.steps, compiled=False))
        elif args.only == "samef-compiled":
            out.update(run_same_flops(work, args.steps, compiled=True))
        elif args.only == "trl":
            out.update(run_trl(work, args.steps, args.threads))
        else:
            out.update(run_sampling(work, args.steps))
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
