"""Replica-group parsing in all three printed forms, and mapping groups to mesh axes."""

from moe_jax.costs.hlo import collective_axes, collectives, group_axes, parse_replica_groups

MESH = {"dp": 2, "pp": 1, "ep": 2, "tp": 2}      # partition id = dp*4 + ep*2 + tp


def test_explicit_groups():
    line = "%ar = f32[2]{0} all-reduce(%x), channel_id=1, replica_groups={{0,1},{2,3},{4,5},{6,7}}, to_apply=%add"
    assert parse_replica_groups(line) == [[0, 1], [2, 3], [4, 5], [6, 7]]


def test_iota_groups_with_transpose():
    line = "%ag = f32[4]{0} all-gather(%x), replica_groups=[4,2]<=[2,2,2]T(0,2,1), dimensions={0}"
    assert parse_replica_groups(line) == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert {group_axes(g, MESH) for g in parse_replica_groups(line)} == {("ep",)}


def test_mesh_groups_with_device_ids():
    line = ("%a2a = (f32[1]{0}, f32[1]{0}) all-to-all(%x, %y), channel_id=2, replica_groups=mesh['axis_0'=2,"
            "'axis_1'=2,'axis_2'=1,'axis_3'=1,'axis_4'=1,'axis_5'=2], device_ids=([2,2,2]T(1,0,2)) {'axis_0'}, "
            "metadata={op_name=\"jit(f)/moe/dispatch/sharding_constraint\"}")
    groups = parse_replica_groups(line)
    assert sorted(map(sorted, groups)) == [[0, 2], [1, 3], [4, 6], [5, 7]]
    [c] = collectives(line)
    assert c.kind == "all-to-all" and collective_axes(c, MESH) == ("ep",) and "dispatch" in c.op_name


def test_mesh_groups_without_device_ids():
    line = ("%s = s32[] all-reduce(%x), replica_groups=mesh['axis_0'=4,'axis_1'=2] {'axis_0'}, to_apply=%r")
    assert parse_replica_groups(line) == [[0, 2, 4, 6], [1, 3, 5, 7]]


def test_async_counted_once_and_permute_pairs():
    text = "\n".join([
        "%s = (f32[2], f32[2]) all-gather-start(%x), replica_groups={{0,1}}, dimensions={0}",
        "%d = f32[2] all-gather-done(%s)",
        "%cp = f32[2]{0} collective-permute(%x), channel_id=3, source_target_pairs={{0,4},{4,0}}",
    ])
    found = collectives(text)
    assert [c.kind for c in found] == ["all-gather", "collective-permute"]
    assert found[1].groups == ((0, 4), (4, 0))
    assert collective_axes(found[1], MESH) == ("dp",)


def test_no_groups_means_all_devices():
    [c] = collectives("%ar = f32[2]{0} all-reduce(%x), replica_groups={}, to_apply=%add")
    assert c.groups == () and collective_axes(c, MESH) == ("dp", "ep", "tp")
