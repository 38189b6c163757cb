"""Safety constitutions: the texts COPSD's teacher reads around (or before) a prompt.

A constitution set is ``{category: template}`` with a ``default``; every template holds the query
slot ``{user_query}``. The embedded world ships one (``opd/world/constitutions.py``); a user's comes
from ``copsd.constitutions``. Kept apart from :mod:`opd.copsd` because the embedded world's cautious
teacher corpus (``opd/world/behaviour.py``) reads them too, and the world sits below the methods.
"""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

from opd.config import Params
from opd.data import Row
from opd.world.constitutions import SLOT, validate_constitutions


def load_constitutions(path: str | Path) -> dict[str, str]:
    """A JSON object ``{category: template}`` with a ``default``; every template has ``{user_query}``."""
    try:
        texts = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"constitutions file {path}: {err}") from None
    if not isinstance(texts, dict):
        raise ValueError(f"constitutions file {path}: expected a JSON object of category -> template")
    return validate_constitutions(texts)


def constitution_of(category: str, constitutions: dict[str, str]) -> str:
    """The template of a category; categories without one use the ``default``."""
    return constitutions.get(category, constitutions["default"])


def wrap(query: str, category: str, constitutions: dict[str, str]) -> str:
    """``x_c = constitution_template.format(user_query=x)``."""
    return constitution_of(category, constitutions).format(user_query=query)


def as_system(template: str) -> str:
    """A constitution as a system turn: its text without the query slot and without a label left
    dangling before the slot ("... Query: {user_query}" -> "..."); the query is the user turn."""
    before, after = template.split(SLOT, 1)
    before = re.sub(r"[\w ]{1,30}:\s*$", "", before.rstrip()).rstrip()
    return (before + "\n\n" + after.strip()).strip() if after.strip() else before


def teacher_view(row: Row, constitutions: dict[str, str], role: str = "user") -> Row:
    """The row as COPSD's teacher reads it: the constitution around the query in the user turn
    (``role: user``, the paper's x_c) or as the system turn before the bare query (``role: system``).
    The student never sees it: its rows stay bare."""
    if role == "system":
        return replace(row, system=as_system(constitution_of(row.category, constitutions)))
    return replace(row, prompt=wrap(row.prompt, row.category, constitutions))


def constitutions_of(params: Params, prepared: Path) -> dict[str, str]:
    """The user's constitution file (``copsd.constitutions``) or the prepared default set."""
    return load_constitutions(params.copsd.constitutions or prepared / "constitutions.json")
