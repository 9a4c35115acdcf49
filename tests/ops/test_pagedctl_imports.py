"""`pagedctl` imports a command's module only when that command runs, so the admin commands stay
fast: `status` must not load bench's numpy, matplotlib or the model stack (the time itself is
measured in the docs, never asserted)."""

from __future__ import annotations

import json
import subprocess
import sys

from paged.ops.cli import COMMANDS, main

HEAVY = ("matplotlib", "numpy", "torch", "transformers", "paged.gateway", "paged.worker")


def test_every_command_resolves() -> None:
    for name in COMMANDS:
        command = main.get_command(None, name)  # type: ignore[arg-type]
        assert command is not None and command.name == name


def test_an_admin_command_loads_no_heavy_module() -> None:
    script = (
        "import json, sys\n"
        "from paged.ops.cli import main\n"
        "main.get_command(None, 'status')\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=60)
    loaded = json.loads(result.stdout)
    assert [name for name in loaded if name.split(".")[0] in HEAVY or name.startswith(HEAVY)] == []
