"""Writing a directory so that readers see the old one or the whole new one, never half of it."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def staged_directory(out_dir: Path) -> Iterator[Path]:
    """A fresh directory beside `out_dir` (same file system, so the final rename is atomic) for
    the block to fill. When the block ends normally it replaces `out_dir`; when it raises, it is
    removed and `out_dir` is left as it was."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        yield staging
        if out_dir.exists():
            shutil.rmtree(out_dir)
        staging.rename(out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


__all__ = ["staged_directory"]
