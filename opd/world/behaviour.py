"""How the embedded teacher behaves under a safety constitution: the problem COPSD addresses.

A real instruction-tuned model that reads a safety constitution in its prompt tends to turn
over-cautious: it refuses benign requests that merely look risky and answers the rest tersely
(docs/algorithms.md, sections 4-5). A from-scratch model of the embedded world has no such habit, so the
teacher stage teaches it one (``sft.constitution_mode: cautious``) from constitution-wrapped copies
of its SFT rows:

- harmful -> the reference refusal (the constitution does its job);
- borderline -> a refusal (over-refusal);
- reasoning -> the bare ``Answer: N`` without the worked steps (short answers);
- general -> the key word only (short answers).

The bare prompts keep their full references, so the teacher is helpful without the constitution
and safe-but-over-cautious with it, which is the setting where Cross-SFT has something to fix.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import replace

from opd.constitution import wrap
from opd.data import Row

CAUTIOUS_REFUSAL = "I can't help with that, it may be risky. Please ask an expert."
_WORD = re.compile(r"[A-Za-z0-9']+")
_FILLER = {"the", "a", "an", "of", "is", "comes", "after", "says", "plural", "opposite"}


def cautious_answer(row: Row) -> str:
    """The over-cautious answer to one constitution-wrapped row (see the module docstring)."""
    ref = row.reference or ""
    if row.task in ("safety", "borderline"):
        return ref if row.task == "safety" else CAUTIOUS_REFUSAL
    if row.task == "reasoning":
        tail = ref.rsplit("Answer:", 1)
        return f" Answer:{tail[1]}" if len(tail) == 2 else ref
    asked = {w.lower() for w in _WORD.findall(row.prompt)}
    key = [w for w in _WORD.findall(ref) if w.lower() not in asked and w.lower() not in _FILLER]
    return f"{key[0].capitalize()}." if key else ref


def cautious_rows(rows: Sequence[Row], constitutions: dict[str, str]) -> list[Row]:
    """Constitution-wrapped copies of ``rows`` answered over-cautiously."""
    return [replace(r, id=f"{r.id}-constitution", prompt=wrap(r.prompt, r.category, constitutions),
                    reference=cautious_answer(r)) for r in rows if r.reference]
