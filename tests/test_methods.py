"""The method seam: every registered method keeps the common contract, and MAP/NTP behave exactly as before.

Runs on the embedded sample (no data root) with a small_cnn trained for 2 epochs, so it is quick.
"""
import dataclasses
import hashlib

import pytest
import torch

from edgeguard.artifact import load_artifact
from edgeguard.methods import list_methods
from edgeguard.protect import protect

SRC, TGT = "mnist_sample", "usps_sample"
# Quick settings per method for the contract test; a new method adds its own line here.
QUICK = {
    "map": ["epochs=2", "repair_epochs=1"],
    "ntp": ["source_fraction=0.25", "target_fraction=0.25", "iterations=2", "recovery_epochs=1", "head_epochs=1"],
    "magnitude": ["sparsity=0.4"],
    "harden": ["outer_steps=4", "eval_every=2", "attacks=1", "inner_steps=4", "suppress_every=2", "proxy_steps=4"],
}

# Recorded on main at 6ccadb9 (before the method seam) with /tmp's fingerprint script: the same runs through
# protect_map / protect_ntp. Mask sha256, sha256 of every weight tensor (sorted by name), accuracies.
# CPU with AVX512 capability, torch 2.14.1, 2 threads.
SYN = ["synth.n=128", "synth.batch_size=64", "synth.iterations=10", "synth.competition=0", "synth.colour=0"]  # plain DI
FINGERPRINTS = {
    "map_sa": ("map", TGT, ["epochs=2", "repair_epochs=1"],
               "5b80929711760c3f380c0f13e7a0175c1b58c5cd53db3889257a87936e816dde",
               "c1a51b59e4ed0a9714d202bca0c8874ba498b6641aca10fd6abd5cc0a35bdd8e", (0.75, 0.59, 0.376, 0.326)),
    "map_sf": ("map", TGT, ["setting=source-free", "epochs=2", "repair_epochs=1", "margin=0.01", "lr=0.05", *SYN],
               "7aa448c1aac872dee477cc6c37092ddfc3d7f1243cab5858c7aa46693cf29b54",
               "624a0260867be90548ca60a301f757afbcc8232b9d5a37921bf1aeb1bd6454e9", (0.75, 0.13, 0.376, 0.12)),
    "map_df": ("map", None, ["setting=data-free", "epochs=1", "repair_epochs=1", "margin=0.01", "lr=0.05",
                             "synth.n=64", "synth.batch_size=64", "synth.iterations=10"],
               "3d29cd67521dba98e360810bdf820fa1b3df844fbe72dd6e99a542e24685eef4",
               "3ecc5c07b041023631fce3b6ddca7e6d9379f1fd308f91c70f31d68b64eb1dff", (0.75, 0.112, None, None)),
    "map_cap24": ("map", TGT, ["epochs=1", "repair_epochs=1", "sparsity_cap=0.05", "structure=2:4"],
                  "03a508654360b49a282e1cae77d33004b1f7d0f4a8e5e0ccd2e1d9228c91c441",
                  "8f632dff514aefb077e864ae32d9d1bc2af4dea9f53d6d52de2a3037bf49ce7d", (0.75, 0.102, 0.376, 0.2)),
    "ntp": ("ntp", TGT, ["source_fraction=0.5", "target_fraction=0.5", "iterations=3", "recovery_epochs=1"],
            "116b92d616b2feb658f359fe2e9ef70a67d43cce02ab8e5081a0c175ec0d077e",
            "c4082e55d59ebd46705980df52755ebf40cd652e0cea97f6606a1d26f35cf7ef", (0.75, 0.648, 0.376, 0.306)),
    "ntp_sim": ("ntp", TGT, ["source_fraction=0.25", "target_fraction=0.25", "iterations=2", "recovery_epochs=1",
                             "experimental.sim_weight=1"],
                "fc784db1d93b86d4ca1891b116c89c94376119003deaa3247d46cc4dd77e181f",
                "72ce58cc07f2eabfa96adb61441b4d73b8e3d26c1ab61687c930cffa4a514f89", (0.75, 0.386, 0.376, 0.15)),
}

# The same runs on an AMD EPYC (avx512, 2 threads), where the float kernels give other bits from the sample
# source model on: recorded at 98cc942 and unchanged since (checked against that commit's code on this CPU).
# A machine is held to the table whose sample source model it reproduces (its weights' sha256).
FINGERPRINTS_BY_SOURCE = {
    "fe0cf19d320c4ccbb68892a0ab501fb997d4138b893a3bff5ac9a2ae61c3e250": {
        "map_sa": ("e20ebcf9510ee07958deeac7c0386cd3645495b44d10f996bb53bf50b822d849",
                   "303e01cc9e31dedd1eb0d22042072f7c6c74d8c5b05d2ade7453e046718de559", (0.75, 0.598, 0.378, 0.32)),
        "map_sf": ("8d845a1ef6940c8a7eed0cbc6e2740c5c1776e7d5c83edcb73f6534b5b6300f4",
                   "bebcc9b60d013190af8545bfb6ade8b87ff5f10b4369f2bbeddcafb1c0450787", (0.75, 0.12, 0.378, 0.104)),
        "map_df": ("0e51f285145d8b2ff89b48557bee8ac01f6948328ee1faf4a2a56ab147b595b2",
                   "412ef4a99c2b16a0a0e3e3417f359ac16a14046856143c330a4d7925f2613b67", (0.75, 0.13, None, None)),
        "map_cap24": ("09a49023a848c2b10e3cf1c1d719bf744831eebbf12e65cd3c663acd94961f01",
                   "c9e39e1208a81c3a6ccdbd68bd21c1a5eff81e86dbebd859607472157a12abd5", (0.75, 0.102, 0.378, 0.09)),
        "ntp": ("3349c5d0c33895718e60bd6bc97a09fc66903ff7857f76adf8c19c3bab7a0cb0",
                   "76330791f9f1b924a31c1a231bd6499b3275d2fc663c45c6fa3a1961abac9eed", (0.75, 0.662, 0.378, 0.312)),
        "ntp_sim": ("0fae4d7049eafb13be46f90c4a50ffa3e8bc4a5335d2fee43e073fc2e8587bba",
                   "c635487967f6a6118aea8183a88efe5d3e5cb89d8adbb9a8d74078586ea3f14d", (0.75, 0.41, 0.378, 0.164)),
    },
}


@pytest.fixture(scope="module")
def sample_source(tmp_path_factory):
    from edgeguard.source import train_source

    out = tmp_path_factory.mktemp("seam") / "src.safetensors"
    train_source("small_cnn", SRC, out, epochs=2, lr=3e-3, batch_size=64, device="cpu")
    return out


def weights_sha256(model) -> str:
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.contiguous().numpy().tobytes())
    return h.hexdigest()


def test_three_methods_are_registered():
    assert {"map", "ntp", "magnitude"} <= {m.name for m in list_methods()}
    for m in list_methods():
        assert m.summary and dataclasses.is_dataclass(m.config_cls)


@pytest.mark.parametrize("method", [m.name for m in list_methods()])
def test_method_contract(method, sample_source, tmp_path, monkeypatch):
    """Mask exact, weights zero where masked, card complete, and a run killed after its first checkpoint
    resumes to the same weights and mask as an uninterrupted run."""
    assert method in QUICK, f"add quick settings for {method} to QUICK"
    full = tmp_path / "full.safetensors"
    r = protect(method, sample_source, full, target=TGT, overrides=QUICK[method], device="cpu")
    art = load_artifact(full)  # loading checks the mask hash and that every masked weight is exactly 0
    state = art.model.state_dict()
    for name, keep in art.mask.masks.items():
        assert torch.all(state[name][~keep] == 0), name
    card = art.card
    assert card.method == method and card.mask.sha256 == art.mask.sha256()
    assert abs(card.mask.sparsity - r.sparsity) < 1e-9 and card.target_domains == [TGT]
    assert card.method_config == r.config and card.protection["history"] is not None
    assert {a.role for a in card.accuracies} == {"source", "target"}
    assert all(a.before is not None for a in card.accuracies)
    assert (tmp_path / "full.safetensors.config.json").exists()
    assert not (tmp_path / "full.safetensors.ckpt").exists()

    import edgeguard.methods.base as base
    import edgeguard.training as training

    real = training.write_checkpoint
    writes = []

    def write_then_die(path, payload):
        real(path, payload)
        writes.append(path)
        raise KeyboardInterrupt  # a kill right after the first checkpoint reached the disk

    monkeypatch.setattr(training, "write_checkpoint", write_then_die)
    monkeypatch.setattr(base, "write_checkpoint", write_then_die)
    resumed = tmp_path / "resumed.safetensors"
    try:
        protect(method, sample_source, resumed, target=TGT, overrides=QUICK[method], device="cpu")
    except KeyboardInterrupt:
        assert not resumed.exists() and (tmp_path / "resumed.safetensors.ckpt").is_dir()
    monkeypatch.setattr(training, "write_checkpoint", real)
    monkeypatch.setattr(base, "write_checkpoint", real)
    protect(method, sample_source, resumed, target=TGT, overrides=QUICK[method], device="cpu", resume=True)
    again = load_artifact(resumed)
    assert again.mask.sha256() == art.mask.sha256()
    assert weights_sha256(again.model) == weights_sha256(art.model)
    if method != "magnitude":
        assert writes, f"{method} wrote no checkpoint: nothing to resume from"


# On a CPU with other float kernels the same runs take other paths from the first step: accuracies within 8
# points (the sample's test sets hold 500 images; a changed method moves them further).
FOREIGN_CPU_TOLERANCE = 0.08

# Issue 20 changed the pseudo-source (and caps the masks) on purpose: the source-free and data-free cases no
# longer match the pre-seam fingerprints; tests/test_synthesis.py and tests/test_map.py cover the new behaviour.
CHANGED_SINCE = {"map_sf", "map_df"}


@pytest.mark.parametrize("name", [n for n in FINGERPRINTS if n not in CHANGED_SINCE])
def test_behaviour_unchanged_since_before_the_seam(name, sample_source, tmp_path):
    """The same masks, weights and accuracies, bit for bit, as protect_map / protect_ntp gave before, on a CPU
    whose kernels made a recorded table (AVX512, 2 threads, its sample source model's sha256); elsewhere float
    sums differ from the first step on, so the accuracies are held within FOREIGN_CPU_TOLERANCE instead."""
    method, target, overrides, mask_sha, weights_sha, accs = FINGERPRINTS[name]
    machine = FINGERPRINTS_BY_SOURCE.get(weights_sha256(load_artifact(sample_source).model))
    if machine is not None:
        mask_sha, weights_sha, accs = machine[name]
    recording_cpu = torch.backends.cpu.get_cpu_capability() == "AVX512" and torch.get_num_threads() == 2
    r = protect(method, sample_source, tmp_path / f"{name}.safetensors", target=target, overrides=overrides,
                device="cpu")
    art = load_artifact(tmp_path / f"{name}.safetensors")
    src, tgt = r.source, r.accuracy(TGT)
    got = (src.before, src.after, tgt.before if tgt else None, tgt.after if tgt else None)
    if not recording_cpu:
        assert got == pytest.approx(accs, abs=FOREIGN_CPU_TOLERANCE)
        return
    assert art.mask.sha256() == mask_sha
    assert weights_sha256(art.model) == weights_sha
    assert got == pytest.approx(accs, abs=5e-4)


TINY_HARDEN = ["outer_steps=2", "eval_every=1", "attacks=1", "inner_steps=2", "suppress_every=1", "proxy_steps=2"]


def test_then_chains_a_refining_method_and_harden_is_that_call(sample_source, tmp_path):
    """`protect --method magnitude --then harden` keeps the first stage beside OUT and refines it; `edgeguard
    harden` on that first stage writes the same weights as `protect --method harden` on it."""
    from click.testing import CliRunner

    from edgeguard.cli import main

    out = tmp_path / "chain.safetensors"
    r = CliRunner().invoke(main, ["protect", "--method", "magnitude", "--source-model", str(sample_source),
                                  "--target", TGT, "--out", str(out), "--then", "harden", "--set", "sparsity=0.4",
                                  *[a for kv in TINY_HARDEN for a in ("--set", f"harden.{kv}")], "--allow-weak",
                                  "--device", "cpu"])
    assert r.exit_code == 0, r.output
    first = tmp_path / "chain.magnitude.safetensors"
    assert load_artifact(first).card.method == "magnitude"
    assert abs(load_artifact(first).mask.sparsity() - 0.4) < 0.01  # the unprefixed --set reached the first stage
    assert load_artifact(out).card.method == "magnitude+harden"

    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    sets = [x for kv in TINY_HARDEN for x in ("--set", kv)]
    for args in (["harden", str(first), "--out", str(a)],
                 ["protect", "--method", "harden", "--source-model", str(first), "--out", str(b)]):
        r = CliRunner().invoke(main, [*args, "--target", TGT, *sets, "--allow-weak", "--device", "cpu"])
        assert r.exit_code == 0, r.output
    assert weights_sha256(load_artifact(a).model) == weights_sha256(load_artifact(b).model)
