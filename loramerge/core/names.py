"""Names: the one ``NAME=PATH`` / ``NAME=VALUE`` parser, the rule for adapter and task names, natural order.

Every verb, the routers and the server read ``NAME=PATH`` pairs and name adapters with these functions,
so a name that ``twin build`` accepts (``c++``, ``math-v2``) is one the server can serve.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

from loramerge.errors import RecipeError

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")
"""An adapter or task name: a letter or digit, then letters, digits and ``_ . + -`` (never a path)."""
MAX_NAME_LENGTH = 64


def check_name(name: object, what: str = "adapter", *, reserved: Iterable[str] = ()) -> str:
    """``name`` if it is a valid adapter/task name, else a RecipeError that says the rule.

    ``reserved``: names with a meaning of their own where this name is used (a twin bundle's ``shared``).
    """
    if not isinstance(name, str) or not name:
        raise RecipeError(f"empty {what} name", fix=f"give the {what} a name such as 'code' or 'math-v2'")
    if len(name) > MAX_NAME_LENGTH:
        raise RecipeError(f"{what} name {name[:80]!r} is longer than {MAX_NAME_LENGTH} characters",
                          fix="use a shorter name")
    if not NAME_PATTERN.match(name):
        raise RecipeError(f"{what} name {name[:80]!r} must start with a letter or digit and hold only "
                          "letters, digits and _ . + -", fix="use a plain name such as 'code', 'c++' or 'math-v2'")
    reserved = set(reserved)
    if name in reserved:
        raise RecipeError(f"{what} name '{name}' is reserved here", fix=f"rename it; reserved: {', '.join(sorted(reserved))}")
    return name


def name_from_path(path: str | Path) -> str:
    """The name an unnamed input gets: its directory's name (a hub id's last part; a file's stem)."""
    p = Path(str(path).rstrip("/\\"))
    return (p.stem if p.is_file() else p.name) or str(path)


def parse_pair(item: str, *, option: str = "--adapter", value: str = "PATH", name_optional: bool = False) -> tuple[str, str]:
    """``NAME=VALUE`` -> (name, value). With ``name_optional``, a bare PATH is named after its directory."""
    name, sep, rest = item.partition("=")
    name, rest = name.strip(), rest.strip()
    if not sep:
        if not name_optional or not name:
            raise RecipeError(f"cannot read {option} '{item}'", fix=f"write {option} NAME={value}")
        return name_from_path(name), name
    if not name or not rest:
        raise RecipeError(f"cannot read {option} '{item}'", fix=f"write {option} NAME={value}"
                          + (f" (or just {value})" if name_optional else ""))
    return name, rest


def parse_pairs(items: Iterable[str], *, option: str = "--adapter", value: str = "PATH",
                name_optional: bool = False, check: bool = True, sep: str | None = None) -> dict[str, str]:
    """Several ``NAME=VALUE`` items -> {name: value}, names unique and (``check``) valid.

    ``sep``: also split each item on it (``","`` for ``a=0.7,b=0.3``; paths are not split by default).
    """
    out: dict[str, str] = {}
    for item in items:
        for part in [p.strip() for p in item.split(sep) if p.strip()] if sep else [item]:
            name, rest = parse_pair(part, option=option, value=value, name_optional=name_optional)
            if check:
                check_name(name)
            if name in out:
                raise RecipeError(f"name '{name}' is given twice in {option}", fix="give each one a distinct NAME=")
            out[name] = rest
    return out


def parse_weights(text: str, *, option: str = "--weights") -> dict[str, float]:
    """``"a=0.7,b=0.3"`` -> {"a": 0.7, "b": 0.3} (the CLI and server form of a mixture)."""
    out: dict[str, float] = {}
    fix = "write weights as name=0.7,other=0.3"
    try:
        pairs = parse_pairs([text], option=option, value="0.7", check=False, sep=",")
    except RecipeError as exc:
        raise RecipeError(exc.message, fix=fix) from None
    for name, value in pairs.items():
        try:
            out[name] = float(value)
        except ValueError:
            raise RecipeError(f"cannot read weight '{name}={value}'", fix=fix) from None
    if not out:
        raise RecipeError("no weights given", fix=fix)
    return out


_DIGITS = re.compile(r"(\d+)")


def natural_key(name: str) -> tuple:
    """Sort key that orders numbers by value: ``layers.2`` before ``layers.10``."""
    return tuple(int(part) if part.isdigit() else part for part in _DIGITS.split(name))


def natural_sorted(names: Iterable[str]) -> list[str]:
    return sorted(names, key=natural_key)


__all__ = ["MAX_NAME_LENGTH", "NAME_PATTERN", "check_name", "name_from_path", "natural_key",
           "natural_sorted", "parse_pair", "parse_pairs", "parse_weights"]
