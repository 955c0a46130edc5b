"""Golden reference values for edpo's preference-optimisation objectives (no model involved).

Every objective in docs/spec/baselines.md is evaluated on a few seeded batches of per-pair
numbers: sequence log-probs of the policy and the reference for the chosen and the rejected
response (lw, ll, rw, rl), response lengths in tokens (len_w, len_l), for KTO the
policy-minus-reference log-ratios of mismatched prompt/completion pairs (kl_logratios), for
ODPO the responses' scores (score_w, score_l), and for TDPO each response's sequential KL
Σ_t KL(π_ref ‖ π_θ) over its positions (kl_w, kl_l).
For each method and parameter setting it records, computed in float64 with PyTorch autograd:

- the per-pair losses and the batch loss (their mean);
- the gradients of the batch loss with respect to lw and ll (so they include the 1/N), and for
  TDPO with respect to kl_w and kl_l (grad_kl_w, grad_kl_l);
- the logged statistics: rewards/chosen, rewards/rejected, rewards/margins,
  rewards/accuracies, logps/chosen, logps/rejected, beta/mean (null without a β), and the
  method's own state (KTO's clamped KL estimate "kl").

β-DPO is recorded separately, as runs of two consecutive batches, because its data filter
samples pairs: the sampled ("kept") indices are part of the record, so an implementation
only has to reproduce the deterministic parts (filter weights, β_batch, loss, gradients,
running estimates).

Every gradient is checked against central finite differences before anything is written.

Regenerate (from the repository root; needs `pip install torch numpy`):

    python3 tools/make_objective_golden.py

It rewrites testdata/objectives/golden.json and prints a summary.
"""

import json
import math
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "testdata" / "objectives" / "golden.json"
DTYPE = torch.float64

# ---------------------------------------------------------------------------------------------
# Input batches
# ---------------------------------------------------------------------------------------------

# name, seed, pairs, mean policy-minus-reference shift of the chosen / rejected log-probs,
# mean of the mismatched-pair log-ratios (negative in one batch so KTO's z0 clamps to 0).
BATCH_SPECS = [
    ("typical", 11, 10, 0.8, -0.8, 0.5),
    ("typical_shifted", 12, 8, -0.6, 0.6, 0.8),
    ("negative_kl", 13, 6, 0.3, -0.3, -0.9),
    ("extreme", 14, 8, 0.5, -0.5, 0.3),
]

# Pairs overwritten in the "extreme" batch: (index, lw, ll, rw, rl, len_w, len_l), Δ = ±300.
EXTREME_PAIRS = [
    (2, -30.0, -200.0, -180.0, -50.0, 12, 6),   # Δ = 150 − (−150) = +300
    (5, -190.0, -35.0, -40.0, -185.0, 5, 30),   # Δ = −150 − 150 = −300
]


def make_batch(name, seed, n, shift_w, shift_l, kl_mean):
    rng = np.random.default_rng(seed)
    r3 = lambda x: [round(float(v), 3) for v in x]
    rw = rng.uniform(-80.0, -20.0, n)
    rl = rng.uniform(-80.0, -20.0, n)
    lw = rw + rng.normal(shift_w, 1.5, n)
    ll = rl + rng.normal(shift_l, 1.5, n)
    batch = dict(
        name=name,
        lw=r3(lw), ll=r3(ll), rw=r3(rw), rl=r3(rl),
        len_w=[int(v) for v in rng.integers(3, 41, n)],
        len_l=[int(v) for v in rng.integers(3, 41, n)],
        kl_logratios=r3(rng.normal(kl_mean, 1.0, n)),
    )
    # The responses' scores (ODPO), from a stream of their own so the values above are as they
    # were: s_w − s_l in (0.05, 1.5), so the log offset is negative for some pairs.
    srng = np.random.default_rng(seed + 1000)
    score_w = srng.uniform(0.5, 2.0, n)
    batch["score_w"] = r3(score_w)
    batch["score_l"] = r3(score_w - srng.uniform(0.05, 1.5, n))
    # The responses' sequential KLs (TDPO), from a third stream: non-negative, of the size a
    # response of 3–40 tokens has after some training.
    krng = np.random.default_rng(seed + 2000)
    batch["kl_w"] = r3(krng.uniform(0.05, 12.0, n))
    batch["kl_l"] = r3(krng.uniform(0.05, 12.0, n))
    if name == "extreme":
        for i, lw_i, ll_i, rw_i, rl_i, len_w_i, len_l_i in EXTREME_PAIRS:
            for key, value in zip(["lw", "ll", "rw", "rl", "len_w", "len_l"],
                                  [lw_i, ll_i, rw_i, rl_i, len_w_i, len_l_i]):
                batch[key][i] = value
    return batch


def tensors(batch):
    """The batch as float64 tensors; lw, ll, kl_w and kl_l are fresh leaves that require
    gradients."""
    t = {k: torch.tensor(batch[k], dtype=DTYPE)
         for k in ["lw", "ll", "rw", "rl", "len_w", "len_l", "kl_logratios", "score_w", "score_l",
                   "kl_w", "kl_l"]}
    for k in ["lw", "ll", "kl_w", "kl_l"]:
        t[k].requires_grad_(True)
    return t


def margin(t):
    """Δ = (lw − rw) − (ll − rl)."""
    return (t["lw"] - t["rw"]) - (t["ll"] - t["rl"])


# ---------------------------------------------------------------------------------------------
# Objectives. Each returns (per-pair losses, chosen rewards, rejected rewards, β used or None,
# extra statistics). -logsigmoid(x) is used for −logσ(x) throughout (stable for large |x|).
# ---------------------------------------------------------------------------------------------

REF_REWARDS = "beta*(lw-rw), beta*(ll-rl)"


def reference_rewards(t, beta):
    return beta * (t["lw"] - t["rw"]), beta * (t["ll"] - t["rl"])


# dpo: −logσ(βΔ), plus λ_sft·(−lw/|y_w|) when sft_weight is given
def dpo(t, beta, sft_weight=0.0):
    losses = -F.logsigmoid(beta * margin(t)) + sft_weight * (-t["lw"] / t["len_w"])
    return (losses, *reference_rewards(t, beta), beta, {})


# cdpo: −(1−ℓ)·logσ(βΔ) − ℓ·logσ(−βΔ)
def cdpo(t, beta, label_smoothing):
    x, ls = beta * margin(t), label_smoothing
    losses = -(1 - ls) * F.logsigmoid(x) - ls * F.logsigmoid(-x)
    return (losses, *reference_rewards(t, beta), beta, {})


# rdpo: [−(1−ℓ)·logσ(βΔ) + ℓ·logσ(−βΔ)] / (1−2ℓ)
def rdpo(t, beta, label_smoothing):
    x, ls = beta * margin(t), label_smoothing
    losses = (-(1 - ls) * F.logsigmoid(x) + ls * F.logsigmoid(-x)) / (1 - 2 * ls)
    return (losses, *reference_rewards(t, beta), beta, {})


# ipo: (Δ̄ − 1/(2β))², Δ̄ from token-averaged log-probs (policy and reference) or the plain Δ
def ipo(t, beta, average):
    if average:
        d = (t["lw"] / t["len_w"] - t["rw"] / t["len_w"]) - (t["ll"] / t["len_l"] - t["rl"] / t["len_l"])
    else:
        d = margin(t)
    losses = (d - 1 / (2 * beta)) ** 2
    return (losses, *reference_rewards(t, beta), beta, {})


# hinge: max(0, 1 − βΔ)
def hinge(t, beta):
    losses = torch.relu(1 - beta * margin(t))
    return (losses, *reference_rewards(t, beta), beta, {})


# slic: max(0, δ − lw + ll) − λ·lw
def slic(t, delta, lam):
    losses = torch.relu(delta - t["lw"] + t["ll"]) - lam * t["lw"]
    return (losses, t["lw"], t["ll"], None, {})


# simpo: −logσ(β·lw/|y_w| − β·ll/|y_l| − γ), γ = γ_ratio·β
def simpo(t, beta, gamma_ratio):
    cw, cl = beta * t["lw"] / t["len_w"], beta * t["ll"] / t["len_l"]
    losses = -F.logsigmoid(cw - cl - gamma_ratio * beta)
    return (losses, cw, cl, beta, {})


# rdpo_len: −logσ(βΔ + α·|y_w| − α·|y_l|)
def rdpo_len(t, beta, alpha):
    losses = -F.logsigmoid(beta * margin(t) + alpha * t["len_w"] - alpha * t["len_l"])
    return (losses, *reference_rewards(t, beta), beta, {})


# cpo: −logσ(β·(lw − ll)) − λ·lw
def cpo(t, beta, lam):
    losses = -F.logsigmoid(beta * (t["lw"] - t["ll"])) - lam * t["lw"]
    return (losses, beta * t["lw"], beta * t["ll"], beta, {})


# orpo: −lw/|y_w| − λ·logσ(logodds_w − logodds_l), logodds = p̄ − log1p(−exp(p̄)), p̄ = logπ/|y|
def orpo(t, lam):
    pw, pl = t["lw"] / t["len_w"], t["ll"] / t["len_l"]
    log_odds = lambda p: p - torch.log1p(-torch.exp(p))
    losses = -pw - lam * F.logsigmoid(log_odds(pw) - log_odds(pl))
    return (losses, pw, pl, None, {})


# kto: (w_d·(1 − σ(β·(lw − rw − z0))) + w_u·(1 − σ(β·(z0 − ll + rl))))/2,
#      z0 = max(0, mean(kl_logratios)), detached
def kto(t, beta, desirable_weight, undesirable_weight):
    z0 = t["kl_logratios"].mean().clamp(min=0).detach()
    chosen = 1 - torch.sigmoid(beta * (t["lw"] - t["rw"] - z0))
    rejected = 1 - torch.sigmoid(beta * (z0 - t["ll"] + t["rl"]))
    losses = (desirable_weight * chosen + undesirable_weight * rejected) / 2
    return (losses, *reference_rewards(t, beta), beta, {"kl": z0.item()})


# --- The related objectives (issue: the wider family) ------------------------------------------

# odpo (ODPO, arXiv 2402.10571; rycolab/odpo trainers.py preference_loss):
#   −logσ(βΔ − Δ_r), Δ_r = α·log(s_w − s_l) (log_offset) or α·(s_w − s_l)
def odpo(t, beta, alpha, log_offset):
    gap = t["score_w"] - t["score_l"]
    offset = alpha * (torch.log(gap) if log_offset else gap)
    losses = -F.logsigmoid(beta * margin(t) - offset)
    return (losses, *reference_rewards(t, beta), beta, {})


# hdpo (H-DPO, arXiv 2411.07595): α on the policy's log-probability in the implicit reward
#   r = β·(α·log π − log π_ref): −logσ(αβ·(lw − ll) − β·(rw − rl)); α = 1 is DPO.
def hdpo(t, beta, alpha):
    chosen = beta * (alpha * t["lw"] - t["rw"])
    rejected = beta * (alpha * t["ll"] - t["rl"])
    losses = -F.logsigmoid(chosen - rejected)
    return (losses, chosen, rejected, beta, {})


# chipo (χPO, arXiv 2407.13399, Algorithm 1): the link φ(z) = z + log z of the ratio z = π/π_ref
#   in place of log z, i.e. φ = e^u + u of the log-ratio u; −logσ(clip_{2R_max}[β·φ(u_w) − β·φ(u_l)]).
def chipo(t, beta, r_max):
    uw, ul = t["lw"] - t["rw"], t["ll"] - t["rl"]
    chosen = beta * (torch.exp(uw) + uw)
    rejected = beta * (torch.exp(ul) + ul)
    losses = -F.logsigmoid(torch.clamp(chosen - rejected, -2 * r_max, 2 * r_max))
    return (losses, chosen, rejected, beta, {})


# sppo_hard (SPPO with hard labels, arXiv 2405.00675; TRL's loss_type="sppo_hard"):
#   (u_w − 1/(2β))² + (u_l + 1/(2β))², u the summed policy-minus-reference log-ratios.
def sppo_hard(t, beta):
    uw, ul = t["lw"] - t["rw"], t["ll"] - t["rl"]
    losses = (uw - 1 / (2 * beta)) ** 2 + (ul + 1 / (2 * beta)) ** 2
    return (losses, *reference_rewards(t, beta), beta, {})


# repo (RePO, arXiv 2503.07426; junkangwu/RePO scripts/simpo_trainer.py): reference-free,
#   relu(γ − (lw/|y_w| − ll/|y_l|)), no β.
def repo(t, gamma):
    pw, pl = t["lw"] / t["len_w"], t["ll"] / t["len_l"]
    losses = torch.relu(gamma - (pw - pl))
    return (losses, pw, pl, None, {})


# bpo (BPO, arXiv 2505.19601, the recommended SBA instance, Appendix C.1 Code 1):
#   R = max(exp(−βΔ), R_min), s = 4: R^(λ+1)/(s(λ+1)) − R^(−λ)/(sλ); λ → 0 would be KLIEP.
def bpo(t, beta, lam, r_min):
    ratio = torch.clamp(torch.exp(-beta * margin(t)), min=r_min)
    s = 4.0
    losses = ratio ** (lam + 1) / (s * (lam + 1)) - ratio ** (-lam) / (s * lam)
    return (losses, *reference_rewards(t, beta), beta, {})


# tdpo1 / tdpo2 (TDPO, arXiv 2404.11999; official code trainers.py, tdpo_loss): with
#   u = log π − log π_ref summed over the response and K the sequential KL,
#   TDPO1 logit β·((u_w − u_l) − (K_l − K_w)); TDPO2 β·((u_w − u_l) − α·(K_l − sg(K_w)));
#   rewards β·(u_w + K_w), β·(u_l + K_l) (detached), as the official code logs them.
def tdpo_loss(t, beta, alpha, tdpo2):
    uw, ul = t["lw"] - t["rw"], t["ll"] - t["rl"]
    if tdpo2:
        logits = (uw - ul) - alpha * (t["kl_l"] - t["kl_w"].detach())
    else:
        logits = (uw - ul) - (t["kl_l"] - t["kl_w"])
    losses = -F.logsigmoid(beta * logits)
    extra = {"tdpo/kl_chosen": t["kl_w"].detach().mean().item(),
             "tdpo/kl_rejected": t["kl_l"].detach().mean().item()}
    return (losses, beta * (uw + t["kl_w"]), beta * (ul + t["kl_l"]), beta, extra)


def tdpo1(t, beta):
    return tdpo_loss(t, beta, 1.0, tdpo2=False)


def tdpo2(t, beta, alpha):
    return tdpo_loss(t, beta, alpha, tdpo2=True)


OBJECTIVES = {
    "dpo": dpo, "cdpo": cdpo, "rdpo": rdpo, "ipo": ipo, "hinge": hinge, "slic": slic,
    "simpo": simpo, "rdpo_len": rdpo_len, "cpo": cpo, "orpo": orpo, "kto": kto,
    "odpo": odpo, "hdpo": hdpo, "chipo": chipo, "sppo_hard": sppo_hard, "repo": repo, "bpo": bpo,
    "tdpo1": tdpo1, "tdpo2": tdpo2,
}

# The methods that read the sequential KLs and whose cases record grad_kl_w, grad_kl_l.
SEQUENCE_KL = {"tdpo1", "tdpo2"}

# JSON parameter names → keyword arguments of the functions above.
ARG_NAMES = {"lambda": "lam"}

SETTINGS = [
    ("dpo", {"beta": 0.01}),
    ("dpo", {"beta": 0.5}),
    ("dpo", {"beta": 0.1, "sft_weight": 0.5}),
    ("cdpo", {"beta": 0.1, "label_smoothing": 0.1}),
    ("cdpo", {"beta": 0.5, "label_smoothing": 0.3}),
    ("rdpo", {"beta": 0.1, "label_smoothing": 0.1}),
    ("rdpo", {"beta": 0.5, "label_smoothing": 0.3}),
    ("ipo", {"beta": 0.1, "average": True}),
    ("ipo", {"beta": 0.1, "average": False}),
    ("ipo", {"beta": 1.0, "average": True}),
    ("ipo", {"beta": 1.0, "average": False}),
    ("hinge", {"beta": 0.1}),
    ("hinge", {"beta": 0.5}),
    ("slic", {"delta": 1.0, "lambda": 0.1}),
    ("slic", {"delta": 0.1, "lambda": 0.5}),
    ("simpo", {"beta": 2.0, "gamma_ratio": 0.5}),
    ("simpo", {"beta": 10.0, "gamma_ratio": 0.3}),
    ("rdpo_len", {"beta": 0.1, "alpha": 0.05}),
    ("rdpo_len", {"beta": 0.5, "alpha": 0.5}),
    ("cpo", {"beta": 0.1, "lambda": 1.0}),
    ("cpo", {"beta": 0.5, "lambda": 0.5}),
    ("orpo", {"lambda": 0.1}),
    ("orpo", {"lambda": 2.0}),
    ("kto", {"beta": 0.1, "desirable_weight": 1.0, "undesirable_weight": 1.0}),
    ("kto", {"beta": 0.5, "desirable_weight": 1.0, "undesirable_weight": 1.5}),
    ("odpo", {"beta": 0.1, "alpha": 1.0, "log_offset": True}),
    ("odpo", {"beta": 0.5, "alpha": 0.5, "log_offset": False}),
    ("hdpo", {"beta": 0.1, "alpha": 0.95}),
    ("hdpo", {"beta": 0.5, "alpha": 1.2}),
    ("chipo", {"beta": 0.05, "r_max": 5.0}),
    ("chipo", {"beta": 0.01, "r_max": 0.5}),
    ("sppo_hard", {"beta": 0.1}),
    ("sppo_hard", {"beta": 1.0}),
    ("repo", {"gamma": 0.4}),
    ("repo", {"gamma": 1.5}),
    ("bpo", {"beta": 0.1, "lambda": 1.2, "r_min": 0.01}),
    ("bpo", {"beta": 0.5, "lambda": -0.5, "r_min": 0.025}),
    ("tdpo1", {"beta": 0.1}),
    ("tdpo1", {"beta": 0.5}),
    ("tdpo2", {"beta": 0.1, "alpha": 0.5}),
    ("tdpo2", {"beta": 0.5, "alpha": 0.2}),
]

REWARD_DEFINITIONS = {
    "dpo": REF_REWARDS, "cdpo": REF_REWARDS, "rdpo": REF_REWARDS, "hinge": REF_REWARDS,
    "rdpo_len": REF_REWARDS, "kto": REF_REWARDS, "beta_dpo": "beta_batch*(lw-rw), beta_batch*(ll-rl)",
    "ipo": REF_REWARDS + " (summed log-probs, also with average=true)",
    "slic": "lw, ll (reference-free, no beta)",
    "simpo": "beta*lw/len_w, beta*ll/len_l",
    "cpo": "beta*lw, beta*ll",
    "orpo": "lw/len_w, ll/len_l (reference-free, no beta)",
    "odpo": REF_REWARDS,
    "hdpo": "beta*(alpha*lw-rw), beta*(alpha*ll-rl)",
    "chipo": "beta*(exp(lw-rw)+(lw-rw)), beta*(exp(ll-rl)+(ll-rl))",
    "sppo_hard": REF_REWARDS,
    "repo": "lw/len_w, ll/len_l (reference-free, no beta)",
    "bpo": REF_REWARDS,
    "tdpo1": "beta*(lw-rw+kl_w), beta*(ll-rl+kl_l)",
    "tdpo2": "beta*(lw-rw+kl_w), beta*(ll-rl+kl_l)",
}

NOTES = {
    "dpo": "loss = mean over pairs; with sft_weight the pair loss gains sft_weight*(-lw/len_w).",
    "cdpo": "conservative DPO with the correct sign on the smoothing term.",
    "rdpo": "robust DPO (noisy labels); the label_smoothing term enters with a plus sign.",
    "ipo": "average=true: Δ̄ = (lw/len_w - rw/len_w) - (ll/len_l - rl/len_l), the reference log-probs "
           "divided by the same lengths; average=false: the plain Δ.",
    "hinge": "relu gradient is 0 at the kink; no pair sits on it.",
    "slic": "relu gradient is 0 at the kink; no pair sits on it.",
    "simpo": "gamma = gamma_ratio*beta.",
    "rdpo_len": "exactly as the spec writes it: -logsigmoid(beta*Δ + alpha*len_w - alpha*len_l); a positive "
                "alpha lowers the loss when the chosen response is longer (the R-DPO paper's and the SimPO "
                "table's convention). The opposite sign would be -logsigmoid(beta*Δ - alpha*(len_w - len_l)).",
    "cpo": "reference-free; NLL term -lambda*lw on the summed chosen log-prob.",
    "orpo": "NLL term is the per-pair token average -lw/len_w, averaged over pairs (TRL averages over "
            "all chosen tokens of the batch instead); log-odds via log1p(-exp(p̄)).",
    "odpo": "scores from the batch's score_w, score_l; log_offset=true is the paper's alpha*log(s_w - s_l), "
            "false the plain difference alpha*(s_w - s_l).",
    "hdpo": "alpha scales the policy log-probs only; alpha=1 is DPO.",
    "chipo": "Algorithm 1 of the paper: the logit is clipped to [-2 r_max, 2 r_max] (zero gradient "
             "where the clip binds); the experiments' smoothed link exp(clip(alpha*u)) + gamma*u is not used.",
    "sppo_hard": "TRL's sppo_hard: the sum of the two squares (the official SPPO code averages them, half "
                 "the value), summed log-probs, targets +-1/(2 beta) (eta = 1/beta).",
    "repo": "relu gradient is 0 at the kink; no pair sits on it.",
    "bpo": "SBA instance with s = 4 (DPO's gradient at R = 1); R clamped below at r_min (zero gradient "
           "where the clamp binds); lambda must not be 0 or -1.",
    "tdpo1": "kl_w, kl_l are the responses' sequential KLs sum_t KL(pi_ref || pi_theta); both carry "
             "gradient (grad_kl_w, grad_kl_l).",
    "tdpo2": "the chosen response's KL is detached (grad_kl_w is 0); alpha weighs the KL difference.",
    "kto": "per-pair loss is half the sum of the desirable and undesirable terms, so the batch mean equals "
           "the mean over the 2N terms; z0 = max(0, mean(kl_logratios)) is detached and logged as 'kl'.",
}

# ---------------------------------------------------------------------------------------------
# Evaluation and checks
# ---------------------------------------------------------------------------------------------


def kwargs(params):
    return {ARG_NAMES.get(k, k): v for k, v in params.items()}


def batch_loss(method, params, batch, lw=None, ll=None, kl_l=None):
    """The mean loss as a float, optionally with lw / ll (or kl_l) replaced (for finite
    differences)."""
    t = tensors(batch)
    with torch.no_grad():
        if lw is not None:
            t["lw"].copy_(torch.tensor(lw, dtype=DTYPE))
            t["ll"].copy_(torch.tensor(ll, dtype=DTYPE))
        if kl_l is not None:
            t["kl_l"].copy_(torch.tensor(kl_l, dtype=DTYPE))
        losses = OBJECTIVES[method](t, **kwargs(params))[0]
    return losses.mean().item()


def reward_stats(t, chosen, rejected, beta):
    chosen, rejected = chosen.detach(), rejected.detach()
    return {
        "rewards/chosen": chosen.mean().item(),
        "rewards/rejected": rejected.mean().item(),
        "rewards/margins": (chosen - rejected).mean().item(),
        "rewards/accuracies": (chosen > rejected).to(DTYPE).mean().item(),
        "logps/chosen": t["lw"].detach().mean().item(),
        "logps/rejected": t["ll"].detach().mean().item(),
        "beta/mean": beta,
    }


def evaluate(method, params, batch_index, batch):
    t = tensors(batch)
    losses, chosen, rejected, beta, extra = OBJECTIVES[method](t, **kwargs(params))
    loss = losses.mean()
    inputs = [t["lw"], t["ll"]] + ([t["kl_w"], t["kl_l"]] if method in SEQUENCE_KL else [])
    grads = torch.autograd.grad(loss, inputs, allow_unused=True)
    grads = [torch.zeros_like(x) if g is None else g for g, x in zip(grads, inputs)]
    grad_lw, grad_ll = grads[:2]
    kl_grads = {"grad_kl_w": grads[2].tolist(), "grad_kl_l": grads[3].tolist()} \
        if method in SEQUENCE_KL else {}
    return {
        "method": method,
        "params": params,
        "batch": batch_index,
        "losses": losses.detach().tolist(),
        "loss": loss.item(),
        "grad_lw": grad_lw.tolist(),
        "grad_ll": grad_ll.tolist(),
        **kl_grads,
        "stats": {**reward_stats(t, chosen, rejected, beta), **extra},
        "reward_definition": REWARD_DEFINITIONS[method],
        "notes": NOTES[method],
    }


def check_gradients(loss_fn, lw, ll, grad_lw, grad_ll, what, h=1e-5):
    """Central finite differences of loss_fn(lw, ll) against the recorded gradients."""
    for name, base, grad in [("lw", lw, grad_lw), ("ll", ll, grad_ll)]:
        for i in range(len(base)):
            up, down = list(base), list(base)
            up[i] += h
            down[i] -= h
            args_up = (up, ll) if name == "lw" else (lw, up)
            args_down = (down, ll) if name == "lw" else (lw, down)
            f_up, f_down = loss_fn(*args_up), loss_fn(*args_down)
            fd = (f_up - f_down) / (2 * h)
            tol = 1e-6 * max(1.0, abs(grad[i]), abs(f_up))
            assert abs(fd - grad[i]) <= tol, f"{what}: d/d{name}[{i}] autograd {grad[i]} vs fd {fd}"


def check_kl_gradients(method, params, batch, case, h=1e-5):
    """Finite differences of the loss in kl_l against grad_kl_l; the closed forms of both
    KL gradients in terms of dL/dll."""
    for i in range(len(batch["kl_l"])):
        up, down = list(batch["kl_l"]), list(batch["kl_l"])
        up[i] += h
        down[i] -= h
        fd = (batch_loss(method, params, batch, kl_l=up)
              - batch_loss(method, params, batch, kl_l=down)) / (2 * h)
        g = case["grad_kl_l"][i]
        assert abs(fd - g) <= 1e-6 * max(1.0, abs(g)), f"{method}: d/dkl_l[{i}] {g} vs fd {fd}"
    weight = 1.0 if method == "tdpo1" else params["alpha"]
    # dL/dK_l = weight·dL/dll (both push the same logit); TDPO1's dL/dK_w = −dL/dK_l.
    assert np.allclose(case["grad_kl_l"], np.array(case["grad_ll"]) * weight, rtol=1e-12, atol=0)
    expected_w = -np.array(case["grad_kl_l"]) if method == "tdpo1" else np.zeros(len(batch["kl_w"]))
    assert np.allclose(case["grad_kl_w"], expected_w, rtol=1e-12, atol=0)


def check_kinks(batch):
    """No pair sits within 1e-3 of a hinge or SLiC kink, so every gradient is unambiguous."""
    for method, params in SETTINGS:
        t = tensors(batch)
        with torch.no_grad():
            if method == "hinge":
                arg = 1 - params["beta"] * margin(t)
            elif method == "slic":
                arg = params["delta"] - t["lw"] + t["ll"]
            elif method == "repo":
                arg = params["gamma"] - (t["lw"] / t["len_w"] - t["ll"] / t["len_l"])
            else:
                continue
        assert arg.abs().min().item() > 1e-3, f"{batch['name']}: a pair is on the {method} kink"


def check_closed_forms(case, batch):
    """A few gradients written out by hand, independent of autograd."""
    n = len(batch["lw"])
    lw, ll, rw, rl = (np.array(batch[k]) for k in ["lw", "ll", "rw", "rl"])
    d = (lw - rw) - (ll - rl)
    sig = lambda x: 0.5 * (1 + np.tanh(x / 2))
    p = case["params"]
    if case["method"] == "dpo" and "sft_weight" not in p:
        expected = -p["beta"] * sig(-p["beta"] * d) / n
    elif case["method"] == "hinge":
        expected = -p["beta"] * (1 - p["beta"] * d > 0) / n
    elif case["method"] == "ipo" and not p["average"]:
        expected = 2 * (d - 1 / (2 * p["beta"])) / n
    elif case["method"] == "hdpo":
        z = p["alpha"] * p["beta"] * (lw - ll) - p["beta"] * (rw - rl)
        expected = -p["alpha"] * p["beta"] * sig(-z) / n
    elif case["method"] == "bpo":
        ratio = np.exp(-p["beta"] * d)
        lam, free = p["lambda"], np.exp(-p["beta"] * d) >= p["r_min"]
        expected = -(p["beta"] / 4) * (ratio ** (lam + 1) + ratio ** (-lam)) * free / n
    else:
        return
    assert np.allclose(case["grad_lw"], expected, rtol=1e-12, atol=1e-15), case["method"]
    assert np.allclose(case["grad_ll"], -expected, rtol=1e-12, atol=1e-15), case["method"]


# ---------------------------------------------------------------------------------------------
# β-DPO
# ---------------------------------------------------------------------------------------------

BETA_DPO_RUNS = [
    # (params, batch indices of the two consecutive steps, sampling seed)
    ({"beta0": 0.1, "a": 0.2, "keep_fraction": 0.8, "momentum": 0.9}, [0, 1], 21),
    ({"beta0": 0.1, "a": 1.5, "keep_fraction": 0.8, "momentum": 0.9}, [0, 2], 22),
]
BETA_MIN = 1e-3


def beta_dpo_losses(t, beta_batch, kept):
    """Per-pair −logσ(β_batch·Δ_i) on the kept pairs, 0 elsewhere; loss = mean over kept."""
    mask = torch.zeros(len(t["lw"]), dtype=DTYPE)
    mask[kept] = 1.0
    losses = -F.logsigmoid(beta_batch * margin(t)) * mask
    return losses, losses.sum() / len(kept)


def beta_dpo_step(batch_index, batch, params, m0, s0, rng):
    t = tensors(batch)
    a_vals = margin(t).detach()                       # A_i = Δ_i, not multiplied by β
    n = len(a_vals)
    mean_a, std_a = a_vals.mean().item(), a_vals.std().item()  # torch default: unbiased (N−1)
    m_used, s_used = (mean_a, std_a) if m0 is None else (m0, s0)

    # Filter weights exp(−½((A_i − M0)/S0)²) with the estimates from before this batch.
    weights = torch.exp(-0.5 * ((a_vals - m_used) / s_used) ** 2)
    k = round(params["keep_fraction"] * n)
    probabilities = (weights / weights.sum()).numpy()
    kept = sorted(int(i) for i in rng.choice(n, size=k, replace=False, p=probabilities))

    # β_batch = max(β0·(1 + a·(mean(A over kept) − M0)), 1e-3), a constant for the gradient.
    raw_beta = params["beta0"] * (1 + params["a"] * (a_vals[kept].mean().item() - m_used))
    beta_batch = max(raw_beta, BETA_MIN)

    losses, loss = beta_dpo_losses(t, beta_batch, kept)
    grad_lw, grad_ll = torch.autograd.grad(loss, [t["lw"], t["ll"]])
    mom = params["momentum"]
    m_next = mom * m_used + (1 - mom) * mean_a
    s_next = mom * s_used + (1 - mom) * std_a

    def loss_fn(lw, ll):
        b = dict(batch, lw=lw, ll=ll)
        with torch.no_grad():
            return beta_dpo_losses(tensors(b), beta_batch, kept)[1].item()

    check_gradients(loss_fn, batch["lw"], batch["ll"], grad_lw.tolist(), grad_ll.tolist(),
                    f"beta_dpo batch {batch_index}")

    chosen, rejected = reference_rewards(t, beta_batch)
    stats = reward_stats(t, chosen, rejected, beta_batch)
    stats.update({"beta_dpo/m0": m_next, "beta_dpo/s0": s_next, "beta_dpo/kept_fraction": k / n})
    return {
        "batch": batch_index,
        "m0": m0,
        "s0": s0,
        "m0_used": m_used,
        "s0_used": s_used,
        "batch_mean_a": mean_a,
        "batch_std_a": std_a,
        "weights": weights.tolist(),
        "kept": kept,
        "beta_batch_unclamped": raw_beta,
        "beta_batch": beta_batch,
        "per_pair_losses": losses.detach().tolist(),
        "loss": loss.item(),
        "grad_lw": grad_lw.tolist(),
        "grad_ll": grad_ll.tolist(),
        "m0_next": m_next,
        "s0_next": s_next,
        "stats": stats,
    }


def beta_dpo_run(params, batch_indices, seed, batches):
    rng = np.random.default_rng(seed)
    m0 = s0 = None
    steps = []
    for i in batch_indices:
        step = beta_dpo_step(i, batches[i], params, m0, s0, rng)
        steps.append(step)
        m0, s0 = step["m0_next"], step["s0_next"]
    return {
        "params": params,
        "steps": steps,
        "reward_definition": REWARD_DEFINITIONS["beta_dpo"],
        "notes": (
            "A_i = Δ_i. m0/s0 are the running estimates before the step (null: seed them from this "
            "batch, m0_used = mean(A), s0_used = std(A)). std is torch's default unbiased std "
            "(divides by N-1), both for seeding and for the momentum update. weights use m0_used/s0_used; "
            "kept = round(keep_fraction*N) indices drawn with numpy's seeded Generator.choice without "
            "replacement, p = weights/sum(weights) (given, not to be reproduced). beta_batch = "
            "max(beta0*(1 + a*(mean(A[kept]) - m0_used)), 1e-3), a constant for the gradient. "
            "per_pair_losses are 0 off the kept set; loss = mean over kept. m0_next = momentum*m0_used "
            "+ (1-momentum)*mean(A), s0_next likewise with std(A), over the whole batch. Reward "
            "statistics use beta_batch over all pairs of the batch, kept or not."
        ),
    }


# ---------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------
# α-DPO (arXiv 2410.10148; junkangwu/alpha-DPO scripts/dpo_trainer.py): running statistics of
# the length-normalised margin M, updated under no_grad before use (momentum 0.9, from 0, no
# bias correction, unbiased std), the adaptive margin detached.
# ---------------------------------------------------------------------------------------------

ALPHA_DPO_RUNS = [
    # (params, batch indices of consecutive steps)
    ({"beta": 2.5, "gamma_ratio": 0.6, "alpha": 0.2}, [0, 1, 3]),
    ({"beta": 10.0, "gamma_ratio": 0.4, "alpha": 0.05}, [2, 0]),
]


def alpha_dpo_losses(t, params, normalised):
    pw, pl = t["lw"] / t["len_w"], t["ll"] / t["len_l"]
    c = params["alpha"] * normalised + params["gamma_ratio"]
    return -F.logsigmoid(params["beta"] * (pw - pl - c)), pw, pl


def alpha_dpo_run(params, batch_indices, batches):
    mean, std = 0.0, 0.0
    steps = []
    for bi in batch_indices:
        b = batches[bi]
        t = tensors(b)
        with torch.no_grad():
            m = (t["lw"] / t["len_w"] - t["ll"] / t["len_l"]) - (t["rw"] / t["len_w"] - t["rl"] / t["len_l"])
            mean = 0.9 * mean + 0.1 * m.mean().item()
            std = 0.9 * std + 0.1 * m.std().item()
            normalised = (m - mean) / std
        losses, pw, pl = alpha_dpo_losses(t, params, normalised)
        loss = losses.mean()
        grad_lw, grad_ll = torch.autograd.grad(loss, [t["lw"], t["ll"]])

        def loss_fn(lw, ll, b=b, normalised=normalised):
            tt = tensors(b)
            with torch.no_grad():
                tt["lw"].copy_(torch.tensor(lw, dtype=DTYPE))
                tt["ll"].copy_(torch.tensor(ll, dtype=DTYPE))
                return alpha_dpo_losses(tt, params, normalised)[0].mean().item()

        # The margin is a constant (stop-gradient): finite differences hold it fixed.
        check_gradients(loss_fn, b["lw"], b["ll"], grad_lw.tolist(), grad_ll.tolist(),
                        f"alpha_dpo {params} batch {bi}")
        stats = reward_stats(t, params["beta"] * pw, params["beta"] * pl, params["beta"])
        steps.append({
            "batch": bi,
            "losses": losses.detach().tolist(),
            "loss": loss.item(),
            "grad_lw": grad_lw.tolist(),
            "grad_ll": grad_ll.tolist(),
            "mean": mean,
            "std": std,
            "stats": stats,
        })
    return {"params": params, "steps": steps}


def all_finite(x):
    if isinstance(x, float):
        return math.isfinite(x)
    if isinstance(x, dict):
        return all(all_finite(v) for v in x.values())
    if isinstance(x, list):
        return all(all_finite(v) for v in x)
    return True


def main():
    torch.set_default_dtype(DTYPE)
    batches = [make_batch(*spec) for spec in BATCH_SPECS]
    for b in batches:
        check_kinks(b)
    negative = [b for b in batches if np.mean(b["kl_logratios"]) < 0]
    assert len(negative) == 1, "exactly one batch should clamp KTO's z0 to 0"

    cases = []
    for method, params in SETTINGS:
        for i, b in enumerate(batches):
            case = evaluate(method, params, i, b)
            check_gradients(lambda lw, ll: batch_loss(method, params, b, lw, ll),
                            b["lw"], b["ll"], case["grad_lw"], case["grad_ll"], f"{method} {params} batch {i}")
            check_closed_forms(case, b)
            if method in SEQUENCE_KL:
                check_kl_gradients(method, params, b, case)
            cases.append(case)

    beta_dpo_runs = [beta_dpo_run(p, idx, seed, batches) for p, idx, seed in BETA_DPO_RUNS]
    assert any(s["beta_batch_unclamped"] < BETA_MIN for r in beta_dpo_runs for s in r["steps"]), \
        "one β-DPO step should exercise the clamp"

    alpha_dpo_runs = [alpha_dpo_run(p, idx, batches) for p, idx in ALPHA_DPO_RUNS]

    golden = {
        "generator": "tools/make_objective_golden.py",
        "versions": {"python": sys.version.split()[0], "torch": torch.__version__, "numpy": np.__version__},
        "conventions": {
            "delta": "Δ = (lw - rw) - (ll - rl)",
            "loss": "mean of the per-pair losses",
            "gradients": "d(loss)/d(lw_i), d(loss)/d(ll_i) of the mean loss (include 1/N)",
            "rewards/accuracies": "mean of (chosen reward > rejected reward), strict",
            "beta/mean": "the β actually used, mean over pairs; null for slic and orpo",
            "reward_definitions": REWARD_DEFINITIONS,
        },
        "batches": batches,
        "cases": cases,
        "beta_dpo": beta_dpo_runs,
        "alpha_dpo": alpha_dpo_runs,
    }
    assert all_finite(golden), "non-finite value in the golden record"
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(golden, indent=1, ensure_ascii=False) + "\n")

    print(f"wrote {OUT.relative_to(ROOT)}: {len(batches)} batches, {len(cases)} cases, "
          f"{len(beta_dpo_runs)} β-DPO runs")
    for b in batches:
        d = (np.array(b["lw"]) - b["rw"]) - (np.array(b["ll"]) - b["rl"])
        print(f"  batch {b['name']:16} N={len(d):2}  Δ in [{d.min():8.3f}, {d.max():8.3f}]  "
              f"mean kl_logratios {np.mean(b['kl_logratios']):+.3f}")
    for method, params in SETTINGS:
        losses = [c["loss"] for c in cases if c["method"] == method and c["params"] == params]
        print(f"  {method:9} {json.dumps(params):62} loss " + " ".join(f"{v:10.5g}" for v in losses))
    for r in beta_dpo_runs:
        for s in r["steps"]:
            print(f"  beta_dpo a={r['params']['a']}: batch {s['batch']} kept {s['kept']} "
                  f"beta_batch {s['beta_batch']:.6g} (raw {s['beta_batch_unclamped']:.6g}) loss {s['loss']:.6g}")


if __name__ == "__main__":
    main()
