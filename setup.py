"""Packaging that pyproject.toml cannot declare with automatic package discovery: the model card templates live
in the top-level ``model_cards/`` folder of the repository and ship inside the wheel as the package data of
``hf_otfusion.model_cards`` (``hf_otfusion/model_cards/*.md`` once installed), where ``hf_otfusion.card`` finds
them. Only ``hf_otfusion`` is installed: ``experiments/`` (``python -m experiments``), ``benchmarks/`` and ``scripts/``
run from a checkout of the repository. Everything else is in pyproject.toml."""

from setuptools import find_packages, setup

setup(
    packages=[*find_packages(include=["hf_otfusion", "hf_otfusion.*"]), "hf_otfusion.model_cards"],
    package_dir={"hf_otfusion.model_cards": "model_cards"},
    package_data={"hf_otfusion": ["py.typed"], "hf_otfusion.model_cards": ["*.md"]},
)
