"""The demo's run directory: a rerun resumes only a run of the same overrides."""

from gad_ray.demo import default_run_dir


def test_each_set_of_overrides_has_its_own_run_dir():
    assert default_run_dir([]) == "outputs/demo"
    off = default_run_dir(["trainer.pipeline=one_step_off"])
    assert off.startswith("outputs/demo-") and off != default_run_dir(["algorithm=seqkd"])
    assert off == default_run_dir(["trainer.pipeline=one_step_off"])  # stable across runs
