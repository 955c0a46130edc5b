#!/usr/bin/env python3
"""Writes the tiny GGUF fixtures of `testdata/gguf/` from the golden Llama checkpoint.

`testdata/golden/llama/policy` (safetensors, from `tools/make_golden.py`) is written as a
`llama`-architecture GGUF file the way llama.cpp's `convert_hf_to_gguf.py` writes one: its
tensor names, its metadata keys, and the q and k projections with their rows permuted
(`reshape(heads, 2, hd/2, in).swapaxes(1, 2)`). Four files: every tensor in F32; matrices in
F16; matrices in Q8_0; matrices in Q4_0 (norms stay F32, as llama.cpp keeps them).

`expected.json` records, for every file and every tensor under its Hugging Face name, the sum
and the sum of squares (float64) of the values `gguf`'s own dequantisation gives, with the
permutation undone: what the Rust loader must reproduce; and the sequence log-probs
`transformers` computes loading each GGUF file itself. Needs gguf, torch and transformers:

    pip install gguf==0.19.0 torch transformers accelerate
    python3 tools/make_gguf_fixture.py
"""
import importlib.metadata
import json
import pathlib
import struct

import gguf
import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent
SRC = ROOT / "testdata/golden/llama/policy"
OUT = ROOT / "testdata/gguf"


def read_safetensors(path):
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    data = raw[8 + n :]
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        assert info["dtype"] == "F32", info
        a, b = info["data_offsets"]
        out[name] = np.frombuffer(data[a:b], dtype=np.float32).reshape(info["shape"]).copy()
    return out


# ChatML, as a chat template a GGUF file carries (`tokenizer.chat_template`).
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content']"
    " + '<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def permute(w, heads):
    """llama.cpp's converter on q_proj / k_proj."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute(w, heads):
    return w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_name(hf):
    if hf == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf == "model.norm.weight":
        return "output_norm.weight"
    if hf == "lm_head.weight":
        return "output.weight"
    _, _, layer, *module, kind = hf.split(".")
    module = ".".join(module)
    short = {
        "input_layernorm": "attn_norm",
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "post_attention_layernorm": "ffn_norm",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
    }[module]
    return f"blk.{layer}.{short}.{kind}"


def main():
    cfg = json.loads((SRC / "config.json").read_text())
    tok = json.loads((SRC / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    special = {a["id"] for a in tok["added_tokens"] if a["special"]}
    token_types = [3 if i in special else 1 for i in range(len(tokens))]
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
    weights = read_safetensors(SRC / "model.safetensors")
    heads, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    theta = cfg.get("rope_theta") or cfg["rope_parameters"]["rope_theta"]
    T = gguf.GGMLQuantizationType
    expected = {}
    files = [("f32", T.F32), ("f16", T.F16), ("q8_0", T.Q8_0), ("q4_0", T.Q4_0), ("bad-pre", T.Q4_0)]
    for label, matrix_type in files:
        path = OUT / f"tiny-llama-{label}.gguf"
        w = gguf.GGUFWriter(str(path), "llama", use_temp_file=False)
        w.add_name("tiny-llama")
        w.add_context_length(cfg["max_position_embeddings"])
        w.add_embedding_length(cfg["hidden_size"])
        w.add_block_count(cfg["num_hidden_layers"])
        w.add_feed_forward_length(cfg["intermediate_size"])
        w.add_rope_dimension_count(cfg["head_dim"])
        w.add_head_count(heads)
        w.add_head_count_kv(kv)
        w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
        w.add_rope_freq_base(float(theta))
        w.add_bos_token_id(cfg["bos_token_id"])
        w.add_eos_token_id(cfg["eos_token_id"])
        # The checkpoint's byte-level BPE, as llama.cpp's converter stores a `gpt2` vocabulary.
        w.add_tokenizer_model("gpt2")
        # The last file names a pre-tokenizer no loader knows, for the error test.
        w.add_tokenizer_pre("mystery" if label == "bad-pre" else "gpt-2")
        w.add_token_list(tokens)
        w.add_token_types(token_types)
        w.add_token_merges(merges)
        w.add_chat_template(CHAT_TEMPLATE)
        sums = {}
        for hf, value in sorted(weights.items()):
            stored = value
            if hf.endswith("q_proj.weight"):
                stored = permute(value, heads)
            elif hf.endswith("k_proj.weight"):
                stored = permute(value, kv)
            qtype = matrix_type if value.ndim == 2 else T.F32
            if qtype == T.F32:
                data = stored.astype(np.float32)
            elif qtype == T.F16:
                data = stored.astype(np.float16)
            else:
                data = gguf.quants.quantize(stored, qtype)
            w.add_tensor(gguf_name(hf), data, raw_dtype=qtype)
            back = gguf.quants.dequantize(data, qtype).astype(np.float64).reshape(value.shape)
            if hf.endswith("q_proj.weight"):
                back = unpermute(back, heads)
            elif hf.endswith("k_proj.weight"):
                back = unpermute(back, kv)
            # A checksum that also sees the row order: rows weighted by their index.
            rows = np.arange(1, back.shape[0] + 1, dtype=np.float64)
            weighted = float((back.reshape(back.shape[0], -1).sum(axis=1) * rows).sum())
            sums[hf] = {"sum": float(back.sum()), "sum_sq": float((back * back).sum()), "row_weighted": weighted}
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        if label != "bad-pre":
            expected[label] = sums
        print(f"wrote {path.relative_to(ROOT)} ({path.stat().st_size} bytes)")
    # A file of an architecture the loader does not implement, for the error test.
    w = gguf.GGUFWriter(str(OUT / "falcon-no-tensors.gguf"), "falcon", use_temp_file=False)
    w.add_block_count(1)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    # Golden log-probs: `transformers` loading each GGUF file itself (its own dequantisation,
    # names, permutation and config), on the sequences of `crates/edpo-model/tests/gguf.rs`.
    import torch
    from transformers import AutoModelForCausalLM

    seqs = []
    for i in range(4):
        prompt = [(k * 37 + i * 11) % 320 for k in range(3 + i)]
        response = [(k * 53 + i * 7 + 1) % 320 for k in range(5 + i)]
        seqs.append((prompt, response))
    logps = {}
    for label, _ in files:
        if label == "bad-pre":
            continue
        name = f"tiny-llama-{label}.gguf"
        model = AutoModelForCausalLM.from_pretrained(str(OUT), gguf_file=name, dtype=torch.float32)
        model.eval()
        out = []
        with torch.no_grad():
            for prompt, response in seqs:
                lp = torch.log_softmax(model(torch.tensor([prompt + response])).logits[0], -1)
                out.append(sum(lp[len(prompt) - 1 + j, t].item() for j, t in enumerate(response)))
        logps[label] = out
    version = importlib.metadata.version("gguf")
    (OUT / "expected.json").write_text(json.dumps({"gguf": version, "transformers": importlib.metadata.version("transformers"),
                    "torch": importlib.metadata.version("torch"), "files": expected, "logps": logps}, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
