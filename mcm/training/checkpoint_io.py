"""``AtomicCheckpointIO``: checkpoints that are either the old file or the new one, never half of one.

Lightning's ``TorchCheckpointIO`` writes through an fsspec transaction whose temporary file
lives in the system temp directory (``tempfile.mkstemp()``); when that is another filesystem
than the checkpoint directory (local ``/tmp``, checkpoints on NFS or a mounted volume) the
commit is a copy into the final path, and a job killed during the copy leaves a truncated
``last.ckpt`` that the next ``--ckpt_path last`` cannot load.  Here the bytes go to
``<path>.tmp`` next to the target, are fsynced, and ``os.replace`` swaps them in (atomic on
POSIX within one filesystem).  Loading defaults to ``torch.load(weights_only=True)``: a
checkpoint can hold tensors and plain containers, never objects that run code when unpickled.

``mcm fit`` installs it unless the config names another ``CheckpointIO`` in ``trainer.plugins``.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Optional

import fsspec
import torch
from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.plugins.io import TorchCheckpointIO

TMP_SUFFIX = ".tmp"


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write ``path + ".tmp"``, fsync, ``os.replace``; load with ``weights_only=True`` unless told otherwise.

    Remote paths (``s3://`` ...) fall back to Lightning's writer: object stores publish an
    upload only when it completes.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Optional[Any] = None) -> None:
        fs, local = fsspec.core.url_to_fs(str(path))
        if storage_options is not None or not isinstance(fs, LocalFileSystem):
            return super().save_checkpoint(checkpoint, path, storage_options)
        target = Path(local)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(target.name + TMP_SUFFIX)
        try:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
        except BaseException:
            tmp.unlink(missing_ok=True)  # a failed write leaves the previous checkpoint as it was
            raise
        _fsync_dir(target.parent)  # the rename itself survives a power cut

    def load_checkpoint(self, path: _PATH, map_location: Optional[Callable] = lambda storage, loc: storage,
                        weights_only: Optional[bool] = None) -> dict[str, Any]:
        """Lightning's load; a truncated or corrupt file is named (a pickle payload still raises
        ``pickle.UnpicklingError``: ``weights_only`` refused it)."""
        try:
            return super().load_checkpoint(path, map_location, True if weights_only is None else weights_only)
        except (RuntimeError, EOFError, KeyError) as e:  # torch's zip reader on a cut file, random bytes
            raise ValueError(f"checkpoint '{path}' is not a readable torch checkpoint ({type(e).__name__}: "
                             f"{str(e).splitlines()[0] if str(e) else e!r}); the file may be truncated or corrupt. "
                             f"Resume from an earlier checkpoint (ckpt_path=...) or start again") from e


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # not supported on every platform / filesystem
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
