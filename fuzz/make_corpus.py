#!/usr/bin/env python3
"""Writes the seed corpora of moqe's fuzz targets into fuzz/corpus/<target>/: small valid files of
every kind the readers accept and broken ones for each rule they enforce. Deterministic; rerun after
changing it and commit the result (python3 fuzz/make_corpus.py)."""
import json
import pathlib
import shutil
import sys
import struct

ROOT = pathlib.Path(__file__).resolve().parent / "corpus"
SIZES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2,
         "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8, "C64": 8}


def header_file(header, data=b"", length=None):
    """A safetensors file from a header (dict or raw str) and the data buffer."""
    h = header if isinstance(header, (str, bytes)) else json.dumps(header, separators=(",", ":"))
    h = h.encode() if isinstance(h, str) else h
    return struct.pack("<Q", len(h) if length is None else length) + h + data


def tensors(entries, metadata=None):
    """A valid file: entries are (name, dtype, shape, bytes) laid out in order."""
    header, data = {}, b""
    if metadata:
        header["__metadata__"] = metadata
    for name, dtype, shape, payload in entries:
        n = SIZES[dtype]
        for d in shape:
            n *= d
        payload = (payload * (n // max(len(payload), 1) + 1))[:n] if payload else bytes(n)
        header[name] = {"dtype": dtype, "shape": shape,
                        "data_offsets": [len(data), len(data) + n]}
        data += payload
    return header_file(header, data)


def f32(*v):
    return struct.pack(f"<{len(v)}f", *v)


def scheme(bits, mode, group, rows, cols, scale="F16", **extra):
    s = {"bits": bits, "code_offset": 0 if mode == "asym" else 1 << (bits - 1),
         "group_size": group, "mode": mode, "scale_dtype": scale, "shape": [rows, cols]}
    s.update(extra)
    return json.dumps(s, separators=(",", ":"), sort_keys=True)


def quantized_entries(name, bits, mode, group, rows, cols, scale="F16"):
    g = cols if group == 0 else group
    one = b"\x00\x3c" if scale == "F16" else f32(0.5)
    out = [(name + ".qweight", "U8", [rows, (cols * bits + 7) // 8], bytes(range(7, 250, 3))),
           (name + ".scales", scale, [rows, cols // g], one)]
    if mode == "asym":
        out.append((name + ".zeros", "U8", [rows, cols // g], b"\x01"))
    return out


def safetensors_seeds():
    s = {}
    s["valid_f32"] = tensors([("x", "F32", [2, 3], f32(1, 2, 3, 4, 5, 6))])
    s["valid_dtypes"] = tensors([(f"t_{d.lower()}", d, [3], b"\x01\x3c\x80\x7f") for d in SIZES])
    s["valid_zero_size_rank0"] = tensors([("z", "F32", [0, 4], b""), ("s", "F16", [], b"\x00\x3c")])
    s["valid_metadata_only"] = header_file({"__metadata__": {"format": "pt"}})
    s["valid_empty"] = header_file("{}")
    s["valid_padded_header"] = header_file('{"x":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}  ',
                                           b"\x07")
    s["valid_quantized_sym4"] = tensors(
        quantized_entries("w", 4, "sym", 32, 4, 64) + [("bias", "F32", [4], f32(0.5))],
        {"moqe.format": "1", "moqe.scheme.w": scheme(4, "sym", 32, 4, 64)})
    s["valid_quantized_asym3_f32"] = tensors(
        quantized_entries("w", 3, "asym", 0, 3, 40, "F32"),
        {"moqe.format": "1", "moqe.scheme.w": scheme(3, "asym", 0, 3, 40, "F32")})
    s["valid_fp8_block_scales"] = tensors(
        [("w", "F8_E4M3", [2, 130], b"\x38\xb8\x40"), ("w_scale_inv", "F32", [1, 2], f32(0.5))])
    s["bad_header_too_long"] = header_file("{}", length=1 << 40)
    s["bad_header_past_end"] = header_file("{}", length=64)
    s["bad_truncated"] = tensors([("x", "F32", [4], f32(1))])[:-3]
    s["bad_short"] = b"\x02\x00\x00"
    s["bad_utf8"] = header_file(b'{"\xc3\x28":{"dtype":"U8","shape":[0],"data_offsets":[0,0]}}')
    s["bad_nul"] = header_file(b'{"a\x00":1}')
    s["bad_duplicate"] = header_file('{"x":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},'
                                     '"x":{"dtype":"U8","shape":[1],"data_offsets":[1,2]}}', b"ab")
    s["bad_overlap"] = header_file({"a": {"dtype": "U8", "shape": [2], "data_offsets": [0, 2]},
                                    "b": {"dtype": "U8", "shape": [2], "data_offsets": [1, 3]}},
                                   b"abc")
    s["bad_gap"] = header_file({"a": {"dtype": "U8", "shape": [1], "data_offsets": [1, 2]}}, b"ab")
    s["bad_trailing"] = tensors([("a", "U8", [1], b"a")]) + b"zz"
    s["bad_negative_dim"] = header_file({"a": {"dtype": "U8", "shape": [-1],
                                               "data_offsets": [0, 0]}})
    s["bad_shape_overflow"] = header_file({"a": {"dtype": "F64", "shape": [1 << 32, 1 << 31, 4],
                                                 "data_offsets": [0, 0]}})
    s["bad_offsets_float"] = header_file({"a": {"dtype": "U8", "shape": [1],
                                                "data_offsets": [0, 1.0]}}, b"a")
    s["bad_metadata_value"] = header_file({"__metadata__": {"k": 1}})
    s["bad_deep_shape"] = header_file('{"a":{"dtype":"U8","shape":' + "[" * 3000 + "]" * 3000 +
                                      ',"data_offsets":[0,0]}}')
    s["bad_quantized_huge_cols"] = tensors(
        quantized_entries("w", 4, "sym", 0, 2, 32),
        {"moqe.format": "1", "moqe.scheme.w": scheme(4, "sym", 0, 2, 1 << 62)})
    s["bad_quantized_format"] = tensors(quantized_entries("w", 8, "sym", 0, 1, 32),
                                        {"moqe.format": "2", "moqe.scheme.w": scheme(8, "sym", 0, 1, 32)})
    return s


def index(weight_map, **extra):
    return json.dumps(dict(metadata={"total_size": 24}, weight_map=weight_map, **extra)).encode()


def index_seeds():
    # fuzz_index.cpp's fixture holds these shards: model-0000{1,2}-of-00002 (a, b | c),
    # sub/nested (d), dup (a again), broken, dir.safetensors (a directory) and fifo (a FIFO).
    one, two = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"
    s = {}
    s["valid"] = index({"a": one, "b": one, "c": two})
    s["valid_nested"] = index({"d": "sub/nested.safetensors", "c": two})
    s["valid_partial"] = index({"c": two})
    s["missing_shard"] = index({"a": one, "x": "model-00003-of-00003.safetensors"})
    s["wrong_shard"] = index({"a": two})
    s["absolute"] = index({"a": "/etc/passwd"})
    s["dotdot"] = index({"a": "sub/../../" + one})
    s["empty_name"] = index({"a": ""})
    s["nul_in_name"] = index({"a": one + "\u0000.x"})
    s["duplicate_tensor"] = index({"a": "dup.safetensors", "b": one})
    s["broken_shard"] = index({"x": "broken.safetensors"})
    s["directory_shard"] = index({"x": "dir.safetensors"})
    s["fifo_shard"] = index({"x": "fifo.safetensors"})
    s["not_string"] = index({"a": 1})
    s["empty_map"] = index({})
    s["no_map"] = b'{"metadata":{}}'
    s["not_object"] = b"[]"
    s["invalid_json"] = b'{"weight_map":{"a":'
    s["deep"] = b'{"weight_map":{"a":' + b"[" * 3000 + b"]" * 3000 + b"}}"
    return s


def config_seeds():
    s = {}
    s["mixtral"] = {"num_local_experts": 4, "num_experts_per_tok": 2, "hidden_act": "silu"}
    s["qwen2_moe"] = {"num_experts": 4, "num_experts_per_tok": 2, "norm_topk_prob": False,
                      "shared_expert_intermediate_size": 32}
    s["qwen3_moe_null"] = {"num_experts": None, "num_local_experts": 4, "num_experts_per_tok": 2,
                           "norm_topk_prob": True}
    s["olmoe"] = {"num_experts": 4, "num_experts_per_tok": 2, "hidden_act": "silu"}
    # As DeepSeek-V2-Lite's config.json: greedy, with the (unused) group keys present.
    s["deepseek_v2_greedy"] = {"n_routed_experts": 4, "num_experts_per_tok": 2, "n_group": 1,
                               "topk_group": 1, "topk_method": "greedy", "n_shared_experts": 0,
                               "routed_scaling_factor": 1.0, "scoring_func": "softmax"}
    s["deepseek_v2_group"] = {"n_routed_experts": 4, "num_experts_per_tok": 2, "n_group": 2,
                              "topk_group": 1, "topk_method": "group_limited_greedy",
                              "n_shared_experts": 0, "routed_scaling_factor": 1.5}
    s["deepseek_v3"] = {"n_routed_experts": 4, "num_experts_per_tok": 2, "n_group": 2,
                        "topk_group": 1, "topk_method": "noaux_tc", "scoring_func": "sigmoid",
                        "n_shared_experts": 0, "routed_scaling_factor": 2.5,
                        "norm_topk_prob": True}
    s["switch"] = {"num_experts": 4, "expert_capacity": 2, "dense_act_fn": "relu"}
    s["switch_capacity_0"] = {"num_experts": 4, "expert_capacity": 0}
    s["k_gt_experts"] = {"num_local_experts": 4, "num_experts": 4, "n_routed_experts": 4,
                         "num_experts_per_tok": 5}
    s["zero_experts"] = {"num_local_experts": 0, "num_experts": 0, "n_routed_experts": 0}
    s["negative_capacity"] = {"num_experts": 4, "expert_capacity": -1}
    s["groups_not_dividing"] = {"n_routed_experts": 4, "n_group": 3, "topk_group": 1,
                                "num_experts_per_tok": 1, "topk_method": "group_limited_greedy"}
    s["nan_scaling"] = '{"n_routed_experts":4,"num_experts_per_tok":2,"routed_scaling_factor":1e999}'
    s["wrong_types"] = {"num_experts": "4", "num_experts_per_tok": 2.5, "norm_topk_prob": 1}
    s["bad_activation"] = {"num_experts": 4, "num_experts_per_tok": 2, "hidden_act": "swish9"}
    s["huge_int"] = '{"num_experts":18446744073709551615,"num_local_experts":-9223372036854775808}'
    s["deep"] = '{"num_experts":' + "[" * 3000 + "]" * 3000 + "}"
    # Found by fuzz_config: the loader planned a name for each of 18446551615 experts (a hang).
    s["regression_huge_expert_count"] = \
        '{"num_experts":18446551615,"num_local_experts":-9223372036854775808}'

    s["not_object"] = "[1,2]"
    s["invalid"] = '{"num_experts":4,'
    return {k: (v if isinstance(v, str) else json.dumps(v)).encode() for k, v in s.items()}


def quantized_input(scheme_text, parts, fill=b"\x00\x3c"):
    lines = [scheme_text] + [" ".join(str(x) for x in p) for p in parts]
    return ("\n".join(lines) + "\n\n").encode() + fill


def quantized_seeds():
    s = {}
    s["sym4_g32"] = quantized_input(scheme(4, "sym", 32, 4, 64),
                                    [("qweight", "U8", 4, 32), ("scales", "F16", 4, 2)])
    s["asym4_g32"] = quantized_input(scheme(4, "asym", 32, 2, 64),
                                     [("qweight", "U8", 2, 32), ("scales", "F16", 2, 2),
                                      ("zeros", "U8", 2, 2)], b"\x01\x00")
    s["sym_full3_channel_f32"] = quantized_input(scheme(3, "sym_full", 0, 2, 40, "F32"),
                                                 [("qweight", "U8", 2, 15), ("scales", "F32", 2, 1)],
                                                 f32(0.25))
    s["sym8_g64"] = quantized_input(scheme(8, "sym", 64, 1, 128),
                                    [("qweight", "U8", 1, 128), ("scales", "F16", 1, 2)])
    s["sym2_empty_rows"] = quantized_input(scheme(2, "sym", 32, 0, 32),
                                           [("qweight", "U8", 0, 8), ("scales", "F16", 0, 1)])
    s["bad_zero_point"] = quantized_input(scheme(2, "asym", 32, 1, 32),
                                          [("qweight", "U8", 1, 8), ("scales", "F16", 1, 1),
                                           ("zeros", "U8", 1, 1)], b"\x09")
    s["bad_scale_inf"] = quantized_input(scheme(4, "sym", 32, 1, 32),
                                         [("qweight", "U8", 1, 16), ("scales", "F16", 1, 1)],
                                         b"\x00\x7c")
    s["bad_shape_mismatch"] = quantized_input(scheme(4, "sym", 32, 4, 64),
                                              [("qweight", "U8", 4, 31), ("scales", "F16", 4, 2)])
    s["bad_missing_scales"] = quantized_input(scheme(4, "sym", 32, 4, 64), [("qweight", "U8", 4, 32)])
    s["bad_bits"] = quantized_input(scheme(4, "sym", 32, 1, 32).replace('"bits":4', '"bits":5'),
                                    [("qweight", "U8", 1, 20), ("scales", "F16", 1, 1)])
    s["bad_bits_wrap"] = quantized_input(
        scheme(4, "sym", 32, 1, 32).replace('"bits":4', '"bits":4294967300'),
        [("qweight", "U8", 1, 16), ("scales", "F16", 1, 1)])
    s["bad_group"] = quantized_input(scheme(4, "sym", 48, 1, 96),
                                     [("qweight", "U8", 1, 48), ("scales", "F16", 1, 2)])
    s["bad_code_offset"] = quantized_input(scheme(4, "sym", 32, 1, 32, code_offset=0),
                                           [("qweight", "U8", 1, 16), ("scales", "F16", 1, 1)])
    s["bad_huge_cols"] = quantized_input(scheme(4, "sym", 0, 2, 1 << 62),
                                         [("qweight", "U8", 2, 0), ("scales", "F16", 2, 1)])
    s["bad_huge_rows"] = quantized_input(scheme(8, "sym", 0, 1 << 61, 32),
                                         [("qweight", "U8", 0, 32), ("scales", "F16", 0, 1)])
    s["bad_not_json"] = quantized_input("{bits:4}", [("qweight", "U8", 1, 16)])
    s["bad_deep"] = quantized_input('{"bits":' + "[" * 3000 + "]" * 3000 + "}",
                                    [("qweight", "U8", 1, 16)])
    return s


def gptq(bits=4, group=32, fmt="gptq", **extra):
    return json.dumps(dict({"quant_method": "gptq", "bits": bits, "group_size": group,
                            "checkpoint_format": fmt}, **extra))


def ct(bits=4, strategy="group", group=32, symmetric=True, fmt="pack-quantized", version="0.20.1",
       **extra):
    w = {"num_bits": bits, "type": "int", "symmetric": symmetric, "strategy": strategy,
         "group_size": group if strategy == "group" else None}
    return json.dumps(dict({"quant_method": "compressed-tensors", "format": fmt,
                            "version": version,
                            "config_groups": {"group_0": {"targets": ["Linear"], "weights": w}},
                            "ignore": ["lm_head"]}, **extra))


def foreign_seeds():
    """fuzz_foreign: a weight 'w.weight' stored by another tool; line 1 is its config.json's
    quantization_config, then the tensors as in fuzz_quantized (parts named after the format)."""
    s = {}
    # GPTQ [N = 8, K = 64]: qweight [K b / 32, N], qzeros [K / G, N b / 32], scales [K / G, N].
    s["gptq4_g32"] = quantized_input(gptq(), [("qweight", "I32", 8, 8), ("qzeros", "I32", 2, 1),
                                              ("scales", "F16", 2, 8), ("g_idx", "I32", 64)],
                                     b"\x00\x00\x00\x00")
    s["gptq3_v2_channel"] = quantized_input(
        gptq(3, -1, "gptq_v2"), [("qweight", "I32", 6, 32), ("qzeros", "I32", 1, 3),
                                 ("scales", "BF16", 1, 32)], b"\x49\x92\x24\x3c")
    s["gptq3_gptqmodel6"] = quantized_input(
        gptq(3, 32, meta={"quantizer": ["gptqmodel:6.0.3"]}),
        [("qweight", "I32", 6, 32), ("qzeros", "I32", 2, 3), ("scales", "F16", 2, 32)])
    s["gptq8_bad_gidx"] = quantized_input(gptq(8), [("qweight", "I32", 16, 4), ("qzeros", "I32", 2, 1),
                                                    ("scales", "F16", 2, 4), ("g_idx", "I32", 64)],
                                          b"\x07\x00\x00\x00")
    s["awq4_g32"] = quantized_input(json.dumps({"quant_method": "awq", "bits": 4, "group_size": 32,
                                                "version": "gemm"}),
                                    [("qweight", "I32", 64, 1), ("qzeros", "I32", 2, 1),
                                     ("scales", "F16", 2, 8)], b"\x88\x88\x00\x3c")
    s["ct4_g32_asym"] = quantized_input(
        ct(symmetric=False), [("weight_packed", "I32", 8, 8), ("weight_scale", "BF16", 8, 2),
                              ("weight_zero_point", "I32", 1, 2), ("weight_shape", "I64", 2),
                              ("weight_g_idx", "I32", 64)], b"\x08\x00\x00\x00")
    s["ct3_padded"] = quantized_input(
        ct(3, version="0.17.1"), [("weight_packed", "I32", 8, 7), ("weight_scale", "F32", 8, 2),
                                  ("weight_shape", "I32", 2)], b"\x40\x00\x00\x00")
    s["ct8_naive_tensor"] = quantized_input(
        ct(8, "tensor", fmt="naive-quantized"), [("weight", "I8", 4, 32),
                                                 ("weight_scale", "F16", 1)], b"\x81\x7f\x00\x3c")
    s["ct_mixed_regex"] = quantized_input(
        ct(symmetric=True, fmt="mixed-precision",
           ignore=["re:(lm_head"]), [("weight_packed", "I32", 8, 8), ("weight_scale", "F16", 8, 2),
                                     ("weight_shape", "I64", 2)])
    s["bad_not_json"] = quantized_input("{quant_method:gptq}", [("qweight", "I32", 8, 8)])
    # Found by fuzz_foreign: a 1-D qweight made the shape reader throw std::out_of_range.
    s["bad_qweight_1d"] = quantized_input(gptq(), [("qweight", "I32", 8), ("qzeros", "I32", 2, 1),
                                                   ("scales", "F16", 2, 8)])
    return s


def main():
    corpora = {"fuzz_safetensors": safetensors_seeds(), "fuzz_index": index_seeds(),
               "fuzz_config": config_seeds(), "fuzz_quantized": quantized_seeds(),
               "fuzz_foreign": foreign_seeds()}
    # Targets named on the command line only (each directory is rewritten; fuzz_config also
    # holds family_* seeds that tests/data/families' configs gave and this script does not).
    if len(sys.argv) > 1:
        corpora = {t: corpora[t] for t in sys.argv[1:]}
    total = 0
    for target, seeds in corpora.items():
        d = ROOT / target
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
        for name, data in seeds.items():
            (d / name).write_bytes(data)
            total += len(data)
    print(f"wrote {sum(map(len, corpora.values()))} seeds ({total} bytes) under {ROOT}")


if __name__ == "__main__":
    main()
