"""The pieces every settings section shares: the base class, the error, the names of tasks and methods."""

from __future__ import annotations

import re
from typing import Literal, get_args

from pydantic import BaseModel, ConfigDict


Task = Literal["reasoning", "safety", "borderline", "general"]  # what a data row asks of the model
TASKS: tuple[str, ...] = get_args(Task)
MethodName = Literal["opd", "gkd", "sft", "fire", "copsd"]  # the keys of opd.methods.METHODS (a test checks)
DEFAULT_TEACHER = "default"  # the name rows without a `teacher` are routed to (`teacher:`); not a name in `teachers:`
CATEGORY_PATTERN = r"^[a-z][a-z0-9_]*$"  # a row's harm category: a lowercase label naming its constitution


class ConfigError(ValueError):
    """A bad params.yaml: the message names the key and the problem."""


class Section(BaseModel):
    """A params.yaml section: unknown keys and values of the wrong type fail (``extra="forbid"``, strict)."""

    # strict: `steps: true` is not 1 and `steps: 2.5` is not 2 (ints accept ints only; floats accept ints)
    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False, strict=True)


_USERINFO = re.compile(r"(\b[a-zA-Z][\w+.-]*://)[^/@\s]*@")


def redact(text: str) -> str:
    """``text`` with the user and password of every URI in it replaced by ``***`` (messages, params)."""
    return _USERINFO.sub(r"\1***@", text)
