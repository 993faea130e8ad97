"""The repository stands alone: nothing in it reads or names a path outside it, and the tests that
need protocol data pass from a copy placed where no sibling folders exist."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT

# Paths that point out of the repository: a parent-folder hop into a sibling, or an absolute path
# into this workplace's folders.
# Also citations of documents that live outside it (the project's own docs/ say it in its own words).
OUTSIDE = re.compile(r"\.\./shared|parents\[[2-9]\]|/work/|SPEC §|LESSONS\.md|ARCHITECTURE\.md")


def _repo_files() -> list[str]:
    """Tracked files plus untracked ones git does not ignore: what a clone of the work tree holds."""
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
                            cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return [name for name in listed.split("\0") if name and (ROOT / name).is_file()]


def test_no_file_names_a_path_outside_the_repository():
    offenders = []
    for name in _repo_files():
        try:
            text = (ROOT / name).read_text()
        except (UnicodeDecodeError, OSError):
            continue  # binary files carry no paths we write
        offenders += [f"{name}:{i}: {line.strip()}" for i, line in enumerate(text.splitlines(), 1)
                      if OUTSIDE.search(line) and name != "tests/test_standalone.py"]
    assert offenders == [], "paths outside the repository:\n" + "\n".join(offenders)


def test_artgan_test_passes_from_an_isolated_copy(tmp_path):
    """Copy the work tree into a folder with no siblings and run the ArtGAN protocol test there."""
    copy = tmp_path / "alone" / "crnn-art"
    for name in _repo_files():
        target = copy / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, target)
    assert sorted(p.name for p in copy.parent.iterdir()) == ["crnn-art"]
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env["PYTHONPATH"] = str(copy)  # the copy's package, not the editable install of this checkout
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--basetemp={tmp_path / 'inner'}",
         "tests/data/test_sources.py::test_artgan_protocol_uses_its_lists_and_class_order",
         "-o", "addopts=", "--override-ini=tmp_path_retention_policy=none"],
        cwd=copy, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "1 passed" in result.stdout
    check = subprocess.run([sys.executable, "-c", "import crnn_art; print(crnn_art.__file__)"],
                           cwd=copy, env=env, capture_output=True, text=True, check=True)
    assert Path(check.stdout.strip()).is_relative_to(copy)
