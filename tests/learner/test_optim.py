"""The LR schedule: linear warmup, then constant or cosine decay to min_lr_ratio."""

import pytest
import torch

from gad_ray.config.schema import OptimConfig
from gad_ray.learner.optim import build_optimizer, build_scheduler, lr_factor, set_base_lr


def test_constant_with_warmup():
    cfg = OptimConfig(warmup_steps=4)
    assert [lr_factor(s, cfg, None) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]


def test_cosine_decays_to_min_ratio_and_stays():
    cfg = OptimConfig(schedule="cosine", warmup_steps=2, min_lr_ratio=0.1)
    assert lr_factor(2, cfg, 12) == pytest.approx(1.0)
    assert lr_factor(7, cfg, 12) == pytest.approx(0.55)
    assert lr_factor(12, cfg, 12) == pytest.approx(0.1)
    assert lr_factor(50, cfg, 12) == pytest.approx(0.1)


def test_scheduler_drives_adamw_lr():
    cfg = OptimConfig(lr=0.1, warmup_steps=2)
    opt = build_optimizer([torch.nn.Parameter(torch.zeros(2))], cfg)
    sched = build_scheduler(opt, cfg, None)
    lrs = []
    for _ in range(3):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([0.05, 0.1, 0.1])


def test_cosine_without_total_steps_is_an_error():
    opt = build_optimizer([torch.nn.Parameter(torch.zeros(2))], OptimConfig())
    with pytest.raises(ValueError, match="cosine' needs total_steps"):
        build_scheduler(opt, OptimConfig(schedule="cosine"), None)


def test_set_base_lr_keeps_the_schedule_position():
    cfg = OptimConfig(lr=0.1, warmup_steps=4)
    opt = build_optimizer([torch.nn.Parameter(torch.zeros(2))], cfg)
    sched = build_scheduler(opt, cfg, None)
    for _ in range(2):
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.075)  # 0.1 * 3/4
    set_base_lr(sched, 0.02)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.015)  # 0.02 * 3/4, same step
    opt.step()
    sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.02)  # warmup done: 0.02 * 1
    restored = build_scheduler(opt, cfg, None)
    restored.load_state_dict(sched.state_dict())
    assert restored.base_lrs == [0.02]  # the new base LR travels with the checkpoint
