import json

import pytest
from zoo import make

from hf_otfusion import AlignmentPlan, build_plan
from hf_otfusion.plan import AxisRef, Layout, Site, Space


def test_json_round_trip_and_table():
    model, x = make("densenet")
    plan = build_plan(model, x)
    again = AlignmentPlan.from_json(plan.to_json())
    assert again == plan
    text = str(plan)
    assert "1.conv.weight:0" in text and "2.bn.weight:0@8" in text
    assert text.splitlines()[0].startswith(f"AlignmentPlan: {len(plan.spaces)} spaces")


def test_members_by_tensor_and_fixed_tensors():
    model, x = make("vgg_bn")
    plan = build_plan(model, x)
    by_tensor = plan.members_by_tensor()
    assert {s.name for s, _ in by_tensor["4.weight"]} == {"0.weight:0", "4.weight:0"}
    assert "1.num_batches_tracked" in plan.fixed_tensors()


def test_strided_members_round_trip_and_plans_without_them_read_as_before():
    model, x = make("densenet")
    plan = build_plan(model, x)
    assert '"block"' not in plan.to_json()  # contiguous members: the JSON of plans written before the field
    old = json.loads(plan.to_json())
    assert AlignmentPlan.model_validate(old) == plan
    member = AxisRef(tensor="qkv.weight", axis=0, offset=4, block=24)
    space = Space(name="qkv.weight:0@4", size=16, heads=4, members=(member,))
    assert Space.model_validate_json(space.model_dump_json()) == space
    assert json.loads(member.model_dump_json())["block"] == 24
    with pytest.raises(ValueError, match="head blocks 3 apart"):
        Space(name="s", size=16, heads=4, members=(member.model_copy(update={"block": 3}),))
    with_block = plan.model_copy(update={"spaces": (*plan.spaces, space)})
    assert "qkv.weight:0@4b24" in str(with_block)


def test_a_member_and_its_space_give_one_layout_object():
    member = AxisRef(tensor="w", axis=1, offset=4, repeat=2, tile=3, block=20)
    site = Site(node="x", dim=2, offset=1, repeat=2)
    space = Space(name="s", size=8, heads=2, members=(member,), sites=(site,))
    layout = space.layout(member)
    assert layout == Layout.of(space, member) == Layout(axis=1, size=8, heads=2, offset=4, repeat=2, tile=3, block=20)
    assert (layout.head_dim, layout.per_channel, layout.length, layout.contiguous) == (4, 6, 48, False)
    assert space.layout(site) == Layout(axis=2, size=8, heads=2, offset=1, repeat=2)
    assert layout.with_offset(4) is layout and layout.with_offset(7).offset == 7
    with pytest.raises(AttributeError):  # frozen
        layout.offset = 0  # type: ignore[misc]
    # channel i of head h at offset + (h * tile + s) * block + i * repeat + r, channel-major
    expected = [4 + (h * 3 + s) * 20 + i * 2 + r
                for h in range(2) for i in range(4) for r in range(2) for s in range(3)]
    assert layout.positions().tolist() == expected
    # the plan's JSON holds the member fields as before (no layout object in it)
    assert json.loads(space.model_dump_json())["members"][0] == {"tensor": "w", "axis": 1, "offset": 4, "repeat": 2,
                                                                  "tile": 3, "block": 20}
