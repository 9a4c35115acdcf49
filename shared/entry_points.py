"""Starting a process at an entry point named by its qualified name ("package.module:function"),
so that the side that starts it never imports the side that runs (the gateway spawns workers
without importing paged.worker). The child is a fresh interpreter (multiprocessing's spawn: no
fork, the parent's threads and sockets must not be inherited); its arguments are pickled."""

from __future__ import annotations

import importlib
import multiprocessing
from collections.abc import Callable
from multiprocessing.process import BaseProcess
from typing import Any


def resolve(target: str) -> Callable[..., Any]:
    """The function `target` names: "package.module:function"."""
    module_name, _, attribute = target.partition(":")
    if not module_name or not attribute:
        raise ValueError(f"entry point {target!r} is not of the form package.module:function")
    function = getattr(importlib.import_module(module_name), attribute)
    if not callable(function):
        raise TypeError(f"entry point {target!r} is not callable")
    return function


def run_entry_point(target: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    resolve(target)(*args, **kwargs)


def spawn_entry_point(target: str, *args: Any, process_name: str, **kwargs: Any) -> BaseProcess:
    """Start `target(*args, **kwargs)` in a daemonic child process and return it, started."""
    process = multiprocessing.get_context("spawn").Process(
        target=run_entry_point, args=(target, args, kwargs), name=process_name, daemon=True
    )
    process.start()
    return process
