"""Writes small question files in the public judges' formats (testdata/judges/), for the tests
of `edpo generate`: AlpacaEval 2 (a JSON list of {instruction, dataset}), Arena-Hard-Auto v2
(JSON lines {uid, category, prompt}) and MT-Bench (FastChat's JSON lines {question_id,
category, turns}). The questions are made up here; the benchmarks' own files are not shipped.

Run from the repository root: python3 tools/make_judge_samples.py
"""
import json
from pathlib import Path

ROOT = Path("testdata/judges")

ALPACA = [
    {"instruction": "Name a film by Akira Kurosawa.", "dataset": "helpful_base"},
    {"instruction": "Write one sentence about the sea.", "dataset": "koala"},
    {"instruction": "What is two plus two?", "dataset": "selfinstruct"},
]

ARENA = [
    {"uid": "0a1b2c3d", "category": "hard_prompt", "prompt": "Explain recursion to a child."},
    {"uid": "4e5f6a7b", "category": "creative_writing", "prompt": "Write a haiku about rain."},
]

MT_BENCH = [
    {"question_id": 81, "category": "writing", "turns": ["Write a short travel note about Kyoto.", "Rewrite it as a limerick."]},
    {"question_id": 111, "category": "math", "turns": ["What is 3 times 7?", "And divided by 3?"]},
    {"question_id": 131, "category": "stem", "turns": ["What is a photon?", "Who named it?"]},
]


def main():
    ROOT.mkdir(parents=True, exist_ok=True)
    (ROOT / "alpaca_eval.json").write_text(json.dumps(ALPACA, indent=1) + "\n")
    (ROOT / "arena_hard_question.jsonl").write_text("".join(json.dumps(q) + "\n" for q in ARENA))
    (ROOT / "mt_bench_question.jsonl").write_text("".join(json.dumps(q) + "\n" for q in MT_BENCH))


if __name__ == "__main__":
    main()
