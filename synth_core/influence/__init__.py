"""Gradient-based influence (LESS-style): LoRA gradient features of rows, and the scores that rank candidates.

The math of the influence stage (issue 5). A row's gradient feature is the gradient of its loss (the mean
cross-entropy over its response tokens, as LESS) with respect to the LoRA weights of a checkpoint, Adam-
preconditioned for candidates (m' = b1 m + (1-b1) g, v' = b2 v + (1-b2) g^2, feature = m' / (sqrt(v') + eps),
with the checkpoint's AdamW moments) and plain for targets, randomly projected to `proj_dim` (a seeded Rademacher
matrix on a GPU, a seeded sparse Johnson-Lindenstrauss transform on a CPU: `make_projector`) and L2-normalised.
Influence = sum over checkpoints of (mean LR of the checkpoint, normalised over checkpoints) x cosine to the
targets, aggregated as the mean over targets or the max over target groups. Per-sample gradients of a whole
padded batch come from ONE backward pass (lora_grads.py says how and why it is exact); the projection matrix
never exists whole (projection.py).

One module per concept; each imports only modules above it in this list:
- errors.py      InfluenceError
- kernels.py     the Triton kernels on a GPU (Rademacher signs, fused Adam); imports triton, so only imported
                 lazily on CUDA, never from here
- hashed.py      the hashed Rademacher matrix: its definition in torch, its projector (the kernel is in kernels.py)
- kronecker.py   the Kronecker-structured projection: per LoRA weight, kron of two small seeded +-1 factors
- projection.py  the random projections (Rademacher, sparse JL; hashed and Kronecker by name): their choice, ids,
                 fingerprint, pass sizing
- checkpoint.py  a LoRA checkpoint for influence: resolving references, the model, mean LR, AdamW moments, and
                 the Adam preconditioning
- lora_grads.py  per-sample LoRA gradients in one backward pass, and the projected features of rows
- loop.py        the LESS-style reference (one backward pass per row) that tests and benchmarks compare against
- scores.py      influence scores from features, and the top-fraction selection
- stage.py       the stage: plan_influence -> target_features -> influence_shard -> commit_influence
                 (fingerprinted output; build_influence runs all of it in one process)
This package re-exports every public name the single module synth_core/influence.py had, so
`from synth_core.influence import X` and `influence.X` keep working; new code may import from the submodule.

What it leaves to others: the Prefect tasks, flow and CLI (tasks/stage.py, flows/influence.py), and training
the checkpoints (synth_core.train writes the adapter, `optimizer_moments.pt` and `train_state.json` read here).
"""

from synth_core.influence.checkpoint import (
    AdamState,
    InfluenceCheckpoint,
    adam_precondition,
    check_optimizer_state,
    load_adam_state,
    load_checkpoint_for_influence,
    resolve_influence_checkpoints,
)
from synth_core.influence.errors import (
    InfluenceError,
)
from synth_core.influence.hashed import (
    HASHED_VERSION,
    HashedRademacherProjector,
    hashed_signs,
)
from synth_core.influence.kronecker import (
    KRONECKER_VERSION,
    KroneckerProjector,
    kronecker_split,
)
from synth_core.influence.loop import (
    grad_features_loop,
    per_sample_grads_loop,
)
from synth_core.influence.lora_grads import (
    HEAD_CHUNK_ELEMS,
    GradFeatures,
    LoraLayer,
    Row,
    compute_grad_features,
    encode_rows,
    lora_layers,
    lora_linears,
    lora_shapes,
    per_sample_grads,
    per_sample_losses,
)
from synth_core.influence.projection import (
    CHUNK_ELEMS,
    PROJECTION_VERSION,
    SPARSE_JL_VERSION,
    Projector,
    RademacherProjector,
    SparseJLProjector,
    block_seed,
    check_same_projection,
    default_projection_rows,
    make_projector,
    project_named,
    projection_device_type,
    projection_dtype,
    projection_fingerprint,
    resolve_projection,
)
from synth_core.influence.scores import (
    DROP_REASON,
    choose_targets,
    influence_scores,
    select_top_fraction,
    target_group_keys,
)
from synth_core.influence.stage import (
    NO_ANSWER_REASON,
    STAGE_VERSION,
    InfluencePlan,
    InfluenceShard,
    build_influence,
    commit_influence,
    features_in_process,
    histogram_markdown,
    influence_done,
    influence_shard,
    plan_influence,
    prepare_output,
    target_features,
)

__all__ = [
    "AdamState",
    "CHUNK_ELEMS",
    "DROP_REASON",
    "GradFeatures",
    "HEAD_CHUNK_ELEMS",
    "InfluenceCheckpoint",
    "InfluenceError",
    "InfluencePlan",
    "InfluenceShard",
    "LoraLayer",
    "NO_ANSWER_REASON",
    "PROJECTION_VERSION",
    "Projector",
    "RademacherProjector",
    "Row",
    "SPARSE_JL_VERSION",
    "STAGE_VERSION",
    "SparseJLProjector",
    "adam_precondition",
    "block_seed",
    "build_influence",
    "check_optimizer_state",
    "check_same_projection",
    "choose_targets",
    "commit_influence",
    "compute_grad_features",
    "default_projection_rows",
    "encode_rows",
    "features_in_process",
    "grad_features_loop",
    "histogram_markdown",
    "influence_done",
    "influence_scores",
    "influence_shard",
    "load_adam_state",
    "load_checkpoint_for_influence",
    "lora_layers",
    "lora_linears",
    "lora_shapes",
    "make_projector",
    "HASHED_VERSION",
    "HashedRademacherProjector",
    "KRONECKER_VERSION",
    "KroneckerProjector",
    "kronecker_split",
    "hashed_signs",
    "per_sample_grads",
    "per_sample_grads_loop",
    "per_sample_losses",
    "plan_influence",
    "prepare_output",
    "project_named",
    "projection_device_type",
    "projection_dtype",
    "projection_fingerprint",
    "resolve_influence_checkpoints",
    "resolve_projection",
    "select_top_fraction",
    "target_features",
    "target_group_keys",
]
