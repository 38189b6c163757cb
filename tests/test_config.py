from pathlib import Path

import pytest
import yaml

from opd.config import ConfigError

from opd.params import load, parse, to_flat_dict
from tests.conftest import REPO, committed_params, recipe_params, tiny


def test_project_params_load():
    p = parse(committed_params())
    assert p.distill.method == "opd"
    assert p.teacher.arch.hidden_size > p.student.arch.hidden_size
    assert "distill.lr" in to_flat_dict(p)


@pytest.mark.parametrize(
    ("raw", "key", "words"),
    [
        ({"distill": {"lrr": 1.0}}, "distill.lrr", "unknown key"),
        ({"bogus": 1}, "bogus", "unknown key"),
        ({"distill": {"steps": "many"}}, "distill.steps", "integer"),
        ({"distill": {"lr": -1.0}}, "distill.lr", "greater than 0"),
        ({"world": {"eval_fraction": 0.9}}, "world.eval_fraction", "less than 0.5"),
        ({"distill": {"method": "magic"}}, "distill.method", "opd"),
        ({"teacher": {"arch": {"hidden_size": 30, "num_heads": 4}}}, "teacher.arch", "divisible"),
        ({"data": {"source": "jsonl"}}, "data", "data.path is required"),
        ({"rollout": {"dtype": "int8"}}, "rollout.dtype", "'bf16'"),
        ({"rollout": {"dtype": "bf16", "backend": "vllm"}}, "<root>", "rollout.dtype: a half-precision sampler"),
        ({"rollout": {"dtype": "bf16"}, "runtime": {"strategy": "fsdp2"}}, "<root>", "rollout.dtype"),
        ({"teacher": {"server": {"url": "127.0.0.1:8000"}}}, "teacher.server.url", "should match pattern"),
        ({"teacher": {"server": {"url": "http://u:pw@host:8000"}}}, "teacher.server.url", "OPD_TEACHER_API_KEY"),
        ({"teacher": {"server": {"url": "http://h:1", "top_k": 0}}}, "teacher.server.top_k", "greater than or equal"),
        ({"teacher": {"server": {"url": "http://h:1", "uri": "http://h:1"}}}, "teacher.server.uri", "unknown key"),
        ({"student": {"server": {"url": "http://h:1"}}}, "student.server", "unknown key"),
        ({"teacher": {"server": {"url": "http://h:1"}}, "distill": {"method": "copsd"}}, "<root>", "copsd.teacher"),
    ],
)
def test_bad_values_name_the_key(raw, key, words):
    with pytest.raises(ConfigError) as e:
        parse(raw)
    msg = str(e.value)
    first = msg.splitlines()[0]  # one error: the key and the reason on the first line
    assert first.startswith(f"params: invalid settings: {key}") and words in first, msg


def test_overrides_are_validated(tmp_path: Path):
    f = tmp_path / "params.yaml"
    f.write_text(yaml.safe_dump(tiny()))
    assert load(f, {"distill.lr": 0.01}).distill.lr == 0.01
    with pytest.raises(ConfigError, match="distill.lr"):
        load(f, {"distill.lr": "fast"})


def test_missing_and_malformed_files(tmp_path: Path):
    with pytest.raises(ConfigError, match="not found"):
        load(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("seed: [1,\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load(bad)


def test_the_real_model_profile_is_valid_and_differs_only_where_real_models_need_it():
    real, default = parse(recipe_params("params.real.yaml")), parse(committed_params())
    assert real.teacher.path and real.student.init and real.student.init.n_layers == 8
    assert real.distill.lr <= 1e-5 and real.cross_sft.lr <= 1e-4 and real.copsd.lr <= 1e-5
    assert real.rollout.max_new_tokens > default.rollout.max_new_tokens
    assert real.data.source == "jsonl" and real.fire == default.fire and real.promote == default.promote


def test_strict_types_and_checked_promotion_metric():
    with pytest.raises(ConfigError, match=r"distill.steps: Input should be a valid integer"):
        parse({"distill": {"steps": True}})  # was read as 1
    with pytest.raises(ConfigError, match=r"promote.metric"):
        parse({"promote": {"metric": "reasoning_acuracy"}})  # a typo never promotes anything
    assert parse({"distill": {"lr": 1}}).distill.lr == 1.0  # an int where a float is wanted is fine


def test_a_bad_set_override_is_named_as_such(tmp_path):
    (tmp_path / "params.yaml").write_text("seed: 0\n")
    with pytest.raises(ConfigError, match=r"distill.stepz \(from --set\): unknown key"):
        load(tmp_path / "params.yaml", {"distill.stepz": 3})


def test_every_override_the_docs_show_is_accepted():
    """Each ``--set KEY=VALUE`` / ``dvc exp run -S KEY=VALUE`` in the README and docs loads, parsed as the
    command line parses it (YAML 1.2 scalars: ``5e-4`` is a number, as for DVC)."""
    import re

    from flows.__main__ import main
    from opd.params import load, yaml_load

    root = Path(__file__).resolve().parent.parent
    texts = [root / "README.md", *sorted((root / "docs").glob("*.md"))]
    shown = {m for p in texts for m in re.findall(r"(?:--set|-S) ([\w.]+=[^\s`]+)", p.read_text())
             if not m.endswith("=...")}  # "-S distill.method=..." is a placeholder
    assert "distill.lr=5e-4" in shown
    for item in sorted(shown):
        key, _, value = item.partition("=")
        params = load(root / "params.yaml", {key: yaml_load(value)})
        assert params is not None, item
    assert load(root / "params.yaml", {"distill.lr": yaml_load("5e-4")}).distill.lr == 5e-4
    assert main(["prepare", "--set", "distill.lr=fast"]) == 2  # a bad value still fails, naming the key


def test_a_params_file_reads_exponents_without_a_dot(tmp_path):
    import yaml

    from opd.params import load

    raw = yaml.safe_load((Path(__file__).resolve().parent.parent / "params.yaml").read_text())
    text = yaml.safe_dump(raw).replace("lr:", "lr: 5e-4 #", 1)
    (tmp_path / "params.yaml").write_text(text)
    assert isinstance(load(tmp_path / "params.yaml").teacher.sft.lr, float)


def test_the_typed_defaults_are_params_yaml():
    """One source of settings: params.yaml states every setting of opd/config/, at its default."""
    from opd.config import Params

    assert Params().model_dump(mode="json") == committed_params()


@pytest.mark.parametrize("overlay", ["params.real.yaml", "params.qwen.yaml"])
def test_recipes_are_overlays_of_existing_keys_that_merge_into_valid_settings(overlay, tmp_path):
    """A recipe holds only what differs from params.yaml; every key it names exists there (merging
    checks it, naming a misspelt one), and the merged file is what ``make real`` writes."""
    from flows.__main__ import main
    from opd.params import load, merge_overlay

    over = committed_params(overlay)
    merged = parse(recipe_params(overlay))
    default = committed_params()

    def leaves(tree, base, prefix=""):  # every overlay leaf differs from params.yaml: no copied value
        for key, value in tree.items():
            if isinstance(value, dict) and isinstance(base.get(key), dict) and base[key]:
                yield from leaves(value, base[key], f"{prefix}{key}.")
            else:
                yield f"{prefix}{key}", value, base.get(key)

    same = [k for k, v, b in leaves(over, default) if v == b]
    assert not same, f"{overlay} repeats params.yaml's values: {same}"
    assert merged.data.source == "jsonl" and merged.distill.steps < parse(default).distill.steps
    assert main(["merge-params", str(REPO / overlay), str(tmp_path / "params.yaml"), "--params", str(REPO / "params.yaml")]) == 0
    assert load(tmp_path / "params.yaml") == merged
    with pytest.raises(ConfigError, match=r"distill.stepz: not a setting of params.yaml"):
        merge_overlay(default, {"distill": {"stepz": 3}})


def test_every_method_name_is_a_registered_method():
    """``distill.method`` validates against ``MethodName``; ``distill_stage`` looks the name up in
    ``opd.methods.METHODS``: the two lists are the same, and each method knows its own name."""
    from typing import get_args

    from opd.config import MethodName
    from opd.methods import METHODS

    assert set(METHODS) == set(get_args(MethodName))
    assert all(m.name == name for name, m in METHODS.items())
