"""Where each stage reads and writes, relative to the project folder (DVC tracks all of these).

The folder is ``$OPD_ROOT`` when set, else the current directory: DVC runs stage commands from
the repository root, and tests run whole stages inside temporary copies.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Layout:
    root: Path

    @classmethod
    def here(cls) -> Layout:
        return cls(Path(os.environ.get("OPD_ROOT") or Path.cwd()).resolve())

    @property
    def params(self) -> Path:
        return self.root / "params.yaml"

    @property
    def prepared(self) -> Path:
        return self.root / "data" / "prepared"

    @property
    def models_base(self) -> Path:  # teacher + initial student (manifest.json names their folders)
        return self.root / "models" / "base"

    @property
    def cross_sft(self) -> Path:  # the Cross-SFT recalibrated teacher (COPSD) and its mix
        return self.root / "models" / "cross_sft"

    @property
    def student(self) -> Path:  # the distilled student
        return self.root / "models" / "student"

    @property
    def checkpoints(self) -> Path:  # resumable training state; not a DVC output
        return self.root / "models" / "checkpoints"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics"

    @property
    def plots(self) -> Path:
        return self.root / "plots"


MANIFEST = "manifest.json"  # the teacher stage's names of the model folders it provides
RELIABILITY = "reliability.json"  # each teacher's greedy correctness per "<task>/<category>" (eval split)


def resolve(base: Path, name: str) -> Path:
    """A model folder named in the teacher stage's manifest (relative names live under ``base``)."""
    mpath = base / MANIFEST
    if not mpath.is_file():
        raise FileNotFoundError(f"{mpath} missing: run the teacher stage first (dvc repro teacher)")
    path = Path(json.loads(mpath.read_text())[name])
    return path if path.is_absolute() else base / path
