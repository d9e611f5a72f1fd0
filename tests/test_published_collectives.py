"""The published collective measurements (bench/published_collectives.toml) and the bench that holds the time
model against them (bench/collectives_published.py): the data is well formed and cited, the measured time is
read by each bandwidth definition, and each row's ratio is predicted / measured. Whether the model is within
25% is the bench's finding, not asserted here."""

import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import collectives_published as cp  # noqa: E402

from moe_jax.hardware.presets import get_hardware, hardware_names  # noqa: E402


@pytest.fixture(scope="module")
def points():
    return cp.load_points()


def test_every_point_is_cited_and_positive(points):
    assert len(points) >= 20
    for p in points:
        assert p["source"].startswith("https://"), p["name"]
        assert p["quote"].strip(), p["name"]
        assert p["hardware"] in hardware_names(), p["name"]
        assert p["kind"] in cp.KINDS, p["name"]
        assert p["group_size"] > 1 and p["devices_per_node"] >= 1 and p["bytes_per_device"] > 0, p["name"]
        assert p.get("measured_s", 1) > 0 and p.get("measured_bandwidth", 1) > 0, p["name"]
        assert "measured_s" in p or p["bandwidth_definition"] in cp.DEFINITIONS, p["name"]
    assert len({p["name"] for p in points}) == len(points), "point names must be unique"


def test_the_data_covers_what_the_issue_asks_for(points):
    in_node_all_reduce = {p["bytes_per_device"] for p in points
                          if p["kind"] == "all-reduce" and p["group_size"] == p["devices_per_node"] == 8}
    assert min(in_node_all_reduce) <= 64 * 2**10 and max(in_node_all_reduce) >= 2**30, "small to large sizes"
    ep_groups = {p["group_size"] for p in points if p["kind"] == "all-to-all"}
    assert {8, 256} <= ep_groups
    assert any(p["hardware"].startswith("tpu-") for p in points)
    assert any(p["group_size"] > p["devices_per_node"] and p["kind"] == "all-reduce" for p in points)


def test_measured_seconds_follows_each_definition():
    base = dict(kind="all-reduce", group_size=8, bytes_per_device=10**9)
    assert cp.measured_seconds({**base, "measured_s": 3e-3, "measured_bandwidth": 1.0,
                                "bandwidth_definition": "busbw"}) == 3e-3          # a published time wins
    # busbw = algbw x 2(n-1)/n = algbw x 1.75 for an all-reduce of 8
    assert cp.measured_seconds({**base, "measured_bandwidth": 175e9, "bandwidth_definition": "busbw"}) \
        == pytest.approx(10**9 / 100e9)
    assert cp.measured_seconds({**base, "measured_bandwidth": 100e9, "bandwidth_definition": "algbw"}) \
        == pytest.approx(0.01)
    gather = {**base, "kind": "all-gather", "measured_bandwidth": 87.5e9, "bandwidth_definition": "busbw"}
    assert cp.measured_seconds(gather) == pytest.approx(10**9 / 100e9)          # (n-1)/n = 0.875


def _point(**over):
    p = dict(name="synthetic", source="https://example.org/table", quote="| 1M | 1.0 |", hardware="h100",
             kind="all-reduce", group_size=8, devices_per_node=8, bytes_per_device=2**20, measured_s=4e-6)
    p.update(over)
    return p


def test_rows_carry_predicted_over_measured(monkeypatch):
    def fake(point, hw, nbytes=None):
        return (0.5e-6 if nbytes == 0 else 2e-6), "fake"

    monkeypatch.setattr(cp, "predict_seconds", fake)
    far, near = _point(), _point(name="near", measured_s=1.9e-6)
    rows = cp.predictions([far, near])
    assert len(rows) == 2
    assert rows[0]["ratio"] == pytest.approx(0.5) and not rows[0]["within"]
    assert rows[0]["latency_s"] == pytest.approx(0.5e-6) and rows[0]["bandwidth_s"] == pytest.approx(1.5e-6)
    assert rows[1]["ratio"] == pytest.approx(2e-6 / 1.9e-6) and rows[1]["within"]
    stats = cp.summary(rows)
    assert stats["median"] == pytest.approx((0.5 + (2 / 1.9 - 1)) / 2)
    assert stats["worst"] == pytest.approx(0.5) and stats["worst_name"] == "synthetic"
    assert stats["within"] == 1 and stats["points"] == 2
    table = cp.markdown(rows)
    assert "| synthetic | h100 | all-reduce | 8 | 1 MiB | 4.0 | 2.0 |" in table


def test_the_group_is_laid_out_as_the_measured_system_was():
    from moe_jax.perf.collectives import Span, collective_seconds

    hw = get_hardware("h100")
    inside = cp.predict_seconds(_point(group_size=8), hw)                    # one node of 8
    across = cp.predict_seconds(_point(group_size=16), hw)                   # two nodes of 8: hierarchical
    network = cp.predict_seconds(_point(group_size=8, link="network"), hw)  # every byte over the network
    nbytes = _point()["bytes_per_device"]
    assert inside == collective_seconds("all-reduce", nbytes, Span(8, 1, 8), hw)
    assert across == collective_seconds("all-reduce", nbytes, Span(16, 2, 8), hw)
    assert network == collective_seconds("all-reduce", nbytes, Span(8, 8, 1), hw)
    assert hw.node_link.name in inside[1] and hw.network_link.name in network[1]


def test_the_model_gives_a_time_for_every_shipped_point(points):
    for row in cp.predictions(points):
        assert math.isfinite(row["predicted_s"]) and row["predicted_s"] > 0, row["name"]
        assert 0 <= row["latency_s"] <= row["predicted_s"], row["name"]
        assert row["ratio"] == pytest.approx(row["predicted_s"] / row["measured_s"])


@pytest.mark.parametrize("over, field", [
    (dict(hardware="h900"), "hardware"), (dict(kind="all-scatter"), "kind"), (dict(bytes_per_device=0), "bytes"),
    (dict(measured_s=None), "measured"), (dict(measured_s=-1.0), "measured_s"), (dict(source=""), "source"),
    (dict(measured_s=None, measured_bandwidth=1e9), "bandwidth_definition"), (dict(link="nvlink"), "link"),
])
def test_a_bad_point_is_refused_by_name(tmp_path, over, field):
    point = {k: v for k, v in _point(**over).items() if v is not None}
    lines = ["[[point]]"] + [f"{k} = {v!r}" if isinstance(v, str) else f"{k} = {v}" for k, v in point.items()]
    path = tmp_path / "points.toml"
    path.write_text("\n".join(lines).replace("'", '"') + "\n")
    with pytest.raises(cp.DataError, match=field):
        cp.load_points(path)


def test_no_append_prints_and_leaves_results_alone(capsys):
    results = ROOT / "bench" / "RESULTS.md"
    before = results.read_bytes()
    cp.main(["--no-append"])
    out = capsys.readouterr().out
    assert "DeepEP LL dispatch EP256" in out and "median |error|" in out
    assert results.read_bytes() == before
