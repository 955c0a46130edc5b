"""Step by step, the same-FLOPs PyTorch loop of `tools/bench_vs_torch.py`, eager and compiled.

`bench_vs_torch.py` reports a loop's mean pairs/s over its timed steps; this prints each step's
wall time, so that a peer whose steps vary (a slow step among fast ones) can be told apart from
one that is uniformly slow, and checks that the loop trains what it should: after each DPO step,
how many trainable tensors received a non-zero gradient (all of them from the second step on; at
the first, LoRA's `A` matrices get none, their `B` being zero), how far the policy's summed
log-probs are from the reference's (0 at the first step, then growing: with LoRA the reference
really runs with the adapters off), and at the end how many trainable tensors AdamW moved.

    python3 tools/samef_steps.py --workload smollm2 --lora 16 --threads 1 --steps 6

Same models, pairs, tree layout, DPO loss and AdamW as `bench_vs_torch.py`'s `samef` peers.
"""
import argparse
import sys
import time
from pathlib import Path

# bench_vs_torch sets the OpenMP and MKL thread counts from `--threads` before torch is
# imported; torch must not be imported ahead of it.
sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_vs_torch as b  # noqa: E402
import torch  # noqa: E402


def run(work, steps, compiled):
    policy, reference = b.make_models(work)
    params = b.trainable(policy)
    before = [p.detach().clone() for p in params]
    optimizer = torch.optim.AdamW(params, lr=b.LR, weight_decay=0.0)
    pairs = b.random_pairs(work)
    ids = torch.tensor([p + c + r for p, c, r in pairs], dtype=torch.long)
    positions, mask, predictors = b.tree_layout(work)
    targets = torch.tensor([c + r for _, c, r in pairs], dtype=torch.long)
    body = torch.compile(b.hidden_states, dynamic=False) if compiled else b.hidden_states

    def logits(model):
        h = body(b.base_model(model), ids, positions, mask)[:, predictors]
        return h @ b.head_weight(b.base_model(model)).t()

    name = "compiled" if compiled else "eager"
    for step in range(steps):
        start = time.perf_counter()
        policy_logits = logits(policy)
        with b.reference_mode(policy, reference) as ref:
            reference_logits = logits(ref)
        lw, ll = (b.logits_pairs_sum(policy_logits, targets, work, i) for i in (0, 1))
        rw, rl = (b.logits_pairs_sum(reference_logits, targets, work, i) for i in (0, 1))
        gap = (lw - rw).abs().max().item()
        b.dpo_update(optimizer, lw, ll, rw, rl, None, b.BETA, None)
        seconds = time.perf_counter() - start
        graded = sum(int(p.grad is not None and bool(p.grad.abs().sum() > 0)) for p in params)
        print(f"{name} step {step}: {seconds:.2f} s ({work.pairs / seconds:.3f} pairs/s), "
              f"|policy − reference| {gap:.3e}, non-zero gradients {graded}/{len(params)}",
              flush=True)
    moved = sum(int(bool((p.detach() != q).any())) for p, q in zip(params, before))
    print(f"{name}: AdamW moved {moved}/{len(params)} trainable tensors", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", default="smollm2", choices=["gpt2", "smollm2"])
    parser.add_argument("--lora", type=int, help="train LoRA adapters of this rank")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--only", choices=["eager", "compiled"])
    args = parser.parse_args()
    b.setup_threads(args.threads)
    work = b.Workload(args.workload, args.lora)
    for compiled in (False, True):
        if args.only in (None, "compiled" if compiled else "eager"):
            run(work, args.steps, compiled)


if __name__ == "__main__":
    main()
