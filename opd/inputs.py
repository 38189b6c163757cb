"""Content hashes of the user's inputs that only params.yaml names (DVC cannot see inside them).

Kept apart from the stages (no torch import): the ``user_inputs`` DVC stage runs on every ``dvc
repro`` and should cost about a second.
"""

from __future__ import annotations

from pathlib import Path

from opd.config import Params
from opd.data import digest
from opd.paths import Layout


def user_inputs(params: Params) -> dict[str, dict[str, str]]:
    """Content hashes of the user's inputs that only params.yaml names: model folders (``teacher.path``,
    ``student.path``, ``teachers.*.path``), the data (``data.path``) and the constitutions file.

    DVC tracks paths named in dvc.yaml, so it could not see a change inside these. The
    ``user_inputs`` stage (always run, a second or two) writes this to ``data/user_inputs.json``; the
    stages that read them depend on that file, and rerun exactly when a content changes.
    """
    models = {"teacher": params.teacher, "student": params.student, **{f"teacher_{n}": m for n, m in params.teachers.items()}}
    # name -> (the setting that names it, its path or None, whether it must be a model folder)
    inputs = {name: (f"{name}.path", m.path, True) for name, m in models.items()}
    inputs["data"] = ("data.path", params.data.path if params.data.source != "embedded" else None, False)
    inputs["constitutions"] = ("copsd.constitutions", params.copsd.constitutions, False)
    out = {}
    for name, (setting, path, folder) in inputs.items():
        if not path:
            continue
        p = Path(path)
        if not (p.is_dir() if folder else p.exists()):
            raise FileNotFoundError(f"{setting} {path}: {'no such model folder' if folder else 'does not exist'}")
        full, root = p.resolve(), Layout.here().root
        out[name] = {"path": str(full.relative_to(root) if full.is_relative_to(root) else full), "md5": digest(p)}
    return out
