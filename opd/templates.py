"""Chat-template agreement between a teacher and its student.

Each model reads prompts through its own chat template (:func:`opd.tokens.row_prompt_ids`), so a
teacher and a student with different templates are never silently mixed. That is only safe if the
teacher's scores do not depend on which template the prompt came in, and when the templates differ
that is worth a number: the teacher's mean log-prob of reference answers after its own template vs
after the student's. A large gap says that a method feeding the teacher the student's prompt
(as several OPD implementations do) would score the student against a confused teacher.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from transformers import PreTrainedTokenizerBase

from opd.data import Row
from opd.scoring import Sequences, device_of, teacher_pass
from opd.tokens import response_ids, row_prompt_ids


def template_gap(teacher: Any, teacher_tok: PreTrainedTokenizerBase, student_tok: PreTrainedTokenizerBase,
                 rows: Sequence[Row], n: int = 8, chunk: int = 1024) -> dict[str, float]:
    """``template_match`` 1.0 when both templates give the same prompt ids for the first ``n`` rows with a
    reference; otherwise also the teacher's mean per-token log-prob of those references after its own
    template and after the student's (the tokenizers share a vocabulary: checked before this is called)."""
    picked = [r for r in rows if r.reference][:n]
    own = [row_prompt_ids(teacher_tok, r) for r in picked]
    theirs = [row_prompt_ids(student_tok, r) for r in picked]
    if own == theirs:
        return {"template_match": 1.0}
    responses = [response_ids(teacher_tok, r.reference or "") for r in picked]
    device = device_of(teacher)  # a torch module, or a teacher server (opd/remote.py)

    def mean_logprob(prompts: list[list[int]]) -> float:
        seq = Sequences.build(prompts, responses, teacher_tok.pad_token_id).to(device)
        lp, _, _ = teacher_pass(teacher, seq, chunk=chunk)
        mask = seq.targets_mask
        return float((lp.float() * mask).sum() / mask.sum())

    return {"template_match": 0.0, "teacher_logprob_own_template": round(mean_logprob(own), 4),
            "teacher_logprob_student_template": round(mean_logprob(theirs), 4)}
