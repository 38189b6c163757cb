"""A LoRA student against a full fine-tune of the same student: step time, peak memory, checkpoint size.

    python benchmarks/lora.py --root ../opd-qwen [--steps 3] [--set KEY=VALUE ...]
    python benchmarks/lora.py --root PROJECT          # any project with data/prepared and models/base

Each side is one ``distill_stage`` in a fresh process (its peak resident memory is its own), one after
the other, same settings but ``student.lora``. The default method is COPSD with the self-teacher and
its KL term, where LoRA saves the most: a full fine-tune holds the student, its gradients, AdamW's two
moments, a frozen copy as the self-teacher and another as the reference; a LoRA run holds the base once
(the teacher and the reference are the base with the adapters off) and optimiser state for the
adapters only. Step time is measured between the training loop's per-step callbacks (so it includes
each checkpoint written), the checkpoint's size on disk at the last step.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "benchmarks" / "results" / "lora.json"
LORA = {"r": 16, "alpha": 32.0, "target_modules": "all-linear"}


def child(root: Path, sets: dict, out: Path) -> None:
    sys.path.insert(0, str(ROOT))
    import tasks  # noqa: F401  (environment)
    from opd.params import load
    from opd.data import write_json
    from opd.paths import MANIFEST, Layout
    from opd.stages import distill_stage

    os.chdir(root)  # a recipe's relative paths (models/real/..., data/real/...) are the work tree's
    params = load(root / "params.yaml", sets)
    lay = Layout(root)
    stamps: list[float] = []
    ckpt_bytes: list[int] = []

    def log(step: int, metrics: dict) -> None:
        stamps.append(time.perf_counter())
        found = sorted(p for p in ckpt.glob("step-*") if p.is_dir())
        if found:
            ckpt_bytes.append(sum(f.stat().st_size for f in found[-1].rglob("*") if f.is_file()))

    with tempfile.TemporaryDirectory(dir=root) as tmp:
        ckpt, base = Path(tmp) / "ckpt", lay.models_base
        if not (base / MANIFEST).is_file() and params.teacher.path and params.student.path:
            base = Path(tmp) / "base"  # a recipe's work tree before its teacher stage: the pair as given
            write_json(base / MANIFEST, {"teacher": str((root / params.teacher.path).resolve()),
                                         "student_init": str((root / params.student.path).resolve())})
        t0 = time.perf_counter()
        summary, history = distill_stage(params, lay.prepared, base, lay.cross_sft, Path(tmp) / "student", ckpt, log)
        total = time.perf_counter() - t0
        saved = sum(f.stat().st_size for f in (Path(tmp) / "student").rglob("*.safetensors"))
    steps = [b - a for a, b in zip(stamps, stamps[1:])]  # the first step (warm-up, model loads) left out
    out.write_text(json.dumps({
        "s_per_step": sum(steps) / len(steps) if steps else total, "step_s": steps, "stage_s": total,
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "checkpoint_mb": ckpt_bytes[-1] / 2**20 if ckpt_bytes else None, "saved_model_mb": saved / 2**20,
        "loss": [h["loss"] for h in history], **summary.get("lora", {})}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--out", type=Path, default=OUT, help="the JSON of the table (default benchmarks/results/lora.json)")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    import yaml

    sets = {"distill.method": "copsd", "copsd.teacher": "self", "distill.steps": args.steps,
            "distill.checkpoint_every": 1, "distill.keep_checkpoints": 1, "distill.log_every": 1}
    sets |= {k: yaml.safe_load(v) for k, v in (s.split("=", 1) for s in args.sets)}
    if args.child:
        child(args.root.resolve(), json.loads(args.child[0]), Path(args.child[1]))
        return
    rows = {}
    for name, extra in (("full fine-tune", {}), (f"LoRA r {LORA['r']}, all linear", {"student.lora": LORA})):
        with tempfile.NamedTemporaryFile(suffix=".json") as f:
            r = subprocess.run([sys.executable, __file__, "--root", str(args.root), "--child", json.dumps(sets | extra), f.name],
                               capture_output=True, text=True)
            if r.returncode:
                sys.exit(f"{name}: failed\n{r.stderr[-3000:]}")
            rows[name] = json.loads(Path(f.name).read_text())
        print(f"{name}: {rows[name]['s_per_step']:.1f} s/step, {rows[name]['peak_rss_gb']:.2f} GB", flush=True)
    print(f"\n{args.root.name}: {sets}\n")
    print("| student | trainable params | s/step | peak RSS GB | checkpoint MB | saved model MB |")
    print("|---|---|---|---|---|---|")
    for name, r in rows.items():
        ck = f"{r['checkpoint_mb']:.1f}" if r["checkpoint_mb"] is not None else "-"
        trainable = f"{r['trainable_parameters']:,}" if "trainable_parameters" in r else "all"
        print(f"| {name} | {trainable} | {r['s_per_step']:.2f} | {r['peak_rss_gb']:.2f} | {ck} | {r['saved_model_mb']:.1f} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"root": str(args.root.name), "settings": sets, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
