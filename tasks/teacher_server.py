"""``python -m flows serve-teacher MODEL_DIR --port P``: a model folder as a teacher server on a CPU.

It speaks the part of vLLM's OpenAI-compatible API that scoring needs (opd/remote.py), so the same
``teacher.server`` settings point at ``vllm serve MODEL --port P`` on a GPU machine:

- ``GET /v1/models``: the model's id, ``root`` (its folder), ``max_model_len`` and ``revision`` (the
  folder's DVC md5: what the server is, for the run's lineage);
- ``POST /tokenize``: ``{"prompt": text, "add_special_tokens": bool}`` -> ``{"tokens": [...]}``;
- ``POST /v1/completions``: ``prompt`` token-id lists, ``max_tokens`` 0 or 1 (it scores, it does not
  generate: ``text`` is empty), ``temperature``, ``prompt_logprobs: k`` -> per position the k most likely
  tokens and the prompt's own token, ``{str(id): {"logprob", "rank"}}``, ranks from 1.

Built on FastAPI under uvicorn. Requests that arrive while a batch is being scored wait and are scored
together in the next forward (:class:`Batcher`), up to ``--max-batch-tokens``; the forward runs in a
worker thread so the server keeps accepting. Binds to 127.0.0.1 unless ``--host`` says otherwise.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from fastapi import FastAPI, HTTPException
from pydantic import BaseModel, Field

Scores = list[list[dict[str, dict[str, float]] | None]]


class Completion(BaseModel):
    model: str | None = None
    prompt: list[list[int]] | list[int]
    max_tokens: int = Field(1, ge=0, le=1)
    temperature: float = Field(1.0, gt=0)
    prompt_logprobs: int = Field(0, ge=0)
    echo: bool = False


class Tokenize(BaseModel):
    model: str | None = None
    prompt: str
    add_special_tokens: bool = True


def scorer(model: torch.nn.Module, pad_id: int, chunk: int = 256) -> Callable[[list[list[int]], int, float], Scores]:
    """The model's per-position answers for right-padded rows, one forward for all of them; the LM head
    runs in chunks of positions (no ``[B, T, V]`` logits)."""
    from opd.losses import soften

    head = model.get_output_embeddings()

    @torch.no_grad()
    def score(rows: list[list[int]], k: int, temperature: float) -> Scores:
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        att = torch.zeros_like(ids)
        for b, r in enumerate(rows):
            ids[b, :len(r)], att[b, :len(r)] = torch.tensor(r), 1
        hidden = model.base_model(input_ids=ids, attention_mask=att).last_hidden_state
        out: Scores = []
        for b, r in enumerate(rows):
            answers: list[dict[str, dict[str, float]] | None] = [None]
            target = ids[b, 1:len(r)]
            for s in range(0, len(r) - 1, chunk):
                lp = torch.log_softmax(soften(head(hidden[b, s:min(s + chunk, len(r) - 1)]).float(), temperature), -1)
                own = lp.gather(-1, target[s:s + chunk, None])
                rank = (lp > own).sum(-1) + 1
                top = lp.topk(k, dim=-1) if k else None
                for j in range(lp.shape[0]):
                    at = {}
                    if top is not None:
                        at = {str(int(i)): {"logprob": float(v), "rank": n + 1}
                              for n, (v, i) in enumerate(zip(top.values[j], top.indices[j], strict=True))}
                    at.setdefault(str(int(target[s + j])), {"logprob": float(own[j, 0]), "rank": int(rank[j])})
                    answers.append(at)
            out.append(answers)
        return out

    return score


class Batcher:
    """Scores requests in batches: whatever queued while the previous batch ran goes into the next forward
    (same ``k`` and temperature), up to ``max_tokens`` prompt tokens."""

    def __init__(self, score: Callable[[list[list[int]], int, float], Scores], max_tokens: int):
        self.score, self.max_tokens = score, max_tokens
        self.queue: asyncio.Queue[tuple[list[list[int]], int, float, asyncio.Future[Scores]]] = asyncio.Queue()

    async def submit(self, rows: list[list[int]], k: int, temperature: float) -> Scores:
        fut: asyncio.Future[Scores] = asyncio.get_running_loop().create_future()
        await self.queue.put((rows, k, temperature, fut))
        return await fut

    async def run(self) -> None:
        while True:
            batch = [await self.queue.get()]
            tokens = sum(map(len, batch[0][0]))
            while not self.queue.empty() and tokens < self.max_tokens:
                batch.append(self.queue.get_nowait())
                tokens += sum(map(len, batch[-1][0]))
            for key in {(k, t) for _, k, t, _ in batch}:
                same = [item for item in batch if (item[1], item[2]) == key]
                rows = [r for item in same for r in item[0]]
                try:
                    scored = await asyncio.to_thread(self.score, rows, *key)
                except Exception as err:  # noqa: BLE001 - the request gets it as a 500, the server goes on
                    for item in same:
                        item[3].set_exception(err)
                    continue
                for item in same:
                    item[3].set_result(scored[:len(item[0])])
                    scored = scored[len(item[0]):]


def create_app(folder: Path, name: str | None = None, max_batch_tokens: int = 8192, trust_remote_code: bool = False,
               dtype: str = "fp32") -> FastAPI:
    from opd.data import digest
    from opd.models import dtype_of, load_model, load_tokenizer
    from opd.stages import context_of

    folder = Path(folder).resolve()
    model = load_model(folder, trust_remote_code, dtype_of(dtype)).eval()  # log-probs are taken in float32
    tok = load_tokenizer(folder, trust_remote_code)
    name = name or folder.name
    context = context_of(model)  # what the distill stage reads from a local model's config
    card = {"id": name, "object": "model", "owned_by": "opd", "root": str(folder), "max_model_len": context,
            "revision": digest(folder)}
    batcher = Batcher(scorer(model, tok.pad_token_id if tok.pad_token_id is not None else 0), max_batch_tokens)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI):  # the batcher lives as long as the server
        task = asyncio.create_task(batcher.run())
        yield
        task.cancel()

    app = FastAPI(title="opd teacher server", lifespan=lifespan)

    def check_model(asked: str | None) -> None:
        if asked is not None and asked != name:
            raise HTTPException(404, f"model {asked!r} is not served here (this server serves {name!r})")

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [card]}

    @app.post("/tokenize")
    async def tokenize(req: Tokenize) -> dict[str, Any]:
        check_model(req.model)
        ids = tok(req.prompt, add_special_tokens=req.add_special_tokens)["input_ids"]
        return {"tokens": ids, "count": len(ids), "max_model_len": context}

    @app.post("/v1/completions")
    async def completions(req: Completion) -> dict[str, Any]:
        check_model(req.model)
        rows = [req.prompt] if req.prompt and isinstance(req.prompt[0], int) else req.prompt
        if not rows or any(not r for r in rows):
            raise HTTPException(400, "prompt: token-id lists, none empty")
        vocab = model.get_output_embeddings().weight.shape[0]
        if any(t < 0 or t >= vocab for r in rows for t in r):
            raise HTTPException(400, f"prompt: token ids must lie in [0, {vocab})")
        if max(map(len, rows)) > context:
            raise HTTPException(400, f"prompt: {max(map(len, rows))} tokens, max_model_len is {context}")
        scored = await batcher.submit(rows, req.prompt_logprobs, req.temperature)
        return {"object": "text_completion", "model": name,
                "choices": [{"index": i, "text": "", "prompt_logprobs": s, "finish_reason": "length"}
                            for i, s in enumerate(scored)]}

    return app


def serve(folder: str, host: str = "127.0.0.1", port: int = 8000, name: str | None = None, max_batch_tokens: int = 8192,
          threads: int = 0, trust_remote_code: bool = False, dtype: str = "fp32") -> None:
    import uvicorn

    if threads:
        torch.set_num_threads(threads)
    # a stop (SIGTERM, Ctrl-C) waits at most 5 s for requests in flight: a client retrying a long request
    # must not keep the server alive
    uvicorn.run(create_app(Path(folder), name, max_batch_tokens, trust_remote_code, dtype), host=host, port=port,
                log_level="warning", timeout_graceful_shutdown=5)
