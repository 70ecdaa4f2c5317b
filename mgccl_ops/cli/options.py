"""Command-line options generated from the fields of ``TrainConfig`` and ``ObjectiveConfig``.

Every field is an option (``--field-name``; booleans as ``--name`` / ``--no-name``) with the
field's docstring as its help, so a new field is reachable from the command line without
further code. The options record which of them were given on the command line
(:func:`given_options`), so that a ``--config`` file fills only the others and ``--resume``
can tell a conflicting option from a default.
"""

from __future__ import annotations

import argparse
import inspect
import json
import re
from dataclasses import MISSING, fields
from pathlib import Path

import tomllib

from ..backends import BACKENDS
from ..train.config import DISTRIBUTED_MODES, TrainConfig
from ..train.objective import ObjectiveConfig

GIVEN = "given_options"
CHOICES = {"backend": BACKENDS, "amp": ("auto", "off", "bf16", "fp16"), "distributed_mode": DISTRIBUTED_MODES}
# Types of the fields whose default is None.
NONE_DEFAULT_TYPES = {"concepts": str, "limit": int, "pretrained": str}


def given_options(args: argparse.Namespace) -> set[str]:
    """Names (dest) of the recorded options that the command line gave."""
    return set(getattr(args, GIVEN, None) or ())


def _record(namespace: argparse.Namespace, dest: str) -> None:
    given = set(getattr(namespace, GIVEN, None) or ())
    setattr(namespace, GIVEN, sorted(given | {dest}))  # a list: the namespace stays JSON-serialisable


class RecordedStore(argparse.Action):
    """``store``, remembering that the option was given."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)
        _record(namespace, self.dest)


class RecordedFlag(argparse.BooleanOptionalAction):
    """``--name`` / ``--no-name``, remembering that the option was given."""

    def __call__(self, parser, namespace, values, option_string=None):
        super().__call__(parser, namespace, values, option_string)
        _record(namespace, self.dest)


def field_docs(cls: type) -> dict[str, str]:
    """``{field: description}`` from the ``Attributes:`` section of a dataclass's docstring."""
    doc = inspect.getdoc(cls) or ""
    docs: dict[str, str] = {}
    current: list[str] = []
    for line in doc.partition("Attributes:")[2].splitlines():
        entry = re.match(r"^    (\w+(?:, \w+)*): (.*)$", line)
        if entry:
            current = entry.group(1).split(", ")
            for name in current:
                docs[name] = entry.group(2)
        elif line.startswith("        ") and current:
            for name in current:
                docs[name] += " " + line.strip()
        elif line.strip() and not line.startswith(" "):
            break
    return docs


def add_field_options(parser: argparse.ArgumentParser, cls: type, names: list[str], defaults: dict) -> None:
    """One recorded option per field in ``names`` of dataclass ``cls`` (default: ``defaults``
    where given, else the field's default)."""
    docs = field_docs(cls)
    by_name = {f.name: f for f in fields(cls)}
    for name in names:
        f = by_name[name]
        default = defaults.get(name, f.default if f.default is not MISSING else f.default_factory())
        text = docs.get(name, f"{cls.__name__}.{name}").replace("%", "%%")
        flag = "--" + name.replace("_", "-")
        if isinstance(default, bool):
            parser.add_argument(flag, action=RecordedFlag, default=default, help=text)
            continue
        kind = NONE_DEFAULT_TYPES.get(name, type(default)) if default is not None else NONE_DEFAULT_TYPES[name]
        shown = " (default %(default)s)" if default is not None else ""
        parser.add_argument(
            flag, action=RecordedStore, type=kind, default=default, choices=CHOICES.get(name), help=text + shown
        )


def training_fields(exclude: tuple[str, ...] = ()) -> tuple[list[str], list[str]]:
    """Names of the ``TrainConfig`` fields (minus ``objective`` and ``exclude``) and of the
    ``ObjectiveConfig`` fields."""
    train = [f.name for f in fields(TrainConfig) if f.name not in ("objective", *exclude)]
    return train, [f.name for f in fields(ObjectiveConfig)]


def read_config_file(path: str) -> dict:
    """A training configuration file: JSON or TOML (by suffix) with ``TrainConfig`` fields at
    the top level and ``ObjectiveConfig`` fields under ``objective``, the layout of
    ``TrainConfig.to_dict()`` (a checkpoint's ``config``). Unknown keys raise ``ValueError``."""
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"config file not found: {file}")
    text = file.read_text()
    try:
        data = tomllib.loads(text) if file.suffix == ".toml" else json.loads(text)
    except (ValueError, tomllib.TOMLDecodeError) as error:
        raise ValueError(f"config file {file} does not parse: {error}") from None
    if not isinstance(data, dict):
        raise ValueError(f"config file {file} must hold a table of training options")
    TrainConfig.from_dict(data, source=f"config file {file}")  # rejects unknown keys
    return data
