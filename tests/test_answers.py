"""Final-answer extraction: the common formats, separators, decimals, signs (opd/answers.py)."""

import pytest

from opd.answers import check_answer, extract_answer, normalise
from opd.config import ConfigError
from opd.params import parse


@pytest.mark.parametrize("text, want", [
    (" 7+5=12. Answer: 12", "12"),
    ("Answer: 1,200", "1200"),                 # was read as 1
    ("Answer: 3.5", "3.5"),                    # was read as 3
    ("Answer: -4", "-4"),
    ("Answer: \u22124", "-4"),
    ("The answer is: 20", "20"),               # scored 0 before
    ("so the answer is 20.", "20"),
    ("Natalia sold 48/2 = 24 clips in May.\n#### 72", "72"),
    ("Thus the total is \\boxed{1,024}.", "1024"),
    ("Answer: $1,200.00", "1200"),
    ("Answer: 12 apples. Then Answer: 13", "13"),  # the last statement wins
    ("7 + 5 - 3 = 21", None),                  # auto never guesses from stray numbers
])
def test_auto_extracts_the_stated_answer(text, want):
    assert extract_answer(text) == want


def test_formats_and_numeric_equality():
    assert extract_answer("7 + 5 - 3 = 21", "last_number") == "21"
    assert extract_answer("Answer: 5 #### 6", "gsm8k") == "6"
    assert extract_answer("Answer: 5", "boxed") is None
    assert normalise("1,200.0") == normalise("1200") == "1200" and normalise("-0.0") == "0"
    assert check_answer("... Answer: 1200", "#### 1,200")
    assert not check_answer("Answer: 3", "Answer: 3.5")
    assert not check_answer("no answer", "Answer: 3")
    assert check_answer("x", "Answer: 3", "tests.test_answers:always_three")


def always_three(text: str) -> str:
    return "3"


def test_answer_format_is_validated_at_start():
    with pytest.raises(ConfigError, match="data.answer_format"):
        parse({"data": {"answer_format": "boxd"}})
    assert parse({"data": {"answer_format": "gsm8k"}}).data.answer_format == "gsm8k"


def test_gsm8k_and_boxed_references_pass_validation():
    from opd.config import DataConfig
    from tasks.validate import validate_records

    rows = [{"id": f"r{i}", "split": s, "task": "reasoning", "category": "none", "prompt": f"How many, case {i}?",
             "reference": ref} for i, (s, ref) in enumerate([("train", "48/2 = 24\n#### 72"), ("eval", "so \\boxed{1,024}"),
                                                             ("eval", "Answer: 3.5")])]
    assert validate_records(rows, DataConfig()).success
    bad = rows + [{"id": "x", "split": "eval", "task": "reasoning", "category": "none", "prompt": "How many, x?",
                   "reference": "seven"}]
    report = validate_records(bad, DataConfig())
    assert not report.success and "'x'" in report.summary


@pytest.mark.parametrize("fmt, text, want", [
    ("auto", " 3+4=7. 7-2=5. Answer: 5", " 3+4=7. 7-2=5. Answer: 12"),
    ("answer_line", "so the answer is 5.", "so the answer is 12."),
    ("gsm8k", "3+2=5\n#### 5", "3+2=5\n#### 12"),
    ("boxed", "We get \\boxed{5}.", "We get \\boxed{12}."),
    ("auto", "Total \\boxed{1,005}, i.e. Answer: 5", "Total \\boxed{12}, i.e. Answer: 5"),  # boxed wins, as in extraction
    ("last_number", "3 then 5 apples", "3 then 12 apples"),
])
def test_replace_answer_changes_only_the_final_answer(fmt, text, want):
    from opd.answers import replace_answer

    assert replace_answer(text, "12", fmt) == want and extract_answer(want, fmt) == "12"
    with pytest.raises(ValueError, match="custom extractor"):
        replace_answer(text, "12", "opd.answers:extract_answer")
    with pytest.raises(ValueError, match="no final answer"):
        replace_answer("no number here", "1", fmt)
