"""What an evaluation returns, typed: one `Curves` per recipe (and one for the random search), the suite's
`Envelope`, and the `EvalResult` that holds them. report.json is `EvalResult.to_dict()`; `from_dict` reads one
back (`edgeguard build --report`)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

from ..errors import EdgeguardError

MeanStd = tuple[float, float]


@dataclass
class Curves:
    """One recipe's accuracies (seed × ratio) for the protected model, scratch training and, when given, the
    unprotected model; its SLC-AUC (mean, std over seeds). `chosen`: the search's recipe per point."""

    attack: str
    recipe: dict
    ratios: list[float]
    n: list[int]
    protected: list[list[float]]
    scratch: list[list[float]]
    slc_auc: MeanStd
    slc_auc_normalised: MeanStd
    regrown_weights: list[int] = field(default_factory=list)
    unprotected: list[list[float]] | None = None
    unprotected_slc_auc: MeanStd | None = None
    chosen: dict[str, list[list[str]]] | None = None

    def curve(self, kind: str) -> list[list[float]] | None:
        return {"protected": self.protected, "scratch": self.scratch, "unprotected": self.unprotected}[kind]


@dataclass
class Envelope:
    """The attacker's best recipe at each ratio, for each model kind; robust SLC-AUC = AUC(protected envelope)
    − AUC(scratch envelope)."""

    name: str
    recipes: list[str]
    selection: str
    envelopes: dict[str, list[list[float]]]  # kind → seed × ratio
    winners: dict[str, list[str]]  # kind → the recipe that won each ratio
    robust_slc_auc: MeanStd
    robust_slc_auc_normalised: MeanStd
    per_recipe_slc_auc: dict[str, MeanStd]
    unprotected_robust_slc_auc: MeanStd | None = None
    # the best the attacker reaches without the file (its recipes that start over on the source sample), as
    # a robust SLC-AUC: no protection can score under it against this suite; None when no such recipe ran
    floor_slc_auc: MeanStd | None = None
    floor_curve: list[list[float]] | None = None


@dataclass
class EvalResult:
    model: str
    arch: str
    method: str
    source_domain: str
    target: str
    seeds: int
    grid: list[float]
    sparsity: float
    target_accuracy_direct: float
    source_accuracy: float | None
    direct: dict | None
    attacks: list[Curves]
    unprotected_model: str | None = None
    suite: Envelope | None = None
    wall_seconds: float = 0.0
    device: str = ""
    engine: dict = field(default_factory=dict)
    direct_under_attack: dict | None = None  # the input-space attacks' target accuracy at each n (mean of seeds)

    def slc_aucs(self) -> dict[str, float]:
        """Each recipe's mean SLC-AUC, and the suite's robust one as `robust-envelope`."""
        out = {c.attack: c.slc_auc[0] for c in self.attacks}
        if self.suite is not None:
            out["robust-envelope"] = self.suite.robust_slc_auc[0]
        return out

    def to_dict(self) -> dict:
        """report.json: the suite's envelopes flattened to `<kind>_envelope` / `<kind>_winner`, unset optional
        fields left out."""
        d = {k: v for k, v in asdict(self).items() if v is not None or k in ("direct", "source_accuracy", "suite",
                                                                             "unprotected_model")}
        d["attacks"] = [{k: v for k, v in asdict(c).items() if v is not None} for c in self.attacks]
        if self.suite is not None:
            s = {k: v for k, v in asdict(self.suite).items() if v is not None and k not in ("envelopes", "winners")}
            for kind, env in self.suite.envelopes.items():
                s[f"{kind}_envelope"], s[f"{kind}_winner"] = env, self.suite.winners[kind]
            d["suite"] = s
        return d

    @classmethod
    def from_dict(cls, d: dict) -> EvalResult:
        """A report.json back as a result; a file that is not one is a one-line error."""
        try:
            attacks = [Curves(**_known(Curves, a)) for a in d["attacks"]]
            suite = None
            if isinstance(d.get("suite"), dict):
                s = dict(d["suite"])
                kinds = [k[: -len("_envelope")] for k in s if k.endswith("_envelope")]
                suite = Envelope(envelopes={k: s.pop(f"{k}_envelope") for k in kinds},
                                 winners={k: s.pop(f"{k}_winner") for k in kinds}, **_known(Envelope, s))
            return cls(**{**_known(cls, d), "attacks": attacks, "suite": suite})
        except (KeyError, TypeError) as e:
            raise EdgeguardError(f"not an edgeguard evaluation report ({e})") from None


def _known(cls, d: dict) -> dict:
    names = {f.name for f in fields(cls)} - {"attacks", "suite", "envelopes", "winners"}
    return {k: (tuple(v) if isinstance(v, list) and (k.endswith("slc_auc") or k.endswith("_normalised")) else v)
            for k, v in d.items() if k in names}
