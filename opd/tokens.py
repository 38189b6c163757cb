"""Turning rows into token tensors: chat-formatted prompts, EOS-terminated responses, padding.

Prompts go through each model's own chat template (a teacher and student with different templates
each see their own; docs/peers.md, complaint 5), responses are plain text followed by EOS, so a response's
token ids are the same for every model that shares the vocabulary.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import PreTrainedTokenizerBase

from opd.data import Row, chat


def prompt_ids(tok: PreTrainedTokenizerBase, prompt: str, system: str | None = None) -> list[int]:
    return list(tok.apply_chat_template(chat(prompt, system), add_generation_prompt=True, tokenize=True,
                                        return_dict=False))


def row_prompt_ids(tok: PreTrainedTokenizerBase, row: Row) -> list[int]:
    """A row's prompt (and its system turn, if any) through ``tok``'s own chat template."""
    return prompt_ids(tok, row.prompt, row.system)


def response_ids(tok: PreTrainedTokenizerBase, text: str) -> list[int]:
    return list(tok(text, add_special_tokens=False)["input_ids"]) + [tok.eos_token_id]


def pad(seqs: Sequence[Sequence[int]], pad_id: int, side: str = "right") -> tuple[torch.Tensor, torch.Tensor]:
    """Pad to the longest sequence; returns (ids, attention_mask)."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        sl = slice(width - len(s), width) if side == "left" else slice(0, len(s))
        ids[i, sl] = torch.tensor(s, dtype=torch.long)
        mask[i, sl] = 1
    return ids, mask


def join(prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded prompt+response sequences with a mask of the response positions.

    ``response_mask[b, t] = 1`` where token t of row b is a response token (its log-prob is
    predicted from position t-1).
    """
    seqs = [list(p) + list(r) for p, r in zip(prompts, responses, strict=True)]
    ids, attn = pad(seqs, pad_id, "right")
    resp = torch.zeros_like(ids)
    for i, (p, r) in enumerate(zip(prompts, responses, strict=True)):
        resp[i, len(p):len(p) + len(r)] = 1
    return {"input_ids": ids, "attention_mask": attn, "response_mask": resp}
