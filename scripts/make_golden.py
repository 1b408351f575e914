#!/usr/bin/env python3
"""Golden greedy continuations and logits for the tiny checkpoints, made with Hugging Face
transformers (LlamaForCausalLM in FP32 on the CPU: the reference, no TF32, no fused kernels).

For every checkpoint directory under --data (tests/data/tiny/*) it writes beside the weights:
  golden.json                 prompts, greedy token ids, the smallest top-1/top-2 logit margin
  golden_logits.safetensors   "prompt{i}": F32 [steps, vocab], the logits each token was chosen from
A checkpoint with a tokenizer also gets text prompts in golden.json["text_prompts"]: a plain text
(encoded with BOS, as add_special_tokens=True does) and a chat (apply_chat_template with
add_generation_prompt), each with its prompt ids, greedy ids and their decode
(skip_special_tokens=True).

Greedy decoding runs a full forward over the whole sequence at every step (no KV cache), ignoring
EOS, so the reference involves no incremental state at all. It also checks that transformers
applied the llama3 rope scaling the config asks for, by recomputing inv_freq here.

    python3 scripts/make_golden.py --data tests/data/tiny [--steps 24]
    python3 scripts/make_golden.py tests/data/tiny-quant/*/dequantized   # named checkpoints only

The quantized checkpoints' goldens come from their dequantized twins (what
scripts/make_quant_checkpoints.py writes beside each): transformers runs the exact FP32 weights the
quantized model stands for, so our CPU backend must match them as it matches the 16-bit goldens.
"""
import argparse
import glob
import json
import math
import os

import numpy as np
import torch
import transformers
from safetensors.torch import save_file
from transformers import LlamaForCausalLM

PROMPT_LENGTHS = [5, 17, 60]  # one block, across a block boundary, past original_max_position_embeddings


def expected_inv_freq(cfg):
    d = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    base = cfg.get("rope_theta", 10000.0)
    inv = 1.0 / (base ** (np.arange(0, d, 2, dtype=np.float64) / d))
    rs = cfg.get("rope_scaling")
    if not rs or rs.get("rope_type", rs.get("type")) != "llama3":
        return inv
    old = rs["original_max_position_embeddings"]
    lo, hi, factor = rs["low_freq_factor"], rs["high_freq_factor"], rs["factor"]
    wavelen = 2 * math.pi / inv
    out = np.where(wavelen > old / lo, inv / factor, inv)
    smooth = (old / wavelen - lo) / (hi - lo)
    mid = (wavelen >= old / hi) & (wavelen <= old / lo)
    return np.where(mid, (1 - smooth) * out / factor + smooth * out, out)


def load(path):
    try:
        model = LlamaForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")
    except TypeError:
        model = LlamaForCausalLM.from_pretrained(path, torch_dtype=torch.float32, attn_implementation="eager")
    return model.eval()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="tests/data/tiny")
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("checkpoints", nargs="*", help="checkpoint directories (default: every one under --data)")
    args = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.set_grad_enabled(False)

    configs = [os.path.join(c, "config.json") for c in args.checkpoints] or \
        sorted(glob.glob(os.path.join(args.data, "*", "config.json")))
    for path in configs:
        ckpt = os.path.dirname(path)
        cfg = json.load(open(path))
        model = load(ckpt)
        inv = model.model.rotary_emb.inv_freq.double().cpu().numpy()
        rope_err = float(np.max(np.abs(inv - expected_inv_freq(cfg)) / expected_inv_freq(cfg)))
        assert rope_err < 1e-5, f"{ckpt}: transformers' inv_freq differs from the config's rope ({rope_err})"

        rng = np.random.default_rng(1234)
        prompts, logits_out = [], {}
        for i, n in enumerate(PROMPT_LENGTHS):
            prompt = rng.integers(0, cfg["vocab_size"], size=n).tolist()
            ids = list(prompt)
            step_logits, margins = [], []
            for _ in range(args.steps):
                logits = model(torch.tensor([ids])).logits[0, -1].float()
                top2 = torch.topk(logits, 2).values
                margins.append(float(top2[0] - top2[1]))
                step_logits.append(logits.clone())
                ids.append(int(torch.argmax(logits)))
            prompts.append({"prompt_ids": prompt, "token_ids": ids[n:], "min_margin": min(margins)})
            logits_out[f"prompt{i}"] = torch.stack(step_logits).contiguous()
        text_prompts = []
        if os.path.exists(os.path.join(ckpt, "tokenizer.json")):
            from transformers import AutoTokenizer
            tok = AutoTokenizer.from_pretrained(ckpt)
            cases = [("prompt", "The capital of France is", tok("The capital of France is").input_ids),
                     ("chat", [{"role": "user", "content": "Hello! Who are you?"}],
                      tok.apply_chat_template([{"role": "user", "content": "Hello! Who are you?"}],
                                              add_generation_prompt=True, tokenize=True))]
            for kind, value, prompt in cases:
                if isinstance(prompt, dict) or hasattr(prompt, "input_ids"):
                    prompt = prompt["input_ids"]
                prompt = [int(x) for x in prompt]
                ids = list(prompt)
                for _ in range(16):
                    ids.append(int(torch.argmax(model(torch.tensor([ids])).logits[0, -1])))
                out = ids[len(prompt):]
                text_prompts.append({"kind": "text" if kind == "prompt" else kind, kind: value, "prompt_ids": prompt, "token_ids": out,
                                     "text": tok.decode(out, skip_special_tokens=True)})
        save_file(logits_out, os.path.join(ckpt, "golden_logits.safetensors"))
        golden = {"made_with": {"transformers": transformers.__version__, "torch": torch.__version__,
                                "dtype": "float32", "device": "cpu", "attn_implementation": "eager"},
                  "steps": args.steps, "rope_inv_freq_max_rel_error": rope_err, "prompts": prompts, "text_prompts": text_prompts}
        with open(os.path.join(ckpt, "golden.json"), "w") as f:
            json.dump(golden, f, indent=1)
            f.write("\n")
        print(f"{os.path.basename(ckpt)}: {len(prompts)} prompts x {args.steps} tokens, "
              f"min margin {min(p['min_margin'] for p in prompts):.4f}, rope err {rope_err:.2e}")


if __name__ == "__main__":
    main()
