"""The merge YAML: valid configs parse; every bad field is rejected with a message naming it."""

from __future__ import annotations

import pytest

from hf_otfusion.config import ConfigError, MergeConfig, load_config, parse_config

TWO = [{"model": "org/a"}, {"model": "org/b@v1"}]
CALIB = {"dataset": "ylecun/mnist", "split": "train", "num_samples": 256}


def test_issue_example_parses(tmp_path):
    path = tmp_path / "c.yml"
    path.write_text(
        """merge_method: otfusion
base_model: timm/resnet18.a1_in1k
models:
  - model: timm/resnet18.a1_in1k
  - model: you/resnet18-other-seed@main
    parameters: {weight: 0.5}
parameters: {alignment: activations, solver: emd, marginals: uniform}
calibration: {dataset: ylecun/mnist, split: train, num_samples: 256, batch_size: 64}
evaluation: {dataset: ylecun/mnist, split: test, num_samples: 2000}
dtype: float32
"""
    )
    cfg = load_config(path)
    assert cfg.target_index == 0 and cfg.weights == [1.0, 0.5]
    assert cfg.fusion_parameters.alignment == "activations"
    assert cfg.calibration.batch_size == 64 and cfg.evaluation.split == "test"
    assert parse_config(__import__("yaml").safe_load(cfg.to_yaml())) == cfg


def test_defaults():
    cfg = parse_config({"models": TWO})
    assert cfg.merge_method == "otfusion" and cfg.target_index == 0 and cfg.dtype == "float32"
    assert cfg.fusion_parameters.alignment == "weights" and cfg.fusion_parameters.solver == "emd"
    assert cfg.to_yaml().startswith("models:")  # defaults stay out of the written config


def test_base_model_picks_target():
    assert parse_config({"models": TWO, "base_model": "org/b@v1"}).target_index == 1


def test_frozen():
    cfg = parse_config({"models": TWO})
    with pytest.raises(Exception, match="frozen"):
        cfg.dtype = "float16"


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"models": TWO[:1]}, "models: List should have at least 2 items"),
        ({"models": TWO, "foo": 1}, "foo: unknown field"),
        ({"models": [{"model": "org/a", "weight": 1}, TWO[1]]}, "models.0.weight: unknown field"),
        ({"models": [TWO[0], {"model": "org/b", "parameters": {"weight": -1}}]}, "models.1.parameters.weight"),
        ({"models": [TWO[0], {"model": "org/b", "parameters": {"weight": "x"}}]}, "models.1.parameters.weight"),
        ({"models": [{"model": "org/a", "parameters": {"weight": 0}}, {"model": "b", "parameters": {"weight": 0}}]},
         "at least one model needs a weight > 0"),
        ({"models": [TWO[0], {"model": "  "}]}, "models.1.model"),
        ({"models": TWO, "merge_method": "ties"}, "merge_method: Input should be 'otfusion' or 'linear'"),
        ({"models": TWO, "base_model": "org/c"}, "base_model: 'org/c' is not one of the models"),
        ({"models": TWO, "parameters": {"alignment": "activations"}}, "calibration: parameters.alignment"),
        ({"models": TWO, "calibration": CALIB, "parameters": {"alignment": "weights", "repair": "none"}},
         "calibration: is only used with"),
        ({"models": TWO, "parameters": {"solver": "emd", "reg": 0.1}}, "parameters.reg: only the 'sinkhorn'"),
        ({"models": TWO, "parameters": {"solver": "sinkhorn", "reg": 0}}, "parameters.reg"),
        ({"models": TWO, "parameters": {"solver": "exact"}}, "parameters.solver"),
        ({"models": TWO, "merge_method": "linear", "parameters": {"solver": "emd"}}, "parameters: merge_method"),
        ({"models": TWO, "evaluation": {"dataset": "d", "num_samples": 0}}, "evaluation.num_samples"),
        ({"models": TWO, "evaluation": {"dataset": "d", "batch_size": -2}}, "evaluation.batch_size"),
        ({"models": TWO, "evaluation": {"split": "test"}}, "evaluation.dataset: Field required"),
        ({"models": TWO, "dtype": "float64"}, "dtype: Input should be"),
        ({"models": "org/a"}, "models: Input should be a valid list"),
        ({"models": TWO, "parameters": {"repair": "repair"}}, "calibration: parameters.repair 'repair' needs"),
        ({"models": TWO, "parameters": {"repair": "rebasin"}}, "parameters.repair: Input should be 'none', 'reset_bn'"),
        ({"models": TWO, "finetune": {"dataset": "d", "lr": 0.1}}, "finetune.steps: Field required"),
        ({"models": TWO, "finetune": {"dataset": "d", "steps": 0, "lr": 0.1}}, "finetune.steps: Input should be"),
        ({"models": TWO, "finetune": {"dataset": "d", "steps": 5, "lr": -1}}, "finetune.lr: Input should be"),
        ({"models": TWO, "finetune": {"steps": 5, "lr": 0.1}}, "finetune.dataset: Field required"),
        ({"models": TWO, "finetune": {"dataset": "d", "steps": 5, "lr": 0.1, "epochs": 2}}, "finetune.epochs: unknown"),
        ({"models": TWO, "finetune": {"dataset": "d", "steps": 5, "lr": 0.1, "optimizer": "lbfgs"}},
         "finetune.optimizer: Input should be 'sgd' or 'adam'"),
        ({"models": TWO, "finetune": {"dataset": "d", "steps": 5, "lr": 0.1, "optimizer": "adam", "momentum": 0.5}},
         "finetune.momentum: only the 'sgd' optimizer uses momentum"),
        ({"models": TWO, "finetune": {"dataset": "d", "steps": 5, "lr": 0.1, "momentum": 1.0}}, "finetune.momentum"),
        ({"models": TWO, "finetune": {"dataset": "d", "steps": 5, "lr": 0.1, "batch_size": 0}},
         "finetune.batch_size"),
    ],
)
def test_bad_fields_are_named(data, message):
    with pytest.raises(ConfigError, match="not a valid merge config") as info:
        parse_config(data)
    assert message in str(info.value)


def test_top_level_must_be_a_mapping():
    with pytest.raises(ConfigError, match="expected a mapping"):
        parse_config(["models"])


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yml")


def test_not_yaml(tmp_path):
    path = tmp_path / "bad.yml"
    path.write_text("models: [a, b\n")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        load_config(path)


def test_config_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)
    assert MergeConfig.model_config["extra"] == "forbid"


def test_repair_and_finetune_fields():
    cfg = parse_config({
        "models": TWO,
        "parameters": {"alignment": "activations", "repair": "repair"},
        "calibration": CALIB,
        "finetune": {"dataset": "ylecun/mnist", "split": "train", "num_samples": 512, "steps": 100, "lr": 0.01},
    })
    assert cfg.fusion_parameters.repair == "repair"
    ft = cfg.finetune
    assert (ft.steps, ft.lr, ft.optimizer, ft.momentum, ft.weight_decay, ft.batch_size) == (100, 0.01, "sgd", 0.9, 0.0,
                                                                                            32)
    assert ft.dataset == "ylecun/mnist" and ft.num_samples == 512 and ft.seed == 0
    assert parse_config(__import__("yaml").safe_load(cfg.to_yaml())) == cfg
    assert "finetune:" in cfg.to_yaml() and "momentum" not in cfg.to_yaml()  # defaults stay out
    linear = parse_config({"models": TWO, "merge_method": "linear", "finetune": {"dataset": "d", "steps": 1, "lr": 1}})
    assert linear.finetune.steps == 1
    assert parse_config({"models": TWO}).finetune is None


def test_transformer_options():
    params = parse_config({"models": TWO, "parameters": {"match_heads": False, "residual": "mean"}}).fusion_parameters
    assert (params.match_heads, params.residual, params.standardize) == (False, "mean", False)
    with pytest.raises(ConfigError, match="parameters.residual"):
        parse_config({"models": TWO, "parameters": {"residual": "sum"}})


def test_calibration_data_with_no_options_gets_the_best_measured_combination():
    config = parse_config({"models": TWO, "calibration": CALIB})
    params = config.fusion_parameters
    assert (params.alignment, params.repair) == ("activations", "refit")
    assert "repair: refit" in config.to_yaml()  # the config as run says so (and so does the card)
    kept = parse_config({"models": TWO, "calibration": CALIB, "parameters": {"repair": "reset_bn"}})
    assert (kept.fusion_parameters.alignment, kept.fusion_parameters.repair) == ("activations", "reset_bn")
    weights = parse_config({"models": TWO, "calibration": CALIB, "parameters": {"alignment": "weights"}})
    assert (weights.fusion_parameters.alignment, weights.fusion_parameters.repair) == ("weights", "refit")
    assert parse_config({"models": TWO}).fusion_parameters.repair == "none"  # no data: weights, nothing to refit
