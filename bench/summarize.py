#!/usr/bin/env python3
"""Turns moqe_bench's JSON output (--benchmark_out=FILE --benchmark_out_format=json) into the
markdown tables of bench/README.md: wall time per call, the ratio to the Eigen fp32 baseline of
the same run, and weight bytes per second against BM_MemRead's ceiling."""
import json
import sys


def main(paths):
    rows, ctx = {}, None
    for p in paths:
        d = json.load(open(p))
        ctx = ctx or d["context"]
        for b in d["benchmarks"]:
            # With --benchmark_repetitions, the median of the repetitions stands for the run.
            if b.get("run_type") == "aggregate":
                if b.get("aggregate_name") == "median":
                    rows[b["run_name"]] = b
                continue
            rows.setdefault(b["name"], b)
    print(f"Machine: {ctx.get('num_cpus')} CPUs at {ctx.get('mhz_per_cpu')} MHz; "
          f"caches {', '.join(str(c['size'] // 1024) + ' KiB L' + str(c['level']) for c in ctx.get('caches', []))}.")
    ceiling = rows.get("BM_MemRead", {}).get("bytes_per_second", 0)
    if ceiling:
        print(f"\nBM_MemRead: {ceiling / 1e9:.1f} GB/s (all threads), "
              f"{rows['BM_MemReadOneThread']['bytes_per_second'] / 1e9:.1f} GB/s (one thread).\n")
    shapes = sorted({n.split("/")[2] for n in rows if n.startswith("BM_Gemv/")},
                    key=lambda s: [-int(x) for x in s.split("x")])
    weights = ["f32_eigen", "f16", "w8_channel", "w4_channel", "w4_g128", "w4_g32", "w3_g64",
               "w2_g128", "w4_g128_fast", "w8_g32_fast"]
    for shape in shapes:
        print(f"\nBM_Gemv {shape} (N x K): ms per call (x Eigen fp32; % of BM_MemRead)\n")
        print("| weights | " + " | ".join(f"batch {m}" for m in (1, 8, 64)) + " |")
        print("|---|---|---|---|")
        for w in weights:
            cells = []
            for m in (1, 8, 64):
                r = rows.get(f"BM_Gemv/{w}/{shape}/batch:{m}")
                e = rows.get(f"BM_Gemv/f32_eigen/{shape}/batch:{m}")
                if not r or not e:
                    cells.append("-")
                    continue
                pct = 100 * r["bytes_per_second"] / ceiling if ceiling else 0
                cells.append(f"{r['wall_ms']:.3f} ({e['wall_ms'] / r['wall_ms']:.2f}x; {pct:.0f}%)")
            print(f"| {w} | " + " | ".join(cells) + " |")
    fast = [n for n in rows if "rel_err_vs_exact" in rows[n] and n.endswith("batch:1")]
    if fast:
        print("\nFast mode, relative output error against exact mode (batch 1, random activations):\n")
        for n in sorted(fast):
            print(f"- {n}: {rows[n]['rel_err_vs_exact']:.4f}")
    moe = [n for n in rows if n.startswith("BM_MoeLayer/")]
    if moe:
        print("\nBM_MoeLayer: ms per call; GB/s of the routed experts' weights (% of BM_MemRead)\n")
        print("| layer | weights | tokens | ms | GB/s | % |")
        print("|---|---|---|---|---|---|")
        for n in moe:
            r = rows[n]
            _, shape, w, t = n.split("/")
            gbs = r["bytes_per_second"] / 1e9
            pct = 100 * r["bytes_per_second"] / ceiling if ceiling else 0
            print(f"| {shape} | {w} | {t.split(':')[1]} | {r['wall_ms']:.2f} | {gbs:.1f} | {pct:.0f}% |")


if __name__ == "__main__":
    main(sys.argv[1:])
