"""Golden reference values for edpo's tests, computed with PyTorch + transformers.

Makes tiny random-initialised checkpoints of the GPT-2 and Llama families (Llama with
grouped-query attention and an untied head, Qwen2 with q/k/v biases and a tied head), a tiny
byte-level BPE tokenizer and a handful of preference pairs, then records what the reference
implementation computes for them:

- per-pair sequence log-probs of policy and reference (prompt and response tokenised
  separately, EOS appended to the response and counted);
- the DPO loss and the gradient norm of the DPO loss over all policy parameters;
- ε-DPO's three log-ratios, per-pair steps, β_i, loss and next base β for a small and a large ε;
- a 10-step training trace of DPO and of ε-DPO (AdamW, clipping, warm-up + cosine, two
  micro-batches per optimizer step) on the same data;
- that a checkpoint written by `edpo convert` loads in transformers with identical logits.

Regenerate (from the repository root; needs `pip install torch transformers safetensors`):

    python3 tools/make_golden.py

It rewrites testdata/golden/ and prints a summary. The package versions used are recorded in
testdata/golden/versions.json.
"""

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import safetensors
import tokenizers
import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers, decoders, trainers

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "testdata" / "golden"
EOS = "<|endoftext|>"
BETA = 0.1
EPSILON_SMALL = 0.01
# The large ε is the first of these that makes some step 0 (non-monotone) for the family.
EPSILON_LARGE_CANDIDATES = [0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99]
TRACE = dict(lr=2e-3, weight_decay=0.01, betas=(0.9, 0.999), eps=1e-8, max_grad_norm=1.0,
             warmup_steps=2, total_steps=10, micro_batches=2)

CORPUS = [
    "the film is a quiet triumph of acting and mood",
    "a dull, overlong mess with nothing to say",
    "funny, warm and surprisingly moving",
    "the plot never comes together and the jokes fall flat",
    "one of the best performances of the year",
    "i wanted to like it, but it is simply boring",
    "a bold and beautiful piece of work",
    "predictable from start to finish",
]

PAIRS = [
    {"prompt": "the film is", "chosen": " a quiet triumph", "rejected": " a dull mess"},
    {"prompt": "i wanted to", "chosen": " like it and i did", "rejected": " leave after ten minutes"},
    {"prompt": "one of the best", "chosen": " performances of the year", "rejected": " naps i have had"},
    {"prompt": "a bold", "chosen": " and beautiful piece of work", "rejected": " mistake"},
    {"prompt": "the jokes", "chosen": " land every time", "rejected": " fall flat"},
    {"prompt": "predictable", "chosen": " but warm and funny", "rejected": " from start to finish, and boring"},
    {"prompt": "a dull", "chosen": ", quiet film", "rejected": ", overlong mess"},
    {"prompt": "the acting", "chosen": " is superb", "rejected": " is wooden"},
    {"prompt": "funny", "chosen": ", warm and moving", "rejected": " only by accident"},
    {"prompt": "nothing", "chosen": " is wasted here", "rejected": " to say"},
    {"prompt": "simply", "chosen": " wonderful", "rejected": " boring"},
    {"prompt": "the year's", "chosen": " best surprise", "rejected": " worst film"},
]
# Pairs that differ in one word: their log-ratios move little with λ, which is where
# ε-DPO's non-monotone (step 0) cases live.
PAIRS += [{"prompt": p, "chosen": c, "rejected": r}
          for p in ["the film is", "simply", "a bold"]
          for c, r in [(" good", " bad"), (" warm", " dull"), (" the best", " the worst"), (" funny", " flat")]]


def make_tokenizer():
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=[EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(CORPUS * 4, trainer)
    return tok


def configs(vocab, eos):
    common = dict(vocab_size=vocab, eos_token_id=eos, bos_token_id=eos)
    return {
        "gpt2": transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **common),
        "llama": transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2,
                                          max_position_embeddings=64, rope_theta=500.0,
                                          tie_word_embeddings=False, rms_norm_eps=1e-5, **common),
        "qwen2": transformers.Qwen2Config(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=1,
                                          max_position_embeddings=64, rope_theta=10000.0,
                                          tie_word_embeddings=True, rms_norm_eps=1e-6, **common),
    }


def tokenize(tok, eos):
    rows = []
    for p in PAIRS:
        enc = lambda s: tok.encode(s, add_special_tokens=False).ids
        rows.append((enc(p["prompt"]), enc(p["chosen"]) + [eos], enc(p["rejected"]) + [eos]))
    return rows


def batch(rows):
    """Chosen sequences of every pair, then rejected ones, right-padded."""
    seqs = [(p, c) for p, c, _ in rows] + [(p, r) for p, _, r in rows]
    T = max(len(p) + len(r) for p, r in seqs)
    ids = torch.zeros(len(seqs), T, dtype=torch.long)
    attn = torch.zeros(len(seqs), T, dtype=torch.long)
    loss_mask = torch.zeros(len(seqs), T - 1, dtype=torch.bool)
    for b, (p, r) in enumerate(seqs):
        ids[b, : len(p) + len(r)] = torch.tensor(p + r)
        attn[b, : len(p) + len(r)] = 1
        loss_mask[b, len(p) - 1 : len(p) + len(r) - 1] = True
    return ids, attn, loss_mask


def response_logits(model, ids, attn):
    return model(input_ids=ids, attention_mask=attn).logits[:, :-1, :].float()


def seq_logps(logits, ids, loss_mask):
    lp = logits.log_softmax(-1).gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    return (lp * loss_mask).sum(-1)


def pair_terms(policy, reference, rows, epsilon=None):
    ids, attn, mask = batch(rows)
    n = len(rows)
    pl = response_logits(policy, ids, attn)
    with torch.no_grad():
        rl = response_logits(reference, ids, attn)
    lp = seq_logps(pl, ids, mask)
    rp = seq_logps(rl, ids, mask)
    out = dict(lw=lp[:n], ll=lp[n:], rw=rp[:n], rl=rp[n:])
    if epsilon is not None:
        with torch.no_grad():
            h = lambda s: (s[:n] - s[n:])
            out["h"] = h(seq_logps(pl.detach(), ids, mask))
            out["h_plus"] = h(seq_logps((1 + epsilon) * pl.detach() - epsilon * rl, ids, mask))
            out["h_minus"] = h(seq_logps((1 - epsilon) * pl.detach() + epsilon * rl, ids, mask))
    return out


def eps_steps(t):
    up = (t["h_plus"] > t["h"]) & (t["h"] > t["h_minus"])
    down = (t["h_minus"] > t["h"]) & (t["h"] > t["h_plus"])
    return up.long() - down.long()


def dpo_loss(t, betas):
    delta = (t["lw"] - t["rw"]) - (t["ll"] - t["rl"])
    return -torch.nn.functional.logsigmoid(betas * delta).mean()


def decay_groups(model):
    seen, decay, no_decay = set(), [], []
    for name, p in model.named_parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        (decay if p.dim() >= 2 else no_decay).append(p)
    return [dict(params=decay, weight_decay=TRACE["weight_decay"]), dict(params=no_decay, weight_decay=0.0)]


def trace(family_dir, rows, epsilon):
    policy = transformers.AutoModelForCausalLM.from_pretrained(family_dir / "policy", attn_implementation="eager").eval()
    reference = transformers.AutoModelForCausalLM.from_pretrained(family_dir / "reference", attn_implementation="eager").eval()
    opt = torch.optim.AdamW(decay_groups(policy), lr=TRACE["lr"], betas=TRACE["betas"], eps=TRACE["eps"])
    sched = transformers.get_cosine_schedule_with_warmup(opt, TRACE["warmup_steps"], TRACE["total_steps"])
    k = TRACE["micro_batches"]
    size = len(rows) // k
    micro = [rows[i * size:(i + 1) * size] for i in range(k)]
    beta = BETA
    steps_out = []
    for step in range(TRACE["total_steps"]):
        opt.zero_grad()
        total, step_sum, n_pairs = 0.0, 0, 0
        lr = opt.param_groups[0]["lr"]
        for mb in micro:
            t = pair_terms(policy, reference, mb, epsilon)
            if epsilon is None:
                betas = torch.full((len(mb),), beta)
            else:
                s = eps_steps(t)
                step_sum += int(s.sum())
                n_pairs += len(mb)
                betas = beta / (1 + epsilon * s.double()).float()
            loss = dpo_loss(t, betas) / k
            loss.backward()
            total += float(loss)
        norm = float(torch.nn.utils.clip_grad_norm_(policy.parameters(), TRACE["max_grad_norm"]))
        opt.step()
        sched.step()
        before = beta
        if epsilon is not None:
            beta = beta / (1 + epsilon * (step_sum / n_pairs))
        steps_out.append(dict(step=step, lr=lr, loss=total, grad_norm=norm, beta=before, next_beta=beta))
    return steps_out


def write_model(model, tok_path, d):
    model.save_pretrained(d, safe_serialization=True)
    shutil.copy(tok_path, d / "tokenizer.json")


def main():
    torch.manual_seed(0)
    if OUT.exists():
        shutil.rmtree(OUT)
    OUT.mkdir(parents=True)
    tok = make_tokenizer()
    tok_path = OUT / "tokenizer.json"
    tok.save(str(tok_path))
    eos = tok.token_to_id(EOS)
    vocab = tok.get_vocab_size()
    rows = tokenize(tok, eos)
    with open(OUT / "pairs.jsonl", "w") as f:
        for p in PAIRS:
            f.write(json.dumps(p) + "\n")
    versions = dict(python=sys.version.split()[0], torch=torch.__version__,
                    transformers=transformers.__version__, tokenizers=tokenizers.__version__,
                    safetensors=safetensors.__version__)
    (OUT / "versions.json").write_text(json.dumps(versions, indent=2) + "\n")
    for family, cfg in configs(vocab, eos).items():
        d = OUT / family
        torch.manual_seed({"gpt2": 1, "llama": 2, "qwen2": 3}[family])
        reference = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
        # Random init is tiny; scale weights up so the models say something and differ.
        with torch.no_grad():
            for p in reference.parameters():
                if p.dim() >= 2:
                    p.mul_(8.0)
                else:
                    p.add_(0.1 * torch.randn_like(p))
            # Peakier next-token distributions make h(λ) curved enough for non-monotone steps.
            reference.get_input_embeddings().weight.mul_(3.0)
        write_model(reference, tok_path, d / "reference")
        policy = transformers.AutoModelForCausalLM.from_pretrained(d / "reference", attn_implementation="eager").eval()
        with torch.no_grad():
            for p in policy.parameters():
                p.add_(0.1 * torch.randn_like(p) * (p.abs().mean() + 0.02))
        write_model(policy, tok_path, d / "policy")
        policy = transformers.AutoModelForCausalLM.from_pretrained(d / "policy", attn_implementation="eager").eval()
        reference = transformers.AutoModelForCausalLM.from_pretrained(d / "reference", attn_implementation="eager").eval()

        golden = dict(family=family, beta=BETA, pairs=[], epsilon={})
        t = pair_terms(policy, reference, rows)
        loss = dpo_loss(t, torch.full((len(rows),), BETA))
        policy.zero_grad()
        loss.backward()
        grad_norm = math.sqrt(sum(float((p.grad.double() ** 2).sum()) for p in policy.parameters() if p.grad is not None))
        golden["dpo_loss"] = float(loss.detach())
        golden["dpo_grad_norm"] = grad_norm
        for i, (p, c, r) in enumerate(rows):
            golden["pairs"].append(dict(prompt_ids=p, chosen_ids=c, rejected_ids=r,
                                        chosen_logp=float(t["lw"][i]), rejected_logp=float(t["ll"][i]),
                                        ref_chosen_logp=float(t["rw"][i]), ref_rejected_logp=float(t["rl"][i])))
        large = next((e for e in EPSILON_LARGE_CANDIDATES
                      if (eps_steps(pair_terms(policy, reference, rows, e)) == 0).any()), None)
        assert large is not None, f"{family}: no candidate ε gives a zero step"
        for name, eps in {"small": EPSILON_SMALL, "large": large}.items():
            te = pair_terms(policy, reference, rows, eps)
            s = eps_steps(te)
            betas = BETA / (1 + eps * s.double())
            delta = ((te["lw"] - te["rw"]) - (te["ll"] - te["rl"])).double()
            eloss = float(-torch.nn.functional.logsigmoid(betas * delta.detach()).mean())
            margins = torch.minimum((te["h_plus"] - te["h"]).abs(), (te["h"] - te["h_minus"]).abs())
            golden["epsilon"][name] = dict(
                epsilon=eps, steps=[int(x) for x in s], beta_i=[float(b) for b in betas],
                h=[float(x) for x in te["h"]], h_plus=[float(x) for x in te["h_plus"]],
                h_minus=[float(x) for x in te["h_minus"]], loss=eloss,
                next_beta=BETA / (1 + eps * float(s.double().mean())),
                min_decision_margin=float(margins.min()))
        golden["trace"] = dict(settings=TRACE, dpo=trace(d, rows, None),
                               epsilon_dpo=dict(epsilon=EPSILON_SMALL, steps=trace(d, rows, EPSILON_SMALL)))
        (d / "golden.json").write_text(json.dumps(golden, indent=1) + "\n")
        print(family, "dpo_loss", golden["dpo_loss"], "grad_norm", grad_norm,
              {k: (v["steps"], round(v["min_decision_margin"], 6)) for k, v in golden["epsilon"].items()})
    roundtrip()


def roundtrip():
    """edpo convert → transformers: the saved checkpoint must load unchanged."""
    exe = ["cargo", "run", "--quiet", "-p", "edpo", "--", "convert"]
    ids = torch.tensor([[3, 10, 50, 7, 99, 5, 1, 2]])
    result = {}
    for family in ["gpt2", "llama", "qwen2"]:
        src = OUT / family / "policy"
        dst = OUT / "roundtrip-tmp" / family
        subprocess.run(exe + ["--model", str(src), "--out", str(dst)], check=True, cwd=ROOT)
        a = transformers.AutoModelForCausalLM.from_pretrained(src).eval()
        b = transformers.AutoModelForCausalLM.from_pretrained(dst).eval()
        with torch.no_grad():
            diff = float((a(ids).logits - b(ids).logits).abs().max())
        result[family] = dict(loaded=True, max_abs_logit_diff=diff)
    shutil.rmtree(OUT / "roundtrip-tmp")
    (OUT / "roundtrip.json").write_text(json.dumps(result, indent=2) + "\n")
    print("roundtrip", result)


if __name__ == "__main__":
    main()
