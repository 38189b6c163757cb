"""A teacher that lives in its own server, scored through the same pass as a teacher in this process.

Why: every rank loading every teacher caps the teacher at what fits beside the student, its optimiser
and the rollout, N times over under N processes. A teacher server (``vllm serve`` on GPUs, ``python -m
flows serve-teacher`` on a CPU) holds it once for every rank and every run.

The protocol is vLLM's (and TRL's server distillation client's): ``POST /v1/completions`` with
``prompt`` a list of token-id lists (the engine builds the teacher's view of each prompt, a
constitution included, and sends ids: no text crosses), ``max_tokens: 1``, ``temperature`` and
``prompt_logprobs: k``. Each choice's ``prompt_logprobs[p]`` (None at ``p = 0``) maps ``str(token id)``
to ``{"logprob", "rank"}`` for the k most likely tokens at position p and for the prompt's own token
there. ``GET /v1/models`` names the model and its ``max_model_len``; ``POST /tokenize`` gives a text's ids.

Exact with a remote teacher: the log-prob of every sampled token (the rewards of opd, fire and copsd).
Top-k approximations: whatever needs the teacher's whole distribution (gkd's divergence, the
mass-covering term, the teacher entropy in FiRe's weights) gets the server's ``top_k`` log-probs and a
tail bucket ``log(1 - sum p_topk)``, the form the engine already uses for ``distill.top_k``.
"""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from opd.config import ServerConfig
from opd.losses import with_tail

API_KEY_ENV = "OPD_TEACHER_API_KEY"  # sent as a bearer token (vllm serve --api-key); never in params.yaml
# Texts whose ids must agree between the server's tokenizer and the student's (with the tokenizer's own
# special tokens added): words, digits, code, whitespace runs, accents, CJK, emoji.
PROBES = ("Hello, world!", "How do I kill a Python process that is hanging?", "  12 + 30 = 42\n\n",
          "def f(x):\n    return x ** 2  # square", "naïve café, Grüße", "日本語のテキスト", "🙂 ok 🚀", "I can't help with that.")


class TeacherServerError(RuntimeError):
    """The teacher server did not answer, answered an error, or does not match the student."""


@dataclass
class RowScores:
    """One sequence's response positions: the log-prob of each response token, and with ``k`` > 0 the
    ``k`` most likely tokens there (ids and log-probs, by rank)."""

    logp: list[float]
    top_ids: list[list[int]]
    top_logp: list[list[float]]


def pack(lengths: list[int], max_tokens: int) -> list[list[int]]:
    """Consecutive indices grouped so each group's lengths sum to at most ``max_tokens`` (a longer
    sequence goes alone)."""
    groups: list[list[int]] = []
    total = 0
    for i, n in enumerate(lengths):
        if groups and total + n <= max_tokens:
            groups[-1].append(i)
            total += n
        else:
            groups.append([i])
            total = n
    return groups


class RemoteTeacher:
    """A teacher model on a server (``teacher.server`` / ``teachers.<name>.server``); ``setting`` names
    it in every error."""

    def __init__(self, cfg: ServerConfig, setting: str = "teacher.server"):
        self.cfg, self.setting = cfg, setting
        cards = self._request("GET", "/v1/models").get("data") or []
        ids = [c.get("id") for c in cards]
        if not ids or (cfg.model is not None and cfg.model not in ids):
            raise TeacherServerError(f"{setting}.model: the server at {cfg.url} serves {ids}, not {cfg.model!r}")
        card = next(c for c in cards if cfg.model is None or c.get("id") == cfg.model)
        self.model: str = card["id"]
        self.context = int(card.get("max_model_len") or 10**9)
        self.vocab: int | None = None  # the student's, once check() has compared the tokenizers
        # what the server says it is: the teacher is an input no folder hash covers (MLflow, the model card)
        self.identity = {"url": cfg.url, "model": self.model, "root": str(card.get("root") or ""),
                         "revision": str(card.get("revision") or card.get("opd_revision") or ""),
                         "max_model_len": str(self.context)}

    # ------------------------------------------------------------------------------------------ http
    def _request(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        """One call, retried with backoff on connection errors, timeouts and 5xx answers until
        ``timeout_s`` is spent; a 4xx answer fails at once with the server's message."""
        headers = {"Content-Type": "application/json"}
        if os.environ.get(API_KEY_ENV):
            headers["Authorization"] = f"Bearer {os.environ[API_KEY_ENV]}"
        data = None if body is None else json.dumps(body).encode()
        deadline = time.monotonic() + self.cfg.timeout_s
        delay, last, answered = 0.25, "", ""
        while True:
            left = deadline - time.monotonic()
            try:
                req = urllib.request.Request(self.cfg.url + path, data=data, method=method, headers=headers)
                with urllib.request.urlopen(req, timeout=max(0.5, left)) as r:
                    return json.loads(r.read())
            except urllib.error.HTTPError as err:
                detail = err.read().decode(errors="replace")[:400]
                if err.code < 500:
                    raise TeacherServerError(f"{self.setting}.url {self.cfg.url}{path}: HTTP {err.code}: {detail}") from None
                last = answered = f"HTTP {err.code}: {detail}"
            except (urllib.error.URLError, OSError, ValueError) as err:  # refused, reset, timed out, not JSON
                last = f"{type(err).__name__}: {getattr(err, 'reason', err)}"
            if time.monotonic() + delay >= deadline:
                said = f"; its last answer: {answered}" if answered and answered != last else ""
                raise TeacherServerError(f"{self.setting}.url {self.cfg.url}: no answer within {self.setting}.timeout_s "
                                         f"= {self.cfg.timeout_s:g} s ({last}{said}); is the teacher server running?")
            time.sleep(delay)
            delay = min(2 * delay, 4.0)

    # ------------------------------------------------------------------------------------ scoring
    def score(self, sequences: list[list[int]], starts: list[int], temperature: float, k: int) -> list[RowScores]:
        """Log-probs of ``sequences[i][starts[i]:]`` given what precedes each token, and with ``k`` > 0 the
        top-k at each of those positions; requests of at most ``max_batch_tokens`` go concurrently."""
        groups = pack([len(s) for s in sequences], self.cfg.max_batch_tokens)

        def send(idx: list[int]) -> list[RowScores]:
            body = {"model": self.model, "prompt": [sequences[i] for i in idx], "max_tokens": 1,
                    "temperature": temperature, "prompt_logprobs": k}
            choices = sorted(self._request("POST", "/v1/completions", body).get("choices") or [],
                             key=lambda c: c.get("index", 0))
            if len(choices) != len(idx):
                raise TeacherServerError(f"{self.setting}.url {self.cfg.url}: {len(choices)} answers to {len(idx)} prompts")
            return [self._parse(c, sequences[i], starts[i], k) for c, i in zip(choices, idx, strict=True)]

        with ThreadPoolExecutor(max_workers=min(self.cfg.concurrency, len(groups)) or 1) as pool:
            parts = list(pool.map(send, groups))
        return [row for part in parts for row in part]

    def _parse(self, choice: dict[str, Any], seq: list[int], start: int, k: int) -> RowScores:
        plp = choice.get("prompt_logprobs")
        if not isinstance(plp, list) or len(plp) != len(seq):
            raise TeacherServerError(f"{self.setting}.url {self.cfg.url}: no prompt_logprobs for a {len(seq)}-token "
                                     "prompt (vLLM: start it with --max-logprobs at least top_k)")
        out = RowScores([], [], [])
        for p in range(start, len(seq)):
            at = plp[p] or {}
            own = at.get(str(seq[p]))
            if own is None:
                raise TeacherServerError(f"{self.setting}.url {self.cfg.url}: no log-prob for token {seq[p]} at position {p}")
            out.logp.append(float(own["logprob"]))
            if k:
                top = sorted(at.items(), key=lambda kv: kv[1]["rank"])[:k]
                if len(top) < k:
                    raise TeacherServerError(f"{self.setting}.url {self.cfg.url}: {len(top)} log-probs at a position, "
                                             f"{self.setting}.top_k is {k}")
                out.top_ids.append([int(t) for t, _ in top])
                out.top_logp.append([float(v["logprob"]) for _, v in top])
        return out

    def teacher_pass(self, seq: Any, temperature: float = 1.0, with_entropy: bool = False,
                     top_k: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None, Any]:
        """:func:`opd.scoring.teacher_pass` through the server: the sequences' response-token log-probs
        ``[B, T-1]`` (exact), and from the server's top-k plus a tail bucket the entropies and, with
        ``top_k`` not None (whatever k was asked: the server's is used), the distribution."""
        from opd.scoring import TeacherDist

        ids, att, resp = seq.input_ids.cpu(), seq.attention_mask.cpu(), seq.response_mask.cpu()
        rows, starts = [], []
        for b in range(ids.shape[0]):
            n = int(att[b].sum())
            rows.append(ids[b, :n].tolist())
            starts.append(int(resp[b, :n].nonzero()[0]) if bool(resp[b, :n].any()) else n)
        k = self.cfg.top_k if (with_entropy or top_k is not None) else 0
        scores = self.score(rows, starts, temperature, k)
        logp = torch.zeros(ids.shape[0], ids.shape[1] - 1)
        for b, (row, st, sc) in enumerate(zip(rows, starts, scores, strict=True)):
            logp[b, st - 1:len(row) - 1] = torch.tensor(sc.logp)
        if not k:
            return logp, None, None
        full = with_tail(torch.tensor([t for sc in scores for t in sc.top_logp], dtype=torch.float32).reshape(-1, k))
        index = torch.tensor([t for sc in scores for t in sc.top_ids], dtype=torch.long).reshape(-1, k)
        ent = None
        if with_entropy:
            ent = torch.zeros_like(logp)
            ent[resp[:, 1:].bool()] = self.entropy(full)
        dist = TeacherDist(full, index, resp[:, 1:].sum(1)) if top_k is not None else None
        return logp, ent, dist

    def entropy(self, full: torch.Tensor) -> torch.Tensor:
        """The entropy of a top-k + tail distribution ``[N, k+1]``, the tail's mass spread evenly over the
        ``vocab - k`` tokens it holds (the most it can hold, so an upper bound of the true entropy; lumped
        into one token it would be a lower bound, and on a flat teacher a useless one: 0.3 nats for 5.7).
        For a peaked teacher both bounds meet; before :meth:`check` has seen the vocabulary, the lumped one."""
        top, tail = full[:, :-1], full[:, -1]
        h = -(top.exp() * top).sum(-1)
        spread = tail - (torch.log(torch.tensor(float(self.vocab - top.shape[1]))) if self.vocab and self.vocab > top.shape[1] else 0.0)
        return h - tail.exp() * spread

    # ----------------------------------------------------------------------------------- checks
    def check(self, tok: PreTrainedTokenizerBase, temperatures: set[float]) -> None:
        """Before training: the server tokenizes like the student (probe texts and the special tokens), and
        applies a temperature other than 1 when one is used (a server that ignores it would give the wrong
        log-probs without a word). Its context is checked with the prompts (``PromptPool.check_fits``)."""
        self.vocab = len(tok)
        specials = [t for t in tok.all_special_tokens if t]
        for text in (*PROBES, " ".join(specials)):
            theirs = self._request("POST", "/tokenize", {"model": self.model, "prompt": text,
                                                         "add_special_tokens": False}).get("tokens")
            mine = tok(text, add_special_tokens=False)["input_ids"]
            if theirs != mine:
                raise TeacherServerError(f"{self.setting}: the server's tokenizer ({self.model} at {self.cfg.url}) gives "
                                         f"{theirs} for {text!r}, the student's gives {mine}: the teacher must share "
                                         "the student's vocabulary")
        probe = tok(PROBES[1], add_special_tokens=False)["input_ids"]
        plain = self.score([probe], [1], 1.0, 0)[0].logp if temperatures - {1.0} else []
        for t in sorted(temperatures - {1.0}):
            scaled = self.score([probe], [1], t, 0)[0].logp
            if max(abs(a - b) for a, b in zip(plain, scaled, strict=True)) < 1e-6:
                raise TeacherServerError(f"{self.setting}: the server at {self.cfg.url} returns the same log-probs at "
                                         f"temperature {t:g} as at 1 (it does not apply the temperature), and this run "
                                         "scores at that temperature: set rollout.temperature (and for gkd "
                                         "distill.temperature) to 1.0, or serve the teacher with python -m flows serve-teacher")
