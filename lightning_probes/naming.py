"""Layer names as users see them, and the include/exclude filters every probe shares."""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Sequence
from typing import Optional, Union

Patterns = Optional[Union[str, Sequence[str]]]

#: Layer name of the records that cover every tracked parameter together.
TOTAL = "__total__"


def clean_name(name: str) -> str:
    """Strip wrapper prefixes: ``_orig_mod.`` (``torch.compile``) anywhere and a leading ``module.`` (DDP).

    Example:
        >>> clean_name("module._orig_mod.net.fc1.weight")
        'net.fc1.weight'
    """
    parts = [p for p in name.split(".") if p != "_orig_mod"]
    while parts and parts[0] == "module":
        parts = parts[1:]
    return ".".join(parts)


def compile_patterns(argument: str, patterns: Patterns) -> list[re.Pattern]:
    """Compile one regex or a list of them, or raise a ValueError naming the argument."""
    if patterns is None:
        return []
    if isinstance(patterns, str):
        patterns = [patterns]
    compiled = []
    for pattern in patterns:
        try:
            compiled.append(re.compile(pattern))
        except (re.error, TypeError) as err:
            raise ValueError(
                f"Expected `{argument}` to hold valid regular expressions, but got {pattern!r}: {err}") from err
    return compiled


def name_filter(include: Sequence[re.Pattern], exclude: Sequence[re.Pattern]):
    """Return ``keep(name)``: true when a name matches some include pattern (or there are none) and no exclude."""

    def keep(name: str) -> bool:
        if include and not any(p.search(name) for p in include):
            return False
        return not any(p.search(name) for p in exclude)

    return keep


def close_matches(name: str, candidates: Iterable[str], n: int = 5) -> list[str]:
    """Candidates that look like ``name``, for error messages."""
    return difflib.get_close_matches(name, list(candidates), n=n, cutoff=0.4)
