"""A normal install runs: the built wheel holds every config, and gad-ray installed from it (not
editable) composes its config and plans a run from a directory outside the repo.

No network: the wheel is built without build isolation, installed without dependencies into a
fresh virtualenv, and a ``.pth`` file lends that venv the test venv's installed packages (a
path listed in a ``.pth`` file is not scanned for ``.pth`` files of its own, so the test venv's
editable finder for gad_ray is not installed; the test checks where gad_ray comes from).
"""

import os
import shutil
import site
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CONF = REPO / "gad_ray" / "conf"


def _run(cmd: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, (
        f"{cmd} exited {out.returncode}:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    )
    return out


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """``pip wheel --no-deps --no-build-isolation`` of a copy of the sources (the build leaves
    build/ and *.egg-info beside them, not in the repo)."""
    root = tmp_path_factory.mktemp("wheel")
    src = root / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    shutil.copytree(REPO / "gad_ray", src / "gad_ray", ignore=shutil.ignore_patterns("__pycache__"))
    cmd = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation"]
    _run([*cmd, "-w", str(root / "dist"), str(src)], root, dict(os.environ))
    (whl,) = (root / "dist").glob("gad_ray-*.whl")
    return whl


@pytest.fixture(scope="module")
def venv(wheel, tmp_path_factory) -> tuple[Path, Path, dict[str, str]]:
    """A fresh venv with the wheel installed (not editable); its other packages come from the
    test venv through a ``.pth`` file. Returns (venv, its site-packages, the env to run in)."""
    env_dir = tmp_path_factory.mktemp("venv") / "v"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env.pop("HYDRA_FULL_ERROR", None)
    _run([sys.executable, "-m", "venv", "--without-pip", str(env_dir)], env_dir.parent, env)
    python = env_dir / "bin" / "python"
    # the test venv's pip, run by the new interpreter: installs into the new venv
    pip = [sys.executable, "-m", "pip", "--python", str(python), "install", "-q"]
    _run([*pip, "--no-deps", "--no-index", str(wheel)], env_dir.parent, env)
    purelib = _run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        env_dir.parent,
        env,
    ).stdout.strip()
    (Path(purelib) / "test_venv_packages.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    env["PATH"] = f"{env_dir / 'bin'}{os.pathsep}{env['PATH']}"
    env["VIRTUAL_ENV"] = str(env_dir)
    return env_dir, Path(purelib), env


def test_the_wheel_holds_every_config(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    shipped = sorted(n for n in names if n.startswith("gad_ray/conf/"))
    in_repo = sorted(f"gad_ray/conf/{p.relative_to(CONF)}" for p in CONF.rglob("*.yaml"))
    assert len(in_repo) > 20  # the groups, presets and help templates
    assert shipped == in_repo


def test_installed_wheel_runs_outside_the_repo(venv, tmp_path):
    env_dir, purelib, env = venv
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = _run(
        [
            str(env_dir / "bin" / "python"),
            "-c",
            "import gad_ray, importlib.metadata as m; from gad_ray.hydra_app import "
            "CONF_DIR; print(gad_ray.__file__); print(CONF_DIR); "
            "print(m.distribution('gad-ray').locate_file(''))",
        ],
        elsewhere,
        env,
    ).stdout.split()
    # gad_ray, its configs and its metadata all come from the installed wheel
    assert where == [
        str(purelib / "gad_ray" / "__init__.py"),
        str(purelib / "gad_ray" / "conf"),
        str(purelib),
    ]
    gad_train = str(env_dir / "bin" / "gad-train")

    job = _run([gad_train, "--cfg", "job"], elsewhere, env).stdout
    assert "name: tiny_cpu" in job  # the default experiment preset, composed from the wheel
    assert "train_path: synthetic:train" in job
    assert "trainer:" in job and "discriminator:" in job

    plan = _run([gad_train, "plan_only=true", "name=from_wheel"], elsewhere, env).stdout
    assert "Plan: from_wheel on a CPU-only cluster" in plan
    assert (elsewhere / "outputs" / "from_wheel").is_dir()  # Hydra's run dir, under the cwd

    usage = _run([gad_train, "--help"], elsewhere, env).stdout  # the help template ships too
    assert usage.startswith("gad-train:")
