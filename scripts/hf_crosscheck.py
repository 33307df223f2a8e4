#!/usr/bin/env python3
"""Cross-check `moqe moe-forward` against the Hugging Face transformers MoE blocks.

What it does
------------
Generation (needs torch + transformers + safetensors + numpy, e.g. the venv /opt/hfref):
for every case below it builds a small random config for one MoE family, instantiates that
family's MoE block from the *installed* transformers in fp32 (eval mode, no jitter/dropout),
fills all its parameters deterministically (normal, std 0.1; DeepSeek-V3's
e_score_correction_bias uniform in [-0.1, 0.1]), runs it on a random x [T, H] (T = 37, one
sequence) and captures y, and the router's chosen expert ids and weights (taken from the block's
own router submodule with a forward hook during the block's forward). It writes, per case:

    <out>/<case>/model.safetensors     the block's tensors, Hub per-expert layout, with the prefix
                                        a full HF checkpoint uses (see PREFIX below)
    <out>/<case>/config.json           config.to_dict() (+ "architectures"; expert-count keys made
                                        Hub-like, see hub_config_dict)
    <out>/<case>/x.safetensors         x            F32 [T, H]
    <out>/<case>/expected.safetensors  y            F32 [T, H]
                                        topk_ids     I32 [T, k]   (order as returned by HF)
                                        topk_weights F32 [T, k]
                                        switch only: y_legacy (transformers < 5 semantics: a token
                                        over capacity outputs p_max * x) and admitted (I32 [T])
    <out>/<case>-fused/...             mixtral and qwen3_moe cases only: the same case with the
                                        experts in the fused layout (experts.gate_up_proj
                                        [E, 2I, H] = [gate; up], experts.down_proj [E, H, I])
    <out>/cases.json                   case -> family, prefix, k, notes

Check (needs only numpy + safetensors): for each case runs
    MOQE moe-forward --weights <case dir> --prefix <prefix> --family <family>
                     --input <case dir>/x.safetensors --output <tmp>/y.safetensors
and compares: topk_ids as sets per token (and whether the order matches), topk_weights matched
per id (relative error <= --wtol, default 1e-6), y relative Frobenius error <= --ytol (default
1e-5), plus the max abs error. Prints a table; exits 1 on any FAIL. A non-zero exit, a timeout or
a missing/malformed output of moe-forward is a FAIL (its stderr is shown).

Quantized and GPU checks: --quantize B first runs `moqe quantize --bits B --include 'experts?\.'`
(routed and shared experts) and `moqe dequantize`, then compares moe-forward on the quantized
weights with the float64 reference on the dequantized weights (the quantization error cancels;
what remains is the kernels'); fused cases are skipped. --device cuda passes --device cuda to
moe-forward (the GPU layer runs quantized experts only). Tolerances: CPU exact mode agrees to
~2e-7 (--ytol 1e-5 holds); the GPU layer rounds activations to fp16 twice, so use
--ytol 2e-3 --wtol 1e-5 there, e.g.
    python scripts/hf_crosscheck.py --out /tmp/hfc --check build/src/cli/moqe --quantize 4 \
        --device cuda --ytol 2e-3 --wtol 1e-5

Self-test (needs the generation deps): regenerates, then (1) recomputes every case from the files
on disk with an independent float64 numpy per-token loop (routing written from DESIGN.md section 3
and the HF code, not calling torch) and compares it with expected.safetensors; (2) checks that each
family's full HF model, given the same block weights, save_pretrained()s exactly the tensor names
and values of our model.safetensors (so the Hub names and the fused -> per-expert split are
transformers' own); (3) runs the whole --check path end to end against a stand-in `moe-forward`
implemented by this script (`--as-moqe`) on top of the numpy reference.

Usage
-----
    # one-time environment (CPU only is fine)
    python3 -m venv /opt/hfref
    /opt/hfref/bin/pip install torch transformers safetensors numpy

    # generate the reference cases
    /opt/hfref/bin/python scripts/hf_crosscheck.py --out /tmp/hfref-cases
    # verify the generator itself
    /opt/hfref/bin/python scripts/hf_crosscheck.py --out /tmp/hfref-cases --self-test
    # (re)generate, then check a moqe binary against every case
    /opt/hfref/bin/python scripts/hf_crosscheck.py --out /tmp/hfref-cases --check build/moqe
    # check against already generated cases (no torch needed), some families only
    python3 scripts/hf_crosscheck.py --out /tmp/hfref-cases --reuse --check build/moqe \\
        --families mixtral,deepseek_v3
    # the Switch over-capacity case is compared with transformers>=5 semantics (dropped token
    # outputs 0) by default; --switch-dropped legacy compares with p_max * x (transformers 4.x,
    # and DESIGN.md section 3 as written).

--check takes a command line (split with shlex), so a wrapper with arguments works.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import zlib

import numpy as np

T_TOKENS = 37
HIDDEN = 64

PREFIX = {
    "mixtral": "model.layers.0.block_sparse_moe",
    "qwen2_moe": "model.layers.0.mlp",
    "qwen3_moe": "model.layers.0.mlp",
    "olmoe": "model.layers.0.mlp",
    "deepseek_v2": "model.layers.0.mlp",
    "deepseek_v3": "model.layers.0.mlp",
    "switch": "encoder.block.1.layer.1.mlp",
}
FAMILIES = list(PREFIX)

# Hub key for the number of routed experts, per family (config.json as on the Hub).
EXPERT_COUNT_KEY = {
    "mixtral": "num_local_experts",
    "qwen2_moe": "num_experts",
    "qwen3_moe": "num_experts",
    "olmoe": "num_experts",
    "deepseek_v2": "n_routed_experts",
    "deepseek_v3": "n_routed_experts",
    "switch": "num_experts",
}

# Small attention settings so that the full models (used by --self-test) stay tiny.
_LM_COMMON = dict(hidden_size=HIDDEN, num_hidden_layers=1, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=64, max_position_embeddings=128)
_DS_ATTN = dict(hidden_size=HIDDEN, num_hidden_layers=1, num_attention_heads=4,
                num_key_value_heads=4, vocab_size=64, max_position_embeddings=128,
                q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8,
                v_head_dim=8, first_k_dense_replace=0, intermediate_size=160)


def _case(name, family, cfg, fused=False, note=""):
    return dict(name=name, family=family, cfg=cfg, fused=fused, note=note)


CASES = [
    _case("mixtral", "mixtral",
          dict(_LM_COMMON, intermediate_size=96, num_local_experts=8, num_experts_per_tok=2,
               hidden_act="silu", router_jitter_noise=0.0),
          fused=True, note="softmax top-2, always renormalised"),
    _case("qwen2_moe", "qwen2_moe",
          dict(_LM_COMMON, intermediate_size=160, moe_intermediate_size=96,
               shared_expert_intermediate_size=128, num_experts=8, num_experts_per_tok=2,
               norm_topk_prob=False, hidden_act="silu"),
          note="norm_topk_prob=false, shared expert + sigmoid shared_expert_gate"),
    _case("qwen2_moe-norm", "qwen2_moe",
          dict(_LM_COMMON, intermediate_size=160, moe_intermediate_size=96,
               shared_expert_intermediate_size=128, num_experts=8, num_experts_per_tok=2,
               norm_topk_prob=True, hidden_act="silu"),
          note="norm_topk_prob=true"),
    _case("qwen2_moe-gelu_tanh", "qwen2_moe",
          dict(_LM_COMMON, intermediate_size=160, moe_intermediate_size=96,
               shared_expert_intermediate_size=128, num_experts=8, num_experts_per_tok=2,
               norm_topk_prob=False, hidden_act="gelu_pytorch_tanh"),
          note="hidden_act=gelu_pytorch_tanh (not used by real Qwen; exercises gelu_tanh)"),
    _case("qwen3_moe", "qwen3_moe",
          dict(_LM_COMMON, head_dim=16, intermediate_size=160, moe_intermediate_size=96,
               num_experts=8, num_experts_per_tok=2, norm_topk_prob=False, hidden_act="silu"),
          fused=True, note="norm_topk_prob=false"),
    _case("qwen3_moe-norm", "qwen3_moe",
          dict(_LM_COMMON, head_dim=16, intermediate_size=160, moe_intermediate_size=96,
               num_experts=8, num_experts_per_tok=2, norm_topk_prob=True, hidden_act="silu"),
          fused=True, note="norm_topk_prob=true (as the real Qwen3-MoE configs)"),
    _case("olmoe", "olmoe",
          dict(_LM_COMMON, intermediate_size=96, num_experts=8, num_experts_per_tok=2,
               norm_topk_prob=False, hidden_act="silu"),
          note="norm_topk_prob=false (the HF default and OLMoE-1B-7B's)"),
    _case("olmoe-norm", "olmoe",
          dict(_LM_COMMON, intermediate_size=96, num_experts=8, num_experts_per_tok=2,
               norm_topk_prob=True, hidden_act="silu"),
          note="norm_topk_prob=true"),
    _case("olmoe-gelu", "olmoe",
          dict(_LM_COMMON, intermediate_size=96, num_experts=8, num_experts_per_tok=3,
               norm_topk_prob=False, hidden_act="gelu"),
          note="hidden_act=gelu (erf; not used by real OLMoE), top-3"),
    _case("deepseek_v2", "deepseek_v2",
          dict(_DS_ATTN, moe_intermediate_size=96, n_routed_experts=16, n_shared_experts=2,
               num_experts_per_tok=3, topk_method="group_limited_greedy", n_group=4,
               topk_group=2, routed_scaling_factor=1.7, norm_topk_prob=False,
               hidden_act="silu"),
          note="group_limited_greedy (4 groups, keep 2), top-3 unsorted, x1.7, 2 shared"),
    _case("deepseek_v2-greedy", "deepseek_v2",
          dict(_DS_ATTN, moe_intermediate_size=96, n_routed_experts=8, n_shared_experts=1,
               num_experts_per_tok=2, topk_method="greedy", n_group=1, topk_group=1,
               routed_scaling_factor=2.0, norm_topk_prob=False, hidden_act="silu"),
          note="greedy, top-2, x2.0, 1 shared"),
    _case("deepseek_v2-normflag", "deepseek_v2",
          dict(_DS_ATTN, moe_intermediate_size=96, n_routed_experts=16, n_shared_experts=1,
               num_experts_per_tok=3, topk_method="group_limited_greedy", n_group=4,
               topk_group=2, routed_scaling_factor=1.7, norm_topk_prob=True,
               hidden_act="silu"),
          note="norm_topk_prob=true: HF transformers IGNORES it for V2 (no renormalisation)"),
    _case("deepseek_v3", "deepseek_v3",
          dict(_DS_ATTN, moe_intermediate_size=96, n_routed_experts=16, n_shared_experts=1,
               num_experts_per_tok=4, topk_method="noaux_tc", scoring_func="sigmoid",
               n_group=4, topk_group=2, routed_scaling_factor=2.5, norm_topk_prob=True,
               hidden_act="silu"),
          note="noaux_tc, sigmoid, bias, 4 groups keep 2, top-4 unsorted, norm, x2.5, 1 shared"),
    _case("deepseek_v3-nonorm", "deepseek_v3",
          dict(_DS_ATTN, moe_intermediate_size=96, n_routed_experts=16, n_shared_experts=2,
               num_experts_per_tok=4, topk_method="noaux_tc", scoring_func="sigmoid",
               n_group=4, topk_group=2, routed_scaling_factor=1.5, norm_topk_prob=False,
               hidden_act="silu"),
          note="norm_topk_prob=false, x1.5, 2 shared"),
    _case("switch", "switch",
          dict(d_model=HIDDEN, d_ff=128, d_kv=16, num_heads=4, num_layers=2,
               num_decoder_layers=2, num_sparse_encoder_layers=1, num_sparse_decoder_layers=1,
               num_experts=8, expert_capacity=64, router_jitter_noise=0.0, dropout_rate=0.0,
               dense_act_fn="relu", vocab_size=64),
          note="top-1, capacity 64 >= T: nothing dropped"),
    _case("switch-overflow", "switch",
          dict(d_model=HIDDEN, d_ff=128, d_kv=16, num_heads=4, num_layers=2,
               num_decoder_layers=2, num_sparse_encoder_layers=1, num_sparse_decoder_layers=1,
               num_experts=8, expert_capacity=4, router_jitter_noise=0.0, dropout_rate=0.0,
               dense_act_fn="relu", vocab_size=64),
          note="capacity 4 per expert, tokens over it dropped in token order"),
]

ARCH = {
    "mixtral": "MixtralForCausalLM",
    "qwen2_moe": "Qwen2MoeForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "olmoe": "OlmoeForCausalLM",
    "deepseek_v2": "DeepseekV2ForCausalLM",
    "deepseek_v3": "DeepseekV3ForCausalLM",
    "switch": "SwitchTransformersForConditionalGeneration",
}


def case_k(case):
    return 1 if case["family"] == "switch" else case["cfg"]["num_experts_per_tok"]


# --------------------------------------------------------------------------------------------
# safetensors helpers (numpy only)
# --------------------------------------------------------------------------------------------

def st_save(path, tensors, metadata=None):
    from safetensors.numpy import save_file
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, path, metadata=metadata)


def st_load(path):
    from safetensors.numpy import load_file
    return load_file(path)


# --------------------------------------------------------------------------------------------
# Generation from the installed transformers
# --------------------------------------------------------------------------------------------

def _hf_classes(family):
    import importlib
    mod = {"switch": "switch_transformers"}.get(family, family)
    m = importlib.import_module(f"transformers.models.{mod}.modeling_{mod}")
    c = importlib.import_module(f"transformers.models.{mod}.configuration_{mod}")
    names = {
        "mixtral": ("MixtralConfig", "MixtralSparseMoeBlock", "gate"),
        "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeSparseMoeBlock", "gate"),
        "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeSparseMoeBlock", "gate"),
        "olmoe": ("OlmoeConfig", "OlmoeSparseMoeBlock", "gate"),
        "deepseek_v2": ("DeepseekV2Config", "DeepseekV2Moe", "gate"),
        "deepseek_v3": ("DeepseekV3Config", "DeepseekV3MoE", "gate"),
        "switch": ("SwitchTransformersConfig", "SwitchTransformersSparseMLP", "router"),
    }[family]
    return getattr(c, names[0]), getattr(m, names[1]), names[2], m


def make_config(case):
    cfg_cls, _, _, _ = _hf_classes(case["family"])
    config = cfg_cls(**case["cfg"])
    # Standalone blocks: pick the plain per-expert loop (the modeling file's own forward).
    try:
        config._experts_implementation = "eager"
    except Exception:
        pass
    return config


def hub_config_dict(case, config):
    """config.to_dict(), made to look like the Hub's config.json for the expert-count key.

    transformers 5.x maps some names through attribute_map (Qwen3MoeConfig maps num_experts to
    num_local_experts, so to_dict() writes "num_experts": null); Hub files carry the real key.
    """
    d = config.to_dict()
    fam = case["family"]
    key = EXPERT_COUNT_KEY[fam]
    n = case["cfg"].get(key, case["cfg"].get("num_experts", case["cfg"].get("num_local_experts")))
    d[key] = n
    for alias in ("num_experts", "num_local_experts", "n_routed_experts"):
        if alias in d and d[alias] is None:
            del d[alias]
    d["architectures"] = [ARCH[fam]]
    d.setdefault("dtype", "float32")
    return d


def _seed(name, salt):
    return zlib.crc32(f"{name}/{salt}".encode()) & 0x7FFFFFFF


def init_block(block, case):
    import torch
    g = torch.Generator().manual_seed(_seed(case["name"], "weights"))
    with torch.no_grad():
        for name, p in sorted(block.named_parameters(), key=lambda t: t[0]):
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float32) * 0.1)
        for name, b in sorted(block.named_buffers(), key=lambda t: t[0]):
            if name.endswith("e_score_correction_bias"):
                b.copy_((torch.rand(b.shape, generator=g, dtype=torch.float32) * 2 - 1) * 0.1)


def make_input(case):
    import torch
    g = torch.Generator().manual_seed(_seed(case["name"], "input"))
    return torch.randn((T_TOKENS, HIDDEN), generator=g, dtype=torch.float32)


def fused_to_hub(family, sd):
    """Block state_dict (numpy) -> Hub per-expert names. gate_up_proj rows [0, I) are the gate
    projection and [I, 2I) the up projection (modeling: linear(x, gate_up_proj[e]).chunk(2);
    conversion_mapping: Concatenate(dim=1) of [w1, w3] / [gate_proj, up_proj])."""
    out = {}
    names = ("w1", "w3", "w2") if family == "mixtral" else ("gate_proj", "up_proj", "down_proj")
    for k, v in sd.items():
        if k == "experts.gate_up_proj":
            inter = v.shape[1] // 2
            for e in range(v.shape[0]):
                out[f"experts.{e}.{names[0]}.weight"] = v[e, :inter]
                out[f"experts.{e}.{names[1]}.weight"] = v[e, inter:]
        elif k == "experts.down_proj":
            for e in range(v.shape[0]):
                out[f"experts.{e}.{names[2]}.weight"] = v[e]
        else:
            out[k] = v
    return out


def run_hf_case(case):
    """Instantiate the HF block, run it; returns (config, block, x, results dict, block sd)."""
    import torch
    config = make_config(case)
    _, block_cls, router_attr, _ = _hf_classes(case["family"])
    block = block_cls(config).to(torch.float32)
    init_block(block, case)
    block.eval()
    x = make_input(case)
    captured = {}

    def hook(_mod, _inp, out):
        captured["out"] = tuple(o.detach().clone() if torch.is_tensor(o) else o for o in out)

    h = getattr(block, router_attr).register_forward_hook(hook)
    with torch.no_grad():
        y = block(x.clone()[None])
    h.remove()
    if isinstance(y, tuple):  # transformers 4.x blocks return (y, router_logits)
        y = y[0]
    y = y.reshape(T_TOKENS, HIDDEN).float().numpy()
    res = {"y": y}
    if case["family"] == "switch":
        expert_mask, router_probs, router_logits = captured["out"]
        probs = torch.softmax(router_logits.float().reshape(T_TOKENS, -1), dim=-1)
        ids = torch.argmax(probs, dim=-1)  # before capacity masking
        res["topk_ids"] = ids.reshape(T_TOKENS, 1).to(torch.int32).numpy()
        res["topk_weights"] = router_probs.reshape(T_TOKENS, 1).float().numpy()
        admitted = expert_mask.reshape(T_TOKENS, -1).sum(-1) > 0
        res["admitted"] = admitted.to(torch.int32).numpy()
        pmax = res["topk_weights"]
        res["y_legacy"] = np.where(admitted.numpy()[:, None], y, pmax * x.numpy()).astype(np.float32)
    else:
        _logits, weights, ids = captured["out"]
        res["topk_ids"] = ids.reshape(T_TOKENS, -1).to(torch.int32).numpy()
        res["topk_weights"] = weights.reshape(T_TOKENS, -1).float().numpy()
    sd = {k: v.detach().float().numpy().copy() for k, v in block.state_dict().items()}
    return config, block, x.numpy(), res, sd


def write_case(out_dir, case, fused_layout, config, x, res, sd):
    name = case["name"] + ("-fused" if fused_layout else "")
    d = os.path.join(out_dir, name)
    os.makedirs(d, exist_ok=True)
    prefix = PREFIX[case["family"]] + "."
    tensors = sd if fused_layout else fused_to_hub(case["family"], sd)
    st_save(os.path.join(d, "model.safetensors"), {prefix + k: v for k, v in tensors.items()},
            metadata={"format": "pt"})
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(hub_config_dict(case, config), f, indent=2, sort_keys=True)
        f.write("\n")
    st_save(os.path.join(d, "x.safetensors"), {"x": x.astype(np.float32)})
    st_save(os.path.join(d, "expected.safetensors"), res)
    return name


def case_list(families):
    return [c for c in CASES if families is None or c["family"] in families]


def expand_cases(cases):
    """(dir name, case) for every case directory, fused copies included."""
    out = []
    for c in cases:
        out.append((c["name"], c))
        if c["fused"]:
            out.append((c["name"] + "-fused", c))
    return out


def generate(out_dir, families, quiet=False):
    import torch
    import transformers
    torch.set_num_threads(1)
    try:
        transformers.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    except Exception:
        pass
    os.makedirs(out_dir, exist_ok=True)
    index = {}
    for case in case_list(families):
        config, block, x, res, sd = run_hf_case(case)
        for fused in ([False, True] if case["fused"] else [False]):
            name = write_case(out_dir, case, fused, config, x, res, sd)
            index[name] = dict(family=case["family"], prefix=PREFIX[case["family"]],
                               k=case_k(case), note=case["note"], module=type(block).__name__,
                               fused=fused)
            if not quiet:
                extra = ""
                if case["family"] == "switch":
                    extra = f", dropped {int((res['admitted'] == 0).sum())}/{T_TOKENS}"
                print(f"  wrote {name:24s} {type(block).__name__} k={case_k(case)}{extra}")
    idx_path = os.path.join(out_dir, "cases.json")
    merged = {}
    if families is not None and os.path.exists(idx_path):  # keep other families' cases
        with open(idx_path) as f:
            merged = {k: v for k, v in json.load(f).get("cases", {}).items()
                      if v["family"] not in families}
    merged.update(index)
    with open(idx_path, "w") as f:
        json.dump(dict(transformers=transformers.__version__, torch=torch.__version__,
                       tokens=T_TOKENS, hidden=HIDDEN, cases=merged), f, indent=2)
    return index


# --------------------------------------------------------------------------------------------
# Independent float64 numpy reference (reads only the files on disk)
# --------------------------------------------------------------------------------------------

def _act(name):
    if name in ("silu", "swish"):
        return lambda v: v / (1.0 + np.exp(-v))
    if name == "relu":
        return lambda v: np.maximum(v, 0.0)
    if name in ("gelu", "gelu_python"):
        erf = np.vectorize(math.erf)
        return lambda v: 0.5 * v * (1.0 + erf(v / math.sqrt(2.0)))
    if name in ("gelu_pytorch_tanh", "gelu_new", "gelu_python_tanh"):
        return lambda v: 0.5 * v * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (v + 0.044715 * v ** 3)))
    raise ValueError(f"activation {name!r} not in the numpy reference")


def _topk_desc(v, k):
    """Indices of the k largest, descending, ties to the lower index (DESIGN.md)."""
    return list(np.argsort(-v, kind="stable")[:k])


def _load_block(case_dir, prefix):
    w = st_load(os.path.join(case_dir, "model.safetensors"))
    p = prefix + "."
    return {k[len(p):]: v.astype(np.float64) for k, v in w.items() if k.startswith(p)}


def _expert_mats(w, family, e):
    if family == "mixtral":
        if "experts.gate_up_proj" in w:
            gu = w["experts.gate_up_proj"][e]
            i = gu.shape[0] // 2
            return gu[:i], gu[i:], w["experts.down_proj"][e]
        return (w[f"experts.{e}.w1.weight"], w[f"experts.{e}.w3.weight"],
                w[f"experts.{e}.w2.weight"])
    if "experts.gate_up_proj" in w:
        gu = w["experts.gate_up_proj"][e]
        i = gu.shape[0] // 2
        return gu[:i], gu[i:], w["experts.down_proj"][e]
    return (w[f"experts.{e}.gate_proj.weight"], w[f"experts.{e}.up_proj.weight"],
            w[f"experts.{e}.down_proj.weight"])


def numpy_reference(case_dir, family, prefix, switch_dropped="hf"):
    """Returns dict(y, topk_ids, topk_weights, info) computed in float64 per token."""
    with open(os.path.join(case_dir, "config.json")) as f:
        cfg = json.load(f)
    x = st_load(os.path.join(case_dir, "x.safetensors"))["x"].astype(np.float64)
    w = _load_block(case_dir, prefix)
    ntok, hid = x.shape
    info = {"min_margin": float("inf"), "bias_changed": 0, "group_changed": 0, "dropped": 0}
    if family == "switch":
        E = cfg["num_experts"]
        act = _act(cfg["dense_act_fn"])
        cap = cfg["expert_capacity"]
        wg = w["router.classifier.weight"]
        y = np.zeros_like(x)
        ids = np.zeros((ntok, 1), np.int32)
        wts = np.zeros((ntok, 1), np.float64)
        counts = [0] * E
        for t in range(ntok):
            lg = wg @ x[t]
            p = np.exp(lg - lg.max())
            p /= p.sum()
            order = _topk_desc(p, 2)
            info["min_margin"] = min(info["min_margin"], p[order[0]] - p[order[1]])
            e = int(order[0])
            ids[t, 0], wts[t, 0] = e, p[e]
            counts[e] += 1
            if counts[e] <= cap:
                h = act(w[f"experts.expert_{e}.wi.weight"] @ x[t])
                y[t] = p[e] * (w[f"experts.expert_{e}.wo.weight"] @ h)
            else:
                info["dropped"] += 1
                y[t] = p[e] * x[t] if switch_dropped == "legacy" else 0.0
        return dict(y=y, topk_ids=ids, topk_weights=wts, info=info)

    E = cfg[EXPERT_COUNT_KEY[family]]
    k = cfg["num_experts_per_tok"]
    act = _act(cfg["hidden_act"])
    wg = w["gate.weight"]
    y = np.zeros_like(x)
    ids = np.zeros((ntok, k), np.int32)
    wts = np.zeros((ntok, k), np.float64)
    for t in range(ntok):
        lg = wg @ x[t]
        if family in ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe"):
            p = np.exp(lg - lg.max())
            p /= p.sum()
            sel = _topk_desc(p, k + 1)
            info["min_margin"] = min(info["min_margin"], p[sel[k - 1]] - p[sel[k]])
            sel = sel[:k]
            wt = p[sel]
            if family == "mixtral" or cfg.get("norm_topk_prob", False):
                wt = wt / wt.sum()
        elif family == "deepseek_v2":
            p = np.exp(lg - lg.max())
            p /= p.sum()
            score = p.copy()
            if cfg["topk_method"] == "group_limited_greedy":
                ng, tg = cfg["n_group"], cfg["topk_group"]
                gs = p.reshape(ng, E // ng).max(-1)
                keep = _topk_desc(gs, tg)
                mask = np.zeros(E, bool)
                for g in keep:
                    mask[g * (E // ng):(g + 1) * (E // ng)] = True
                score = np.where(mask, p, 0.0)  # HF fills masked experts with 0.0
            sel = _topk_desc(score, k + 1)
            info["min_margin"] = min(info["min_margin"], score[sel[k - 1]] - score[sel[k]])
            sel = sel[:k]
            if set(sel) != set(_topk_desc(p, k)):
                info["group_changed"] += 1
            # HF transformers: never renormalised (norm_topk_prob ignored), always scaled.
            wt = p[sel] * cfg["routed_scaling_factor"]
        elif family == "deepseek_v3":
            s = 1.0 / (1.0 + np.exp(-lg))
            c = s + w["gate.e_score_correction_bias"]
            ng, tg = cfg["n_group"], cfg["topk_group"]
            gsz = E // ng
            gs = np.array([np.sort(c[g * gsz:(g + 1) * gsz])[::-1][:2].sum() for g in range(ng)])
            keep = _topk_desc(gs, tg)
            mask = np.zeros(E, bool)
            for g in keep:
                mask[g * gsz:(g + 1) * gsz] = True
            cm = np.where(mask, c, -np.inf)
            sel = _topk_desc(cm, k + 1)
            info["min_margin"] = min(info["min_margin"], cm[sel[k - 1]] - cm[sel[k]])
            sel = sel[:k]
            if set(sel) != set(_topk_desc(np.where(mask, s, -np.inf), k)):
                info["bias_changed"] += 1
            if set(sel) != set(_topk_desc(c, k)):
                info["group_changed"] += 1
            wt = s[sel]
            if cfg.get("norm_topk_prob", False):
                wt = wt / (wt.sum() + 1e-20)
            wt = wt * cfg["routed_scaling_factor"]
        else:
            raise ValueError(family)
        ids[t] = sel
        wts[t] = wt
        acc = np.zeros(hid)
        for e, we in zip(sel, wt):
            g_, u_, d_ = _expert_mats(w, family, int(e))
            acc += we * (d_ @ (act(g_ @ x[t]) * (u_ @ x[t])))
        if family == "qwen2_moe":
            sh = w["shared_expert.down_proj.weight"] @ (
                act(w["shared_expert.gate_proj.weight"] @ x[t]) * (w["shared_expert.up_proj.weight"] @ x[t]))
            gate = 1.0 / (1.0 + np.exp(-(w["shared_expert_gate.weight"] @ x[t])[0]))
            acc += gate * sh
        elif family in ("deepseek_v2", "deepseek_v3"):
            acc += w["shared_experts.down_proj.weight"] @ (
                act(w["shared_experts.gate_proj.weight"] @ x[t]) * (w["shared_experts.up_proj.weight"] @ x[t]))
        y[t] = acc
    return dict(y=y, topk_ids=ids, topk_weights=wts, info=info)


# --------------------------------------------------------------------------------------------
# Comparison (used by --check and --self-test)
# --------------------------------------------------------------------------------------------

def compare(exp, got, wtol, ytol, y_key="y"):
    """exp/got: dicts of numpy arrays. Returns a result dict with 'ok' and the numbers."""
    r = dict(ok=False, msg="", ids_agree=0, order_agree=0, w_err=float("nan"),
             y_rel=float("nan"), y_abs=float("nan"))
    ref_ids, ref_w, ref_y = exp["topk_ids"], exp["topk_weights"], exp[y_key]
    for key, ref in (("topk_ids", ref_ids), ("topk_weights", ref_w), ("y", ref_y)):
        if key not in got:
            r["msg"] = f"output has no tensor '{key}'"
            return r
        if tuple(got[key].shape) != tuple(ref.shape):
            r["msg"] = f"'{key}' has shape {list(got[key].shape)}, expected {list(ref.shape)}"
            return r
    ntok = ref_ids.shape[0]
    w_err = 0.0
    for t in range(ntok):
        a = [int(v) for v in ref_ids[t]]
        b = [int(v) for v in got["topk_ids"][t]]
        if sorted(a) == sorted(b):
            r["ids_agree"] += 1
            r["order_agree"] += int(a == b)
            for j, e in enumerate(a):
                gw = float(got["topk_weights"][t][b.index(e)])
                rw = float(ref_w[t][j])
                w_err = max(w_err, abs(gw - rw) / max(abs(rw), 1e-30))
    r["w_err"] = w_err
    gy = got["y"].astype(np.float64)
    ry = ref_y.astype(np.float64)
    r["y_rel"] = float(np.linalg.norm(gy - ry) / max(np.linalg.norm(ry), 1e-30))
    r["y_abs"] = float(np.abs(gy - ry).max())
    problems = []
    if r["ids_agree"] != ntok:
        problems.append(f"ids differ on {ntok - r['ids_agree']} tokens")
    if not w_err <= wtol:
        problems.append(f"weights err {w_err:.2e} > {wtol:g}")
    if not r["y_rel"] <= ytol:
        problems.append(f"y rel err {r['y_rel']:.2e} > {ytol:g}")
    r["ok"] = not problems
    r["msg"] = "; ".join(problems)
    return r


def print_table(rows):
    hdr = f"{'case':26s} {'ids agree':>10s} {'order':>6s} {'w max rel':>10s} {'y rel err':>10s} {'y max abs':>10s}  result"
    print(hdr)
    print("-" * len(hdr))
    for name, r in rows:
        ntok = r.get("ntok", T_TOKENS)
        print(f"{name:26s} {r['ids_agree']:>4d}/{ntok:<5d} {r['order_agree']:>6d} {r['w_err']:>10.2e} "
              f"{r['y_rel']:>10.2e} {r['y_abs']:>10.2e}  {'PASS' if r['ok'] else 'FAIL'}"
              + (f"  ({r['msg']})" if r["msg"] else ""))


def run_check(out_dir, families, moqe_cmd, wtol, ytol, switch_dropped, timeout,
              device="cpu", quantize=0):
    try:
        with open(os.path.join(out_dir, "cases.json")) as f:
            index = json.load(f)["cases"]
    except (OSError, ValueError, KeyError) as e:
        print(f"cannot read {out_dir}/cases.json ({e}): generate the cases first", file=sys.stderr)
        return 1
    cmd0 = shlex.split(moqe_cmd)
    rows, failures = [], 0
    tmp = tempfile.mkdtemp(prefix="hf_crosscheck_")
    try:
        for name, meta in index.items():
            if families is not None and meta["family"] not in families:
                continue
            d = os.path.join(out_dir, name)
            if quantize and name.endswith("-fused"):
                continue  # quantized runs use the per-expert layout (the device layer's)
            y_path = os.path.join(tmp, f"{name}.y.safetensors")
            weights = d
            if quantize:
                # Quantize the experts with moqe, and take the reference on the dequantized
                # weights: what remains is the kernels' own error, not the quantization's.
                qdir = os.path.join(tmp, name)
                os.makedirs(qdir, exist_ok=True)
                weights = os.path.join(qdir, "model.safetensors")
                deq = os.path.join(qdir, "dequantized")
                os.makedirs(deq, exist_ok=True)
                steps = [cmd0 + ["quantize", "--input", d, "--output", weights, "--bits",
                                 str(quantize), "--include", "experts?\\.", "--quiet"],
                         cmd0 + ["dequantize", "--input", weights, "--output",
                                 os.path.join(deq, "model.safetensors")]]
                bad = None
                for step in steps:
                    p = subprocess.run(step, capture_output=True, text=True, timeout=timeout)
                    if p.returncode != 0:
                        bad = f"{step[len(cmd0)]}: " + (p.stderr or p.stdout).strip()[-300:]
                        break
                if bad:
                    rows.append((name, dict(ok=False, ids_agree=0, order_agree=0,
                                            w_err=float("nan"), y_rel=float("nan"),
                                            y_abs=float("nan"), ntok=0, msg=bad)))
                    failures += 1
                    continue
                for f_ in ("config.json", "x.safetensors"):
                    shutil.copy(os.path.join(d, f_), os.path.join(deq, f_))
                ref = numpy_reference(deq, meta["family"], meta["prefix"],
                                      "legacy" if switch_dropped == "legacy" else "hf")
                exp = {k: np.asarray(v) for k, v in ref.items() if k != "info"}
                if meta["family"] == "switch":
                    exp["y_legacy"] = exp["y"]
            cmd = cmd0 + ["moe-forward", "--weights", weights, "--prefix", meta["prefix"],
                          "--family", meta["family"], "--input", os.path.join(d, "x.safetensors"),
                          "--output", y_path, "--config", os.path.join(d, "config.json"),
                          "--device", device]
            if meta["family"] == "switch":  # moqe's default is DESIGN's pass-through (4.x)
                cmd += ["--switch-dropped", "passthrough" if switch_dropped == "legacy" else "zero"]
            if not quantize:
                exp = st_load(os.path.join(d, "expected.safetensors"))
            y_key = "y_legacy" if (meta["family"] == "switch" and switch_dropped == "legacy") else "y"
            blank = dict(ok=False, ids_agree=0, order_agree=0, w_err=float("nan"),
                         y_rel=float("nan"), y_abs=float("nan"), ntok=exp["y"].shape[0])
            try:
                p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
            except (OSError, subprocess.TimeoutExpired) as e:
                rows.append((name, dict(blank, msg=f"could not run: {e}")))
                failures += 1
                continue
            if p.returncode != 0 or not os.path.exists(y_path):
                err = (p.stderr or p.stdout).strip().replace("\n", " | ")[-400:]
                what = f"exit {p.returncode}" if p.returncode != 0 else "exit 0 but no output file"
                rows.append((name, dict(blank, msg=f"{what}: {err}")))
                failures += 1
                continue
            try:
                got = st_load(y_path)
            except Exception as e:  # malformed output
                rows.append((name, dict(blank, msg=f"unreadable output: {e}")))
                failures += 1
                continue
            r = compare(exp, got, wtol, ytol, y_key)
            r["ntok"] = exp["y"].shape[0]
            if meta["family"] == "switch" and "y_legacy" in exp and not r["ok"]:
                other = "y" if y_key == "y_legacy" else "y_legacy"
                r2 = compare(exp, got, wtol, ytol, other)
                if r2["ok"]:
                    r["msg"] += (" [matches the transformers 4.x pass-through semantics]"
                                 if other == "y_legacy" else
                                 " [matches the transformers 5.x drop-to-zero semantics]")
            rows.append((name, r))
            failures += int(not r["ok"])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if not rows:
        print(f"no cases for {families or 'any family'} in {out_dir}/cases.json: generate them "
              "first (run without --reuse)", file=sys.stderr)
        return 1
    print_table(rows)
    print(f"{len(rows) - failures} passed, {failures} failed")
    return 1 if failures or not rows else 0


# --------------------------------------------------------------------------------------------
# Stand-in moe-forward (for --self-test of the --check path)
# --------------------------------------------------------------------------------------------

def as_moqe(argv):
    ap = argparse.ArgumentParser(prog="hf_crosscheck --as-moqe")
    ap.add_argument("cmd", choices=["moe-forward"])
    ap.add_argument("--weights", required=True)
    ap.add_argument("--prefix", required=True)
    ap.add_argument("--family", required=True, choices=FAMILIES)
    ap.add_argument("--input", required=True)
    ap.add_argument("--output", required=True)
    ap.add_argument("--config")
    ap.add_argument("--switch-dropped", choices=["passthrough", "zero"], default="passthrough")
    a = ap.parse_args(argv)
    d = a.weights if os.path.isdir(a.weights) else os.path.dirname(a.weights)
    r = numpy_reference(d, a.family, a.prefix,
                        switch_dropped="legacy" if a.switch_dropped == "passthrough" else "hf")
    tmp = a.output + ".tmp"
    st_save(tmp, {"y": r["y"].astype(np.float32), "topk_ids": r["topk_ids"].astype(np.int32),
                  "topk_weights": r["topk_weights"].astype(np.float32)})
    os.replace(tmp, a.output)
    return 0


# --------------------------------------------------------------------------------------------
# Self-test
# --------------------------------------------------------------------------------------------

def _full_model_roundtrip(case):
    """save_pretrained() of a 1-layer full HF model holding the same block; return its tensors
    under the block's prefix (as written by transformers, i.e. after revert_weight_conversion)."""
    import torch
    import transformers
    config, block, _x, _res, _sd = run_hf_case(case)
    model = getattr(transformers, ARCH[case["family"]])(config).to(torch.float32)
    if case["family"] == "switch":
        target = model.encoder.block[1].layer[1].mlp
    else:
        target = model.model.layers[0].mlp
    target.load_state_dict(block.state_dict())
    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d, safe_serialization=True)
        files = [f for f in os.listdir(d) if f.endswith(".safetensors")]
        tensors = {}
        for f in files:
            tensors.update(st_load(os.path.join(d, f)))
    p = PREFIX[case["family"]] + "."
    return {k: v for k, v in tensors.items() if k.startswith(p)}


def self_test(out_dir, families):
    import transformers
    print(f"transformers {transformers.__version__}")
    print("generating ...")
    index = generate(out_dir, families, quiet=True)
    ok = True
    cases = {c["name"]: c for c in case_list(families)}

    print("\n[1] independent float64 numpy reference vs captured HF outputs")
    rows = []
    for name, meta in index.items():
        d = os.path.join(out_dir, name)
        ref = numpy_reference(d, meta["family"], meta["prefix"])
        exp = st_load(os.path.join(d, "expected.safetensors"))
        r = compare(exp, ref, 1e-5, 1e-5)
        r["ntok"] = T_TOKENS
        rows.append((name, r))
        ok &= r["ok"]
        inf = ref["info"]
        extra = [f"min routing margin {inf['min_margin']:.2e}"]
        if meta["family"] == "deepseek_v3":
            extra.append(f"bias changed selection on {inf['bias_changed']} tokens")
        if meta["family"] in ("deepseek_v2", "deepseek_v3"):
            extra.append(f"group limit changed selection on {inf['group_changed']} tokens")
        if meta["family"] == "switch":
            extra.append(f"dropped {inf['dropped']} tokens")
            leg = numpy_reference(d, "switch", meta["prefix"], switch_dropped="legacy")
            rl = compare(exp, leg, 1e-5, 1e-5, y_key="y_legacy")
            ok &= rl["ok"]
            extra.append(f"legacy y rel err {rl['y_rel']:.1e}")
            if inf["dropped"] != int((exp["admitted"] == 0).sum()):
                ok = False
                extra.append("DROPPED COUNT MISMATCH")
        # order: families using sorted topk must agree in order too
        if meta["family"] in ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "switch") \
                and r["order_agree"] != T_TOKENS:
            ok = False
            extra.append("ORDER MISMATCH for a sorted-topk family")
        print(f"  {name:26s} " + "; ".join(extra))
    print_table(rows)
    if all(r["ok"] for _, r in rows):
        print("  numpy reference agrees with every case")

    print("\n[2] fused copies equal the per-expert files")
    for name, meta in index.items():
        if not meta["fused"]:
            continue
        a = _load_block(os.path.join(out_dir, name), meta["prefix"])
        b = _load_block(os.path.join(out_dir, name[:-len("-fused")]), meta["prefix"])
        case = cases[name[:-len("-fused")]]
        conv = fused_to_hub(case["family"], a)
        same = set(conv) == set(b) and all(np.array_equal(conv[k], b[k]) for k in b)
        print(f"  {name:26s} {'OK' if same else 'MISMATCH'} ({len(a)} fused tensors -> {len(b)})")
        ok &= same

    print("\n[3] tensor names/values equal what the full HF model's save_pretrained() writes")
    for fam in dict.fromkeys(m["family"] for m in index.values()):
        case = next(c for c in case_list(families) if c["family"] == fam)
        try:
            saved = _full_model_roundtrip(case)
        except Exception as e:  # report, do not hide
            print(f"  {fam:12s} could not build/save the full model: {type(e).__name__}: {e}")
            ok = False
            continue
        ours = st_load(os.path.join(out_dir, case["name"], "model.safetensors"))
        same_names = set(saved) == set(ours)
        same_vals = same_names and all(np.array_equal(saved[k], ours[k]) for k in ours)
        print(f"  {fam:12s} names {'OK' if same_names else 'DIFFER'}, values "
              f"{'OK' if same_vals else 'DIFFER'} ({len(ours)} tensors, e.g. {sorted(ours)[0]})")
        if not same_names:
            print("     only in save_pretrained:", sorted(set(saved) - set(ours))[:6])
            print("     only in ours          :", sorted(set(ours) - set(saved))[:6])
        ok &= same_vals

    print("\n[4] --check end to end against the stand-in moe-forward (numpy reference)")
    me = f"{shlex.quote(sys.executable)} {shlex.quote(os.path.abspath(__file__))} --as-moqe"
    rc = run_check(out_dir, families, me, 1e-5, 1e-5, "hf", 300)
    ok &= rc == 0
    print("\n[5] --check reports a failing binary as FAIL")
    rc_bad = run_check(out_dir, ["mixtral"] if families is None or "mixtral" in families
                       else families[:1], "false", 1e-6, 1e-5, "hf", 60)
    print(f"  exit code {rc_bad} (expected 1)")
    ok &= rc_bad == 1

    print("\nSELF-TEST", "PASSED" if ok else "FAILED")
    return 0 if ok else 1


# --------------------------------------------------------------------------------------------

def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--as-moqe":
        return as_moqe(argv[1:])
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="See the module docstring for details.")
    ap.add_argument("--out", required=True, help="directory for the generated cases")
    ap.add_argument("--families", help="comma-separated subset of " + ",".join(FAMILIES))
    ap.add_argument("--check", metavar="MOQE_BINARY", help="moqe command to check (shlex-split)")
    ap.add_argument("--reuse", action="store_true",
                    help="with --check: do not regenerate, use the cases already in --out")
    ap.add_argument("--self-test", action="store_true", help="verify the generator")
    ap.add_argument("--wtol", type=float, default=1e-6, help="routing weight rel tolerance")
    ap.add_argument("--ytol", type=float, default=1e-5, help="output rel (Frobenius) tolerance")
    ap.add_argument("--switch-dropped", choices=["hf", "legacy"], default="hf",
                    help="reference for Switch tokens over capacity: hf = installed transformers "
                         "(5.x: output 0), legacy = transformers 4.x (p_max * x)")
    ap.add_argument("--timeout", type=float, default=300, help="seconds per moe-forward run")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                    help="moe-forward --device (cuda runs moqe-quantized experts only: use "
                         "--quantize)")
    ap.add_argument("--quantize", type=int, choices=[0, 2, 3, 4, 8], default=0,
                    help="with --check: quantize the experts with `moqe quantize` (this many bits) "
                         "and compare with the reference on the dequantized weights (numpy, "
                         "float64, itself checked against transformers by --self-test); fused "
                         "cases are skipped")
    a = ap.parse_args(argv)
    families = None
    if a.families:
        families = [f.strip() for f in a.families.split(",") if f.strip()]
        bad = [f for f in families if f not in FAMILIES]
        if bad:
            ap.error(f"unknown families {bad}; known: {FAMILIES}")
    if a.self_test:
        return self_test(a.out, families)
    if not (a.check and a.reuse):
        print(f"generating cases into {a.out}")
        generate(a.out, families)
    if a.check:
        return run_check(a.out, families, a.check, a.wtol, a.ytol, a.switch_dropped, a.timeout,
                         a.device, a.quantize)
    return 0


if __name__ == "__main__":
    sys.exit(main())
