"""Gradient-based influence (LESS-style): LoRA gradient features of rows, and the scores that rank candidates.

The math of the influence stage (issue 5). A row's gradient feature is the gradient of its loss (the mean
cross-entropy over its response tokens, as LESS) with respect to the LoRA weights of a checkpoint, Adam-
preconditioned for candidates (m' = b1 m + (1-b1) g, v' = b2 v + (1-b2) g^2, feature = m' / (sqrt(v') + eps),
with the checkpoint's AdamW moments) and plain for targets, randomly projected to `proj_dim` (a seeded Rademacher
matrix on a GPU, a seeded sparse Johnson-Lindenstrauss transform on a CPU: `make_projector`) and L2-normalised.
Influence = sum over checkpoints of (mean LR of the checkpoint, normalised over checkpoints) x cosine to the
targets, aggregated as the mean over targets or the max over target groups.

How it is fast: per-sample gradients of a whole padded batch come from ONE backward pass. For a linear map
y = W x the gradient of sample b's loss is sum over tokens t of g_bt x_bt^T, where x is the layer's input and g
the gradient of the summed per-sample losses at its output (each sample's loss depends only on its own
activations, so the sum's gradient at sample b's positions is sample b's own). During the pass each LoRA
branch runs as one autograd function (`_lora_function`, in the model's dtype: bf16 on a bf16 GPU model) whose
backward forms the per-sample gradients of A and B with one batched matmul each and hands them on to be
preconditioned and gathered for the projection, so at most one layer's are in memory besides the gathered ones.
Autograd itself computes no weight gradient at all: the LoRA weights are frozen during the pass and the graph is
rooted at the input embeddings. No attention mask (right padding under the causal mask is exact) and logits only
at the positions that carry a loss, chunked (`_backward_per_sample` says why both are exact). On a GPU the sign
unpacking and the Adam preconditioning are Triton kernels (synth_core.influence.kernels).

The projection matrix [num_params, proj_dim] never exists whole: it is cut into chunks of CHUNK_ELEMS flat
elements of each parameter, each drawn from a torch.Generator seeded from (seed, parameter name, chunk index), so
the same seed gives the same features whatever the batch size or the parameter order. Two matrices, one interface
(`Projector`), chosen by influence.projection ('auto': by the device type):
- RademacherProjector (GPU): dense +-1/sqrt(proj_dim), drawn on the device as sign bits (fused Triton kernels on a
  GPU). Drawing and unpacking R costs about as much per pass as the matmul itself, so the per-sample gradients of
  many rows (several batches: `projection_rows`) are gathered in one buffer and projected in one pass. CPU and
  CUDA generators differ: its features are comparable only on the same device type.
- SparseJLProjector (CPU): s nonzeros +-1/sqrt(s) per parameter element, one in each of s blocks of columns (Kane
  & Nelson's sparse JL), added with index_add_: O(s) per element where R costs O(proj_dim) (on a CPU ~30 GFLOP
  and 15 G signs per row of the built-in model's LoRA at d = 8192), with the same inner-product variance. Drawn on
  the CPU, so the same on every device.
Targets and candidates must share the projection: `GradFeatures.projection_id` names it (kind, s, d, seed, device
type where it matters), for the stage to check, and the stage's fingerprint holds the resolved kind.

`per_sample_grads_loop` and `grad_features_loop` are the LESS-style reference (one backward pass per row, a
dense projection of the flat gradient) that the tests and the benchmark compare against.

The stage (`build_influence`, or plan_influence -> target_features -> influence_shard ->
commit_influence for an orchestrator) reads the kept rows of a samples/scored dataset, renders them as the train
stage's chats, computes R's features once per checkpoint and each shard's per checkpoint in a spawned process,
and writes every candidate row with its influence and the top-fraction decision (fingerprinted: a re-run is free).

What it leaves to others: the Prefect tasks, flow and CLI (tasks/influence.py, flows/influence.py), and training
the checkpoints (synth_core.train writes the adapter, `optimizer_moments.pt` and `train_state.json` read here).

The package, one module per concept (imports point down this list; the package re-exports every public name, so
`from synth_core.influence import X` works whichever module holds X):
- errors.py      InfluenceError
- kernels.py     the Triton kernels (GPU only: imported lazily, never from here)
- projection.py  the random projections (Rademacher, sparse JL), their choice, ids and fingerprint, pass sizing
- checkpoint.py  a LoRA checkpoint for influence: model, mean LR, AdamW moments, Adam preconditioning
- lora_grads.py  per-sample LoRA gradients in one backward pass, and the projected features of rows
- loop.py        the LESS-style reference (one backward pass per row) that tests and benchmarks compare against
- scores.py      influence scores from features and the top-fraction selection
- stage.py       the stage: plan, targets, shards, commit (fingerprinted output), build_influence
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
    influence_scores,
    select_top_fraction,
)
from synth_core.influence.stage import (
    NO_ANSWER_REASON,
    STAGE_VERSION,
    InfluencePlan,
    InfluenceShard,
    build_influence,
    choose_targets,
    commit_influence,
    features_in_process,
    histogram_markdown,
    influence_done,
    influence_shard,
    plan_influence,
    prepare_output,
    target_features,
    target_group_keys,
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
    "make_projector",
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
