"""The matrix products of a training step: edpo's GEMM, candle's and PyTorch's, in one sitting.

Runs `edpo bench --workload gemm [--products-of gpt2]` (which names the products of a SmolLM2
step, or of the small GPT-2 workload's: each projection's forward product, input gradient and
weight gradient, and the LM head's at one block of vocabulary rows, with the operands laid out
as the layers hold them, and how many times a step computes each), then times `torch.matmul`
on the same shapes and layouts in this process (the best of five rounds of 0.2 s, as edpo
times them), and prints two Markdown tables: GFLOP/s of each product and edpo's over
PyTorch's; and, for full fine-tuning and LoRA, a step's GFLOP in these products and the
seconds they take at edpo's rates, at PyTorch's and at the faster of the two per product. The
last gives a bound: no step that computes these products at these rates runs more pairs/s
(attention's products, LoRA's rank-r products, norms, activations, softmaxes and the
optimiser are left out, so the bound is generous). `--against SITTING.jsonl` (a record of
`tools/bench_sitting.py`, best taken right after this in the same sitting) puts each measured
DPO pairs/s of the same workload and threads beside the bound, as a fraction of it. `--save
FILE.json` keeps the measured rates; `--load FILE.json` renders them again (with `--against`)
without measuring.

    python3 tools/bench_gemm.py --edpo target/release/edpo --threads 1 [--of gpt2]
"""
import argparse
import json
import subprocess
import time

import torch


def seconds_per_call(f):
    f()
    start = time.perf_counter()
    f()
    once = max(time.perf_counter() - start, 1e-6)
    calls = max(1, int(0.2 / once + 0.999))
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(calls):
            f()
        best = min(best, (time.perf_counter() - start) / calls)
    return best


def torch_gflops(row):
    m, n, k = row["m"], row["n"], row["k"]
    a = torch.randn(k, m).t() if row["a_t"] else torch.randn(m, k)
    b = torch.randn(n, k).t() if row["b_t"] else torch.randn(k, n)
    c = torch.empty(m, n)
    seconds = seconds_per_call(lambda: torch.matmul(a, b, out=c))
    return 2 * m * n * k / seconds / 1e9


def measure(args):
    """edpo's and candle's rates (`edpo bench --workload gemm`) and PyTorch's, per product."""
    torch.set_num_threads(args.threads)
    out = subprocess.run([args.edpo, "bench", "--workload", "gemm", "--products-of", args.of,
                          "--threads", str(args.threads)],
                         check=True, stdout=subprocess.PIPE, text=True)
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    for row in rows:
        row["torch_gflops"] = torch_gflops(row)
    return {"of": args.of, "threads": args.threads, "torch": torch.__version__,
            "when": time.strftime("%Y-%m-%d %H:%M:%S"), "rows": rows}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--edpo", default="target/debug/edpo", help="the edpo binary")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--of", default="smollm2", choices=["smollm2", "gpt2"],
                        help="whose step's products: SmolLM2's or the small GPT-2 workload's")
    parser.add_argument("--against", help="a bench_sitting.py record to set beside the bound")
    parser.add_argument("--save", help="write the measured rates to this JSON file")
    parser.add_argument("--load", help="render a file --save wrote instead of measuring")
    args = parser.parse_args()
    if args.load:
        with open(args.load) as f:
            saved = json.load(f)
        args.of, args.threads = saved["of"], saved["threads"]
    else:
        saved = measure(args)
        if args.save:
            with open(args.save, "w") as f:
                json.dump(saved, f, indent=1)
    rows = saved["rows"]
    print(f"{args.of} step's products, threads {args.threads}, torch {saved['torch']}, "
          f"{saved['when']}\n")
    print("| product | m × n × k | per step (full / LoRA) | edpo GFLOP/s | candle | PyTorch "
          "| edpo / PyTorch |")
    print("|---|---|---|---|---|---|---|")
    regimes = {"full": "per_step_full", "LoRA": "per_step_lora"}
    flops = {r: 0.0 for r in regimes}
    seconds = {(r, who): 0.0 for r in regimes for who in ("edpo", "candle", "torch", "best")}
    for row in rows:
        ours, theirs, pt = row["edpo_gflops"], row["candle_gflops"], row["torch_gflops"]
        f = 2 * row["m"] * row["n"] * row["k"] / 1e9
        for r, key in regimes.items():
            count = row[key]
            flops[r] += count * f
            for who, g in (("edpo", ours), ("candle", theirs), ("torch", pt),
                           ("best", max(ours, pt))):
                seconds[r, who] += count * f / g
        layout = ("Aᵀ" if row["a_t"] else "A") + "·" + ("Bᵀ" if row["b_t"] else "B")
        print(f"| {row['product']} ({layout}) | {row['m']} × {row['n']} × {row['k']} | "
              f"{row['per_step_full']} / {row['per_step_lora']} | "
              f"{ours:.1f} | {theirs:.1f} | {pt:.1f} | {ours / pt:.2f} |")
    pairs = rows[0]["pairs_per_step"]
    print(f"\nA step ({pairs} pairs) in these products alone:\n")
    print("| | GFLOP | s at edpo's rates | at PyTorch's | at the faster per product "
          "| bound, DPO pairs/s |")
    print("|---|---|---|---|---|---|")
    for r in regimes:
        best = seconds[r, "best"]
        print(f"| {r} | {flops[r]:.1f} | {seconds[r, 'edpo']:.3f} | {seconds[r, 'torch']:.3f} | "
              f"{best:.3f} | {pairs / best:.2f} |")
    if args.against:
        against(args, pairs, {r: pairs / seconds[r, "best"] for r in regimes})


def against(args, pairs, bound):
    """Each measured DPO pairs/s of the sitting record at this workload and threads, beside
    the bound: as a fraction of it."""
    rows = []
    with open(args.against) as f:
        for line in f:
            rec = json.loads(line)
            if (rec.get("workload") != args.of or rec.get("threads") != args.threads
                    or "result" not in rec):
                continue
            res = rec["result"]
            who = rec["who"]
            key = "dpo_pairs_per_s" if who == "edpo" else \
                f"{who.replace('-', '_')}_dpo_pairs_per_s"
            if key in res:
                regime = "LoRA" if rec.get("lora") else "full"
                steps = res.get(key.replace("pairs_per_s", "step_seconds"))
                fastest = pairs / min(steps) if steps else None
                rows.append((regime, who, rec.get("round", 0), res[key], fastest))
    print(f"\nMeasured in {args.against}, DPO pairs/s as a fraction of the bound (a loop's "
          f"fastest timed step too, where the record has its steps):\n")
    print("| regime | who | round | DPO pairs/s | of the bound | fastest step | of the bound |")
    print("|---|---|---|---|---|---|---|")
    for regime, who, rnd, p, fast in sorted(rows):
        tail = f"{fast:.3f} | {fast / bound[regime]:.2f}" if fast else "— | —"
        print(f"| {regime} | {who} | {rnd} | {p:.3f} | {p / bound[regime]:.2f} | {tail} |")


if __name__ == "__main__":
    main()
