"""The rule authors' side of the tracer: the facade rules import, register_rule's warning, per-call rules."""

from __future__ import annotations

import ast
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from hf_otfusion.trace import RULES, api, build_plan, register_rule

RULES_DIR = Path(api.__file__).parent / "rules"


def _mlp() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)), torch.randn(2, 4)


def test_register_rule_warns_when_a_name_gets_a_second_rule():
    def first(t, node):
        return t.fresh(node)

    def second(t, node):
        return t.fresh(node)

    name = "hf_otfusion_test_made_up_op"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            register_rule(name)(first)
            register_rule(name)(first)  # the same function again (a re-import): nothing to warn about
        with pytest.warns(UserWarning, match=f"tracer rule for op '{name}' registered twice"):
            register_rule(name)(second)
        assert RULES[name] is second
    finally:
        RULES.pop(name, None)


def test_per_call_rules_override_the_table_for_that_call_only():
    model, x = _mlp()
    before = build_plan(model, x)
    assert [s.size for s in before.spaces] == [8]

    def fix_relu(t, node):
        labels = t.of(api.argument(node, 0, "self"))
        t.fix_all(labels, "fixed by a per-call rule")
        return labels

    fixed = build_plan(model, x, rules={"relu": fix_relu})
    assert fixed.spaces == () and any("fixed by a per-call rule" in f.reason for f in fixed.fixed)
    assert RULES["relu"] is not fix_relu
    assert build_plan(model, x) == before  # the next trace uses the registered rules again


def test_the_facade_rule_from_the_docstring_makes_a_space():
    """The facade's operations as a rule uses them: a rule for relu built from fresh/join alone gives the plan the
    registered rule gives."""
    model, x = _mlp()

    def join_relu(t, node):
        xl = t.of(api.argument(node, 0, "self"))
        out = t.fresh(node, fixed=False)
        for a, b in zip(out, xl, strict=True):
            t.join(a, b)
        return out

    assert build_plan(model, x, rules={"relu": join_relu}) == build_plan(model, x)


def test_rules_import_only_the_facade():
    """Every rule module imports the tracer through hf_otfusion.trace.api (or a sibling rule module's public
    names), never a private name."""
    for path in sorted(RULES_DIR.glob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level > 0:
                assert node.level == 1 or node.level == 2 and node.module == "api", (
                    f"{path.name}:{node.lineno} imports from {'.' * node.level}{node.module or ''}")
                assert not any(a.name.startswith("_") for a in node.names), f"{path.name}:{node.lineno}"
        assert "atoms" not in path.read_text(encoding="utf-8"), f"{path.name} reaches into the union-find"


def test_the_facade_lists_what_it_exports():
    assert set(api.__all__) <= set(dir(api))
    assert {"Tracer", "register_rule", "argument", "shape_of", "Desc", "Labels"} <= set(api.__all__)
