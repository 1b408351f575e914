#!/usr/bin/env python3
"""Writes deterministic random Llama checkpoints in Hugging Face layout under tests/data/tiny/.

Each checkpoint exercises a part of the loader and the forward pass: GQA and MQA, an explicit
head_dim that differs from hidden/heads, llama3 rope scaling (prompts run past
original_max_position_embeddings), tied and untied embeddings, BF16 and FP16, single-file and
sharded safetensors. Weights are scaled so that every layer changes the output (projections with
variance 1/fan_in over unit-scale activations) and the logits are spread wide enough for greedy
choices to be decisive. Needs only numpy: safetensors and bf16 are written by hand.

    /usr/bin/python3 scripts/make_tiny_checkpoints.py [--out tests/data/tiny]
"""
import argparse
import json
import os
import struct

import numpy as np

CHECKPOINTS = {
    # Llama 3.1 shape: GQA 4:2, llama3 rope (orig 64 so the band between the cut-offs is hit), BF16.
    "llama3-gqa-bf16": dict(
        config=dict(vocab_size=512, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                    rms_norm_eps=1e-5, rope_theta=500000.0,
                    rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                      high_freq_factor=4.0, original_max_position_embeddings=64),
                    tie_word_embeddings=False, torch_dtype="bfloat16", bos_token_id=0,
                    eos_token_id=[1, 2]),
        generation_config=dict(bos_token_id=0, eos_token_id=[1, 2, 3], do_sample=False),
        shards=1, seed=1),
    # Llama 3.2 shape: tied embeddings, MQA, head_dim 32 with hidden 96 and 6 heads, FP16, sharded.
    "llama3-tied-mqa-fp16": dict(
        config=dict(vocab_size=384, hidden_size=96, intermediate_size=192, num_hidden_layers=3,
                    num_attention_heads=6, num_key_value_heads=1, head_dim=32,
                    max_position_embeddings=192, rms_norm_eps=1e-6, rope_theta=10000.0,
                    rope_scaling=dict(rope_type="llama3", factor=4.0, low_freq_factor=1.0,
                                      high_freq_factor=4.0, original_max_position_embeddings=32),
                    tie_word_embeddings=True, torch_dtype="float16", bos_token_id=5,
                    eos_token_id=6),
        generation_config=None, shards=2, seed=2),
    # Llama 2 shape: multi-head attention, no rope scaling, BF16.
    "llama2-mha-bf16": dict(
        config=dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128,
                    rms_norm_eps=1e-6, rope_theta=10000.0, rope_scaling=None,
                    tie_word_embeddings=False, torch_dtype="bfloat16", bos_token_id=1,
                    eos_token_id=2),
        generation_config=dict(bos_token_id=1, eos_token_id=2), shards=1, seed=3),
    # The real Llama 3.1 vocabulary and tokenizer (linked from tests/data/llama-3.1-tokenizer), so
    # text and chat prompts run end to end; hidden 16 keeps the tied embedding at 4 MB.
    "llama3-tokenizer-bf16": dict(
        config=dict(vocab_size=128256, hidden_size=16, intermediate_size=48, num_hidden_layers=2,
                    num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                    max_position_embeddings=512, rms_norm_eps=1e-5, rope_theta=500000.0,
                    rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                      high_freq_factor=4.0, original_max_position_embeddings=64),
                    tie_word_embeddings=True, torch_dtype="bfloat16", bos_token_id=128000,
                    eos_token_id=[128001, 128008, 128009]),
        generation_config=dict(bos_token_id=128000, eos_token_id=[128001, 128008, 128009],
                               do_sample=False),
        shards=1, seed=4, tokenizer="llama-3.1-tokenizer"),
}

BASE_CONFIG = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_act="silu",
                   attention_bias=False, mlp_bias=False, attention_dropout=0.0,
                   initializer_range=0.02, use_cache=True)


def to_bf16_bits(x):
    """float32 -> bfloat16 bit patterns (uint16), round to nearest even."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    u = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    return u.astype(np.uint16)


def encode(x, dtype):
    if dtype == "bfloat16":
        return "BF16", to_bf16_bits(x).tobytes()
    if dtype == "float16":
        return "F16", x.astype(np.float16).tobytes()
    return "F32", x.astype(np.float32).tobytes()


def write_safetensors(path, tensors, dtype):
    header, blobs, offset = {}, [], 0
    for name in sorted(tensors):
        code, blob = encode(tensors[name], dtype)
        header[name] = {"dtype": code, "shape": list(tensors[name].shape),
                        "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    header["__metadata__"] = {"format": "pt"}
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # data section 8-byte aligned, as the reference writer does
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for blob in blobs:
            f.write(blob)


def make_weights(cfg, rng):
    h, f, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    nq, nkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    d = cfg.get("head_dim", h // nq)

    def proj(out_f, in_f):
        return rng.standard_normal((out_f, in_f)).astype(np.float32) / np.sqrt(in_f)

    def norm():
        return (1.0 + 0.1 * rng.standard_normal(h)).astype(np.float32)

    w = {"model.embed_tokens.weight": rng.standard_normal((v, h)).astype(np.float32)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        w[p + "input_layernorm.weight"] = norm()
        w[p + "post_attention_layernorm.weight"] = norm()
        w[p + "self_attn.q_proj.weight"] = proj(nq * d, h)
        w[p + "self_attn.k_proj.weight"] = proj(nkv * d, h)
        w[p + "self_attn.v_proj.weight"] = proj(nkv * d, h)
        w[p + "self_attn.o_proj.weight"] = proj(h, nq * d)
        w[p + "mlp.gate_proj.weight"] = proj(f, h)
        w[p + "mlp.up_proj.weight"] = proj(f, h)
        w[p + "mlp.down_proj.weight"] = proj(h, f)
    w["model.norm.weight"] = norm()
    if not cfg["tie_word_embeddings"]:
        # Logit standard deviation ~3: top-1 and top-2 are usually far apart.
        w["lm_head.weight"] = 3.0 * proj(v, h)
    return w


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "tests", "data", "tiny"))
    args = ap.parse_args()
    for name, spec in CHECKPOINTS.items():
        out = os.path.join(args.out, name)
        os.makedirs(out, exist_ok=True)
        cfg = dict(BASE_CONFIG, **spec["config"])
        weights = make_weights(cfg, np.random.default_rng(spec["seed"]))
        with open(os.path.join(out, "config.json"), "w") as f:
            json.dump(cfg, f, indent=2, sort_keys=True)
            f.write("\n")
        if spec["generation_config"] is not None:
            with open(os.path.join(out, "generation_config.json"), "w") as f:
                json.dump(spec["generation_config"], f, indent=2, sort_keys=True)
                f.write("\n")
        for file in ("tokenizer.json", "tokenizer_config.json") if spec.get("tokenizer") else ():
            link = os.path.join(out, file)
            if os.path.lexists(link):
                os.remove(link)
            os.symlink(os.path.join("..", "..", spec["tokenizer"], file), link)
        names = sorted(weights)
        if spec["shards"] == 1:
            write_safetensors(os.path.join(out, "model.safetensors"), weights, cfg["torch_dtype"])
        else:
            n = spec["shards"]
            weight_map = {}
            for s in range(n):
                file = f"model-{s + 1:05d}-of-{n:05d}.safetensors"
                part = {k: weights[k] for k in names[s::n]}
                write_safetensors(os.path.join(out, file), part, cfg["torch_dtype"])
                weight_map.update({k: file for k in part})
            index = {"metadata": {"total_size": sum(weights[k].size * 2 for k in names)},
                     "weight_map": dict(sorted(weight_map.items()))}
            with open(os.path.join(out, "model.safetensors.index.json"), "w") as f:
                json.dump(index, f, indent=2)
                f.write("\n")
        print(f"{name}: {sum(x.size for x in weights.values())} parameters")


if __name__ == "__main__":
    main()
