"""A user's own model folders, made for tests: small Llamas with a tokenizer of their own (trained on
the embedded world, so the data fits it) and its chat template. Used by the ``dvc repro`` test in
tests/test_tracking.py; the folders' own checks live here."""

from __future__ import annotations

from pathlib import Path

import torch

from opd.config import ArchConfig, WorldConfig
from opd.models import build_llama, load_tokenizer, save_model
from opd.world import build_world, train_tokenizer
from tests.conftest import tiny


def make_folders(root: Path) -> tuple[Path, Path]:
    rows = build_world(WorldConfig(**tiny()["world"]), 0)
    tok = train_tokenizer([t for r in rows for t in (r.prompt, r.reference or "")], 300)
    (root / "tok").mkdir(parents=True)
    tok.save_pretrained(root / "tok")
    tok = load_tokenizer(root / "tok")
    folders = []
    for name, arch, seed in (("teacher", ArchConfig(hidden_size=32, num_layers=2, intermediate_size=64, num_heads=2), 0),
                             ("student", ArchConfig(hidden_size=16, num_layers=1, intermediate_size=32, num_heads=2), 1)):
        save_model(build_llama(arch, tok, seed), tok, root / name)
        folders.append(root / name)
    return folders[0], folders[1]


def test_user_folders_load_with_their_chat_template(tmp_path):
    from opd.models import load_model
    from opd.tokens import prompt_ids

    teacher, student = make_folders(tmp_path)
    tok = load_tokenizer(student)
    assert tok.chat_template and prompt_ids(tok, "Hi?")
    assert load_model(teacher).config.num_hidden_layers == 2 and isinstance(load_model(student), torch.nn.Module)


def test_a_template_difference_is_measured_not_mixed(tmp_path):
    """Teacher and student share a vocabulary but not a chat template: each reads its own, and the
    teacher's log-prob of the references after its own template vs the student's is reported."""
    import copy

    from opd.models import load_model
    from opd.templates import template_gap
    from opd.world import build_world

    teacher_dir, _ = make_folders(tmp_path)
    tok = load_tokenizer(teacher_dir)
    teacher = load_model(teacher_dir)
    rows = build_world(WorldConfig(**tiny()["world"]), 0)[:8]
    assert template_gap(teacher, tok, tok, rows) == {"template_match": 1.0}
    other = copy.deepcopy(tok)
    other.chat_template = "{% for m in messages %}### {{ m['content'] }}\n{% endfor %}### Response:\n"
    gap = template_gap(teacher, tok, other, rows)
    assert gap["template_match"] == 0.0
    own, theirs = gap["teacher_logprob_own_template"], gap["teacher_logprob_student_template"]
    assert own < 0 and theirs < 0 and own != theirs


def test_the_users_data_and_constitutions_are_hashed_for_dvc(tmp_path):
    """data.path and copsd.constitutions are named only in params.yaml: their content hashes go to
    data/user_inputs.json (a DVC dependency), so editing the data in place makes prepare stale."""
    import json

    from opd.params import load
    from opd.inputs import user_inputs

    data, consts = tmp_path / "rows.jsonl", tmp_path / "constitutions.json"
    data.write_text('{"id": "a"}\n')
    consts.write_text(json.dumps({"default": "Be safe. {user_query}"}))
    params = load(None, {"data.source": "jsonl", "data.path": str(data), "copsd.constitutions": str(consts)})
    before = user_inputs(params)
    assert set(before) == {"data", "constitutions"}
    data.write_text('{"id": "b"}\n')
    after = user_inputs(params)
    assert after["data"]["md5"] != before["data"]["md5"] and after["constitutions"] == before["constitutions"]
    assert user_inputs(load(None, {})) == {}  # the embedded world has no user inputs
