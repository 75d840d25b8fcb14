"""OpenSSF model signing (`model_signing`, key mode) over every file of a bundle: `oms.sig` in the bundle,
verifiable with the upstream tool (`model_signing verify key BUNDLE --signature BUNDLE/oms.sig --public_key
vendor-ota.pub`) and by `edgeguard-runtime validate --oms-public-key`. Optional: the `[oms]` extra."""
from __future__ import annotations

import os
from pathlib import Path

from runtime.oms import SIGNATURE, available

from .signing import load_ota_key


def sign_bundle(bundle: str | os.PathLike, private_key: str | os.PathLike) -> Path:
    """Sign every file under `bundle` (the signature file itself excluded) into bundle/oms.sig."""
    if not available():
        raise ValueError("OpenSSF model signing needs the [oms] extra: pip install -e '.[oms]' "
                         "(model-signing and pyopenssl)")
    load_ota_key(private_key)  # the key's type and form, in one line, before the library sees it
    from model_signing import hashing, signing

    bundle = Path(bundle).resolve()  # model_signing matches ignored paths by their absolute form
    sig = bundle / SIGNATURE
    hcfg = hashing.Config().set_ignored_paths(paths=[sig], ignore_git_paths=False)
    signing.Config().use_elliptic_key_signer(private_key=str(private_key)).set_hashing_config(hcfg).sign(bundle, sig)
    return sig
