"""Will it fit? The GPUs each actor lands on, their peak memory per phase, and host memory per
node, before anything starts (docs/plan.md).

``gad-train <overrides> plan_only=true`` prints, per GPU, the actors placed on it (by
:func:`gad_ray.placement.pool`, the run's own placement logic, also checked by creating the
run's placement group on Ray's logical GPUs) and its peak memory in each phase of a step:
``generate`` (vLLM awake), ``D update``, ``G update``; per node, its host memory while the
learners load and while the run trains. When a GPU exceeds ``cluster.gpu_memory_gib`` or a node
``cluster.host_memory_gib``, it exits 2 naming what would make it fit; a real run makes the
same check before any actor starts (:func:`check_fits`). Model shapes come from
:mod:`gad_ray.models.shapes` (shipped for the preset models: no hub, no GPU needed).

Per GPU and phase:

- a learner rank's resident states, and in its own update its step's largest moment for the
  largest micro batch (:mod:`gad_ray.plan.learners`, :mod:`gad_ray.plan.step`; checked against
  measured peaks by ``tests/plan/test_measured.py``);
- on-policy distillation's frozen teacher (``teacher_model``): its weights in every phase (only in
  its own ``T forward`` with ``learner.offload_idle``), and in that phase its logits;
- vLLM: ``rollout.gpu_memory_utilization`` x GPU memory while awake (weights, KV cache,
  activations, CUDA graphs; with ``rollout.kv_cache_memory_bytes``: weights + that + 2 GiB); 0
  asleep (sleep level 1 moves the weights to host memory, drops the KV cache), as it is in the
  learner phases with ``rollout.sleep_when_idle``. Its KV cache is the share less the weights
  / tp and 2 GiB of runtime; less than one sequence is an error;
- 1.5 GiB per process (CUDA context ~0.5 GiB, NCCL and cuBLAS workspaces, the caching
  allocator's fragmentation); an awake vLLM's is inside its share.

Per node: :mod:`gad_ray.plan.host`. LoRA learners: :mod:`gad_ray.plan.lora`.
"""

from gad_ray.plan.fit import (
    GPU,
    PHASES,
    PROCESS_OVERHEAD,
    QUIET_RAY,
    TEACHER_PHASE,
    Plan,
    check_fits,
    estimate,
    groups,
    layout,
    make_plan,
    where,
    with_override,
)

__all__ = [
    "GPU",
    "PHASES",
    "PROCESS_OVERHEAD",
    "QUIET_RAY",
    "TEACHER_PHASE",
    "Plan",
    "check_fits",
    "estimate",
    "groups",
    "layout",
    "make_plan",
    "where",
    "with_override",
]
