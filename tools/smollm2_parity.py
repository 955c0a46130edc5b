#!/usr/bin/env python3
"""SmolLM2 from its GGUF file: edpo against `transformers` loading the same file.

Converts the GGUF with `edpo convert`, scores preference pairs with `edpo score` (prompt and
response tokenised apart, EOS appended to the response), and computes the same sequence
log-probs with `transformers` (`from_pretrained(..., gguf_file=...)`, dequantised to f32), and
the token ids of every text with both tokenizers. Prints the table and the largest
differences. Needs torch, transformers, gguf and accelerate (`transformers` loads a GGUF file
only with it), and peft for `--adapter`; the file from `tools/fetch_smollm2.sh`:

    python3 tools/smollm2_parity.py --edpo target/debug/edpo

With `--adapter DIR` (a PEFT LoRA directory, e.g. the `adapter/` a LoRA run writes), edpo
merges the adapter into the model (`edpo convert --adapter`) and `transformers` loads the same
adapter with PEFT (`PeftModel.from_pretrained`): a check that PEFT reads the adapters edpo saves
and that the merge is PEFT's.
"""
import argparse
import json
import pathlib
import subprocess
import tempfile

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

ROOT = pathlib.Path(__file__).resolve().parent.parent
PAIRS = [
    {"prompt": "The capital of France is", "chosen": " Paris, a city known for the Eiffel Tower.",
     "rejected": " Tower Eiffel the for known city a Paris,."},
    {"prompt": "Water boils at a temperature of", "chosen": " 100 degrees Celsius at sea level.",
     "rejected": " level sea at Celsius degrees 100."},
    {"prompt": "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
     "chosen": "2 + 2 = 4.", "rejected": "The moon is made of cheese."},
    {"prompt": "<|im_start|>user\nWrite a one-line review of a good movie.<|im_end|>\n<|im_start|>assistant\n",
     "chosen": "A moving, beautifully acted film that stays with you.",
     "rejected": "Terrible, boring and far too long."},
]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gguf", default=str(ROOT / "models/SmolLM2-135M-Instruct.Q4_1.gguf"))
    ap.add_argument("--edpo", default=str(ROOT / "target/debug/edpo"))
    ap.add_argument("--adapter", help="a PEFT LoRA adapter directory written by edpo")
    args = ap.parse_args()
    gguf = pathlib.Path(args.gguf)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        hf = tmp / "hf"
        merge = ["--adapter", args.adapter] if args.adapter else []
        subprocess.run([args.edpo, "convert", "--model", str(gguf), "--out", str(hf), *merge], check=True)
        data = tmp / "pairs.jsonl"
        data.write_text("".join(json.dumps(p) + "\n" for p in PAIRS))
        out = subprocess.run(
            [args.edpo, "score", "--policy", str(hf), "--reference", str(hf), "--data", str(data),
             "--beta", "0.1", "--epsilon", "0.01"],
            check=True, capture_output=True, text=True,
        )
        ours = json.loads(out.stdout)["pairs"]
        from tokenizers import Tokenizer  # noqa: the file edpo wrote

        our_tok = Tokenizer.from_file(str(hf / "tokenizer.json"))
    eos = 2  # config eos_token_id, appended by edpo's convention
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    if args.adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, args.adapter)
    model.eval()
    torch.set_grad_enabled(False)

    def ids(text):
        return tok(text, add_special_tokens=False)["input_ids"]

    def logp(prompt, response):
        p, r = ids(prompt), ids(response) + [eos]
        x = torch.tensor([p + r])
        logits = model(x).logits[0].float()
        lp = torch.log_softmax(logits, -1)
        return sum(lp[len(p) - 1 + i, t].item() for i, t in enumerate(r))

    worst_abs = worst_rel = 0.0
    token_mismatch = 0
    print(f"{'pair':>4}  {'side':<8} {'edpo':>12} {'transformers':>13} {'abs diff':>10}")
    for i, (pair, mine) in enumerate(zip(PAIRS, ours)):
        for side in ("chosen", "rejected"):
            theirs = logp(pair["prompt"], pair[side])
            found = mine[f"{side}_logp"]
            d = abs(found - theirs)
            worst_abs, worst_rel = max(worst_abs, d), max(worst_rel, d / abs(theirs))
            print(f"{i:>4}  {side:<8} {found:>12.5f} {theirs:>13.5f} {d:>10.2e}")
        for text in (pair["prompt"], pair["chosen"], pair["rejected"]):
            if our_tok.encode(text, add_special_tokens=False).ids != ids(text):
                token_mismatch += 1
                print("token ids differ:", repr(text))
    print(f"largest difference: {worst_abs:.2e} nats absolute, {worst_rel:.2e} relative; "
          f"texts whose token ids differ: {token_mismatch} of {3 * len(PAIRS)}")


if __name__ == "__main__":
    main()
