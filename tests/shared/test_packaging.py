"""The four top-level folders install as subpackages of one package, `paged`: every folder that is a
Python package must be listed in pyproject.toml, or an installed (non-editable) copy would miss it."""

from __future__ import annotations

import tomllib

from support.daemon_process import PROJECT_ROOT

TOP_LEVEL_FOLDERS = ("gateway", "worker", "shared", "ops")


def test_every_package_folder_is_installed_under_paged() -> None:
    setuptools = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert setuptools["package-dir"] == {f"paged.{folder}": folder for folder in TOP_LEVEL_FOLDERS}
    folders = sorted(
        "paged." + ".".join(init.parent.relative_to(PROJECT_ROOT).parts)
        for folder in TOP_LEVEL_FOLDERS
        for init in (PROJECT_ROOT / folder).rglob("__init__.py")
    )
    assert sorted(setuptools["packages"]) == folders
