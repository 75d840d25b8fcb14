"""Ed25519 keys and signatures (cryptography). Chosen over OpenSSF model-signing: it signs offline with a
local key pair in a few lines, and the device verifies with the same small library it already needs."""
from __future__ import annotations

import os
from pathlib import Path

from runtime.fileio import atomic_write_bytes


def generate_keypair(prefix: str | os.PathLike) -> tuple[Path, Path]:
    """Write PREFIX.key (PEM PKCS8 private, mode 0600) and PREFIX.pub (PEM public)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.generate()
    priv = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())
    pub = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    prefix = Path(prefix)
    kp, pp = prefix.with_name(prefix.name + ".key"), prefix.with_name(prefix.name + ".pub")
    atomic_write_bytes(kp, priv, private=True)  # 0600 from its first byte on disk
    atomic_write_bytes(pp, pub)
    return kp, pp


def load_private_key(path: str | os.PathLike):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except FileNotFoundError:
        raise ValueError(f"{path}: signing key not found (make one with `edgeguard keygen --out vendor`)") from None
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: not an unencrypted PEM private key ({e})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"{path}: not an Ed25519 private key")
    return key


def sign(data: bytes, key_path: str | os.PathLike) -> bytes:
    return load_private_key(key_path).sign(data)


# --- ECDSA P-256: the key the ecosystem's tools verify (Mender Artifacts, OpenSSF model signing) ------------------
# Measured here: mender-artifact 3.9 signs with RSA or ECDSA keys in their traditional PEM forms (an Ed25519 key
# is refused when signing, and `validate -k ed25519.pub` even exits 0), and model-signing 1.1.1's key mode takes
# elliptic-curve keys only (RSA and Ed25519 fail). One P-256 key in SEC1 PEM serves both.
def generate_ota_keypair(prefix: str | os.PathLike) -> tuple[Path, Path]:
    """Write PREFIX-ota.key (SEC1 PEM 'EC PRIVATE KEY', P-256, mode 0600) and PREFIX-ota.pub."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    priv = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                             serialization.NoEncryption())
    pub = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    prefix = Path(prefix)
    kp, pp = prefix.with_name(prefix.name + "-ota.key"), prefix.with_name(prefix.name + "-ota.pub")
    atomic_write_bytes(kp, priv, private=True)
    atomic_write_bytes(pp, pub)
    return kp, pp


def load_ota_key(path: str | os.PathLike):
    """The vendor's ECDSA P-256 private key, or ValueError with the fix in one line."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    try:
        data = Path(path).read_bytes()
        key = serialization.load_pem_private_key(data, password=None)
    except FileNotFoundError:
        raise ValueError(f"{path}: key not found (`edgeguard keygen --out vendor` writes vendor-ota.key)") from None
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: not an unencrypted PEM private key ({str(e).splitlines()[0][:80]})") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != "secp256r1":
        raise ValueError(f"{path}: not an ECDSA P-256 key; Mender Artifacts and OpenSSF model signing need one "
                         "(`edgeguard keygen --out vendor` writes vendor-ota.key)")
    if b"BEGIN EC PRIVATE KEY" not in data:
        raise ValueError(f"{path}: a PKCS8 EC key; mender-artifact reads the SEC1 form ('EC PRIVATE KEY'): "
                         f"openssl ec -in {path} -out {path}.sec1")
    return key


def ota_public_pem(path: str | os.PathLike) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return load_ota_key(path).public_key().public_bytes(serialization.Encoding.PEM,
                                                        serialization.PublicFormat.SubjectPublicKeyInfo)
