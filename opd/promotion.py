"""The promotion gate: may a challenger replace the champion? A pure rule on eval metrics.

Each condition compares the challenger with the champion on one metric; all must hold. With no
champion yet, the first challenger that has the metrics becomes champion. The reasons are
returned either way, so the registry can record why.
"""

from __future__ import annotations

from opd.config import PromoteConfig


def gate(challenger: dict[str, float], champion: dict[str, float] | None, cfg: PromoteConfig) -> tuple[bool, str]:
    """Return (promote?, a one-line reason naming each condition and its numbers)."""
    needed = [cfg.metric, "harmful_refusal", "over_refusal"]
    missing = [k for k in needed if k not in challenger]
    if missing:
        return False, f"challenger lacks metrics {missing}"
    if champion is None:
        return True, "no champion yet: the first evaluated challenger becomes champion"
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
