"""Checkpoint files: atomic writes, a manifest with a checksum, verified safe loading, rotation,
and the random-number-generator state a resumable checkpoint carries.

Layout of a run's checkpoint folder (``<output_dir>/<run_id>/``)::

    last.pt    last.json      the latest resumable state (end of an epoch, or the batch an interrupt stopped at)
    best.pt    best.json      the epoch with the best validation robust accuracy
    epoch_003.pt  epoch_003.json   per-epoch copies, the --keep-last N most recent (none by default)

A ``.pt`` file is a plain ``torch.save`` of the trainer's ``state_dict()`` (tensors, numbers,
strings, lists and dicts only), read back with ``torch.load(weights_only=True)``: loading a
checkpoint never runs code. Its manifest (``<name>.json`` beside it) records the file's size and
SHA-256, the epoch, the epoch's metrics, the run configuration and the package version; when a
manifest is present, loading checks size and checksum first, so a truncated or modified file is
reported as such instead of being half-read.

Writes are atomic: payload and manifest are written to temporary files in the same folder,
flushed and fsynced, and only then renamed over the old ones (payload first). A failure (disk
full, ...) while writing removes the temporary files and leaves the previous checkpoint and its
manifest untouched; the only window in which the pair is inconsistent is between the two renames.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import io
import json
import os
import random
import re
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch

from art_reat.errors import CheckpointWriteError, DataError, UsageError

MANIFEST_FORMAT = 1
EPOCH_FILE = re.compile(r"^epoch_(\d+)\.pt$")


def manifest_path(path: str | Path) -> Path:
    """``last.pt`` -> ``last.json`` (same folder)."""
    path = Path(path)
    return path.with_name(path.stem + ".json")


def package_version() -> str:
    try:
        from importlib.metadata import version

        return version("art-reat")
    except Exception:
        return "unknown"


def serialize(state: dict, path: Optional[str | Path] = None) -> bytes:
    """The bytes of ``torch.save(state)`` (one serialisation, written to several files). An
    `OSError` (e.g. no memory or space for torch's buffers) is a `CheckpointWriteError` naming ``path``."""
    buffer = io.BytesIO()
    try:
        torch.save(state, buffer)
    except OSError as exc:
        raise CheckpointWriteError(f"cannot write checkpoint {str(path or 'file')!r}: {exc.strerror or exc}; "
                                   f"the previous checkpoint files are intact") from None
    return buffer.getvalue()


def _write_tmp(path: Path, data: bytes) -> Path:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
    except BaseException:
        _remove(tmp)
        raise
    return tmp


def _remove(path: Path) -> None:
    try:
        os.remove(path)
    except OSError:
        pass


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_checkpoint(payload: bytes | dict, path: str | Path, manifest: Optional[dict] = None) -> dict:
    """Write ``payload`` (bytes of ``serialize(state)``, or the state itself) to ``path`` atomically,
    with its manifest ``<name>.json``; return the manifest. Raises `CheckpointWriteError` (one line
    naming the file) when the disk is full or the folder unwritable; the old files stay intact."""
    path = Path(path)
    data = payload if isinstance(payload, (bytes, bytearray)) else serialize(payload, path)
    info = dict(manifest or {})
    info.update(format=MANIFEST_FORMAT, file=path.name, bytes=len(data), sha256=hashlib.sha256(data).hexdigest(),
                package_version=package_version(),
                written_at=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    text = json.dumps(info, indent=2, sort_keys=True, default=_json_default).encode() + b"\n"
    tmps: List[Path] = []
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmps.append(_write_tmp(path, bytes(data)))
        tmps.append(_write_tmp(manifest_path(path), text))
        os.replace(tmps[0], path)
        os.replace(tmps[1], manifest_path(path))
        tmps.clear()
        _fsync_dir(path.parent)
    except OSError as exc:
        raise CheckpointWriteError(f"cannot write checkpoint {str(path)!r}: {exc.strerror or exc}; "
                                   f"the previous checkpoint files are intact") from None
    finally:
        for tmp in tmps:
            _remove(tmp)
    return info


def _json_default(value):
    if isinstance(value, (np.generic,)):
        return value.item()
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    return str(value)


def read_manifest(path: str | Path) -> Optional[dict]:
    """The manifest beside checkpoint ``path`` (None when there is none)."""
    mpath = manifest_path(path)
    if not mpath.is_file():
        return None
    try:
        manifest = json.loads(mpath.read_text())
    except (OSError, ValueError) as exc:
        raise DataError(f"checkpoint manifest {str(mpath)!r} cannot be read: {str(exc).splitlines()[0][:200]}") from None
    if not isinstance(manifest, dict) or "sha256" not in manifest or "bytes" not in manifest:
        raise DataError(f"checkpoint manifest {str(mpath)!r} is not an art-reat manifest (no sha256/bytes)")
    return manifest


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_checkpoint(path: str | Path) -> Optional[dict]:
    """Check size and SHA-256 of ``path`` against its manifest; return the manifest (None if absent)."""
    path = Path(path)
    manifest = read_manifest(path)
    if manifest is None:
        return None
    size = path.stat().st_size
    if size != int(manifest["bytes"]):
        problem = "truncated" if size < int(manifest["bytes"]) else "longer than written"
        raise DataError(f"checkpoint {str(path)!r} is {problem}: {size} bytes, its manifest "
                        f"{manifest_path(path).name} says {manifest['bytes']}")
    digest = _sha256(path)
    if digest != manifest["sha256"]:
        raise DataError(f"checkpoint {str(path)!r} fails its checksum (sha256 {digest[:16]}..., manifest "
                        f"{manifest_path(path).name} says {str(manifest['sha256'])[:16]}...): it was modified or "
                        f"corrupted after it was written")
    return manifest


def load_checkpoint(path: str | Path, device: torch.device | str = "cpu", verify: bool = True) -> dict:
    """Read a training checkpoint safely: checksum (when a manifest is present), then
    ``torch.load(weights_only=True)``; every problem is a one-line `DataError` naming the file."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"checkpoint {str(path)!r} does not exist")
    if verify:
        verify_checkpoint(path)
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception as exc:  # truncated, tampered, or not a torch file; never unpickles code
        raise DataError(f"checkpoint {str(path)!r} {describe_load_error(exc)}") from None
    if not isinstance(state, dict) or "model" not in state or "config" not in (state.get("meta") or {}):
        raise DataError(f"checkpoint {str(path)!r} is not an art-reat training checkpoint (no model/config inside)")
    return state


def describe_load_error(exc: BaseException) -> str:
    """One line for a failed ``torch.load(weights_only=True)`` (torch's own message is a paragraph)."""
    text = str(exc)
    boiler = ("Weights only load failed", "Please file an issue", "Check the documentation", "WeightsUnpickler error")
    details = [line.strip() for line in text.splitlines()
               if line.strip() and not line.strip().startswith(boiler)]
    detail = (details[0] if details else type(exc).__name__)[:200]
    if "GLOBAL" in detail or "global" in detail:
        return (f"is refused: it holds Python objects, not only tensors and plain data, and loading them could run "
                f"code ({detail})")
    return f"cannot be read (truncated, corrupt or not a torch checkpoint): {detail}"


def describe_state_dict_error(exc: BaseException) -> str:
    """One line for a failed ``load_state_dict`` (the first mismatches, not torch's multi-line list)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    body = [line for line in lines if not line.startswith("Error(s) in loading state_dict")] or lines
    text = "; ".join(body) if body else type(exc).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def epoch_checkpoints(folder: str | Path) -> List[Path]:
    """The per-epoch checkpoints ``epoch_XXX.pt`` of a folder, oldest first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := EPOCH_FILE.match(p.name))]
    return [p for _, p in sorted(found)]


def rotate_epoch_checkpoints(folder: str | Path, keep: int) -> List[Path]:
    """Delete all but the ``keep`` most recent ``epoch_XXX.pt`` (and manifests); return the deleted."""
    files = epoch_checkpoints(folder)
    drop = files[:max(0, len(files) - int(keep))]
    for path in drop:
        _remove(path)
        _remove(manifest_path(path))
    return drop


# ----------------------------------------------------------------------------- RNG state


def capture_rng_state() -> Dict[str, object]:
    """Global RNG states (torch CPU, CUDA when initialised, numpy, python `random`) as tensors and
    plain values, so that ``torch.load(weights_only=True)`` can read them back."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state: Dict[str, object] = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": str(kind), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": {"version": int(version), "state": torch.tensor(internal, dtype=torch.int64),
                   "gauss_next": gauss_next},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [s.cpu() for s in torch.cuda.get_rng_state_all()]
    return state


def restore_rng_state(state: Optional[dict]) -> None:
    """Inverse of `capture_rng_state` (missing parts are left as they are)."""
    if not state:
        return
    if "torch" in state:
        torch.set_rng_state(state["torch"].cpu().to(torch.uint8))
    if "numpy" in state:
        n = state["numpy"]
        keys = n["keys"].cpu().numpy().astype(np.uint32) if isinstance(n["keys"], torch.Tensor) else np.asarray(
            n["keys"], dtype=np.uint32)
        np.random.set_state((n["kind"], keys, int(n["pos"]), int(n["has_gauss"]), float(n["cached_gaussian"])))
    if "python" in state:
        p = state["python"]
        internal = tuple(int(v) for v in (p["state"].tolist() if isinstance(p["state"], torch.Tensor) else p["state"]))
        random.setstate((int(p["version"]), internal, p["gauss_next"]))
    if state.get("cuda") and torch.cuda.is_available():
        saved = [s.cpu().to(torch.uint8) for s in state["cuda"]]
        if len(saved) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(saved)


def derived_seed(*parts: int) -> int:
    """A 63-bit seed that is a pure function of ``parts`` (e.g. (seed, epoch) or (seed, epoch, batch))."""
    value = np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(2, np.uint32)
    return ((int(value[0]) << 32) | int(value[1])) >> 1


def seed_global_rngs(seed: int) -> None:
    """Seed python `random`, numpy and torch (CPU and CUDA) from one derived seed."""
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)


__all__ = ["EPOCH_FILE", "capture_rng_state", "derived_seed", "describe_load_error", "describe_state_dict_error", "epoch_checkpoints", "load_checkpoint", "manifest_path",
           "package_version", "read_manifest", "restore_rng_state", "rotate_epoch_checkpoints", "seed_global_rngs",
           "serialize", "verify_checkpoint", "write_checkpoint"]
