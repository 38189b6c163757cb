"""Command line for the stage flows: ``python -m flows <stage> [--params FILE] [--set key=value ...]``.

DVC stages call this, so ``dvc repro`` and a Prefect run go through the same flow code.
``--set`` values are parsed as YAML (``--set distill.lr=1e-3``) and validated by the same config.
"""

from __future__ import annotations

import argparse
import importlib
import sys

import yaml

from opd.config import ConfigError

STAGES = {
    "prepare": "flows.prepare:prepare_flow",
    "teacher": "flows.teacher:teacher_flow",
    "cross_sft": "flows.cross_sft:cross_sft_flow",
    "distill": "flows.distill:distill_flow",
    "evaluate": "flows.evaluate:evaluate_flow",
    "register": "flows.register:register_flow",
    "promote": "flows.promote:promote_flow",
    "pipeline": "flows.pipeline:opd_pipeline",
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m flows", description=__doc__)
    ap.add_argument("stage", choices=sorted(STAGES) + ["serve"])
    ap.add_argument("--params", default=None, help="params file (default: the project's params.yaml)")
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args(argv)
    overrides = {}
    for item in args.sets:
        key, sep, value = item.partition("=")
        if not sep:
            ap.error(f"--set {item!r}: expected KEY=VALUE")
        overrides[key] = yaml.safe_load(value)
    try:
        if args.stage == "serve":  # a long-running deployment, not a flow run
            from flows.serve import serve

            serve(args.params)
            return 0
        module, _, name = STAGES[args.stage].partition(":")
        getattr(importlib.import_module(module), name)(params_path=args.params, overrides=overrides or None)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except Exception as err:  # the flow's own failure: one readable line, the trace is in Prefect's log
        print(f"error: {args.stage} failed: {type(err).__name__}: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
