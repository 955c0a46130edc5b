#!/usr/bin/env python3
"""A PEFT LoRA adapter on the golden tiny Llama, and the values edpo must reproduce with it.

Builds a LoRA adapter with PEFT (r 4, alpha 8, on q_proj, v_proj and down_proj, no dropout),
sets its A and B matrices to seeded values (B non-zero, so the adapter changes the model),
saves it with `save_pretrained` to `testdata/lora/adapter/` (PEFT's own files), and records
in `testdata/lora/golden.json` the sequence log-probs of the adapted model on fixed sequences
and, for every adapter matrix, the norm of the gradient of their sum. Needs torch,
transformers and peft:

    python3 tools/make_lora_golden.py
"""
import importlib.metadata
import json
import pathlib

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

ROOT = pathlib.Path(__file__).resolve().parent.parent
BASE = ROOT / "testdata/golden/llama/policy"
OUT = ROOT / "testdata/lora"


def sequences():
    seqs = []
    for i in range(4):
        prompt = [(k * 37 + i * 11) % 320 for k in range(3 + i)]
        response = [(k * 53 + i * 7 + 1) % 320 for k in range(5 + i)]
        seqs.append((prompt, response))
    return seqs


def main():
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(BASE), dtype=torch.float32)
    cfg = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "down_proj"],
                     bias="none", task_type="CAUSAL_LM")
    model = get_peft_model(model, cfg)
    gen = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    model.save_pretrained(str(OUT / "adapter"))
    # Keep PEFT's two files, with the base named relative to the repository.
    (OUT / "adapter/README.md").unlink(missing_ok=True)
    config_path = OUT / "adapter/adapter_config.json"
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = "testdata/golden/llama/policy"
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    model.zero_grad()
    total = 0.0
    logps = []
    for prompt, response in sequences():
        lp = torch.log_softmax(model(torch.tensor([prompt + response])).logits[0], -1)
        s = sum(lp[len(prompt) - 1 + j, t] for j, t in enumerate(response))
        logps.append(s.item())
        total = total + s
    total.backward()
    grads = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            # PEFT's name of the parameter; the saved file drops the adapter name ("default").
            grads[name.replace(".default", "")] = p.grad.norm().item()
    out = {
        "versions": {k: importlib.metadata.version(k) for k in ("torch", "transformers", "peft")},
        "logps": logps,
        "grad_norms": grads,
    }
    (OUT / "golden.json").write_text(json.dumps(out, indent=1, sort_keys=True) + "\n")
    print(len(grads), "adapter matrices")


if __name__ == "__main__":
    main()
