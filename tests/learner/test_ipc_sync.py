"""GeneratorGroup.sync_weights with rollout.weight_sync=ipc: each learner rank hands its
gathered weights to its own rollout workers through shared memory (real Ray, HF workers)."""

import pytest
import ray
import torch

from gad_ray.config.schema import RolloutConfig
from gad_ray.learner import GeneratorGroup, LearnerError
from gad_ray.models.loading import load_causal_lm
from gad_ray.rollout.hf_worker import HFRolloutWorker


def test_each_rank_sends_to_its_workers_by_ipc(ray_session, tiny_model_dir, lh):
    cfg = lh.learner_config(tiny_model_dir, generator_ranks=2)
    cfg.cluster.placement = "colocated"
    cfg.rollout.weight_sync = "ipc"
    cfg.rollout.bucket_bytes = 64 * 1024
    group = GeneratorGroup(cfg)
    actor = ray.remote(HFRolloutWorker).options(num_cpus=0.5)
    rc = RolloutConfig(backend="hf")
    workers = [actor.remote(str(tiny_model_dir), rc, "auto", 64, 0) for _ in range(3)]
    try:
        group.train_sft(lh.make_token_batch(seed=1, n=6))
        masters = group.full_params()
        init = load_causal_lm(str(tiny_model_dir)).state_dict()
        assert any(not torch.equal(v, init[k]) for k, v in masters.items())  # the step moved G
        stats = group.sync_weights(workers)  # rank 0 -> workers 0 and 2, rank 1 -> worker 1
        tied = masters["model.embed_tokens.weight"].numel()  # sent again as lm_head.weight
        full = sum(v.numel() for v in masters.values()) + tied
        assert stats["bytes"] == 4 * full  # rank 0: all of G
        received = ray.get([w.__ray_call__.remote(lambda w: w.model.state_dict()) for w in workers])
        for i, got in enumerate(received):
            for k, v in masters.items():
                assert torch.equal(got[k], v), f"worker {i}: {k}"
        # a receiver that is gone: the error names the learner rank and the rollout worker
        ray.kill(workers[1])
        with pytest.raises(LearnerError, match="rank 1 failed.*rollout worker 1 failed in begin"):
            group.sync_weights(workers)
    finally:
        group.shutdown()
        for w in workers:
            ray.kill(w)
