"""Click options generated from the config Structs, so every command that takes a setting spells,
types, defaults and documents it the same way (the field's trailing comment is its help text).

`config_options(CacheConfig, only={...})` decorates a command with those fields' options;
`build_config(CacheConfig, kwargs)` pops them back out of the command's keyword arguments and
validates them into the Struct.
"""

from __future__ import annotations

import inspect
import re
import types
import typing
from collections.abc import Callable, Collection
from typing import Any, Literal, TypeVar

import click
import msgspec

from paged.shared.config import GiB, MiB
from paged.shared.logging import LEVELS

S = TypeVar("S", bound=msgspec.Struct)
F = TypeVar("F", bound=Callable[..., Any])

BYTE_FIELDS = frozenset({"kv_cache_memory", "swap_space", "kv_offload_memory", "max_body_size"})  # accept 512MiB, 4GiB, 1e9
_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1024, "m": 1000**2, "mb": 1000**2, "mib": MiB, "g": 1000**3, "gb": 1000**3, "gib": GiB}


class ByteSize(click.ParamType):
    name = "bytes"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        match = re.fullmatch(r"\s*([0-9.e+]+)\s*([a-zA-Z]*)\s*", str(value))
        unit = match.group(2).lower() if match else ""
        if match is None or unit not in _UNITS:
            self.fail(f"{value!r} is not a size like 268435456, 256MiB or 4GiB", param, ctx)
        try:
            return int(float(match.group(1)) * _UNITS[unit])
        except ValueError:
            self.fail(f"{value!r} is not a size like 268435456, 256MiB or 4GiB", param, ctx)


def _field_comments(struct: type[msgspec.Struct]) -> dict[str, str]:
    comments = {}
    for line in inspect.getsource(struct).splitlines():
        match = re.match(r"\s+(\w+):.*#\s*(.+)$", line)
        if match:
            comments[match.group(1)] = match.group(2)
    return comments


def _flag_name(name: str) -> str:
    return "--" + name.removeprefix("enable_").replace("_", "-")


def _option(field: msgspec.structs.FieldInfo, help_text: str) -> Callable[[F], F]:
    annotation = field.type
    default = field.default
    if typing.get_origin(annotation) in (types.UnionType, typing.Union):
        annotation = next(arg for arg in typing.get_args(annotation) if arg is not type(None))
    flag = _flag_name(field.name)
    if annotation is bool:
        base = flag.removeprefix("--")
        return click.option(f"--{base}/--no-{base}", field.name, default=default, show_default=True, help=help_text)
    if typing.get_origin(annotation) is Literal:
        param_type: Any = click.Choice([str(choice) for choice in typing.get_args(annotation)])
    elif field.name in BYTE_FIELDS:
        param_type = ByteSize()
    else:
        param_type = annotation
    return click.option(flag, field.name, type=param_type, default=default, show_default=default is not None, help=help_text)


def config_options(struct: type[S], only: Collection[str] | None = None) -> Callable[[F], F]:
    """Decorate a click command with one option per field of `struct` (or of the fields in `only`)."""
    comments = _field_comments(struct)
    fields = [f for f in msgspec.structs.fields(struct) if only is None or f.name in only]

    def decorate(command: F) -> F:
        for field in reversed(fields):
            command = _option(field, comments.get(field.name, ""))(command)
        return command

    return decorate


def build_config(struct: type[S], kwargs: dict[str, Any]) -> S:
    """Pop `struct`'s fields out of a command's kwargs and validate them into the Struct."""
    values = {f.name: kwargs.pop(f.name) for f in msgspec.structs.fields(struct) if f.name in kwargs}
    try:
        return msgspec.convert(values, struct)
    except msgspec.ValidationError as exc:
        raise click.BadParameter(str(exc)) from None


# --- options more than one program takes ----------------------------------------------------------

log_level_option = click.option("--log-level", type=click.Choice(LEVELS), default="info", show_default=True)
log_json_option = click.option("--log-json/--log-console", default=None, help="JSON lines (default when stderr is not a terminal).")
null_model_option = click.option("--null-model", is_flag=True, help="Workers run no model and answer fixed tokens (gateway benchmarks).")
