"""`llmbuild keygen`, `pack`, `unpack`, `verify --public-key` and `serve --public-key` end to end, and each
refusal as one line with a non-zero exit."""

from __future__ import annotations

import io
import json
import stat
import tarfile
from pathlib import Path

import pytest

from tests.helpers import run_cli


def _fails(result: tuple[int, str, str], *fragments: str) -> str:
    """The command failed with exactly one `error:` line on stderr, holding every fragment."""
    code, _, err = result
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 1 and len(lines) == 1 and lines[0].startswith("error: "), err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def _flip(path: Path, offset: int = 100) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def _change_signature(path: Path) -> None:
    """Change one base64 character of the signature to another valid one (a flipped bit could leave base64)."""
    data = bytearray(path.read_bytes())
    offset = data.find(b'"signature": "') + 20
    data[offset] = ord("B") if data[offset] == ord("A") else ord("A")
    path.write_bytes(bytes(data))


@pytest.fixture
def signed(capsys, llama_engine, tmp_path) -> tuple[Path, Path]:
    """(archive, public key): the tiny engine packed, compressed and signed with a fresh key."""
    assert run_cli(capsys, "keygen", "-o", str(tmp_path / "release"))[0] == 0
    archive = tmp_path / "engine.tar.gz"
    code, out, err = run_cli(
        capsys, "pack", str(llama_engine), "-o", str(archive), "--sign-key", str(tmp_path / "release"), "--compress"
    )
    assert code == 0 and "manifest.json + signature.json + " in out and out.rstrip().endswith(", signed"), err
    return archive, tmp_path / "release.pub"


def test_keygen_pack_unpack_verify(capsys, signed, llama_engine, tmp_path):
    archive, pub = signed
    assert stat.S_IMODE((tmp_path / "release").stat().st_mode) == 0o600
    code, out, err = run_cli(capsys, "unpack", str(archive), "-o", str(tmp_path / "engine"))
    assert code == 0 and "files match their sha256" in out, err
    assert json.loads((tmp_path / "engine" / "signature.json").read_text())["algorithm"] == "ed25519"
    code, out, err = run_cli(capsys, "verify", str(tmp_path / "engine"), "--public-key", str(pub))
    assert code == 0 and "signs the manifest" in out and "smoke generation: 8 tokens" in out, err
    code, out, err = run_cli(capsys, "verify", str(archive), "--public-key", str(pub), "--no-smoke")
    assert code == 0 and "archive unpacks" in out and "signs the manifest" in out, err
    # packing the unpacked engine again keeps its signature: the same archive, byte for byte
    assert run_cli(capsys, "pack", str(tmp_path / "engine"), "-o", str(tmp_path / "again.tgz"), "--compress")[0] == 0
    assert (tmp_path / "again.tgz").read_bytes() == archive.read_bytes()


def test_verify_refuses_a_wrong_key_and_a_missing_signature(capsys, signed, llama_engine, tmp_path):
    archive, _ = signed
    run_cli(capsys, "keygen", "-o", str(tmp_path / "other"))
    wrong = ("--public-key", str(tmp_path / "other.pub"), "--no-smoke")
    _fails(run_cli(capsys, "verify", str(archive), *wrong), str(archive), "wrong public key")
    _fails(run_cli(capsys, "verify", str(llama_engine), *wrong), "unsigned: no signature.json")
    run_cli(capsys, "pack", str(llama_engine), "-o", str(tmp_path / "unsigned.tar"))
    _fails(run_cli(capsys, "verify", str(tmp_path / "unsigned.tar"), *wrong), "unsigned")


@pytest.mark.parametrize(
    "changed, reason",
    [
        ("rank0/weights.safetensors", "rank0/weights.safetensors does not match its sha256"),
        ("manifest.json", "manifest.json changed after it was signed"),
        ("signature.json", "the signature in signature.json does not verify"),
    ],
)
def test_verify_refuses_any_changed_byte(capsys, signed, tmp_path, changed, reason):
    archive, pub = signed
    run_cli(capsys, "unpack", str(archive), "-o", str(tmp_path / "engine"))
    path = tmp_path / "engine" / changed
    if changed == "signature.json":
        _change_signature(path)
    else:
        _flip(path)
    _fails(run_cli(capsys, "verify", str(tmp_path / "engine"), "--public-key", str(pub), "--no-smoke"), reason)


def test_verify_and_unpack_refuse_a_changed_or_truncated_archive(capsys, signed, tmp_path):
    archive, pub = signed
    whole = archive.read_bytes()
    archive.write_bytes(whole[: len(whole) // 2])
    _fails(run_cli(capsys, "verify", str(archive), "--public-key", str(pub)), "corrupt or truncated archive")
    _fails(run_cli(capsys, "unpack", str(archive), "-o", str(tmp_path / "out")), "corrupt or truncated archive")
    archive.write_bytes(whole[:-100] + bytes([whole[-100] ^ 1]) + whole[-99:])
    _fails(run_cli(capsys, "unpack", str(archive), "-o", str(tmp_path / "out")), str(archive))
    assert not (tmp_path / "out").exists()


def test_unpack_refuses_unsafe_and_unlisted_members(capsys, llama_engine, tmp_path):
    cases = {"evil.tar": "../evil", "abs.tar": "/tmp/evil", "link.tar": "tokenizer/link", "extra.tar": "extra.txt"}
    for archive, name in cases.items():
        with tarfile.open(tmp_path / archive, "w") as tar:
            tar.add(llama_engine / "manifest.json", arcname="manifest.json")
            info = tarfile.TarInfo(name)
            if name == "tokenizer/link":
                info.type, info.linkname = tarfile.SYMTYPE, "../../../etc/passwd"
            tar.addfile(info, None if info.issym() else io.BytesIO(b""))
    out = str(tmp_path / "out")
    _fails(run_cli(capsys, "unpack", str(tmp_path / "evil.tar"), "-o", out), "unsafe member path '../evil'")
    _fails(run_cli(capsys, "unpack", str(tmp_path / "abs.tar"), "-o", out), "unsafe member path '/tmp/evil'")
    _fails(run_cli(capsys, "unpack", str(tmp_path / "link.tar"), "-o", out), "tokenizer/link is a link")
    _fails(run_cli(capsys, "unpack", str(tmp_path / "extra.tar"), "-o", out), "extra.txt is not listed in the manifest")
    assert not (tmp_path / "out").exists() and not (tmp_path.parent / "evil").exists()


def test_keygen_and_unpack_never_overwrite(capsys, signed, tmp_path):
    archive, _ = signed
    before = (tmp_path / "release").read_bytes()
    _fails(run_cli(capsys, "keygen", "-o", str(tmp_path / "release")), "already exists; keygen never overwrites")
    assert (tmp_path / "release").read_bytes() == before
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "file").write_text("mine")
    _fails(run_cli(capsys, "unpack", str(archive), "-o", str(tmp_path / "busy")), "is not an empty directory")
    assert sorted(p.name for p in (tmp_path / "busy").iterdir()) == ["file"]


def test_pack_refuses_a_bad_key_and_a_bad_output(capsys, llama_engine, tmp_path):
    (tmp_path / "nokey").write_text("not a key")
    out = str(tmp_path / "engine.tar")
    _fails(run_cli(capsys, "pack", str(llama_engine), "-o", out, "--sign-key", str(tmp_path / "nokey")), "nokey")
    _fails(run_cli(capsys, "pack", str(llama_engine), "-o", str(llama_engine / "x.tar")), "inside the engine")
    _fails(run_cli(capsys, "pack", str(tmp_path / "none"), "-o", out), "engine directory not found")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nokey"]


def test_serve_refuses_an_engine_that_does_not_verify(capsys, signed, tmp_path):
    archive, pub = signed
    engine = tmp_path / "engine"
    run_cli(capsys, "unpack", str(archive), "-o", str(engine))
    run_cli(capsys, "keygen", "-o", str(tmp_path / "other"))
    # changed weights under a valid signature: loading checks them against the signed manifest
    _flip(engine / "rank0" / "weights.safetensors", 500)
    _fails(run_cli(capsys, "serve", str(engine), "--public-key", str(pub), "--port", "0"), "does not match its sha256")
    # the signature is checked before loading: a wrong key is reported, not the changed weights
    wrong = run_cli(capsys, "serve", str(engine), "--public-key", str(tmp_path / "other.pub"), "--port", "0")
    _fails(wrong, "wrong public key")
    (engine / "signature.json").unlink()
    _fails(run_cli(capsys, "serve", str(engine), "--public-key", str(pub), "--port", "0"), "unsigned")
