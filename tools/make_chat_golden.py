#!/usr/bin/env python3
"""Golden chat-template renderings from `transformers`' `apply_chat_template`.

For the templates edpo knows by name (ChatML, Llama-3, SmolLM2's as its checkpoints carry it)
and one that raises, renders several conversations (with and without a system message,
multi-turn, with and without the generation prompt) exactly as `transformers` does, and
writes them to `testdata/chat/golden.json`. Needs transformers and tokenizers:

    python3 tools/make_chat_golden.py
"""
import importlib.metadata
import json
import pathlib

from transformers import PreTrainedTokenizerFast

ROOT = pathlib.Path(__file__).resolve().parent.parent
TEMPLATES = json.loads((ROOT / "testdata/chat/templates.json").read_text())
CONVERSATIONS = [
    [{"role": "user", "content": "What is 2+2?"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi"}],
    [
        {"role": "user", "content": "Review this film: "},
        {"role": "assistant", "content": " A slow, lovely film. "},
        {"role": "user", "content": "Shorter, please."},
    ],
]


def main():
    tok = PreTrainedTokenizerFast(tokenizer_file=str(ROOT / "testdata/golden/llama/policy/tokenizer.json"))
    cases = []
    for name, spec in TEMPLATES.items():
        tok.chat_template = spec["template"]
        tok.bos_token, tok.eos_token = spec["bos_token"], spec["eos_token"]
        for messages in CONVERSATIONS:
            for gen in (False, True):
                try:
                    rendered = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
                    case = {"rendered": rendered}
                except Exception as e:  # the template's own raise_exception
                    case = {"error": str(e)}
                cases.append({"template": name, "messages": messages, "add_generation_prompt": gen, **case})
    out = {"transformers": importlib.metadata.version("transformers"), "cases": cases}
    (ROOT / "testdata/chat/golden.json").write_text(json.dumps(out, indent=1, ensure_ascii=False) + "\n")
    print(f"{len(cases)} cases")


if __name__ == "__main__":
    main()
