"""Engine archives: deterministic bytes, a faithful round trip, and every unsafe or altered archive refused
with nothing left behind."""

from __future__ import annotations

import gzip
import io
import json
import os
import tarfile
from pathlib import Path

import pytest

from llmbuild.artifact import pack, unpack
from llmbuild.errors import EngineError
from llmbuild.manifest import MANIFEST, REPORT, Manifest, verify_files


def _write_tar(path: Path, members: list[tuple[tarfile.TarInfo, bytes]]) -> Path:
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            info.size = len(data) if info.isreg() else 0
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return path


def _file(name: str, data: bytes) -> tuple[tarfile.TarInfo, bytes]:
    return tarfile.TarInfo(name), data


def _link(name: str, target: str, kind: bytes) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info, b""


def _refused(archive: Path, out: Path, *fragments: str) -> str:
    """unpack must fail with one line naming the problem and leave nothing next to `out`."""
    before = sorted(out.parent.iterdir())
    with pytest.raises(EngineError) as exc:
        unpack(archive, out)
    message = str(exc.value)
    assert "\n" not in message and str(archive) in message
    for fragment in fragments:
        assert fragment in message, message
    assert sorted(out.parent.iterdir()) == before  # no engine, no staging directory
    return message


def test_same_engine_gives_the_same_bytes_wherever_it_lives(llama_engine, engine_copy, tmp_path):
    for path in engine_copy.rglob("*"):  # another directory, other times and permissions
        os.utime(path, (1_000_000, 1_000_000))
        path.chmod(0o700 if path.is_dir() else 0o600)
    (engine_copy / REPORT).write_text("{}")  # not sealed, not packed
    for compress in (False, True):
        first, again, copy = (tmp_path / f"{n}-{compress}.tar" for n in ("a", "b", "c"))
        pack(llama_engine, first, compress=compress)
        pack(llama_engine, again, compress=compress)
        pack(engine_copy, copy, compress=compress)
        assert first.read_bytes() == again.read_bytes() == copy.read_bytes()
    plain, packed = (tmp_path / "a-False.tar").read_bytes(), (tmp_path / "a-True.tar").read_bytes()
    assert packed[:2] == b"\x1f\x8b" and packed[4:8] == b"\0\0\0\0"  # gzip, mtime 0
    assert gzip.decompress(packed) == plain


def test_archive_holds_the_manifest_then_the_sealed_files_with_fixed_metadata(llama_engine, tmp_path):
    archive = tmp_path / "engine.tar"
    names = pack(llama_engine, archive)
    manifest = Manifest.load(llama_engine)
    assert names == [MANIFEST, *sorted(manifest.files)]
    with tarfile.open(archive) as tar:
        members = tar.getmembers()
    assert [m.name for m in members] == names and REPORT not in names
    for m in members:
        assert m.isreg() and (m.mtime, m.uid, m.gid, m.uname, m.gname, m.mode) == (0, 0, 0, "", "", 0o644)


def test_unpack_restores_an_engine_that_verifies(llama_engine, tmp_path):
    archive = tmp_path / "engine.tar.gz"
    pack(llama_engine, archive, compress=True)
    (tmp_path / "out").mkdir()  # an existing empty directory is fine
    manifest = unpack(archive, tmp_path / "out")
    verify_files(tmp_path / "out", manifest)
    for rel in [MANIFEST, *manifest.files]:
        assert (tmp_path / "out" / rel).read_bytes() == (llama_engine / rel).read_bytes()
    assert not (tmp_path / "out" / REPORT).exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["engine.tar.gz", "out"]


def test_pack_refuses_a_tampered_engine(engine_copy, tmp_path):
    weights = engine_copy / "rank0" / "weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + b"\0")
    with pytest.raises(EngineError, match="rank0/weights.safetensors does not match"):
        pack(engine_copy, tmp_path / "engine.tar")
    assert not (tmp_path / "engine.tar").exists()


@pytest.fixture
def manifest_member(llama_engine) -> tuple[tarfile.TarInfo, bytes]:
    return _file(MANIFEST, (llama_engine / MANIFEST).read_bytes())


@pytest.mark.parametrize(
    "member, fragment",
    [
        (_file("../evil", b"x"), "unsafe member path '../evil'"),
        (_file("tokenizer/../../evil", b"x"), "unsafe member path"),
        (_file("/etc/evil", b"x"), "unsafe member path '/etc/evil'"),
        (_link("tokenizer/evil", "/etc/passwd", tarfile.SYMTYPE), "tokenizer/evil is a link"),
        (_link("tokenizer/evil", "recipe.yaml", tarfile.LNKTYPE), "tokenizer/evil is a link"),
        (_link("dev", "", tarfile.CHRTYPE), "dev is a special file"),
        (_file("extra.txt", b"x"), "extra.txt is not listed in the manifest"),
        (_file(REPORT, b"{}"), f"{REPORT} is not listed in the manifest"),
    ],
)
def test_unpack_refuses_unsafe_or_unlisted_members(manifest_member, member, fragment, tmp_path):
    archive = _write_tar(tmp_path / "bad.tar", [manifest_member, member])
    _refused(archive, tmp_path / "out", fragment)


def test_unpack_refuses_an_unsafe_member_even_before_the_manifest(tmp_path):
    archive = _write_tar(tmp_path / "bad.tar", [_file("../evil", b"x")])
    _refused(archive, tmp_path / "out", "unsafe member path")


def test_unpack_refuses_a_manifest_listing_unsafe_paths(llama_engine, tmp_path):
    data = json.loads((llama_engine / MANIFEST).read_text())
    data["files"]["../evil"] = "0" * 64
    archive = _write_tar(tmp_path / "bad.tar", [_file(MANIFEST, json.dumps(data).encode())])
    _refused(archive, tmp_path / "out", "the manifest lists an unsafe path '../evil'")


def test_unpack_refuses_archives_that_are_not_engines(llama_engine, tmp_path):
    recipe = _file("recipe.yaml", (llama_engine / "recipe.yaml").read_bytes())
    _refused(_write_tar(tmp_path / "a.tar", [recipe]), tmp_path / "out", "first member is recipe.yaml")
    _refused(_write_tar(tmp_path / "b.tar", []), tmp_path / "out", "empty archive")
    (tmp_path / "c.tar").write_bytes(b"not a tar file" * 100)
    _refused(tmp_path / "c.tar", tmp_path / "out", "corrupt or truncated archive")


def test_unpack_refuses_a_changed_byte(llama_engine, tmp_path):
    archive = tmp_path / "engine.tar"
    pack(llama_engine, archive)
    with tarfile.open(archive) as tar:
        offset = tar.getmember("rank0/weights.safetensors").offset_data
    data = bytearray(archive.read_bytes())
    data[offset + 200] ^= 0x01
    archive.write_bytes(bytes(data))
    _refused(archive, tmp_path / "out", "rank0/weights.safetensors does not match its sha256")


def test_unpack_refuses_a_duplicate_member(llama_engine, manifest_member, tmp_path):
    recipe = (llama_engine / "recipe.yaml").read_bytes()
    archive = _write_tar(
        tmp_path / "bad.tar", [manifest_member, _file("recipe.yaml", recipe), _file("recipe.yaml", recipe)]
    )
    _refused(archive, tmp_path / "out", "recipe.yaml appears twice")


@pytest.mark.parametrize("compress", [False, True])
def test_unpack_refuses_truncated_and_corrupt_archives(llama_engine, compress, tmp_path):
    archive = tmp_path / "engine.tar"
    pack(llama_engine, archive, compress=compress)
    whole = archive.read_bytes()
    cuts = [len(whole) // 2, *([len(whole) - 1] if compress else [])]  # gzip: the trailer's CRC and size
    for cut in cuts:
        archive.write_bytes(whole[:cut])
        _refused(archive, tmp_path / "out", "corrupt or truncated archive")
    for position in (len(whole) // 3, len(whole) - 6):  # inside a member; the gzip trailer or tar padding
        corrupt = bytearray(whole)
        corrupt[position] ^= 0xFF
        archive.write_bytes(bytes(corrupt))
        _refused(archive, tmp_path / "out")


def test_unpack_refuses_data_after_the_end(llama_engine, tmp_path):
    archive = tmp_path / "engine.tar"
    pack(llama_engine, archive)
    archive.write_bytes(archive.read_bytes() + b"hidden")
    _refused(archive, tmp_path / "out", "data after the end of the archive")


def test_unpack_refuses_a_non_empty_output(llama_engine, tmp_path):
    archive = tmp_path / "engine.tar"
    pack(llama_engine, archive)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(EngineError, match="out exists and is not an empty directory; choose another -o"):
        unpack(archive, tmp_path / "out")
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"
