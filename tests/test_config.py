from pathlib import Path

import pytest
import yaml

from opd.config import ConfigError, load, parse, to_flat_dict
from tests.conftest import committed_params, tiny


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
    ],
)
def test_bad_values_name_the_key(raw, key, words):
    with pytest.raises(ConfigError) as e:
        parse(raw)
    msg = str(e.value)
    assert f"  {key}" in msg and words in msg, msg


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
    real, default = parse(committed_params("params.real.yaml")), parse(committed_params())
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
