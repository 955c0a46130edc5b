"""The matrix products of a SmolLM2 step: edpo's GEMM, candle's and PyTorch's, in one sitting.

Runs `edpo bench --workload gemm` (which names the products: each projection's forward
product, input gradient and weight gradient, and the LM head's at one chunk, with the
operands laid out as the layers hold them), then times `torch.matmul` on the same shapes and
layouts in this process (the best of five rounds of 0.2 s, as edpo times them), and prints one
Markdown table: GFLOP/s of each and edpo's over PyTorch's, with a FLOP-weighted total over
the products as one step runs them.

    python3 tools/bench_gemm.py --edpo target/debug/edpo --threads 1
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


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--edpo", default="target/debug/edpo", help="the edpo binary")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out = subprocess.run([args.edpo, "bench", "--workload", "gemm", "--threads",
                          str(args.threads)], check=True, stdout=subprocess.PIPE, text=True)
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    print(f"threads {args.threads}, torch {torch.__version__}\n")
    print("| product | m × n × k | edpo GFLOP/s | candle | PyTorch | edpo / PyTorch |")
    print("|---|---|---|---|---|---|")
    totals = {"edpo": 0.0, "candle": 0.0, "torch": 0.0}
    flops = 0.0
    for row in rows:
        ours, theirs, pt = row["edpo_gflops"], row["candle_gflops"], torch_gflops(row)
        f = 2 * row["m"] * row["n"] * row["k"] / 1e9
        flops += f
        for key, g in (("edpo", ours), ("candle", theirs), ("torch", pt)):
            totals[key] += f / g
        layout = ("Aᵀ" if row["a_t"] else "A") + "·" + ("Bᵀ" if row["b_t"] else "B")
        print(f"| {row['product']} ({layout}) | {row['m']} × {row['n']} × {row['k']} | "
              f"{ours:.1f} | {theirs:.1f} | {pt:.1f} | {ours / pt:.2f} |")
    e, c, t = (flops / totals[k] for k in ("edpo", "candle", "torch"))
    print(f"| all, FLOP-weighted | | {e:.1f} | {c:.1f} | {t:.1f} | {e / t:.2f} |")


if __name__ == "__main__":
    main()
