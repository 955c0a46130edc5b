"""Writes the small preference-data samples the readers' tests read (testdata/preferences/):
one file per layout and format users bring, shaped like the public datasets (TRL's standard
and conversational layouts, UltraFeedback-binarized in a Hugging Face cache tree with its
`train_prefs` / `test_prefs` Parquet splits, Anthropic HH-RLHF, pre-tokenised columns), a
file with one bad row per rule, a file whose rows mix layouts, and a damaged Parquet file.

Needs pyarrow. Run from the repository root: python3 tools/make_preference_samples.py
"""
import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

ROOT = Path("testdata/preferences")


def jsonl(name, rows):
    (ROOT / name).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def msg(role, content):
    return {"role": role, "content": content}


STANDARD = [
    {"prompt": "The movie was", "chosen": " wonderful and moving.", "rejected": " dull."},
    {"prompt": "Rate the plot:", "chosen": " tight and clever", "rejected": " a mess"},
    {"prompt": "In short, the acting", "chosen": " shines.", "rejected": " falls flat."},
]

IMPLICIT = [
    # A shared final word: the prompt must not cut into `yes` / `yesterday`.
    {"chosen": "Was it good? It is yes", "rejected": "Was it good? It is yesterday's news"},
    {"chosen": "Q: Best scene? A: The ending.", "rejected": "Q: Best scene? A: None."},
    {"chosen": "Summary: a triumph of style", "rejected": "Summary: a waste of time"},
]

CONVERSATIONAL = [
    {
        "prompt": [msg("system", "You are a film critic."), msg("user", "Review Alien in one line.")],
        "chosen": [msg("assistant", "A taut, terrifying classic.")],
        "rejected": [msg("assistant", "It is a movie.")],
    },
    {
        # Multi-turn, the prompt implicit: the messages both share up to the last user turn.
        "chosen": [msg("user", "Hi"), msg("assistant", "Hello!"), msg("user", "Name a comedy."),
                   msg("assistant", "Groundhog Day.")],
        "rejected": [msg("user", "Hi"), msg("assistant", "Hello!"), msg("user", "Name a comedy."),
                     msg("assistant", "No.")],
    },
]


def ultrafeedback_rows(n, offset):
    rows = []
    for i in range(n):
        prompt = f"Write a tagline for film number {offset + i}."
        rows.append({
            "prompt": prompt,
            "prompt_id": f"{offset + i:064x}",
            "chosen": [msg("user", prompt), msg("assistant", f"Film {offset + i}: you will never forget it.")],
            "rejected": [msg("user", prompt), msg("assistant", "A film.")],
            "messages": [msg("user", prompt), msg("assistant", f"Film {offset + i}: you will never forget it.")],
            "score_chosen": 8.5,
            "score_rejected": 3.0 + i % 3,
        })
    return rows


HH = [
    {
        "chosen": "\n\nHuman: What should I watch tonight?\n\nAssistant: Try a classic like Casablanca.",
        "rejected": "\n\nHuman: What should I watch tonight?\n\nAssistant: Nothing.",
    },
    {
        "chosen": "\n\nHuman: Hi\n\nAssistant: Hello.\n\nHuman: Is Jaws scary?\n\nAssistant: Yes, famously so.",
        "rejected": "\n\nHuman: Hi\n\nAssistant: Hello.\n\nHuman: Is Jaws scary?\n\nAssistant: Sharks are fish.",
    },
]

TOKENIZED = {
    "prompt_input_ids": [[1, 2, 3], [4, 5]],
    "chosen_input_ids": [[6, 7, 0], [8, 0]],
    "rejected_input_ids": [[9, 0], [10, 11, 0]],
}

# One row per bad-row rule, in Rule order, after one good row.
BAD = [
    {"prompt": "ok", "chosen": " good", "rejected": " bad"},
    {"prompt": "missing rejected", "chosen": " x"},
    {"prompt": "wrong type", "chosen": 7, "rejected": " y"},
    {"prompt": "empty", "chosen": "   ", "rejected": " y"},
    {"prompt": "same", "chosen": " y", "rejected": " y"},
]

BAD_CONVERSATIONAL = [
    {"prompt": [msg("user", "a")], "chosen": [msg("assistant", "b")], "rejected": [msg("assistant", "c")]},
    {"prompt": [msg("user", "a")], "chosen": [msg("user", "b")], "rejected": [msg("assistant", "c")]},
]

MIXED = STANDARD[:2] + [CONVERSATIONAL[0]]

# Prompts whose last characters merge with the response's first under byte-level BPE, for the
# joint tokenisation's prefix check.
BOUNDARY = [
    {"prompt": "It was t", "chosen": "he best", "rejected": "ame"},
    {"prompt": "a", "chosen": "nd so", "rejected": " bit"},
]


def main():
    shutil.rmtree(ROOT, ignore_errors=True)
    ROOT.mkdir(parents=True)
    jsonl("standard.jsonl", STANDARD)
    (ROOT / "standard.json").write_text(json.dumps(STANDARD, ensure_ascii=False))
    pacsv.write_csv(pa.Table.from_pylist(STANDARD), ROOT / "standard.csv")
    jsonl("implicit.jsonl", IMPLICIT)
    jsonl("conversational.jsonl", CONVERSATIONAL)
    jsonl("hh.jsonl", HH)
    pq.write_table(pa.table(TOKENIZED), ROOT / "tokenized.parquet")
    jsonl("bad.jsonl", BAD)
    jsonl("bad-conversational.jsonl", BAD_CONVERSATIONAL)
    jsonl("mixed.jsonl", MIXED)
    jsonl("boundary.jsonl", BOUNDARY)
    # UltraFeedback-binarized as the hub cache stores it (offline reading of `hf:` names).
    repo = ROOT / "hub/datasets--HuggingFaceH4--ultrafeedback_binarized"
    rev = "3949bf5f8c17c394422ccfab0c31ea9c20bdeb85"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs/main").write_text(rev)
    data = repo / "snapshots" / rev / "data"
    data.mkdir(parents=True)
    for split, n, offset in [("train_prefs", 6, 0), ("test_prefs", 3, 100)]:
        pq.write_table(pa.Table.from_pylist(ultrafeedback_rows(n, offset)), data / f"{split}-00000-of-00001.parquet")
    whole = (data / "train_prefs-00000-of-00001.parquet").read_bytes()
    (ROOT / "damaged.parquet").write_bytes(whole[: len(whole) // 2])


if __name__ == "__main__":
    main()
