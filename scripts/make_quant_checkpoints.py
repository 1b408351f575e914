#!/usr/bin/env python3
"""Writes tiny quantized checkpoints under tests/data/tiny-quant/, packed exactly as the published
tools pack them, from the BF16 checkpoint tests/data/tiny/llama3-gqa-bf16 (hidden 64, FFN 160,
2 layers, GQA 4:2; its first 128 vocabulary rows, to keep the files small). Needs only numpy:
safetensors, FP16/BF16 and FP8 E4M3 are written by hand.

Checkpoints (each the decoder's q/k/v/o/gate/up/down projections quantized; embeddings, norms and
the LM head left 16-bit, as the tools leave them):
  awq-gemm-g32            AutoAWQ GEMM: qweight I32 [K, N/8] with the [0,2,4,6,1,3,5,7] nibble
                          order, qzeros I32 [K/32, N/8] (same order), scales F16 [K/32, N];
                          asymmetric min-max rounding per group of 32 (as AutoAWQ's
                          pseudo_quantize_tensor), FP16 model.
  gptq-g32-sym-actorder   GPTQ v1 (checkpoint_format gptq), symmetric (zero 8, stored as 7),
                          desc_act: g_idx groups input features in the order of a per-input
                          "Hessian diagonal" (shared by the layers that read the same input, as in
                          GPTQ), FP16 model. qweight I32 [K/8, N], qzeros I32 [groups, N/8].
  gptq-v2-g32-asym        GPTQ gptq_v2 (zeros stored as they are), asymmetric, no act-order
                          (g_idx = k / 32), BF16 model with FP16 scales.
  fp8-per-tensor-static   compressed-tensors float-quantized: weight F8_E4M3, weight_scale F32 [1]
                          = max|W| / 448, input_scale F32 [1] (static activations).
  fp8-per-channel-dynamic compressed-tensors: weight_scale BF16 [N, 1] per output channel,
                          dynamic per-token activations.
Each gets dequantized/: the same model with every projection dequantized exactly (F32; the
other tensors as they are), the checkpoint transformers runs for the goldens
(scripts/make_golden.py), and the C++ tests' FP32 twin of the quantized model.

Also written, for the loader's unit tests (tests/unit/quant_test.cc):
  pack-cases/             small layers [16, 64] in every packing variant (AWQ; GPTQ v1 sym
                          act-order, v1 asym, v2 asym, one group; a damaged v1 zero; FP8 with a
                          scalar or BF16 per-channel scale), each with `<case>.expected`, its W
                          computed from the integers *before* packing, and cases.json with each
                          case's quantization_config. The packer is checked here against a
                          plain bit-by-bit reading of the published layout.
  at_load_reference.safetensors
                          what --quantization fp8 / int8 must make of two layers of
                          llama3-gqa-bf16 (per-output-channel scales; E4M3 by nearest-value
                          search with ties to even, int8 rounded half to even).

    /usr/bin/python3 scripts/make_quant_checkpoints.py [--out tests/data/tiny-quant]
"""
import argparse
import json
import os
import shutil
import struct

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
SOURCE = os.path.join(HERE, "..", "tests", "data", "tiny", "llama3-gqa-bf16")
GROUP = 32
VOCAB = 128  # the source's first VOCAB token rows (embedding and LM head)
AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]  # nibble i of an AWQ word holds column 8c + AWQ_ORDER[i]
PROJECTIONS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
# The input each projection reads (act-order is a property of the input's Hessian).
INPUT_OF = {"self_attn.q_proj": "attn", "self_attn.k_proj": "attn", "self_attn.v_proj": "attn",
            "self_attn.o_proj": "o", "mlp.gate_proj": "mlp", "mlp.up_proj": "mlp", "mlp.down_proj": "down"}


# --- safetensors, 16-bit floats and FP8, by hand -------------------------------------------------

def read_safetensors(path):
    """name -> (dtype code, numpy array of the stored element type)."""
    types = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "I32": np.int32, "I8": np.int8,
             "U8": np.uint8, "F8_E4M3": np.uint8}
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        data = f.read()
    out = {}
    for name, t in header.items():
        if name == "__metadata__":
            continue
        b, e = t["data_offsets"]
        out[name] = (t["dtype"], np.frombuffer(data[b:e], dtype=types[t["dtype"]]).reshape(t["shape"]))
    return out


def write_safetensors(path, tensors):
    """tensors: name -> (dtype code, numpy array whose bytes are the data)."""
    header, blobs, offset = {}, [], 0
    for name in sorted(tensors):
        code, arr = tensors[name]
        blob = np.ascontiguousarray(arr).tobytes()
        header[name] = {"dtype": code, "shape": list(arr.shape), "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    header["__metadata__"] = {"format": "pt"}
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for blob in blobs:
            f.write(blob)


def bf16_to_f32(bits):
    return (bits.astype(np.uint32) << 16).view(np.float32)


def f32_to_bf16(x):
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def to_f32(code, arr):
    if code == "BF16":
        return bf16_to_f32(arr)
    if code == "F8_E4M3":
        return e4m3_decode(arr)
    return arr.astype(np.float32)


def e4m3_table():
    """The 128 magnitudes of E4M3 codes 0..127 (code 127 is NaN), from the format's definition."""
    vals = []
    for c in range(128):
        e, m = c >> 3, c & 7
        vals.append(m * 2.0 ** -9 if e == 0 else (1 + m / 8) * 2.0 ** (e - 7))
    vals[127] = np.nan
    return np.array(vals)


E4M3 = e4m3_table()


def e4m3_decode(codes):
    mag = E4M3[codes & 0x7F].astype(np.float32)
    return np.where(codes & 0x80, -mag, mag).astype(np.float32)


def e4m3_encode(x):
    """FP8 E4M3 of float32 x: the nearest of the 127 finite magnitudes, ties to the even code,
    beyond 448 saturating to 448. A search over the value table, not bit manipulation."""
    x = np.asarray(x, dtype=np.float32)
    a = np.abs(x).astype(np.float64)
    finite = E4M3[:127]
    hi = np.clip(np.searchsorted(finite, a, side="left"), 0, 126)
    lo = np.clip(hi - 1, 0, 126)
    d_hi, d_lo = finite[hi] - a, a - finite[lo]
    code = np.where(d_lo < d_hi, lo, hi)
    tie = (d_lo == d_hi) & (lo != hi)
    code = np.where(tie, np.where(lo % 2 == 0, lo, hi), code)
    code = np.where(a >= 448.0, 126, code).astype(np.uint8)
    code = np.where(np.isnan(x), 127, code).astype(np.uint8)
    return (code | np.where(np.signbit(x), 0x80, 0)).astype(np.uint8)


# --- packing as published, and a plain reading of each layout to check it --------------------------

def pack_awq(ints):
    """ints [R, C] (0..15) -> I32 [R, C/8], AutoAWQ GEMM order along C."""
    r, c = ints.shape
    out = np.zeros((r, c // 8), dtype=np.uint32)
    for i, col in enumerate(AWQ_ORDER):
        out |= ints[:, col::8].astype(np.uint32) << (4 * i)
    return out.view(np.int32)


def pack_sequential(ints, axis):
    """ints (0..15) -> I32 with 8 consecutive elements of `axis` per word, element j in nibble j."""
    ints = np.moveaxis(ints.astype(np.uint32), axis, 0)
    out = np.zeros((ints.shape[0] // 8,) + ints.shape[1:], dtype=np.uint32)
    for j in range(8):
        out |= ints[j::8] << (4 * j)
    return np.moveaxis(out, 0, axis).view(np.int32)


def read_awq_nibble(words, row, col):
    word = int(words[row, col // 8]) & 0xFFFFFFFF
    return (word >> (4 * AWQ_ORDER.index(col % 8))) & 0xF


def check_packing(kind, words, ints):
    """Reads every element back from the packed words, one at a time, as the layout is described."""
    r, c = ints.shape
    for i in range(r):
        for j in range(c):
            if kind == "awq":
                v = read_awq_nibble(words, i, j)
            elif kind == "gptq_qweight":  # words [R/8, C], 8 consecutive rows per word
                v = (int(words[i // 8, j]) & 0xFFFFFFFF) >> (4 * (i % 8)) & 0xF
            else:  # gptq_qzeros: words [R, C/8], 8 consecutive columns per word
                v = (int(words[i, j // 8]) & 0xFFFFFFFF) >> (4 * (j % 8)) & 0xF
            assert v == ints[i, j], (kind, i, j, v, ints[i, j])


# --- quantizers (round to nearest; the checkpoints need valid data, not a good calibration) -------

def groups_of(g_idx, num_groups):
    return [np.nonzero(g_idx == g)[0] for g in range(num_groups)]


def quantize_int4(w, g_idx, num_groups, sym):
    """w [N, K] f32 -> q [N, K], zeros [N, G] (0..15), scales_f16 [N, G], dequantized [N, K] f32."""
    n, k = w.shape
    q = np.zeros((n, k), dtype=np.int64)
    zeros = np.zeros((n, num_groups), dtype=np.int64)
    scales = np.zeros((n, num_groups), dtype=np.float16)
    for g, cols in enumerate(groups_of(g_idx, num_groups)):
        x = w[:, cols]
        if sym:  # GPTQ: xmax = max|x|, scale = 2 xmax / 15, zero = 8
            s = (2 * np.abs(x).max(axis=1) / 15).clip(min=1e-5).astype(np.float16)
            z = np.full(n, 8)
        else:    # AutoAWQ / GPTQ asymmetric min-max
            s = ((x.max(axis=1) - x.min(axis=1)).clip(min=1e-5) / 15).astype(np.float16)
            z = np.clip(-np.round(x.min(axis=1) / s.astype(np.float32)), 0, 15).astype(np.int64)
        sf = s.astype(np.float32)
        q[:, cols] = np.clip(np.round(x / sf[:, None]) + z[:, None], 0, 15).astype(np.int64)
        zeros[:, g], scales[:, g] = z, s
    deq = ((q - zeros[:, g_idx]).astype(np.float32) * scales[:, g_idx].astype(np.float32)).astype(np.float32)
    return q, zeros, scales, deq


def act_order_g_idx(k, rng):
    """desc_act: input features sorted by a (random) Hessian diagonal, largest first, then grouped."""
    perm = np.argsort(-rng.random(k), kind="stable")
    g_idx = np.zeros(k, dtype=np.int32)
    g_idx[perm] = np.arange(k) // GROUP
    return g_idx


# --- the checkpoints -------------------------------------------------------------------------------

def quantized_projection(fmt, name, w, g_idx, rng, layer):
    """Tensors of one projection in format `fmt`, and its exactly dequantized W (f32)."""
    n, k = w.shape
    p = name[: -len(".weight")]
    if fmt == "awq":
        ng = k // GROUP
        q, z, s, deq = quantize_int4(w, np.arange(k) // GROUP, ng, sym=False)
        qweight, qzeros = pack_awq(q.T), pack_awq(z.T)
        check_packing("awq", qweight, q.T)
        check_packing("awq", qzeros, z.T)
        return {p + ".qweight": ("I32", qweight), p + ".qzeros": ("I32", qzeros),
                p + ".scales": ("F16", np.ascontiguousarray(s.T))}, deq
    if fmt in ("gptq_v1_sym", "gptq_v2_asym"):
        ng = (k + GROUP - 1) // GROUP
        q, z, s, deq = quantize_int4(w, g_idx, ng, sym=fmt == "gptq_v1_sym")
        stored = z - 1 if fmt == "gptq_v1_sym" else z
        assert stored.min() >= 0 and stored.max() <= 15
        qweight, qzeros = pack_sequential(q.T, 0), pack_sequential(stored.T, 1)
        check_packing("gptq_qweight", qweight, q.T)
        check_packing("gptq_qzeros", qzeros, stored.T)
        return {p + ".qweight": ("I32", qweight), p + ".qzeros": ("I32", qzeros),
                p + ".scales": ("F16", np.ascontiguousarray(s.T)), p + ".g_idx": ("I32", g_idx.astype(np.int32))}, deq
    if fmt == "fp8_tensor":
        scale = np.float32(np.abs(w).max()) / np.float32(448)
        codes = e4m3_encode(w / scale)
        deq = e4m3_decode(codes) * scale
        # A plausible calibrated scale for RMS-normed inputs (|x| up to ~4); the CPU reference
        # computes with the dequantized weights and FP32 activations, so only the CUDA path uses it.
        input_scale = np.float32(4.0 / 448 * (1 + 0.1 * layer))
        return {name: ("F8_E4M3", codes), p + ".weight_scale": ("F32", np.array([scale], dtype=np.float32)),
                p + ".input_scale": ("F32", np.array([input_scale], dtype=np.float32))}, deq
    if fmt == "fp8_channel":
        scale_bits = f32_to_bf16(np.abs(w).max(axis=1) / np.float32(448))  # stored BF16, as llm-compressor does
        scale = bf16_to_f32(scale_bits)
        codes = e4m3_encode(w / scale[:, None])
        deq = e4m3_decode(codes) * scale[:, None]
        return {name: ("F8_E4M3", codes), p + ".weight_scale": ("BF16", scale_bits.reshape(n, 1))}, deq
    raise ValueError(fmt)


def fp8_config(static):
    act = {"dynamic": not static, "num_bits": 8, "observer": "minmax" if static else None,
           "strategy": "tensor" if static else "token", "symmetric": True, "type": "float",
           "group_size": None, "block_structure": None, "actorder": None, "observer_kwargs": {}}
    weights = {"dynamic": False, "num_bits": 8, "observer": "minmax", "strategy": "tensor" if static else "channel",
               "symmetric": True, "type": "float", "group_size": None, "block_structure": None, "actorder": None,
               "observer_kwargs": {}}
    return {"config_groups": {"group_0": {"input_activations": act, "output_activations": None,
                                          "targets": ["Linear"], "weights": weights}},
            "format": "float-quantized", "global_compression_ratio": None, "ignore": ["lm_head"],
            "kv_cache_scheme": None, "quant_method": "compressed-tensors", "quantization_status": "compressed"}


CHECKPOINTS = {
    "awq-gemm-g32": dict(fmt="awq", dtype="float16", config={
        "quant_method": "awq", "bits": 4, "group_size": GROUP, "zero_point": True, "version": "gemm",
        "modules_to_not_convert": None}),
    "gptq-g32-sym-actorder": dict(fmt="gptq_v1_sym", dtype="float16", act_order=True, config={
        "quant_method": "gptq", "bits": 4, "group_size": GROUP, "desc_act": True, "sym": True,
        "checkpoint_format": "gptq", "static_groups": False, "true_sequential": True, "damp_percent": 0.01}),
    "gptq-v2-g32-asym": dict(fmt="gptq_v2_asym", dtype="bfloat16", act_order=False, config={
        "quant_method": "gptq", "bits": 4, "group_size": GROUP, "desc_act": False, "sym": False,
        "checkpoint_format": "gptq_v2", "static_groups": False, "true_sequential": True, "damp_percent": 0.01}),
    "fp8-per-tensor-static": dict(fmt="fp8_tensor", dtype="bfloat16", config=fp8_config(static=True)),
    "fp8-per-channel-dynamic": dict(fmt="fp8_channel", dtype="bfloat16", config=fp8_config(static=False)),
}


def cast_16bit(code, arr, dtype):
    """A non-quantized tensor of the BF16 source in the checkpoint's dtype. FP16 rounds a few tiny
    values; the quantized checkpoint and its dequantized twin hold the same rounded ones."""
    if dtype == "bfloat16":
        return code, arr
    return "F16", to_f32(code, arr).astype(np.float16)


def write_json(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")


def make_checkpoint(out, name, spec, source, base_config, generation):
    rng = np.random.default_rng(sum(map(ord, name)))
    cfg = dict(base_config, torch_dtype=spec["dtype"])
    num_layers = cfg["num_hidden_layers"]
    quant, deq = {}, {}
    for tensor_name, (code, arr) in source.items():
        kind = tensor_name.split(".")
        projection = ".".join(kind[3:5]) if tensor_name.startswith("model.layers.") else None
        if projection in PROJECTIONS:
            continue
        quant[tensor_name] = deq[tensor_name] = cast_16bit(code, arr, spec["dtype"])
    for layer in range(num_layers):
        g_idx_of = {}
        for proj in PROJECTIONS:
            tensor_name = f"model.layers.{layer}.{proj}.weight"
            code, arr = source[tensor_name]
            w = to_f32(code, arr)
            k = w.shape[1]
            if spec.get("act_order"):
                if INPUT_OF[proj] not in g_idx_of:
                    g_idx_of[INPUT_OF[proj]] = act_order_g_idx(k, rng)
                g_idx = g_idx_of[INPUT_OF[proj]]
            else:
                g_idx = (np.arange(k) // GROUP).astype(np.int32)
            tensors, w_deq = quantized_projection(spec["fmt"], tensor_name, w, g_idx, rng, layer)
            quant.update(tensors)
            deq[tensor_name] = ("F32", w_deq.astype(np.float32))
    d = os.path.join(out, name)
    os.makedirs(os.path.join(d, "dequantized"), exist_ok=True)
    write_json(os.path.join(d, "config.json"), dict(cfg, quantization_config=spec["config"]))
    write_json(os.path.join(d, "dequantized", "config.json"), cfg)
    for target in (d, os.path.join(d, "dequantized")):
        write_json(os.path.join(target, "generation_config.json"), generation)
    write_safetensors(os.path.join(d, "model.safetensors"), quant)
    write_safetensors(os.path.join(d, "dequantized", "model.safetensors"), deq)
    size = os.path.getsize(os.path.join(d, "model.safetensors"))
    print(f"{name}: {len(quant)} tensors, {size} bytes (+ dequantized/)")


# --- pack cases -------------------------------------------------------------------------------------

def make_pack_cases(out):
    """Small layers in every packing variant, with W computed from the integers before packing."""
    rng = np.random.default_rng(7)
    n, k, g = 16, 64, 16
    ng = k // g
    tensors, cases = {}, {}

    def f16_scales(shape):
        return (rng.uniform(0.01, 0.1, size=shape) * rng.choice([-1, 1], size=shape)).astype(np.float16)

    def add_int4(case, config, g_idx, z, stored, scales_code, scales, awq, act_order=False):
        q = rng.integers(0, 16, size=(n, k))
        q[0, :16] = np.arange(16)  # every nibble value in the first row
        sf = to_f32(scales_code, scales)  # [groups, n]
        expected = np.zeros((n, k), dtype=np.float32)
        for i in range(n):
            for j in range(k):
                expected[i, j] = np.float32(q[i, j] - z[g_idx[j], i]) * sf[g_idx[j], i]
        if awq:
            qweight, qzeros = pack_awq(q.T), pack_awq(stored)
            check_packing("awq", qweight, q.T)
            check_packing("awq", qzeros, stored)
        else:
            qweight, qzeros = pack_sequential(q.T, 0), pack_sequential(stored, 1)
            check_packing("gptq_qweight", qweight, q.T)
            check_packing("gptq_qzeros", qzeros, stored)
            tensors[case + ".g_idx"] = ("I32", g_idx.astype(np.int32))
        tensors[case + ".qweight"] = ("I32", qweight)
        tensors[case + ".qzeros"] = ("I32", qzeros)
        tensors[case + ".scales"] = (scales_code, scales)
        tensors[case + ".expected"] = ("F32", expected)
        cases[case] = {"quantization_config": config, "rows": n, "cols": k, "act_order": act_order}

    trivial = np.arange(k) // g
    all_zeros = (np.arange(ng * n).reshape(ng, n) * 7) % 16  # every value 0..15 appears
    add_int4("awq", {"quant_method": "awq", "bits": 4, "group_size": g, "zero_point": True, "version": "gemm"},
             trivial, all_zeros, all_zeros, "F16", f16_scales((ng, n)), awq=True)
    perm = rng.permutation(k)
    actorder = np.zeros(k, dtype=np.int64)
    actorder[perm] = np.arange(k) // g
    eights = np.full((ng, n), 8)
    add_int4("gptq_v1_sym_actorder", {"quant_method": "gptq", "bits": 4, "group_size": g, "desc_act": True,
                                      "sym": True, "checkpoint_format": "gptq"},
             actorder, eights, eights - 1, "F16", f16_scales((ng, n)), awq=False, act_order=True)
    v1_zeros = 1 + (np.arange(ng * n).reshape(ng, n) * 5) % 15  # 1..15, stored 0..14
    add_int4("gptq_v1_asym", {"quant_method": "gptq", "bits": 4, "group_size": g, "desc_act": False, "sym": False},
             trivial, v1_zeros, v1_zeros - 1, "F16", f16_scales((ng, n)), awq=False)
    add_int4("gptq_v2_asym", {"quant_method": "gptq", "bits": 4, "group_size": g, "desc_act": False, "sym": False,
                              "checkpoint_format": "gptq_v2"},
             trivial, all_zeros, all_zeros, "F16", f16_scales((ng, n)), awq=False)
    one = np.zeros(k, dtype=np.int64)
    z1 = np.full((1, n), 8)
    add_int4("gptq_v1_one_group", {"quant_method": "gptq", "bits": 4, "group_size": -1, "desc_act": False,
                                   "sym": True},
             one, z1, z1 - 1, "BF16", f32_to_bf16(rng.uniform(0.01, 0.1, size=(1, n))), awq=False)
    bad = v1_zeros.copy()
    bad[2, 5] = 16  # stored 15: v1's +1 makes it 16
    add_int4("gptq_v1_damaged_zero", {"quant_method": "gptq", "bits": 4, "group_size": g, "sym": False},
             trivial, bad, bad - 1, "F16", f16_scales((ng, n)), awq=False)

    codes = rng.integers(0, 256, size=(n, k)).astype(np.uint8)
    codes[(codes & 0x7F) == 0x7F] = 0x42  # no NaN codes
    codes[0, :4] = [0x00, 0x80, 0x7E, 0xFE]  # +-0 and +-448
    scalar = np.float32(0.0123)
    tensors["fp8_scalar.weight"] = ("F8_E4M3", codes)
    tensors["fp8_scalar.weight_scale"] = ("F32", np.array(scalar, dtype=np.float32).reshape(()))
    tensors["fp8_scalar.expected"] = ("F32", (e4m3_decode(codes) * scalar).astype(np.float32))
    cases["fp8_scalar"] = {"quantization_config": {"quant_method": "fp8", "activation_scheme": "dynamic"},
                           "rows": n, "cols": k, "act_order": False}
    channel = f32_to_bf16(rng.uniform(0.001, 0.01, size=n))
    tensors["fp8_channel.weight"] = ("F8_E4M3", codes)
    tensors["fp8_channel.weight_scale"] = ("BF16", channel.reshape(n, 1))
    tensors["fp8_channel.input_scale"] = ("F32", np.array([0.02], dtype=np.float32))
    tensors["fp8_channel.expected"] = ("F32", (e4m3_decode(codes) * bf16_to_f32(channel)[:, None]).astype(np.float32))
    cases["fp8_channel"] = {"quantization_config": {"quant_method": "fp8", "activation_scheme": "static"},
                            "rows": n, "cols": k, "act_order": False}

    d = os.path.join(out, "pack-cases")
    os.makedirs(d, exist_ok=True)
    write_safetensors(os.path.join(d, "model.safetensors"), tensors)
    write_json(os.path.join(d, "cases.json"), cases)
    print(f"pack-cases: {len(cases)} cases")


def make_at_load_reference(out, source):
    """What per-output-channel quantization at load makes of two layers (fp8 and int8)."""
    tensors = {}
    for proj in ("self_attn.q_proj", "mlp.down_proj"):
        name = f"model.layers.0.{proj}.weight"
        w = to_f32(*source[name])
        max_abs = np.abs(w).max(axis=1)
        for method, qmax in (("fp8", 448), ("int8", 127)):
            scale = np.where(max_abs > 0, max_abs / np.float32(qmax), np.float32(1)).astype(np.float32)
            x = (w / scale[:, None]).astype(np.float32)
            if method == "fp8":
                tensors[f"{method}.{name}"] = ("F8_E4M3", e4m3_encode(x))
            else:
                tensors[f"{method}.{name}"] = ("I8", np.clip(np.rint(x), -127, 127).astype(np.int8))
            tensors[f"{method}.{name}_scale"] = ("F32", scale)
    write_safetensors(os.path.join(out, "at_load_reference.safetensors"), tensors)


def self_test():
    # The E4M3 table against known values; encode(decode(c)) == c for every finite code.
    assert E4M3[0x7E] == 448 and E4M3[0x08] == 2.0 ** -6 and E4M3[0x01] == 2.0 ** -9 and E4M3[0x38] == 1.0
    codes = np.array([c for c in range(256) if (c & 0x7F) != 0x7F], dtype=np.uint8)
    assert np.array_equal(e4m3_encode(e4m3_decode(codes)), codes)
    # Ties go to the even code: halfway between 1.0 (0x38) and 1.125 (0x39) -> 0x38; 1.1875 -> 0x3A.
    assert e4m3_encode(np.float32(1.0625)) == 0x38 and e4m3_encode(np.float32(1.1875)) == 0x3A
    assert e4m3_encode(np.float32(1000)) == 0x7E and e4m3_encode(np.float32(-1000)) == 0xFE


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(HERE, "..", "tests", "data", "tiny-quant"))
    args = ap.parse_args()
    self_test()
    source = read_safetensors(os.path.join(SOURCE, "model.safetensors"))
    with open(os.path.join(SOURCE, "config.json")) as f:
        base_config = json.load(f)
    make_at_load_reference(args.out, source)
    base_config["vocab_size"] = VOCAB
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        code, arr = source[name]
        source[name] = (code, arr[:VOCAB])
    with open(os.path.join(SOURCE, "generation_config.json")) as f:
        generation = json.load(f)
    os.makedirs(args.out, exist_ok=True)
    for name, spec in CHECKPOINTS.items():
        make_checkpoint(args.out, name, spec, source, base_config, generation)
    make_pack_cases(args.out)


if __name__ == "__main__":
    main()
