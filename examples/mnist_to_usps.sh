#!/usr/bin/env bash
# Full-size walkthrough on the real digits: train → protect (MAP and NTP) → attack → bundle → validate.
# CPU: about 30 minutes with small_cnn (most of it the attack grids). Needs EDGEGUARD_DATA_ROOT.
set -euo pipefail
: "${EDGEGUARD_DATA_ROOT:?set EDGEGUARD_DATA_ROOT to the folder with mnist/ and usps/}"
OUT=${1:-runs/example}
mkdir -p "$OUT"
edgeguard train --arch small_cnn --domain mnist --out "$OUT/source.safetensors"
edgeguard protect --method map --setting source-available --source-model "$OUT/source.safetensors" \
    --target usps --out "$OUT/map.safetensors"
edgeguard protect --method ntp --source-model "$OUT/source.safetensors" --target usps --out "$OUT/ntp.safetensors"
for m in map ntp; do
  edgeguard evaluate "$OUT/$m.safetensors" --target usps --unprotected "$OUT/source.safetensors" \
      --attack direct-all/masked --attack direct-all/free --report "$OUT/report_$m"
done
edgeguard keygen --out "$OUT/vendor"
edgeguard build "$OUT/ntp.safetensors" --target jetson-orin --out "$OUT/bundle" --sign-key "$OUT/vendor.key" \
    --report "$OUT/report_ntp"
edgeguard-runtime validate "$OUT/bundle" --public-key "$OUT/vendor.pub"
