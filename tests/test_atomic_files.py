"""Atomic writes (inlaid_ray/atomic_files.py): a reader sees the old version or the whole new one,
and nothing is left behind, also when the writer fails or two writers race on one path."""

from __future__ import annotations

import json
import threading

import pytest

from inlaid_ray.atomic_files import replacing_dir, write_bytes_atomic, write_json_atomic


def test_write_replaces_the_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "sub" / "a.json"
    write_json_atomic(path, {"b": 1, "a": [1, 2]})
    write_json_atomic(path, {"c": 3})
    assert json.loads(path.read_text()) == {"c": 3}
    assert path.read_text().endswith("\n")
    assert sorted(p.name for p in path.parent.iterdir()) == ["a.json"]


def test_racing_writers_leave_one_whole_version(tmp_path):
    path = tmp_path / "w.bin"
    payloads = [bytes([i]) * 200_000 for i in range(8)]
    threads = [threading.Thread(target=write_bytes_atomic, args=(path, p)) for p in payloads]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert path.read_bytes() in payloads
    assert [p.name for p in tmp_path.iterdir()] == ["w.bin"]


def test_replacing_dir_swaps_a_whole_directory(tmp_path):
    target = tmp_path / "bank"
    with replacing_dir(target) as build:
        (build / "one").write_text("1")
    with replacing_dir(target) as build:
        assert not (build / "one").exists()  # each build starts empty
        (build / "two").write_text("2")
    assert sorted(p.name for p in target.iterdir()) == ["two"]
    assert [p.name for p in tmp_path.iterdir()] == ["bank"]


def test_a_failed_build_keeps_the_old_directory(tmp_path):
    target = tmp_path / "bank"
    with replacing_dir(target) as build:
        (build / "old").write_text("kept")
    with pytest.raises(RuntimeError, match="writer failed"):
        with replacing_dir(target) as build:
            (build / "half").write_text("x")
            raise RuntimeError("writer failed")
    assert (target / "old").read_text() == "kept" and not (target / "half").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["bank"]


def test_racing_directory_writers_leave_one_whole_version_and_no_debris(tmp_path):
    target = tmp_path / "bank"
    errors: list[BaseException] = []

    def write(i: int) -> None:
        try:
            with replacing_dir(target) as build:
                for k in range(20):
                    (build / f"w{i}-{k}").write_text(str(i))
        except OSError as exc:  # lost the race: the directory was taken meanwhile
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(errors) < 8
    writers = {p.name.split("-")[0] for p in target.iterdir()}
    assert len(writers) == 1 and len(list(target.iterdir())) == 20  # one writer's whole version
    assert [p.name for p in tmp_path.iterdir()] == ["bank"]
