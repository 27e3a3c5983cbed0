"""The one config layer of every entry point (train.py, eval.py, packing.pack, rewrite, scripts/demo.py,
benchmarks): a typed dataclass per CLI, read from defaults <- a YAML file (`--config FILE`) <- alias flags
(`--out X`, where a CLI keeps them) <- repeated `--set key=value`.

Every field is declared with `option(default, help="one line")`; `--help` lists every key with its default
and that line. An unknown key or a bad value (wrong type, not one of `choices`, a failed `validate()`)
is one line on stderr naming the key and where it came from (the YAML file, `--set`, or the flag), and
exit status 2, without a traceback.

    @dataclasses.dataclass
    class MyConfig:
        out: str = option("results/x", help="where the result goes")
        mode: str = option("fast", help="how", choices=("fast", "slow"))
        pools: list = option(factory=lambda: ["a", "b"], help="names")

    cfg, args = parse(MyConfig, build_parser(MyConfig, "python -m x", __doc__, flags=["out"]), argv)
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import difflib
import sys
import types
import typing
from pathlib import Path

import yaml

EXIT_USAGE = 2
_MISSING = dataclasses.MISSING


def option(default=_MISSING, *, help: str, choices=None, factory=None, flag: str | None = None):
    """A config field: its default (or `factory` for a mutable one), one line of meaning for --help,
    the values allowed (`choices`), and optionally the name of its command-line alias flag."""
    metadata = {"help": help, "choices": tuple(choices) if choices is not None else None, "flag": flag}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


class ConfigError(ValueError):
    """A bad key or value; `source` is where it came from (a file path, `--set`, a flag)."""

    def __init__(self, key: str, message: str, source: str | None = None, unknown: bool = False):
        self.key, self.message, self.source, self.unknown = key, message, source, unknown
        super().__init__(key, message, source)

    def __str__(self):
        where = f" from {self.source}" if self.source else ""
        if self.unknown:
            return f"unknown config key {self.key!r}{where}{self.message}"
        return f"config key {self.key!r}{where}: {self.message}"


# ----------------------------------------------------------------------------- values

def _hint_name(hint) -> str:
    if isinstance(hint, type):
        return hint.__name__
    return str(hint).replace("typing.", "")


def coerce(value, hint, key: str):
    """A YAML / command-line value -> the field's type (YAML reads 1e-3 as a string). Raises ConfigError."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("null", "none", "~")):
            return None
        return coerce(value, args[0], key)
    origin = origin or hint
    try:
        if origin is bool:
            if isinstance(value, str):
                if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError(value)
                return value.lower() in ("true", "1", "yes")
            if not isinstance(value, (bool, int)):
                raise ValueError(value)
            return bool(value)
        if origin in (int, float):
            if isinstance(value, (bool, list, dict, tuple)) or value is None:
                raise ValueError(value)
            if origin is int and isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            if origin is int and isinstance(value, str) and "e" in value.lower():
                number = float(value)
                if not number.is_integer():
                    raise ValueError(value)
                return int(number)
            return origin(value)
        if origin is str:
            if isinstance(value, (list, dict, tuple)) or value is None:
                raise ValueError(value)
            return str(value)
        if origin is tuple:
            value = yaml.safe_load(value) if isinstance(value, str) else value
            return tuple(float(v) for v in value)
        if origin is list:
            if isinstance(value, str):
                parsed = yaml.safe_load(value)
                value = parsed if isinstance(parsed, list) else _split(value)
            if not isinstance(value, (list, tuple)):
                raise ValueError(value)
            (item,) = typing.get_args(hint) or (None,)
            return [coerce(v, item, key) for v in value] if item is not None else list(value)
        if origin is dict:
            value = yaml.safe_load(value) if isinstance(value, str) else value
            if not isinstance(value, dict):
                raise ValueError(value)
            return value
    except (TypeError, ValueError, yaml.YAMLError) as err:
        if isinstance(err, ConfigError):
            raise
        raise ConfigError(key, f"cannot read {value!r} as {_hint_name(hint)}") from err
    return value


def _split(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def fields(cls) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


def _unknown(key: str, known, source: str) -> ConfigError:
    close = difflib.get_close_matches(key, list(known), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else " (--help lists the keys)"
    return ConfigError(key, hint, source, unknown=True)


def read_yaml(path: str) -> dict:
    """A config file's mapping; a missing, unreadable or malformed file is one ConfigError."""
    try:
        loaded = yaml.safe_load(Path(path).read_text())
    except OSError as err:
        raise ConfigError("--config", f"cannot read {path}: {err.strerror or err}", path) from err
    except yaml.YAMLError as err:
        flat = " ".join(str(err).split())
        raise ConfigError("--config", f"not valid YAML: {flat}", path) from err
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError("--config", "expected a mapping of config keys", path)
    return loaded


def load(cls, path: str | None = None, sets=(), flags=None):
    """Defaults <- YAML file <- flags {key: (value, flag)} <- `key=value` overrides, each value typed and
    checked where it is read; then `cls.validate()` if it has one. Raises ConfigError naming the source."""
    hints = typing.get_type_hints(cls)
    known = fields(cls)
    values, sources = {}, {}

    def put(key, value, source):
        if key not in known:
            raise _unknown(key, known, source)
        try:
            values[key] = check(known[key], coerce(value, hints[key], key))
        except ConfigError as err:
            err.source = err.source or source
            raise ConfigError(err.key, err.message, err.source, err.unknown) from None
        sources[key] = source

    if path:
        for key, value in read_yaml(path).items():
            put(str(key), value, path)
    for key, (value, source) in (flags or {}).items():
        put(key, value, source)
    for item in sets:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep:
            raise ConfigError(item, "expected key=value", "--set")
        if key not in known:
            raise _unknown(key, known, "--set")
        is_str = _is_str(hints[key])
        put(key, raw if is_str else _yaml_scalar(raw, key), "--set")
    cfg = cls(**values)
    validate = getattr(cfg, "validate", None)
    if validate is not None:
        try:
            validate()
        except ConfigError as err:
            raise ConfigError(err.key, err.message, err.source or sources.get(err.key, "the defaults"),
                              err.unknown) from None
    return cfg


def _is_str(hint) -> bool:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return args == [str]
    return hint is str


def _yaml_scalar(raw: str, key: str):
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw  # coerce then names the key and the type it expected


def check(field: dataclasses.Field, value):
    choices = field.metadata.get("choices")
    if choices is not None and value is not None:
        for v in (value if isinstance(value, list) else [value]):
            if v not in choices:
                raise ConfigError(field.name, f"{v!r} is not one of {', '.join(map(str, choices))}")
    return value


def as_dict(cfg) -> dict:
    """The config as plain YAML/JSON values (tuples become lists)."""
    out = dataclasses.asdict(cfg)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}


# ----------------------------------------------------------------------------- command line

def _flag_of(f: dataclasses.Field) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def keys_help(cls) -> str:
    """`--help`'s listing: every key with its type, default and one line of meaning."""
    hints = typing.get_type_hints(cls)
    lines = ["config keys (YAML file via --config, or --set key=value; later wins):"]
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not _MISSING else (
            f.default_factory() if f.default_factory is not _MISSING else "(required)")
        default = yaml.safe_dump(list(default) if isinstance(default, tuple) else default,
                                 default_flow_style=True, width=10 ** 6).strip()
        default = default[:-4] if default.endswith("\n...") else default.removesuffix("...").strip()
        choices = f.metadata.get("choices")
        extra = f" [{'|'.join(map(str, choices))}]" if choices else ""
        lines.append(f"  {f.name} = {default}  ({_hint_name(hints[f.name])}){extra}: "
                     f"{f.metadata.get('help', '')}")
    return "\n".join(lines)


def build_parser(cls, prog: str, description: str | None = None, flags=(), epilog: str | None = None,
                 config_help: str | None = None) -> argparse.ArgumentParser:
    """--config and --set for `cls`, plus an alias flag for each field in `flags` ("all": every field;
    "declared": those declaring a `flag`), named --kebab-case or as the field's `flag` metadata. Add a CLI's
    other arguments to the result."""
    p = argparse.ArgumentParser(prog=prog, description=description,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=keys_help(cls) + (f"\n\n{epilog}" if epilog else ""))
    p.add_argument("--config", metavar="FILE", help=config_help or "YAML file of config keys (listed below)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="set one config key (repeatable; after --config and the flags)")
    hints = typing.get_type_hints(cls)
    if flags == "all":
        chosen = dataclasses.fields(cls)
    elif flags == "declared":  # the fields that name their flag: `option(..., flag="--batch-size")`
        chosen = [f for f in dataclasses.fields(cls) if f.metadata.get("flag")]
    else:
        chosen = [fields(cls)[name] for name in flags]
    for f in chosen:
        hint = hints[f.name]
        dest = f"config:{f.name}"
        base = typing.get_origin(hint) or hint
        if typing.get_origin(hint) in (typing.Union, types.UnionType):
            base = [a for a in typing.get_args(hint) if a is not type(None)][0]
            base = typing.get_origin(base) or base
        help_ = f"= --set {f.name}=..."
        if base is bool:
            p.add_argument(_flag_of(f), dest=dest, action=argparse.BooleanOptionalAction, default=None,
                           help=help_)
        elif base is list:
            p.add_argument(_flag_of(f), dest=dest, action="extend", nargs="+", default=None, metavar="V",
                           help=help_ + " (space- or comma-separated)")
        else:
            p.add_argument(_flag_of(f), dest=dest, default=None, metavar="V", help=help_)
    return p


def flag_values(cls, args: argparse.Namespace) -> dict:
    """{key: (value, flag)} of the alias flags given on the command line."""
    out = {}
    for f in dataclasses.fields(cls):
        value = getattr(args, f"config:{f.name}", None)
        if isinstance(value, list):  # a list key's flag takes items space- or comma-separated
            value = [item for v in value for item in _split(v)]
        if value is not None:
            out[f.name] = (value, _flag_of(f))
    return out


def merged(base: dict, override: dict) -> dict:
    """A new dict: `override` over `base`, nested dicts merged key by key (model_overrides={vision_cfg:
    {qk_norm: true}} keeps the other vision keys); nothing of either is shared with the result."""
    out = copy.deepcopy(base)
    for k, v in override.items():
        out[k] = merged(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def fail(prog: str, err: Exception) -> typing.NoReturn:
    """One line on stderr, exit status 2."""
    print(f"{prog}: error: {err}", file=sys.stderr, flush=True)
    raise SystemExit(EXIT_USAGE)


def parse(cls, parser: argparse.ArgumentParser, argv=None):
    """argv -> (config, argparse namespace); a config problem is fail()'s one line and exit 2."""
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        cfg = load(cls, args.config, args.set, flag_values(cls, args))
    except ConfigError as err:
        fail(parser.prog, err)
    return cfg, args

