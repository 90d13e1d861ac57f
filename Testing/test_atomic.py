"""AttentionSegLib.atomic: outputs appear whole or not at all, with the permissions of any new file."""

from __future__ import annotations

import os
import stat

import pytest

from AttentionSegLib.atomic import atomic_output, write_text_atomically


def test_a_written_file_gets_the_umask_permissions_not_mkstemps_0600(tmp_path):
    old = os.umask(0o022)
    try:
        path = write_text_atomically(tmp_path / "sub" / "results.json", "{}\n")
    finally:
        os.umask(old)
    assert path.read_text() == "{}\n"
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert [p.name for p in path.parent.iterdir()] == ["results.json"], "no temporary file left"


def test_a_failed_write_keeps_the_previous_file_and_leaves_nothing_else(tmp_path):
    path = tmp_path / "model.pt"
    path.write_bytes(b"previous")
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_output(path) as handle:
            handle.write(b"half")
            raise RuntimeError("disk full")
    assert path.read_bytes() == b"previous"
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]
