"""The driver is what the recipes' step functions expect (``StepDriver``), with no import of it."""

from __future__ import annotations

import ast
import inspect

from gad_ray.driver.driver import Driver
from gad_ray.recipes.stages import StepDriver


def test_the_driver_provides_the_step_driver_protocol() -> None:
    methods = [n for n, v in vars(StepDriver).items() if inspect.isfunction(v) and n[0] != "_"]
    assert sorted(methods) == ["timer", "update"]
    for name in methods:
        want = list(inspect.signature(getattr(StepDriver, name)).parameters)
        assert list(inspect.signature(getattr(Driver, name)).parameters) == want, name
    stored = {
        node.attr
        for node in ast.walk(ast.parse(inspect.getsource(Driver)))
        if isinstance(node, ast.Attribute)
        and isinstance(node.ctx, ast.Store)
        and isinstance(node.value, ast.Name)
        and node.value.id == "self"
    }
    attributes = set(inspect.get_annotations(StepDriver))
    assert attributes == {"cfg", "roles", "state"}
    assert attributes <= stored, f"Driver never sets {attributes - stored}"
