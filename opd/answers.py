"""Final answers of reasoning responses: extraction in the common formats, and numeric comparison.

``data.answer_format`` names how the references (and so the wanted responses) state the final answer:

- ``auto`` (default): the last ``\\boxed{N}``, else the last GSM8K ``#### N``, else the last
  ``Answer: N`` / ``The answer is: N`` / ``answer is N``; nothing else counts, so a response that
  never states its answer scores 0 (no guessing from stray numbers);
- ``answer_line``, ``gsm8k``, ``boxed``: only that format;
- ``last_number``: the last number anywhere in the text (lenient; "flexible extract");
- ``"module:function"``: your own ``str -> str | None``.

Numbers may carry thousands separators, decimals, a sign (ASCII or Unicode minus) and a leading
``$``: "1,200", "1200.0" and "$1200" are the same answer; "3.5" is not "3".
"""

from __future__ import annotations

import re
from collections.abc import Callable
from decimal import Decimal, InvalidOperation

from opd.hooks import load_hook

NUMBER = r"[-\u2212]?\$?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?"
PATTERNS = {
    "boxed": re.compile(r"\\boxed\{\s*(" + NUMBER + r")\s*\}"),
    "gsm8k": re.compile(r"####\s*(" + NUMBER + r")"),
    "answer_line": re.compile(r"\banswer(?:\s+is)?\s*[:=]?\s*(" + NUMBER + r")", re.IGNORECASE),
    "last_number": re.compile(r"(" + NUMBER + r")"),
}
AUTO = ("boxed", "gsm8k", "answer_line")
FORMATS = ("auto", *PATTERNS)


def normalise(number: str) -> str | None:
    """A canonical string for a number: no separators or ``$``, no trailing zeros ("1,200.0" -> "1200")."""
    text = number.replace(",", "").replace("$", "").replace("\u2212", "-").strip()
    try:
        value = Decimal(text)
    except InvalidOperation:
        return None
    out = format(value.normalize(), "f")
    return "0" if out in ("-0", "0") else out


def _last(kind: str, text: str) -> str | None:
    found = PATTERNS[kind].findall(text)
    return normalise(found[-1]) if found else None


def extractor(fmt: str = "auto") -> Callable[[str], str | None]:
    """The answer extractor for ``data.answer_format``."""
    if ":" in fmt:
        return load_hook(fmt, "data.answer_format")
    if fmt == "auto":
        def auto(text: str) -> str | None:
            for kind in AUTO:
                got = _last(kind, text)
                if got is not None:
                    return got
            return None
        return auto
    if fmt not in PATTERNS:
        raise ValueError(f"data.answer_format {fmt!r}: expected one of {list(FORMATS)} or 'module:function'")
    return lambda text: _last(fmt, text)


def extract_answer(text: str, fmt: str = "auto") -> str | None:
    """The final answer stated in ``text`` (canonical number string), or None."""
    return extractor(fmt)(text)


def check_answer(response: str, reference: str, fmt: str = "auto") -> bool:
    """True when the response states the reference's final answer (numerically equal)."""
    get = extractor(fmt)
    want = get(reference)
    return want is not None and get(response) == want


def replace_answer(text: str, new: str, fmt: str = "auto") -> str:
    """``text`` with its final answer (the one :func:`extract_answer` reads) replaced by ``new``; the
    worked steps are left as they are. For a teacher of controlled reliability (wrong references on
    some problem types, ``sft.wrong_answer_categories``). Built-in formats only: a user hook says
    what the answer is, not where."""
    if ":" in fmt:
        raise ValueError(f"data.answer_format {fmt!r}: a custom extractor cannot locate the answer to replace; "
                         "use a built-in format with sft.wrong_answer_categories")
    for kind in AUTO if fmt == "auto" else (fmt,):
        found = list(PATTERNS[kind].finditer(text))
        if found:
            start, end = found[-1].span(1)
            return text[:start] + new + text[end:]
    raise ValueError(f"no final answer in {fmt!r} format in {text[:80]!r}")
