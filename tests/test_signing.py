"""Engine signatures: key files as keygen writes them, and every wrong key, missing or altered signature
and changed manifest refused with its reason."""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from llmbuild.errors import SigningError
from llmbuild.manifest import MANIFEST, SIGNATURE
from llmbuild.signing import (
    Signature,
    generate_key,
    public_key_path,
    sign_manifest,
    verify_engine_signature,
    verify_manifest,
)

MANIFEST_BYTES = b'{"name": "engine", "files": {}}\n'


@pytest.fixture
def key(tmp_path: Path) -> Path:
    generate_key(tmp_path / "key")
    return tmp_path / "key"


def test_keygen_writes_a_private_key_only_its_owner_reads_and_a_public_key(tmp_path):
    key_id = generate_key(tmp_path / "release")
    private, public = tmp_path / "release", tmp_path / "release.pub"
    assert public_key_path(private) == public
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert private.read_text().startswith("-----BEGIN PRIVATE KEY-----")
    assert public.read_text().startswith("-----BEGIN PUBLIC KEY-----")
    assert len(key_id) == 64 and sign_manifest(MANIFEST_BYTES, private).key_id == key_id
    assert generate_key(tmp_path / "other") != key_id


@pytest.mark.parametrize("existing", ["key", "key.pub"])
def test_keygen_never_overwrites(tmp_path, existing):
    (tmp_path / existing).write_text("precious")
    with pytest.raises(SigningError, match=f"{existing} already exists; keygen never overwrites"):
        generate_key(tmp_path / "key")
    assert (tmp_path / existing).read_text() == "precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == [existing]


def test_signature_verifies_with_its_key_and_is_deterministic(key):
    sig = sign_manifest(MANIFEST_BYTES, key)
    assert sig.algorithm == "ed25519" and sig.manifest_sha256 == hashlib.sha256(MANIFEST_BYTES).hexdigest()
    assert sign_manifest(MANIFEST_BYTES, key) == sig  # ed25519 is deterministic: so are signed archives
    assert verify_manifest(MANIFEST_BYTES, sig.to_bytes(), public_key_path(key)) == sig.key_id


def test_wrong_key_missing_or_altered_signature_and_changed_manifest_are_refused(key, tmp_path):
    generate_key(tmp_path / "other")
    sig = sign_manifest(MANIFEST_BYTES, key)
    pub = public_key_path(key)
    cases = [
        (MANIFEST_BYTES, sig.to_bytes(), tmp_path / "other.pub", "wrong public key"),
        (MANIFEST_BYTES, None, pub, "unsigned: no signature.json (sign it with llmbuild pack --sign-key)"),
        (
            MANIFEST_BYTES.replace(b"engine", b"engin3"),
            sig.to_bytes(),
            pub,
            "manifest.json changed after it was signed",
        ),
        (MANIFEST_BYTES, b"{not json", pub, "signature.json is corrupt"),
    ]
    raw = bytearray(base64.b64decode(sig.signature))
    raw[5] ^= 0x01
    altered = sig.model_copy(update={"signature": base64.b64encode(bytes(raw)).decode()})
    cases.append((MANIFEST_BYTES, altered.to_bytes(), pub, "does not verify with"))
    renamed = sig.model_copy(update={"key_id": "0" * 64})  # a valid signature, its key id altered
    cases.append((MANIFEST_BYTES, renamed.to_bytes(), pub, "signature.json was altered: its key_id"))
    for manifest, signature, public, reason in cases:
        with pytest.raises(SigningError) as exc:
            verify_manifest(manifest, signature, public)
        assert reason in str(exc.value) and "\n" not in str(exc.value)


def test_bad_key_files_are_named(key, tmp_path):
    with pytest.raises(SigningError, match="is not a PEM public key"):
        verify_manifest(MANIFEST_BYTES, None, key)  # the private half given as the public key
    with pytest.raises(SigningError, match="cannot read public key .*missing.pub"):
        verify_manifest(MANIFEST_BYTES, None, tmp_path / "missing.pub")
    with pytest.raises(SigningError, match="is not an unencrypted PEM private key"):
        sign_manifest(MANIFEST_BYTES, public_key_path(key))


def test_engine_signature_reads_the_engine_directory(engine_copy, key):
    pub = public_key_path(key)
    with pytest.raises(SigningError, match=f"{engine_copy}: unsigned"):
        verify_engine_signature(engine_copy, pub)
    (engine_copy / SIGNATURE).write_bytes(sign_manifest((engine_copy / MANIFEST).read_bytes(), key).to_bytes())
    assert Signature.model_validate_json((engine_copy / SIGNATURE).read_bytes()).key_id == verify_engine_signature(
        engine_copy, pub
    )


@pytest.mark.skipif(shutil.which("openssl") is None, reason="no openssl")
def test_openssl_verifies_a_signature_as_the_module_docstring_says(key, tmp_path):
    sig = sign_manifest(MANIFEST_BYTES, key)
    message = b"llmbuild-engine-manifest-v1 " + hashlib.sha256(MANIFEST_BYTES).hexdigest().encode()
    (tmp_path / "msg").write_bytes(message)
    (tmp_path / "sig").write_bytes(base64.b64decode(json.loads(sig.to_bytes())["signature"]))
    cmd = ["openssl", "pkeyutl", "-verify", "-pubin", "-inkey", str(public_key_path(key)), "-rawin"]
    result = subprocess.run(
        [*cmd, "-in", str(tmp_path / "msg"), "-sigfile", str(tmp_path / "sig")], capture_output=True
    )
    assert result.returncode == 0 and b"Signature Verified Successfully" in result.stdout, result.stderr
