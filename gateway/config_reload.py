"""SIGHUP: re-read the --config file's reloadable subset and apply it to the running daemon.

Reloadable without dropping a request: the log level, the admission caps (max_waiting_requests,
max_waiting_tokens), the scheduling policy, the admission policy and its KV cap, and the thrash
detector's window and thresholds. Everything else (model, pool sizes, ports) needs a
restart and is ignored here. A setting given on the command line (or by environment variable) keeps
that value: flags override the file, at start and on reload alike. A key the file no longer sets
returns to its default.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click
import msgspec
from click.core import ParameterSource

from paged.shared.config_file import read_config_file
from paged.gateway.engine import AsyncEngine
from paged.shared.config import SchedulerConfig
from paged.shared.logging import get_logger, set_log_level

log = get_logger("gateway.config_reload")

RELOADABLE_SCHEDULER_FIELDS = (
    "max_waiting_requests",
    "max_waiting_tokens",
    "scheduling_policy",
    "admission_policy",
    "kv_admission_cap",
    "thrash_window",
    "thrash_recompute_share",
    "thrash_refetch_share",
)
_FROM_FLAGS = (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT)


class ConfigReloader:
    """Built inside the running command (`serve` or `gateway`), which it reads the file for."""

    def __init__(self, context: click.Context, path: Path) -> None:
        root = context.find_root()
        self.path = path
        self.group = root.command
        self.command_name = context.info_name or ""
        self.log_level_pinned = root.get_parameter_source("log_level") in _FROM_FLAGS
        self.log_level = root.params["log_level"]
        self.pinned = {name for name in RELOADABLE_SCHEDULER_FIELDS if context.get_parameter_source(name) in _FROM_FLAGS}

    def reload(self, engine: AsyncEngine) -> None:
        """Read and apply; a file that does not validate changes nothing (the error is logged)."""
        try:
            default_map = read_config_file(self.path, self.group)  # type: ignore[arg-type]
        except Exception as exc:  # keep serving with what runs now, whatever went wrong
            log.error("config_reload_failed", path=str(self.path), error=str(exc))
            return
        changes: dict[str, Any] = {}
        if not self.log_level_pinned:
            level = default_map.get("log_level", "info")
            if level != self.log_level:
                changes["log_level"] = level
                self.log_level = level
                set_log_level(level)
        values = default_map.get(self.command_name, {})
        current = engine.scheduler_config
        defaults = SchedulerConfig()
        updates = {
            name: values.get(name, getattr(defaults, name))
            for name in RELOADABLE_SCHEDULER_FIELDS
            if name not in self.pinned and values.get(name, getattr(defaults, name)) != getattr(current, name)
        }
        if updates:
            try:
                reloaded = msgspec.structs.replace(current, **updates)
            except ValueError as exc:  # e.g. a kv_admission_cap outside (0, 1]: keep what runs now
                log.error("config_reload_failed", path=str(self.path), error=str(exc))
                return
            engine.reconfigure_scheduling(reloaded)
            changes.update(updates)
        log.info("config_reloaded", path=str(self.path), changes=changes)
