"""The remedy catalogue (docs/concepts.md §4) as plain data, and its ranking for a given model.

A :class:`Remedy` says what a fix *is* (``why``, a ``code`` hint), which findings it
addresses and how directly (``treats``: finding kind → strength in [0, 1]), and what
makes it fit the model in front of us: the architecture (``architectures``: a bonus,
or ``None`` where it does not apply), the activations it is the cure for
(``suits_activations``), and the signs that it is already in place (``present_when``).

:func:`rank_remedies` scores every entry for one finding kind and one
:class:`ModelProfile` (read from a run's meta, never from a live model)::

    score = treats[kind] + architectures.get(arch, 0) + ACTIVATION_FIT_BONUS·[model uses a suited activation]

and drops entries that do not treat the kind, do not apply to the architecture, are
already present, or score ≤ 0. Ties keep catalogue order. So a deep sigmoid MLP with vanishing
gradients gets ReLU (+ He init), batch normalisation and residual connections first,
and a plain RNN with the same symptom gets LSTM/GRU and gradient clipping first.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any

from .catalogue import REMEDIES, Remedy
from .profile import _TORCH_OPTIMIZERS, ModelProfile, model_profile

__all__ = [
    "ACTIVATION_FIT_BONUS",
    "REMEDIES",
    "ModelProfile",
    "RankedRemedy",
    "Remedy",
    "model_profile",
    "rank_remedies",
]

# A remedy that is the textbook cure for an activation the model uses (ReLU for a
# sigmoid net, He init for a ReLU net) outranks an equally strong generic one.
ACTIVATION_FIT_BONUS = 0.3

_OPTIMIZER_IN_CODE = re.compile(r"torch\.optim\.(SGD|AdamW|Adam)\(")


def _fit_code(remedy: Remedy, profile: ModelProfile) -> Remedy:
    """The remedy's code for the model at hand: the run's optimizer (AdamW, not SGD, for an
    AdamW run), BatchNorm2d after a convolution."""
    code = remedy.code
    if profile.optimizer in _TORCH_OPTIMIZERS and remedy.key != "adam":
        code = _OPTIMIZER_IN_CODE.sub(f"torch.optim.{profile.optimizer}(", code)
    if remedy.key == "batchnorm" and profile.architecture == "cnn":
        code = "nn.Sequential(nn.Conv2d(c_in, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), act)"
    return remedy if code == remedy.code else dataclasses.replace(remedy, code=code)


@dataclass(frozen=True)
class RankedRemedy:
    """A remedy proposed for one finding: the catalogue entry, its score and why it fits."""

    remedy: Remedy
    score: float
    fit: str

    @property
    def key(self) -> str:
        return self.remedy.key

    @property
    def name(self) -> str:
        return self.remedy.name

    @property
    def why(self) -> str:
        return self.remedy.why

    @property
    def code(self) -> str:
        return self.remedy.code

    def to_dict(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "name": self.name,
            "why": self.why,
            "code": self.code,
            "score": round(self.score, 3),
            "fit": self.fit,
        }


def rank_remedies(kind: str, profile: ModelProfile, limit: int | None = None) -> list[RankedRemedy]:
    """Remedies for a finding of ``kind`` on the model ``profile``, best first."""
    ranked: list[RankedRemedy] = []
    for remedy in REMEDIES.values():
        strength = remedy.treats.get(kind, 0.0)
        if strength <= 0 or not remedy.applies_to(profile.architecture):
            continue
        if any(profile.has(t) for t in remedy.present_when):
            continue  # already in place: proposing it again would be noise
        if remedy.requires and not any(profile.has(t) for t in remedy.requires):
            continue  # it changes something this model does not have
        score = strength + (remedy.architectures.get(profile.architecture) or 0.0)
        reasons = [f"treats {kind} ({strength:g})"]
        if bonus := remedy.architectures.get(profile.architecture):
            reasons.append(
                f"{'suits' if bonus > 0 else 'less suited to'} {profile.architecture} models"
            )
        if [t for t in remedy.requires if profile.has(t)] == ["optimizer:unknown"]:
            reasons.append("if the optimizer is Adam (the run does not say which it is)")
        suited = sorted(profile.activations & set(remedy.suits_activations))
        if suited:
            score += ACTIVATION_FIT_BONUS
            reasons.append(f"the model uses {', '.join(suited)}")
        if score <= 0:  # the architecture penalty outweighs what it treats
            continue
        ranked.append(RankedRemedy(_fit_code(remedy, profile), score, "; ".join(reasons)))
    # sorted() is stable: equal scores keep catalogue order.
    ranked.sort(key=lambda r: -r.score)
    return ranked[:limit] if limit is not None else ranked
