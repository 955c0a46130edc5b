"""TDPO reference values on the committed tiny checkpoints of testdata/golden/ (PyTorch +
transformers), for edpo-train's golden test `tdpo_matches_pytorch`.

For each family (gpt2, llama, qwen2) it loads `policy/` and `reference/`, scores the pairs of
its golden.json with the chosen sequences then the rejected ones (tools/make_golden.py's
layout), and computes TDPO as the official code does (github.com/Vance0124/Token-level-Direct-
Preference-Optimization, trainers.py: `_tdpo_get_batch_logps` and `tdpo_loss`):

- per position, the full-vocabulary KL(π_ref ‖ π_θ) = Σ_v p_ref(v)·(log p_ref(v) − log π_θ(v)),
  summed over the response's positions (the sequential KL K of each response);
- TDPO1: −logσ(β·((u_w − u_l) − (K_l − K_w))), TDPO2: −logσ(β·((u_w − u_l) − α·(K_l − sg(K_w)))),
  u = log π_θ − log π_ref summed over the response;

and records per pair K_w and K_l, the batch loss (mean over pairs) and the norm of its gradient
with respect to the policy's parameters. Regenerate (needs `pip install torch transformers`):

    python3 tools/make_tdpo_golden.py
"""

import json
import math
import sys
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_golden import BETA, OUT, batch, response_logits  # noqa: E402

SETTINGS = [("tdpo1", dict(beta=BETA)), ("tdpo2", dict(beta=BETA, alpha=0.5))]


def tdpo_terms(policy, reference, rows):
    ids, attn, mask = batch(rows)
    n = len(rows)
    logits = response_logits(policy, ids, attn)
    with torch.no_grad():
        ref_logits = response_logits(reference, ids, attn)
    labels = ids[:, 1:]
    vocab_logps = logits.log_softmax(-1)
    ref_ps = ref_logits.softmax(-1)
    ref_logps = ref_ps.log()
    per_position_kl = (ref_ps * (ref_logps - vocab_logps)).sum(-1)
    token_logps = vocab_logps.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    ref_token_logps = ref_logps.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    margin = ((token_logps - ref_token_logps) * mask).sum(-1)
    kl = (per_position_kl * mask).sum(-1)
    return margin[:n], margin[n:], kl[:n], kl[n:]


def tdpo_loss(u_w, u_l, k_w, k_l, beta, alpha=None):
    if alpha is None:
        logits = (u_w - u_l) - (k_l - k_w)
    else:
        logits = (u_w - u_l) - alpha * (k_l - k_w.detach())
    return -torch.nn.functional.logsigmoid(beta * logits).mean()


def main():
    for family in ["gpt2", "llama", "qwen2"]:
        d = OUT / family
        golden = json.loads((d / "golden.json").read_text())
        rows = [(p["prompt_ids"], p["chosen_ids"], p["rejected_ids"]) for p in golden["pairs"]]
        load = lambda name: transformers.AutoModelForCausalLM.from_pretrained(
            d / name, attn_implementation="eager").eval()
        policy, reference = load("policy"), load("reference")
        out = dict(generator="tools/make_tdpo_golden.py", versions=dict(
            torch=torch.__version__, transformers=transformers.__version__), cases=[])
        for method, params in SETTINGS:
            policy.zero_grad()
            u_w, u_l, k_w, k_l = tdpo_terms(policy, reference, rows)
            loss = tdpo_loss(u_w, u_l, k_w, k_l, params["beta"], params.get("alpha"))
            loss.backward()
            norm = math.sqrt(sum(float((p.grad.double() ** 2).sum())
                                 for p in policy.parameters() if p.grad is not None))
            out["cases"].append(dict(method=method, params=params, loss=float(loss.detach()),
                                     grad_norm=norm, kl_w=k_w.detach().tolist(),
                                     kl_l=k_l.detach().tolist()))
            print(family, method, params, "loss", float(loss), "grad_norm", norm,
                  "mean K_w", float(k_w.mean()), "mean K_l", float(k_l.mean()))
        (d / "tdpo.json").write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
