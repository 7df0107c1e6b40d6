"""From gradient features to a decision: influence scores and the top-fraction selection.

`influence_scores`: sum over checkpoints of (mean LR of the checkpoint, normalised over checkpoints) x cosine to the
targets, aggregated as the mean over targets or the max over target groups. `select_top_fraction`: keep the
highest ceil(keep_fraction x n), with DROP_REASON for the others.

What it leaves to others: computing the features (lora_grads.py) and reading/writing them (stage.py).
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from typing import TYPE_CHECKING

from synth_core.influence.errors import InfluenceError

if TYPE_CHECKING:
    import torch

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
