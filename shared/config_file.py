"""The TOML configuration file (`pagedd --config /etc/paged/paged.toml <command>`).

Every option of `pagedd` and of its commands can be set in the file, under the option's
destination name (the Struct field's name for the settings generated from shared/config.py:
`--max-num-seqs` → `max_num_seqs`, `--no-prefix-caching` → `enable_prefix_caching = false`;
`gateway --worker` → `endpoints`, `serve --workers` → `num_workers`):

- top-level keys: the options of `pagedd` itself (`log_level`, `log_json`), and defaults for every
  command that has an option of that name;
- a table per command (`[serve]`, `[gateway]`, `[worker]`, `[generate]`): that command's options,
  winning over the top level.

The file fills click's default_map, so flags on the command line (and the environment variables
some options read) override it. Validation goes through a msgspec Struct derived from the commands'
options, typed by the config Structs' own fields, then through each option's click type: an
unknown key or a wrong type is an error naming the key.
"""

from __future__ import annotations

import re
import tomllib
import typing
from pathlib import Path
from typing import Any, Literal

import click
import msgspec

from paged.shared.cli_options import BYTE_FIELDS
from paged.shared.config import CacheConfig, HttpConfig, ModelConfig, SchedulerConfig

CONFIG_STRUCTS = (ModelConfig, CacheConfig, SchedulerConfig, HttpConfig)
_STRUCT_FIELD_TYPES = {field.name: field.type for struct in CONFIG_STRUCTS for field in msgspec.structs.fields(struct)}


class ConfigFileError(Exception):
    """The file cannot be used; the message is one line naming the file and the key."""


def _option_type(param: click.Parameter) -> Any:
    """The TOML value type of one option: the config Struct's field type where the option comes
    from one, else what the option's click type accepts."""
    if param.name in BYTE_FIELDS:
        value_type: Any = int | str  # 4294967296 or "4GiB"
    elif param.name in _STRUCT_FIELD_TYPES:
        value_type = _STRUCT_FIELD_TYPES[param.name]
    elif isinstance(param, click.Option) and param.is_bool_flag:
        value_type = bool
    elif isinstance(param.type, click.Choice):
        value_type = Literal[tuple(param.type.choices)]  # type: ignore[misc]
    elif isinstance(param.type, click.types.IntParamType):
        value_type = int
    elif isinstance(param.type, click.types.FloatParamType):
        value_type = float
    else:
        value_type = str
    return list[value_type] if param.multiple else value_type  # type: ignore[valid-type]


def _options(command: click.Command) -> list[click.Parameter]:
    return [p for p in command.params if p.expose_value and p.name and isinstance(p, click.Option)]


def _schema(group: click.Group) -> type[msgspec.Struct]:
    """The file's layout as a Struct: the group's options, every command's options at the top
    level, and a table per command holding only that command's options."""
    top: dict[str, Any] = {}
    tables = {}
    for name, command in group.commands.items():
        options = {p.name: _option_type(p) for p in _options(command)}
        tables[name] = msgspec.defstruct(f"{name}_options", [(k, t, msgspec.UNSET) for k, t in options.items()], forbid_unknown_fields=True)
        for key, value_type in options.items():
            top.setdefault(key, value_type)
    top.update({p.name: _option_type(p) for p in _options(group)})  # type: ignore[misc]
    fields = [(k, t, msgspec.UNSET) for k, t in top.items()] + [(k, t, msgspec.UNSET) for k, t in tables.items()]
    return msgspec.defstruct("paged_toml", fields, forbid_unknown_fields=True)


def _describe(error: msgspec.ValidationError) -> str:
    """msgspec's `Expected `int`, got `str` - at `$.serve.port`` as `serve.port: expected `int`, got `str``."""
    match = re.fullmatch(r"(.*?)(?: - at `\$\.?(.*)`)?", str(error), flags=re.DOTALL)
    assert match is not None  # the pattern matches any text
    what, where = match.group(1), match.group(2) or ""
    unknown = re.fullmatch(r"Object contains unknown field `(.*)`", what)
    if unknown:
        key = f"{where}.{unknown.group(1)}" if where else unknown.group(1)
        return f"{key}: unknown key (not an option of {'pagedd ' + where if where else 'any pagedd command'})"
    return f"{where}: {what[0].lower()}{what[1:]}" if where else what


def read_config_file(path: Path, group: click.Group) -> dict[str, Any]:
    """Parse and validate the file into click's default_map for `group` (one dict per command)."""
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigFileError(f"{path}: file not found") from None
    except OSError as exc:
        raise ConfigFileError(f"{path}: cannot read ({exc.strerror})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigFileError(f"{path}: not valid TOML: {exc}") from None
    try:
        msgspec.convert(raw, _schema(group))
    except msgspec.ValidationError as exc:
        raise ConfigFileError(f"{path}: {_describe(exc)}") from None
    default_map: dict[str, Any] = {p.name: raw[p.name] for p in _options(group) if p.name in raw}  # type: ignore[index]
    for name, command in group.commands.items():
        flat = {p.name: raw[p.name] for p in _options(command) if p.name in raw}  # type: ignore[index]
        values = {**flat, **raw.get(name, {})}
        _check_values(path, name, command, values)
        default_map[name] = values
    return default_map


def _check_values(path: Path, command_name: str, command: click.Command, values: dict[str, Any]) -> None:
    """Run each value through its option's click type (ranges, sizes like "4GiB")."""
    context = click.Context(command, info_name=command_name)
    params = {p.name: p for p in _options(command)}
    for key, value in values.items():
        try:
            params[key].type_cast_value(context, value)
        except click.BadParameter as exc:
            raise ConfigFileError(f"{path}: {command_name}.{key}: {exc.message}") from None


# --- the `pagedd --config FILE` and `pagedd --check-config FILE` options ------------------------------

CONFIG_PATH_KEY = "paged.config_file"


def use_config_file(context: click.Context, _param: click.Parameter, path: Path | None) -> None:
    """Eager callback of `--config`: the file becomes the default_map of `pagedd` and its commands."""
    if path is None:
        return
    try:
        context.default_map = read_config_file(path, typing.cast(click.Group, context.command))
    except ConfigFileError as exc:
        raise click.ClickException(str(exc)) from None
    context.meta[CONFIG_PATH_KEY] = path


def check_config_file(context: click.Context, _param: click.Parameter, path: Path | None) -> None:
    """Eager callback of `--check-config`: validate, say so in one line, exit 0 or 1."""
    if path is None:
        return
    try:
        read_config_file(path, typing.cast(click.Group, context.command))
    except ConfigFileError as exc:
        click.echo(f"error: {exc}", err=True)
        context.exit(1)
    click.echo(f"{path}: ok")
    context.exit(0)


config_file_option = click.option(
    "--config", type=click.Path(dir_okay=False, path_type=Path), is_eager=True, expose_value=False, callback=use_config_file,
    help="TOML file setting any option (top level, or a [serve]/[gateway]/[worker] table); flags override it.",
)  # fmt: skip
check_config_option = click.option(
    "--check-config", type=click.Path(dir_okay=False, path_type=Path), is_eager=True, expose_value=False, callback=check_config_file,
    help="Validate this configuration file, print one line and exit (0: valid, 1: not).",
)  # fmt: skip


def config_file_path(context: click.Context) -> Path | None:
    """The --config file of the running `pagedd` (None without one)."""
    return context.find_root().meta.get(CONFIG_PATH_KEY)
