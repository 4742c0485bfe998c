"""What `pip install` puts into site-packages: pab's own two packages and nothing that could collide
with another project's (`cli`, `plugins`), every subpackage of the source tree included."""
from __future__ import annotations

import sys
import zipfile

import pytest

from conftest import ROOT

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    tomllib = pytest.importorskip("tomli")


def _config() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]


def _source_packages() -> set[str]:
    """Every package folder of the source tree, by the name it installs under."""
    names = set()
    for top, installed in (("pab_framework", "pab_framework"), ("plugins", "pab_plugins")):
        for init in (ROOT / top).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / top)
            names.add(".".join([installed, *rel.parts]))
    return names


def test_every_package_is_installed_under_pabs_own_names():
    cfg = _config()
    assert set(cfg["packages"]) == _source_packages()
    assert cfg["package-dir"] == {"pab_plugins": "plugins"}
    assert all(p.split(".")[0] in ("pab_framework", "pab_plugins") for p in cfg["packages"]) and "py-modules" not in cfg


def test_the_entry_points_name_installed_modules():
    import importlib
    from importlib.metadata import distribution

    eps = [e for e in distribution("pab").entry_points if e.group.startswith("pab.")]
    assert eps and all(e.value.split(".")[0] in ("pab_framework", "pab_plugins") for e in eps)
    for e in eps:
        module = importlib.import_module(e.value.split(":")[0])
        assert module.__name__.startswith("pab_plugins.")


@pytest.mark.slow
def test_the_wheel_holds_no_top_level_cli_or_plugins(tmp_path):
    import subprocess

    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", str(ROOT), "-w", str(tmp_path)],
                   check=True, capture_output=True, timeout=600)
    (wheel,) = tmp_path.glob("pab-*.whl")
    tops = {n.split("/")[0] for n in zipfile.ZipFile(wheel).namelist()}
    assert tops == {"pab_framework", "pab_plugins", next(t for t in tops if t.endswith(".dist-info"))}
