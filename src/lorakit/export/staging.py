"""A folder that appears complete or not at all: filled beside its place, then renamed into it.

A serving engine that watches a folder, or a user who stops the export halfway, must never see
half an adapter (a config without weights loads as something else or fails obscurely). Files
inside are written with :mod:`lorakit.io.atomic` as usual; the folder is published by one rename.
An earlier export in the same place is replaced (moved aside, the new one renamed in, the old one
removed); any other non-empty folder is refused before work starts (:func:`check_destination`).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from lorakit.errors import ConfigError
from lorakit.io.atomic import process_umask


def check_destination(out: Path, marker: str, source: Path) -> None:
    """Refuse ``out`` unless it is absent, an empty folder, or an earlier export (holds ``marker``)."""
    if out.resolve() == source.resolve() or source.resolve().is_relative_to(out.resolve()):
        raise ConfigError(f"--out {out} would replace the adapter being exported ({source}); choose another folder")
    if not out.exists():
        return
    if not out.is_dir():
        raise ConfigError(f"--out {out} is a file; give a folder for the exported adapter")
    if any(out.iterdir()) and not (out / marker).is_file():
        raise ConfigError(f"--out {out} holds other files; lorakit export replaces only an earlier export "
                          f"(a folder with {marker}); choose a new or empty folder")


@contextlib.contextmanager
def staged_folder(out: Path) -> Iterator[Path]:
    """Yield an empty folder beside ``out``; when the block ends normally it becomes ``out`` in one
    rename, and on any error it is removed and ``out`` is left as it was."""
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        yield staging
        os.chmod(staging, 0o777 & ~process_umask())  # mkdtemp makes it private; an adapter folder is not
        _publish(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # gone already once published


def _publish(staging: Path, out: Path) -> None:
    if not out.exists():
        staging.rename(out)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
    out.rename(old / out.name)
    try:
        staging.rename(out)
    except BaseException:
        (old / out.name).rename(out)  # put the earlier export back
        raise
    finally:
        if out.exists():
            shutil.rmtree(old, ignore_errors=True)
