"""The distilled student's model card: ``README.md`` in its folder, the registered version's description.

Why: a model that leaves the pipeline (a folder copied elsewhere, a registry version someone loads)
must say what it is without the project around it: the models it came from, the method and the
settings that made it, how it was evaluated, how to prompt it, and which data and code produced it.
The card is deterministic (no clock, paths relative to the project) because ``models/student`` is a
DVC output: the same inputs give the same bytes on every machine.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from opd import __version__
from opd.config import Params
from opd.params import to_flat_dict

# The params sections the card lists per method: only sections the distill stage depends on (dvc.yaml),
# so the card cannot go stale while DVC thinks the student is up to date.
METHOD_SECTIONS = {"fire": ("fire",), "copsd": ("copsd",), "gkd": (), "opd": (), "sft": ()}
DESCRIPTIONS = {
    "opd": "on-policy distillation: the student samples, the teacher scores every sampled token (reverse KL)",
    "gkd": "generalized knowledge distillation: a full-vocabulary divergence on a mix of student and dataset samples",
    "sft": "supervised fine-tuning on the reference answers (the baseline without a teacher)",
    "fire": "FiRe-OPD: on-policy distillation that reweights tokens (teacher confident x student unsure) and, with "
            "fire.filter, drops the trajectories the teacher scores lowest",
    "copsd": "COPSD: on-policy distillation from a Cross-SFT-recalibrated teacher that reads a safety constitution",
}


def shown(path: Path | str, root: Path | None) -> str:
    """``path`` relative to the project ``root`` when under it (the card is the same on every machine)."""
    path = Path(path)
    if root is not None and path.is_absolute() and path.resolve().is_relative_to(root.resolve()):
        return str(path.resolve().relative_to(root.resolve()))
    return str(path)


def _value(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v).replace("|", "\\|")


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(_value(v) for v in row) + " |" for row in rows]


EVALUATION, USE, LINEAGE = "## Evaluation", "## Use", "## Lineage"
CI_SUFFIXES = ("_ci_low", "_ci_high")


def _evaluation(params: Params, evaluation: dict[str, dict[str, float]] | None) -> list[str]:
    if not evaluation:
        return ["Not evaluated when this folder was written: the evaluate stage writes `metrics/eval.json`, "
                "and the registered version's card carries the table."]
    order = ["student", "student_init", "teacher"]  # the card's model first, then what it came from
    names = sorted(evaluation, key=lambda n: (order.index(n) if n in order else len(order), n))
    every = {m for ms in evaluation.values() for m in ms}
    metrics = sorted(m for m in every if not m.endswith(CI_SUFFIXES))

    def cell(ms: dict[str, float], m: str) -> str:  # the value, and its bootstrap interval when there is one
        if m not in ms:
            return ""
        lo, hi = ms.get(f"{m}_ci_low"), ms.get(f"{m}_ci_high")
        return _value(ms[m]) + (f" [{_value(lo)}, {_value(hi)}]" if lo is not None and hi is not None else "")

    return [f"On the eval split (greedy, at most {params.evaluate.max_new_tokens} new tokens; [95% bootstrap "
            "interval over prompts]):", "",
            *_table(["metric", *names], [[m, *(cell(evaluation[n], m) for n in names)] for m in metrics])]


def with_evaluation(card: str, params: Params, evaluation: dict[str, dict[str, float]],
                    lineage: dict[str, str]) -> str:
    """The card of a registered version: the folder's card with its evaluation table filled in and
    lineage rows added (the run that registered it, the commit). A folder without a card (made
    elsewhere) gets the evaluation and lineage alone."""
    head, found, rest = card.partition(EVALUATION)
    tail = rest[rest.index(USE):] if found and USE in rest else f"{LINEAGE}\n\n" + "\n".join(_table(["input", "identity"], []))
    body = tail.rstrip("\n") + "\n" + "\n".join(_table(["input", "identity"], [[k, v] for k, v in lineage.items()])[2:])
    return f"{head}{EVALUATION}\n\n" + "\n".join(_evaluation(params, evaluation)) + "\n\n" + body + "\n"


def model_card(params: Params, teacher: Path | str, student_init: Path | str, summary: dict[str, Any],
               lineage: dict[str, str], stop_tokens: list[str], evaluation: dict[str, dict[str, float]] | None = None,
               root: Path | None = None) -> str:
    """Markdown with a Hugging Face metadata header. ``summary`` is the distill stage's (method, steps,
    final step metrics); ``lineage`` names inputs by hash (and, once registered, the run and commit);
    ``evaluation`` is ``metrics/eval.json`` (model -> metric -> value), known only after evaluation."""
    d, method = params.distill, summary.get("method", params.distill.method)
    tags = ["on-policy-distillation", method]
    lines = ["---", "library_name: transformers", "pipeline_tag: text-generation", "tags:",
             *[f"- {t}" for t in tags], "---", "",
             f"# Distilled student ({method})", "",
             f"Made by the opd pipeline {__version__} with {DESCRIPTIONS.get(method, method)}.", "",
             "## Models", "", f"- Teacher: `{shown(teacher, root)}`",
             f"- Initial student: `{shown(student_init, root)}`"]
    if params.teachers and d.routing == "by_row":
        lines.append("- Further teachers, by row: " + ", ".join(f"`{n}`" for n in params.teachers))
    flat = to_flat_dict(params)
    settings = [[k, v] for k, v in flat.items() if k.split(".")[0] in ("distill", "rollout", *METHOD_SECTIONS.get(method, ()))
                or (params.student.lora and k.startswith("student.lora."))]
    final = {k: v for k, v in (summary.get("final") or {}).items() if k not in ("step", "tokens_per_s", "seconds")}
    lora = summary.get("lora")
    how = (f" LoRA adapters ({lora['trainable_parameters']:,} of {lora['parameters']:,} parameters trained), merged into "
           "this folder's weights." if lora else "")
    lines += ["", "## Training", "", f"{summary.get('steps', d.steps)} steps over {summary.get('processes', 1)} "
              f"process(es).{how} Settings (from params.yaml):", "", *_table(["setting", "value"], settings)]
    if final:
        lines += ["", "Last step:", "", *_table(["metric", "value"], [[k, v] for k, v in sorted(final.items())])]
    lines += ["", EVALUATION, "", *_evaluation(params, evaluation), "", "## Use", "",
              "Prompt it through its own chat template (`tokenizer.apply_chat_template(messages, "
              "add_generation_prompt=True)`); a response ends at any of " + ", ".join(f"`{t}`" for t in stop_tokens)
              + ".", "",
              LINEAGE, "", *_table(["input", "identity"], [[k, v] for k, v in lineage.items()]), ""]
    return "\n".join(lines)
