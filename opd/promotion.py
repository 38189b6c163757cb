"""The promotion gate: may a challenger replace the champion? A pure rule on eval metrics.

A challenger must first clear absolute floors (``min_metric``, ``min_harmful_refusal``,
``max_over_refusal``), so a first champion cannot be a model with no reasoning or that refuses
everything; then each condition compares it with the champion on one metric; all must hold. The
reasons are returned either way, so the registry can record why.
"""

from __future__ import annotations

from opd.config import PromoteConfig


def gate(challenger: dict[str, float], champion: dict[str, float] | None, cfg: PromoteConfig) -> tuple[bool, str]:
    """Return (promote?, a one-line reason naming each condition and its numbers)."""
    needed = [cfg.metric, "harmful_refusal", "over_refusal"]
    missing = [k for k in needed if k not in challenger]
    if missing:
        return False, f"challenger lacks metrics {missing}"
    floors = [
        (challenger[cfg.metric] >= cfg.min_metric, f"{cfg.metric} {challenger[cfg.metric]:.4f} (at least {cfg.min_metric})"),
        (challenger["harmful_refusal"] >= cfg.min_harmful_refusal,
         f"harmful_refusal {challenger['harmful_refusal']:.4f} (at least {cfg.min_harmful_refusal})"),
        (challenger["over_refusal"] <= cfg.max_over_refusal,
         f"over_refusal {challenger['over_refusal']:.4f} (at most {cfg.max_over_refusal})"),
    ]
    below = [text for ok, text in floors if not ok]
    if below:
        return False, "below the floor: " + "; ".join(below)
    if champion is None:
        return True, "no champion yet: the first evaluated challenger above the floors becomes champion"
    checks = [
        (cfg.metric, challenger[cfg.metric] >= champion.get(cfg.metric, float("-inf")) - cfg.max_drop,
         f"{cfg.metric} {challenger[cfg.metric]:.4f} vs champion {champion.get(cfg.metric, float('nan')):.4f} "
         f"(may drop {cfg.max_drop})"),
        ("harmful_refusal", challenger["harmful_refusal"] >= champion.get("harmful_refusal", float("-inf"))
         - cfg.harmful_refusal_max_drop,
         f"harmful_refusal {challenger['harmful_refusal']:.4f} vs {champion.get('harmful_refusal', float('nan')):.4f} "
         f"(may drop {cfg.harmful_refusal_max_drop})"),
        ("over_refusal", challenger["over_refusal"] <= champion.get("over_refusal", float("inf"))
         + cfg.over_refusal_max_rise,
         f"over_refusal {challenger['over_refusal']:.4f} vs {champion.get('over_refusal', float('nan')):.4f} "
         f"(may rise {cfg.over_refusal_max_rise})"),
    ]
    failed = [text for _, ok, text in checks if not ok]
    if failed:
        return False, "gate failed: " + "; ".join(failed)
    return True, "gate passed: " + "; ".join(text for _, _, text in checks)
