"""Engine signatures: ed25519 keys (from `cryptography`) and signature.json beside manifest.json.

The manifest holds the sha256 of every sealed file, so a signature over the manifest's sha256 covers
every byte of the engine. What is signed is the ASCII line `llmbuild-engine-manifest-v1 <sha256 hex of
manifest.json>`: the prefix keeps a signature made for an engine from being valid for anything else the
same key signs. Verifying without llmbuild, with OpenSSL 3:

    printf 'llmbuild-engine-manifest-v1 %s' "$(sha256sum manifest.json | cut -c1-64)" > msg
    jq -r .signature signature.json | base64 -d > sig
    openssl pkeyutl -verify -pubin -inkey NAME.pub -rawin -in msg -sigfile sig

A key's id is the sha256 of its 32 raw public-key bytes; signature.json names it so that a wrong public
key is reported as such rather than as a bad signature.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from llmbuild.errors import SigningError
from llmbuild.manifest import MANIFEST, SIGNATURE

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

ALGORITHM: Literal["ed25519"] = "ed25519"
_CONTEXT = b"llmbuild-engine-manifest-v1 "
_MAX_FILE_BYTES = 1 << 16
"""Key files are a few hundred bytes; anything larger is not one."""


class Signature(BaseModel):
    """signature.json: who signed which manifest."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    algorithm: Literal["ed25519"] = ALGORITHM
    key_id: str
    """sha256 of the signer's raw public key (hex)."""
    manifest_sha256: str
    """sha256 of the manifest.json bytes that were signed (hex)."""
    signature: str
    """base64 ed25519 signature of `llmbuild-engine-manifest-v1 <manifest_sha256>`."""

    def to_bytes(self) -> bytes:
        return (self.model_dump_json(indent=1) + "\n").encode()


def public_key_path(name: Path) -> Path:
    """Where keygen writes the public half of the private key `name`."""
    return name.with_name(name.name + ".pub")


def generate_key(name: Path) -> str:
    """Write a new ed25519 key pair: `name` (PKCS#8 PEM, mode 0600) and `name.pub`; return the key id.

    Never overwrites: either file existing is an error, and the private key is created exclusively.
    """
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    pub = public_key_path(name)
    for path in (name, pub):
        if path.exists() or path.is_symlink():
            raise SigningError(f"{path} already exists; keygen never overwrites a key: choose another -o or remove it")
    if not name.parent.is_dir():
        raise SigningError(f"directory {name.parent} does not exist; create it or choose another -o")
    key = Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    _write_new(name, private_pem, 0o600)
    _write_new(pub, public_pem, 0o644)
    return key_id(public_pem)


def sign_manifest(manifest_bytes: bytes, private_key: Path) -> Signature:
    """Sign the sha256 of `manifest_bytes` with the ed25519 private key file `private_key`."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    try:
        key = serialization.load_pem_private_key(_read_key_file(private_key, "signing key"), password=None)
    except (ValueError, TypeError) as exc:
        raise SigningError(
            f"signing key {private_key} is not an unencrypted PEM private key ({exc}); make one with llmbuild keygen"
        ) from None
    if not isinstance(key, Ed25519PrivateKey):
        raise SigningError(f"signing key {private_key} is not an ed25519 key; make one with llmbuild keygen")
    digest = hashlib.sha256(manifest_bytes).hexdigest()
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return Signature(
        key_id=key_id(public_pem),
        manifest_sha256=digest,
        signature=base64.b64encode(key.sign(_CONTEXT + digest.encode())).decode(),
    )


def verify_manifest(manifest_bytes: bytes, signature_bytes: bytes | None, public_key: Path) -> str:
    """Check that `signature_bytes` (signature.json, None when absent) signs `manifest_bytes` with
    `public_key`; return the key id. Raises SigningError with the reason, without a location."""
    from cryptography.exceptions import InvalidSignature

    key, expected_id = _load_public_key(public_key)
    if signature_bytes is None:
        raise SigningError(f"unsigned: no {SIGNATURE} (sign it with llmbuild pack --sign-key)")
    try:
        sig = Signature.model_validate_json(signature_bytes)
        raw = base64.b64decode(sig.signature, validate=True)
    except (ValidationError, binascii.Error):
        raise SigningError(f"{SIGNATURE} is corrupt (not an llmbuild ed25519 signature)") from None
    digest = hashlib.sha256(manifest_bytes).hexdigest()
    try:
        key.verify(raw, _CONTEXT + digest.encode())
    except InvalidSignature:
        # the signature is the proof; its key_id and manifest_sha256 only say why it fails
        if sig.key_id != expected_id:
            raise SigningError(
                f"{SIGNATURE} names key {sig.key_id}, but {public_key} is key {expected_id}: wrong public key "
                f"(or {SIGNATURE} was altered)"
            ) from None
        if sig.manifest_sha256 != digest:
            raise SigningError(f"{MANIFEST} changed after it was signed (or {SIGNATURE} was altered)") from None
        raise SigningError(f"the signature in {SIGNATURE} does not verify with {public_key} (altered)") from None
    if (sig.key_id, sig.manifest_sha256) != (expected_id, digest):
        raise SigningError(f"{SIGNATURE} was altered: its key_id or manifest_sha256 is not what was signed")
    return expected_id


def verify_engine_signature(engine_dir: Path, public_key: Path, where: Path | None = None) -> str:
    """verify_manifest on an engine directory's manifest.json and signature.json; errors name `where`
    (default: the directory). Returns the key id."""
    sig_path = engine_dir / SIGNATURE
    try:
        return verify_manifest(
            (engine_dir / MANIFEST).read_bytes(), sig_path.read_bytes() if sig_path.is_file() else None, public_key
        )
    except SigningError as exc:
        raise SigningError(f"{where or engine_dir}: {exc}") from None
    except OSError as exc:
        raise SigningError(f"{where or engine_dir}: cannot read {MANIFEST}: {exc.strerror}") from None


def key_id(public_pem: bytes) -> str:
    """The id of a public key (PEM): sha256 of its raw 32 bytes."""
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_pem_public_key(public_pem)
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()


def _load_public_key(path: Path) -> tuple[Ed25519PublicKey, str]:
    """The ed25519 public key in the PEM file `path`, and its id."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    pem = _read_key_file(path, "public key")
    try:
        key = serialization.load_pem_public_key(pem)
    except (ValueError, TypeError):
        raise SigningError(f"public key {path} is not a PEM public key (use the NAME.pub keygen wrote)") from None
    if not isinstance(key, Ed25519PublicKey):
        raise SigningError(f"public key {path} is not an ed25519 key (use the NAME.pub keygen wrote)")
    return key, key_id(pem)


def _read_key_file(path: Path, what: str) -> bytes:
    try:
        if path.stat().st_size > _MAX_FILE_BYTES:
            raise SigningError(f"{what} {path} is too large to be a key file")
        return path.read_bytes()
    except OSError as exc:
        raise SigningError(f"cannot read {what} {path}: {exc.strerror}") from None


def _write_new(path: Path, data: bytes, mode: int) -> None:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    except FileExistsError:
        raise SigningError(f"{path} already exists; keygen never overwrites a key") from None
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, mode)  # the umask may have removed bits from `mode`
