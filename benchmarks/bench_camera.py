"""Camera-resolution benchmarks (issue 29), each appending its rows to RESULTS.md:

  ref       the CPU reference natural-image model: candidates × sizes trained on pacs_photo (accuracy, time)
  folder    a ~10,000-image folder at 224 px (every PACS file): first pass (decode in workers) and cached pass
            (memory-mapped) images/s, training-step images/s, peak RSS while training
  roundtrip a model trained here, exported as a torchvision state dict and re-imported: identical outputs?
  parity    edgeguard-runtime (its own JPEG decoding) against the host model on held-out PACS files
  map       MAP source-available pacs_photo → pacs_art / pacs_cartoon, seeds × targets, source drop and target

    python benchmarks/bench_camera.py ref --archs resnet18 mobilenet_v3_small --sizes 96 112 --epochs 30
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._record import record  # noqa: E402

REF_MODEL = "natural_ref"


def _train(arch: str, size: int, epochs: int, out: Path, seed: int = 0, domain: str = "pacs_photo") -> dict:
    from edgeguard.inputspec import natural_input
    from edgeguard.source import train_source

    return train_source(arch, domain, out, epochs=epochs, device="auto", seed=seed, input_spec=natural_input(size))


def cmd_ref(a) -> None:
    rows = ["| arch | input | epochs | pacs_photo test acc | train time | images/s |", "|---|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as d:
        for arch in a.archs:
            for size in a.sizes:
                r = _train(arch, size, a.epochs, Path(d) / f"{arch}{size}.safetensors")
                rows.append(f"| {arch} | {size} px | {a.epochs} | {r['test_accuracy'] * 100:.2f} % | "
                            f"{r['seconds'] / 60:.1f} min | {r['images_per_second']:.0f} |")
                print(rows[-1], flush=True)
    record("Camera resolution: CPU reference natural-image model (issue 29)", rows)


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cmd_folder(a) -> None:
    """Every PACS file in one ImageFolder (symlinks), decoded at 224 px, then a few training steps."""
    import numpy as np
    import torch

    from edgeguard.domains import get_domain
    from edgeguard.domains.registry import _MEMO
    from edgeguard.inputspec import natural_input
    from edgeguard.models import create_model
    from edgeguard.source import augmentation
    from edgeguard.training import TensorData, TrainConfig, train_classifier

    pacs = Path(a.data_root or os.environ["EDGEGUARD_DATA_ROOT"]) / "pacs"
    root = Path(tempfile.mkdtemp(prefix="pacs-all-"))
    cache = Path(tempfile.mkdtemp(prefix="eg-cache-"))
    os.environ["EDGEGUARD_CACHE"] = str(cache)
    for dom in sorted(p for p in pacs.iterdir() if p.is_dir()):
        for c in sorted(p for p in dom.iterdir() if p.is_dir()):
            (root / c.name).mkdir(parents=True, exist_ok=True)
            for f in c.iterdir():
                (root / c.name / f"{dom.name}_{f.name}").symlink_to(f)
    n = sum(1 for _ in root.rglob("*.jpg"))
    spec = natural_input(a.size)
    t0 = time.perf_counter()
    d = get_domain(f"imagefolder:{root}", input=spec)
    first = time.perf_counter() - t0
    _MEMO.clear()
    t0 = time.perf_counter()
    d = get_domain(f"imagefolder:{root}", input=spec)
    idx = np.random.default_rng(0).permutation(len(d.train_y))
    for s in range(0, len(idx), 128):  # one epoch of random batches read from the map
        np.asarray(d.train_x[np.sort(idx[s : s + 128])]).sum()
    cached = time.perf_counter() - t0
    rss_before = _rss_mb()
    model = create_model(a.arch, d.num_classes, input_spec=spec)
    train = TensorData.from_numpy(d.train_x, d.train_y)
    cfg = TrainConfig(epochs=1, batch_size=64, device="cpu", **augmentation(spec))
    steps = a.steps
    t0 = time.perf_counter()
    train_classifier(model, train, cfg, steps_per_epoch=steps, desc="train steps",
                     batches=lambda e, g: (train.take(torch.randint(0, len(train), (64,), generator=g))
                                           for _ in range(steps)))
    step_ips = steps * 64 / (time.perf_counter() - t0)
    size_gb = (d.train_x.nbytes + d.test_x.nbytes) / 1e9
    rows = [f"| images | input | decoded size | first pass (decode, workers) | cached pass (map, one epoch of "
            f"random batches) | {a.arch} training step | peak RSS |", "|---|---|---|---|---|---|---|",
            f"| {n:,} | {a.size} px | {size_gb:.2f} GB | {n / first:.0f} img/s ({first:.0f} s) | "
            f"{len(d.train_y) / cached:.0f} img/s ({cached:.1f} s) | {step_ips:.1f} img/s | "
            f"{_rss_mb() / 1024:.2f} GB (before training {rss_before / 1024:.2f} GB) |"]
    shutil.rmtree(root)
    shutil.rmtree(cache)
    record(f"Camera resolution: a {n:,}-image folder at {a.size} px (issue 29)", rows)


def cmd_roundtrip(a) -> None:
    import torch
    from safetensors.torch import save_file

    from edgeguard.artifact import load_artifact
    from edgeguard.models.imported import vendor_state_dict  # noqa: F401  (the import path the vendor uses)
    from edgeguard.training import normalize

    d = Path(tempfile.mkdtemp())
    r = _train("resnet18", a.size, a.epochs, d / "src.safetensors")
    art = load_artifact(d / "src.safetensors")
    # the registry's resnet18 is torchvision's layers in encoder/head; export them under torchvision's names
    tv = {}
    names = ["conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"]
    for k, v in art.model.state_dict().items():
        part, _, rest = k.partition(".")
        if part == "encoder":
            i, _, tail = rest.partition(".")
            tv[f"{names[int(i)]}.{tail}"] = v
        else:
            tv[f"fc.{rest.split('.', 1)[1]}"] = v
    save_file(tv, str(d / "vendor.safetensors"))
    (d / "classes.txt").write_text("\n".join(art.card.classes) + "\n")
    spec = art.card.input
    cmd = [str(Path(sys.executable).parent / "edgeguard"), "import", str(d / "vendor.safetensors"), "--arch",
           "torchvision:resnet18", "--classes", str(d / "classes.txt"), "--source", "pacs_photo", "--input-size",
           str(a.size), "--out", str(d / "imported.safetensors"), "--device", "cpu", "--json"]
    out = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
    imp = load_artifact(d / "imported.safetensors")
    x = torch.randint(0, 256, (16, *spec.shape), dtype=torch.uint8)
    with torch.no_grad():
        same = torch.equal(art.model.eval()(normalize(x, spec)), imp.model.eval()(normalize(x, spec)))
    record("Camera resolution: export as a torchvision state dict, re-import (issue 29)", [
        "| model | trained here | imported accuracy | outputs bit-identical |", "|---|---|---|---|",
        f"| resnet18 {a.size} px, pacs_photo, {a.epochs} epochs | {r['test_accuracy'] * 100:.2f} % | "
        f"{out['source_accuracy'] * 100:.2f} % | {'yes' if same else 'NO'} |"])
    shutil.rmtree(d)


def cmd_parity(a) -> None:
    """Held-out PACS files (the test split of each domain) through the host model and the device runtime."""
    import numpy as np
    import torch

    from edgeguard.artifact import load_artifact
    from edgeguard.build import build
    from edgeguard.domains.folders import list_image_folder, stratified_split
    from edgeguard.domains.registry import PACS_DOMAINS
    from edgeguard.training import predict_logits
    from runtime.imagefile import decode_image

    art = load_artifact(a.model)
    spec = art.card.input
    d = Path(tempfile.mkdtemp())
    build(a.model, d / "bundle", samples=100, allow_weak=True, unauthorised=[])
    rows = ["| domain | files | top-1 agreement | host accuracy | device accuracy |", "|---|---|---|---|---|"]
    pacs = Path(os.environ["EDGEGUARD_DATA_ROOT"]) / "pacs"
    for name in a.domains:
        fl = list_image_folder(pacs / PACS_DOMAINS[name])
        test = stratified_split(fl.rel(), fl.labels)
        held = [f for f, t in zip(fl.files, test) if t]
        pick = np.unique(np.linspace(0, len(held) - 1, min(a.max_files, len(held))).round().astype(int))
        files, y = [held[i] for i in pick], fl.labels[test][pick]  # spread over every class
        x = torch.from_numpy(np.stack([decode_image(f, spec.shape, spec.resize, spec.crop) for f in files]))
        host = predict_logits(art.model, x).argmax(1).numpy()
        rep = d / f"{name}.json"
        for s in range(0, len(files), 200):
            subprocess.run([sys.executable, "-m", "runtime.cli", "predict", str(d / "bundle"),
                            *map(str, files[s : s + 200]), "--allow-unsigned", "--report", f"{rep}.{s}"],
                           check=True, capture_output=True)
        dev = np.array([p["index"] for s in range(0, len(files), 200)
                        for p in json.loads(Path(f"{rep}.{s}").read_text())["predictions"]])
        rows.append(f"| {name} | {len(files)} | {(host == dev).mean() * 100:.2f} % | {(host == y).mean() * 100:.2f} % "
                    f"| {(dev == y).mean() * 100:.2f} % |")
        print(rows[-1], flush=True)
    shutil.rmtree(d)
    record(f"Camera resolution: host–device parity on held-out PACS JPEGs ({art.card.arch}, "
           f"{'×'.join(map(str, spec.shape))}) (issue 29)", rows)


def cmd_map(a) -> None:
    from edgeguard.artifact import load_artifact
    from edgeguard.protect import protect

    d = Path(a.keep) if a.keep else Path(tempfile.mkdtemp())
    d.mkdir(parents=True, exist_ok=True)
    rows = ["| seed | target | source before → after (drop) | target before → after | wall |", "|---|---|---|---|---|"]
    res: dict[str, list] = {t: [] for t in a.targets}
    for seed in a.seeds:
        src = d / f"src{seed}.safetensors"
        _train(a.arch, a.size, a.epochs, src, seed=seed)
        for t in a.targets:
            out = d / f"map{seed}{t}.safetensors"
            t0 = time.perf_counter()
            protect("map", src, out, target=t, overrides=[*(a.set or []), f"seed={seed}"], device="auto")
            card = load_artifact(out).card
            s, g = card.source_accuracy, card.accuracy(t, "target")
            res[t].append(((s.before - s.after) * 100, g.after * 100))
            rows.append(f"| {seed} | {t} | {s.before * 100:.2f} → {s.after * 100:.2f} % ({(s.before - s.after) * 100:.2f})"
                        f" | {g.before * 100:.2f} → {g.after * 100:.2f} % | {time.perf_counter() - t0:.0f} s |")
            print(rows[-1], flush=True)
    if len(a.seeds) > 1:  # one seed has no spread to report
        for t, v in res.items():
            drops, tg = [x[0] for x in v], [x[1] for x in v]
            rows.append(f"| mean ± std | {t} | drop {statistics.mean(drops):.2f} ± {statistics.stdev(drops):.2f} | "
                        f"{statistics.mean(tg):.2f} ± {statistics.stdev(tg):.2f} % | |")
    if not a.keep:
        shutil.rmtree(d)
    setting = next((o.split("=", 1)[1] for o in a.set or [] if o.startswith("setting=")), "source-available")
    record(f"Camera resolution: MAP {setting} on PACS ({a.arch} {a.size} px)", rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("ref")
    r.add_argument("--archs", nargs="+", default=["resnet18", "mobilenet_v3_small"])
    r.add_argument("--sizes", nargs="+", type=int, default=[96, 112])
    r.add_argument("--epochs", type=int, default=30)
    f = sub.add_parser("folder")
    f.add_argument("--size", type=int, default=224)
    f.add_argument("--arch", default=REF_MODEL)
    f.add_argument("--steps", type=int, default=10)
    f.add_argument("--data-root", default=None)
    t = sub.add_parser("roundtrip")
    t.add_argument("--size", type=int, default=96)
    t.add_argument("--epochs", type=int, default=2)
    q = sub.add_parser("parity")
    q.add_argument("model")
    q.add_argument("--domains", nargs="+", default=["pacs_photo", "pacs_art", "pacs_cartoon", "pacs_sketch"])
    q.add_argument("--max-files", type=int, default=400)
    m = sub.add_parser("map")
    m.add_argument("--arch", default=REF_MODEL)
    m.add_argument("--size", type=int, default=112)
    m.add_argument("--epochs", type=int, default=30)
    m.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    m.add_argument("--targets", nargs="+", default=["pacs_art", "pacs_cartoon"])
    m.add_argument("--set", nargs="*", default=None)
    m.add_argument("--keep", default=None, help="keep the source and MAP models in this folder")
    a = p.parse_args()
    {"ref": cmd_ref, "folder": cmd_folder, "roundtrip": cmd_roundtrip, "parity": cmd_parity, "map": cmd_map}[a.cmd](a)


if __name__ == "__main__":
    main()
