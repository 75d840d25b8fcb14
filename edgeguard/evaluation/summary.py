"""Grading finished runs: each recipe's curves and SLC-AUC, the search's curve, the suite's envelopes (the
attacker's best recipe per ratio), and the direct-use metrics, gathered into an `EvalResult`."""
from __future__ import annotations

import hashlib
import json

import numpy as np

from ..artifact import Artifact
from ..domains import get_domain
from ..errors import EdgeguardError
from ..finetune import AttackRecipe
from ..training import TensorData, evaluate
from .config import EvalConfig
from .metrics import direct_metrics, mean_std
from .plan import RunJob, recipe_for_scratch
from .result import Curves, Envelope, EvalResult
from .slc_auc import slc_auc


def _seeded_slc(grid, prot: list[list[float]], scr: list[list[float]]) -> tuple:
    per_seed = [slc_auc(grid, p, q) for p, q in zip(prot, scr)]
    return mean_std(d["slc_auc"] for d in per_seed), mean_std(d["slc_auc_normalised"] for d in per_seed)


def unique_names(recipes: list[AttackRecipe]) -> list[str]:
    """Each recipe's name in the report; recipes that share a name but not their settings are told apart by
    a short hash of their settings, so neither overwrites the other."""
    names = [r.name for r in recipes]
    return [f"{n} #{hashlib.sha256(json.dumps(r.key(), sort_keys=True).encode()).hexdigest()[:6]}"
            if names.count(n) > 1 else n for n, r in zip(names, recipes)]


def recipe_curves(recipe: AttackRecipe, jobs: list[RunJob], rows: dict[str, dict], cfg: EvalConfig,
                  has_ref: bool, name: str | None = None) -> Curves:
    """One recipe's curves from the finished runs (scratch runs shared by recipes of one scratch recipe)."""
    def same(j: RunJob) -> bool:
        if j.kind == "scratch":
            return recipe_for_scratch(j.recipe) == recipe_for_scratch(recipe)
        return j.recipe == recipe

    def curves(kind: str) -> list[list[float]]:
        return [[rows[j.key]["accuracy"] for j in jobs if j.kind == kind and j.seed == seed and same(j)]
                for seed in range(cfg.seeds)]

    prot_runs = [j for j in jobs if j.kind == "protected" and j.recipe == recipe]
    prot, scr = curves("protected"), curves("scratch")
    slc, norm = _seeded_slc(cfg.grid, prot, scr)
    c = Curves(name or recipe.name, recipe.key(), list(cfg.grid), [rows[j.key]["n"] for j in prot_runs if j.seed == 0],
               prot, scr, slc, norm, [rows[j.key].get("regrown_weights", 0) for j in prot_runs])
    if has_ref:
        c.unprotected = curves("unprotected")
        c.unprotected_slc_auc = mean_std(slc_auc(cfg.grid, u, s)["slc_auc"] for u, s in zip(c.unprotected, scr))
    return c


def search_curves(finals: list[RunJob], rows: dict[str, dict], cfg: EvalConfig, has_ref: bool) -> Curves:
    """The search as one more curve per model: at each ratio, the test accuracy of the recipe it chose."""
    by = {(j.kind, j.seed, j.ratio): j for j in finals}

    def curve(kind: str) -> list[list[float]]:
        return [[rows[by[(kind, s, r)].key]["accuracy"] for r in cfg.grid] for s in range(cfg.seeds)]

    def chosen(kind: str) -> list[list[str]]:
        return [[by[(kind, s, r)].recipe.name for r in cfg.grid] for s in range(cfg.seeds)]

    prot, scr = curve("protected"), curve("scratch")
    slc, norm = _seeded_slc(cfg.grid, prot, scr)
    c = Curves("search", {"trials": cfg.search_trials, "seed": cfg.search_seed}, list(cfg.grid),
               [rows[by[("protected", 0, r)].key]["n"] for r in cfg.grid], prot, scr, slc, norm,
               [rows[by[("protected", s, r)].key].get("regrown_weights", 0) for s in range(cfg.seeds) for r in cfg.grid],
               chosen={"protected": chosen("protected"), "scratch": chosen("scratch")})
    if has_ref:
        c.unprotected = curve("unprotected")
        c.chosen["unprotected"] = chosen("unprotected")
        c.unprotected_slc_auc = mean_std(slc_auc(cfg.grid, u, q)["slc_auc"] for u, q in zip(c.unprotected, scr))
    return c


def envelope(entries: list[Curves], cfg: EvalConfig) -> Envelope | None:
    """The attacker's best recipe: at each ratio the best accuracy any recipe reached, for the protected model
    and for scratch training alike; robust SLC-AUC = AUC(protected envelope) − AUC(scratch envelope). Both
    envelopes pick on the test set, which favours the attacker and the scratch baseline alike. A suite that
    holds full re-initialisation lets the attacker start over with any of its recipes: each recipe's scratch
    curve is then one of the attacker's curves too, so the robust SLC-AUC is ≥ 0 by construction."""
    if len(entries) < 2:
        return None
    fresh = [e for e in entries if e.recipe.get("reinit", 0) >= 1]  # start from a new model: read no file
    restart = any(not e.recipe.get("source_fraction", 0) for e in fresh)
    envs, winners = {}, {}
    for kind in ("protected", "scratch", "unprotected"):
        if all(e.curve(kind) is not None for e in entries):
            curves = [e.curve(kind) for e in entries]
            names = [e.attack for e in entries]
            if restart and kind != "scratch":
                curves += [e.scratch for e in entries]
                names += [f"restart ({e.attack})" for e in entries]
            arr = np.asarray(curves, dtype=float)  # recipe × seed × ratio
            envs[kind] = arr.max(0).tolist()
            winners[kind] = [names[i] for i in arr.mean(1).argmax(0)]
    slc, norm = _seeded_slc(cfg.grid, envs["protected"], envs["scratch"])
    out = Envelope(cfg.suite or "custom", [e.attack for e in entries],
                   "per ratio on the test set, for the protected and the scratch curves alike"
                   + ("; restarting from scratch with any recipe is one of the attacker's moves" if restart else ""),
                   envs, winners, slc, norm, {e.attack: e.slc_auc for e in entries})
    if "unprotected" in envs:
        out.unprotected_robust_slc_auc = mean_std(slc_auc(cfg.grid, u, q)["slc_auc"]
                                                  for u, q in zip(envs["unprotected"], envs["scratch"]))
    floors = [e.protected for e in fresh if e.recipe.get("source_fraction", 0)]
    if floors:  # starting over on the source sample reads nothing of the file: the floor of this suite
        out.floor_curve = np.asarray(floors, dtype=float).max(0).tolist()
        out.floor_slc_auc = mean_std(slc_auc(cfg.grid, f, q)["slc_auc"]
                                     for f, q in zip(out.floor_curve, envs["scratch"]))
    return out


def direct_use(art: Artifact, ref: Artifact | None, cfg: EvalConfig, test: TensorData
               ) -> tuple[float, float | None, dict | None]:
    """(target accuracy as shipped, source accuracy as shipped, the direct-use metrics when both models'
    accuracies are known): the source test set is read when it is on this machine, else the card's numbers."""
    target_after = evaluate(art.model, test)
    card = art.card
    source_after = source_before = target_before = None
    try:
        src_dom = get_domain(card.source_domain, cfg.data_root, classes=card.classes, role="source",
                             input=card.input)
        src_test = TensorData.from_numpy(src_dom.test_x, src_dom.test_y, test.x.device)
        source_after = evaluate(art.model, src_test)
        if ref is not None:
            source_before = evaluate(ref.model, src_test)
    except EdgeguardError:
        pass
    if ref is not None:
        target_before = evaluate(ref.model, test)
    if source_before is None and card.source_accuracy is not None:
        source_before = card.source_accuracy.before
    recorded = card.accuracy(cfg.target, "target")
    if target_before is None and recorded is not None:
        target_before = recorded.before
    direct = None
    if None not in (source_before, source_after, target_before):
        direct = direct_metrics(source_before, source_after, target_before, target_after)
    return target_after, source_after, direct


def under_attack(attacks: list[Curves], plain: float, ref: Artifact | None, test: TensorData) -> dict | None:
    """The direct-use claim under input-space attacks: the weights as shipped, an input adapter trained on the
    attacker's n target images in front of them; its target accuracy at each n beside the plain one."""
    inputs = [c for c in attacks if c.recipe.get("train") == "input"]
    if not inputs:
        return None
    plain_unprotected = evaluate(ref.model, test) if ref is not None else None
    out = {"plain": {"protected": plain, "unprotected": plain_unprotected}, "n": inputs[0].n, "attacks": {}}
    for c in inputs:
        out["attacks"][c.attack] = {k: np.asarray(c.curve(k)).mean(0).tolist()
                                    for k in ("protected", "unprotected") if c.curve(k) is not None}
    return out


def summarise(art: Artifact, ref: Artifact | None, cfg: EvalConfig, jobs: list[RunJob], rows: dict[str, dict],
              test: TensorData, search: Curves | None = None) -> EvalResult:
    attacks = [recipe_curves(r, jobs, rows, cfg, ref is not None, name)
               for r, name in zip(cfg.attacks, unique_names(list(cfg.attacks)))]
    if search is not None:
        attacks.append(search)
    target_after, source_after, direct = direct_use(art, ref, cfg, test)
    card = art.card
    result = EvalResult(str(art.path), card.arch, card.method, card.source_domain, cfg.target, cfg.seeds,
                        list(cfg.grid), card.mask.sparsity if card.mask else 0.0, target_after, source_after, direct,
                        attacks, str(ref.path) if ref is not None else None, envelope(attacks, cfg))
    result.direct_under_attack = under_attack(attacks, target_after, ref, test)
    return result
