"""Build, load and save causal LMs and their tokenizers; check teacher/student compatibility.

Weights are loaded with safetensors only and ``trust_remote_code`` stays off unless the config
turns it on: a model folder is untrusted input.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from opd.config import ArchConfig, Params
from opd.data import atomic_dir


class ModelError(ValueError):
    """A model folder or tokenizer that cannot be used; the message says what to fix."""


def build_llama(arch: ArchConfig, tok: PreTrainedTokenizerBase, seed: int) -> LlamaForCausalLM:
    """A small Llama from config, initialised deterministically from ``seed``."""
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=arch.hidden_size,
        intermediate_size=arch.intermediate_size,
        num_hidden_layers=arch.num_layers,
        num_attention_heads=arch.num_heads,
        num_key_value_heads=arch.num_heads,
        max_position_embeddings=arch.max_positions,
        tie_word_embeddings=True,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=None,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LlamaForCausalLM(cfg)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def load_tokenizer(path: str | Path, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    path = Path(path)
    if not path.is_dir():
        raise ModelError(f"tokenizer folder {path} does not exist")
    if not any((path / f).is_file() for f in TOKENIZER_FILES):
        raise ModelError(f"{path} has no tokenizer files (none of {', '.join(TOKENIZER_FILES)}): save the model's "
                         "tokenizer into it with tokenizer.save_pretrained(folder), or import the model with "
                         "python -m flows import-model")
    try:
        tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise ModelError(f"the tokenizer in {path} cannot be loaded: {err}") from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    if tok.eos_token_id is None:
        raise ModelError(f"tokenizer at {path} has no EOS token")
    if not tok.chat_template:
        raise ModelError(f"tokenizer at {path} has no chat template")
    tok.padding_side = "left"
    return tok


def dtype_of(precision: str) -> torch.dtype:
    """``fp32`` / ``bf16`` / ``fp16`` as a torch dtype: where models are stored in half precision. Teachers
    and the reference model never train, so under ``runtime.mixed_precision`` they are stored in it (a 7B
    teacher in bf16 takes 14 GB, not 28) while the student keeps fp32 master weights under autocast; the
    sampler copy of ``rollout.dtype`` too."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)


def load_model(path: str | Path, trust_remote_code: bool = False, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """Load a local Hugging Face causal LM folder (safetensors only)."""
    path = Path(path)
    if not path.is_dir():
        raise ModelError(f"model folder {path} does not exist (set teacher.path / student.path to a local folder, "
                         "or run the teacher stage)")
    weights = sorted(path.glob("*.safetensors"))
    if not weights:
        raise ModelError(f"model folder {path} has no .safetensors weights (pickle checkpoints are not loaded; "
                         "convert with save_pretrained(safe_serialization=True))")
    if not (path / "config.json").is_file():
        raise ModelError(f"model folder {path} has no config.json: it is not a Hugging Face model folder "
                         "(save it with model.save_pretrained(folder))")
    _check_safetensors(weights)
    _warn_remote_code(path, trust_remote_code)
    try:
        return AutoModelForCausalLM.from_pretrained(str(path), use_safetensors=True, dtype=dtype,
                                                    trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as err:
        raise ModelError(f"the model in {path} cannot be loaded: {err}") from None


def _check_safetensors(files: list[Path]) -> None:
    """Read each weights file's header (cheap) so a truncated or damaged file is named, not a library trace."""
    from safetensors import safe_open

    for f in files:
        try:
            with safe_open(str(f), framework="pt") as handle:
                handle.keys()
        except Exception as err:  # safetensors raises its own error types for damaged files
            raise ModelError(f"{f} is damaged or incomplete ({err}); copy or convert the model again") from None


def _warn_remote_code(path: Path, trust_remote_code: bool) -> None:
    """A config that asks for custom code (``auto_map``) while ``runtime.trust_remote_code`` is off: say that
    the code is NOT run and which standard class loads instead (or fail when there is none)."""
    import json
    import warnings

    cfg = json.loads((path / "config.json").read_text(encoding="utf-8"))
    if trust_remote_code or "auto_map" not in cfg:
        return
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    kind = cfg.get("model_type")
    if kind not in CONFIG_MAPPING_NAMES:
        raise ModelError(f"{path}/config.json needs custom code (auto_map {cfg['auto_map']}) for model_type {kind!r}, "
                         "which transformers does not know; runtime.trust_remote_code is off, so that code is not "
                         "run. Read the code, then set runtime.trust_remote_code: true if you trust it.")
    warnings.warn(f"{path}/config.json asks for custom code (auto_map); runtime.trust_remote_code is off, so it is "
                  f"not run: the standard transformers class for model_type {kind!r} loads instead", stacklevel=3)


def tokenizer_source(params: Params) -> str | None:
    """Where the pipeline's tokenizer comes from: ``data.tokenizer_path``, else the user's model folders
    (student, then teacher); None for the embedded world (prepare trains one)."""
    return params.data.tokenizer_path or params.student.path or params.teacher.path


def control_tokens(params: Params) -> list[str]:
    """Every special or added token of the pipeline's tokenizer (chat-template markers such as
    ``<|im_start|>``): text containing one could inject turns into the template."""
    source = tokenizer_source(params)
    if source is None:
        from opd.world.tokenizer import SPECIAL_TOKENS

        return list(SPECIAL_TOKENS)
    tok = load_tokenizer(source, params.runtime.trust_remote_code)
    added = [t.content for t in getattr(tok, "added_tokens_decoder", {}).values()]
    return sorted({t for t in [*tok.all_special_tokens, *added] if t and t.strip()})


def save_model(model: PreTrainedModel, tok: PreTrainedTokenizerBase, out: str | Path) -> None:
    """save_pretrained (safetensors) + tokenizer, through an atomic folder swap."""
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)


def check_compatible(teacher: PreTrainedTokenizerBase, student: PreTrainedTokenizerBase, name: str = "teacher") -> None:
    """Teacher log-probs are read on the student's token ids, so the vocabularies must be equal."""
    tv, sv = teacher.get_vocab(), student.get_vocab()
    if tv == sv and teacher.eos_token_id == student.eos_token_id:
        return
    diff = sorted(set(tv.items()) ^ set(sv.items()), key=lambda kv: kv[1])[:5]
    raise ModelError(
        f"{name} and student tokenizers differ: vocabulary sizes {len(tv)} vs {len(sv)}, "
        f"EOS ids {teacher.eos_token_id} vs {student.eos_token_id}; differing (token, id) e.g. {diff}. "
        "On-policy distillation scores the student's tokens with the teacher, so both must share one tokenizer."
    )


def evenly_spaced(n: int, k: int) -> list[int]:
    """``k`` of ``n`` layer indices, evenly spaced, first and last kept (k = 1 keeps the first)."""
    if not 1 <= k <= n:
        raise ModelError(f"student.init.n_layers {k}: the teacher has {n} decoder layers (keep 1 to {n})")
    return [0] if k == 1 else sorted({round(i * (n - 1) / (k - 1)) for i in range(k)})


def prune_layers(model: PreTrainedModel, keep: list[int]) -> PreTrainedModel:
    """A smaller model of the same family: the embeddings, final norm, head, tokenizer and the decoder
    layers ``keep`` of ``model``, in order (layer pruning, the Minitron recipe's first step).

    Works for any causal LM whose decoder layers are ``model.model.layers`` (Llama, Qwen2, Mistral,
    Gemma...); per-layer config lists (``layer_types``) are pruned alike.
    """
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise ModelError(f"cannot prune {type(model).__name__}: its decoder layers are not at model.layers "
                         "(Llama / Qwen2 / Mistral style models are supported)")
    n = len(layers)
    if not keep or sorted(set(keep)) != list(keep) or keep[0] < 0 or keep[-1] >= n:
        raise ModelError(f"student.init.keep_layers {keep}: expected increasing, distinct indices in 0..{n - 1}")
    cfg = copy.deepcopy(model.config)
    cfg.num_hidden_layers = len(keep)
    if isinstance(getattr(cfg, "layer_types", None), list):
        cfg.layer_types = [cfg.layer_types[i] for i in keep]
    pattern = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
    state = {}
    for key, value in model.state_dict().items():
        m = pattern.match(key)
        if not m:
            state[key] = value
        elif int(m.group(1)) in keep:
            state[f"model.layers.{keep.index(int(m.group(1)))}.{m.group(2)}"] = value
    student = type(model)(cfg).to(next(model.parameters()).dtype)
    student.load_state_dict(state, strict=True)
    student.generation_config = copy.deepcopy(model.generation_config)
    return student


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
