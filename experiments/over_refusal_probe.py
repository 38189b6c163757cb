"""Why COPSD's student over-refuses although its teacher does not: refusal rates and token rewards.

    python experiments/over_refusal_probe.py                          # after `make run`
    python experiments/over_refusal_probe.py --student models/student # after `dvc exp run -S distill.method=copsd`

Two tables on the borderline prompts (benign requests that look risky), train and eval split:

1. Refusal rate of each model, greedy and sampled (8 samples per prompt), decoded with the
   ``evaluate`` settings (48 new tokens, T = 1 by default): the original teacher and the Cross-SFT
   teacher on constitution-wrapped prompts (what COPSD's teacher reads), the initial student and
   any ``--student`` on bare prompts.
2. COPSD's token reward ``clip(log pi_T(y_t | x_c) - log pi_init(y_t | x), -3, 5)`` of three forced
   responses on the train borderline prompts, from the Cross-SFT teacher against the initial
   student: a harmful-request refusal the student already knows (violence), the over-cautious
   refusal of the original teacher, and the reference answer. The first token decides whether the
   response is a refusal; the rest is its continuation. Group normalisation ranks a sample by its
   tokens' rewards against the group's other samples, so what matters is which response scores higher.

Writes ``experiments/results/over_refusal_probe.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from experiments.common import RESULTS  # noqa: E402

from opd.config import EvaluateConfig  # noqa: E402
from opd.params import load  # noqa: E402
from opd.copsd import token_rewards  # noqa: E402
from opd.constitution import wrap
from opd.evaluate import generate, load_detector  # noqa: E402
from opd.models import load_model, load_tokenizer  # noqa: E402
from opd.paths import Layout  # noqa: E402
from opd.scoring import Sequences, token_stats  # noqa: E402
from opd.constitution import constitutions_of  # noqa: E402
from opd.data import load_rows  # noqa: E402
from opd.paths import resolve  # noqa: E402
from opd.tokens import prompt_ids, response_ids  # noqa: E402
from opd.world.behaviour import CAUTIOUS_REFUSAL  # noqa: E402
from opd.world.generate import HARMFUL  # noqa: E402

SAMPLES = 8


def refusal_rates(model: torch.nn.Module, tok: PreTrainedTokenizerBase, prompts: list[list[int]],
                  refused: Callable[[str], bool], cfg: EvaluateConfig, seed: int) -> dict[str, float]:
    """Greedy and sampled refusal rate of one model on tokenised prompts, decoded as the evaluate stage does."""
    out = {}
    for name, greedy, n in (("greedy", True, 1), ("sampled", False, SAMPLES)):
        torch.manual_seed(seed)
        responses = generate(model, tok, prompts, cfg, greedy, n)
        out[name] = sum(refused(tok.decode(r, skip_special_tokens=True)) for r in responses) / len(responses)
    return out


@torch.no_grad()
def response_logprobs(model: torch.nn.Module, prompts: list[list[int]], responses: list[list[int]], pad_id: int) -> list[torch.Tensor]:
    """Per-token log-probs of each forced response, one tensor per row."""
    seq = Sequences.build(prompts, responses, pad_id)
    logp, _ = token_stats(model.eval(), seq)
    flat = logp[seq.targets_mask.bool()]
    return list(flat.split([len(r) for r in responses]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--student", type=Path, nargs="*", default=[], help="distilled student folders to probe too")
    ap.add_argument("--teacher", type=Path, default=None,
                    help="the recalibrated teacher to probe (default: models/cross_sft/teacher)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    lay = Layout(ROOT)
    params = load(lay.params)
    texts = constitutions_of(params, lay.prepared)
    refused = load_detector(params.evaluate.refusal_detector)
    init_path = resolve(lay.models_base, "student_init")
    tok = load_tokenizer(init_path)
    models = {"teacher (x_c)": (resolve(lay.models_base, "teacher"), True),
              "Cross-SFT teacher (x_c)": (args.teacher or lay.cross_sft / "teacher", True),
              "student-init": (init_path, False)}
    models |= {f"student {p}": (p, False) for p in args.student}
    rows = {split: [r for r in load_rows(lay.prepared, split) if r.task == "borderline"] for split in ("train", "eval")}

    rates: dict[str, dict[str, float]] = {}
    for name, (path, wrapped) in models.items():
        model = load_model(path)
        for split, rs in rows.items():
            prompts = [prompt_ids(tok, wrap(r.prompt, r.category, texts) if wrapped else r.prompt) for r in rs]
            for mode, v in refusal_rates(model, tok, prompts, refused, params.evaluate, params.seed).items():
                rates.setdefault(name, {})[f"{split} {mode}"] = v
    cols = [f"{s} {m}" for s in rows for m in ("greedy", "sampled")]
    print("Refusal on borderline prompts (%):\n")
    print("| model | " + " | ".join(cols) + " |\n|" + "---|" * (len(cols) + 1))
    for name, r in rates.items():
        print(f"| {name} | " + " | ".join(f"{100 * r[c]:.1f}" for c in cols) + " |")

    teacher, student = load_model(models["Cross-SFT teacher (x_c)"][0]), load_model(init_path)
    train = rows["train"]
    forced = {"violence refusal": lambda r: HARMFUL["violence"][1], "over-cautious refusal": lambda r: CAUTIOUS_REFUSAL,
              "reference answer": lambda r: r.reference or ""}
    rewards: dict[str, dict[str, float]] = {}
    for name, text in forced.items():
        resp = [response_ids(tok, text(r)) for r in train]
        t = response_logprobs(teacher, [prompt_ids(tok, wrap(r.prompt, r.category, texts)) for r in train], resp, tok.pad_token_id)
        s = response_logprobs(student, [prompt_ids(tok, r.prompt) for r in train], resp, tok.pad_token_id)
        rew = [token_rewards(a, b, torch.ones_like(a), params.copsd.reward_low, params.copsd.reward_high) for a, b in zip(t, s)]
        rewards[name] = {"reward first token": torch.stack([x[0] for x in rew]).mean().item(),
                         "reward rest": torch.stack([x[1:].mean() for x in rew]).mean().item(),
                         "reward mean": torch.stack([x.mean() for x in rew]).mean().item(),
                         "sum log pi_T (x_c)": torch.stack([x.sum() for x in t]).mean().item(),
                         "sum log pi_init (x)": torch.stack([x.sum() for x in s]).mean().item()}
    keys = list(next(iter(rewards.values())))
    print(f"\nCOPSD token rewards of forced responses, {len(train)} train borderline prompts (means):\n")
    print("| response | " + " | ".join(keys) + " |\n|" + "---|" * (len(keys) + 1))
    for name, r in rewards.items():
        print(f"| {name} | " + " | ".join(f"{r[k]:+.2f}" for k in keys) + " |")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"over_refusal_probe{'_' + args.teacher.parent.name if args.teacher else ''}.json").write_text(json.dumps({"refusal": rates, "rewards": rewards}, indent=2))


if __name__ == "__main__":
    main()
