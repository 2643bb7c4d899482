"""The public optimizer classes are written out in hfoptim/optimizers.py (no class is made at
import time): one per registered rule, bound to it, exported by ``hfoptim``, with the rule's
docstring; and names are validated by the same pure function the optimizer uses."""

from __future__ import annotations

import ast
import inspect

import pytest
import torch

import hfoptim
from hfoptim import optimizers
from hfoptim.core.hparams import HyperparameterError
from hfoptim.core.optimizer import RuleOptimizer, validate_options
from hfoptim.registry import bases, list_optimizers, suffixes
from hfoptim.rules import RULES


def expected_class_name(rule) -> str:
    return rule.class_name or rule.__name__.removesuffix("Rule")


def test_every_rule_has_its_static_class_and_nothing_else():
    written = {node.name for node in ast.parse(inspect.getsource(optimizers)).body if isinstance(node, ast.ClassDef)}
    assert written == {expected_class_name(rule) for rule in RULES.values()}
    assert set(optimizers.CLASSES) == set(RULES)
    for name, rule in RULES.items():
        cls = optimizers.CLASSES[name]
        assert cls.__name__ == expected_class_name(rule) and issubclass(cls, RuleOptimizer) and cls.rule_class is rule
        assert getattr(hfoptim, cls.__name__) is cls and cls.__name__ in hfoptim.__all__
        assert cls.__doc__ and cls.__doc__ == rule.__doc__
        assert hfoptim.get_optimizer(name).optimizer_class is cls


def test_the_package_makes_no_classes_at_import_time():
    for module in (hfoptim, hfoptim.registry, optimizers):
        calls = [
            node.func.id
            for node in ast.walk(ast.parse(inspect.getsource(module)))
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
        ]
        assert not {"globals", "type", "optimizer_class"} & set(calls), module.__name__


def test_help_shows_the_rule_documentation():
    doc = inspect.getdoc(hfoptim.AdEMAMix)
    assert "AdEMAMix" in doc and "2409.03137" in doc


def test_names_are_checked_by_the_function_the_optimizer_uses():
    """Every listed name's options pass validate_options, and a name with a combination the
    optimizer refuses fails with the optimizer's own message."""
    for name in list_optimizers()[:400]:
        spec = hfoptim.get_optimizer(name)
        validate_options(spec.rule(), spec.options, name)
    with pytest.raises(ValueError, match="not a valid combination.*denominator='atan2' needs a rule"):
        hfoptim.get_optimizer("sm3_atan2")
    with pytest.raises(HyperparameterError, match="denominator='atan2' needs a rule"):
        hfoptim.SM3([torch.nn.Parameter(torch.zeros(2))], denominator="atan2")
    assert "adamw" in bases() and "8bit" in suffixes()
