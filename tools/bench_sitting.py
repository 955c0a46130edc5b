"""One sitting of the performance comparison: `edpo bench` and every PyTorch peer of
`tools/bench_vs_torch.py`, on the same machine, one after the other, as Markdown tables.

    python3 tools/bench_sitting.py --edpo target/debug/edpo --steps 2 --out sitting.jsonl

Runs, for each case (workload, LoRA rank, threads) in `--cases` order, `--rounds` rounds of
`edpo bench` and the PyTorch measurements (`bare`, `samef`, `trl`, `samef-compiled`, and
`sampling` on the SmolLM2 workload), alternating, each in a fresh process, appending one JSON
object per measurement to `--out` as it finishes (so an interrupted sitting keeps what it
measured; `--table-only` renders a file). Then prints, per case, pairs/s of DPO and ε-DPO,
their ratio and peak RSS (medians over the rounds, with their range), and edpo's speed as a
multiple of each peer: the ratio of the two measurements of one round (run next to each other,
so they share the machine's state), its median over the rounds and its range. One round is a
single pair of measurements, which the machine's drift (±5–25% from run to run on a shared
2-core machine) can move either way. Progress goes to stderr. Needs the Python environment of
`tools/bench_vs_torch.py`.
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CASES = "smollm2:full:1,smollm2:lora16:1,smollm2:full:2,smollm2:lora16:2,gpt2:full:1,gpt2:full:2"
PEERS = ["samef", "bare", "trl", "samef-compiled"]


def log(message):
    print(message, file=sys.stderr, flush=True)


def parse_case(text):
    workload, variant, threads = text.split(":")
    lora = None if variant == "full" else int(variant.removeprefix("lora"))
    return workload, lora, int(threads)


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def run_json(command):
    log("$ " + " ".join(command))
    start = time.time()
    result = subprocess.run(command, stdout=subprocess.PIPE, text=True)
    if result.returncode != 0:
        return {"failed": result.returncode, "wall_s": time.time() - start}
    lines = [line for line in result.stdout.strip().splitlines() if line.startswith("{")]
    out = json.loads(lines[-1])
    out["wall_s"] = time.time() - start
    return out


def measure(args, case):
    workload, lora, threads = case
    common = ["--threads", str(threads), "--steps", str(args.steps), "--workload", workload]
    lora_args = [] if lora is None else ["--lora", str(lora)]
    yield "edpo", run_json([args.edpo, "bench", *common, *lora_args])
    for peer in PEERS:
        if peer not in args.peers or (peer == "samef-compiled" and args.no_compiled):
            continue
        yield peer, run_json([sys.executable, os.path.join(HERE, "bench_vs_torch.py"),
                              "--only", peer, *common, *lora_args])
    if workload == "smollm2" and lora is None and "sampling" in args.peers:
        yield "sampling", run_json([sys.executable, os.path.join(HERE, "bench_vs_torch.py"),
                                    "--only", "sampling", *common])


def ratio(a, b):
    return None if a is None or not b else a / b


def summary(values, fmt):
    """`median (min–max)` of the values that are there, `—` when none is."""
    values = [v for v in values if v is not None]
    if not values:
        return "—"
    if len(values) == 1:
        return fmt.format(values[0])
    return (f"{fmt.format(statistics.median(values))} "
            f"({fmt.format(min(values))}–{fmt.format(max(values))})")


def table(records):
    """Markdown tables, one per case, from the sitting's records: each measurement's values
    over its rounds (the k-th record of a case and a measurement is its round k, so files
    written before rounds existed read as one round each)."""
    by_case = {}
    for r in records:
        rounds = by_case.setdefault((r["workload"], r["lora"], r["threads"]), {})
        rounds.setdefault(r["who"], []).append(r["result"])
    lines = []
    for (workload, lora, threads), got in by_case.items():
        title = f"{workload}, {'full fine-tuning' if lora is None else f'LoRA rank {lora}'}, {threads} thread{'s' if threads > 1 else ''}"
        n = max(len(v) for v in got.values())
        if n > 1:
            title += f", {n} rounds: medians (ranges); edpo × a peer per round, paired"
        lines += [f"**{title}**", "",
                  "| | DPO pairs/s | ε-DPO pairs/s | ε-DPO / DPO | peak RSS (MiB) | edpo DPO × | edpo ε-DPO × |",
                  "|---|---|---|---|---|---|---|"]
        edpo = [r for r in got.get("edpo", []) if "failed" not in r]
        e_dpo = [r.get("dpo_pairs_per_s") for r in got.get("edpo", [])]
        e_eps = [r.get("epsilon_dpo_pairs_per_s") for r in got.get("edpo", [])]
        lines.append(f"| edpo | {summary(e_dpo, '{:.3f}')} | {summary(e_eps, '{:.3f}')} | "
                     f"{summary([ratio(e, d) for d, e in zip(e_dpo, e_eps)], '{:.2f}')} | "
                     f"{summary([r.get('peak_rss_mib') for r in edpo], '{:.0f}')} | | |")
        for peer in PEERS:
            runs = got.get(peer)
            if runs is None:
                continue
            key = peer.replace("-", "_")
            failed = [r["failed"] for r in runs if "failed" in r]
            if len(failed) == len(runs):
                lines.append(f"| {peer} | failed (exit {failed[0]}) | | | | | |")
                continue
            d = [r.get(f"{key}_dpo_pairs_per_s") for r in runs]
            e = [r.get(f"{key}_epsilon_dpo_pairs_per_s") for r in runs]
            note = f" ({len(failed)} of {len(runs)} failed)" if failed else ""
            lines.append(f"| {peer}{note} | {summary(d, '{:.3f}')} | {summary(e, '{:.3f}')} | "
                         f"{summary([ratio(b, a) for a, b in zip(d, e)], '{:.2f}')} | "
                         f"{summary([r.get(f'{key}_peak_rss_mib') for r in runs], '{:.0f}')} | "
                         f"{summary([ratio(a, b) for a, b in zip(e_dpo, d)], '{:.2f}')} | "
                         f"{summary([ratio(a, b) for a, b in zip(e_eps, e)], '{:.2f}')} |")
        sampling = [r for r in got.get("sampling", []) if "failed" not in r]
        if sampling:
            ours = [r.get("sampling_tokens_per_s") for r in got.get("edpo", [])]
            theirs = [r.get("generate_tokens_per_s") for r in got.get("sampling", [])]
            lines += ["", f"Sampling (8 prompts × 64 new tokens, KV cache): edpo {summary(ours, '{:.1f}')} "
                          f"tokens/s, `generate` {summary(theirs, '{:.1f}')} tokens/s, "
                          f"edpo × {summary([ratio(a, b) for a, b in zip(ours, theirs)], '{:.2f}')}."]
        lines.append("")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0], allow_abbrev=False)
    parser.add_argument("--edpo", default="target/debug/edpo", help="the edpo binary")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per measurement")
    parser.add_argument("--rounds", type=int, default=3,
                        help="rounds of each case, edpo and its peers alternating (default 3)")
    parser.add_argument("--cases", default=DEFAULT_CASES,
                        help="workload:full|loraR:threads, comma-separated, in order")
    parser.add_argument("--out", default="bench-sitting.jsonl", help="records, appended")
    parser.add_argument("--no-compiled", action="store_true", help="skip torch.compile")
    parser.add_argument("--peers", default=",".join(PEERS + ["sampling"]),
                        help="the PyTorch measurements to run beside edpo (comma-separated)")
    parser.add_argument("--table-only", action="store_true", help="render --out and stop")
    args = parser.parse_args()
    args.peers = args.peers.split(",")
    if not args.table_only:
        with open(args.out, "a") as f:
            f.write(json.dumps({"sitting": time.strftime("%Y-%m-%d %H:%M:%S"), "cpu": cpu_name(),
                                "cores": os.cpu_count()}) + "\n")
        for case in [parse_case(c) for c in args.cases.split(",")]:
            for round_ in range(args.rounds):
                for who, result in measure(args, case):
                    record = {"workload": case[0], "lora": case[1], "threads": case[2],
                              "who": who, "round": round_, "result": result}
                    with open(args.out, "a") as f:
                        f.write(json.dumps(record) + "\n")
    with open(args.out) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    header = [r for r in rows if "sitting" in r]
    if header:
        print(f"Sitting {header[-1]['sitting']} on {header[-1]['cpu']} ({header[-1]['cores']} cores).\n")
    print(table([r for r in rows if "who" in r]))


if __name__ == "__main__":
    main()
