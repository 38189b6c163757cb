"""The Qwen pair recipe (params.qwen.yaml) on Qwen2-shaped models made here: a byte-level BPE with
Qwen's special tokens and ChatML template (a default system turn, ``<|im_end|>`` ending a turn,
``<|endoftext|>`` as pad), two Qwen2 models with tied heads and grouped-query attention, and the
recipe's own data (HarmBench-shaped behaviours, the look-alikes, word problems). prepare ->
COPSD self-distillation (2 steps) -> evaluate runs through the stage functions with the recipe's
bf16 settings; nothing is downloaded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from transformers import GenerationConfig, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

from opd.params import load
from opd.evaluate import eval_rows, greedy_outcomes
from opd.models import load_model, load_tokenizer, save_model
from opd.real_data import write
from opd.stages import distill_stage, evaluate_stage, teacher_stage
from opd.data import load_rows
from opd.paths import resolve
from opd.tokens import row_prompt_ids
from tasks.prepare import validate, write_prepared
from tests.conftest import recipe_params
from tests.test_real_data import fake_harmbench

QWEN_CHATML = ("{%- if messages[0]['role'] != 'system' %}<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. "
               "You are a helpful assistant.<|im_end|>\n{%- endif %}"
               "{%- for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{%- endfor %}"
               "{%- if add_generation_prompt %}<|im_start|>assistant\n{%- endif %}")


def qwen_tokenizer(texts: list[str]) -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=600, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   additional_special_tokens=["<|im_start|>"], chat_template=QWEN_CHATML)


def qwen_folder(path: Path, tok: PreTrainedTokenizerFast, layers: int, seed: int) -> Path:
    import torch

    eot, eos = tok.convert_tokens_to_ids("<|endoftext|>"), tok.convert_tokens_to_ids("<|im_end|>")
    cfg = Qwen2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=True, bos_token_id=eot, eos_token_id=eos, pad_token_id=eot)
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(cfg)
    model.generation_config = GenerationConfig(eos_token_id=[eot, eos], bos_token_id=eot, pad_token_id=eot)
    save_model(model, tok, path)
    return path


@pytest.fixture(scope="module")
def recipe(tmp_path_factory):
    """A work folder as `make real PAIR=qwen` leaves it: params.qwen.yaml, the data, two Qwen2 folders."""
    root = tmp_path_factory.mktemp("qwen")
    write(root / "data" / "real", fake_harmbench(root / "hb.csv"))
    rows = [json.loads(line) for f in ("train", "eval") for line in (root / "data/real" / f"{f}.jsonl").read_text().splitlines()]
    tok = qwen_tokenizer([t for r in rows for t in (r["prompt"], r["reference"] or "")] * 2)
    teacher = qwen_folder(root / "models/real/teacher", tok, layers=2, seed=0)
    student = qwen_folder(root / "models/real/student", tok, layers=1, seed=1)
    params = recipe_params("params.qwen.yaml")
    assert params["student"]["path"] == "models/real/student" and params["copsd"]["teacher"] == "self"
    params["teacher"]["path"], params["student"]["path"] = str(teacher), str(student)
    params["data"]["path"] = str(root / "data/real")
    params["copsd"]["constitutions"] = str(root / "data/real/constitutions.json")
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    return root


def test_the_qwen_recipe_prepares_self_distils_with_copsd_and_evaluates(recipe, tmp_path):
    overrides = {"distill.method": "copsd", "distill.steps": 2, "copsd.n": 2, "copsd.prompts_per_step": 2, "rollout.max_new_tokens": 6,
                 "evaluate.max_new_tokens": 3, "evaluate.max_new_tokens_by_task": {"reasoning": 7},
                 "evaluate.limit_per_task": 3, "evaluate.batch_size": 8, "runtime.threads": 1,
                 "distill.checkpoint_every": 1000}
    params = load(recipe / "params.yaml", overrides)
    assert params.runtime.mixed_precision == "bf16" and params.rollout.dtype == "bf16"  # the recipe as run
    prepared, base = tmp_path / "prepared", tmp_path / "base"
    write_prepared.fn(validate.fn(params), params, prepared)
    stats = json.loads((prepared / "stats.json").read_text())
    assert stats["vocab_size"] == len(load_model(params.student.path).get_input_embeddings().weight)
    teacher_stage(params, prepared, base, tmp_path / "ckpt-teacher")
    out = tmp_path / "student"
    summary, history = distill_stage(params, prepared, base, tmp_path / "cross", out, tmp_path / "ckpt")
    assert summary["teacher"] == str(resolve(base, "student_init"))  # the 0.5B reads the constitution itself
    assert len(history) == 2 and all(h["loss"] == h["loss"] for h in history)
    assert load_model(out).config.tie_word_embeddings
    table, samples = evaluate_stage(params, prepared, {"student_init": resolve(base, "student_init"), "student": out})
    assert {"harmful_refusal", "over_refusal", "reasoning_accuracy", "safety_tax_reasoning_accuracy"} <= set(table["student"])
    assert {s["task"] for s in samples["student"]} == {"reasoning", "safety", "borderline", "general"}
    # each task is decoded within its own token budget (evaluate.max_new_tokens_by_task)
    rows = [r for rs in eval_rows(load_rows(prepared, "eval"), params.evaluate).values() for r in rs]
    tok = load_tokenizer(out)
    greedy, *_ = greedy_outcomes(load_model(out), tok, rows, [row_prompt_ids(tok, r) for r in rows], params.evaluate,
                                 lambda text: False, params.data.answer_format)
    longest = {t: max(len(g) for r, g in zip(rows, greedy) if r.task == t) for t in {r.task for r in rows}}
    assert longest["reasoning"] == 7 and all(longest[t] <= 3 for t in ("safety", "borderline", "general")), longest
