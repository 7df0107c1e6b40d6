"""How a round configures its stages: which checkpoints each iteration samples from and which seed snippets it takes.

Iteration t (1..T) samples `round.snippets_per_iteration` kept snippets starting after those of iterations 1..t-1,
and the release takes the next `round.synthesize_snippets`, so no seed is used twice in a round. Pure config
arithmetic, shared by the iteration and round flows (flows/iteration.py, flows/round.py), which only wire stages.
"""

from __future__ import annotations

from synth_core.config import RunConfig
from synth_core.train import checkpoints_of


def first_snippet(cfg: RunConfig, iteration: int) -> int:
    """Kept snippets used before iteration `iteration` (T + 1 = the release)."""
    n = cfg.round.snippets_per_iteration
    return (iteration - 1) * n if n else 0


def stage_config(cfg: RunConfig, checkpoints: str, iteration: int) -> RunConfig:
    """The config of iteration `iteration`'s stages (T + 1 = the release's): sample from the checkpoints of the
    train output `checkpoints` (only its last one when round.multi_checkpoint is off) on this iteration's seeds."""
    ckpts = checkpoints_of(checkpoints, cfg)
    release = iteration > cfg.round.iterations
    out = cfg.model_copy(deep=True)
    out.sample.checkpoints = ckpts if cfg.round.multi_checkpoint else ckpts[-1:]
    out.sample.base = None
    out.sample.iteration = iteration
    out.sample.max_snippets = cfg.round.synthesize_snippets if release else cfg.round.snippets_per_iteration
    out.sample.first_snippet = first_snippet(cfg, iteration)
    return out
