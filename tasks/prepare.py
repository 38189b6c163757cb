"""Prepare stage tasks: build or load the rows, validate them with GX, write data/prepared/."""

from __future__ import annotations

import itertools
import json
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlflow
from prefect import get_run_logger, task
from transformers import PreTrainedTokenizerBase

from opd import __version__
from opd.config import DEFAULT_TEACHER, Params
from opd.models import control_tokens, load_tokenizer, tokenizer_source
from opd.data import atomic_dir, atomic_write_text, chunked, iter_user_records, records_to_rows, rows_to_records
from opd.world import build_world, train_tokenizer
from opd.world.constitutions import DEFAULT_CONSTITUTIONS
from tasks.tracking import log_dataset
from tasks.validate import ValidationFailed, validate_records


CHUNK_ROWS = 1024  # rows tokenized and written per batch


def records_of(params: Params) -> Iterator[dict[str, Any]]:
    """The rows as raw records, streamed anew on every call: the embedded world, or the user's data
    (``data.source`` / ``data.path``), never held whole in memory."""
    if params.data.source == "embedded":
        return iter(rows_to_records(build_world(params.world, params.seed)))
    return iter_user_records(params.data.source, params.data.path or "")


@task(name="validate-records", version=__version__)
def validate(params: Params) -> dict[str, Any]:
    """Run the GX suite, streaming the records; the full result goes to the stage's MLflow run whether
    it passes or not."""
    by_row = params.distill.routing == "by_row"
    report = validate_records(lambda: records_of(params), params.data, control_tokens=control_tokens(params),
                              teacher_names=[DEFAULT_TEACHER, *params.teachers] if by_row else None)
    ignored = ignored_teachers(report.teachers, params)
    if ignored:
        get_run_logger().warning(ignored)
    if mlflow.active_run():
        mlflow.log_dict(report.result, "validation/prompts.json")
        mlflow.set_tag("gx.success", str(report.success))
    if not report.success:
        raise ValidationFailed(report.summary)
    return {"summary": report.summary, "result": report.result}


def ignored_teachers(named: dict[str, int], params: Params) -> str | None:
    """Under single routing, what to say (once) when rows name teachers that ``teachers:`` does not
    define: the column is ignored, not routed (under by_row such rows fail the suite instead). The
    embedded world's rows carry routing hints for its multi-teacher recipes: nothing to say there."""
    unknown = sorted(set(named) - {DEFAULT_TEACHER, *params.teachers})
    if not unknown or params.distill.routing == "by_row" or params.data.source == "embedded":
        return None
    return (f"{sum(named[n] for n in unknown)} rows name teachers that `teachers:` does not define "
            f"({', '.join(map(repr, unknown[:5]))}); distill.routing is single, so the column is ignored and the "
            "default teacher scores every row (set distill.routing: by_row and define them to route)")


def _tokenizer(params: Params) -> PreTrainedTokenizerBase:
    """The tokenizer of ``data.tokenizer_path`` or of the given model folders (student, else teacher),
    or one trained on the train split for the embedded world."""
    source = tokenizer_source(params)
    if source:  # the models' own tokenizer (and chat template): a trained one would not match their vocabulary
        return load_tokenizer(source, params.runtime.trust_remote_code)
    train = lambda: (rec for rec in records_of(params) if rec["split"] == "train")  # noqa: E731
    # the constitutions are weighted like the rows they wrap, so BPE merges their words too
    weight = sum(rec["task"] != "reasoning" for rec in train()) // len(DEFAULT_CONSTITUTIONS) + 1
    corpus = itertools.chain((t for rec in train() for t in (rec["prompt"], rec.get("reference") or "")),
                             list(DEFAULT_CONSTITUTIONS.values()) * weight)
    return train_tokenizer(corpus, params.world.vocab_size)


@task(name="write-prepared", version=__version__)
def write_prepared(validation: dict[str, Any], params: Params, out: Path) -> dict[str, Any]:
    """Write the splits, the tokenizer and the stats in one atomic folder swap, streaming the rows
    (``CHUNK_ROWS`` at a time: tokenized in one batch for the length statistics)."""
    tok = _tokenizer(params)
    counts: Counter[tuple[str, str]] = Counter()
    n, longest, total = 0, 0, 0
    with atomic_dir(out) as tmp:
        with open(tmp / "train.jsonl", "w", encoding="utf-8") as train, open(tmp / "eval.jsonl", "w", encoding="utf-8") as held:
            for chunk in chunked(records_of(params), CHUNK_ROWS):
                rows = records_to_rows(chunk)
                for r in rows:
                    (train if r.split == "train" else held).write(r.to_json() + "\n")
                lengths = [len(ids) + 4 for ids in tok([r.prompt + (r.reference or "") for r in rows],
                                                       add_special_tokens=False)["input_ids"]]
                counts.update((r.split, r.task) for r in rows)
                n, longest, total = n + len(rows), max(longest, *lengths), total + sum(lengths)
        stats = {
            "rows": n,
            "by_split_task": {f"{s}/{t}": k for (s, t), k in sorted(counts.items())},
            "vocab_size": len(tok),
            "tokens_per_row_max": longest,
            "tokens_per_row_mean": round(total / n, 2),
        }
        tok.save_pretrained(tmp / "tokenizer")
        atomic_write_text(tmp / "constitutions.json", json.dumps(DEFAULT_CONSTITUTIONS, indent=2) + "\n")
        atomic_write_text(tmp / "validation.json", json.dumps(validation["result"], indent=2, default=str) + "\n")
        atomic_write_text(tmp / "stats.json", json.dumps(stats, indent=2) + "\n")
    return stats


@task(name="log-prepared", version=__version__, retries=2, retry_delay_seconds=5)
def log_prepared(out: Path, stats: dict[str, Any]) -> None:
    """Dataset digests (MLflow datasets API) and sizes on the stage's run."""
    log_dataset(out, "train")
    log_dataset(out, "eval")
    mlflow.log_metrics({"rows": stats["rows"], "tokens_per_row_max": stats["tokens_per_row_max"],
                        **{f"rows.{k.replace('/', '.')}": v for k, v in stats["by_split_task"].items()}})
    mlflow.log_dict(stats, "stats.json")
