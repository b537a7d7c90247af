from zoo import make

from hf_otfusion import AlignmentPlan, build_plan


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
