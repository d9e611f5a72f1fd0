"""The user's files are read within bounds and ours are written safely (moe_jax.files)."""

import errno
import json
import os
import threading

import pytest

from moe_jax.errors import MoeJaxError
from moe_jax.files import (
    MARKDOWN_MARK,
    MAX_NESTING,
    check_derived,
    check_distinct,
    nesting_depth,
    read_bounded,
    read_json,
    read_toml,
    write_atomic,
    written_by_us,
)


@pytest.mark.parametrize("reader", [read_toml, read_json])
def test_device_files_are_refused_not_read(reader):
    with pytest.raises(MoeJaxError, match="not a regular file.*character device"):
        reader("/dev/zero", "hardware file")


@pytest.mark.parametrize("reader", [read_toml, read_json])
def test_a_fifo_is_refused_without_waiting_for_a_writer(tmp_path, reader):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    outcome = []
    t = threading.Thread(target=lambda: outcome.append(_error(reader, fifo)), daemon=True)
    t.start()
    t.join(10)
    assert not t.is_alive(), "reading a FIFO blocked"
    assert "a FIFO" in outcome[0]


def _error(reader, path):
    try:
        reader(path, "strategy file")
    except MoeJaxError as e:
        return str(e)
    return ""


def test_directories_and_missing_files_name_the_path(tmp_path):
    with pytest.raises(MoeJaxError, match="directory"):
        read_json(tmp_path, "prompt file")
    with pytest.raises(MoeJaxError, match="cannot read prompt file .*nope"):
        read_json(tmp_path / "nope", "prompt file")


def test_size_limit(tmp_path):
    big = tmp_path / "big.json"
    big.write_text("[" + "0," * 600 + "0]")
    assert len(read_bounded(big, "prompt file", limit=2000)) < 2000
    with pytest.raises(MoeJaxError, match="limit of 1,000 bytes|1,000"):
        read_json(big, "prompt file", limit=1000)


@pytest.mark.parametrize("depth", [MAX_NESTING + 1, 5000, 200_000])
def test_deep_nesting_is_a_clear_error(tmp_path, depth):
    j = tmp_path / "deep.json"
    j.write_text("[" * depth + "]" * depth)
    with pytest.raises(MoeJaxError, match="nest"):
        read_json(j, "model config")
    t = tmp_path / "deep.toml"
    t.write_text("a = " + "[" * depth + "]" * depth + "\n")
    with pytest.raises(MoeJaxError, match="nest|not valid TOML"):
        read_toml(t, "hardware file")


def test_nesting_depth():
    assert nesting_depth(1) == 0
    assert nesting_depth({"a": [1, {"b": []}]}) == 4
    deep = []
    for _ in range(100_000):
        deep = [deep]
    assert nesting_depth(deep) == 100_001              # no recursion


def test_ordinary_files_still_parse(tmp_path):
    (tmp_path / "s.toml").write_text("[strategy]\nep = 2\n")
    assert read_toml(tmp_path / "s.toml", "strategy file") == {"strategy": {"ep": 2}}
    (tmp_path / "p.json").write_text(json.dumps([[1, 2, 3]]))
    assert read_json(tmp_path / "p.json", "prompt file") == [[1, 2, 3]]


def test_provenance_mark_is_exact(tmp_path):
    assert written_by_us((MARKDOWN_MARK + "\n# report\n").encode())
    assert not written_by_us(b"# my notes about moe-jax\n" + MARKDOWN_MARK.encode())   # mentioned, not marked
    assert not written_by_us(b"moe-jax")
    mine = tmp_path / "r.pareto.png"
    mine.write_bytes(b"\x89PNG\r\n\x1a\n" + b"my picture, made with moe-jax in mind")
    with pytest.raises(MoeJaxError, match="not written by moe-jax"):
        check_derived([mine])


def test_png_mark_from_matplotlib(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, _ = plt.subplots()
    ours, theirs = tmp_path / "ours.png", tmp_path / "theirs.png"
    fig.savefig(ours, metadata={"Software": "moe-jax"})
    fig.savefig(theirs, metadata={"Software": "moe-jax-like tool"})
    plt.close(fig)
    check_derived([ours])
    with pytest.raises(MoeJaxError, match="not written by moe-jax"):
        check_derived([theirs])


def test_derived_outputs_must_be_regular_files(tmp_path):
    target = tmp_path / "elsewhere.png"
    target.write_bytes(b"")
    link = tmp_path / "r.memory.png"
    link.symlink_to(target)
    with pytest.raises(MoeJaxError, match="not a regular file"):
        check_derived([link])
    with pytest.raises(MoeJaxError, match="not a regular file"):
        write_atomic(link, b"x")
    assert target.read_bytes() == b""                  # the link's target is untouched
    (tmp_path / "d.png").mkdir()
    with pytest.raises(MoeJaxError, match="not a regular file"):
        write_atomic(tmp_path / "d.png", b"x")


def test_duplicate_outputs_are_refused(tmp_path):
    check_distinct({"--json": tmp_path / "a.json", "--markdown": tmp_path / "a.md", "--save-logits": None})
    with pytest.raises(MoeJaxError, match="--markdown and --json both write"):
        check_distinct({"--json": tmp_path / "a", "--markdown": tmp_path / "." / "a"})


def test_write_failure_is_a_clear_error(tmp_path, monkeypatch):
    with pytest.raises(MoeJaxError, match="cannot write .*report.json"):
        write_atomic(tmp_path / "not-a-dir" / "report.json", "{}")      # the folder does not exist

    def full_disk(src, dst):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("moe_jax.files.os.replace", full_disk)
    with pytest.raises(MoeJaxError, match="cannot write .*report.json.*No space left"):
        write_atomic(tmp_path / "report.json", "{}")
    assert list(tmp_path.iterdir()) == []              # no temporary file left behind
