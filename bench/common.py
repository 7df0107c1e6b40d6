"""Helpers every benchmark shares: result tables (rich, or plain text where rich is missing), JSON output,
package versions and the machine's name. Benchmarks run as scripts (`python bench/NAME.py`), so this is
imported as `common`. It must import on the lent GPU machine, which has torch but few other packages.
"""

from __future__ import annotations

import json
import platform
import resource
import time
from importlib import metadata
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def fmt_num(x: float | None, digits: int = 0) -> str:
    return "—" if x is None else f"{x:,.{digits}f}"


def print_table(title: str, headers: list[str], rows: list[list[str]], sections: set[int], use_rich: bool) -> None:
    """A table with rich (CPU mode) or as plain text (GPU mode: that machine need not have rich)."""
    if use_rich:
        from rich.console import Console
        from rich.table import Table

        table = Table(title=title)
        for i, h in enumerate(headers):
            table.add_column(h, justify="left" if i == 0 else "right", no_wrap=True)
        for i, row in enumerate(rows):
            table.add_row(*row, end_section=i in sections)
        Console(width=240).print(table)
        return
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    line = "  ".join("-" * w for w in widths)
    print(title)
    print(
        "  ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(headers, widths, strict=True)))
    )
    print(line)
    for i, row in enumerate(rows):
        print(
            "  ".join(c.ljust(w) if j == 0 else c.rjust(w) for j, (c, w) in enumerate(zip(row, widths, strict=True)))
        )
        if i in sections:
            print(line)


def write_json(path: Path, results: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2, default=float) + "\n", encoding="utf-8")
    print(f"wrote {path}")


def package_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def measure_matmul_rate(device: str) -> tuple[float, str]:
    """The device's dense matrix rate in FLOP/s: bf16 8192^2 on a GPU, fp32 2048^2 on a CPU (best of 5)."""
    import torch

    n, dtype, reps = (8192, torch.bfloat16, 20) if device == "cuda" else (2048, torch.float32, 3)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(6):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(reps):
            a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - t0) / reps)
    del a, b
    if device == "cuda":
        torch.cuda.empty_cache()  # the configurations train in child processes: leave them the whole card
    return 2 * n**3 / best, f"{str(dtype).removeprefix('torch.')} mm {n}^3"


def matmul_params(config) -> int:
    """Weights of every matrix multiply of one token's forward pass (projections, MLP, LM head)."""
    d, ff, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    head_dim = getattr(config, "head_dim", None) or d // config.num_attention_heads
    q_o = 2 * d * config.num_attention_heads * head_dim
    k_v = 2 * d * config.num_key_value_heads * head_dim
    return layers * (q_o + k_v + 3 * d * ff) + d * config.vocab_size


def lora_params(config, rank: int, targets: list[str]) -> int:
    d = config.hidden_size
    head_dim = getattr(config, "head_dim", None) or d // config.num_attention_heads
    out_dims = {
        "q_proj": config.num_attention_heads * head_dim,
        "k_proj": config.num_key_value_heads * head_dim,
        "v_proj": config.num_key_value_heads * head_dim,
        "o_proj": d,
        "gate_proj": config.intermediate_size,
        "up_proj": config.intermediate_size,
        "down_proj": d,
    }
    in_dims = {k: d for k in out_dims} | {"o_proj": config.num_attention_heads * head_dim}
    in_dims["down_proj"] = config.intermediate_size
    return config.num_hidden_layers * sum(rank * (in_dims[t] + out_dims[t]) for t in targets)
