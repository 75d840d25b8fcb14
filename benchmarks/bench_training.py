"""Training throughput (images/s) of the architectures at 32 px, batch 128, on this machine."""
from __future__ import annotations

import argparse
import time

import torch
from _record import record

from edgeguard.devices import autocast, resolve_device
from edgeguard.models import create_model


def throughput(arch: str, device: torch.device, batch: int, steps: int) -> float:
    m = create_model(arch).to(device)
    if device.type == "cuda":
        m = m.to(memory_format=torch.channels_last)
    opt = torch.optim.Adam(m.parameters(), 1e-3)
    x = torch.randn(batch, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    for i in range(steps + 3):
        if i == 3:
            if device.type == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
        with autocast(device):
            loss = torch.nn.functional.cross_entropy(m(x).float(), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return steps * batch / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--archs", default="small_cnn,resnet18")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--steps", type=int, default=20)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    dev = resolve_device(a.device)
    rows = ["| architecture | batch | images/s |", "|---|---|---|"]
    for arch in a.archs.split(","):
        rows.append(f"| {arch} | {a.batch} | {throughput(arch, dev, a.batch, a.steps):,.0f} |")
    record(f"Training throughput on {dev}", rows)


if __name__ == "__main__":
    main()
