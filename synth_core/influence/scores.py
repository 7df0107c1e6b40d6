"""From gradient features to a decision: which rows of R are targets, influence scores, the top-fraction selection.

`choose_targets`: all of R or a seeded subset of it; `target_group_keys`: R's rows grouped for aggregate 'max_group'.

`influence_scores`: sum over checkpoints of (mean LR of the checkpoint, normalised over checkpoints) x cosine to the
targets, aggregated as the mean over targets or the max over target groups. `select_top_fraction`: keep the
highest ceil(keep_fraction x n), with DROP_REASON for the others.

What it leaves to others: computing the features (lora_grads.py) and reading/writing them (stage.py).
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Hashable, Sequence
from typing import TYPE_CHECKING, Any

from synth_core.influence.errors import InfluenceError

if TYPE_CHECKING:
    import torch

    from synth_core.config import InfluenceConfig

DROP_REASON = "influence_below_top_fraction"


def influence_scores(
    cand_feats_by_ckpt: Sequence[torch.Tensor],
    target_feats_by_ckpt: Sequence[torch.Tensor],
    lrs: Sequence[float],
    aggregate: str = "mean",
    target_groups: Sequence[Hashable] | None = None,
) -> torch.Tensor:
    """Influence of each candidate: [n] float32.

    cand_feats_by_ckpt[c]: [n, proj_dim], target_feats_by_ckpt[c]: [m, proj_dim] (L2-normalised, so a dot
    product is a cosine), one pair per checkpoint; lrs[c]: the checkpoint's mean LR, normalised to sum 1.
    'mean': sum_c w_c mean_j cos(cand, target_j). 'max_group': the same within each target group, then the max
    over groups (LESS's max over validation tasks); without target_groups every target is its own group.
    The mean of cosines is the cosine with the mean target (linearity), so no [n, m] matrix is built.
    """
    import torch

    if not (len(cand_feats_by_ckpt) == len(target_feats_by_ckpt) == len(lrs)) or not lrs:
        raise InfluenceError("one candidate set, one target set and one learning rate per checkpoint are needed")
    if any(lr < 0 for lr in lrs) or sum(lrs) <= 0:
        raise InfluenceError(f"checkpoint learning rates must be >= 0 with a positive sum, got {list(lrs)}")
    if aggregate not in ("mean", "max_group"):
        raise InfluenceError(f"unknown aggregate '{aggregate}' (mean, max_group)")
    m = len(target_feats_by_ckpt[0])
    if m == 0 or any(len(t) != m for t in target_feats_by_ckpt):
        raise InfluenceError("every checkpoint needs the same, non-empty set of target features")
    if aggregate == "mean":
        groups = [0] * m
    else:
        groups = list(target_groups) if target_groups is not None else list(range(m))
    if len(groups) != m:
        raise InfluenceError(f"{len(groups)} target groups for {m} targets")
    keys = list(dict.fromkeys(groups))
    member = torch.zeros(len(keys), m)  # [g, m]: row g averages group g's targets
    for j, key in enumerate(groups):
        member[keys.index(key), j] = 1.0
    member /= member.sum(dim=1, keepdim=True)
    weights = torch.tensor(list(lrs), dtype=torch.float64)
    weights /= weights.sum()
    n = len(cand_feats_by_ckpt[0])
    total = torch.zeros(n, len(keys), dtype=torch.float32)
    for cand, tgt, w in zip(cand_feats_by_ckpt, target_feats_by_ckpt, weights.tolist(), strict=True):
        if len(cand) != n:
            raise InfluenceError("every checkpoint needs features of the same candidates")
        total += w * (cand.float().cpu() @ (member @ tgt.float().cpu()).T)
    return total.amax(dim=1) if n else total.sum(dim=1)


def select_top_fraction(
    scores: Sequence[float] | torch.Tensor, keep_fraction: float
) -> tuple[list[bool], list[str | None]]:
    """Keep the ceil(keep_fraction x n) highest scores (ties: the earlier row); reasons for the others.

    Returns (kept [n], reason [n]) with reason DROP_REASON for each dropped row and None for each kept one.
    """
    values = [float(s) for s in scores]
    if not 0 < keep_fraction <= 1:
        raise InfluenceError(f"keep_fraction must be in (0, 1], got {keep_fraction}")
    if any(math.isnan(v) for v in values):
        raise InfluenceError("influence scores contain NaN")
    n_keep = math.ceil(keep_fraction * len(values) - 1e-9)  # 0.3 x 10 is 3.0000000000000004 in floats
    order = sorted(range(len(values)), key=lambda i: -values[i])  # stable: ties keep the earlier row
    kept = [False] * len(values)
    for i in order[:n_keep]:
        kept[i] = True
    return kept, [None if k else DROP_REASON for k in kept]


def target_group_keys(rows: list[dict[str, Any]], group_by: str) -> dict[str, str]:
    """ref_id -> the group of that row of R for aggregate 'max_group': its `group_by` column ('source': the file,
    without the ':LINE' or '#ROW' a JSONL or Parquet source carries; 'language'; 'ref_id': every row its own
    group)."""
    out = {}
    for r in rows:
        key = str(r.get(group_by) or "")
        if group_by == "source":
            key = re.sub(r"(:\d+|#\d+)$", "", key)
        out[r["ref_id"]] = key
    return out


def choose_targets(rows: list[dict[str, Any]], cfg: InfluenceConfig) -> list[dict[str, Any]]:
    """R's rows used as targets: all of them, or `max_targets` chosen by a seeded hash of their ref_id (the same
    rows on every checkpoint and every run), kept in R's order."""
    if cfg.max_targets is None or len(rows) <= cfg.max_targets:
        return rows
    rank = sorted(range(len(rows)), key=lambda i: hashlib.sha256(f"{cfg.seed}:{rows[i]['ref_id']}".encode()).digest())
    chosen = set(rank[: cfg.max_targets])
    return [r for i, r in enumerate(rows) if i in chosen]
