"""Great Expectations suite for prompt datasets, run between stages.

Ephemeral context (no files, no network). Dataset-level rules live here so they are reported all
at once, each with how many rows failed and a few example ids.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pandas as pd

from opd.answers import extractor
from opd.config import CATEGORY_PATTERN, TASKS, DataConfig
from opd.data import REQUIRED, SPLITS



class ValidationFailed(ValueError):
    """A dataset broke the suite; the message is the readable report."""


@dataclass
class ValidationReport:
    success: bool
    summary: str
    result: dict[str, Any]  # GX's own JSON (suite, results, statistics)


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


def _not_in_other_split(df: pd.DataFrame) -> pd.Series:
    """False for a row whose prompt (whitespace-collapsed, case-folded) also stands in the other split:
    the eval split must never be seen in training."""
    if "prompt" not in df or "split" not in df:
        return pd.Series(True, index=df.index)
    norm = df["prompt"].astype(str).str.split().str.join(" ").str.casefold()
    train, held = set(norm[df["split"].eq("train")]), set(norm[df["split"].eq("eval")])
    shared = train & held
    return ~norm.isin(shared)


def build_suite(columns: list[str], cfg: DataConfig, control_tokens: list[str] = (),
                teacher_names: list[str] | None = None) -> list[Any]:
    """The rules, as GX expectations (so the report names each rule): required columns and values,
    unique ids, lengths, no whitespace-only text, no chat-template control token inside a prompt or
    reference (a user could inject turns), no prompt shared by the train and eval splits, references
    where the task needs them, and (multi-teacher) teacher names that ``teachers:`` defines."""
    import re

    import great_expectations.expectations as gxe

    exps: list[Any] = [gxe.ExpectColumnToExist(column=c) for c in REQUIRED]
    exps += [gxe.ExpectColumnValuesToNotBeNull(column=c) for c in REQUIRED if c in columns]
    if "id" in columns:
        exps.append(gxe.ExpectColumnValuesToBeUnique(column="id"))
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
    for col in ("prompt", "reference"):
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


def validate_records(records: list[dict[str, Any]], cfg: DataConfig, name: str = "prompts",
                     control_tokens: list[str] = (), teacher_names: list[str] | None = None) -> ValidationReport:
    """Run the suite on raw records; never raises for bad data, returns the report."""
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    df = pd.DataFrame.from_records(records) if records else pd.DataFrame({c: [] for c in REQUIRED})
    df["reference_ok"] = _reference_ok(df, cfg.answer_format)
    df["prompt_not_in_other_split"] = _not_in_other_split(df)
    ctx = gx.get_context(mode="ephemeral")
    ctx.variables.progress_bars = ProgressBarsConfig(globally=False)
    batch = (ctx.data_sources.add_pandas(name).add_dataframe_asset("rows")
             .add_batch_definition_whole_dataframe("all").get_batch(batch_parameters={"dataframe": df}))
    suite = gx.ExpectationSuite(name=name, expectations=build_suite(list(df.columns), cfg, control_tokens, teacher_names))
    result = batch.validate(suite, result_format="COMPLETE")
    lines = []
    ids = df["id"].tolist() if "id" in df else list(range(len(df)))
    for r in result.results:
        if r.success:
            continue
        kw = r.expectation_config.kwargs
        what = r.expectation_config.type + (f"(column={kw['column']})" if "column" in kw else "")
        count = r.result.get("unexpected_count")
        if count is None:  # table-level or missing-column expectations
            lines.append(f"  {what}: failed" + (f" (observed {r.result.get('observed_value')})"
                                                 if r.result.get("observed_value") is not None else ""))
            continue
        index = r.result.get("unexpected_index_list") or []
        examples = [str(ids[i]) for i in index[:5]]
        values = ", ".join(repr(v) for v in (r.result.get("partial_unexpected_list") or [])[:3])
        lines.append(f"  {what}: {count} of {len(df)} rows; ids e.g. {examples}; values e.g. [{values}]")
    summary = (f"{name}: {len(df)} rows passed {len(result.results)} expectations" if result.success
               else f"{name}: validation failed ({len(lines)} expectations)\n" + "\n".join(lines))
    doc = result.to_json_dict()
    # GX stamps the batch with its load time; dropped so the same records give the same report, and a
    # no-op rerun of prepare leaves its output byte-identical (DVC then retrains nothing downstream)
    doc.get("meta", {}).get("batch_markers", {}).pop("ge_load_time", None)
    return ValidationReport(bool(result.success), summary, doc)
