"""The import contracts in pyproject.toml ([tool.importlinter]): the gateway and the worker never
import each other, shared imports neither, only ops imports ops, and the scheduling core imports no
event loop, transport or HTTP. .ci/run also runs `lint-imports`; this test makes a layering
violation fail the suite wherever it runs."""

from __future__ import annotations

from importlinter import cli

from support.daemon_process import PROJECT_ROOT


def test_import_contracts_are_kept() -> None:
    status = cli.lint_imports(config_filename=str(PROJECT_ROOT / "pyproject.toml"), no_cache=True, no_logo=True)
    assert status == cli.EXIT_STATUS_SUCCESS, "an import contract is broken: run `lint-imports` for the offending imports"
