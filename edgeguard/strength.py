"""How strong a protection is, in one word a device can print: none, weak, untested, direct-use or
resists-fine-tuning. `protect` records it in the card, `build` refuses to ship `weak` without `allow_weak`
and writes it into the manifest, and `edgeguard-runtime validate` prints it instead of a bare "ok".
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

LEVELS = ("none", "weak", "untested", "direct-use", "resists-fine-tuning")
# A protection must remove at least this share of the target accuracy above chance (direct use), and the
# unprotected model must stand at least MIN_EXCESS above chance for that to be measurable.
MIN_REMOVED = 0.5
MIN_EXCESS = 0.05


@dataclass(frozen=True)
class Strength:
    level: str  # one of LEVELS
    reason: str  # one line a person reads

    @property
    def shippable(self) -> bool:
        """Whether a build may call this a protection without --allow-weak."""
        return self.level != "weak"

    def to_dict(self) -> dict:
        return asdict(self)


def direct_use(method: str, target: str | None, before: float | None, after: float | None,
               num_classes: int) -> Strength:
    """The verdict from the target accuracy before protection (the unprotected model's) and after it."""
    if method in ("none", ""):
        return Strength("none", "not protected (no protection method was applied)")
    if target is None or before is None or after is None:
        return Strength("untested", f"{method}: no unauthorised domain was measured, so nothing shows it protects")
    chance = 1.0 / num_classes
    excess = before - chance
    shown = f"{target} {before * 100:.1f}% → {after * 100:.1f}% (chance {chance * 100:.1f}%)"
    if excess < MIN_EXCESS:
        return Strength("untested", f"{method}: the unprotected model was already near chance on {shown}; "
                                    "direct use shows nothing")
    removed = (before - after) / excess
    if removed < MIN_REMOVED:
        return Strength("weak", f"{method}: the target accuracy did not fall toward chance ({shown}: "
                                f"{max(removed, 0) * 100:.0f}% of its excess over chance removed, "
                                f"{MIN_REMOVED * 100:.0f}% needed)")
    return Strength("direct-use", f"{method}: direct use blocked on {shown}")


def with_fine_tuning(s: Strength, slc_auc: dict[str, float] | None) -> Strength:
    """Add an attached evaluation: only a fine-tuning report where no attack beats scratch (every SLC-AUC ≤ 0)
    lifts the level; otherwise the line says that fine-tuning recovers the model."""
    if not slc_auc or s.level in ("none", "weak"):
        return s
    worst = max(slc_auc, key=lambda k: slc_auc[k])
    if slc_auc[worst] <= 0:
        return Strength("resists-fine-tuning",
                        f"{s.reason}; no attack in the attached report beats training from scratch "
                        f"(highest SLC-AUC {slc_auc[worst]:+.2f}, {worst})")
    return Strength(s.level, f"{s.reason}; fine-tuning recovers it: {worst} SLC-AUC {slc_auc[worst]:+.2f} "
                             "(> 0: a better start than training from scratch)")


def from_record(d) -> Strength | None:
    """A strength recorded in a card's `protection` dict (None where an older file has none)."""
    if isinstance(d, dict) and d.get("level") in LEVELS and isinstance(d.get("reason"), str):
        return Strength(d["level"], d["reason"])
    return None


def card_strength(card) -> Strength:
    """A model card's recorded verdict, or (files written before it was recorded) one from its accuracies."""
    recorded = from_record((card.protection or {}).get("strength"))
    if recorded is not None:
        return recorded
    tgt = next((a for a in card.accuracies if a.role == "target"), None)
    return direct_use(card.method, tgt.domain if tgt else None, tgt.before if tgt else None,
                      tgt.after if tgt else None, card.num_classes)
