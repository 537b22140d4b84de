"""Atomic writes of attn_temp.files: the previous file survives a failure, and results get ordinary modes."""

import os

import pytest

from attn_temp.files import atomic_path, ordinary_file_mode, restore_ordinary_modes, write_text_atomic


@pytest.fixture
def umask_022():
    previous = os.umask(0o022)
    yield
    os.umask(previous)


def test_write_replaces_content(tmp_path, umask_022):
    target = tmp_path / "card.md"
    target.write_text("old")
    write_text_atomic(target, "new")
    assert target.read_text() == "new"
    assert target.stat().st_mode & 0o777 == 0o644
    assert [path.name for path in tmp_path.iterdir()] == ["card.md"]


def test_failure_keeps_previous_file(tmp_path):
    target = tmp_path / "metrics.json"
    target.write_text("finished run")
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_path(target) as temporary:
            temporary.write_text("half of the new ")
            raise RuntimeError("disk full")
    assert target.read_text() == "finished run"
    assert [path.name for path in tmp_path.iterdir()] == ["metrics.json"]


def test_restore_modes_follows_umask(tmp_path):
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"\0")
    os.chmod(weights, 0o600)
    previous = os.umask(0o027)
    try:
        assert ordinary_file_mode() == 0o640
        restore_ordinary_modes([weights])
    finally:
        os.umask(previous)
    assert weights.stat().st_mode & 0o777 == 0o640
