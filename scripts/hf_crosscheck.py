#!/usr/bin/env python3
"""Cross-check `moqe moe-forward` against the MoE blocks of Hugging Face transformers, family by
family, and write the small fixtures that ctest checks without torch.

Generation (needs torch + transformers + safetensors + numpy)
------------------------------------------------------------
For every case below, this script builds a tiny *whole model* of one MoE family with the installed
transformers (fp32, eval mode), fills the MoE block of layer 0 deterministically (normal, std 0.15,
rounded to bf16 so that the weights are stored exactly in BF16; correction biases uniform in
[-0.1, 0.1]), runs that block on a random x [T, H] (one sequence) and records its output y and the
experts and weights its router chose (read from the inputs of the block's expert module or from its
router's outputs). The model is written with `save_pretrained`, so tensor names, layouts (per-expert
or fused 3-D) and config.json are transformers' own; the case keeps the layer's tensors only:

    <out>/<case>/model.safetensors     the MoE layer's tensors as save_pretrained wrote them (BF16)
    <out>/<case>/config.json           as save_pretrained wrote it
    <out>/<case>/x.safetensors         x F32 [T, H]
    <out>/<case>/expected.safetensors  y F32 [T, H], topk_ids I32 [T, k], topk_weights F32 [T, k]
    <out>/<case>-fused/...             mixtral and deepseek_v3: the same layer with the experts in
                                        transformers 5's fused layout (experts.gate_up_proj
                                        [E, 2I, H], experts.down_proj [E, H, I])
    <out>/cases.json                   case -> family, prefix, k, transformers version, note

A seed is kept only when the routing is robust: three runs with the router weights perturbed by
3e-5 (relative) must choose the same experts for every token, so that fp32 summation order cannot
flip a choice. The cases are small enough (H = 32, I = 8, 4 experts, T = 16) to be committed:
tests/data/families is generated with `--out tests/data/families` and checked by ctest.

Check (needs numpy + safetensors only)
--------------------------------------
    python3 scripts/hf_crosscheck.py --out DIR --reuse --check build/src/cli/moqe
runs, for each case, `moqe moe-forward --weights <case> --prefix <prefix> --input x --output y`
with no --family and no --config (the family comes from config.json) and compares: the chosen
experts as sets per token, each chosen expert's weight (relative error <= --wtol), y (relative
Frobenius error <= --ytol). A non-zero exit, a timeout or a missing output is a FAIL. Exits 1 on any
FAIL.

--quantize B first runs `moqe quantize --bits B` on the case (the expert weights, original or
fused layouts) and `moqe dequantize`; the reference is then transformers' block run on the
dequantized weights (loaded with `from_pretrained`, so needs torch), and moe-forward runs on the
quantized file. What remains is the kernels' error, not the quantization's.

Self-test (needs torch): regenerates, then (1) loads every case directory with transformers'
`from_pretrained` and checks that its block reproduces expected.safetensors (names, layouts and
config round-trip through transformers' own loader); (2) runs --check end to end against a stand-in
`moe-forward` built on transformers (`--as-moqe`, which accepts every option --check passes,
--device included); (3) checks that a failing binary is reported as FAIL.

    python3 -m venv /tmp/hf && /tmp/hf/bin/pip install torch transformers safetensors numpy
    /tmp/hf/bin/python scripts/hf_crosscheck.py --out /tmp/hfc --self-test
    /tmp/hf/bin/python scripts/hf_crosscheck.py --out /tmp/hfc --check build/src/cli/moqe
    /tmp/hf/bin/python scripts/hf_crosscheck.py --out /tmp/hfc --reuse --check build/src/cli/moqe \\
        --quantize 4
    # the committed fixtures
    /tmp/hf/bin/python scripts/hf_crosscheck.py --out tests/data/families
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import zlib

import numpy as np

T_TOKENS = 16
H = 32
INTER = 8

# Attention settings that keep the whole models tiny (the attention is never run).
LM = dict(hidden_size=H, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
          vocab_size=16, max_position_embeddings=64, head_dim=16)
MLA = dict(LM, num_key_value_heads=2, q_lora_rank=16, kv_lora_rank=8, qk_nope_head_dim=8,
           qk_rope_head_dim=8, v_head_dim=8)
LINEAR_ATTN = dict(layer_types=["full_attention"], linear_num_value_heads=2, linear_num_key_heads=1,
                   linear_key_head_dim=8, linear_value_head_dim=8)

# family -> (config class, model class, module path of the MoE block in the model, hub prefix,
#            sibling modules that belong to the layer, base config)
FAMILY = {
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", "model.layers.0.mlp",
                "model.layers.0.block_sparse_moe", [],
                dict(LM, intermediate_size=INTER, num_local_experts=4, num_experts_per_tok=2)),
    "minimax": ("MiniMaxConfig", "MiniMaxForCausalLM", "model.layers.0.mlp",
                "model.layers.0.block_sparse_moe", [],
                dict(LM, intermediate_size=INTER, num_local_experts=4, num_experts_per_tok=2,
                     layer_types=["full_attention"])),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM", "model.layers.0.mlp",
                  "model.layers.0.mlp", [],
                  dict(LM, intermediate_size=16, moe_intermediate_size=INTER,
                       shared_expert_intermediate_size=16, num_experts=4, num_experts_per_tok=2)),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", "model.layers.0.mlp",
                  "model.layers.0.mlp", [],
                  dict(LM, moe_intermediate_size=INTER, num_experts=4, num_experts_per_tok=2)),
    "qwen3_next": ("Qwen3NextConfig", "Qwen3NextForCausalLM", "model.layers.0.mlp",
                   "model.layers.0.mlp", [],
                   dict(LM, **LINEAR_ATTN, moe_intermediate_size=INTER,
                        shared_expert_intermediate_size=16, num_experts=4, num_experts_per_tok=2)),
    "qwen3_5_moe": ("Qwen3_5MoeTextConfig", "Qwen3_5MoeForCausalLM", "model.layers.0.mlp",
                    "model.layers.0.mlp", [],
                    dict(LM, **LINEAR_ATTN, moe_intermediate_size=INTER,
                         shared_expert_intermediate_size=16, num_experts=4, num_experts_per_tok=2)),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM", "model.layers.0.mlp", "model.layers.0.mlp", [],
              dict(LM, intermediate_size=INTER, num_experts=4, num_experts_per_tok=2)),
    "flex_olmo": ("FlexOlmoConfig", "FlexOlmoForCausalLM", "model.layers.0.mlp",
                  "model.layers.0.mlp", [],
                  dict(LM, intermediate_size=INTER, num_experts=4, num_experts_per_tok=2,
                       pad_token_id=1)),
    "deepseek_v2": ("DeepseekV2Config", "DeepseekV2ForCausalLM", "model.layers.0.mlp",
                    "model.layers.0.mlp", [],
                    dict(MLA, intermediate_size=16, moe_intermediate_size=INTER,
                         n_routed_experts=4, n_shared_experts=2, num_experts_per_tok=2,
                         topk_method="group_limited_greedy", n_group=2, topk_group=1,
                         routed_scaling_factor=1.7, first_k_dense_replace=0)),
    "deepseek_v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM", "model.layers.0.mlp",
                    "model.layers.0.mlp", [],
                    dict(MLA, intermediate_size=16, moe_intermediate_size=INTER,
                         n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2,
                         n_group=2, topk_group=1, routed_scaling_factor=2.5,
                         first_k_dense_replace=0)),
    "glm4_moe": ("Glm4MoeConfig", "Glm4MoeForCausalLM", "model.layers.0.mlp",
                 "model.layers.0.mlp", [],
                 dict(LM, intermediate_size=16, moe_intermediate_size=INTER, n_routed_experts=4,
                      n_shared_experts=1, num_experts_per_tok=2, n_group=2, topk_group=1,
                      routed_scaling_factor=1.5, first_k_dense_replace=0)),
    "glm4_moe_lite": ("Glm4MoeLiteConfig", "Glm4MoeLiteForCausalLM", "model.layers.0.mlp",
                      "model.layers.0.mlp", [],
                      dict(MLA, intermediate_size=16, moe_intermediate_size=INTER,
                           n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2,
                           mlp_layer_types=["sparse"])),
    "dots1": ("Dots1Config", "Dots1ForCausalLM", "model.layers.0.mlp", "model.layers.0.mlp", [],
              dict(LM, intermediate_size=16, moe_intermediate_size=INTER, n_routed_experts=4,
                   n_shared_experts=2, num_experts_per_tok=2, n_group=2, topk_group=1,
                   routed_scaling_factor=2.5, first_k_dense_replace=0)),
    "cohere2_moe": ("Cohere2MoeConfig", "Cohere2MoeForCausalLM", "model.layers.0.mlp",
                    "model.layers.0.mlp", [],
                    dict(LM, intermediate_size=INTER, num_experts=4, num_experts_per_tok=2,
                         num_shared_experts=1, layer_types=["full_attention"])),
    "switch_transformers": ("SwitchTransformersConfig",
                            "SwitchTransformersForConditionalGeneration",
                            "encoder.block.1.layer.1.mlp", "encoder.block.1.layer.1.mlp", [],
                            dict(d_model=H, d_ff=INTER, d_kv=16, num_heads=2, num_layers=2,
                                 num_decoder_layers=2, num_sparse_encoder_layers=1,
                                 num_sparse_decoder_layers=1, num_experts=4, expert_capacity=64,
                                 vocab_size=16)),
    "phimoe": ("PhimoeConfig", "PhimoeForCausalLM", "model.layers.0.mlp",
               "model.layers.0.block_sparse_moe", [],
               dict(LM, intermediate_size=INTER, num_local_experts=4, num_experts_per_tok=2)),
    "minimax_m2": ("MiniMaxM2Config", "MiniMaxM2ForCausalLM", "model.layers.0.mlp",
                   "model.layers.0.block_sparse_moe", [],
                   dict(LM, intermediate_size=INTER, num_local_experts=4, num_experts_per_tok=2)),
    "exaone_moe": ("ExaoneMoeConfig", "ExaoneMoeForCausalLM", "model.layers.0.mlp",
                   "model.layers.0.mlp", [],
                   dict(LM, intermediate_size=16, moe_intermediate_size=INTER, num_experts=4,
                        num_shared_experts=1, num_experts_per_tok=2, n_group=2, topk_group=1,
                        first_k_dense_replace=0, layer_types=["full_attention"])),
    "ernie4_5_moe": ("Ernie4_5_MoeConfig", "Ernie4_5_MoeForCausalLM", "model.layers.0.mlp",
                     "model.layers.0.mlp", [],
                     dict(LM, intermediate_size=16, moe_intermediate_size=INTER, moe_num_experts=4,
                          moe_k=2, moe_num_shared_experts=1, moe_layer_start_index=0)),
    "lfm2_moe": ("Lfm2MoeConfig", "Lfm2MoeForCausalLM", "model.layers.0.feed_forward",
                 "model.layers.0.feed_forward", [],
                 dict(LM, intermediate_size=16, moe_intermediate_size=INTER, num_experts=4,
                      num_experts_per_tok=2, num_dense_layers=0,
                      layer_types=["full_attention"])),
    "hunyuan_v1_moe": ("HunYuanMoEV1Config", "HunYuanMoEV1ForCausalLM", "model.layers.0.mlp",
                       "model.layers.0.mlp", [],
                       dict(LM, intermediate_size=INTER, num_experts=4, moe_topk=2)),
    "afmoe": ("AfmoeConfig", "AfmoeForCausalLM", "model.layers.0.mlp", "model.layers.0.mlp", [],
              dict(LM, intermediate_size=16, moe_intermediate_size=INTER, num_experts=4,
                   num_experts_per_tok=2, num_shared_experts=1, num_dense_layers=0,
                   route_scale=1.8)),
    "gpt_oss": ("GptOssConfig", "GptOssForCausalLM", "model.layers.0.mlp", "model.layers.0.mlp",
                [],
                dict(LM, intermediate_size=INTER, num_local_experts=4, num_experts_per_tok=2,
                     layer_types=["full_attention"])),
    "llama4_text": ("Llama4TextConfig", "Llama4ForCausalLM", "model.layers.0.feed_forward",
                    "model.layers.0.feed_forward", [],
                    dict(LM, intermediate_size=INTER, intermediate_size_mlp=16,
                         num_local_experts=4, num_experts_per_tok=1, moe_layers=[0])),
    "granitemoe": ("GraniteMoeConfig", "GraniteMoeForCausalLM", "model.layers.0.block_sparse_moe",
                   "model.layers.0.block_sparse_moe", [],
                   dict(LM, intermediate_size=INTER, num_local_experts=4, num_experts_per_tok=2)),
    "granitemoeshared": ("GraniteMoeSharedConfig", "GraniteMoeSharedForCausalLM",
                         "model.layers.0.block_sparse_moe", "model.layers.0.block_sparse_moe",
                         ["model.layers.0.shared_mlp"],
                         dict(LM, intermediate_size=INTER, num_local_experts=4,
                              num_experts_per_tok=2, shared_intermediate_size=16)),
    "jetmoe": ("JetMoeConfig", "JetMoeForCausalLM", "model.layers.0.mlp", "model.layers.0.mlp",
               [],
               dict(hidden_size=H, num_hidden_layers=1, num_key_value_heads=1, kv_channels=16,
                    vocab_size=16, intermediate_size=INTER, num_local_experts=4,
                    num_experts_per_tok=2)),
    "dbrx": ("DbrxConfig", "DbrxForCausalLM", "transformer.blocks.0.ffn", "transformer.blocks.0.ffn",
             [],
             dict(d_model=H, n_heads=2, n_layers=1, vocab_size=16, max_seq_len=64,
                  attn_config=dict(kv_n_heads=1, rope_theta=10000.0),
                  ffn_config=dict(ffn_hidden_size=INTER, moe_num_experts=4, moe_top_k=2))),
}
FAMILIES = list(FAMILY)


def _case(name, family, note, fused=False, **over):
    return dict(name=name, family=family, note=note, over=over, fused=fused)


CASES = [
    _case("mixtral", "mixtral", "softmax top-2, renormalized", fused=True),
    _case("minimax", "minimax", "Mixtral routing"),
    _case("qwen2_moe", "qwen2_moe", "norm_topk_prob false, shared expert with sigmoid gate"),
    _case("qwen2_moe-norm", "qwen2_moe", "norm_topk_prob true", norm_topk_prob=True),
    _case("qwen3_moe", "qwen3_moe", "norm_topk_prob false (the class default)"),
    _case("qwen3_moe-norm-gelu", "qwen3_moe", "norm_topk_prob true, gelu_pytorch_tanh",
          norm_topk_prob=True, hidden_act="gelu_pytorch_tanh"),
    _case("qwen3_next", "qwen3_next", "norm_topk_prob true by default, gated shared expert"),
    _case("qwen3_5_moe", "qwen3_5_moe", "always renormalized (no norm_topk_prob key)"),
    _case("olmoe", "olmoe", "norm_topk_prob false"),
    _case("olmoe-gelu-top3", "olmoe", "gelu (erf), top-3", hidden_act="gelu",
          num_experts_per_tok=3),
    _case("flex_olmo", "flex_olmo", "softmax top-k, no renormalization"),
    _case("deepseek_v2", "deepseek_v2", "group_limited_greedy 2 groups keep 1, x1.7, 2 shared"),
    _case("deepseek_v2-greedy-normflag", "deepseek_v2",
          "greedy; norm_topk_prob true is ignored by transformers", topk_method="greedy",
          n_group=1, topk_group=1, norm_topk_prob=True, routed_scaling_factor=2.0),
    _case("deepseek_v2-mlp_bias", "deepseek_v2", "mlp_bias: the shared experts have biases",
          mlp_bias=True, topk_method="greedy"),
    _case("deepseek_v3", "deepseek_v3", "sigmoid, correction bias, 2 groups keep 1, x2.5",
          fused=True),
    _case("deepseek_v3-nonorm", "deepseek_v3", "norm_topk_prob false, x1.5",
          norm_topk_prob=False, routed_scaling_factor=1.5),
    _case("glm4_moe", "glm4_moe", "DeepSeek-V3 routing, GLM defaults"),
    _case("glm4_moe_lite", "glm4_moe_lite", "one group, x1.8 (its default)"),
    _case("dots1", "dots1", "DeepSeek-V3 routing, norm_topk_prob false (its default)"),
    _case("cohere2_moe", "cohere2_moe", "top-k of logits, softmax over them; shared averaged"),
    _case("cohere2_moe-sigmoid-sum", "cohere2_moe", "sigmoid of the chosen logits, renormalized; "
          "shared summed", expert_selection_fn="sigmoid", shared_expert_combination_strategy="sum"),
    _case("switch_transformers", "switch_transformers", "top-1, capacity 64 >= T: nothing dropped"),
    _case("switch_transformers-overflow", "switch_transformers",
          "capacity 3 per expert: tokens over it output 0", expert_capacity=3),
    _case("phimoe", "phimoe", "sparsemixer top-2, jitter eps 0.01"),
    _case("phimoe-eps", "phimoe", "sparsemixer with jitter eps 0.3 (wider masks)",
          router_jitter_noise=0.3),
    _case("minimax_m2", "minimax_m2", "sigmoid + block-level correction bias, renormalized"),
    _case("exaone_moe", "exaone_moe", "DeepSeek-V3 routing, bias at mlp.e_score_correction_bias"),
    _case("ernie4_5_moe", "ernie4_5_moe", "softmax, selection with moe_statics bias, clamp-norm"),
    _case("lfm2_moe", "lfm2_moe", "sigmoid + expert_bias, norm with +1e-6, silu"),
    _case("lfm2_moe-nobias", "lfm2_moe", "use_expert_bias false, x1.3, no norm",
          use_expert_bias=False, routed_scaling_factor=1.3, norm_topk_prob=False),
    _case("hunyuan_v1_moe", "hunyuan_v1_moe", "softmax renormalized, gate.wg, shared_mlp"),
    _case("afmoe", "afmoe", "sigmoid + expert_bias, always renormalized, route_scale 1.8"),
    _case("gpt_oss", "gpt_oss", "router bias, softmax of top-k logits, clamped SwiGLU + biases"),
    _case("gpt_oss-clamp", "gpt_oss", "swiglu_limit 0.2: the clamps bind", swiglu_limit=0.2),
    _case("llama4_text", "llama4_text", "top-1 sigmoid scaling the expert input, shared expert"),
    _case("llama4_text-top2", "llama4_text", "top-2", num_experts_per_tok=2),
    _case("granitemoe", "granitemoe", "fused input_linear/output_linear, softmax of top-k logits"),
    _case("granitemoeshared", "granitemoeshared", "plus the layer's shared_mlp"),
    _case("jetmoe", "jetmoe", "fused experts, output bias"),
    _case("dbrx", "dbrx", "w1/v1/w2 stacked 2-D, L1-normalized top-k"),
    _case("dbrx-p2", "dbrx", "moe_normalize_expert_weights 2 (L2)",
          ffn_config=dict(ffn_hidden_size=INTER, moe_num_experts=4, moe_top_k=2,
                          moe_normalize_expert_weights=2.0)),
]


def case_list(families):
    return [c for c in CASES if families is None or c["family"] in families]


# --------------------------------------------------------------------------------------------
# safetensors helpers (numpy only)
# --------------------------------------------------------------------------------------------

def st_save(path, tensors, metadata=None):
    from safetensors.numpy import save_file
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, path, metadata=metadata)


def st_load(path):
    from safetensors.numpy import load_file
    return load_file(path)


def _seed(name, salt):
    return zlib.crc32(f"{name}/{salt}".encode()) & 0x7FFFFFFF


# --------------------------------------------------------------------------------------------
# Generation from the installed transformers
# --------------------------------------------------------------------------------------------

def _module(model, path):
    m = model
    for part in path.split("."):
        m = m[int(part)] if part.isdigit() else getattr(m, part)
    return m


def build(case):
    """The case's model, its MoE block and the sibling modules of the layer."""
    import torch
    import transformers
    cfg_name, model_name, block_path, _prefix, siblings, base = FAMILY[case["family"]]
    kw = dict(base)
    kw.update(case["over"])
    config = getattr(transformers, cfg_name)(**kw)
    model = getattr(transformers, model_name)(config).to(torch.float32).eval()
    return config, model, _module(model, block_path), [_module(model, s) for s in siblings]


def init_layer(modules, case, salt):
    """Deterministic weights for the layer's modules, rounded to bf16 (stored exactly)."""
    import torch
    g = torch.Generator().manual_seed(_seed(case["name"], f"weights{salt}"))
    with torch.no_grad():
        for mod in modules:
            for name, p in sorted(mod.named_parameters(), key=lambda t: t[0]):
                if "correction_bias" in name or name.endswith("expert_bias"):
                    v = (torch.rand(p.shape, generator=g) * 2 - 1) * 0.1
                else:
                    v = torch.randn(p.shape, generator=g) * 0.15
                p.copy_(v.bfloat16().float())
            for name, b in sorted(mod.named_buffers(), key=lambda t: t[0]):
                if "correction_bias" in name or name.endswith("expert_bias"):
                    b.copy_(((torch.rand(b.shape, generator=g) * 2 - 1) * 0.1).bfloat16().float())


def make_input(case, salt):
    import torch
    g = torch.Generator().manual_seed(_seed(case["name"], f"input{salt}"))
    return torch.randn((T_TOKENS, H), generator=g, dtype=torch.float32)


def _router_weight(block):
    """The router's weight parameter (perturbed by the robustness check)."""
    for name, p in block.named_parameters():
        parts = name.split(".")
        if parts[-1] == "weight" and any(r in parts for r in ("gate", "router")) and \
                "shared_expert_gate" not in parts and p.dim() == 2:
            return p
    raise RuntimeError("no router weight found")


def run_block(case, block, siblings, x):
    """y [T, H], topk_ids [T, k], topk_weights [T, k] as the block computes them."""
    import torch
    fam = case["family"]
    cap = {}

    def pre_experts(_mod, args, kwargs):
        vals = list(args) + list(kwargs.values())
        cap["ids"], cap["w"] = vals[1].detach().clone(), vals[2].detach().clone()

    def post_router(_mod, _inp, out):
        cap["router_out"] = out

    hooks = []
    if fam in ("llama4_text", "jetmoe", "switch_transformers"):
        hooks.append(block.router.register_forward_hook(post_router))
    else:
        hooks.append(block.experts.register_forward_pre_hook(pre_experts, with_kwargs=True))
    with torch.no_grad():
        out = block(x[None].clone())
        if isinstance(out, tuple):
            out = out[0]
        y = out.reshape(T_TOKENS, H)
        for s in siblings:  # granitemoeshared: the layer adds its shared_mlp
            y = y + s(x[None].clone()).reshape(T_TOKENS, H)
    for h in hooks:
        h.remove()
    if fam == "llama4_text":
        scores, logits = cap["router_out"]
        k = block.top_k
        ids = torch.topk(logits, k, dim=1).indices
        w = scores.gather(1, ids)
    elif fam == "jetmoe":
        logits = cap["router_out"][-1]
        top, ids = logits.topk(block.router.top_k, dim=1)
        w = torch.softmax(top, dim=1)
    elif fam == "switch_transformers":
        _mask, probs, logits = cap["router_out"]
        ids = torch.argmax(torch.softmax(logits.reshape(T_TOKENS, -1).float(), -1), -1)[:, None]
        w = probs.reshape(T_TOKENS, 1)
    else:
        ids, w = cap["ids"], cap["w"]
    ids = ids.reshape(T_TOKENS, -1).to(torch.int32)
    w = w.reshape(T_TOKENS, -1).float()
    return y.float().numpy(), ids.numpy(), w.numpy()


def routing_is_robust(case, block, siblings, x, ids):
    """Three runs with the router weights perturbed by 3e-5 choose the same experts."""
    import torch
    p = _router_weight(block)
    saved = p.detach().clone()
    g = torch.Generator().manual_seed(_seed(case["name"], "perturb"))
    try:
        for _ in range(3):
            with torch.no_grad():
                p.copy_(saved * (1 + 3e-5 * torch.randn(saved.shape, generator=g)))
            _, ids2, _ = run_block(case, block, siblings, x)
            if any(set(a) != set(b) for a, b in zip(ids.tolist(), ids2.tolist())):
                return False
    finally:
        with torch.no_grad():
            p.copy_(saved)
    return True


def layer_tensors(state, prefix, siblings):
    """The tensors save_pretrained wrote for the layer: under the prefix, and its siblings'."""
    keep = [prefix + "."] + [s + "." for s in siblings]
    return {k: v for k, v in state.items() if any(k.startswith(p) for p in keep)}


def generate_case(out_dir, case):
    import torch
    fam = case["family"]
    _c, _m, _block_path, prefix, sibling_paths, _base = FAMILY[fam]
    for salt in range(20):
        config, model, block, siblings = build(case)
        init_layer([block] + siblings, case, salt)
        x = make_input(case, salt)
        y, ids, w = run_block(case, block, siblings, x)
        if routing_is_robust(case, block, siblings, x, ids):
            break
    else:
        raise RuntimeError(f"{case['name']}: no seed gave a robust routing")
    d = os.path.join(out_dir, case["name"])
    os.makedirs(d, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        state = {}
        for f in sorted(os.listdir(tmp)):
            if f.endswith(".safetensors"):
                state.update(st_load(os.path.join(tmp, f)))
        shutil.copy(os.path.join(tmp, "config.json"), os.path.join(d, "config.json"))
    tensors = layer_tensors(state, prefix, sibling_paths)
    # Stored as BF16: every value was rounded to bf16 before the block ran.
    from safetensors.torch import save_file
    bf = {k: torch.from_numpy(np.ascontiguousarray(v)).to(torch.bfloat16) for k, v in
          tensors.items()}
    for k, v in bf.items():
        assert torch.equal(v.float(), torch.from_numpy(tensors[k])), k
    save_file(bf, os.path.join(d, "model.safetensors"), metadata={"format": "pt"})
    st_save(os.path.join(d, "x.safetensors"), {"x": x.numpy()})
    st_save(os.path.join(d, "expected.safetensors"),
            {"y": y, "topk_ids": ids, "topk_weights": w})
    if case["fused"]:
        # The same layer with its experts as transformers 5 holds them in memory:
        # experts.gate_up_proj [E, 2I, H] (gate rows first) and experts.down_proj [E, H, I].
        fd = d + "-fused"
        os.makedirs(fd, exist_ok=True)
        per_expert = prefix + ".experts."
        fused = {k: v for k, v in bf.items() if not k.startswith(per_expert)}
        for n in ("gate_up_proj", "down_proj"):
            fused[per_expert + n] = getattr(block.experts, n).detach().to(torch.bfloat16).clone()
        save_file(fused, os.path.join(fd, "model.safetensors"), metadata={"format": "pt"})
        for f in ("config.json", "x.safetensors", "expected.safetensors"):
            shutil.copy(os.path.join(d, f), os.path.join(fd, f))
    dropped = 0
    if fam == "switch_transformers":
        dropped = int(np.sum(np.all(y == 0, axis=1)))
    return dict(family=fam, prefix=prefix, k=int(ids.shape[1]), note=case["note"], salt=salt,
                tensors=len(tensors), dropped=dropped)


def generate(out_dir, families, quiet=False):
    import torch
    import transformers
    torch.set_num_threads(1)
    transformers.logging.set_verbosity_error()
    try:
        transformers.utils.logging.disable_progress_bar()
    except Exception:
        pass
    os.makedirs(out_dir, exist_ok=True)
    idx_path = os.path.join(out_dir, "cases.json")
    index = {}
    if families is not None and os.path.exists(idx_path):  # keep the other families' cases
        with open(idx_path) as f:
            index = {k: v for k, v in json.load(f)["cases"].items()
                     if v["family"] not in families}
    for case in case_list(families):
        meta = generate_case(out_dir, case)
        index[case["name"]] = meta
        if case["fused"]:
            index[case["name"] + "-fused"] = dict(meta, note=meta["note"] + "; transformers 5's "
                                                  "fused experts.gate_up_proj / down_proj")
        if not quiet:
            extra = f", {meta['dropped']} dropped" if meta["dropped"] else ""
            print(f"  wrote {case['name']:32s} k={meta['k']} tensors={meta['tensors']}{extra}")
    with open(idx_path, "w") as f:
        json.dump({"transformers": transformers.__version__, "torch": torch.__version__,
                   "tokens": T_TOKENS, "hidden": H, "cases": dict(sorted(index.items()))},
                  f, indent=1, sort_keys=True)
        f.write("\n")
    return index


# --------------------------------------------------------------------------------------------
# transformers as the reference on a checkpoint directory (from_pretrained)
# --------------------------------------------------------------------------------------------

def hf_reference(case_dir, family, x):
    """Loads the case directory with transformers' own from_pretrained (missing attention
    weights are initialized, the layer's come from the file) and runs the block on x."""
    import torch
    import transformers
    transformers.logging.set_verbosity_error()
    _cfg, model_name, block_path, _prefix, sibling_paths, _base = FAMILY[family]
    model = getattr(transformers, model_name).from_pretrained(case_dir, dtype=torch.float32).eval()
    block = _module(model, block_path)
    siblings = [_module(model, s) for s in sibling_paths]
    case = dict(family=family, name="ref", over={})
    y, ids, w = run_block(case, block, siblings, torch.from_numpy(np.asarray(x, np.float32)))
    return {"y": y, "topk_ids": ids, "topk_weights": w}


# --------------------------------------------------------------------------------------------
# Check
# --------------------------------------------------------------------------------------------

def compare(exp, got, wtol, ytol):
    """Routing as sets per token, weights matched per expert id, y relative Frobenius."""
    r = dict(ok=True, msg="")
    ids_e, ids_g = np.asarray(exp["topk_ids"]), np.asarray(got.get("topk_ids"))
    if ids_g is None or ids_g.shape != ids_e.shape:
        r.update(ok=False, msg=f"topk_ids shape {getattr(ids_g, 'shape', None)} "
                               f"!= {ids_e.shape}")
        return r
    agree = sum(set(a) == set(b) for a, b in zip(ids_e.tolist(), ids_g.tolist()))
    r["ids_agree"] = agree
    werr = 0.0
    for t in range(ids_e.shape[0]):
        for j, e in enumerate(ids_e[t]):
            hits = np.where(ids_g[t] == e)[0]
            if len(hits) == 0:
                continue
            we, wg = float(exp["topk_weights"][t, j]), float(got["topk_weights"][t, hits[0]])
            werr = max(werr, abs(we - wg) / max(abs(we), 1e-30))
    r["w_err"] = werr
    ye, yg = np.asarray(exp["y"], np.float64), np.asarray(got["y"], np.float64)
    if yg.shape != ye.shape:
        r.update(ok=False, msg=f"y shape {yg.shape} != {ye.shape}")
        return r
    den = np.linalg.norm(ye)
    r["y_rel"] = float(np.linalg.norm(ye - yg) / (den if den > 0 else 1.0))
    problems = []
    if agree != ids_e.shape[0]:
        problems.append(f"routing differs on {ids_e.shape[0] - agree} tokens")
    if werr > wtol:
        problems.append(f"weight error {werr:.2e} > {wtol:g}")
    if not r["y_rel"] <= ytol:
        problems.append(f"y error {r['y_rel']:.2e} > {ytol:g}")
    r["ok"] = not problems
    r["msg"] = "; ".join(problems)
    return r


def run_check(out_dir, families, moqe_cmd, wtol, ytol, timeout, device="cpu", quantize=0):
    with open(os.path.join(out_dir, "cases.json")) as f:
        index = json.load(f)["cases"]
    cmd0 = shlex.split(moqe_cmd)
    rows, failures = [], 0
    tmp = tempfile.mkdtemp(prefix="hf_crosscheck_")
    try:
        for name, meta in sorted(index.items()):
            if families is not None and meta["family"] not in families:
                continue
            d = os.path.join(out_dir, name)
            weights = d
            x = st_load(os.path.join(d, "x.safetensors"))["x"]
            if quantize:
                qdir, ddir = os.path.join(tmp, name + "-q"), os.path.join(tmp, name + "-deq")
                os.makedirs(qdir)
                os.makedirs(ddir)
                steps = [cmd0 + ["quantize", "--input", d, "--output",
                                 os.path.join(qdir, "model.safetensors"), "--bits", str(quantize),
                                 "--group-size", "channel", "--quiet"],
                         cmd0 + ["dequantize", "--input", os.path.join(qdir, "model.safetensors"),
                                 "--output", os.path.join(ddir, "model.safetensors"), "--quiet"]]
                bad = None
                for step in steps:
                    p = subprocess.run(step, capture_output=True, text=True, timeout=timeout)
                    if p.returncode != 0:
                        bad = f"{step[len(cmd0)]}: " + (p.stderr or p.stdout).strip()[-300:]
                        break
                if bad:
                    rows.append((name, dict(ok=False, msg=bad)))
                    failures += 1
                    continue
                for q in (qdir, ddir):
                    shutil.copy(os.path.join(d, "config.json"), q)
                weights = qdir
                exp = hf_reference(ddir, meta["family"], x)
            else:
                exp = st_load(os.path.join(d, "expected.safetensors"))
            y_path = os.path.join(tmp, f"{name}.y.safetensors")
            cmd = cmd0 + ["moe-forward", "--weights", weights, "--prefix", meta["prefix"],
                          "--input", os.path.join(d, "x.safetensors"), "--output", y_path,
                          "--device", device]
            try:
                p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
            except (OSError, subprocess.TimeoutExpired) as e:
                rows.append((name, dict(ok=False, msg=f"could not run: {e}")))
                failures += 1
                continue
            if p.returncode != 0 or not os.path.exists(y_path):
                err = (p.stderr or p.stdout).strip().replace("\n", " | ")[-400:]
                what = f"exit {p.returncode}" if p.returncode != 0 else "exit 0, no output"
                rows.append((name, dict(ok=False, msg=f"{what}: {err}")))
                failures += 1
                continue
            try:
                got = st_load(y_path)
            except Exception as e:
                rows.append((name, dict(ok=False, msg=f"unreadable output: {e}")))
                failures += 1
                continue
            r = compare(exp, got, wtol, ytol)
            rows.append((name, r))
            failures += int(not r["ok"])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if not rows:
        print(f"no cases for {families or 'any family'} in {out_dir}/cases.json", file=sys.stderr)
        return 1
    print(f"{'case':34s} {'result':6s} {'ids':>5s} {'w err':>9s} {'y rel':>9s}  note")
    for name, r in rows:
        print(f"{name:34s} {'ok' if r['ok'] else 'FAIL':6s} {r.get('ids_agree', '-')!s:>5s} "
              f"{r.get('w_err', float('nan')):9.2e} {r.get('y_rel', float('nan')):9.2e}  "
              f"{r.get('msg', '')}")
    print(f"{len(rows) - failures} passed, {failures} failed")
    return 1 if failures else 0


# --------------------------------------------------------------------------------------------
# Stand-in moe-forward on transformers (for --self-test of the --check path)
# --------------------------------------------------------------------------------------------

def as_moqe(argv):
    ap = argparse.ArgumentParser(prog="hf_crosscheck --as-moqe")
    ap.add_argument("cmd", choices=["moe-forward"])
    ap.add_argument("--weights", required=True)
    ap.add_argument("--prefix", required=True)
    ap.add_argument("--family", default="auto")
    ap.add_argument("--config")
    ap.add_argument("--input", required=True)
    ap.add_argument("--output", required=True)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    a = ap.parse_args(argv)
    d = a.weights if os.path.isdir(a.weights) else os.path.dirname(a.weights)
    with open(a.config or os.path.join(d, "config.json")) as f:
        model_type = json.load(f)["model_type"]
    family = {"qwen3_5_moe_text": "qwen3_5_moe"}.get(model_type, model_type)
    if a.family not in ("auto", family):
        print(f"--family {a.family} contradicts model_type {model_type}", file=sys.stderr)
        return 1
    r = hf_reference(d, family, st_load(a.input)["x"])
    tmp = a.output + ".tmp"
    st_save(tmp, {"y": r["y"].astype(np.float32), "topk_ids": r["topk_ids"].astype(np.int32),
                  "topk_weights": r["topk_weights"].astype(np.float32)})
    os.replace(tmp, a.output)
    return 0


def self_test(out_dir, families):
    import transformers
    print(f"transformers {transformers.__version__}")
    print("generating ...")
    index = generate(out_dir, families, quiet=True)
    ok = True
    print("\n[1] from_pretrained(case) reproduces the recorded block output")
    for name, meta in sorted(index.items()):
        if families is not None and meta["family"] not in families:
            continue
        d = os.path.join(out_dir, name)
        ref = hf_reference(d, meta["family"], st_load(os.path.join(d, "x.safetensors"))["x"])
        r = compare(st_load(os.path.join(d, "expected.safetensors")), ref, 1e-6, 1e-6)
        print(f"  {name:34s} {'ok' if r['ok'] else 'FAIL ' + r['msg']}")
        ok &= r["ok"]
    print("\n[2] --check end to end against the stand-in moe-forward (transformers)")
    me = f"{shlex.quote(sys.executable)} {shlex.quote(os.path.abspath(__file__))} --as-moqe"
    ok &= run_check(out_dir, families, me, 1e-6, 1e-6, 300) == 0
    print("\n[3] --check reports a failing binary as FAIL")
    rc_bad = run_check(out_dir, families, "false", 1e-6, 1e-5, 60)
    print(f"  exit code {rc_bad} (expected 1)")
    ok &= rc_bad == 1
    print("\nSELF-TEST", "PASSED" if ok else "FAILED")
    return 0 if ok else 1


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--as-moqe":
        return as_moqe(argv[1:])
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="See the module docstring for details.")
    ap.add_argument("--out", required=True, help="directory of the cases")
    ap.add_argument("--families", help="comma-separated subset of " + ",".join(FAMILIES))
    ap.add_argument("--check", metavar="MOQE", help="moqe command to check (shlex-split)")
    ap.add_argument("--reuse", action="store_true",
                    help="with --check: use the cases already in --out")
    ap.add_argument("--self-test", action="store_true", help="verify the generator")
    ap.add_argument("--wtol", type=float, default=1e-5, help="routing weight rel tolerance")
    ap.add_argument("--ytol", type=float, default=1e-5, help="output rel (Frobenius) tolerance")
    ap.add_argument("--timeout", type=float, default=300, help="seconds per moqe run")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--quantize", type=int, choices=[0, 2, 3, 4, 8], default=0,
                    help="with --check: quantize the experts with moqe first and compare with "
                         "transformers on the dequantized weights (needs torch)")
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
        return run_check(a.out, families, a.check, a.wtol, a.ytol, a.timeout, a.device,
                         a.quantize)
    return 0


if __name__ == "__main__":
    sys.exit(main())
