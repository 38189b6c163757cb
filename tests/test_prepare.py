"""The prepare stage: GX validation of user data through the real Prefect flow, and DVC."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from flows.prepare import prepare_flow
from tasks.validate import ValidationFailed
from tests.conftest import REPO, tiny

GOOD = {"id": "r1", "split": "train", "task": "reasoning", "category": "none",
        "prompt": "Ana has 2 pens, gets 3. How many pens?", "reference": " 2+3=5. Answer: 5"}
EVAL = {"id": "g1", "split": "eval", "task": "general", "category": "none",
        "prompt": "Opposite of hot?", "reference": "The opposite of hot is cold."}


def lines(*records) -> bytes:
    return b"".join(json.dumps(r).encode() + b"\n" for r in records)


CATALOGUE = {
    "missing column": (lines(*({k: v for k, v in r.items() if k != "category"} for r in (GOOD, EVAL))),
                       "expect_column_to_exist(column=category)"),
    "null prompt": (lines({**GOOD, "prompt": None}, EVAL), "expect_column_values_to_not_be_null(column=prompt): 1 of 2 rows; ids e.g. ['r1']"),
    "duplicate id": (lines(GOOD, {**EVAL, "id": "r1"}), "expect_column_values_to_be_in_set(column=id_unique): 2 of 2 rows"),
    "bad category label": (lines({**GOOD, "category": "Weapons & guns"}, EVAL), "expect_column_values_to_match_regex(column=category): 1 of 2 rows; ids e.g. ['r1']; values e.g. ['Weapons & guns']"),
    "empty prompt": (lines({**GOOD, "prompt": ""}, EVAL), "expect_column_value_lengths_to_be_between(column=prompt): 1 of 2"),
    "over-long prompt": (lines({**GOOD, "prompt": "x" * 401}, EVAL), "expect_column_value_lengths_to_be_between(column=prompt): 1 of 2"),
    "bad split": (lines({**GOOD, "split": "test"}, EVAL), "expect_column_values_to_be_in_set(column=split): 1 of 2 rows"),
    "reasoning without answer line": (lines({**GOOD, "reference": "five"}, EVAL), "column=reference_ok): 1 of 2 rows; ids e.g. ['r1']"),
    "eval row without reference": (lines(GOOD, {k: v for k, v in EVAL.items() if k != "reference"}), "column=reference_ok): 1 of 2 rows; ids e.g. ['g1']"),
    "invalid JSON line": (lines(GOOD) + b'{"id": "x", \n', "data.jsonl:2: invalid JSON"),
    "non-UTF-8 bytes": (lines(GOOD) + b'{"id": "\xff\xfe"}\n', "data.jsonl:2: not valid UTF-8"),
    "wrong type": (lines({**GOOD, "prompt": 7}, EVAL), "data.jsonl:1 (id 'r1'): column 'prompt' must be a string"),
    "empty file": (b"", "expect_table_row_count_to_be_between: failed (observed 0)"),
}


@pytest.mark.parametrize("case", sorted(CATALOGUE))
def test_bad_user_data_is_rejected_and_nothing_written(prefect_api, project, case):
    content, expected = CATALOGUE[case]
    (project / "data.jsonl").write_bytes(content)
    with pytest.raises(Exception) as e:
        prepare_flow(overrides={"data.source": "jsonl", "data.path": str(project / "data.jsonl")})
    assert expected in str(e.value), str(e.value)
    assert not (project / "data").exists()  # no output, not even a temp folder


def test_good_user_data_and_a_failed_rerun_keeps_the_old_output(prefect_api, project):
    path = project / "data.jsonl"
    path.write_bytes(lines(GOOD, EVAL))
    ov = {"data.source": "jsonl", "data.path": str(path), "world.vocab_size": 300}
    stats = prepare_flow(overrides=ov)
    out = project / "data" / "prepared"
    assert stats["rows"] == 2 and (out / "tokenizer" / "tokenizer.json").is_file()
    assert json.loads((out / "validation.json").read_text())["success"] is True
    before = (out / "train.jsonl").read_bytes()
    snapshot = {f: f.read_bytes() for f in out.rglob("*") if f.is_file()}
    prepare_flow(overrides=ov)  # the same inputs again: byte-identical output, so DVC sees no change
    assert {f: f.read_bytes() for f in out.rglob("*") if f.is_file()} == snapshot
    path.write_bytes(lines(GOOD, {**EVAL, "id": "r1"}))
    with pytest.raises(ValidationFailed):
        prepare_flow(overrides=ov)
    assert (out / "train.jsonl").read_bytes() == before
    assert sorted(p.name for p in (project / "data").iterdir()) == ["prepared"]


def test_datasets_folder_is_accepted(prefect_api, project):
    import datasets

    dd = datasets.DatasetDict({"train": datasets.Dataset.from_list([{k: v for k, v in GOOD.items() if k != "split"}]),
                               "eval": datasets.Dataset.from_list([{k: v for k, v in EVAL.items() if k != "split"}])})
    dd.save_to_disk(str(project / "ds"))
    stats = prepare_flow(overrides={"data.source": "datasets", "data.path": str(project / "ds"), "world.vocab_size": 300})
    assert stats["by_split_task"] == {"eval/general": 1, "train/reasoning": 1}


def copy_repo(dst: Path) -> None:
    """The project's tracked sources (not data, models or the venv), as a fresh clone would have them."""
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                           capture_output=True, text=True, check=True).stdout.split()
    for f in files:
        if (REPO / f).is_file():
            (dst / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / f, dst / f)


def test_dvc_repro_and_experiments_of_prepare_in_a_copy(tmp_path):
    """dvc repro, a no-op rerun and a --temp experiment (which runs in a copy DVC deletes, the
    hardest case for finding the project's store): the experiment is one pipeline run, keyed by its
    name, in the project's own MLflow store."""
    from mlflow import MlflowClient

    copy_repo(tmp_path)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(tiny()))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1",
           "PREFECT_HOME": str(REPO / ".prefect")}
    for k in ("OPD_ROOT", "MLFLOW_TRACKING_URI", "PREFECT_API_URL", "OPD_PIPELINE_KEY", "DVC_ROOT"):
        env.pop(k, None)

    def sh(*cmd: str) -> str:
        r = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, f"{cmd}: {r.stdout[-3000:]}\n{r.stderr[-3000:]}"
        return r.stdout + r.stderr

    sh("git", "init", "-q")
    sh("git", "add", "-A")
    sh("git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "copy")
    out = sh("dvc", "repro", "prepare")
    assert "Running stage 'prepare'" in out
    stats = json.loads((tmp_path / "data/prepared/stats.json").read_text())
    assert stats["rows"] > 0
    first = (tmp_path / "data/prepared/train.jsonl").read_bytes()
    assert "didn't change" in sh("dvc", "repro", "prepare")
    sh("dvc", "exp", "run", "--temp", "-n", "tmp-exp", "-S", "seed=3", "prepare")
    assert (tmp_path / "data/prepared/train.jsonl").read_bytes() == first  # the experiment ran in a copy
    assert "tmp-exp" in sh("dvc", "exp", "show", "--csv", "--no-pager")
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlruns.db'}")
    runs = client.search_runs([client.get_experiment_by_name("opd").experiment_id])
    parents = {r.data.tags["opd.pipeline_key"].rsplit("-", 1)[0]: r.info.run_id for r in runs
               if r.data.tags.get("opd.kind") == "pipeline"}
    assert "exp-tmp-exp" in parents
    assert [r.info.run_name for r in runs if r.data.tags.get("mlflow.parentRunId") == parents["exp-tmp-exp"]] == ["prepare"]


DATA = Path(__file__).parent / "data"


@pytest.mark.parametrize("name, rule, bad_ids", [
    ("leak.jsonl", "expect_column_values_to_be_in_set(column=prompt_not_in_other_split)", ["r2", "r3"]),
    ("whitespace.jsonl", "expect_column_values_to_match_regex(column=prompt)", ["r4"]),
    ("whitespace.jsonl", "expect_column_values_to_match_regex(column=reference)", ["r5"]),
    ("control_tokens.jsonl", "expect_column_values_to_not_match_regex_list(column=prompt)", ["r6"]),
    ("control_tokens.jsonl", "expect_column_values_to_not_match_regex_list(column=reference)", ["r7"]),
    ("unknown_teacher.jsonl", "expect_column_values_to_be_in_set(column=teacher)", ["r8"]),
    ("system_tokens.jsonl", "expect_column_values_to_not_match_regex_list(column=system)", ["r9"]),
    ("zero_width_leak.jsonl", "expect_column_values_to_be_in_set(column=prompt_not_in_other_split)", ["r1", "r2", "r3"]),
])
def test_bad_user_data_is_stopped_with_the_rule_and_the_rows(name, rule, bad_ids):
    from opd.params import parse
    from opd.data import read_jsonl
    from opd.models import control_tokens
    from tasks.validate import validate_records

    params = parse({"distill": {"routing": "by_row"}, "teachers": {"reasoning": {}}})
    report = validate_records(read_jsonl(DATA / name), params.data, control_tokens=control_tokens(params),
                              teacher_names=["default", *params.teachers])
    assert not report.success
    line = next(line for line in report.summary.splitlines() if rule in line)
    assert f"{len(bad_ids)} of" in line and all(f"'{i}'" in line for i in bad_ids), report.summary


def test_a_table_without_eval_rows_is_stopped_at_prepare():
    from opd.config import DataConfig
    from opd.data import read_jsonl
    from tasks.validate import validate_records

    report = validate_records(read_jsonl(DATA / "no_eval_rows.jsonl"), DataConfig())
    assert not report.success and "no eval rows: none of the 2 rows has split 'eval'" in report.summary


def test_rows_naming_undefined_teachers_are_said_to_be_ignored_under_single_routing():
    """The embedded world names a teacher per row as a routing hint; under the default (single)
    routing the column is not used: prepare says once that it is ignored, naming the names."""
    from opd.params import parse
    from opd.data import read_jsonl
    from tasks.prepare import ignored_teachers
    from tasks.validate import validate_records

    single = parse({"data": {"source": "jsonl", "path": str(DATA / "unknown_teacher.jsonl")}})
    report = validate_records(read_jsonl(DATA / "unknown_teacher.jsonl"), single.data)
    assert report.success and report.teachers == {"reasoning": 2, "maths": 1}
    message = ignored_teachers(report.teachers, single)
    assert message.startswith("3 rows name teachers that `teachers:` does not define ('maths', 'reasoning')")
    assert ignored_teachers(report.teachers, parse({})) is None  # the embedded world's routing hints
    assert ignored_teachers(report.teachers, single.model_copy(update={"teachers": {"reasoning": {}, "maths": {}}})) is None
    routed = parse({"distill": {"routing": "by_row"}, "teachers": {"reasoning": {}}})
    assert ignored_teachers(report.teachers, routed) is None  # by_row: the suite rejects the row instead
    assert "the column is ignored" in message


@pytest.mark.parametrize("name, message", [
    ("lone_surrogate.jsonl", r"lone_surrogate.jsonl:2 \(id 'r2'\): column 'prompt' holds a lone surrogate \('\\ud800' at character 4\)"),
    ("deep_nesting.jsonl", r"deep_nesting.jsonl:2: JSON nested too deeply to be a row"),
])
def test_unreadable_rows_fail_naming_the_file_line_and_id(name, message):
    from opd.data import DataError, read_jsonl

    with pytest.raises(DataError, match=message):
        read_jsonl(DATA / name)


def test_a_huge_value_is_quoted_once_and_cut():
    """A 10 MB prompt is rejected by the length rule; the report quotes 200 characters of it, and the GX
    result (an MLflow artifact) holds no copy of the whole value."""
    import json

    from opd.config import DataConfig
    from tasks.validate import validate_records

    huge = "A" * 10_000_000
    records = [{"id": "r1", "split": "train", "task": "general", "category": "none", "prompt": huge},
               {"id": "r2", "split": "eval", "task": "general", "category": "none", "prompt": "Hi", "reference": "Hello."}]
    report = validate_records(records, DataConfig(max_prompt_chars=4000))
    assert not report.success and "(10,000,000 characters)" in report.summary
    assert len(report.summary) < 2_000 and report.summary.count("A" * 200) == 1 and "A" * 201 not in report.summary
    assert len(json.dumps(report.result)) < 100_000


def test_a_bom_and_crlf_file_is_read_like_any_other():
    from opd.config import DataConfig
    from opd.data import read_jsonl
    from tasks.validate import validate_records

    records = read_jsonl(DATA / "bom_crlf.jsonl")
    assert [r["id"] for r in records] == ["r1", "r2"] and records[0]["prompt"] == "What day comes after Monday?"
    assert validate_records(records, DataConfig()).success


@pytest.mark.parametrize("name", ["leak.jsonl", "whitespace.jsonl", "control_tokens.jsonl", "unknown_teacher.jsonl"])
def test_validating_in_chunks_reports_what_one_batch_reports(name):
    """Prepare validates a large file chunk by chunk (memory does not grow with the file); the
    report, counts and example ids included, is the one a single GX batch of the whole table gives,
    also when duplicates, leaks and bad rows fall in different chunks (chunks of 2 rows)."""
    from opd.params import parse
    from opd.data import iter_jsonl
    from opd.models import control_tokens
    from tasks.validate import validate_records

    params = parse({"distill": {"routing": "by_row"}, "teachers": {"reasoning": {}}})
    kw = {"control_tokens": control_tokens(params), "teacher_names": ["default", *params.teachers]}
    whole = validate_records(list(iter_jsonl(DATA / name)), params.data, **kw)
    chunked = validate_records(lambda: iter_jsonl(DATA / name), params.data, chunk_rows=2, **kw)
    assert not whole.success and chunked.summary == whole.summary
    for a, b in zip(whole.result["results"], chunked.result["results"]):
        assert a["success"] == b["success"] and a["result"].get("unexpected_count") == b["result"].get("unexpected_count")
        assert a["result"].get("unexpected_index_list") == b["result"].get("unexpected_index_list")


def test_the_shipped_example_data_passes_validation():
    """data/example.jsonl is the format documented in data/README.md; it must stay valid."""
    from opd.config import DataConfig
    from opd.data import read_jsonl
    from tasks.validate import validate_records

    records = read_jsonl(REPO / "data/example.jsonl")
    report = validate_records(records, DataConfig(source="jsonl", path=str(REPO / "data/example.jsonl")))
    assert report.success, report.summary
    assert {r["task"] for r in records} == {"reasoning", "safety", "borderline", "general"}
    assert {r["split"] for r in records} == {"train", "eval"}


def test_a_failing_stage_prints_its_error_not_tracebacks(tmp_path):
    """The line a user can act on comes first, with no Prefect traceback around it; the tracebacks are
    in the project's log file, which the output names."""
    import subprocess
    import sys

    import yaml

    from tests.conftest import tiny

    params = tiny()
    params["data"] |= {"source": "jsonl", "path": str(DATA / "no_eval_rows.jsonl")}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    r = subprocess.run([sys.executable, "-m", "flows", "prepare"], cwd=REPO, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OPD_ROOT": str(tmp_path), "PREFECT_HOME": str(tmp_path / ".prefect")})
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and lines[0].startswith("error: prepare failed: ValidationFailed"), r.stderr
    assert len(lines) <= 4 and "Traceback" not in r.stderr + r.stdout and "Error logging to API" not in r.stderr
    assert lines[-1] == f"(traceback: {tmp_path / '.prefect' / 'opd.log'})"
    log = (tmp_path / ".prefect" / "opd.log").read_text()
    assert "Traceback" in log and "no eval rows" in log
