#!/usr/bin/env python3
"""Reliability trials: faults injected into real sweeps, each outcome checked, one Markdown
table out (the README's "Reliability" table is this script's output, pasted).

    python3 tools/reliability.py [--edpo target/debug/edpo] [--crashes 24] [--only crash,disk]

Rows (each a kind of fault; the CI tests that keep a few trials of each true are named in
the table):
- crash: SIGKILL of the smoke sweep at a random moment (planning, stage building, mid-run,
  report rendering), then a resume. Runs lost: completed before the kill and run again (or
  lost) after. Corrupt files: a JSON / JSON-lines / YAML file under the output that does not
  parse, or a completed status without its evaluation. Outcome: the resumed sweep's run files
  byte-identical to an uninterrupted sweep's.
- disk full: the output root on a tmpfs of 30% / 60% / 90% of what the sweep writes (needs
  root to mount); the sweep must fail naming a path and "No space left", leave nothing that
  looks complete and is not, and finish after the space is grown (tmpfs remount).
- concurrent sweeps on one directory, and two grids sharing one stage cache.
- damaged stage cache entries (a file truncated, a byte altered, a file added, the manifest
  removed): detected, rebuilt, never used.
- a diverging run (learning rate 1e30): fails alone with "non-finite" in its status; the
  sweep completes the others and exits non-zero.
- determinism: one grid at --jobs 1/2 × --threads 1/2, byte-identical run files.
- corrupted inputs: truncations and bit flips of every committed model, GGUF, pairs and
  config fixture, fed to the command that reads it: panics, and errors that name no file.

Run from the repository root. Writes only under a temporary directory.
"""
import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RUN_FILES = ["config.yaml", "metrics.jsonl", "eval.json", "per_prompt.jsonl", "decisions.json"]
SMOKE = "experiments/smoke.yaml"


class Trials:
    def __init__(self, edpo: str, work: Path):
        self.edpo = str(Path(edpo).resolve())
        self.work = work
        self.rows = []
        self.counter = 0

    def fresh(self, name: str) -> Path:
        self.counter += 1
        d = self.work / f"{self.counter:03d}-{name}"
        d.mkdir(parents=True)
        return d

    def sweep(self, out: Path, grid=SMOKE, extra=(), env=None, check=True):
        args = [self.edpo, "sweep", grid, "--out", str(out), "--report-out", str(out / "report"), *extra]
        p = subprocess.run(args, capture_output=True, text=True, env=env)
        if check and p.returncode != 0:
            raise RuntimeError(f"sweep failed: {' '.join(args)}\n{p.stderr[-2000:]}")
        return p

    def row(self, fault, trials, lost, corrupt, outcome, tests):
        self.rows.append((fault, trials, lost, corrupt, outcome, tests))
        print(f"  {fault}: {trials} trials, {lost} runs lost, {corrupt} corrupt files; {outcome}", file=sys.stderr)


def run_dirs(sweep_root: Path):
    d = sweep_root / "runs"
    return sorted(p for p in d.iterdir() if p.is_dir()) if d.exists() else []


def statuses(sweep_root: Path):
    out = {}
    for d in run_dirs(sweep_root):
        try:
            out[d.name] = json.loads((d / "status.json").read_text())
        except (OSError, ValueError):
            pass
    return out


def unreadable(root: Path):
    """Files that do not parse, and completed statuses without an evaluation."""
    bad = []
    for p in root.rglob("*"):
        if not p.is_file() or ".tmp-" in p.name or p.name.startswith(".tmp"):
            continue
        if any(part.startswith(".tmp") for part in p.relative_to(root).parts):
            continue  # a stage still being built in its private directory
        try:
            if p.suffix == ".json":
                json.loads(p.read_text())
            elif p.suffix == ".jsonl":
                for line in p.read_text().splitlines():
                    json.loads(line)
            elif p.suffix == ".yaml":
                import yaml  # noqa: PLC0415

                yaml.safe_load(p.read_text())
        except Exception as e:  # noqa: BLE001
            bad.append(f"{p}: {e}")
        if p.name == "status.json":
            try:
                if json.loads(p.read_text()).get("state") == "completed" and not (p.parent / "eval.json").exists():
                    bad.append(f"{p}: completed without eval.json")
            except (OSError, ValueError):
                pass
    return bad


def differing(a: Path, b: Path):
    """Run files of sweep root `a` that differ from `b`'s (or are missing)."""
    out = []
    for d in run_dirs(a):
        for f in RUN_FILES:
            x, y = d / f, b / "runs" / d.name / f
            if x.exists() != y.exists() or (x.exists() and x.read_bytes() != y.read_bytes()):
                out.append(str(y))
    if len(run_dirs(a)) != len(run_dirs(b)):
        out.append(f"{len(run_dirs(b))} runs, expected {len(run_dirs(a))}")
    return out


def phase_of(out: Path, name: str):
    root = out / name
    if not (root / "sweep.json").exists():
        return "planning"
    st = statuses(root)
    if not st:
        return "stages"
    if any(s["state"] == "running" for s in st.values()) or len(st) < len(list((root / "plan").iterdir())):
        return "mid-run"
    return "report"


def crash(t: Trials, ref: Path, n: int, seed: int):
    rng = random.Random(seed)
    # Even trials start from an empty stage cache (kills land in stage building too), odd
    # ones from a built cache (kills land in the runs and the report).
    cache = ref.parent / "cache"
    totals = []
    for warm in (False, True):
        probe = t.fresh("crash-probe")
        if warm:
            shutil.copytree(cache, probe / "cache")
        start = time.time()
        t.sweep(probe)
        totals.append(time.time() - start)
    lost = corrupt = identical = 0
    phases = {}
    for i in range(n):
        out = t.fresh(f"crash-{i}")
        warm = i % 2
        if warm:
            shutil.copytree(cache, out / "cache")
        args = [t.edpo, "sweep", SMOKE, "--out", str(out), "--report-out", str(out / "report")]
        p = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        # Stratified over the sweep's duration, so every phase is hit.
        k, m = i // 2, (n + 1 - warm) // 2
        time.sleep((k + rng.random()) / m * totals[warm])
        phase = phase_of(out, "smoke")
        p.send_signal(signal.SIGKILL)
        p.wait()
        phase = phase if p.returncode == -signal.SIGKILL else "after exit"
        phases[phase] = phases.get(phase, 0) + 1
        before = {h: s for h, s in statuses(out / "smoke").items() if s["state"] == "completed"}
        bad = unreadable(out)
        corrupt += len(bad)
        for b in bad:
            print(f"    corrupt after kill {i}: {b}", file=sys.stderr)
        t.sweep(out)
        after = statuses(out / "smoke")
        lost += sum(1 for h, s in before.items() if after.get(h, {}).get("started_unix") != s["started_unix"])
        diff = differing(ref, out / "smoke")
        identical += not diff
        for d in diff[:3]:
            print(f"    differs after resume {i}: {d}", file=sys.stderr)
    where = ", ".join(f"{k} {v}" for k, v in sorted(phases.items()))
    t.row(
        f"SIGKILL of the smoke sweep at a random moment, half from an empty stage cache (killed in: {where}), then resume",
        n, lost, corrupt,
        f"{identical}/{n} resumed sweeps byte-identical to an uninterrupted one",
        "`engine::killed_sweep_resumes_where_it_stopped`",
    )


def disk_full(t: Trials, ref_out: Path):
    if os.geteuid() != 0:
        t.row("disk full (tmpfs)", 0, "-", "-", "not run: mounting a tmpfs needs root", "-")
        return
    def used(d: Path):
        return sum(p.stat().st_blocks * 512 for p in d.rglob("*") if p.is_file())

    cache, runs, report = used(ref_out / "cache"), used(ref_out / "smoke"), used(ref_out / "report")
    need = cache + runs + report
    trials = lost = corrupt = finished = named = 0
    # Room for half the stages; for the stages and half the runs; for all but half the report.
    for when, size in (("stages", cache // 2), ("mid-run", cache + runs // 2), ("report", cache + runs + report // 2)):
        mnt = t.fresh(f"disk-{when}")
        size_k = max(64, size // 1024)
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_k}k", "tmpfs", str(mnt)], capture_output=True, text=True)
        if r.returncode != 0:
            t.row("disk full (tmpfs)", 0, "-", "-", f"not run: mount failed: {r.stderr.strip()}", "-")
            return
        try:
            trials += 1
            p = t.sweep(mnt, check=False)
            if p.returncode != 0 and "No space left" in p.stderr and str(mnt) in p.stderr:
                named += 1
            else:
                print(f"    disk {when}: exit {p.returncode}: {p.stderr[-600:]}", file=sys.stderr)
            before = {h: s for h, s in statuses(mnt / "smoke").items() if s["state"] == "completed"}
            print(f"    disk full {when}: {len(before)} runs completed before the disk filled", file=sys.stderr)
            bad = unreadable(mnt)
            corrupt += len(bad)
            for b in bad:
                print(f"    corrupt on a full disk: {b}", file=sys.stderr)
            subprocess.run(["mount", "-o", f"remount,size={2 * need // 1024 + 1024}k", str(mnt)], check=True)
            t.sweep(mnt)
            after = statuses(mnt / "smoke")
            lost += sum(1 for h, s in before.items() if after.get(h, {}).get("started_unix") != s["started_unix"])
            finished += not differing(ref_out / "smoke", mnt / "smoke")
        finally:
            subprocess.run(["umount", str(mnt)], check=False)
    t.row(
        "disk full: output on a tmpfs that fills during stage building, mid-run and while writing the report; then grown",
        trials, lost, corrupt,
        f"{named}/{trials} failed naming the path and 'No space left'; {finished}/{trials} finished byte-identical after the space was grown",
        "`reliability::a_full_disk_fails_by_name_and_the_resume_finishes` (as root)",
    )


def concurrent(t: Trials, ref: Path, n: int):
    computed_twice = corrupt = ok = 0
    for i in range(n):
        out = t.fresh(f"conc-{i}")
        args = [t.edpo, "sweep", SMOKE, "--out", str(out), "--report-out", str(out / "report")]
        ps = [subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
        outs = [p.communicate() for p in ps]
        computed = {}
        for so, _ in outs:
            for line in so.splitlines():
                f = line.split()
                if len(f) > 2 and f[2] == "completed" and f[0].isdigit():
                    computed[f[1]] = computed.get(f[1], 0) + 1
        computed_twice += sum(1 for c in computed.values() if c > 1)
        corrupt += len(unreadable(out))
        ok += not differing(ref, out / "smoke") and all(s["state"] == "completed" for s in statuses(out / "smoke").values())
    t.row(
        "two `edpo sweep` processes started together on one sweep directory",
        n, 0, corrupt,
        f"{computed_twice} runs computed twice; {ok}/{n} sweeps complete and byte-identical (the second process leaves held runs to the first and says so)",
        "`reliability::two_sweeps_on_one_directory_never_compute_a_run_twice`",
    )


def shared_cache(t: Trials, ref: Path, n: int):
    ok = corrupt = 0
    for i in range(n):
        out = t.fresh(f"cache-{i}")
        other = out / "other.yaml"
        other.write_text(Path(SMOKE).read_text().replace("name: smoke", "name: other").replace("base: sentiment.yaml", f"base: {Path('experiments/sentiment.yaml').resolve()}"))
        a = [t.edpo, "sweep", SMOKE, "--out", str(out), "--report-out", str(out / "ra")]
        b = [t.edpo, "sweep", str(other), "--out", str(out), "--report-out", str(out / "rb"), "--set", "optim.lr=1e-3"]
        ps = [subprocess.Popen(x, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for x in (a, b)]
        codes = [p.wait() for p in ps]
        corrupt += len(unreadable(out))
        ok += codes == [0, 0] and not differing(ref, out / "smoke")
    t.row(
        "two grids started together on one stage cache",
        n, 0, corrupt, f"{ok}/{n}: both complete, the smoke grid byte-identical (a stage both build is built twice, one copy kept)",
        "`reliability::two_sweeps_on_one_directory_never_compute_a_run_twice`",
    )


def damaged_stage(t: Trials, ref: Path):
    kinds = ["truncated", "altered", "added", "manifest removed"]
    detected = rebuilt = trials = 0
    for kind in kinds:
        out = t.fresh("stage-" + kind.replace(" ", "-"))
        t.sweep(out)
        entry = sorted(p for p in (out / "cache").iterdir() if p.is_dir() and p.name.startswith("reference-"))[0]
        victim = max((p for p in entry.rglob("*") if p.is_file() and not p.name.startswith(".")), key=lambda p: p.stat().st_size)
        original = victim.read_bytes()
        if kind == "truncated":
            victim.write_bytes(original[: len(original) // 2])
        elif kind == "altered":
            b = bytearray(original)
            b[len(b) // 2] ^= 0x10
            victim.write_bytes(bytes(b))
        elif kind == "added":
            (entry / "stray.txt").write_text("x")
        else:
            (entry / ".manifest.json").unlink()
        shutil.rmtree(out / "smoke")
        trials += 1
        p = t.sweep(out)
        detected += entry.name in p.stderr
        rebuilt += victim.read_bytes() == original and not (entry / "stray.txt").exists() and not differing(ref, out / "smoke")
    t.row(
        "a cached stage damaged (file truncated, byte altered, file added, manifest removed)",
        trials, 0, 0, f"{detected}/{trials} reported by name, {rebuilt}/{trials} rebuilt byte-identical and the runs byte-identical",
        "`engine::a_damaged_stage_is_detected_and_rebuilt`",
    )


def diverging(t: Trials):
    out = t.fresh("nan")
    base = Path("experiments/synthetic.yaml").resolve()
    grid = out / "grid.yaml"
    grid.write_text(
        f"base: {base}\nname: n\nset: {{task.train_pairs: 64, task.sft_steps: 20, optim.max_grad_norm: 0, optim.schedule: constant, optim.warmup_ratio: 0.0}}\n"
        "axes:\n  optim.lr: [1.0e-3, 1.0e+30]\n"
    )
    p = t.sweep(out, grid=str(grid), check=False)
    st = statuses(out / "n")
    failed = [s for s in st.values() if s["state"] == "failed"]
    good = p.returncode != 0 and "1 of 2 runs failed" in p.stderr and len(failed) == 1 and "non-finite" in json.dumps(failed[0]["error"])
    t.row(
        "a run diverges (learning rate 1e30) beside a healthy one",
        1, 0, len(unreadable(out)),
        ("the run fails alone with its step and 'non-finite' in status.json; the other completes; the sweep exits non-zero naming it" if good else f"UNEXPECTED: exit {p.returncode}, {len(failed)} failed"),
        "`engine::a_diverging_run_fails_alone_and_the_sweep_reports_it`",
    )


def injected(t: Trials, ref: Path):
    plan = subprocess.run([t.edpo, "sweep", SMOKE, "--dry-run"], capture_output=True, text=True, check=True).stdout
    hashes = [l.split()[1] for l in plan.splitlines() if l.split() and l.split()[0].isdigit() and len(l.split()[1]) == 12]
    alone = trials = 0
    for i, (target, what) in enumerate([("loss", "loss"), ("gradient", "gradient norm"), ("parameter", "parameter")]):
        victim = hashes[2 * i]
        out = t.fresh(f"inject-{target}")
        env = dict(os.environ, EDPO_FAULT_NONFINITE=f"{target}@2@{victim}")
        p = t.sweep(out, env=env, check=False)
        st = statuses(out / "smoke")
        trials += 1
        others = [h for h in hashes if h != victim]
        ok = (
            p.returncode != 0
            and "1 of 6 runs failed" in p.stderr
            and st[victim]["state"] == "failed"
            and f"non-finite {what} at optimizer step 2" in json.dumps(st[victim]["error"])
            and all(st[h]["state"] == "completed" for h in others)
            and not [d for d in differing(ref, out / "smoke") if victim not in d]
        )
        alone += ok
    t.row(
        "a non-finite loss, gradient norm or parameter injected at step 2 of one run of six",
        trials, 0, 0,
        f"{alone}/{trials}: that run alone fails with its step and what went non-finite in status.json; the other five byte-identical; the sweep exits non-zero naming it",
        "`reliability::an_injected_nonfinite_value_fails_its_run_alone`",
    )


def determinism(t: Trials):
    sets = ["--set", "model.n_embd=128", "--set", "model.n_layer=2", "--set", "model.n_head=4"]
    outs = []
    for jobs, threads in [(1, 1), (2, 1), (1, 2), (2, 2)]:
        out = t.fresh(f"det-{jobs}-{threads}")
        t.sweep(out, extra=["--jobs", str(jobs), "--threads", str(threads), *sets])
        outs.append(out)
    same = sum(not differing(outs[0] / "smoke", o / "smoke") for o in outs[1:])
    t.row(
        "one grid (smoke, width 128, 2 layers) at --jobs 1/2 × --threads 1/2",
        4, 0, 0, f"{same}/3 byte-identical to --jobs 1 --threads 1",
        "`engine::same_config_and_seed_give_identical_metrics`, `reliability::jobs_and_threads_do_not_change_a_number`",
    )


def mutations(data: bytes, rng: random.Random, flips: int):
    n = len(data)
    for frac in (0.0, 0.01, 0.1, 0.5, 0.9, 0.99):
        yield f"truncated to {int(n * frac)} bytes", data[: int(n * frac)]
    yield "last byte removed", data[:-1]
    for _ in range(flips):
        b = bytearray(data)
        i = rng.randrange(n)
        bit = rng.randrange(8)
        b[i] ^= 1 << bit
        yield f"bit {bit} of byte {i} flipped", bytes(b)


def corrupted_inputs(t: Trials, flips: int, seed: int):
    rng = random.Random(seed)
    golden = Path("testdata/golden")
    pairs = golden / "pairs.jsonl"
    cases = panics = unnamed = rejected = 0
    examples = []

    def check(cmd, name, what):
        nonlocal cases, panics, unnamed, rejected
        cases += 1
        p = subprocess.run(cmd, capture_output=True, text=True)
        if "panicked" in p.stderr or p.returncode == 101 or p.returncode < 0:
            panics += 1
            examples.append(f"PANIC {name} ({what}): {p.stderr[-300:]}")
        elif p.returncode != 0:
            rejected += 1
            if name not in p.stderr:
                unnamed += 1
                if len(examples) < 12:
                    examples.append(f"unnamed {name} ({what}): {p.stderr.strip()[-200:]}")

    work = t.fresh("corrupt")
    for arch in ("gpt2", "llama", "qwen2"):
        src = golden / arch / "policy"
        for f in sorted(src.iterdir()):
            for what, data in mutations(f.read_bytes(), rng, flips):
                d = work / "model"
                shutil.rmtree(d, ignore_errors=True)
                shutil.copytree(src, d)
                (d / f.name).write_bytes(data)
                check([t.edpo, "score", "--policy", str(d), "--reference", str(golden / arch / "reference"),
                       "--data", str(pairs), "--beta", "0.1", "--epsilon", "0.01"], f.name, what)
    for what, data in mutations(pairs.read_bytes(), rng, flips):
        m = work / "pairs.jsonl"
        m.write_bytes(data)
        check([t.edpo, "score", "--policy", str(golden / "gpt2/policy"), "--reference", str(golden / "gpt2/reference"),
               "--data", str(m), "--beta", "0.1", "--epsilon", "0.01"], "pairs.jsonl", what)
    for g in sorted(Path("testdata/gguf").glob("*.gguf")):
        for what, data in mutations(g.read_bytes(), rng, flips):
            m = work / g.name
            m.write_bytes(data)
            check([t.edpo, "convert", "--model", str(m), "--out", str(work / "converted")], g.name, what)
    exp = work / "experiments"
    for y in sorted(Path("experiments").glob("*.yaml")):
        text = y.read_bytes()
        is_grid = b"\nbase:" in b"\n" + text
        for what, data in mutations(text, rng, flips):
            shutil.rmtree(exp, ignore_errors=True)
            shutil.copytree("experiments", exp)
            (exp / y.name).write_bytes(data)
            cmd = [t.edpo, "sweep", str(exp / y.name), "--dry-run"] if is_grid else [t.edpo, "train", str(exp / y.name), "--print-config"]
            check(cmd, y.name, what)
    for e in examples:
        print("    " + e, file=sys.stderr)
    t.row(
        "corrupted inputs: truncations and bit flips of every committed model (config, safetensors, tokenizer), GGUF, pairs and experiment file",
        cases, "-", "-",
        f"{panics} panics; {rejected} rejected, {unnamed} of them without naming the file",
        "`reliability::corrupted_fixtures_never_panic`",
    )


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--edpo", default="target/debug/edpo")
    ap.add_argument("--crashes", type=int, default=24)
    ap.add_argument("--concurrent", type=int, default=5)
    ap.add_argument("--flips", type=int, default=12)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", default="")
    a = ap.parse_args()
    only = set(filter(None, a.only.split(",")))
    want = lambda k: not only or k in only  # noqa: E731
    with tempfile.TemporaryDirectory(prefix="edpo-reliability-") as tmp:
        t = Trials(a.edpo, Path(tmp))
        ref_out = t.fresh("reference")
        t.sweep(ref_out)
        ref = ref_out / "smoke"
        if want("crash"):
            crash(t, ref, a.crashes, a.seed)
        if want("disk"):
            disk_full(t, ref_out)
        if want("concurrent"):
            concurrent(t, ref, a.concurrent)
            shared_cache(t, ref, max(1, a.concurrent // 2))
        if want("stage"):
            damaged_stage(t, ref)
        if want("nan"):
            diverging(t)
            injected(t, ref)
        if want("determinism"):
            determinism(t)
        if want("corrupt"):
            corrupted_inputs(t, a.flips, a.seed)
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "unknown CPU")
    print("| fault | trials | runs lost | corrupt files | outcome | kept true in CI by |")
    print("|---|---|---|---|---|---|")
    for r in t.rows:
        print("| " + " | ".join(str(x) for x in r) + " |")
    print(f"\n`python3 tools/reliability.py --edpo {a.edpo} --crashes {a.crashes} --seed {a.seed}` on {cpu}, {os.cpu_count()} cores, {time.strftime('%Y-%m-%d')}.")


if __name__ == "__main__":
    main()
