"""Flags generated from the settings' fields (``config.opt``); each defaults to SUPPRESS, so ``given(args, dests)``
holds only what the user typed (``config.resolve_config`` merges it over the defaults and preset)."""

from __future__ import annotations

import argparse
import dataclasses
from functools import partial

from ..config import convert, kind_of

SUPPRESS = argparse.SUPPRESS
METAVARS = {"int": "N", "float": "X", "tuple": "A,B", "bool": "true|false"}


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """argparse's defaults formatter, minus "(default: None)" where the help says what an absent value means."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def _show(value) -> str:
    return ",".join(map(str, value)) or "none" if isinstance(value, tuple) else str(value)


def add_fields(parser, cls, include=None, helps=None, sections=None, required=()) -> list[str]:
    """One flag per field of dataclass ``cls`` (except ``flag=False`` ones, and those not in ``include``), in the
    ``--help`` section its ``group`` names (``sections``: title -> group, reused); returns the dests."""
    sections = {} if sections is None else sections
    dests = []
    for f in dataclasses.fields(cls):
        if f.metadata.get("flag", True) is False or (include is not None and f.name not in include):
            continue
        title = f.metadata.get("group")
        target = (sections.get(title) or sections.setdefault(title, parser.add_argument_group(title))) \
            if title else parser
        text = (helps or {}).get(f.name) or f.metadata.get("help", "")
        flag = f.metadata.get("flag") or "--" + f.name.replace("_", "-")
        if kind_of(f) == "bool" and f.default is not None:  # a True default is turned off by its --no-... flag
            target.add_argument(flag, dest=f.name, action="store_false" if f.default else "store_true",
                                default=SUPPRESS, help=text)
        else:
            if f.default not in (None, "", dataclasses.MISSING) and "(default" not in text:
                text += f" (default {_show(f.default)})"
            target.add_argument(flag, dest=f.name, type=partial(convert, like=f, name=f.name), help=text,
                                required=f.name in required,
                                default=None if f.name in required else SUPPRESS,
                                choices=f.metadata.get("choices"),
                                metavar=f.metadata.get("metavar") or METAVARS.get(kind_of(f)))
        dests.append(f.name)
    return dests


def given(args: argparse.Namespace, dests) -> dict:
    """The settings the user typed (present in ``args``)."""
    return {d: getattr(args, d) for d in dests if hasattr(args, d)}
