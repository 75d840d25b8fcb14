#!/usr/bin/env bash
# The vendor's path on PACS at camera size: a torchvision ResNet-18 trained elsewhere (here: a few epochs by
# this script, then saved as a plain torchvision state dict) → import → protect → evaluate → build → validate
# and predict with the device runtime. Needs EDGEGUARD_DATA_ROOT with pacs/. SIZE=224 on a GPU; 96 on a CPU.
set -euo pipefail
SIZE=${SIZE:-96}
EPOCHS=${EPOCHS:-10}
OUT=${OUT:-vendor_run}
MAP_SET=${MAP_SET:-}          # e.g. "--set epochs=1 --set repair_epochs=0" for a smoke run
EVAL_ARGS=${EVAL_ARGS:---suite paper}  # smoke run: "--attack direct-all/masked --epochs 1 --max-train 300"
mkdir -p "$OUT"
python - "$OUT" "$SIZE" "$EPOCHS" <<'PY'
import sys, torch
from torchvision.models import resnet18
from edgeguard.domains import get_domain
from edgeguard.inputspec import natural_input
from edgeguard.training import TensorData, TrainConfig, train_classifier
from edgeguard.source import augmentation
out, size, epochs = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
spec = natural_input(size)
d = get_domain("pacs_photo", input=spec)
vendor = resnet18(weights=None, num_classes=d.num_classes)  # the vendor's own module, their own training
vendor.input_spec = spec
train_classifier(vendor, TensorData.from_numpy(d.train_x, d.train_y), TrainConfig(epochs=epochs, **augmentation(spec)),
                 desc="vendor training")
torch.save(vendor.state_dict(), f"{out}/vendor_resnet18.pt")
open(f"{out}/classes.txt", "w").write("\n".join(d.classes) + "\n")
PY
edgeguard import "$OUT/vendor_resnet18.pt" --arch torchvision:resnet18 --classes "$OUT/classes.txt" \
    --input-size "$SIZE" --source pacs_photo --out "$OUT/source.safetensors"
edgeguard protect --method map --source-model "$OUT/source.safetensors" --target pacs_art --out "$OUT/map.safetensors" --allow-weak $MAP_SET
edgeguard evaluate "$OUT/map.safetensors" --target pacs_art $EVAL_ARGS --grid 0.01,0.1,1.0 --report "$OUT/report"
edgeguard keygen --out "$OUT/vendor"
edgeguard build "$OUT/map.safetensors" --target jetson-orin --out "$OUT/bundle" --sign-key "$OUT/vendor.key" --allow-weak
edgeguard-runtime validate "$OUT/bundle" --public-key "$OUT/vendor.pub"
edgeguard-runtime predict "$OUT/bundle" "$EDGEGUARD_DATA_ROOT"/pacs/photo/dog/056_0001.jpg --public-key "$OUT/vendor.pub"
