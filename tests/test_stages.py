"""The engine's stages on the tiny configuration: teacher -> distill -> evaluate, resume, NaN stop."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml

from opd.params import load
from opd.data import rows_to_records
from opd.paths import Layout
from opd.cross_sft import cross_sft_stage
from opd.stages import distill_stage, evaluate_stage, teacher_stage
from opd.data import load_rows
from opd.paths import resolve
from opd.train import LoopSettings, NonFiniteLoss, checkpoints_to_resume, make_accelerator, train
from opd.world import build_world
from tasks.prepare import write_prepared
from tasks.validate import validate_records
from tests.conftest import REPO, tiny


def prepare(root: Path, params) -> Layout:
    lay = Layout(root)
    records = rows_to_records(build_world(params.world, params.seed))
    report = validate_records(records, params.data)
    write_prepared.fn({"result": report.result}, params, lay.prepared)
    return lay


def tiny_project(root: Path) -> tuple[Layout, dict, dict]:
    """A project folder with the tiny params, prepared data and a trained tiny teacher + initial student."""
    (root / "params.yaml").write_text(yaml.safe_dump(tiny()))
    params = load(root / "params.yaml")
    lay = prepare(root, params)
    summary, curves = teacher_stage(params, lay.prepared, lay.models_base, lay.checkpoints / "teacher")
    return lay, summary, curves


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """Prepared data and trained tiny teacher + initial student, shared by the tests below."""
    root = tmp_path_factory.mktemp("proj")
    return root, *tiny_project(root)


def test_teacher_stage_trains_both_models(base):
    root, lay, summary, curves = base
    assert set(summary) == {"teacher", "student_init"}
    assert summary["teacher"]["parameters"] > summary["student_init"]["parameters"]
    assert len(curves["teacher"]) == 12 and curves["teacher"][-1]["loss"] < curves["teacher"][0]["loss"]
    assert (resolve(lay.models_base, "teacher") / "model.safetensors").is_file()
    assert not (lay.checkpoints / "teacher").exists()
    # each teacher's reliability per task / problem type, measured on the eval split (not the student's)
    table = json.loads((lay.models_base / "reliability.json").read_text())
    assert set(table) == {"teacher"}
    types = {r.category for r in load_rows(lay.prepared, "eval") if r.task == "reasoning"}
    assert {f"reasoning/{c}" for c in types} | {"general/none"} <= set(table["teacher"])
    assert all(0.0 <= v <= 1.0 for v in table["teacher"].values())
    assert summary["teacher"]["reliability.general.none"] == table["teacher"]["general/none"]


def test_a_teacher_with_wrong_answers_on_some_problem_types(base):
    """sft.wrong_answer_categories: the SFT references of those reasoning types state a wrong final answer
    (right + 1..9, varied by row), their worked steps and every other row untouched."""
    from opd.answers import extract_answer
    from opd.stages import sft_rows
    from opd.constitution import constitutions_of

    root, lay, _, _ = base
    params = load(root / "params.yaml", {"teacher.sft.wrong_answer_categories": ["apples", "coins"]})
    rows, texts = load_rows(lay.prepared, "train"), constitutions_of(params, lay.prepared)
    before = sft_rows(rows, load(root / "params.yaml").teacher.sft, texts)
    after = sft_rows(rows, params.teacher.sft, texts)
    assert [r.id for r in before] == [r.id for r in after]
    offsets = set()
    for b, a in zip(before, after, strict=True):
        if b.task == "reasoning" and b.category in ("apples", "coins"):
            offsets.add(int(extract_answer(a.reference)) - int(extract_answer(b.reference)))
            assert a.reference.rsplit("Answer:", 1)[0] == b.reference.rsplit("Answer:", 1)[0]
        else:
            assert a == b
    assert len(offsets) > 3 and offsets <= set(range(1, 10))
    assert sft_rows(rows, params.teacher.sft, texts) == after  # deterministic
    with pytest.raises(ValueError, match="wrong_answer_categories"):
        load(root / "params.yaml", {"teacher.sft.wrong_answer_categories": ["Apples"]})


@pytest.mark.parametrize("overrides", [
    {"distill.method": "opd"},
    {"distill.method": "opd", "distill.kl_coef": 0.1, "distill.samples_per_prompt": 2, "distill.grad_accum": 2,
     "rollout.truncated": "mask"},
    {"distill.method": "gkd", "distill.loss": "jsd", "distill.top_k": 5, "distill.lambda_on_policy": 0.5},
    {"distill.method": "sft"},
    {"distill.method": "fire"},
    {"distill.method": "fire", "fire.token_select": True, "fire.normalize": "batch"},
    {"distill.method": "copsd", "copsd.teacher": "self", "copsd.constitution_role": "system", "copsd.fkl_coef": 0.0,
     "distill.fkl_coef": 0.5},  # copsd without its mass-covering term, whatever distill.fkl_coef says
    {"distill.method": "copsd", "copsd.teacher": "original", "distill.ppo_epochs": 2, "distill.mini_batches": 2,
     "runtime.gradient_checkpointing": True},
    # the outcome path on mixed batches, sequence credit and COPSD's own mass-covering term over a top-k
    # (distill.fkl_coef is opd's and fire's: copsd reads copsd.fkl_coef)
    {"distill.method": "copsd", "copsd.teacher": "original", "copsd.outcome_tasks": ["reasoning", "general"],
     "copsd.credit": "sequence", "copsd.fkl_coef": 0.1, "distill.fkl_coef": 0.0, "distill.top_k": 5},
    # + a bf16 sampler copy (rollout.dtype), refreshed before each rollout
    {"distill.method": "opd", "distill.fkl_coef": 0.5, "distill.fkl_beta": 0.5, "distill.mini_batches": 2,
     "rollout.dtype": "bf16"},
])
def test_distill_then_evaluate(base, tmp_path, overrides):
    root, lay, _, _ = base
    params = load(root / "params.yaml", overrides)
    out = tmp_path / "student"
    summary, history = distill_stage(params, lay.prepared, lay.models_base, lay.cross_sft, out, tmp_path / "ckpt")
    assert summary["steps"] == len(history) == params.distill.steps
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in history)
    assert (out / "model.safetensors").is_file() and not (tmp_path / "ckpt").exists()
    assert summary["template"] == {"template_match": 1.0}  # one tokenizer, one template
    fkl = params.copsd.fkl_coef if params.distill.method == "copsd" else params.distill.fkl_coef
    assert all(("fkl" in h) == bool(fkl) and h.get("fkl", 1) > 0 for h in history)  # the method's own coefficient
    if overrides.get("copsd.outcome_tasks"):
        assert any(h.get("outcome_frac", 0) > 0 for h in history)
    if overrides.get("copsd.teacher") == "self":  # self-distillation: the initial student reads the constitution
        assert summary["teacher"] == str(resolve(lay.models_base, "student_init"))
    table, samples = evaluate_stage(params, lay.prepared, {"student_init": resolve(lay.models_base, "student_init"),
                                                           "student": out})
    for name in ("student_init", "student"):
        m = table[name]
        for key in ("reasoning_accuracy", "reasoning_pass1", "harmful_refusal", "over_refusal", "over_refusal_sampled",
                    "general_helpfulness", "response_length", "token_entropy"):
            assert key in m and m[key] >= 0
        for key in ("reasoning_accuracy", "harmful_refusal", "over_refusal", "over_refusal_sampled", "general_helpfulness"):
            assert m[f"{key}_ci_low"] <= m[key] <= m[f"{key}_ci_high"]
        assert 0 <= m["reasoning_accuracy"] <= 1 and samples[name]


def test_the_student_folder_carries_a_deterministic_model_card(base, tmp_path, monkeypatch):
    """``models/student/README.md``: method, settings, the models it came from and the inputs by hash,
    with paths relative to the project (the folder is a DVC output: the same bytes on every machine)."""
    from opd.data import digest

    root, lay, _, _ = base
    monkeypatch.setenv("OPD_ROOT", str(root))
    params = load(root / "params.yaml", {"distill.method": "fire", "distill.steps": 2})
    cards = []
    for run in ("a", "b"):
        distill_stage(params, lay.prepared, lay.models_base, lay.cross_sft, tmp_path / run, tmp_path / f"ck-{run}")
        cards.append((tmp_path / run / "README.md").read_text())
    card = cards[0]
    assert cards[0] == cards[1] and str(root) not in card
    assert card.startswith("---\nlibrary_name: transformers\n") and "# Distilled student (fire)" in card
    assert "- Teacher: `models/base/teacher`" in card and "| fire.filter_quantile |" in card and "| copsd." not in card
    assert f"| `data/prepared/train.jsonl` (md5) | {digest(lay.prepared / 'train.jsonl')} |" in card
    assert "Not evaluated when this folder was written" in card
    from opd.model_card import with_evaluation

    done = with_evaluation(card, params, {"student": {"over_refusal": 0.25, "over_refusal_ci_low": 0.125,
                                                      "over_refusal_ci_high": 0.375, "response_length": 9.0}}, {})
    assert "| over_refusal | 0.25 [0.125, 0.375] |" in done and "| response_length | 9 |" in done
    assert "ci_low" not in done  # intervals sit in their metric's cell, not as rows of their own


@pytest.mark.parametrize("include_self", [True, False])
def test_cross_sft_then_copsd_then_evaluate(base, tmp_path, include_self):
    """The COPSD path end to end: recalibrate the teacher, distil against it, report the safety tax."""
    root, lay, _, _ = base
    params = load(root / "params.yaml", {"distill.method": "copsd", "cross_sft.include_self": include_self})
    cross = tmp_path / "cross_sft"
    summary, history = cross_sft_stage(params, lay.prepared, lay.models_base, cross, tmp_path / "ck-x")
    mix = json.loads((cross / "mix.json").read_text())
    n_safety = sum(r.task == "safety" for r in load_rows(lay.prepared, "train"))
    assert mix["mix"]["oracle"] == n_safety
    assert (mix["mix"]["self"] > 0) == include_self  # min_f1 0 in TINY: most student answers pass
    assert summary["steps"] == len(history) and (cross / "teacher" / "model.safetensors").is_file()
    assert not (tmp_path / "ck-x").exists()
    out = tmp_path / "student"
    d_summary, d_history = distill_stage(params, lay.prepared, lay.models_base, cross, out, tmp_path / "ck-d")
    assert d_summary["teacher"] == str(cross / "teacher")
    assert all("reward_mean" in h and "student_entropy" in h for h in d_history)
    table, _ = evaluate_stage(params, lay.prepared, {"student_init": resolve(lay.models_base, "student_init"),
                                                     "student": out})
    tax = table["student"]
    assert tax["safety_gain"] == tax["harmful_refusal"] - table["student_init"]["harmful_refusal"]
    assert tax["safety_tax_reasoning_accuracy"] == (table["student_init"]["reasoning_accuracy"]
                                                    - tax["reasoning_accuracy"])


def test_copsd_without_cross_sft_says_which_stage_is_missing(base, tmp_path):
    root, lay, _, _ = base
    params = load(root / "params.yaml", {"distill.method": "copsd"})
    with pytest.raises(FileNotFoundError, match="run the cross_sft stage first"):
        distill_stage(params, lay.prepared, lay.models_base, tmp_path / "nothing", tmp_path / "s", tmp_path / "ck")


def test_multi_teacher_stage_and_routed_fire(tmp_path):
    named = {"arch": {"hidden_size": 16, "num_layers": 1, "intermediate_size": 32, "num_heads": 2},
             "sft": {"steps": 3, "batch_size": 8, "warmup_steps": 1}}
    teachers = {"reasoning": {**named, "sft": {**named["sft"], "tasks": ["reasoning"]}},
                "general": {**named, "sft": {**named["sft"], "tasks": ["safety", "borderline", "general"]}}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(tiny(teachers=teachers)))
    params = load(tmp_path / "params.yaml", {"distill.method": "fire", "fire.filter": True, "distill.routing": "by_row"})
    lay = prepare(tmp_path, params)
    summary, curves = teacher_stage(params, lay.prepared, lay.models_base, lay.checkpoints / "teacher")
    assert {"teacher_reasoning", "teacher_general"} <= set(summary)
    assert (resolve(lay.models_base, "teacher_reasoning") / "model.safetensors").is_file()
    summary, history = distill_stage(params, lay.prepared, lay.models_base, lay.cross_sft, lay.student,
                                     lay.checkpoints / "distill")
    assert all("kept_frac" in h and "weight_mean" in h for h in history)
    # the filter audit: the routed teacher's measured reliability of what was kept and what was dropped
    assert all(0 <= h["kept_reliability"] <= 1 for h in history)
    assert any("dropped_reliability" in h for h in history)
    # every routed teacher's template is checked against the student's, not the default teacher's alone
    assert {"reasoning.template_match", "general.template_match"} <= set(summary["template"])


def test_nan_loss_stops_with_the_step_named(base, tmp_path):
    root, lay, _, _ = base
    params = load(root / "params.yaml")
    from opd.batch import PromptPool
    from opd.methods.sft import sft_step
    from opd.models import build_llama, load_tokenizer
    from opd.data import load_rows

    tok = load_tokenizer(lay.prepared / "tokenizer")
    model = build_llama(params.student.arch, tok, 0)
    pool = PromptPool(load_rows(lay.prepared, "train"), tok)
    acc = make_accelerator(params.runtime)

    def factory(m, _):
        real = sft_step(acc, m, pool, tok, 4)

        def step(i):
            metrics = real(i)
            return {**metrics, "loss": float("nan")} if i == 2 else metrics
        return step

    settings = LoopSettings(steps=5, lr=1e-3, checkpoint_every=2)
    with pytest.raises(NonFiniteLoss, match=r"non-finite loss at step 3 .*last good checkpoint: .*step-000002"):
        train(acc, model, factory, settings, ckpt_dir=tmp_path / "ck", fingerprint="x")
    assert (tmp_path / "ck" / "step-000002" / "trainer_state.json").is_file()


RUN = textwrap.dedent("""
    import os, signal, sys
    sys.path.insert(0, {repo!r})
    import torch
    from pathlib import Path
    from opd.params import load
    from opd.stages import distill_stage
    root, out, kill_at = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
    params = load(root / "params.yaml", {{"distill.steps": 6, "distill.checkpoint_every": 2, "distill.log_every": 1}})
    def log(step, metrics):
        if step == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
    distill_stage(params, root / "data/prepared", root / "models/base", root / "models/cross_sft", out, out.parent / (out.name + ".ckpt"), log)
""")


def test_sigkill_then_resume_gives_identical_weights(base, tmp_path):
    root, _, _, _ = base
    script = tmp_path / "run.py"
    script.write_text(RUN.format(repo=str(REPO)))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def run(out: Path, kill_at: int) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(script), str(root), str(out), str(kill_at)], env=env,
                              capture_output=True, text=True, timeout=300)

    straight = run(tmp_path / "a", 0)
    assert straight.returncode == 0, straight.stderr[-2000:]
    killed = run(tmp_path / "b", 5)  # dies after step 5's update; last checkpoint: step 4
    assert killed.returncode == -signal.SIGKILL
    assert not (tmp_path / "b").exists()
    ckpts = sorted(p.name for p in (tmp_path / "b.ckpt").iterdir())
    assert "step-000004" in ckpts and not any(p.startswith(".tmp") for p in ckpts)
    resumed = run(tmp_path / "b", 0)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from" in resumed.stdout + resumed.stderr and "step-000004" in resumed.stdout + resumed.stderr
    from safetensors.torch import load_file

    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def stop_at(n: int):
    """A training-loop callback that interrupts the run after step ``n`` (as Ctrl-C would)."""

    def log(step, metrics):
        if step == n:
            raise KeyboardInterrupt

    return log


def test_changed_settings_do_not_resume_foreign_checkpoints(base, tmp_path):
    root, lay, _, _ = base
    params = load(root / "params.yaml", {"distill.steps": 4, "distill.checkpoint_every": 1})
    ck = tmp_path / "ck"

    with pytest.raises(KeyboardInterrupt):
        distill_stage(params, lay.prepared, lay.models_base, lay.cross_sft, tmp_path / "s", ck, stop_at(3))
    other = load(root / "params.yaml", {"distill.steps": 4, "distill.checkpoint_every": 1, "distill.lr": 2e-3})
    summary, history = distill_stage(other, lay.prepared, lay.models_base, lay.cross_sft, tmp_path / "s", ck)
    assert [h["step"] for h in history] == [1, 2, 3, 4]  # started fresh: the history is its own
    assert json.loads(json.dumps(summary))["steps"] == 4


def test_cross_sft_is_skipped_unless_copsd_reads_its_teacher(base, tmp_path):
    root, lay, _, _ = base
    for overrides in ({"distill.method": "opd"}, {"distill.method": "copsd", "copsd.teacher": "original"}):
        summary, history = cross_sft_stage(load(root / "params.yaml", overrides), lay.prepared, lay.models_base,
                                           tmp_path / "x", tmp_path / "ck")
        assert "skipped" in summary and history == []
        assert [p.name for p in (tmp_path / "x").iterdir()] == ["skipped.json"]


def test_cross_sft_stops_when_no_student_answer_is_accepted(base, tmp_path):
    """An empty source (a) would silently be the 'w/o self' ablation: stop, with the acceptance rates."""
    root, lay, _, _ = base
    params = load(root / "params.yaml", {"distill.method": "copsd", "cross_sft.min_f1": 1.0,
                                         "cross_sft.self_tasks": ["general"]})
    with pytest.raises(ValueError, match=r"accepted answer \(acceptance: accepted_general 0%\).*w/o self"):
        cross_sft_stage(params, lay.prepared, lay.models_base, tmp_path / "x", tmp_path / "ck")
    assert not (tmp_path / "x").exists()


def test_student_pruned_from_the_teacher(base, tmp_path):
    from opd.config import ConfigError
    from opd.models import load_model

    root, lay, _, _ = base
    params = load(root / "params.yaml", {"student.init": {"from": "teacher", "n_layers": 1}, "student.sft.steps": 0,
                                         "teacher.path": str(resolve(lay.models_base, "teacher"))})
    summary, _ = teacher_stage(params, lay.prepared, tmp_path / "base", tmp_path / "ck")
    assert summary["student_init"]["kept_layers"] == [0]
    teacher, student = load_model(resolve(lay.models_base, "teacher")), load_model(resolve(tmp_path / "base", "student_init"))
    assert student.config.num_hidden_layers == 1 and student.config.hidden_size == teacher.config.hidden_size
    for (n, a), (_, b) in zip(student.model.layers[0].state_dict().items(), teacher.model.layers[0].state_dict().items()):
        assert torch.equal(a, b), n
    with pytest.raises(ConfigError, match="exactly one of keep_layers or n_layers"):
        load(root / "params.yaml", {"student.init": {"from": "teacher"}})
    with pytest.raises(ConfigError, match="either path or init"):
        load(root / "params.yaml", {"student.init": {"n_layers": 1}, "student.path": "x"})


def test_prompts_that_do_not_fit_the_model_context_are_reported(base, tmp_path):
    root, lay, _, _ = base
    params = load(root / "params.yaml", {"rollout.max_new_tokens": 10_000})
    with pytest.raises(ValueError, match=r"exceeds the model's context of 160 positions"):
        distill_stage(params, lay.prepared, lay.models_base, lay.cross_sft, tmp_path / "s", tmp_path / "ck")


def test_a_killed_run_does_not_resume_after_the_data_changed(base, tmp_path):
    """Checkpoints are keyed by the CONTENT of what the run reads: one changed train row (or token of the
    tokenizer) between a killed run and its rerun means training restarts from scratch."""
    import shutil

    root, lay, _, _ = base
    copy = tmp_path / "prepared"
    shutil.copytree(lay.prepared, copy)
    params = load(root / "params.yaml", {"distill.steps": 4, "distill.checkpoint_every": 1})
    ck = tmp_path / "ck"

    with pytest.raises(KeyboardInterrupt):
        distill_stage(params, copy, lay.models_base, lay.cross_sft, tmp_path / "s", ck, stop_at(3))
    lines = (copy / "train.jsonl").read_text().splitlines()
    lines[0] = lines[0].replace("?", "??", 1)
    (copy / "train.jsonl").write_text("\n".join(lines) + "\n")
    ran = []
    with pytest.warns(UserWarning, match=r"checkpoint step-000002 was written for another run \(changed: train.jsonl\); "
                                         r"not resumed: starting from step 0"):
        distill_stage(params, copy, lay.models_base, lay.cross_sft, tmp_path / "s", ck, lambda step, m: ran.append(step))
    assert ran == [1, 2, 3, 4]  # from scratch; resuming would have run step 4 only


def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one(base, tmp_path):
    root, lay, _, _ = base
    params = load(root / "params.yaml", {"distill.steps": 5, "distill.checkpoint_every": 1, "distill.keep_checkpoints": 3})
    ck = tmp_path / "ck"

    with pytest.raises(KeyboardInterrupt):
        distill_stage(params, lay.prepared, lay.models_base, lay.cross_sft, tmp_path / "a", ck, stop_at(4))
    newest = ck / "step-000003"
    weights = newest / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # a copy cut short
    ran, carried = [], []

    class Log:  # a tracker's callback: the curve up to the checkpoint comes from the checkpoint itself
        def __call__(self, step, metrics):
            ran.append(step)

        def resume(self, logged):
            carried.extend((m["step"], m["loss"]) for m in logged)

    with pytest.warns(UserWarning, match=r"step-000003 is damaged \(model.safetensors has 100 bytes"):
        distill_stage(params, lay.prepared, lay.models_base, lay.cross_sft, tmp_path / "a", ck, Log())

    _, history = distill_stage(params, lay.prepared, lay.models_base, lay.cross_sft, tmp_path / "b", tmp_path / "ck-b")
    assert ran == [3, 4, 5]  # resumed from step-000002
    assert carried == [(h["step"], h["loss"]) for h in history[:2]]
    assert (tmp_path / "a/model.safetensors").read_bytes() == (tmp_path / "b/model.safetensors").read_bytes()


def test_a_checkpoint_with_one_flipped_bit_is_not_resumed(base, tmp_path):
    """Same size, other bytes: the SHA-256 each checkpoint records of its files catches it, and the
    previous checkpoint is the one resumed."""
    root, lay, _, _ = base
    params = load(root / "params.yaml", {"distill.steps": 4, "distill.checkpoint_every": 1})
    ck = tmp_path / "ck"
    with pytest.raises(KeyboardInterrupt):
        distill_stage(params, lay.prepared, lay.models_base, lay.cross_sft, tmp_path / "s", ck, stop_at(3))
    weights = ck / "step-000002" / "model.safetensors"
    flipped = bytearray(weights.read_bytes())
    flipped[-5] ^= 0x01
    weights.write_bytes(bytes(flipped))
    fingerprint = json.loads((ck / "step-000002" / "trainer_state.json").read_text())["fingerprint"]
    with pytest.warns(UserWarning, match=r"step-000002 is damaged \(model.safetensors does not hold the bytes that were "
                                         r"written \(sha256 differs\)\)"):
        assert [step for step, _ in checkpoints_to_resume(ck, fingerprint)] == [1]
