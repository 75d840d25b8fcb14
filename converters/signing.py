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
