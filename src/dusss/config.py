"""Typed configs: dataclasses loaded from YAML, validated (unknown keys, types, ranges), overridable.

Every run section is a dataclass; nested dataclasses are nested YAML mappings. `load_config` rejects
unknown keys and wrong types before any work starts. Numeric ranges are declared once, on the field:
`lr: float = bounded(3e-4, gt=0, le=10)`; `check_fields` checks every numeric field (finite, and inside its
bounds) and is the one place both paths go through: `from_dict` (YAML files, CLI flags, checkpoint sidecars)
before building the dataclass, and each dataclass's `__post_init__` (direct construction). `__post_init__`
keeps only the checks that relate fields to each other or pick among names.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import yaml

from dusss.errors import ConfigError

T = TypeVar("T")

# Upper bounds shared by the run configs: generous, but finite, so that a typo fails at once with a clear
# message instead of as a MemoryError or an epoch loop that never ends.
MAX_IMAGE_SIZE = 4096  # pixels per side of the network input (4096² x batch already fills a large GPU)
MAX_EPOCHS = 100_000
MAX_BATCH = 65_536
MAX_GRAD_ACCUM = 4096
MAX_LR = 10.0
MAX_WEIGHT = 1000.0  # loss weights and similar multipliers
MAX_SEED = 2**31 - 1
MAX_WORKERS = 256
MAX_THREADS = 1024

BOUNDS_KEY = "bounds"  # dataclass field metadata key holding a `Bounds`


class FieldError(ConfigError):
    """A ConfigError about one field; `key` is its dotted path from the root config ("semi.ema_decay")."""

    def __init__(self, key: str, message: str) -> None:
        self.key = key
        super().__init__(message)


@dataclass(frozen=True)
class Bounds:
    """The allowed range of a numeric field: `lo`..`hi`, each end closed unless `*_open`; None = unbounded."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False

    def contains(self, value: float) -> bool:
        """True when `value` lies inside the range."""
        if self.lo is not None and (value <= self.lo if self.lo_open else value < self.lo):
            return False
        return not (self.hi is not None and (value >= self.hi if self.hi_open else value > self.hi))

    def describe(self) -> str:
        """'in [0, 1)', '> 0', '<= 10' or '' (unbounded)."""
        if self.lo is not None and self.hi is not None:
            return f"in {'(' if self.lo_open else '['}{_num(self.lo)}, {_num(self.hi)}{')' if self.hi_open else ']'}"
        if self.lo is not None:
            return f"{'>' if self.lo_open else '>='} {_num(self.lo)}"
        if self.hi is not None:
            return f"{'<' if self.hi_open else '<='} {_num(self.hi)}"
        return ""


def _num(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else f"{v:g}"


def bounded(default: Any = dataclasses.MISSING, *, ge: float | None = None, gt: float | None = None,
            le: float | None = None, lt: float | None = None) -> Any:
    """A dataclass field (default `default`) whose number, or each number of its list, must be finite and
    >= ge / > gt and <= le / < lt; None values (optional fields) and booleans are not checked."""
    if ge is not None and gt is not None or le is not None and lt is not None:
        raise ValueError("give at most one lower bound (ge|gt) and one upper bound (le|lt)")
    bounds = Bounds(lo=gt if gt is not None else ge, hi=lt if lt is not None else le,
                    lo_open=gt is not None, hi_open=lt is not None)
    return dataclasses.field(default=default, metadata={BOUNDS_KEY: bounds})


def _value_problem(value: Any, bounds: Bounds | None) -> str | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    desc = bounds.describe() if bounds is not None else ""
    if isinstance(value, float) and not math.isfinite(value):
        return f"must be a finite number{' ' + desc if desc else ''}"
    if bounds is not None and not bounds.contains(value):
        return f"must be {desc}"
    return None


def check_values(cls: type, values: Mapping[str, Any], where: str = "") -> None:
    """Range-check the numeric `values` of fields of dataclass `cls` (see `bounded`); FieldError naming the
    first bad field as `where.name` (nested dataclasses check their own fields)."""
    for f in dataclasses.fields(cls):
        if f.name not in values:
            continue
        value = values[f.name]
        bounds = f.metadata.get(BOUNDS_KEY)
        key = f"{where}.{f.name}" if where else f.name
        items = list(enumerate(value)) if isinstance(value, (list, tuple)) else [(None, value)]
        for i, item in items:
            problem = _value_problem(item, bounds)
            if problem:
                shown = key if i is None else f"{key}[{i}]"
                raise FieldError(key, f"{shown} {problem}, got {item!r}")


def check_fields(cfg: Any, where: str = "") -> None:
    """Range-check every numeric field of the dataclass instance `cfg` (call it first in `__post_init__`)."""
    check_values(type(cfg), {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}, where)


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise FieldError(where, errors[0] if errors else f"{where}: invalid value {value!r}")
    if origin is typing.Literal:
        if value not in args:
            raise FieldError(where, f"{where}: {value!r} is not one of {list(args)}")
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise FieldError(where, f"{where}: expected a mapping, got {type(value).__name__}")
        return from_dict(tp, value, where)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise FieldError(where, f"{where}: expected a list, got {type(value).__name__}")
        inner = args[0] if args else Any
        items = [_coerce(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict:
        if not isinstance(value, dict):
            raise FieldError(where, f"{where}: expected a mapping, got {type(value).__name__}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise FieldError(where, f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise FieldError(where, f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise FieldError(where, f"{where}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, Path):
            return str(value)
        raise FieldError(where, f"{where}: expected a string, got {value!r}")
    return value


def from_dict(cls: type[T], data: dict[str, Any], where: str = "config") -> T:
    """Build dataclass `cls` from a mapping; unknown keys, wrong types and numbers out of their `bounded`
    range raise ConfigError (a FieldError naming `where.key`; `where=""` at a root)."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{where + ': ' if where else ''}unknown key(s) {unknown}; allowed: {sorted(names)}")
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}" if where else k) for k, v in data.items()}
    check_values(cls, kwargs, where)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where + ': ' if where else ''}{exc}") from None


def to_dict(cfg: Any) -> dict[str, Any]:
    """Dataclass -> plain dict (for YAML/JSON)."""
    return dataclasses.asdict(cfg)


def set_path(data: dict[str, Any], dotted: str, value: Any) -> None:
    """Set `a.b.c = value` inside nested dicts (CLI overrides)."""
    keys = dotted.split(".")
    cur = data
    for k in keys[:-1]:
        cur = cur.setdefault(k, {})
        if not isinstance(cur, dict):
            raise ConfigError(f"override {dotted}: {k} is not a section")
    cur[keys[-1]] = value


def packaged_configs() -> dict[str, Path]:
    """The YAML configs shipped inside the package (`dusss/configs/*.yaml`), by file name without `.yaml`."""
    from importlib.resources import files

    folder = Path(str(files("dusss") / "configs"))
    return {f.stem: f for f in sorted(folder.glob("*.yaml"))} if folder.is_dir() else {}


def resolve_config(path: str | Path) -> Path:
    """The config file `path`, or the packaged config of that name (`train_paper_monuseg` or
    `train_paper_monuseg.yaml`, no folder part) when no such file exists. ConfigError otherwise."""
    p = Path(path)
    if p.is_file():
        return p
    shipped = packaged_configs()
    if p.parent == Path(".") and p.name.removesuffix(".yaml") in shipped:
        return shipped[p.name.removesuffix(".yaml")]
    names = ", ".join(shipped) or "none"
    raise ConfigError(f"{p}: config file not found (packaged configs, usable by name: {names})")


def parse_overrides(items: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """`["a.b=1", "c=x"]` (the CLI's `--set KEY=VALUE`) -> {"a.b": 1, "c": "x"}; each value is read as a YAML
    scalar (`1e-3`, `true`, `null`, `[1, 2]`); a later item wins. ConfigError names an item without `=` or key."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE with a dotted config key (e.g. semi.ema_decay=0.99)")
        try:
            value = yaml.safe_load(text) if text.strip() else ""
        except yaml.YAMLError:
            raise ConfigError(f"--set {item!r}: the value is not a YAML scalar") from None
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string; a user means the number
            for number in (int, float):
                try:
                    value = number(value)
                    break
                except ValueError:
                    pass
        out[key] = value
    return out


def load_config(cls: type[T], path: str | Path | None = None, overrides: dict[str, Any] | None = None,
                presets: dict[str, Any] | None = None, sets: dict[str, Any] | None = None) -> T:
    """Defaults of `cls`, then dotted `presets`, then the YAML file at `path`, then dotted `overrides`
    (None values ignored: a flag not given), then dotted `sets` (`--set KEY=VALUE`, None included). Every
    field is checked (type, range) before anything runs; a bad value that came from the file is reported
    with the file's name."""
    data: dict[str, Any] = to_dict(cls())
    for key, value in (presets or {}).items():
        set_path(data, key, value)
    from_file: set[str] = set()
    if path is not None:
        p = resolve_config(path)
        try:
            loaded = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{p}: not valid YAML ({str(exc).splitlines()[0]})") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p}: top level must be a mapping")
        _deep_update(data, loaded, str(p))
        from_file = _dotted_keys(loaded)
    flagged: set[str] = set()
    for key, value in (overrides or {}).items():
        if value is not None:
            set_path(data, key, value)
            flagged.add(key)
    for key, value in (sets or {}).items():
        set_path(data, key, value)
        flagged.add(key)
    try:
        return from_dict(cls, data, "config")
    except FieldError as exc:
        key = exc.key.removeprefix("config.")
        if path is not None and key in from_file and key not in flagged:
            raise ConfigError(f"{p}: {exc}") from None
        raise


def _dotted_keys(data: dict[str, Any], prefix: str = "") -> set[str]:
    out: set[str] = set()
    for k, v in data.items():
        key = f"{prefix}{k}"
        out.add(key)
        if isinstance(v, dict):
            out |= _dotted_keys(v, key + ".")
    return out


def _deep_update(base: dict[str, Any], new: dict[str, Any], where: str) -> None:
    for k, v in new.items():
        if k not in base:
            raise ConfigError(f"{where}: unknown key {k!r}; allowed: {sorted(base)}")
        if isinstance(base[k], dict) and isinstance(v, dict):
            _deep_update(base[k], v, f"{where}.{k}")
        else:
            base[k] = v


def save_config(cfg: Any, path: str | Path) -> None:
    """Write the resolved config as YAML."""
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def check(cond: bool, message: str) -> None:
    """Range check for `__post_init__`: raise ConfigError(message) unless cond."""
    if not cond:
        raise ConfigError(message)
