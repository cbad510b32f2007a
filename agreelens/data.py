"""Restore ``data/`` from the compressed copies committed in ``corpora/``.

``data/`` is DVC-tracked (``data.dvc``). A clone that reaches no DVC remote rebuilds it here,
byte-identical to what ``data.dvc`` records, so ``dvc status`` is clean and ``dvc repro`` works.
Existing corpus folders are never overwritten: text a user added stays.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tarfile
from pathlib import Path


def restore(root: str | Path = "data", archives: str | Path = "corpora") -> list[str]:
    """Extract every ``corpora/<name>.tar.xz`` whose ``data/<name>`` folder is absent."""
    root, archives = Path(root), Path(archives)
    found = sorted(archives.glob("*.tar.xz"))
    if not found:
        raise FileNotFoundError(f"{archives}: no *.tar.xz corpus archives; is this an agreelens checkout?")
    restored = []
    for archive in found:
        name = archive.name.removesuffix(".tar.xz")
        if (root / name).exists():
            continue
        with tarfile.open(archive) as tar:
            prefix = f"{root.name}/"
            members = [m for m in tar.getmembers() if m.name.startswith(prefix)]
            for m in members:
                m.name = m.name[len(prefix):]
                if not (m.isfile() or m.isdir()) or m.name.startswith("/") or ".." in Path(m.name).parts:
                    raise ValueError(f"{archive}: unsafe member {m.name!r} (only plain files inside {root.name}/)")
            if hasattr(tarfile, "data_filter"):  # Python >= 3.11.4 (Debian bookworm has 3.11.2)
                tar.extractall(root, members=members, filter="data")
            else:
                tar.extractall(root, members=members)
        restored.append(name)
    sources = archives / "SOURCES.md"
    if sources.is_file() and not (root / "SOURCES.md").exists():
        shutil.copyfile(sources, root / "SOURCES.md")
        restored.append("SOURCES.md")
    return restored


def cache(dvc_file: str | Path = "data.dvc") -> None:
    """Put restored ``data/`` into the DVC cache (``dvc status`` then shows it clean).

    ``data.dvc`` must come out unchanged: if the restored bytes differ from what it records, the
    committed archives and ``data.dvc`` are out of step, and that is an error, never a silent update.
    """
    dvc_file = Path(dvc_file)
    before = dvc_file.read_text()
    proc = subprocess.run([sys.executable, "-m", "dvc", "commit", "--force", "--quiet", str(dvc_file)],
                          capture_output=True, text=True)
    after = dvc_file.read_text()
    if after != before:
        dvc_file.write_text(before)
        raise RuntimeError(
            f"{dvc_file.parent / 'data'} restored from corpora/ does not match {dvc_file}; "
            "rebuild the archives or run `dvc add data` deliberately"
        )
    if proc.returncode != 0:
        raise RuntimeError(f"dvc commit {dvc_file} failed: {proc.stderr.strip() or proc.stdout.strip()}")
