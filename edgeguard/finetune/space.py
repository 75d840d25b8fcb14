"""The attack space: every setting an attacker may choose, in one place. The robust suite's recipes, the
random search's candidates and the hardening's simulated attacks are all drawn from `ATTACK_SPACE`, so the
hardening trains against the attacker it is judged by."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from .recipe import AttackRecipe, parse_attack


@dataclass(frozen=True)
class AttackSpace:
    """Per optimizer: its learning-rate range (log-uniform) and weight decay; and the discrete choices."""

    lr: dict[str, tuple[float, float]] = field(default_factory=lambda: {
        "sgd": (1e-3, 1e-1), "adam": (1e-5, 3e-3), "adamw": (1e-5, 3e-3), "rmsprop": (1e-5, 1e-3),
        "adagrad": (1e-3, 1e-1)})
    weight_decay: dict[str, float] = field(default_factory=lambda: {"sgd": 8e-4, "adam": 8e-4, "adamw": 1e-2,
                                                                   "rmsprop": 8e-4, "adagrad": 8e-4})
    epochs: tuple[int, ...] = (10, 30, 60)
    batch_sizes: tuple[int, ...] = (32, 64, 128)
    schedules: tuple[str, ...] = ("none", "warmup-cosine")
    heads: tuple[str, ...] = ("kept", "reinit")
    pruned: tuple[str, ...] = ("masked", "free", "regrow")
    bn: tuple[str, ...] = ("kept", "reestimate")
    reinit: tuple[float, ...] = (0.0, 0.0, 0.25, 0.5)  # the search's partial re-initialisation (0: none)
    shrink_perturb: tuple[tuple[float, float], ...] = ((1.0, 0.0), (1.0, 0.0), (0.4, 0.1))
    pre: tuple[str, ...] = ("none", "none", "distil", "shot")

    @property
    def optimizers(self) -> tuple[str, ...]:
        return tuple(self.lr)

    def lr_span(self) -> tuple[float, float]:
        """The lowest and highest learning rate of any optimizer."""
        return min(lo for lo, _ in self.lr.values()), max(hi for _, hi in self.lr.values())

    def recipe(self, spec: str, optimizer: str = "adam", **kw) -> AttackRecipe:
        """A named attack with this optimizer and the space's weight decay for it (unless given)."""
        kw.setdefault("weight_decay", self.weight_decay[optimizer])
        return parse_attack(spec, optimizer=optimizer, **kw)

    def search_draw(self, rng: np.random.Generator, label: str = "") -> AttackRecipe:
        """One random-search candidate: any optimizer at a log-uniform lr over the whole span, epochs, batch,
        schedule, head, BN, partial re-initialisation, shrink-and-perturb and pre phase from their choices;
        pruned weights free (the search's attacker owns the file)."""
        opt = self.optimizers[int(rng.integers(len(self.optimizers)))]
        lo, hi = self.lr_span()
        lr = float(f"{math.exp(rng.uniform(math.log(lo), math.log(hi))):.3g}")
        pick = _picker(rng)
        head, epochs, batch = pick(self.heads), int(pick(self.epochs)), int(pick(self.batch_sizes))
        schedule, bn = pick(self.schedules), pick(self.bn)
        shrink, perturb = pick(self.shrink_perturb)
        return AttackRecipe(train="all", head=head, pruned="free", optimizer=opt, lr=lr,
                            weight_decay=self.weight_decay[opt], epochs=epochs, batch_size=batch, schedule=schedule,
                            bn=bn, reinit=float(pick(self.reinit)), shrink=float(shrink), perturb=float(perturb),
                            pre=pick(self.pre), label=label)

    def simulated_draw(self, rng: np.random.Generator, p_head_reinit: float, p_free: float,
                       p_bn_reestimate: float) -> AttackRecipe:
        """One simulated attack of the hardening: optimizer uniform, lr log-uniform over that optimizer's range,
        a batch size, the head re-initialised, pruned weights free / regrowing / masked and BN re-estimated
        with the given probabilities (its length is the hardening's, not a number of epochs)."""
        opt = str(rng.choice(sorted(self.lr)))
        lo, hi = self.lr[opt]
        u = rng.random()
        pruned = "free" if u < p_free else "regrow" if u < 2 * p_free else "masked"
        lr = float(math.exp(rng.uniform(math.log(lo), math.log(hi))))
        batch, reinit = int(rng.choice(self.batch_sizes)), bool(rng.random() < p_head_reinit)
        bn = "reestimate" if rng.random() < p_bn_reestimate else "kept"
        return AttackRecipe(train="all", head="reinit" if reinit else "kept", pruned=pruned, optimizer=opt, lr=lr,
                            weight_decay=self.weight_decay[opt], batch_size=batch, bn=bn)


def _picker(rng: np.random.Generator):
    def pick(choices):
        return choices[int(rng.integers(len(choices)))]

    return pick


ATTACK_SPACE = AttackSpace()
