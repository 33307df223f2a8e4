#!/usr/bin/env python3
"""Tiny MoE checkpoints in other tools' quantized formats, with transformers' output on their
dequantized weights, for ctest (tests/data/formats; docs/formats.md).

Each case is one MoE layer of a tiny transformers model (qwen3_moe, or mixtral for AWQ's naming:
hidden 64, 4 experts of 64, top-2) saved with save_pretrained; its routed experts' weights are
then replaced by the format's tensors:

    gptq-*   GPTQ (quant_method "gptq"): qweight / qzeros / scales / g_idx written by this script
             from the published layout (codes packed along K as a little-endian bit stream per
             column, zero points along N, v1 "minus one" zero points subtracted word by word,
             act-order g_idx = the group of each input column);
    awq-*    AWQ GEMM: qweight / qzeros packed along N in the interleaved nibble order
             [0, 2, 4, 6, 1, 3, 5, 7], written by this script;
    ct-*     compressed-tensors: written by the compressed-tensors package itself
             (PackedQuantizationCompressor / NaiveQuantizationCompressor), its decompress() giving
             the dequantized weights.

The dequantized weights, (q - z) * s (exact in fp32; compressed-tensors' own decompress() for its
cases, checked equal), are loaded into the transformers block, which is run on x: expected.safetensors
holds its output and routing. Files per case: model.safetensors, config.json (with the format's
quantization_config), x.safetensors, expected.safetensors, dequantized.safetensors (the weights as
F32, under the Hub's per-expert names). cases.json lists them.

    /tmp/hf/bin/pip install compressed-tensors
    /tmp/hf/bin/python scripts/make_format_fixtures.py --out tests/data/formats
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zlib

import numpy as np

T_TOKENS = 12
H = 64
INTER = 64
EXPERTS = 4


def seed(*parts):
    return zlib.crc32("/".join(map(str, parts)).encode()) & 0x7FFFFFFF


# ------------------------------------------------------------------------------------------
# The base layer
# ------------------------------------------------------------------------------------------

def build(family, salt):
    import torch
    import transformers
    common = dict(hidden_size=H, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                  vocab_size=16, max_position_embeddings=64, head_dim=32, num_experts_per_tok=2)
    if family == "qwen3_moe":
        cfg = transformers.Qwen3MoeConfig(**common, moe_intermediate_size=INTER,
                                          num_experts=EXPERTS, norm_topk_prob=True)
        model = transformers.Qwen3MoeForCausalLM(cfg)
        prefix, block, names = "model.layers.0.mlp", model.model.layers[0].mlp, \
            ("gate_proj", "up_proj", "down_proj")
    else:
        cfg = transformers.MixtralConfig(**common, intermediate_size=INTER,
                                         num_local_experts=EXPERTS)
        model = transformers.MixtralForCausalLM(cfg)
        prefix, block, names = "model.layers.0.block_sparse_moe", model.model.layers[0].mlp, \
            ("w1", "w3", "w2")
    model = model.to(torch.float32).eval()
    g = torch.Generator().manual_seed(seed(family, salt))
    with torch.no_grad():
        for _, p in sorted(block.named_parameters(), key=lambda t: t[0]):
            p.copy_((torch.randn(p.shape, generator=g) * 0.15).bfloat16().float())
    return model, block, prefix, names


def expert_weights(block):
    """{(e, proj index): W [N, K] float32} from the block's fused parameters (gate, up, down)."""
    gu = block.experts.gate_up_proj.detach().numpy()
    dn = block.experts.down_proj.detach().numpy()
    out = {}
    for e in range(gu.shape[0]):
        out[(e, 0)] = gu[e, :INTER].copy()
        out[(e, 1)] = gu[e, INTER:].copy()
        out[(e, 2)] = dn[e].copy()
    return out


def set_expert_weights(block, ws):
    import torch
    with torch.no_grad():
        for (e, j), w in ws.items():
            t = torch.from_numpy(np.ascontiguousarray(w, dtype=np.float32))
            if j == 0:
                block.experts.gate_up_proj[e, :INTER] = t
            elif j == 1:
                block.experts.gate_up_proj[e, INTER:] = t
            else:
                block.experts.down_proj[e] = t


# ------------------------------------------------------------------------------------------
# Round-to-nearest quantization in a format's conventions
# ------------------------------------------------------------------------------------------

def rtn(w, bits, group, sym, scale_dtype):
    """codes q [N, K] (unsigned, zero point z), scales s [N, K/G], zeros z [N, K/G]."""
    import torch
    n, k = w.shape
    g = k if group <= 0 else group
    wg = w.reshape(n, k // g, g).astype(np.float64)
    if sym:
        s = np.abs(wg).max(-1) / (2 ** (bits - 1) - 1)
        z = np.full(s.shape, 2 ** (bits - 1), dtype=np.int64)
    else:
        lo, hi = np.minimum(wg.min(-1), 0), np.maximum(wg.max(-1), 0)
        s = (hi - lo) / (2 ** bits - 1)
        s = np.where(s == 0, 1.0, s)
        z = np.clip(np.round(-lo / s), 0, 2 ** bits - 1).astype(np.int64)
    s = torch.from_numpy(s.astype(np.float32)).to(scale_dtype).float().numpy().astype(np.float64)
    s = np.where(s == 0, 1.0, s)
    q = np.clip(np.round(wg / s[..., None]) + z[..., None], 0, 2 ** bits - 1).astype(np.int64)
    return q.reshape(n, k), s.astype(np.float32), z


def pack_stream(codes, bits):
    """Codes (1-D, unsigned) into little-endian int32 words: code i at bits [i b, i b + b)."""
    nwords = -(-len(codes) * bits // 32)
    acc = np.zeros(nwords + 1, dtype=np.uint64)
    for i, c in enumerate(codes):
        bit = i * bits
        w, off = bit // 32, bit % 32
        v = np.uint64(int(c)) << np.uint64(off)
        acc[w] |= v & np.uint64(0xFFFFFFFF)
        acc[w + 1] |= v >> np.uint64(32)
    return acc[:nwords].astype(np.uint32)


GPTQMODEL6_INT3 = [0x24924924, 0x92492492, 0x49249249]


def gptq_tensors(w, bits, group, sym, v2, act_order, rng, int3_words=False):
    """GPTQ tensors of W [N, K] and its dequantized value (in input column order). int3_words:
    3-bit v1 zero points as GPTQModel before 7.0 wrote them (three constants subtracted from the
    words of each triple)."""
    import torch
    n, k = w.shape
    g = k if group <= 0 else group
    if not sym:
        # Every fifth row's first group all positive: its zero point is 0, which v1 stores as -1
        # (a borrow from the next field when the writer subtracts word by word).
        w = w.copy()
        w[::5, :g] = np.abs(w[::5, :g])
    perm = rng.permutation(k) if act_order else np.arange(k)
    # Quantize the columns in `perm` order; groups are runs of G in that order.
    q_p, s, z = rtn(w[:, perm], bits, g, sym, torch.float16)
    q = np.empty_like(q_p)
    q[:, perm] = q_p
    g_idx = np.empty(k, dtype=np.int32)
    g_idx[perm] = np.arange(k) // g
    deq = ((q - z[:, g_idx]).astype(np.float32) * s[:, g_idx]).astype(np.float32)
    qweight = np.stack([pack_stream(q[i], bits) for i in range(n)], axis=1)  # [K b / 32, N]
    zt = z.T  # [groups, N]
    qzeros = np.stack([pack_stream(zt[j], bits) for j in range(zt.shape[0])])
    if not v2:
        if bits == 3 and int3_words:
            c = np.array([GPTQMODEL6_INT3[j % 3] for j in range(qzeros.shape[1])], np.uint64)
            qzeros = ((qzeros.astype(np.uint64) - c[None, :]) & np.uint64(0xFFFFFFFF)) \
                .astype(np.uint32)
        elif bits == 3:
            stored = (zt - 1) % 8
            qzeros = np.stack([pack_stream(stored[j], 3) for j in range(stored.shape[0])])
        else:  # v1: the writer subtracts 1 from every field of each word (borrows included)
            one = sum(1 << (bits * f) for f in range(32 // bits))
            qzeros = ((qzeros.astype(np.uint64) - np.uint64(one)) & np.uint64(0xFFFFFFFF)) \
                .astype(np.uint32)
    t = {"qweight": qweight.view(np.int32), "qzeros": qzeros.view(np.int32),
         "scales": s.T.astype(np.float16), "g_idx": g_idx}
    return t, deq


AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]


def awq_pack(codes_kn):
    """[rows, N] codes into [rows, N / 8] words, column 8c + AWQ_ORDER[i] in nibble i."""
    rows, n = codes_kn.shape
    out = np.zeros((rows, n // 8), dtype=np.uint32)
    for c in range(n // 8):
        for i, col in enumerate(AWQ_ORDER):
            out[:, c] |= (codes_kn[:, 8 * c + col].astype(np.uint32) & 15) << np.uint32(4 * i)
    return out


def awq_tensors(w, group):
    import torch
    n, k = w.shape
    q, s, z = rtn(w, 4, group, False, torch.float16)
    g_of = np.arange(k) // (k if group <= 0 else group)
    deq = ((q - z[:, g_of]).astype(np.float32) * s[:, g_of]).astype(np.float32)
    t = {"qweight": awq_pack(q.T).view(np.int32), "qzeros": awq_pack(z.T).view(np.int32),
         "scales": s.T.astype(np.float16)}
    return t, deq


def ct_tensors(w, weights, fmt):
    """compressed-tensors' own compressor on W (bf16) and its own decompress()."""
    import torch
    from compressed_tensors.compressors.naive_quantized import NaiveQuantizationCompressor
    from compressed_tensors.compressors.pack_quantized import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from compressed_tensors.quantization.utils.helpers import calculate_qparams
    args = QuantizationArgs(type="int", **weights)
    scheme = QuantizationScheme(targets=["Linear"], weights=args)
    wt = torch.from_numpy(w).to(torch.bfloat16)
    n, k = wt.shape
    if args.strategy == "group":
        wg = wt.float().reshape(n, k // args.group_size, args.group_size)
        mn, mx = wg.amin(-1), wg.amax(-1)
    else:
        mn, mx = wt.float().amin(-1, keepdim=True), wt.float().amax(-1, keepdim=True)
    s, z = calculate_qparams(torch.minimum(mn, torch.zeros_like(mn)),
                             torch.maximum(mx, torch.zeros_like(mx)), args)
    sd = {"weight": wt, "weight_scale": s.to(torch.bfloat16)}
    if not args.symmetric:
        sd["weight_zero_point"] = z.to(torch.int8)
    comp = (PackedQuantizationCompressor if fmt == "pack-quantized"
            else NaiveQuantizationCompressor).compress(sd, scheme)
    compressor = (PackedQuantizationCompressor if fmt == "pack-quantized"
                  else NaiveQuantizationCompressor)
    # decompress() computes in the scale's dtype: with the scales as fp32 its (q - z) * s is
    # exact (a small integer times a bf16 value), the value moqe's numerics define; with them in
    # bf16 (as stored) it is that value rounded to bf16, which is checked here too.
    exact = dict(comp, weight_scale=comp["weight_scale"].float())
    deq = compressor.decompress(exact, scheme)["weight"].float()
    native = compressor.decompress(comp, scheme)["weight"]
    assert native.dtype == torch.bfloat16 and torch.equal(native, deq.to(torch.bfloat16)), fmt
    t = {}
    for key, v in comp.items():
        v = v.contiguous()
        t[key] = v.float().numpy() if v.dtype == torch.bfloat16 else v.numpy()
        if v.dtype == torch.bfloat16:
            t[key] = ("bf16", v)
    return t, deq.float().numpy()


# ------------------------------------------------------------------------------------------
# Cases
# ------------------------------------------------------------------------------------------

CASES = [
    dict(name="gptq-v1-sym-4bit-g32", family="qwen3_moe", fmt="gptq", bits=4, group=32, sym=True,
         v2=False, act=False),
    dict(name="gptq-v1-asym-4bit-g32", family="qwen3_moe", fmt="gptq", bits=4, group=32,
         sym=False, v2=False, act=False, note="zero points of 0 (the v1 word-level borrow)"),
    dict(name="gptq-v1-asym-3bit-g32", family="qwen3_moe", fmt="gptq", bits=3, group=32,
         sym=False, v2=False, act=False),
    dict(name="gptq-v1-asym-3bit-g32-gptqmodel6", family="qwen3_moe", fmt="gptq", bits=3,
         group=32, sym=False, v2=False, act=False, int3_words=True,
         note="3-bit v1 zero points as GPTQModel < 7.0 wrote them (meta.quantizer gptqmodel:6)"),
    dict(name="gptq-v2-8bit-channel", family="qwen3_moe", fmt="gptq", bits=8, group=-1, sym=True,
         v2=True, act=False),
    dict(name="gptq-v1-2bit-g64", family="mixtral", fmt="gptq", bits=2, group=64, sym=False,
         v2=False, act=False, note="zero points of 0 (the v1 word-level borrow)"),
    dict(name="gptq-v1-desc_act-4bit-g32", family="qwen3_moe", fmt="gptq", bits=4, group=32,
         sym=True, v2=False, act=True, note="act-order g_idx"),
    dict(name="awq-4bit-g32", family="mixtral", fmt="awq", group=32),
    dict(name="awq-4bit-channel", family="qwen3_moe", fmt="awq", group=-1),
    dict(name="ct-pack-4bit-g32-sym", family="qwen3_moe", fmt="ct", ct_format="pack-quantized",
         weights=dict(num_bits=4, symmetric=True, strategy="group", group_size=32),
         note="Kimi-K2's native INT4 scheme"),
    dict(name="ct-pack-4bit-channel-asym", family="mixtral", fmt="ct", ct_format="pack-quantized",
         weights=dict(num_bits=4, symmetric=False, strategy="channel")),
    dict(name="ct-pack-3bit-g32-asym", family="qwen3_moe", fmt="ct", ct_format="pack-quantized",
         weights=dict(num_bits=3, symmetric=False, strategy="group", group_size=32),
         note="3-bit codes in one bit stream per row (compressed-tensors >= 0.18)"),
    dict(name="ct-pack-3bit-g32-asym-pre018", family="mixtral", fmt="ct",
         ct_format="pack-quantized", ct_legacy=True,
         weights=dict(num_bits=3, symmetric=False, strategy="group", group_size=32),
         note="3-bit codes padded to 10 per int32 (compressed-tensors before 0.18)"),
    dict(name="ct-naive-8bit-channel", family="qwen3_moe", fmt="ct", ct_format="naive-quantized",
         weights=dict(num_bits=8, symmetric=True, strategy="channel")),
]


def quantization_config(case):
    if case["fmt"] == "gptq":
        q = {"quant_method": "gptq", "bits": case["bits"], "group_size": case["group"],
             "desc_act": case["act"], "sym": case["sym"],
             "checkpoint_format": "gptq_v2" if case["v2"] else "gptq"}
        if case.get("int3_words"):
            q["meta"] = {"quantizer": ["gptqmodel:6.0.3"]}
        return q
    if case["fmt"] == "awq":
        return {"quant_method": "awq", "bits": 4, "group_size": case["group"], "zero_point": True,
                "version": "gemm", "modules_to_not_convert": ["gate"]}
    import compressed_tensors
    w = dict(case["weights"], type="int", dynamic=False, observer="minmax", actorder=None)
    w.setdefault("group_size", None)
    return {"quant_method": "compressed-tensors", "format": case["ct_format"],
            "quantization_status": "compressed", "version": compressed_tensors.__version__,
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": w,
                                          "input_activations": None, "output_activations": None,
                                          "format": case["ct_format"]}},
            "ignore": ["lm_head", "re:.*self_attn.*", "re:.*mlp\\.gate$"]}


def generate_case(out, case, with_dequantized):
    import torch
    from safetensors.numpy import load_file, save_file
    from safetensors.torch import save_file as save_torch
    model, block, prefix, names = build(case["family"], case["name"])
    rng = np.random.default_rng(seed(case["name"], "perm"))
    tensors, deqs = {}, {}
    for (e, j), w in expert_weights(block).items():
        base = f"{prefix}.experts.{e}.{names[j]}"
        if case["fmt"] == "gptq":
            t, deq = gptq_tensors(w, case["bits"], case["group"], case["sym"], case["v2"],
                                  case["act"], rng, case.get("int3_words", False))
        elif case["fmt"] == "awq":
            t, deq = awq_tensors(w, case["group"])
        else:
            t, deq = ct_tensors(w, case["weights"], case["ct_format"])
        for key, v in t.items():
            tensors[f"{base}.{key}"] = v
        deqs[(e, j)] = deq
    set_expert_weights(block, deqs)
    g = torch.Generator().manual_seed(seed(case["name"], "x"))
    x = torch.randn((T_TOKENS, H), generator=g)
    cap = {}
    h = block.experts.register_forward_pre_hook(
        lambda _m, args, kwargs: cap.update(ids=args[1].clone(), w=args[2].clone()),
        with_kwargs=True)
    with torch.no_grad():
        y = block(x[None].clone()).reshape(T_TOKENS, H)
    h.remove()
    d = os.path.join(out, case["name"])
    os.makedirs(d, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        state = {}
        for f in sorted(os.listdir(tmp)):
            if f.endswith(".safetensors"):
                state.update(load_file(os.path.join(tmp, f)))
        with open(os.path.join(tmp, "config.json")) as f:
            config = json.load(f)
    layer = {k: v for k, v in state.items() if k.startswith(prefix + ".")}
    dequantized = dict(layer)  # the Hub names with the dequantized experts (F32)
    keep = {k: torch.from_numpy(np.ascontiguousarray(v)).to(torch.bfloat16)
            for k, v in layer.items() if ".experts." not in k}
    for k, v in tensors.items():
        if isinstance(v, tuple):  # bf16 from compressed-tensors
            keep[k] = v[1].contiguous()
        else:
            keep[k] = torch.from_numpy(np.ascontiguousarray(v))
    save_torch(keep, os.path.join(d, "model.safetensors"), metadata={"format": "pt"})
    for (e, j), deq in deqs.items():
        dequantized[f"{prefix}.experts.{e}.{names[j]}.weight"] = deq.astype(np.float32)
    if with_dequantized:
        save_file({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in dequantized.items()},
                  os.path.join(d, "dequantized.safetensors"))
    config["quantization_config"] = quantization_config(case)
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(config, f, indent=1, sort_keys=True)
    save_file({"x": x.numpy()}, os.path.join(d, "x.safetensors"))
    save_file({"y": y.numpy(), "topk_ids": cap["ids"].reshape(T_TOKENS, -1).int().numpy(),
               "topk_weights": cap["w"].reshape(T_TOKENS, -1).float().numpy()},
              os.path.join(d, "expected.safetensors"))
    return dict(family=case["family"], prefix=prefix, format=case["fmt"],
                note=case.get("note", ""))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--only", help="one case (used for the compressed-tensors 0.17 case)")
    ap.add_argument("--ct-legacy", help="a directory holding compressed-tensors 0.17.x, for the "
                                        "case of its padded layout")
    ap.add_argument("--dequantized", action="store_true",
                    help="also write each case's dequantized experts (F32, ~200 KB a case), to "
                         "check the packers against the formats' own dequantizers")
    a = ap.parse_args(argv)
    import torch
    import transformers
    torch.set_num_threads(1)
    transformers.logging.set_verbosity_error()
    if os.path.isdir(a.out):
        shutil.rmtree(a.out)
    os.makedirs(a.out)
    index = {}
    for case in CASES:
        if a.only and case["name"] != a.only:
            continue
        if case.get("ct_legacy") and not a.only:
            # Written by compressed-tensors 0.17 (its padded 3-bit layout), in a process of its own.
            if not a.ct_legacy:
                sys.exit(f"{case['name']}: needs --ct-legacy DIR holding compressed-tensors 0.17 "
                         "(pip install --no-deps --target DIR compressed-tensors==0.17.1)")
            env = dict(os.environ, PYTHONPATH=a.ct_legacy)
            with tempfile.TemporaryDirectory() as tmp:
                subprocess.run([sys.executable, __file__, "--out", tmp, "--only", case["name"]] +
                               (["--dequantized"] if a.dequantized else []), env=env, check=True)
                with open(os.path.join(tmp, "cases.json")) as f:
                    index[case["name"]] = json.load(f)["cases"][case["name"]]
                shutil.move(os.path.join(tmp, case["name"]), os.path.join(a.out, case["name"]))
        else:
            index[case["name"]] = generate_case(a.out, case, a.dequantized)
        print("  wrote", case["name"])
    with open(os.path.join(a.out, "cases.json"), "w") as f:
        json.dump({"transformers": transformers.__version__, "cases": index}, f, indent=1,
                  sort_keys=True)
        f.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
