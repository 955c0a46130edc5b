"""Reference token ids for the two tokenisation conventions (crates/edpo-data/src/tokenization.rs),
computed with `transformers` on the committed preference samples: the golden GPT-2 tokenizer
(byte-level BPE), conversations rendered by `apply_chat_template` with the ChatML template of
testdata/chat/templates.json. Writes testdata/preferences/tokenization.json.

- separate: prompt and response tokenised apart without special tokens, EOS id appended;
- joint (TRL >= 0.29's data path, reimplemented from its documented steps): EOS string appended
  to plain-text responses, `prompt` and `prompt + response` tokenised whole, the response's ids
  taken after the prompt's length;
- a truncation case: max_prompt_length 3 keeps the prompt's last 3 ids, max_length 6 the
  responses' first 6 - 3 ids.

Needs transformers. Run from the repository root: python3 tools/make_tokenization_golden.py
"""
import json
from pathlib import Path

from transformers import PreTrainedTokenizerFast

ROOT = Path("testdata/preferences")
tok = PreTrainedTokenizerFast(tokenizer_file="testdata/golden/gpt2/policy/tokenizer.json", eos_token="<|endoftext|>")
CHATML = json.load(open("testdata/chat/templates.json"))["chatml"]
if isinstance(CHATML, dict):
    CHATML = CHATML["template"]


def ids(text):
    return tok(text, add_special_tokens=False)["input_ids"]


def texts(row):
    if isinstance(row.get("chosen"), str):
        return row["prompt"], row["chosen"], row["rejected"], False
    prompt = row["prompt"]
    p = tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True, chat_template=CHATML)
    out = []
    for side in ("chosen", "rejected"):
        whole = tok.apply_chat_template(prompt + row[side], tokenize=False, chat_template=CHATML)
        assert whole.startswith(p)
        out.append(whole[len(p):])
    return p, out[0], out[1], True


def tokenize(row, convention, max_length=None, max_prompt_length=None):
    p, c, r, conversational = texts(row)
    mismatch = False
    if convention == "separate":
        prompt = ids(p)
        sides = [ids(c) + [tok.eos_token_id], ids(r) + [tok.eos_token_id]]
    else:
        eos = "" if conversational else tok.eos_token
        prompt = ids(p)
        sides = []
        for t in (c, r):
            whole = ids(p + t + eos)
            mismatch |= whole[: len(prompt)] != prompt
            sides.append(whole[len(prompt):])
    if max_prompt_length is not None and len(prompt) > max_prompt_length:
        prompt = prompt[len(prompt) - max_prompt_length:]
    if max_length is not None:
        room = max(0, max_length - len(prompt))
        sides = [s[:room] for s in sides]
    return {"prompt": prompt, "chosen": sides[0], "rejected": sides[1], "prefix_mismatch": mismatch}


def main():
    cases = []
    for name in ("standard.jsonl", "conversational.jsonl", "boundary.jsonl"):
        for i, line in enumerate(open(ROOT / name)):
            row = json.loads(line)
            if "prompt" not in row:
                continue  # the implicit multi-turn row: its prompt is extracted by the reader
            for convention in ("separate", "joint"):
                cases.append({"file": name, "row": i + 1, "convention": convention, "budget": None,
                              **tokenize(row, convention)})
            cases.append({"file": name, "row": i + 1, "convention": "separate",
                          "budget": {"max_length": 6, "max_prompt_length": 3},
                          **tokenize(row, "separate", 6, 3)})
    (ROOT / "tokenization.json").write_text(json.dumps(cases, indent=1) + "\n")
    print(f"{len(cases)} cases")


if __name__ == "__main__":
    main()
