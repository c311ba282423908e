"""Options declared once: dataclass fields -> command-line flags, and one KEY=VALUE syntax.

Every setting is one dataclass field with its default and ``metadata``:

* ``help``: the flag's help text (the default is appended);
* ``group``: the ``--help`` section it is listed under;
* ``flag``: the flag's name when it is not ``--field-name`` (``progress`` -> ``--no-progress``);
* ``cli=False``: settable from a YAML preset or ``--set`` only (dicts such as ``objective_options``).

``add_dataclass_arguments`` turns those fields into argparse arguments whose default is
``argparse.SUPPRESS``, so ``vars(args)`` holds only what the user typed and one resolver
(``config.resolve_config``) can merge defaults < preset < flags < a resumed run's record.
``parse_assignments`` reads ``KEY=VALUE`` items (``--opt``, ``--set``, ``objective@k=v``);
``coerce_field`` converts a string to a field's type.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any, Iterable

import yaml

SUPPRESS = argparse.SUPPRESS


class OptionError(ValueError):
    """A malformed option on the command line; the message names it and the fix."""


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """argparse's defaults formatter, minus the "(default: None)" of options whose help already says what
    an absent value means."""

    def _get_help_string(self, action):
        if action.default is None:
            return action.help
        return super()._get_help_string(action)


def _base_type(f: dataclasses.Field) -> str:
    """``'float | None'`` -> ``'float'`` (annotations are strings under ``from __future__ import annotations``)."""
    t = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    parts = [p.strip() for p in t.split("|") if p.strip() != "None"]
    base = parts[0] if parts else "str"
    return base.split("[")[0]


def coerce_field(f: dataclasses.Field, value: Any) -> Any:
    """A command-line string (or YAML value) as the type of field ``f``; errors name the field."""
    if not isinstance(value, str):
        if _base_type(f) == "tuple" and isinstance(value, list):
            return tuple(value)
        if _base_type(f) == "float" and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        return value
    base = _base_type(f)
    if value.lower() in ("none", "null") and (f.default is None or "None" in str(f.type)):
        return None
    try:
        if base == "bool":
            if value.lower() in ("1", "true", "yes", "on"):
                return True
            if value.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if base == "int":
            return int(value)
        if base == "float":
            return float(value)
        if base == "tuple":
            return tuple(_literal(v.strip()) for v in value.split(",") if v.strip())
        if base == "dict":
            parsed = yaml.safe_load(value)
            if not isinstance(parsed, dict):
                raise ValueError
            return parsed
    except (ValueError, yaml.YAMLError):
        raise OptionError(f"{f.name}: cannot read {value!r} as {base}") from None
    return value


def _literal(value: str):
    try:
        return yaml.safe_load(value)
    except yaml.YAMLError:
        return value


def parse_assignments(items: Iterable[str] | None, flag: str, example: str = "key=value") -> dict[str, str]:
    """``["a=1", "b-c=x"]`` -> ``{"a": "1", "b_c": "x"}``: the one KEY=VALUE syntax of every command.

    Values stay strings; the dataclass that receives them converts each to its field's type.
    """
    out: dict[str, str] = {}
    for item in items or []:
        if "=" not in item:
            raise OptionError(f"{flag} {item!r}: expected KEY=VALUE, e.g. {flag} {example}")
        key, value = item.split("=", 1)
        out[key.strip().replace("-", "_")] = value.strip()
    return out


def flag_name(f: dataclasses.Field, prefix: str = "", flags: dict | None = None) -> str:
    name = (flags or {}).get(f.name) or f.metadata.get("flag")
    if name:
        return name if not prefix else "--" + prefix + name.lstrip("-")
    return f"--{prefix}{f.name.replace('_', '-')}"


def add_dataclass_arguments(parser, cls, include: Iterable[str] | None = None, exclude: Iterable[str] = (),
                            prefix: str = "", groups: bool = True, default=SUPPRESS,
                            help_defaults: dict | None = None, helps: dict | None = None,
                            sections: dict | None = None, required: Iterable[str] = (),
                            flags: dict | None = None) -> list[str]:
    """Add one argument per field of dataclass ``cls``; returns the ``dest`` names added.

    ``default=SUPPRESS`` (the default) leaves fields the user did not type out of ``vars(args)``;
    ``include``/``exclude`` pick fields; ``prefix`` ("ft-") namespaces the flags and dests;
    ``help_defaults``/``helps`` replace the default shown / the help text of some fields;
    ``sections`` maps group titles to argument groups the caller already made; ``required``
    names fields the command cannot do without; ``flags`` renames some fields' flags.
    """
    fields = [f for f in dataclasses.fields(cls) if f.metadata.get("cli", True)
              and f.name not in set(exclude) and (include is None or f.name in set(include))]
    if include is not None:  # keep the caller's order
        order = list(include)
        fields.sort(key=lambda f: order.index(f.name))
    sections = {} if sections is None else sections  # group title -> argument group, reused by title
    dests = []
    for f in fields:
        target = parser
        if groups and f.metadata.get("group"):
            name = f.metadata["group"]
            target = sections.get(name) or sections.setdefault(name, parser.add_argument_group(name))
        dest = prefix.replace("-", "_") + f.name
        shown = (help_defaults or {}).get(f.name, f.default if f.default is not dataclasses.MISSING else None)
        text = (helps or {}).get(f.name) or f.metadata.get("help", "")
        base = _base_type(f)
        if base == "bool" and f.default is not None:
            flag = flag_name(f, prefix, flags)
            # a True default is switched off by its --no-... flag, a False one switched on
            target.add_argument(flag, dest=dest, action="store_false" if f.default else "store_true",
                                default=default, help=text)
        else:
            if shown not in (None, "") and "(default" not in text:
                text = f"{text} (default {_show(shown)})"
            kw: dict[str, Any] = {"dest": dest, "default": default, "help": text}
            if f.name in set(required):
                kw.update(required=True, default=None)
            if f.metadata.get("choices"):
                kw["choices"] = list(f.metadata["choices"])
            if f.metadata.get("metavar"):
                kw["metavar"] = f.metadata["metavar"]
            typed = base in ("int", "float", "tuple", "dict", "bool")  # bool here: a tri-state, true|false
            kw["type"] = _converter(f) if typed else str
            if base in ("int", "float", "tuple", "bool"):
                kw.setdefault("metavar", {"int": "N", "float": "X", "tuple": "A,B", "bool": "true|false"}[base])
            target.add_argument(flag_name(f, prefix, flags), **kw)
        dests.append(dest)
    return dests


def _converter(f: dataclasses.Field):
    def convert(value: str):
        try:
            return coerce_field(f, value)
        except OptionError as err:
            raise argparse.ArgumentTypeError(str(err)) from None
    convert.__name__ = _base_type(f)
    return convert


def _show(value) -> str:
    if isinstance(value, tuple):
        return ",".join(str(v) for v in value) or "none"
    return str(value)


def given(args: argparse.Namespace, dests: Iterable[str], prefix: str = "") -> dict[str, Any]:
    """The fields the user typed (those present in ``args``), without ``prefix``."""
    p = prefix.replace("-", "_")
    return {d[len(p):]: getattr(args, d) for d in dests if hasattr(args, d)}
