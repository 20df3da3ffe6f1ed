"""Stage configs: frozen dataclasses whose fields are the CLI flags and the config-file keys.

Precedence is defaults < config file (YAML or JSON) < CLI flags. Unknown keys are an error, and
``__post_init__`` checks collect every problem before raising once (:func:`check`).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import typing
from pathlib import Path
from typing import Any

import yaml

from pipeline.errors import DistillError


def option(default: Any, help: str) -> Any:
    """A config field with its help text (shown by ``--help`` and in the docs)."""
    if isinstance(default, (list, dict, set)):
        raise TypeError("use a tuple for sequence defaults so configs stay immutable")
    return dataclasses.field(default=default, metadata={"help": help})


FLAG_ALIASES = {"inputs": "--input"}  # fields whose flag is not --field-name


def flag(field: str) -> str:
    """The command-line flag of a config field."""
    return FLAG_ALIASES.get(field, "--" + field.replace("_", "-"))


def required(config: Any, *fields: str) -> list[str]:
    """The ``__post_init__`` problem ``no --flag given`` for each of ``fields`` left empty."""
    return [f"no {flag(name)} given" for name in fields if not getattr(config, name)]


def array_job_problems(shard_index: int, num_shards: int, overwrite: bool, output: str) -> list[str]:
    """The ``__post_init__`` problems of a stage run as job ``shard_index`` of ``num_shards`` (a SLURM
    array) into one ``output``: the index out of range, or --overwrite where jobs share the output."""
    problems = [] if num_shards >= 1 else ["num_shards must be at least 1"]
    if not 0 <= shard_index < max(num_shards, 1):
        problems.append(f"shard_index must be in [0, {num_shards}), got {shard_index}")
    if overwrite and num_shards > 1:
        problems.append("--overwrite with --num-shards > 1 would let jobs delete each other's work; "
                        f"delete the {output} once before launching the array")
    return problems


def check(problems: list[str], name: str) -> None:
    """Raise one :class:`DistillError` naming every problem found by a ``__post_init__``."""
    if problems:
        raise DistillError(f"invalid {name} config: " + "; ".join(problems))


def split_list(items: str | typing.Iterable[str]) -> tuple[str, ...]:
    """A comma-separated list, from a flag given once or repeated, or from a config file:
    ``"a, b"`` or ``["a,b", "c"]`` → ``("a", "b", "c")``."""
    if isinstance(items, str):
        items = [items]
    return tuple(x.strip() for item in items for x in item.split(",") if x.strip())


def field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _coerce(name: str, value: Any, hint: Any, where: str = "") -> Any:
    """Turn a config-file or flag value into the field's type (YAML gives lists where fields hold
    tuples). ``where`` names the source in errors: ``config file F: key 'k'`` or ``option --k``."""
    where = where or f"config key '{name}'"
    origin = typing.get_origin(hint)
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if value is None:
        return None
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)) and len(args) == 1:
        return _coerce(name, value, args[0], where)
    if origin is tuple:
        if isinstance(value, str):
            value = split_list(value)
        if not isinstance(value, (list, tuple)):
            raise DistillError(f"{where} must be a list, got {value!r}")
        return tuple(_coerce(name, v, args[0], where) for v in value)
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise DistillError(f"{where} must be true or false, got {value!r}")
    if hint in (int, float, str):
        try:
            # YAML's true/false, lists and mappings are never numbers or paths (int(True) would be 1)
            if isinstance(value, (bool, list, tuple, dict)):
                raise ValueError
            if hint is int and isinstance(value, float) and not value.is_integer():
                raise ValueError
            return hint(value)
        except (TypeError, ValueError):
            raise DistillError(f"{where} must be {hint.__name__}, got {value!r}") from None
    return value


def _unknown_keys(unknown: list[str], known: list[str]) -> str:
    """``a (did you mean 'b'?), c; rename or remove them (known keys: …)``: each unknown key with the
    closest known one, and the known keys listed where some unknown key has none close to it."""
    parts, guessed = [], 0
    for key in unknown:
        close = difflib.get_close_matches(key, known, n=1)
        parts.append(f"{key} (did you mean '{close[0]}'?)" if close else key)
        guessed += bool(close)
    listed = "" if guessed == len(unknown) else f" (known keys: {', '.join(known)})"
    return f"{', '.join(parts)}; rename or remove {'them' if len(unknown) > 1 else 'it'}{listed}"


def read_config_file(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise DistillError(f"config file {path} does not exist; check the --config path")
    kind = "YAML" if path.suffix in (".yaml", ".yml") else "JSON"
    try:
        text = path.read_text(encoding="utf-8")
        data = yaml.safe_load(text) if kind == "YAML" else json.loads(text)
    except UnicodeDecodeError as e:
        raise DistillError(f"config file {path} is not UTF-8 text (byte {e.start}); "
                           "pass a YAML (.yaml, .yml) or JSON file") from None
    except (yaml.YAMLError, json.JSONDecodeError) as e:
        raise DistillError(f"config file {path} does not parse as {kind}: {str(e).splitlines()[0]}; "
                           "fix it (YAML for .yaml/.yml, JSON otherwise)") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise DistillError(f"config file {path} holds a {type(data).__name__}, not a mapping; "
                           "write one `option_name: value` per line")
    return data


def load_config(cls: type, config_file: str | os.PathLike | None = None, **overrides: Any):
    """Build ``cls`` from defaults, then ``config_file``, then ``overrides`` (``None`` means unset)."""
    types = field_types(cls)
    values: dict[str, Any] = {}
    if config_file is not None:
        raw = read_config_file(config_file)
        unknown = sorted(set(raw) - set(types), key=str)
        if unknown:
            raise DistillError(f"config file {config_file} has unknown key{'s' if len(unknown) > 1 else ''} "
                               + _unknown_keys([str(k) for k in unknown], list(types)))
        values.update({k: _coerce(k, v, types[k], f"config file {config_file}: key '{k}'") for k, v in raw.items()})
    unknown = sorted(set(overrides) - set(types))
    if unknown:
        raise DistillError(f"unknown options {', '.join(unknown)} for {cls.__name__}")
    values.update({k: _coerce(k, v, types[k], f"option {flag(k)}") for k, v in overrides.items() if v is not None})
    return cls(**values)


def to_dict(config: Any) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(config).items()}


def save_resolved(config: Any, path: str | os.PathLike, extra: dict[str, Any] | None = None) -> None:
    """Write the resolved config (and any facts found at run time) beside a stage's output, atomically."""
    from pipeline.io import atomic_write_text

    body = {"stage": type(config).__name__, "config": to_dict(config)}
    if extra:
        body.update(extra)
    atomic_write_text(Path(path), json.dumps(body, indent=2, sort_keys=True) + "\n")
