"""`lightning_probes.functional` exports every public function and class of its submodules."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import pytest

import lightning_probes.functional as functional

SUBMODULES = sorted(m.name for m in pkgutil.iter_modules(functional.__path__) if not m.name.startswith("_"))


def _public(module) -> list[str]:
    """Functions and classes defined in ``module`` itself (not imported into it) whose name has no ``_``."""
    return sorted(name for name, obj in vars(module).items()
                  if not name.startswith("_") and (inspect.isfunction(obj) or inspect.isclass(obj))
                  and obj.__module__ == module.__name__)


def test_the_expected_submodules_are_found():
    assert {"ablation", "activations", "alignment", "calibration", "dynamics", "gradients", "representations",
            "robustness"} <= set(SUBMODULES)


@pytest.mark.parametrize("submodule", SUBMODULES)
def test_every_public_callable_is_exported(submodule):
    module = importlib.import_module(f"lightning_probes.functional.{submodule}")
    public = _public(module)
    assert public, f"{submodule} defines nothing public"
    missing = [name for name in public if getattr(functional, name, None) is not getattr(module, name)]
    assert not missing, f"not exported from lightning_probes.functional: {missing}"
    unlisted = [name for name in public if name not in functional.__all__]
    assert not unlisted, f"missing from lightning_probes.functional.__all__: {unlisted}"


def test_all_lists_only_existing_unique_names():
    assert len(functional.__all__) == len(set(functional.__all__))
    assert [name for name in functional.__all__ if not hasattr(functional, name)] == []
