"""The role registry (gad_ray/role_specs.py): every entry resolves, and a role added as one entry
is placed, counted and built without any other module naming it."""

from __future__ import annotations

import pytest

from gad_ray.driver.roles import Roles, resolve
from gad_ray.hydra_app import compose
from gad_ray.placement import pool, role_size
from gad_ray.role_specs import ROLES, RoleSpec, spec


def _gpu_cfg(*extra: str, gpus: int = 4):
    return compose(
        ["model=tiny", f"cluster.gpus_per_node={gpus}", "data.max_prompt_length=64", *extra]
    )


def test_every_factory_and_check_names_a_function():
    for name, s in ROLES.items():
        assert callable(resolve(s.factory)), name
        if s.preflight is not None:
            assert callable(resolve(s.preflight)), name
        assert 0 < s.colocated_share <= 1 and s.plan_label, name
        assert (s.metric_prefix is not None) == (s.kind == "learner"), name


def test_an_unknown_role_names_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown role 'critic'; known: \['discriminator'"):
        spec("critic")


def _built(cfg, student_path, cpus, place, **options):
    return ("built", student_path, cpus, place, options)


def test_a_new_role_is_one_entry(monkeypatch):
    scorer = RoleSpec(
        "frozen",
        lambda cfg: (cfg.learner.generator_ranks, 1),
        0.2,
        f"{__name__}:_built",
        "scorer rank",
    )
    monkeypatch.setitem(ROLES, "scorer", scorer)
    sized = ("learner.generator_ranks=2", "rollout.num_workers=2", "data.prompts_per_step=32")
    cfg, roles = _gpu_cfg(*sized), ("rollout", "generator", "scorer")
    assert role_size(cfg, "scorer") == (2, 1)

    # colocated: actor i of every role on GPU i, the scorer taking its declared share
    colocated = pool(cfg, roles)
    assert colocated.roles["scorer"] == (0.2, [0, 1])
    assert colocated.roles["rollout"] == (0.4, [0, 1])
    # disaggregated: GPUs of its own, after the others' bundles
    apart = pool(_gpu_cfg(*sized, "cluster.placement=disaggregated", gpus=8), roles)
    assert apart.roles["scorer"] == (1, [4, 5]) and len(apart.bundles) == 6

    # the role factory builds it through the entry, with the recipe's options for it
    roles = Roles.__new__(Roles)  # no Ray: build() only reads these
    roles.cfg, roles.student_path, roles.role_sets = cfg, "/student", [("scorer",)]
    roles.options, roles.places, roles.cpu_scale = {"scorer": {"k": 1}}, {"scorer": "here"}, 1.0
    assert roles.build("scorer") == ("built", "/student", 1, "here", {"k": 1})
