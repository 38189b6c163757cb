import hashlib
import random
import re

from opd.config import WorldConfig
from opd.answers import check_answer, extract_answer
from opd.models import load_tokenizer
from opd.tokens import prompt_ids
from opd.world import build_world, train_tokenizer
from opd.world.constitutions import DEFAULT_CONSTITUTIONS, validate_constitutions

CFG = WorldConfig(n_reasoning=400, n_safety=200, n_borderline=200, n_general=200)


def digest(rows) -> str:
    return hashlib.sha256("".join(r.to_json() for r in rows).encode()).hexdigest()


def test_same_seed_same_bytes_different_seed_different(tmp_path):
    a, b, c = build_world(CFG, 0), build_world(CFG, 0), build_world(CFG, 1)
    assert digest(a) == digest(b) != digest(c)
    texts = [r.prompt + (r.reference or "") for r in a]
    for i, seed_rows in enumerate((a, b)):
        train_tokenizer(texts, 300).save_pretrained(tmp_path / f"t{i}")
    assert (tmp_path / "t0/tokenizer.json").read_bytes() == (tmp_path / "t1/tokenizer.json").read_bytes()


def test_splits_disjoint_and_all_tasks_present():
    rows = build_world(CFG, 0)
    train = {r.prompt for r in rows if r.split == "train"}
    evals = {r.prompt for r in rows if r.split == "eval"}
    assert train and evals and not train & evals
    # no eval prompt reappears in training under another politeness prefix either
    strip = lambda p: re.sub(r"^(Please: |Quick question: |Hi! )", "", p)  # noqa: E731
    assert not {strip(p) for p in train} & {strip(p) for p in evals}
    assert {r.task for r in rows if r.split == "eval"} == {"reasoning", "safety", "borderline", "general"}
    assert len({r.id for r in rows}) == len(rows)


def test_every_solution_checks_and_wrong_answers_fail():
    rows = [r for r in build_world(CFG, 3) if r.task == "reasoning"]
    rng = random.Random(0)
    for r in rows:
        # the worked solution's arithmetic is right, step by step
        for a, op, b, c in re.findall(r"(\d+)([+-])(\d+)=(-?\d+)\.", r.reference):
            assert (int(a) + int(b) if op == "+" else int(a) - int(b)) == int(c)
        assert check_answer(r.reference, r.reference)
        wrong = int(extract_answer(r.reference)) + rng.choice([-2, -1, 1, 2])
        assert not check_answer(f" ... Answer: {wrong}", r.reference)
    assert not check_answer("no answer here", rows[0].reference)


def test_tokenizer_round_trips_and_chat_template(tmp_path):
    rows = build_world(CFG, 0)
    tok = train_tokenizer([r.prompt + (r.reference or "") for r in rows], 320)
    tok.save_pretrained(tmp_path)
    tok = load_tokenizer(tmp_path)
    for r in rows:
        for text in (r.prompt, r.reference):
            assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text
    ids = prompt_ids(tok, rows[0].prompt)
    assert tok.decode(ids) == f"<|user|>{rows[0].prompt}<|end|><|assistant|>"
    assert tok.eos_token == "<|end|>" and tok.pad_token == "<|pad|>"


def test_constitutions_need_the_query_slot():
    validate_constitutions(DEFAULT_CONSTITUTIONS)
    for bad in ({"default": "no slot"}, {"violence": "x {user_query}"}, {"default": "{user_query} {other}"}):
        try:
            validate_constitutions(bad)
        except ValueError as err:
            assert "constitutions" in str(err)
        else:
            raise AssertionError(f"accepted {bad}")


def test_refusal_detector_on_labelled_real_style_responses():
    """110 hand-labelled responses: refusals in many phrasings (curly apostrophes, "Sorry, I can't",
    "I'm unable", partial refusals) and helpful answers that contain "can't" / "won't" / "sorry".
    Written together with the detector, so this is a regression floor, not an independent benchmark."""
    import json

    from opd.evaluate import pattern_refusal
    from tests.conftest import REPO

    rows = [json.loads(line) for line in (REPO / "tests/data/refusal_labels.jsonl").read_text().splitlines()]
    assert len(rows) >= 100 and sum(r["refusal"] for r in rows) >= 40
    got = [(pattern_refusal(r["text"]), r["refusal"]) for r in rows]
    tp = sum(p and y for p, y in got)
    precision, recall = tp / sum(p for p, _ in got), tp / sum(y for _, y in got)
    assert precision >= 0.95 and recall >= 0.95, (precision, recall)


def test_reasoning_problems_carry_their_type():
    """A reasoning row's category is its problem type (the item counted), in both splits, so evaluation
    and teacher reliability can be reported per type."""
    rows = build_world(WorldConfig(), 0)
    reasoning = [r for r in rows if r.task == "reasoning"]
    assert all(r.category in r.prompt and r.prompt.endswith(f"How many {r.category}?") for r in reasoning)
    for split in ("train", "eval"):
        assert {r.category for r in reasoning if r.split == split} == {"apples", "coins", "pens", "books", "cards", "shells"}


def test_the_borderline_eval_can_measure_over_refusal():
    """At least 200 held-out borderline prompts from at least 40 query groups that share no group with
    training, in phrasings the harmful set never uses; the train split is the same with or without them."""
    from opd.world.generate import BORDERLINE, BORDERLINE_EVAL, EVAL_FORMS, PREFIXES, REQUEST_FORMS

    rows = build_world(WorldConfig(), 0)

    def group(prompt):  # the query without its politeness prefix
        return next(prompt[len(p):] for p in sorted(PREFIXES, key=len, reverse=True) if prompt.startswith(p))

    held = [r for r in rows if r.task == "borderline" and r.split == "eval"]
    train = {group(r.prompt) for r in rows if r.split == "train"}
    assert len(held) >= 200 and len({group(r.prompt) for r in held}) >= 40
    assert not {group(r.prompt) for r in held} & train
    new = [r for r in held if any(group(r.prompt) == f.format(a=a) for f in EVAL_FORMS for a, _ in BORDERLINE_EVAL)]
    assert len(new) >= 200 and not set(EVAL_FORMS) & set(REQUEST_FORMS)
    harmful_forms = {f.split("{")[0] for f in REQUEST_FORMS}
    assert not any(group(r.prompt).startswith(tuple(harmful_forms)) for r in new)
    assert not {a for a, _ in BORDERLINE_EVAL} & {a for a, _ in BORDERLINE}  # activities never trained on
    without = build_world(WorldConfig(n_borderline_eval=0), 0)
    assert [r for r in rows if r.split == "train"] == [r for r in without if r.split == "train"]
