"""Every registered architecture trained briefly on the embedded MNIST sample: eval-mode test accuracy and
time (the registry's contract, tests/test_careless_user.py), and with `--bn-momentum` the BatchNorm momentum
forced to a value on every layer (issue 34: torchvision's 0.01 in mobilenet_v3_small).

    python benchmarks/bench_architectures.py --n 800 --epochs 5 --lr 1e-3
    python benchmarks/bench_architectures.py --archs mobilenet_v3_small --n 2000 --lr 3e-3 --bn-momentum 0.01 0.1
"""
from __future__ import annotations

import argparse
import time

from _record import record


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--archs", nargs="*", default=None)
    ap.add_argument("--n", type=int, default=800, help="training images")
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--bn-momentum", type=float, nargs="*", default=[None])
    ap.add_argument("--no-record", action="store_true")
    a = ap.parse_args()
    from torch import nn

    from edgeguard.domains import get_domain
    from edgeguard.models import create_model, list_models
    from edgeguard.training import TensorData, TrainConfig, evaluate, seed_everything, train_classifier

    d = get_domain("mnist_sample")
    train = TensorData.from_numpy(d.train_x[: a.n], d.train_y[: a.n])
    test = TensorData.from_numpy(d.test_x[:500], d.test_y[:500])
    rows = [f"mnist_sample, {a.n} training images, {a.epochs} epochs, Adam lr {a.lr:g}, batch 64, seed 0; accuracy "
            "on 500 test images in eval mode (chance 10 %).", "",
            "| architecture | BN momentum | eval accuracy | train accuracy (eval mode) | seconds |", "|---|---|---|---|---|"]
    for arch in a.archs or list(list_models()):
        for mom in a.bn_momentum:
            seed_everything(0)
            model = create_model(arch, 10)
            if mom is not None:
                for m in model.modules():
                    if isinstance(m, nn.BatchNorm2d):
                        m.momentum = mom
            shown = mom if mom is not None else sorted({m.momentum for m in model.modules()
                                                        if isinstance(m, nn.BatchNorm2d)})
            t = time.perf_counter()
            train_classifier(model, train, TrainConfig(epochs=a.epochs, lr=a.lr, batch_size=64, device="cpu"))
            secs = time.perf_counter() - t
            rows.append(f"| {arch} | {shown} | {evaluate(model, test) * 100:.1f} % | {evaluate(model, train) * 100:.1f} % "
                        f"| {secs:.1f} |")
            print(rows[-1], flush=True)
    if a.no_record:
        print("\n".join(rows))
    else:
        record("Registered architectures train (issue 34)", rows)


if __name__ == "__main__":
    main()
