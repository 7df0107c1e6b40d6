"""The projection pass alone: x [rows, num_params] bf16 @ P [num_params, proj_dim], 'rademacher' against
'hashed_rademacher', same x, same process.

bench/influence.py times the whole influence features (forward, backward, per-sample gradients, Adam, projection);
this isolates the projection so the kernel's rate can be read against the bf16 matmul rate measured in the same
run. Parameters are LoRA-shaped blocks of `--param-elems` (128 x 2048 = 262,144 by default: an A or B matrix of
r=128 at hidden 2048) up to --params elements (90.18M: Llama-3.2-1B with r=128 on q/k/v/o, as bench/influence.py).
FLOP = 2 rows num_params proj_dim. It also checks the kernel against the torch reference on the first parameters
(bf16 input, fp32 sums) and prints the autotuner's choice.

    python bench/projection.py [--rows 96,256] [--params 90177536] [--proj-dim 8192] [--out-json FILE]
    python bench/projection.py --params 20000 --param-elems 4096 --rows 4 --proj-dim 256   (a CPU check of the code)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", default="96,256", help="Comma-separated rows per pass.")
    ap.add_argument("--params", type=int, default=90_177_536, help="Flat parameters projected (elements).")
    ap.add_argument("--param-elems", type=int, default=262_144, help="Elements of one parameter (block of seeds).")
    ap.add_argument("--proj-dim", type=int, default=8192, help="Projection dimension.")
    ap.add_argument("--repeats", type=int, default=2, help="Timed passes per (projection, rows); the best counts.")
    ap.add_argument("--kinds", default="rademacher,hashed_rademacher", help="Projections to time.")
    ap.add_argument("--out-json", type=Path, default=None)
    args = ap.parse_args(argv)

    import torch

    from synth_core.influence.hashed import HashedRademacherProjector
    from synth_core.influence.projection import RademacherProjector

    on_gpu = torch.cuda.is_available()
    dev = torch.device("cuda" if on_gpu else "cpu")
    dtype = torch.bfloat16 if on_gpu else torch.float32
    n = args.params
    layout = [(f"p{i}", min(args.param_elems, n - i * args.param_elems)) for i in range(-(-n // args.param_elems))]
    rows_list = [int(r) for r in args.rows.split(",")]

    def sync() -> None:
        if on_gpu:
            torch.cuda.synchronize()

    rate = None
    if on_gpu:
        a = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
        for _ in range(3):
            a @ a
        sync()
        t = time.perf_counter()
        for _ in range(10):
            a @ a
        sync()
        rate = 10 * 2 * 8192**3 / (time.perf_counter() - t)
        del a
    name = torch.cuda.get_device_name() if on_gpu else "cpu"
    print(
        f"{name}: bf16 mm rate {rate / 1e12 if rate else 0:.1f} TFLOP/s; {n:,} params, d={args.proj_dim}", flush=True
    )

    x_all = torch.randn(max(rows_list), n, device=dev, dtype=dtype)
    results = []
    for kind in args.kinds.split(","):
        proj = (HashedRademacherProjector if kind == "hashed_rademacher" else RademacherProjector)(
            args.proj_dim, 0, dev
        )
        if kind == "hashed_rademacher":  # the kernel against the torch reference on the first parameters
            head = [("c0", min(n, 20_000)), ("c1", min(n, 12_345))]  # unaligned, partial tiles, 1.1 GB of dense S
            cols = sum(k for _, k in head)
            xc = torch.randn(64, cols, device=dev, dtype=dtype)
            got = proj.project_flat(xc, head)
            ref = xc.float() @ proj.dense_matrix(head)
            err = ((got - ref).norm(dim=1) / ref.norm(dim=1)).max().item()
            print(f"hashed kernel vs torch reference ({cols:,} params): max relative error {err:.2e}", flush=True)
            if err > 1e-2:
                raise SystemExit(f"hashed kernel disagrees with its reference: {err}")
        for rows in rows_list:
            x = x_all[:rows]
            t0 = time.perf_counter()
            proj.project_flat(x, layout)  # warm-up: compilation, autotuning
            sync()
            first = time.perf_counter() - t0
            best = float("inf")
            for _ in range(args.repeats):
                sync()
                t = time.perf_counter()
                proj.project_flat(x, layout)
                sync()
                best = min(best, time.perf_counter() - t)
            flops = 2 * rows * n * args.proj_dim
            res = {
                "projection": kind,
                "rows": rows,
                "params": n,
                "proj_dim": args.proj_dim,
                "seconds": round(best, 4),
                "first_call_s": round(first, 2),
                "tflops": flops / best / 1e12,
                "of_bf16_rate": flops / best / rate if rate else None,
            }
            if kind == "hashed_rademacher" and on_gpu:
                from synth_core.influence.kernels import _hashed_project_tuned

                res["kernel_config"] = str(getattr(_hashed_project_tuned, "best_config", None))
            results.append(res)
            print(
                f"{kind:18s} rows {rows:4d}: {best:.3f} s a pass, {res['tflops']:.1f} TFLOP/s"
                + (f" ({res['of_bf16_rate']:.1%} of bf16 mm)" if rate else "")
                + (f" [{res.get('kernel_config')}]" if "kernel_config" in res else ""),
                flush=True,
            )
    out = {"device": name, "bf16_rate_tflops": rate / 1e12 if rate else None, "results": results}
    if args.out_json:
        args.out_json.parent.mkdir(parents=True, exist_ok=True)
        args.out_json.write_text(json.dumps(out, indent=2))
        print(f"wrote {args.out_json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
