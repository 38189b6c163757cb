"""On-policy sampling from the student: batched, with the KV cache, behind one backend interface.

The transformers backend calls ``generate`` (KV cache on) on length-sorted, left-padded batches.
The behaviour policy's per-token log-probs are then recomputed in one teacher-forced pass with
the same code the loss uses (:func:`opd.scoring.token_stats`), so the PPO ratio starts at exactly
1 instead of carrying the small numeric gap between incremental decoding and a full forward pass.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from opd.config import RolloutConfig
from opd.scoring import Sequences, token_stats
from opd.tokens import pad


@dataclass
class Rollout:
    """Sampled responses, with the sequences they form with the student's prompts."""

    prompts: list[list[int]]  # student-view prompt ids, one per sample
    responses: list[list[int]]  # response ids, EOS included when generated
    truncated: torch.Tensor  # [B] bool: max_new_tokens hit before EOS
    seq: Sequences  # right-padded prompt + response
    old_logprobs: torch.Tensor  # [B, T-1] behaviour log-probs on response targets
    prompt_index: torch.Tensor  # [B] which input prompt each sample answers (groups of n)
    entropy: torch.Tensor | None = None  # [B, T-1] the behaviour policy's full-vocabulary entropy


class RolloutBackend(Protocol):
    def sample(self, prompts: Sequence[Sequence[int]], n: int) -> tuple[list[list[int]], list[bool]]:
        """Return ``len(prompts) * n`` responses (prompt-major) and whether each was truncated."""


class TransformersBackend:
    """``model.generate`` with the KV cache on length-sorted, left-padded batches."""

    def __init__(self, model: torch.nn.Module, tok: PreTrainedTokenizerBase, cfg: RolloutConfig,
                 progress: bool = False, greedy: bool = False):
        self.model, self.tok, self.cfg, self.progress, self.greedy = model, tok, cfg, progress, greedy

    @torch.no_grad()
    def sample(self, prompts: Sequence[Sequence[int]], n: int) -> tuple[list[list[int]], list[bool]]:
        model = getattr(self.model, "module", self.model)
        device = next(model.parameters()).device
        expanded = [list(p) for p in prompts for _ in range(n)]
        order = sorted(range(len(expanded)), key=lambda i: len(expanded[i]))
        out: list[list[int]] = [[] for _ in expanded]
        trunc: list[bool] = [False] * len(expanded)
        eos = self.tok.eos_token_id
        was_training = model.training
        model.eval()
        bs = self.cfg.batch_size
        for start in tqdm(range(0, len(order), bs), desc="rollout", disable=not self.progress, leave=False):
            idx = order[start:start + bs]
            ids, mask = pad([expanded[i] for i in idx], self.tok.pad_token_id, "left")
            sampling = {} if self.greedy else {"temperature": self.cfg.temperature, "top_p": self.cfg.top_p, "top_k": 0}
            gen = model.generate(
                input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=not self.greedy, **sampling,
                max_new_tokens=self.cfg.max_new_tokens, eos_token_id=eos, pad_token_id=self.tok.pad_token_id,
                use_cache=True,
            )[:, ids.shape[1]:].tolist()
            for i, row in zip(idx, gen, strict=True):
                out[i], trunc[i] = cut_at_eos(row, eos)
        model.train(was_training)
        return out, trunc


def cut_at_eos(row: Sequence[int], eos: int) -> tuple[list[int], bool]:
    """Keep tokens up to and including the first EOS; flag rows that never produced one."""
    row = list(row)
    if eos in row:
        return row[: row.index(eos) + 1], False
    return row, True


class VLLMBackend:
    """vLLM sampling (GPU). Untested on this CPU-only project; used when ``rollout.backend: vllm``.

    The engine is created once from a folder of the current student; ``sync`` pushes updated
    weights into it after each optimiser step (the TRL colocate recipe).
    """

    def __init__(self, model_dir: str, tok: PreTrainedTokenizerBase, cfg: RolloutConfig, seed: int):
        try:
            from vllm import LLM, SamplingParams
        except ImportError as err:  # pragma: no cover - depends on the machine
            raise RuntimeError("rollout.backend is 'vllm' but vllm is not installed; "
                               "pip install vllm on a GPU machine, or set rollout.backend: transformers") from err
        self.llm = LLM(model=model_dir, seed=seed, enable_prefix_caching=True, gpu_memory_utilization=0.3)
        self.params = SamplingParams(temperature=cfg.temperature, top_p=cfg.top_p, max_tokens=cfg.max_new_tokens,
                                     stop_token_ids=[tok.eos_token_id])
        self.eos = tok.eos_token_id

    def sync(self, model: torch.nn.Module) -> None:  # pragma: no cover - GPU only
        engine_model = self.llm.llm_engine.model_executor.driver_worker.model_runner.model
        engine_model.load_weights(getattr(model, "module", model).state_dict().items())

    def sample(self, prompts: Sequence[Sequence[int]], n: int) -> tuple[list[list[int]], list[bool]]:  # pragma: no cover
        from vllm import TokensPrompt

        outs = self.llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in prompts for _ in range(n)],
                                 self.params, use_tqdm=False)
        res = [cut_at_eos(o.outputs[0].token_ids, self.eos) for o in outs]
        return [r for r, _ in res], [t for _, t in res]


def rollout(backend: RolloutBackend, model: torch.nn.Module, prompts: Sequence[Sequence[int]], n: int,
            pad_id: int, chunk: int = 1024, temperature: float = 1.0, mask_truncated: bool = False,
            with_entropy: bool = False) -> Rollout:
    """Sample ``n`` responses per prompt, then recompute their behaviour log-probs (and entropies)
    teacher-forced, in the same pass."""
    responses, trunc = backend.sample(prompts, n)
    expanded = [list(p) for p in prompts for _ in range(n)]
    seq = Sequences.build(expanded, responses, pad_id)
    truncated = torch.tensor(trunc, dtype=torch.bool)
    if mask_truncated:
        seq.response_mask = seq.response_mask * (~truncated).long().unsqueeze(1)
    seq = seq.to(next(model.parameters()).device)
    with torch.no_grad():
        old, ent = token_stats(model, seq, chunk=chunk, temperature=temperature, with_entropy=with_entropy)
    index = torch.arange(len(prompts)).repeat_interleave(n)
    return Rollout(expanded, responses, truncated, seq, old, index, ent)
