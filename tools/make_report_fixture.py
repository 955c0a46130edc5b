"""Writes the small sweep directory the report test reads (crates/edpo-report/tests/fixture).

Two DPO and two ε-DPO settings with two seeds each, plus a failed run, an unfinished run and
a completed run of the older config version 1, and a manifest (`sweep.json`) that plans one
more run, not started (pending), and the public judges' results in `judges/` (AlpacaEval's
leaderboard CSV, Arena-Hard's score table, MT-Bench judgments) for two runs and one model that
is no run. ε = 0.05 has the best test win rate but not
the best validation win rate, so a report that chose on test numbers would pick it.

Every completed run has per-prompt paired numbers (`per_prompt.jsonl`, 64 prompts, at steps 4
and 8) whose means are the run's numbers exactly: a prompt effect shared by all runs of a seed
(which pairing cancels) plus a run's own noise, small for win rate and KL (so a paired test
separates the best from the runner-up) and large for the reward gain (so it does not).
Run from the repository root: python3 tools/make_report_fixture.py
"""
import json
import random
import shutil
from pathlib import Path

ROOT = Path("crates/edpo-report/tests/fixture")


def write(path: Path, value) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value, indent=2, ensure_ascii=False) + "\n")


def objective(kind, **params):
    return {"kind": kind, **params, "sft_weight": 0.0, "reference_logps": "online"}


PROMPTS = 64


def per_prompt(mean, seed, shared, own, salt):
    """64 values with mean exactly `mean`: ± a seed-shared prompt effect ± a run's own noise."""
    rng = random.Random(salt)
    out = []
    for p in range(PROMPTS):
        s = shared * (1 if (p * 7 + seed) % 2 == 0 else -1) * (1 + (p % 4)) / 2.5
        o = own * rng.choice([-1, 1])
        out.append(mean + s + o)
    m = sum(out) / PROMPTS
    return [v - m + mean for v in out]


def run(name, obj, seed, win, kl, val, state="completed", version=3):
    d = ROOT / "runs" / name
    write(d / "status.json", {"state": state})
    cfg = {"objective": obj, "run": {"seed": seed}}
    if version is not None:
        cfg = {"config_version": version, **cfg}
    write(d / "config.json", cfg)
    if state != "completed":
        return
    write(d / "eval.json", {"win_rate": win, "kl": kl, "gold_reward": win - 0.5,
                            "reward_diff": win - 0.5,
                            "preference_accuracy": 0.6, "mean_length": 20.0 + seed,
                            "val_win_rate": val})
    salt = name
    pp = []
    for step in (4, 8):
        frac = step / 8
        pp.append({"step": step,
                   "win": per_prompt(0.5 + (win - 0.5) * frac, seed, 0.2, 0.01, salt),
                   "reward_diff": per_prompt((win - 0.5) * frac, seed, 0.2, 1.0, salt),
                   "kl": per_prompt(kl * frac, seed, 0.5, 0.05, salt)})
    (d / "per_prompt.jsonl").write_text("".join(json.dumps(l) + "\n" for l in pp))
    eps = obj["kind"] == "epsilon_dpo"
    lines = []
    for step in range(8):
        line = {"step": step, "loss": 0.69 - 0.01 * step, "rewards/margins": 0.1 * step,
                "rewards/accuracies": 0.5 + 0.03 * step}
        if eps:
            line.update({"kl/beta": 0.1 - 0.001 * step, "kl/p_epsilon_steps": 0.5,
                         "kl/n_epsilon_steps": 0.25})
        lines.append(line)
        if step in (3, 7):
            frac = (step + 1) / 8
            lines.append({"step": step + 1, "eval/kl": kl * frac,
                          "eval/win_rate": 0.5 + (win - 0.5) * frac,
                          "eval/gold_reward": (win - 0.5) * frac,
                          "eval/val_win_rate": 0.5 + (val - 0.5) * frac})
    (d / "metrics.jsonl").write_text("".join(json.dumps(l) + "\n" for l in lines))
    if eps:
        edges = [k / 10 for k in range(11)]
        write(d / "decisions.json", {
            "p_true_edges": edges,
            "relaxed": [0, 1, 2, 3, 4, 6, 8, 10, 12, 14],
            "kept": [0, 4, 4, 4, 4, 4, 4, 4, 4, 4],
            "strengthened": [0, 5, 4, 3, 2, 2, 1, 1, 0, 0],
        })


def main() -> None:
    shutil.rmtree(ROOT / "runs", ignore_errors=True)
    dpo = lambda b: objective("dpo", beta=b)
    eps = lambda e: objective("epsilon_dpo", beta=0.1, epsilon=e)
    run("a0", dpo(0.1), 0, 0.60, 2.0, 0.58)
    run("a1", dpo(0.1), 1, 0.70, 3.0, 0.62)
    run("b0", dpo(0.5), 0, 0.55, 1.0, 0.56)
    run("b1", dpo(0.5), 1, 0.55, 1.2, 0.54)
    run("c0", eps(0.01), 0, 0.65, 2.5, 0.66)
    run("c1", eps(0.01), 1, 0.75, 2.7, 0.70)
    run("d0", eps(0.05), 0, 0.80, 4.0, 0.60)
    run("d1", eps(0.05), 1, 0.80, 4.0, 0.60)
    run("e0", eps(0.05), 2, 0.5, 9.0, 0.5, state="failed")
    run("f0", eps(0.05), 3, 0.5, 9.0, 0.5, state="running")
    run("g0", dpo(0.1), 2, 0.99, 0.1, 0.99, version=None)
    names = sorted(p.name for p in (ROOT / "runs").iterdir()) + ["h0"]
    judges = ROOT / "judges"
    shutil.rmtree(judges, ignore_errors=True)
    judges.mkdir()
    (judges / "alpaca_eval_leaderboard.csv").write_text(
        ",length_controlled_winrate,win_rate,standard_error,n_total,avg_length\n"
        "dpo-a0,20.5,18.25,1.1,805,1500\n"
        "epsilon-dpo-c0,22.75,19.5,1.2,805,1480\n"
        "base-model,10.0,8.0,0.9,805,900\n"
    )
    (judges / "arena_hard_leaderboard.csv").write_text(
        'model,score,CI,avg_tokens\n'
        'dpo-a0,12.3,"(-1.1, +1.4)",500\n'
        'epsilon-dpo-c0,13.0,"(-1.0, +1.2)",480\n'
    )
    judgments = [("dpo-a0", s) for s in (8, 6, 7, -1)] + [("epsilon-dpo-c0", s) for s in (7, 7, 9)]
    (judges / "mt_bench_judgment.jsonl").write_text("".join(
        json.dumps({"question_id": 81 + i, "model": m, "judge": ["gpt-4", "single-v1"], "score": s, "turn": 1})
        + "\n" for i, (m, s) in enumerate(judgments)
    ))
    write(ROOT / "sweep.json", {
        "name": "fixture",
        "grid": "grid.yaml",
        "cache": "cache",
        "runs": [{"index": i, "hash": n, "overrides": ""} for i, n in enumerate(names)],
    })


if __name__ == "__main__":
    main()
