"""Prepare stage tasks: build or load the rows, validate them with GX, write data/prepared/."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import mlflow
from prefect import task

from opd import __version__
from opd.config import Params
from opd.models import control_tokens, load_tokenizer, tokenizer_source
from opd.data import atomic_dir, atomic_write_text, load_user_records, records_to_rows, rows_to_records, write_jsonl
from opd.world import build_world, train_tokenizer
from opd.world.constitutions import DEFAULT_CONSTITUTIONS
from tasks.tracking import log_dataset
from tasks.validate import ValidationFailed, validate_records


@task(name="load-records", version=__version__)
def load_records(params: Params) -> list[dict[str, Any]]:
    if params.data.source == "embedded":
        return rows_to_records(build_world(params.world, params.seed))
    return load_user_records(params.data.source, params.data.path or "")


@task(name="validate-records", version=__version__)
def validate(records: list[dict[str, Any]], params: Params) -> dict[str, Any]:
    """Run the GX suite; the full result goes to the stage's MLflow run whether it passes or not."""
    report = validate_records(records, params.data, control_tokens=control_tokens(params),
                              teacher_names=["default", *params.teachers] if params.distill.routing == "by_row" else None)
    if mlflow.active_run():
        mlflow.log_dict(report.result, "validation/prompts.json")
        mlflow.set_tag("gx.success", str(report.success))
    if not report.success:
        raise ValidationFailed(report.summary)
    return {"summary": report.summary, "result": report.result}


@task(name="write-prepared", version=__version__)
def write_prepared(records: list[dict[str, Any]], validation: dict[str, Any], params: Params, out: Path) -> dict[str, Any]:
    """Copy the tokenizer of ``data.tokenizer_path`` or of the given model folders (student, else teacher),
    or train one for the embedded world; then write every output in one atomic folder swap."""
    rows = records_to_rows(records)
    train = [r for r in rows if r.split == "train"]
    source = tokenizer_source(params)
    if source:  # the models' own tokenizer (and chat template): a trained one would not match their vocabulary
        tok = load_tokenizer(source, params.runtime.trust_remote_code)
    else:
        # the constitutions are weighted like the rows they wrap, so BPE merges their words too
        weight = sum(r.task != "reasoning" for r in train) // len(DEFAULT_CONSTITUTIONS) + 1
        corpus = [t for r in train for t in (r.prompt, r.reference or "")] + list(DEFAULT_CONSTITUTIONS.values()) * weight
        tok = train_tokenizer(corpus, params.world.vocab_size)
    lengths = [len(tok(r.prompt + (r.reference or ""), add_special_tokens=False)["input_ids"]) + 4 for r in rows]
    stats = {
        "rows": len(rows),
        "by_split_task": {f"{s}/{t}": n for (s, t), n in sorted(Counter((r.split, r.task) for r in rows).items())},
        "vocab_size": len(tok),
        "tokens_per_row_max": max(lengths),
        "tokens_per_row_mean": round(sum(lengths) / len(lengths), 2),
    }
    with atomic_dir(out) as tmp:
        write_jsonl(tmp / "train.jsonl", train)
        write_jsonl(tmp / "eval.jsonl", [r for r in rows if r.split == "eval"])
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
