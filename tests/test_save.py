"""Atomic outputs: a crash or a full disk never leaves a file or folder that looks complete."""
import errno
import os

import pytest

from loku.errors import ConfigError
from loku.save import atomic_dir, atomic_write_json, atomic_write_text, check_output_dir


def test_atomic_write_replaces_whole_file(tmp_path):
    path = tmp_path / "r.json"
    atomic_write_json(path, {"a": 1})
    atomic_write_json(path, {"a": 2})
    assert path.read_text().strip().endswith("}") and '"a": 2' in path.read_text()
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]


def test_disk_full_while_writing_leaves_old_file_and_no_temp(tmp_path, monkeypatch):
    path = tmp_path / "report.md"
    atomic_write_text(path, "old complete report\n")

    def full(_fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError, match="No space"):
        atomic_write_text(path, "new report that never finishes")
    assert path.read_text() == "old complete report\n"
    assert [p.name for p in tmp_path.iterdir()] == ["report.md"]


def test_atomic_dir_crash_leaves_nothing(tmp_path):
    final = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with atomic_dir(final) as tmp:
            (tmp / "model.safetensors").write_bytes(b"half")
            raise RuntimeError("killed mid-save")
    assert not final.exists()
    assert list(tmp_path.iterdir()) == []


def test_atomic_dir_replaces_existing_folder_only_on_success(tmp_path):
    final = tmp_path / "out"
    with atomic_dir(final) as tmp:
        (tmp / "a").write_text("1")
    with pytest.raises(ValueError):
        with atomic_dir(final) as tmp:
            (tmp / "b").write_text("2")
            raise ValueError
    assert sorted(p.name for p in final.iterdir()) == ["a"]
    with atomic_dir(final) as tmp:
        (tmp / "b").write_text("2")
    assert sorted(p.name for p in final.iterdir()) == ["b"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_existing_output_folder_is_refused_unless_overwrite(tmp_path):
    check_output_dir(tmp_path / "new", overwrite=False)
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "report.json").write_text("{}")
    with pytest.raises(ConfigError, match="--overwrite"):
        check_output_dir(tmp_path / "used", overwrite=False)
    check_output_dir(tmp_path / "used", overwrite=True)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="not a folder"):
        check_output_dir(tmp_path / "file", overwrite=True)


def test_outputs_get_the_usual_permissions_not_the_private_temp_ones(tmp_path):
    umask = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "report.md", "x")
        with atomic_dir(tmp_path / "out") as tmp:
            (tmp / "a").write_text("1")
    finally:
        os.umask(umask)
    assert (tmp_path / "report.md").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o755
