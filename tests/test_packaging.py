"""The installed distribution: `models/` and `datamodules/` install as `lightning_probes.models` and
`lightning_probes.datamodules`, never as top-level packages that would shadow a user's own."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
DIST = "lightning-probes"


def test_models_and_datamodules_live_inside_lightning_probes():
    import lightning_probes.datamodules
    import lightning_probes.models
    from lightning_probes.datamodules import MNISTDataModule
    from lightning_probes.models import LeNet5
    from lightning_probes.models.components import LeNet5Net

    assert lightning_probes.models.__name__ == "lightning_probes.models"
    assert LeNet5.__module__.startswith("lightning_probes.models.")
    assert LeNet5Net.__module__.startswith("lightning_probes.models.components.")
    assert MNISTDataModule.__module__.startswith("lightning_probes.datamodules.")


def _python_outside_checkout(code: str, cwd: Path) -> str:
    """Run ``code`` in a fresh interpreter whose ``sys.path`` does not hold this checkout (as for a user)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_distribution_has_no_top_level_models_or_datamodules(tmp_path):
    # Outside the checkout, so that a stale `lightning_probes.egg-info` in it cannot answer for the install.
    code = (f"import importlib.metadata as m; d = m.distribution({DIST!r}); "
            "print(' '.join((d.read_text('top_level.txt') or '').split())); "
            "print('\\n'.join(str(f) for f in d.files or []))")
    top_level, *files = _python_outside_checkout(code, tmp_path).splitlines()
    assert top_level.split() == ["lightning_probes"]
    assert not {Path(f).parts[0] for f in files if f} & {"models", "datamodules"}


def test_user_models_package_is_not_shadowed(tmp_path):
    user = tmp_path / "models"
    user.mkdir()
    (user / "__init__.py").write_text("MINE = True\n")
    code = "import models, lightning_probes.models; assert models.MINE; print(models.__file__)"
    found = _python_outside_checkout(code, tmp_path).strip()
    assert Path(found).resolve() == (user / "__init__.py").resolve()


def test_every_subpackage_is_installed():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(setuptools["packages"])
    folders = {"lightning_probes": "lightning_probes", **setuptools["package-dir"]}
    on_disk = set()
    for package, folder in folders.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            relative = init.parent.relative_to(ROOT / folder).parts
            on_disk.add(".".join((package, *relative)))
    assert on_disk == listed, "list every package in pyproject.toml's [tool.setuptools] packages"
