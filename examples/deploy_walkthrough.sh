#!/usr/bin/env bash
# From `edgeguard train` to a validated device, on this machine: the "device" is a throwaway OpenSSH server on
# 127.0.0.1 (Debian's openssh-server). Uses the embedded digit sample, so no data root is needed. ~2 min on CPU.
set -euo pipefail
OUT=${1:-runs/walkthrough}
rm -rf "$OUT" && mkdir -p "$OUT"

# 1. vendor workstation: train, protect, sign, build
edgeguard train --arch small_cnn --domain mnist_sample --epochs 10 --lr 3e-3 --batch-size 64 \
    --out "$OUT/source.safetensors"
edgeguard protect --method map --setting source-available --source-model "$OUT/source.safetensors" \
    --target usps_sample --epochs 10 --out "$OUT/map.safetensors"
edgeguard keygen --out "$OUT/vendor"
edgeguard build "$OUT/map.safetensors" --target jetson-orin --out "$OUT/bundle" --sign-key "$OUT/vendor.key" \
    --samples 200

# 2. a stand-in camera: sshd on loopback with its own host key, user key, known_hosts and fleet.toml
python -m edgeguard.deploy.loopback start "$OUT/device" --devices 2
trap 'python -m edgeguard.deploy.loopback stop "$OUT/device"' EXIT

# 3. deploy: upload, check hashes, install the runtime wheel, validate on the device, switch `current`
edgeguard deploy "$OUT/bundle" --inventory "$OUT/device/fleet.toml" --public-key "$OUT/vendor.pub" \
    --report-dir "$OUT/deploy-reports"
# the same bundle again does nothing
edgeguard deploy "$OUT/bundle" --inventory "$OUT/device/fleet.toml" --public-key "$OUT/vendor.pub" \
    --report-dir "$OUT/deploy-reports"

# 4. what the camera now has
ls -l "$OUT/device/home/camera-1"
cat "$OUT/deploy-reports/camera-1/validate.json" | head -n 30
