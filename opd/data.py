"""Row schema, JSONL / `datasets` loading, atomic writes, and chat formatting.

A row is one prompt of one task::

    {"id": "reasoning-00001", "split": "train" | "eval", "task": "reasoning" | "safety" |
     "borderline" | "general", "category": a lowercase label (the embedded world's harm categories
     "violence" | "illegal" | "hate" | "privacy" | "self_harm", a reasoning problem's type, its item:
     "apples" | "coins" | ..., else "none"; COPSD wraps a row in the constitution of its category,
     else the "default" one; evaluation and teacher reliability are reported per category), "prompt": "...", "reference": "...", "teacher": "name" (optional),
     "system": "..." (optional: a system turn for every model that reads the row)}

``reference`` is the wanted response: a worked solution ending in ``Answer: N`` for reasoning, a
refusal that explains and redirects for safety, a helpful answer for borderline and general.
Only the parse errors a loader cannot survive are raised here (bad JSON, bad bytes, wrong types);
the dataset-level rules (unique ids, allowed values, lengths) are a Great Expectations suite run
by the prepare stage, so they are reported all at once with example ids.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

COLUMNS = ("id", "split", "task", "category", "prompt", "reference", "teacher", "system")
REQUIRED = ("id", "split", "task", "category", "prompt")
SPLITS = ("train", "eval")


class DataError(ValueError):
    """Input data that cannot be read; the message says which file and line."""


@dataclass(frozen=True)
class Row:
    id: str
    split: str
    task: str
    category: str
    prompt: str
    reference: str | None = None
    teacher: str | None = None
    system: str | None = None

    def to_json(self) -> str:
        return json.dumps(asdict(self), ensure_ascii=False, sort_keys=True)


def rows_to_records(rows: Iterable[Row]) -> list[dict[str, Any]]:
    return [asdict(r) for r in rows]


def check_record(rec: Any, where: str) -> dict[str, Any]:
    """Type-check one raw record; missing columns stay missing for the GX suite to report."""
    if not isinstance(rec, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    unknown = sorted(set(rec) - set(COLUMNS))
    if unknown:
        raise DataError(f"{where}: unknown column(s) {unknown}; allowed: {list(COLUMNS)}")
    for col in COLUMNS:
        val = rec.get(col)
        if val is not None and not isinstance(val, str):
            raise DataError(f"{where}{_row_id(rec)}: column {col!r} must be a string, got {type(val).__name__}")
        if isinstance(val, str):
            try:
                val.encode("utf-8")
            except UnicodeEncodeError as err:  # a JSON \ud800 escape: no text encoding can write it
                raise DataError(f"{where}{_row_id(rec)}: column {col!r} holds a lone surrogate "
                                f"({val[err.start]!r} at character {err.start}): not text; fix the escape") from None
    return rec


def _row_id(rec: dict[str, Any]) -> str:
    rid = rec.get("id")
    return f" (id {rid[:80]!r})" if isinstance(rid, str) and rid.isprintable() else ""


def records_to_rows(records: Iterable[dict[str, Any]]) -> list[Row]:
    """Rows from records that passed validation (absent optional columns become None)."""
    return [Row(**{f.name: rec.get(f.name) for f in fields(Row)}) for rec in records]


def iter_jsonl(path: str | Path) -> Iterator[dict[str, Any]]:
    """The records of a JSONL file, one line at a time (the file is never held whole in memory);
    invalid UTF-8 or JSON fails naming the file and line. A UTF-8 byte-order mark (Windows exports)
    is skipped; CRLF line ends are JSON whitespace."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    with path.open("rb") as f:
        for lineno, line in enumerate(f, start=1):
            if lineno == 1:
                line = line.removeprefix(b"\xef\xbb\xbf")
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError as err:
                raise DataError(f"{where}: not valid UTF-8 (byte {err.start}: {line[err.start:err.start + 4]!r})") from None
            try:
                rec = json.loads(text)
            except json.JSONDecodeError as err:
                raise DataError(f"{where}: invalid JSON ({err.msg} at column {err.colno})") from None
            except RecursionError:
                raise DataError(f"{where}: JSON nested too deeply to be a row (a row is one flat object)") from None
            yield check_record(rec, where)


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    return list(iter_jsonl(path))


def iter_user_records(source: str, path: str) -> Iterator[dict[str, Any]]:
    """The user's own data, streamed: a JSONL file (with a split column), a folder of train/eval
    JSONL, or a folder saved by ``datasets`` (a Dataset with a split column, or a DatasetDict
    train/eval; Arrow, memory-mapped)."""
    p = Path(path)
    if not p.exists():
        raise DataError(f"data.path {p}: does not exist")
    if source == "jsonl":
        if p.is_file():
            yield from iter_jsonl(p)
            return
        for split in SPLITS:
            if not (p / f"{split}.jsonl").is_file():
                raise DataError(f"data.path {p}: expected {split}.jsonl in the folder")
        for split in SPLITS:
            yield from ({"split": split, **rec} for rec in iter_jsonl(p / f"{split}.jsonl"))
        return
    import datasets  # local import: only this path needs it

    try:
        ds = datasets.load_from_disk(str(p))
    except Exception as err:  # datasets raises several types for a bad folder
        raise DataError(f"data.path {p}: not a datasets folder ({err})") from None
    parts = ds.items() if isinstance(ds, datasets.DatasetDict) else [(None, ds)]
    for split, part in parts:
        for i, rec in enumerate(part):
            rec = {k: v for k, v in rec.items() if v is not None}
            if split is not None:
                rec.setdefault("split", split)
            yield check_record(rec, f"{p}[{split or 'all'}][{i}]")


def load_user_records(source: str, path: str) -> list[dict[str, Any]]:
    return list(iter_user_records(source, path))


def chunked(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    """Consecutive lists of at most ``size`` items."""
    chunk: list[Any] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


@contextlib.contextmanager
def atomic_dir(final: str | Path) -> Iterator[Path]:
    """Yield a temp folder beside ``final``; on success it replaces ``final`` in one rename.

    On any exception the temp folder is removed and ``final`` is left as it was, so a failed
    stage never leaves a half-written output (DVC keeps whatever a failing command wrote).
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the output is an ordinary folder
    try:
        yield tmp
        if final.exists():
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write a file through a temp file and a rename."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write a file through a temp file and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_json(path: str | Path, obj: Any) -> None:
    """Sorted, indented JSON through :func:`atomic_write_text` (the same object gives the same bytes)."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def digest(path: Path) -> str:
    """The content hash DVC records in dvc.lock: md5 of a file, or of a folder's sorted
    ``[{"md5", "relpath"}]`` listing with ``.dir`` appended. Why DVC's scheme: every hash the
    pipeline shows (MLflow lineage tags, the registry, the model card) can be matched against dvc.lock
    and against each other, also for runs made outside DVC (the Prefect pipeline, a schedule)."""
    path = Path(path)
    if path.is_file():
        return _md5_file(path)
    listing = sorted(({"md5": _md5_file(f), "relpath": f.relative_to(path).as_posix()}
                      for f in path.rglob("*") if f.is_file()), key=lambda e: e["relpath"])
    return hashlib.md5(json.dumps(listing, sort_keys=True).encode(), usedforsecurity=False).hexdigest() + ".dir"


def _md5_file(path: Path) -> str:
    h = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_jsonl(path: str | Path, rows: Iterable[Row]) -> None:
    atomic_write_text(path, "".join(r.to_json() + "\n" for r in rows))


def chat(prompt: str, system: str | None = None) -> list[dict[str, str]]:
    """The messages of one prompt: an optional system turn, then the user turn. Without a system
    turn a model's template adds its own default one (SmolLM2's "You are a helpful AI assistant...")."""
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]


def load_rows(prepared: Path, split: str) -> list[Row]:
    """A prepared split (``train`` / ``eval``) as rows."""
    return records_to_rows(read_jsonl(prepared / f"{split}.jsonl"))


def content_of(*paths: Path) -> dict[str, str]:
    """Content hashes of what a run reads (the train split, the tokenizer, model folders), for checkpoint
    fingerprints: a killed run resumes only into the very same inputs, never after the data changed."""
    return {f"{i}:{Path(p).name}": digest(Path(p)) for i, p in enumerate(paths)}  # two folders may share a name
