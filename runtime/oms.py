"""Verify a bundle's OpenSSF model-signing signature (`oms.sig`) where the `[oms]` extra is installed; the
runtime's own Ed25519 check of manifest.json stays the default on devices without it."""
from __future__ import annotations

from pathlib import Path

from .integrity import DEVICE_FILES
from .manifest import BundleError, IntegrityError

SIGNATURE = "oms.sig"


def available() -> bool:
    try:
        import model_signing  # noqa: F401  (1.1.1 also needs pyopenssl to import)
    except ImportError:
        return False
    return True


def verify(bundle: str | Path, public_key: str | Path) -> str:
    """Check oms.sig over every file of the bundle; IntegrityError (exit 1) names what does not match."""
    bundle = Path(bundle).resolve()  # model_signing matches ignored paths by their absolute form
    if not available():
        raise BundleError("--oms-public-key needs OpenSSF model signing on this device: pip install "
                          "'edgeguard-runtime[oms]' (model-signing and pyopenssl), or drop the option")
    sig = bundle / SIGNATURE
    if not sig.is_file():
        raise IntegrityError(f"oms: {SIGNATURE} is missing (build the bundle with --oms-key)")
    if not Path(public_key).is_file():
        raise BundleError(f"{public_key}: public key file not found")
    from model_signing import hashing, verifying

    ignored = [sig, *(bundle / f for f in sorted(DEVICE_FILES))]  # the device writes these after signing
    hcfg = hashing.Config().set_ignored_paths(paths=ignored, ignore_git_paths=False)
    try:
        verifying.Config().use_elliptic_key_verifier(public_key=str(public_key)).set_hashing_config(hcfg).verify(
            bundle, sig)
    except ValueError as e:  # model_signing reports a mismatch or a wrong key as ValueError
        raise IntegrityError(f"oms: {SIGNATURE} does not verify ({str(e).splitlines()[0][:160]})") from None
    except Exception as e:  # a damaged signature file or an unreadable key
        raise IntegrityError(f"oms: cannot verify {SIGNATURE} ({type(e).__name__}: {str(e)[:120]})") from None
    return f"{SIGNATURE} verifies (OpenSSF model signing, ECDSA P-256)"
