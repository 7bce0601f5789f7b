"""The suite's own helper modules sit on sys.path ahead of site-packages (pytest puts tests/ first), so one
named like an installed package's top-level module hides that package from every library importing it:
transformers 5.25 imports `kernels` when it is installed, and a helper once called tests/kernels.py broke
the import of transformers in every test module that needed it."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def test_helper_modules_do_not_shadow_installed_packages():
    installed = importlib.metadata.packages_distributions()
    helpers = sorted(p.stem for p in TESTS.glob("*.py") if not p.stem.startswith("test_") and p.stem != "conftest")
    assert helpers, "tests/ is expected to hold helper modules"
    shadowing = {name: installed[name] for name in helpers if name in installed}
    assert not shadowing, f"tests/ helper modules shadow installed packages (rename them): {shadowing}"
