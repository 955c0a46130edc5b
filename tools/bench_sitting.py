"""One sitting of the performance comparison: `edpo bench` and every PyTorch peer of
`tools/bench_vs_torch.py`, on the same machine, one after the other, as Markdown tables.

    python3 tools/bench_sitting.py --edpo target/debug/edpo --steps 2 --out sitting.jsonl

Runs, for each case (workload, LoRA rank, threads) in `--cases` order, `edpo bench` and the
PyTorch measurements (`bare`, `samef`, `trl`, `samef-compiled`, and `sampling` on the SmolLM2
workload), each in a fresh process, appending one JSON object per measurement to `--out` as
it finishes (so an interrupted sitting keeps what it measured; `--table-only` renders a file).
Then prints, per case, pairs/s of DPO and ε-DPO, their ratio, peak RSS, and edpo's speed as a
multiple of each peer. Progress goes to stderr. Needs the Python environment of
`tools/bench_vs_torch.py`.
"""

import argparse
import json
import os
import platform
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


def table(records):
    """Markdown tables, one per case, from the sitting's records."""
    by_case = {}
    for r in records:
        by_case.setdefault((r["workload"], r["lora"], r["threads"]), {})[r["who"]] = r["result"]
    lines = []
    for (workload, lora, threads), got in by_case.items():
        title = f"{workload}, {'full fine-tuning' if lora is None else f'LoRA rank {lora}'}, {threads} thread{'s' if threads > 1 else ''}"
        lines += [f"**{title}**", "",
                  "| | DPO pairs/s | ε-DPO pairs/s | ε-DPO / DPO | peak RSS (MiB) | edpo DPO × | edpo ε-DPO × |",
                  "|---|---|---|---|---|---|---|"]
        edpo = got.get("edpo", {})
        e_dpo, e_eps = edpo.get("dpo_pairs_per_s"), edpo.get("epsilon_dpo_pairs_per_s")

        def cell(x, fmt="{:.3f}"):
            return "—" if x is None else fmt.format(x)

        def ratio(a, b):
            return None if a is None or not b else a / b

        lines.append(f"| edpo | {cell(e_dpo)} | {cell(e_eps)} | {cell(ratio(e_eps, e_dpo), '{:.2f}')} | "
                     f"{cell(edpo.get('peak_rss_mib'), '{:.0f}')} | | |")
        for peer in PEERS:
            r = got.get(peer)
            if r is None:
                continue
            key = peer.replace("-", "_")
            if "failed" in r:
                lines.append(f"| {peer} | failed (exit {r['failed']}) | | | | | |")
                continue
            d = r.get(f"{key}_dpo_pairs_per_s")
            e = r.get(f"{key}_epsilon_dpo_pairs_per_s")
            lines.append(f"| {peer} | {cell(d)} | {cell(e)} | {cell(ratio(e, d), '{:.2f}')} | "
                         f"{cell(r.get(f'{key}_peak_rss_mib'), '{:.0f}')} | "
                         f"{cell(ratio(e_dpo, d), '{:.2f}')} | {cell(ratio(e_eps, e), '{:.2f}')} |")
        s = got.get("sampling")
        if s is not None and "failed" not in s:
            ours = edpo.get("sampling_tokens_per_s")
            theirs = s.get("generate_tokens_per_s")
            lines += ["", f"Sampling (8 prompts × 64 new tokens, KV cache): edpo {cell(ours, '{:.1f}')} "
                          f"tokens/s, `generate` {cell(theirs, '{:.1f}')} tokens/s, "
                          f"edpo × {cell(ratio(ours, theirs), '{:.2f}')}."]
        lines.append("")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0], allow_abbrev=False)
    parser.add_argument("--edpo", default="target/debug/edpo", help="the edpo binary")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per measurement")
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
            for who, result in measure(args, case):
                record = {"workload": case[0], "lora": case[1], "threads": case[2], "who": who,
                          "result": result}
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
