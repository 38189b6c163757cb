"""Great Expectations suite for prompt datasets, run between stages.

Ephemeral context (no files, no network). Dataset-level rules live here so they are reported all
at once, each with how many rows failed and a few example ids. A table is validated in chunks after
one streaming pass that gathers what the cross-row rules need (:class:`TableFacts`), so a large
file is never held whole in memory.
"""

from __future__ import annotations

import copy
import logging
import unicodedata
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from opd.answers import extractor
from opd.config import CATEGORY_PATTERN, TASKS, DataConfig
from opd.data import COLUMNS, REQUIRED, SPLITS, chunked


class ValidationFailed(ValueError):
    """A dataset broke the suite; the message is the readable report."""


@dataclass
class ValidationReport:
    success: bool
    summary: str
    result: dict[str, Any]  # GX's own JSON (suite, results, statistics)
    teachers: dict[str, int] = field(default_factory=dict)  # rows per name of the `teacher` column


def _reference_ok(df: pd.DataFrame, answer_format: str = "auto") -> pd.Series:
    """Reference needed where the task needs one: reasoning always, stating its final answer in
    ``data.answer_format`` (the checker reads it: ``Answer: N``, GSM8K ``#### N``, ``\\boxed{N}``...);
    safety / borderline / general rows of the eval split (scored against it). Train rows of those
    tasks may be prompts only (on-policy needs no answers)."""
    if "task" not in df or "split" not in df:
        return pd.Series(True, index=df.index)
    ref = df["reference"] if "reference" in df else pd.Series(None, index=df.index, dtype=object)
    has = ref.notna() & ref.astype(str).str.strip().ne("")
    is_reasoning = df["task"].eq("reasoning")
    needs = is_reasoning | df["split"].eq("eval")
    get = extractor(answer_format)
    answer = ref.map(lambda r: isinstance(r, str) and get(r) is not None)
    return (~needs | has) & (~is_reasoning | answer)


def _normalised(prompt: Any) -> int:
    """A prompt as a 64-bit hash (a set of them stays small) after NFKC, with invisible format characters
    (Unicode category Cf: zero-width spaces and joiners, bidi marks, soft hyphens) removed, whitespace
    collapsed and case folded: an eval prompt with a zero-width space inside is still the train prompt."""
    text = unicodedata.normalize("NFKC", str(prompt))
    return hash(" ".join("".join(c for c in text if unicodedata.category(c) != "Cf").split()).casefold())


SHOWN_CHARS = 200  # a value quoted in a report (a 10 MB prompt is cut here, once)


def shown_value(value: Any) -> Any:
    """A value as a report quotes it: strings longer than ``SHOWN_CHARS`` cut, with their length."""
    if isinstance(value, str) and len(value) > SHOWN_CHARS:
        return f"{value[:SHOWN_CHARS]}... ({len(value):,} characters)"
    return value


@dataclass
class TableFacts:
    """What the cross-row rules need to know about the whole table, gathered in one streaming pass:
    the columns, the row count, the ids seen more than once and the prompts that stand in both
    splits (as hashes). The suite then runs chunk by chunk, so memory does not grow with the file."""

    columns: list[str]
    rows: int = 0
    splits: Counter[str] = field(default_factory=Counter)
    teachers: Counter[str] = field(default_factory=Counter)  # the names of the `teacher` column
    duplicate_ids: set[int] = field(default_factory=set)
    shared_prompts: set[int] = field(default_factory=set)

    @classmethod
    def of(cls, records: Iterable[dict[str, Any]]) -> TableFacts:
        seen: set[str] = set()
        ids: set[int] = set()
        dup: set[int] = set()
        by_split: dict[str, set[int]] = {split: set() for split in SPLITS}
        n = 0
        splits: Counter[str] = Counter()
        teachers: Counter[str] = Counter()
        for rec in records:
            n += 1
            seen.update(rec)
            splits[rec.get("split")] += 1
            if isinstance(rec.get("teacher"), str):
                teachers[rec["teacher"]] += 1
            if "id" in rec:
                key = hash(rec["id"])
                (dup if key in ids else ids).add(key)
            if rec.get("split") in by_split and rec.get("prompt") is not None:
                by_split[rec["split"]].add(_normalised(rec["prompt"]))
        columns = [c for c in COLUMNS if c in seen] if n else list(REQUIRED)
        return cls(columns, n, splits, teachers, dup, set.intersection(*by_split.values()))

    def derived(self, df: pd.DataFrame) -> None:
        """The columns the cross-row rules check: ``id_unique`` and ``prompt_not_in_other_split`` (the
        eval split must never be seen in training)."""
        df["id_unique"] = ~df["id"].map(hash).isin(self.duplicate_ids) if "id" in df else True
        if "prompt" in df and "split" in df:
            df["prompt_not_in_other_split"] = ~df["prompt"].map(_normalised).isin(self.shared_prompts)
        else:
            df["prompt_not_in_other_split"] = True


def build_suite(columns: list[str], cfg: DataConfig, control_tokens: list[str] = (),
                teacher_names: list[str] | None = None) -> list[Any]:
    """The rules, as GX expectations (so the report names each rule): required columns and values,
    unique ids, lengths, no whitespace-only text, no chat-template control token inside a prompt,
    reference or system turn (a user could inject turns), no prompt shared by the train and eval splits, references
    where the task needs them, and (multi-teacher) teacher names that ``teachers:`` defines."""
    import re

    import great_expectations.expectations as gxe

    exps: list[Any] = [gxe.ExpectColumnToExist(column=c) for c in REQUIRED]
    exps += [gxe.ExpectColumnValuesToNotBeNull(column=c) for c in REQUIRED if c in columns]
    exps.append(gxe.ExpectColumnValuesToBeInSet(column="id_unique", value_set=[True]))  # across chunks
    sets = {"task": TASKS, "split": SPLITS}
    exps += [gxe.ExpectColumnValuesToBeInSet(column=c, value_set=list(v)) for c, v in sets.items() if c in columns]
    if "category" in columns:  # any lowercase label: the constitution of that name, else the default one
        exps.append(gxe.ExpectColumnValuesToMatchRegex(column="category", regex=CATEGORY_PATTERN))
    if "prompt" in columns:
        exps.append(gxe.ExpectColumnValueLengthsToBeBetween(
            column="prompt", min_value=cfg.min_prompt_chars, max_value=cfg.max_prompt_chars))
    if "reference" in columns:
        exps.append(gxe.ExpectColumnValueLengthsToBeBetween(
            column="reference", min_value=1, max_value=cfg.max_reference_chars))
    for col in ("prompt", "reference", "system"):  # every text column that reaches a chat template
        if col in columns:
            exps.append(gxe.ExpectColumnValuesToMatchRegex(column=col, regex=r"\S"))  # not whitespace only
            if control_tokens:
                exps.append(gxe.ExpectColumnValuesToNotMatchRegexList(
                    column=col, regex_list=[re.escape(t) for t in control_tokens]))
    if teacher_names is not None and "teacher" in columns:
        exps.append(gxe.ExpectColumnValuesToBeInSet(column="teacher", value_set=sorted(teacher_names)))
    exps.append(gxe.ExpectColumnValuesToBeInSet(column="prompt_not_in_other_split", value_set=[True]))
    exps.append(gxe.ExpectColumnValuesToBeInSet(column="reference_ok", value_set=[True]))
    exps.append(gxe.ExpectTableRowCountToBeBetween(min_value=1))
    return exps


CHUNK_ROWS = 50_000


def validate_records(records: Iterable[dict[str, Any]] | Callable[[], Iterable[dict[str, Any]]], cfg: DataConfig,
                     name: str = "prompts", control_tokens: list[str] = (), teacher_names: list[str] | None = None,
                     chunk_rows: int = CHUNK_ROWS) -> ValidationReport:
    """Run the suite on raw records; never raises for bad data, returns the report.

    ``records`` is a list, or a function that streams them anew (it is read twice: once for the
    :class:`TableFacts`, once for the suite, ``chunk_rows`` rows at a time); the chunks' GX results
    are merged into one, as if the whole table had been one batch."""
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    logging.getLogger(ProgressBarsConfig.__module__).setLevel(logging.WARNING)  # it sets INFO: a line per validation

    stream = records if callable(records) else lambda: records
    facts = TableFacts.of(stream())
    ctx = gx.get_context(mode="ephemeral")
    ctx.variables.progress_bars = ProgressBarsConfig(globally=False)
    batches = ctx.data_sources.add_pandas(name).add_dataframe_asset("rows").add_batch_definition_whole_dataframe("all")
    docs, examples, offset = [], defaultdict(list), 0
    for chunk in chunked(stream(), chunk_rows) if facts.rows else [[]]:
        df = pd.DataFrame.from_records(chunk, columns=facts.columns)
        df["reference_ok"] = _reference_ok(df, cfg.answer_format)
        facts.derived(df)
        suite = gx.ExpectationSuite(name=name, expectations=build_suite(list(df.columns), cfg, control_tokens, teacher_names))
        doc = batches.get_batch(batch_parameters={"dataframe": df}).validate(suite, result_format="COMPLETE").to_json_dict()
        ids = df["id"].tolist() if "id" in df else list(range(offset, offset + len(df)))
        for i, r in enumerate(doc["results"]):
            examples[i] += [str(ids[j]) for j in (r["result"].get("unexpected_index_list") or [])[:5 - len(examples[i])]]
        docs.append(doc)
        offset += len(df)
    doc = docs[0] if len(docs) == 1 else _merge(docs, facts.rows, chunk_rows)
    lines = []
    for i, r in enumerate(doc["results"]):
        if r["success"]:
            continue
        kw, res = r["expectation_config"]["kwargs"], r["result"]
        what = r["expectation_config"]["type"] + (f"(column={kw['column']})" if "column" in kw else "")
        count = res.get("unexpected_count")
        if count is None:  # table-level or missing-column expectations
            lines.append(f"  {what}: failed" + (f" (observed {res.get('observed_value')})"
                                                 if res.get("observed_value") is not None else ""))
            continue
        values = ", ".join(repr(shown_value(v)) for v in (res.get("partial_unexpected_list") or [])[:3])
        lines.append(f"  {what}: {count} of {facts.rows} rows; ids e.g. {examples[i]}; values e.g. [{values}]")
    success = bool(doc["success"])
    if facts.rows and not facts.splits["eval"]:  # evaluate would fail only after teacher and distill
        success = False
        lines.append(f"  no eval rows: none of the {facts.rows} rows has split 'eval' (evaluation needs held-out rows)")
    summary = (f"{name}: {facts.rows} rows passed {len(doc['results'])} expectations" if success
               else f"{name}: validation failed: {lines[0].strip()}" if len(lines) == 1  # the reason on the first line
               else f"{name}: validation failed ({len(lines)} checks): {lines[0].strip()}\n" + "\n".join(lines[1:]))
    # GX stamps the batch with its load time; dropped so the same records give the same report, and a
    # no-op rerun of prepare leaves its output byte-identical (DVC then retrains nothing downstream)
    doc.get("meta", {}).get("batch_markers", {}).pop("ge_load_time", None)
    for res in doc["results"]:  # the report travels (MLflow artifact, prepare's output): values cut, not copied whole
        for key in ("unexpected_list", "partial_unexpected_list"):
            if key in res["result"]:
                res["result"][key] = [shown_value(v) for v in res["result"][key]]
        for item in res["result"].get("partial_unexpected_counts") or []:
            item["value"] = shown_value(item["value"])
    return ValidationReport(success, summary, doc, dict(facts.teachers))


def _merge(docs: list[dict[str, Any]], rows: int, chunk_rows: int) -> dict[str, Any]:
    """One GX result for the whole table from the per-chunk ones: counts summed, percentages
    recomputed, unexpected rows listed with their table-wide index."""
    doc = copy.deepcopy(docs[0])
    for i, res in enumerate(doc["results"]):
        parts = [d["results"][i] for d in docs]
        res["success"] = all(p["success"] for p in parts)
        r = res["result"]
        if "unexpected_count" in r:
            has = set(r)
            for key in ("element_count", "unexpected_count", "missing_count"):
                r[key] = sum(p["result"].get(key) or 0 for p in parts)
            r["unexpected_list"] = [v for p in parts for v in p["result"].get("unexpected_list", [])]
            r["unexpected_index_list"] = [k * chunk_rows + j for k, p in enumerate(parts)
                                          for j in p["result"].get("unexpected_index_list", [])]
            r["partial_unexpected_list"] = r["unexpected_list"][:20]
            r["partial_unexpected_index_list"] = r["unexpected_index_list"][:20]
            r["partial_unexpected_counts"] = [{"value": v, "count": c} for v, c in Counter(
                v if isinstance(v, (str, int, float, bool, type(None))) else str(v) for v in r["unexpected_list"]).most_common(20)]
            total, present = r["element_count"], r["element_count"] - r["missing_count"]
            share = lambda n, of: 100.0 * n / of if of else None  # noqa: E731
            r.update(missing_percent=share(r["missing_count"], total), unexpected_percent=share(r["unexpected_count"], present),
                     unexpected_percent_nonmissing=share(r["unexpected_count"], present),
                     unexpected_percent_total=share(r["unexpected_count"], total))
            for key in set(r) - has:  # keep GX's own shape for each expectation type
                del r[key]
            r.pop("unexpected_index_query", None)  # a pandas query over one chunk's index
        elif res["expectation_config"]["type"] == "expect_table_row_count_to_be_between":
            r["observed_value"] = rows
            res["success"] = rows >= 1
    ok = sum(res["success"] for res in doc["results"])
    doc["success"] = ok == len(doc["results"])
    doc["statistics"] = {"evaluated_expectations": len(doc["results"]), "successful_expectations": ok,
                         "unsuccessful_expectations": len(doc["results"]) - ok,
                         "success_percent": 100.0 * ok / len(doc["results"])}
    return doc
