"""On-policy sampling from the student: batched, with the KV cache, behind one backend interface.

The transformers backend calls ``generate`` (KV cache on) on length-sorted, left-padded batches,
sampling from the PURE policy ``softmax(logits / T)`` (top-p when set; drawn by
:class:`InverseCDFSampling`): the model folder's own
``generation_config`` (repetition penalty, top-k, no-repeat n-grams...) is ignored, since samples
drawn from any other distribution would bias the on-policy gradient silently. A response ends at
any of the model's stop ids (the tokenizer's EOS and every id of ``generation_config.eos_token_id``).
The behaviour policy's per-token log-probs are then recomputed in one teacher-forced pass with
the same code the loss uses (:func:`opd.scoring.token_stats`), so the PPO ratio starts at exactly
1 instead of carrying the small numeric gap between incremental decoding and a full forward pass
(or taken from the update's own forward when a batch makes one update: ``behaviour=False``).
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from tqdm.auto import tqdm
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList, PreTrainedTokenizerBase
from transformers.generation.logits_process import TopPLogitsWarper

from opd.config import RolloutConfig
from opd.losses import soften
from opd.models import dtype_of
from opd.scoring import Sequences, token_stats, unwrap
from opd.tokens import pad


@dataclass
class Rollout:
    """Sampled responses, with the sequences they form with the student's prompts."""

    prompts: list[list[int]]  # student-view prompt ids, one per sample
    responses: list[list[int]]  # response ids, EOS included when generated
    truncated: torch.Tensor  # [B] bool: max_new_tokens hit before EOS
    seq: Sequences  # right-padded prompt + response
    old_logprobs: torch.Tensor | None  # [B, T-1] behaviour log-probs on response targets (None: from the update)
    prompt_index: torch.Tensor  # [B] which input prompt each sample answers (groups of n)
    entropy: torch.Tensor | None = None  # [B, T-1] the behaviour policy's full-vocabulary entropy


class RolloutBackend(Protocol):
    def sample(self, prompts: Sequence[Sequence[int]], n: int) -> tuple[list[list[int]], list[bool]]:
        """Return ``len(prompts) * n`` responses (prompt-major) and whether each was truncated."""


def stop_ids(tok: PreTrainedTokenizerBase, model: torch.nn.Module | None = None) -> list[int]:
    """Every id that ends a response: the tokenizer's EOS, then the model's ``generation_config.eos_token_id``
    (an int or a list: chat models often stop at both an end-of-turn and an end-of-text token)."""
    ids = [tok.eos_token_id]
    gc = getattr(getattr(model, "module", model), "generation_config", None)
    extra = getattr(gc, "eos_token_id", None)
    ids += extra if isinstance(extra, list) else [extra] if extra is not None else []
    return list(dict.fromkeys(i for i in ids if i is not None))


@contextlib.contextmanager
def pure_policy(model: torch.nn.Module) -> Iterator[None]:
    """Hide the model's own ``generation_config`` for one ``generate`` call: transformers fills every
    setting the call leaves unset from it (repetition penalty, top-k, min-p, no-repeat n-grams...)."""
    saved = getattr(model, "generation_config", None)
    model.generation_config = GenerationConfig()
    try:
        yield
    finally:
        model.generation_config = saved


class InverseCDFSampling(LogitsProcessor):
    """Draw each row's next token from ``softmax(logits / T)`` (top-p when set) by inverse-CDF sampling,
    and hand ``generate`` a one-hot score row that its greedy argmax then picks.

    The same distribution as ``generate``'s own ``torch.multinomial``, which on CPU draws one
    exponential variate per vocabulary entry (4 ms per decode step at a 49k vocabulary, more than
    the rest of sampling); this draws one uniform per row and searches the cumulative sum, kept in
    float64 so tokens far below float32's resolution near 1 keep their exact share."""

    def __init__(self, temperature: float, top_p: float):
        self.temperature = temperature
        self.top_p = TopPLogitsWarper(top_p) if top_p < 1.0 else None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        scores = soften(scores, self.temperature)
        if self.top_p is not None:
            scores = self.top_p(input_ids, scores)
        cdf = torch.softmax(scores, -1, dtype=torch.float64).cumsum_(-1)
        u = torch.rand(scores.shape[0], 1, dtype=torch.float64, device=scores.device) * cdf[:, -1:]
        picked = torch.searchsorted(cdf, u, right=True).clamp_(max=scores.shape[-1] - 1)
        return torch.full_like(scores, -math.inf).scatter_(-1, picked, 0.0)


def half_copy(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """A frozen copy of ``model`` whose parameters are in ``dtype``; buffers (rotary frequencies) keep
    their precision, so positions are not rounded. Its LM head reads a contiguous input: ``generate``
    slices the prefill's last position out of ``[B, T, H]``, and a strided bf16 input makes CPU matmul
    fall back to a batched product that copies the whole ``V x H`` head once per row (measured: 0.8 s
    per prefill at batch 4 and a 49k vocabulary, more than the 64 decode steps after it)."""
    twin = copy.deepcopy(unwrap(model)).eval().requires_grad_(False)
    for p in twin.parameters():
        p.data = p.data.to(dtype)
    twin.get_output_embeddings().register_forward_pre_hook(lambda _, args: (args[0].contiguous(), *args[1:]))
    return twin


class TransformersBackend:
    """``model.generate`` with the KV cache on length-sorted, left-padded batches, from the pure policy.

    ``synced``: every rank keeps stepping until all ranks are done (transformers' ``synced_gpus``), which
    FSDP needs, since each forward of a sharded model is a collective.
    ``dtype`` (``rollout.dtype``): sample from a bf16 / fp16 copy of the student instead, refreshed by
    :meth:`sync` before every rollout. A decode step at a small batch is bound by reading the weights
    (at a 49k vocabulary the LM head alone is 113 MB in fp32), so half the bytes is most of the gain,
    as a vLLM engine in bf16 gives on a GPU; the samples then come from a slightly different policy
    than the fp32 one whose log-probs the loss uses (the PPO ratio and its clip see that gap).
    """

    def __init__(self, model: torch.nn.Module, tok: PreTrainedTokenizerBase, cfg: RolloutConfig,
                 progress: str = "", greedy: bool = False, synced: bool = False):
        self.model, self.tok, self.cfg, self.progress, self.greedy, self.synced = model, tok, cfg, progress, greedy, synced
        self.stops = stop_ids(tok, model)
        self.twin = half_copy(model, dtype_of(cfg.dtype)) if cfg.dtype != "fp32" else None

    @torch.no_grad()
    def sync(self, model: torch.nn.Module) -> None:
        """Copy the student's current weights into the half-precision sampler (a no-op without one)."""
        if self.twin is not None:
            for dst, src in zip(self.twin.parameters(), unwrap(model).parameters(), strict=True):
                dst.copy_(src)

    @torch.no_grad()
    def sample(self, prompts: Sequence[Sequence[int]], n: int) -> tuple[list[list[int]], list[bool]]:
        model = self.twin if self.twin is not None else unwrap(self.model)
        device = next(model.parameters()).device
        expanded = [list(p) for p in prompts for _ in range(n)]
        order = sorted(range(len(expanded)), key=lambda i: len(expanded[i]))
        out: list[list[int]] = [[] for _ in expanded]
        trunc: list[bool] = [False] * len(expanded)
        was_training = model.training
        model.eval()
        bs = self.cfg.batch_size
        gen_cfg = GenerationConfig(do_sample=False, max_new_tokens=self.cfg.max_new_tokens, eos_token_id=self.stops,
                                   pad_token_id=self.tok.pad_token_id, use_cache=True)
        sampling = LogitsProcessorList([] if self.greedy else [InverseCDFSampling(self.cfg.temperature, self.cfg.top_p)])
        for start in tqdm(range(0, len(order), bs), desc=self.progress, disable=not self.progress, leave=False):
            idx = order[start:start + bs]
            ids, mask = pad([expanded[i] for i in idx], self.tok.pad_token_id, "left")
            with pure_policy(model):
                gen = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=gen_cfg,
                                     logits_processor=sampling, synced_gpus=self.synced)[:, ids.shape[1]:].tolist()
            for i, row in zip(idx, gen, strict=True):
                out[i], trunc[i] = cut_at_eos(row, self.stops)
        model.train(was_training)
        return out, trunc


def cut_at_eos(row: Sequence[int], stops: int | Iterable[int]) -> tuple[list[int], bool]:
    """Keep tokens up to and including the first stop id; flag rows that never produced one."""
    row = list(row)
    stop = {stops} if isinstance(stops, int) else set(stops)
    for i, t in enumerate(row):
        if t in stop:
            return row[: i + 1], False
    return row, True


class VLLMBackend:
    """vLLM sampling on GPUs, through TRL's ``VLLMGeneration`` (a well-kept adapter over today's vLLM).

    Colocated mode: one engine per rank on the rank's own device (vLLM's ``external_launcher``
    executor, tensor-parallel groups of ``rollout.vllm_tensor_parallel_size`` ranks), sampling its
    rank's shard. ``sync`` pushes the current student's weights into the engine through the model's
    own ``load_weights`` after every optimiser step, gathering FSDP-sharded parameters first, and resets
    the prefix cache (cached KV blocks of the old weights would otherwise be reused). Server mode
    (``rollout.vllm_mode: server``) sends prompts to a ``trl vllm-serve`` process instead. Sampling is
    the pure policy (temperature / top_p only; repetition penalty 1, no top-k). The sampler's own
    log-probs are kept (``last_logprobs``) so the sampler-vs-trainer gap can be logged.

    Not runnable on the project's CPU machines: ``benchmarks/gpu_check.py`` runs it on a GPU machine.
    """

    def __init__(self, model: torch.nn.Module, accelerator: object, tok: PreTrainedTokenizerBase, cfg: RolloutConfig,
                 trust_remote_code: bool = False):
        try:
            from trl.generation.vllm_generation import VLLMGeneration
        except ImportError as err:  # pragma: no cover - depends on the machine
            raise RuntimeError("rollout.backend is 'vllm' but vllm / trl are not installed; on a GPU machine "
                               "pip install -e '.[vllm]', or set rollout.backend: transformers") from err
        self.stops = stop_ids(tok, model)
        self.gen = VLLMGeneration(  # pragma: no cover - GPU only
            getattr(model, "module", model), accelerator, tok, mode=cfg.vllm_mode,
            tensor_parallel_size=cfg.vllm_tensor_parallel_size, gpu_memory_utilization=cfg.vllm_gpu_memory_utilization,
            trust_remote_code=trust_remote_code, temperature=cfg.temperature, top_p=cfg.top_p, top_k=0,
            repetition_penalty=1.0, max_completion_length=cfg.max_new_tokens, logprobs=0,
            generation_kwargs={"stop_token_ids": self.stops})
        self.last_logprobs: list[list[float]] = []

    def sync(self, model: torch.nn.Module) -> None:  # pragma: no cover - GPU only
        self.gen.sync_weights()

    def sample(self, prompts: Sequence[Sequence[int]], n: int) -> tuple[list[list[int]], list[bool]]:  # pragma: no cover
        expanded = [list(p) for p in prompts for _ in range(n)]
        _, completions, logprobs, _ = self.gen.generate(expanded, None, n)
        res = [cut_at_eos(c, self.stops) for c in completions]
        self.last_logprobs = [[lp[0] for lp in row] for row in (logprobs or [])]
        return [r for r, _ in res], [t for _, t in res]


def sampler_gap(sampler: Sequence[Sequence[float]], responses: Sequence[Sequence[int]], old: torch.Tensor,
                mask: torch.Tensor) -> float:
    """Mean |log-prob of the sampler - log-prob of the trainer| over response tokens: how far the engine
    that sampled (vLLM) is from the policy being trained (0 for the transformers backend)."""
    sel = mask.bool()
    gaps = []
    for b, (row, resp) in enumerate(zip(sampler, responses, strict=True)):
        trainer = old[b][sel[b]].tolist()
        gaps += [abs(a - t) for a, t in zip(row[: len(resp)], trainer, strict=False)]
    return sum(gaps) / len(gaps) if gaps else 0.0


def rollout(backend: RolloutBackend, model: torch.nn.Module, prompts: Sequence[Sequence[int]], n: int,
            pad_id: int, chunk: int = 1024, temperature: float = 1.0, mask_truncated: bool = False,
            with_entropy: bool = False, behaviour: bool = True) -> Rollout:
    """Sample ``n`` responses per prompt, then recompute their behaviour log-probs (and entropies)
    teacher-forced, in the same pass (``behaviour=False``: left to the update's forward)."""
    responses, trunc = backend.sample(prompts, n)
    expanded = [list(p) for p in prompts for _ in range(n)]
    seq = Sequences.build(expanded, responses, pad_id)
    truncated = torch.tensor(trunc, dtype=torch.bool)
    if mask_truncated:
        seq.response_mask = seq.response_mask * (~truncated).long().unsqueeze(1)
    seq = seq.to(next(model.parameters()).device)
    old, ent = None, None
    if behaviour:
        with torch.no_grad():
            old, ent = token_stats(model, seq, chunk=chunk, temperature=temperature, with_entropy=with_entropy)
    index = torch.arange(len(prompts)).repeat_interleave(n)
    return Rollout(expanded, responses, truncated, seq, old, index, ent)
