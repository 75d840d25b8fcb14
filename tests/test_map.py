"""MAP on real data with small_cnn (MNIST → USPS)."""
import numpy as np
import pytest
import torch

from edgeguard.artifact import load_artifact
from edgeguard.domains import get_domain
from edgeguard.inputspec import DIGITS_INPUT
from edgeguard.masks import is_n_m
from edgeguard.methods.map import MapConfig, next_cap, selection_key
from edgeguard.methods.synthesis import SynthesisConfig, bn_distance, synthesize
from edgeguard.protect import protect
from edgeguard.training import TensorData, evaluate

RECALIBRATION_MARGIN = 0.05  # source-free: the BN shift carried from the pseudo-source must give back ≥ 5 points


@pytest.fixture(scope="module")
def map_sa(mnist_model, tmp_path_factory):
    """Source-available MAP with its defaults but fewer epochs (4 + 2 instead of 12 + 4: the suite's time; on this
    fixture they land at 0.6 and 0.4 point source drop, both at 17.9 % USPS, RESULTS "The test suite's time")."""
    out = tmp_path_factory.mktemp("map") / "map.safetensors"
    summary = protect("map", mnist_model, out, target="usps", device="cpu", overrides=["epochs=4", "repair_epochs=2"])
    return out, summary


def test_source_available_map_protects(map_sa):
    out, s = map_sa
    assert s.source.before - s.source.after <= 0.01
    assert s.accuracy("usps").after <= 0.20
    assert s.accuracy("usps").before > 0.3  # there was something to protect


def test_kept_weights_are_bit_identical(map_sa, mnist_model):
    out, _ = map_sa
    src = load_artifact(mnist_model).model.state_dict()
    prot = load_artifact(out)
    state = prot.model.state_dict()
    for name, keep in prot.mask.masks.items():
        assert torch.equal(state[name][keep], src[name][keep]), name
        assert torch.all(state[name][~keep] == 0)
    for name in state:  # everything that is not masked (BN, biases) is untouched
        if name not in prot.mask.masks:
            assert torch.equal(state[name], src[name]), name
    assert prot.card.method == "map" and prot.card.method_config["setting"] == "source-available"


def test_two_four_structure(mnist_model, tmp_path):
    out = tmp_path / "m24.safetensors"
    protect("map", mnist_model, out, target="usps", device="cpu",
            overrides=["epochs=1", "repair_epochs=1", "structure=2:4", "max_source=2000", "max_target=1000"])
    art = load_artifact(out)
    for name, m in art.mask.masks.items():
        assert is_n_m(m, 2, 4), name
    assert art.mask.sparsity() >= 0.45


def test_sparsity_cap(mnist_model, tmp_path):
    out = tmp_path / "cap.safetensors"
    protect("map", mnist_model, out, target="usps", device="cpu",
            overrides=["epochs=1", "repair_epochs=1", "sparsity_cap=0.02", "max_source=2000", "max_target=1000"])
    assert load_artifact(out).mask.sparsity() <= 0.02 + 1e-6


def test_synthesis_moves_bn_statistics_toward_stored(mnist_model):
    model = load_artifact(mnist_model).model
    torch.manual_seed(0)
    noise = torch.randn(64, 3, 32, 32) * 0.5
    start = bn_distance(model, noise)
    hist = []
    x, y = synthesize(model, 10, SynthesisConfig(recipe="deepinversion", n=64, batch_size=64, iterations=60), "cpu", hist)
    assert x.dtype == np.uint8 and x.shape == (64, 3, 32, 32)
    from edgeguard.training import normalize

    end = bn_distance(model, normalize(torch.from_numpy(x), DIGITS_INPUT))
    assert end < 0.5 * start
    assert hist[-1]["bn_distance"] < hist[0]["bn_distance"]


def test_synthesis_from_target_images_keeps_labels_and_moves_statistics(mnist_model, data_root):
    from edgeguard.domains import get_domain
    from edgeguard.training import normalize

    model = load_artifact(mnist_model).model.eval()
    usps = get_domain("usps").train_x[:64]
    with torch.no_grad():
        own = model(normalize(torch.from_numpy(usps), DIGITS_INPUT)).argmax(1).numpy()
    start = bn_distance(model, normalize(torch.from_numpy(usps), DIGITS_INPUT))
    x, y = synthesize(model, 10, SynthesisConfig(recipe="deepinversion", n=64, batch_size=64, iterations=60), "cpu",
                                   init_images=usps)
    assert np.array_equal(y, own)  # the frozen model's own answers on the target images
    assert bn_distance(model, normalize(torch.from_numpy(x), DIGITS_INPUT)) < 0.7 * start  # restyled towards the source


def test_model_without_bn_is_refused(tmp_path):
    from edgeguard.errors import EdgeguardError

    lin = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 10))
    with pytest.raises(EdgeguardError, match="no BatchNorm"):
        synthesize(lin, 10, SynthesisConfig(recipe="deepinversion", n=4, batch_size=4, iterations=1), "cpu")


def test_repair_restart_reproduces_the_chosen_mask_and_holds_target_answers():
    """The repair phase restarts the scores from the chosen mask (the same hard mask, with or without 2:4),
    and its target term is zero exactly when the masked model gives the chosen mask's answers."""
    from edgeguard.masks import prunable_names
    from edgeguard.methods.map import MaskScores, initial_scores, repair_objective
    from edgeguard.models import create_model

    torch.manual_seed(0)
    model = create_model("small_cnn")
    params = dict(model.named_parameters())
    names = prunable_names(model)
    for structure in (None, "2:4"):
        cfg = MapConfig(structure=structure)
        scores = MaskScores(model, names, cfg)
        with torch.no_grad():  # a main phase that pruned about a quarter of the scores
            for sc in scores.scores:
                sc.copy_(torch.randn_like(sc) + 0.7)
        chosen = scores.keep()
        assert 0.1 < 1 - torch.cat([k.flatten().float() for k in chosen]).mean() < 0.9
        with torch.no_grad():
            for sc, k, n in zip(scores.scores, chosen, names):
                sc.copy_(initial_scores(params[n].detach(), cfg.margin, k))
        for got, k in zip(scores.keep(), chosen):
            assert torch.equal(got, k), f"restart changed the mask ({structure})"
            if structure and got.dim() > 1:
                assert is_n_m(got, 2, 4)
    logits_s, logits_t = torch.randn(8, 10), torch.randn(8, 10)
    y = torch.randint(0, 10, (8,))
    held, _ = repair_objective(logits_s, logits_s, y, logits_t, logits_t, MapConfig(src_ce=0), True)
    moved, m = repair_objective(logits_s, logits_s, y, logits_t + torch.randn(8, 10), logits_t,
                             MapConfig(src_ce=0), True)
    assert float(held) < 1e-6 < float(moved) and m["tgt_keep_kl"] > 0


def test_source_free_map_keeps_the_source_with_its_pseudo_source(mnist_model, tmp_path, data_root):
    """Source-free MAP at a budget the suite affords (small_cnn, 256 restyled USPS images × 100 iterations,
    the competition student at 30 steps, 4 + 1 epochs on 2,000 USPS images): source ≥ 75 % (measured with plain
    DeepInversion before issue 32's thirteenth session: 95.8 %; on 2,000 MNIST test images 96.0 % with
    the BN shift carried from the pseudo-source, 85.3 % for the same mask on the source model's statistics;
    29.3 % before issue 20), USPS ≤ 20 % (12.9 %), and the budget rule ran from its first cap (0.5 → 1 → 2 %
    here). The full bar (cnn32, source drop ≤ 1 point, 3 seeds per pair) is in RESULTS."""
    budget = ["setting=source-free", "synth.n=256", "synth.iterations=100", "synth.student_steps=30", "epochs=4",
              "batch_size=64", "repair_epochs=1", "max_target=2000", "holdout=200"]
    new = protect("map", mnist_model, tmp_path / "new.safetensors", target="usps", device="cpu", overrides=budget)
    assert new.config["synth"]["init"] == "auto" and new.sparsity <= MapConfig().budget_max + 1e-6
    assert new.source.after >= 0.75, new.line()
    assert new.accuracy("usps").after <= 0.20

    # The same mask on the source model's own BatchNorm statistics: what the recalibration on the
    # pseudo-source gave back (at least RECALIBRATION_MARGIN; the full-size numbers are in RESULTS).
    shipped, source = load_artifact(tmp_path / "new.safetensors"), load_artifact(mnist_model)
    assert shipped.card.protection["bn_recalibrated_on"] == "pseudo-source"
    caps = shipped.card.protection["budget_rule_caps"]  # the budget rule ran from its first cap
    assert min(caps) == MapConfig().budget_start and new.sparsity <= max(caps) + 1e-6
    shipped.mask.bake_(source.model)
    bn_buffers = ("running_mean", "running_var", "num_batches_tracked")
    same = [torch.equal(v, source.model.state_dict()[k]) for k, v in shipped.model.state_dict().items()
            if not k.endswith(bn_buffers)]
    assert all(same)  # weights and mask are the same; only the BatchNorm statistics moved
    mnist = get_domain("mnist", data_root)
    test = TensorData.from_numpy(mnist.test_x[:2000], mnist.test_y[:2000])
    recalibrated, as_masked = evaluate(shipped.model, test), evaluate(source.model, test)
    assert recalibrated >= as_masked + RECALIBRATION_MARGIN, (recalibrated, as_masked)


def test_mask_selection_breaks_ties_by_the_held_out_source_kl():
    """Two epochs whose agreements tie (target collapsed, held-out source fully kept) rank by the held-out
    source KL; a better agreement score wins whatever the KL."""
    first, later = selection_key(1.0, 0.30, 0.348, 10.0), selection_key(1.0, 0.02, 0.348, 10.0)
    assert later < first
    assert selection_key(1.0, 0.5, 0.30, 10.0) < later  # a lower target agreement decides first
    assert selection_key(0.999, 0.0, 0.348, 10.0) > first  # so does a lost held-out source image


def test_budget_rule_climbs_until_the_target_is_suppressed_and_steps_down_when_the_pseudo_source_falls():
    """next_cap: doubles while the held-out target agrees with the frozen model beyond answers independent of
    the image (their chance agreement), stays once it is suppressed, halves (never under budget_start) when the
    held-out pseudo-source agreement falls under keep_source, and never passes budget_max."""
    cfg = MapConfig(budget_start=0.005, budget_max=0.05, suppressed_margin=0.05, keep_source=0.98)
    assert next_cap(0.005, 1.0, 0.60, 0.2, cfg) == 0.01  # target not suppressed: climb
    assert next_cap(0.01, 1.0, 0.24, 0.2, cfg) == 0.01  # suppressed (within 0.05 of the chance agreement): stay
    assert next_cap(0.04, 1.0, 0.60, 0.2, cfg) == 0.05  # the ceiling
    assert next_cap(0.05, 1.0, 0.60, 0.2, cfg) == 0.05
    fallen = next_cap(0.02, 0.95, 0.60, 0.2, cfg)  # the pseudo-source is lost: a smaller budget, target or not
    assert fallen == 0.01 < next_cap(0.02, 0.99, 0.60, 0.2, cfg)
    assert next_cap(0.005, 0.5, 0.60, 0.2, cfg) == 0.005  # never under the first cap


def test_data_free_keeps_its_fixed_cap(mnist_model, tmp_path):
    """Data-free MAP caps the pruned share at data_free_cap and runs no budget rule (its neighbour domains are
    never suppressed like a real target: the rule climbed to its ceiling and lost the source, RESULTS)."""
    tiny = ["setting=data-free", "epochs=1", "repair_epochs=0", "margin=0.01", "lr=0.05", "synth.n=64",
            "synth.batch_size=64", "synth.iterations=10"]
    r = protect("map", mnist_model, tmp_path / "df.safetensors", device="cpu", overrides=tiny)
    notes = load_artifact(tmp_path / "df.safetensors").card.protection
    assert 0 < r.sparsity <= MapConfig().data_free_cap + 1e-6 and "budget_rule_caps" not in notes


def test_seed_reaches_the_pseudo_source():
    """`protect --seed` draws another pseudo-source (issue 28: the synthesis seed was not reached); seed 0
    keeps the synthesis's own seed, so earlier runs are unchanged."""
    from dataclasses import replace

    from edgeguard.methods.base import ProtectionData
    from edgeguard.methods.map import MapConfig, pseudo_source
    from edgeguard.models import create_model

    torch.manual_seed(0)
    model = create_model("small_cnn").eval()
    data = ProtectionData(source=None, target=None, num_classes=10, device=torch.device("cpu"))
    tiny = SynthesisConfig(n=8, batch_size=8, iterations=2, init="noise")
    cfg = replace(MapConfig(), setting="data-free", synth=tiny)
    a, _ = pseudo_source(model, data, cfg)
    b, _ = pseudo_source(model, data, replace(cfg, seed=1))
    direct, _ = synthesize(model, 10, tiny, "cpu")
    assert not torch.equal(a.x, b.x)
    assert torch.equal(a.x.cpu(), torch.from_numpy(direct))


def test_carried_bn_shift_moves_only_what_the_mask_moved(mnist_model):
    """carry_bn_shift on a model against itself changes nothing, whatever the images' own mismatch (USPS for
    an MNIST model), where re-estimating on them would replace the statistics; against the unmasked model
    it moves a masked model's statistics."""
    import copy

    from edgeguard.bn_stats import bn_layers, carry_bn_shift, reestimate_bn
    from edgeguard.masks import MaskSet

    model = load_artifact(mnist_model).model.eval()
    usps = get_domain("usps_sample")
    data = TensorData.from_numpy(usps.train_x[:256], usps.train_y[:256])
    stats = lambda m: torch.cat([torch.cat([b.running_mean, b.running_var]) for b in bn_layers(m)])  # noqa: E731
    same = copy.deepcopy(model)
    carry_bn_shift(same, model, data)
    assert torch.allclose(stats(same), stats(model), rtol=1e-4, atol=1e-5)
    replaced = copy.deepcopy(model)
    reestimate_bn(replaced, data)
    assert not torch.allclose(stats(replaced), stats(model), rtol=1e-2, atol=1e-3)

    masked = copy.deepcopy(model)
    weights = {n: p for n, p in masked.named_parameters() if p.dim() == 4}
    MaskSet({n: torch.rand(p.shape, generator=torch.Generator().manual_seed(0)) > 0.2 for n, p in weights.items()}
            ).bake_(masked)
    before = stats(masked)
    carry_bn_shift(masked, model, data)
    assert not torch.allclose(stats(masked), before, rtol=1e-2, atol=1e-3)
