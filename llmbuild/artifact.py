"""Engine archives: one deterministic tar file holding an engine's sealed files, and its safe unpacking.

Layout: no top directory; members are the engine's own relative paths, `manifest.json` first, then
`signature.json` when signed (signing.py), then every file the manifest seals in sorted order.
`report.json` stays out: it is not sealed and holds build timestamps and build-machine paths.
Every member is a regular file with mtime 0, owner 0:0 without names and mode 0644 (no directory
entries); the format is POSIX pax; `compress` wraps it in gzip with mtime 0 and no file name. So the
same engine gives the same bytes wherever its directory is.

Unpacking trusts nothing in the archive: the manifest must come first, every later member must be a
regular file at a safe relative path that the manifest lists (or the signature), each one's sha256
must match the manifest, and none may be missing. It writes into a hidden sibling directory renamed
into place at the end, so a refused or interrupted unpack leaves nothing behind.
"""

from __future__ import annotations

import gzip
import io
import os
import shutil
import tarfile
import tempfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from llmbuild.errors import EngineError
from llmbuild.manifest import MANIFEST, SIGNATURE, Manifest, verify_files
from llmbuild.signing import sign_manifest

_CHUNK = 1 << 22
_MAX_METADATA_BYTES = 64 << 20
"""The largest manifest.json or signature.json unpack reads into memory."""


def pack(engine_dir: Path, out: Path, sign_key: Path | None = None, compress: bool = False) -> list[str]:
    """Write engine_dir's manifest, signature and sealed files to the archive `out` (atomically).

    The engine is verified first: a tampered engine is not packed. With `sign_key` (an ed25519 private
    key file) the archive carries a new signature.json over the manifest, else the engine's own if it
    has one. Returns the member names in archive order.
    """
    manifest = Manifest.load(engine_dir)
    verify_files(engine_dir, manifest)
    if out.is_dir():
        raise EngineError(f"output {out} is a directory; give -o a file name such as engine.tar")
    if out.resolve().is_relative_to(engine_dir.resolve()):
        raise EngineError(f"output {out} is inside the engine {engine_dir}; write the archive elsewhere")
    metadata = {MANIFEST: (engine_dir / MANIFEST).read_bytes()}
    if sign_key is not None:
        metadata[SIGNATURE] = sign_manifest(metadata[MANIFEST], sign_key).to_bytes()
    elif (engine_dir / SIGNATURE).is_file():
        metadata[SIGNATURE] = (engine_dir / SIGNATURE).read_bytes()
    members = [*metadata, *sorted(manifest.files)]
    out.parent.mkdir(parents=True, exist_ok=True)
    with _atomic_file(out) as raw:
        if compress:
            with gzip.GzipFile(filename="", mode="wb", compresslevel=6, fileobj=raw, mtime=0) as gz:
                _write_members(gz, engine_dir, metadata, members)
        else:
            _write_members(raw, engine_dir, metadata, members)
    return members


def _write_members(
    fileobj: IO[bytes] | gzip.GzipFile, engine_dir: Path, metadata: dict[str, bytes], members: list[str]
) -> None:
    """The tar stream: `metadata` (name -> bytes) from memory, the other members from engine_dir."""
    with tarfile.open(fileobj=fileobj, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        for name in members:
            if name in metadata:
                tar.addfile(_member(name, len(metadata[name])), io.BytesIO(metadata[name]))
                continue
            with open(engine_dir / name, "rb") as f:
                tar.addfile(_member(name, os.fstat(f.fileno()).st_size), f)


def unpack(archive: Path, out_dir: Path) -> Manifest:
    """Restore the engine in `archive` to out_dir (which must not exist, or be empty); return its manifest.

    Raises EngineError naming the first problem: not an archive, corrupt or truncated, an unsafe or
    unlisted member, a file whose sha256 differs from the manifest's, a listed file missing.
    """
    if not archive.is_file():
        raise EngineError(f"archive not found: {archive}")
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise EngineError(f"output {out_dir} exists and is not an empty directory; choose another -o or remove it")
    target = out_dir.resolve()  # `-o .` has no name to put a sibling staging directory beside
    target.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{target.name}.unpack-", dir=target.parent))
    try:
        manifest = _extract(archive, stage)
        for path in stage.rglob("*"):
            path.chmod(0o755 if path.is_dir() else 0o644)
        stage.chmod(0o755)
        if target.exists():
            target.rmdir()
        os.rename(stage, target)
        return manifest
    finally:
        if stage.exists():
            shutil.rmtree(stage, ignore_errors=True)


def _extract(archive: Path, stage: Path) -> Manifest:
    """Read the archive member by member into `stage`, checking each name against the manifest (the
    first member), then every file against its sha256 as an engine is checked."""
    manifest: Manifest | None = None
    seen: set[str] = set()
    try:
        with tarfile.open(archive, mode="r:*") as tar:
            for member in tar:
                name = _checked_name(archive, member, manifest, seen)
                src = tar.extractfile(member)
                assert src is not None  # a regular file, checked above
                if manifest is None:
                    (stage / MANIFEST).write_bytes(_read_small(archive, src, member))
                    with _errors_naming(archive, stage):
                        manifest = Manifest.load(stage)
                    _check_listed_names(archive, manifest)
                elif name == SIGNATURE:
                    (stage / SIGNATURE).write_bytes(_read_small(archive, src, member))
                else:
                    (stage / name).parent.mkdir(parents=True, exist_ok=True)
                    with open(stage / name, "xb") as f:
                        shutil.copyfileobj(src, f, _CHUNK)
                seen.add(name)
            _check_end(archive, tar)
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as exc:
        # tarfile's "r:*" explains a failed open on several lines, one per compression it tried
        detail = "not a tar archive" if str(exc).startswith("file could not be opened") else str(exc)
        raise EngineError(f"{archive}: corrupt or truncated archive ({detail})") from None
    except OSError as exc:
        raise EngineError(f"{archive}: cannot unpack ({exc.strerror or exc})") from None
    if manifest is None:
        raise EngineError(f"{archive}: empty archive, not an llmbuild engine")
    with _errors_naming(archive, stage):
        verify_files(stage, manifest)
    return manifest


def _checked_name(archive: Path, member: tarfile.TarInfo, manifest: Manifest | None, seen: set[str]) -> str:
    """The member's name if it is a safe, expected regular file; else the one-line refusal."""
    name = member.name
    if not _safe_relative(name):
        raise EngineError(f"{archive}: unsafe member path {name!r} (absolute or with '..'); refusing to unpack")
    if not member.isreg():
        kind = "link" if member.issym() or member.islnk() else "directory" if member.isdir() else "special file"
        raise EngineError(f"{archive}: member {name} is a {kind}; engine archives hold regular files only")
    if manifest is None:
        if name != MANIFEST:
            raise EngineError(f"{archive}: first member is {name}, not {MANIFEST}: not an llmbuild engine archive")
        return name
    if name in seen:
        raise EngineError(f"{archive}: member {name} appears twice; refusing to unpack")
    if name != SIGNATURE and name not in manifest.files:
        raise EngineError(f"{archive}: member {name} is not listed in the manifest; refusing to unpack")
    return name


def _check_end(archive: Path, tar: tarfile.TarFile) -> None:
    """After the last member only zero padding may follow; reading to the end also checks gzip's CRC."""
    assert tar.fileobj is not None
    while block := tar.fileobj.read(_CHUNK):
        if block.strip(b"\0"):
            raise EngineError(f"{archive}: data after the end of the archive; refusing to unpack")


def _check_listed_names(archive: Path, manifest: Manifest) -> None:
    """The manifest comes from the archive too: its paths must be as safe as the members'."""
    for name in manifest.files:
        if not _safe_relative(name) or name in (MANIFEST, SIGNATURE):
            raise EngineError(f"{archive}: the manifest lists an unsafe path {name!r}; refusing to unpack")


def _safe_relative(name: str) -> bool:
    parts = name.split("/")
    return bool(name) and "\\" not in name and "\0" not in name and all(p not in ("", ".", "..") for p in parts)


@contextmanager
def _errors_naming(archive: Path, stage: Path) -> Iterator[None]:
    """Engine errors about the staged copy (manifest.py's checks) name the archive instead."""
    try:
        yield
    except EngineError as exc:
        raise EngineError(str(exc).replace(str(stage), str(archive))) from None


def _read_small(archive: Path, src: IO[bytes], member: tarfile.TarInfo) -> bytes:
    if member.size > _MAX_METADATA_BYTES:
        raise EngineError(f"{archive}: {member.name} is {member.size} bytes, too large; refusing to unpack")
    return src.read()


def _member(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


@contextmanager
def _atomic_file(out: Path) -> Iterator[IO[bytes]]:
    """A new file next to `out` that replaces it only when the block completes."""
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
        os.chmod(tmp, 0o644)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
