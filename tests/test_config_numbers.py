"""Every number a config holds refuses a boolean, in every config model of align.

pydantic's lax mode reads ``true`` as 1 and 1.0, so ``seed: true`` trained seed 1 and ``ks: [1, true]`` measured
R@1 twice. The models are found here, not listed: every subclass of StrictModel in every module of align, and
every field whose type holds an int or a float (alone, optional, in a list, tuple or dict) is validated with
``true`` in each number's place, as a config file would give it. A model added later is walked too.
"""
from __future__ import annotations

import importlib
import pkgutil
import types
import typing
from typing import Annotated, Any, Literal, Union

import pytest
from pydantic import ValidationError

import align
from align.common.config import StrictModel

from helpers import data_section

# The required fields of the models that have some; every other model validates from {}.
REQUIRED = {
    "EncoderSpec": {"backend": "open_clip", "model": "ViT-S-32"},
    "EmbedConfig": data_section("/tmp/unused-cache"),
    "TrainConfig": {"data": data_section("/tmp/unused-cache")},
    "CompareConfig": {"data": data_section("/tmp/unused-cache")},
}
# The models of align's configs as of issue 21; the walk must find at least these.
KNOWN = {"OptimConfig", "ScheduleConfig", "EvalConfig", "TrainConfig", "HeadConfig", "LossConfig", "EmbedConfig",
         "DatasetSpec", "SyntheticConfig", "MnistConfig", "EncoderSpec", "GridConfig", "CompareConfig"}


def config_models() -> list[type[StrictModel]]:
    """Every subclass of StrictModel (at any depth) defined once all of align's modules are imported."""
    for module in pkgutil.walk_packages(align.__path__, "align."):
        importlib.import_module(module.name)
    found, todo = [], [StrictModel]
    while todo:
        for sub in todo.pop().__subclasses__():
            if sub not in found:
                found.append(sub)
                todo.append(sub)
    return found


def holds_a_number(annotation: Any) -> bool:
    """Whether a value of this type can hold an int or a float (a bool is neither here)."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Literal:
        return False
    if origin is Annotated:
        return holds_a_number(args[0])
    if origin is not None:
        return any(holds_a_number(a) for a in args if a is not Ellipsis)
    return annotation in (int, float)


def with_true(annotation: Any) -> Any:
    """A value of this type with ``True`` in the place of every number."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Annotated:
        return with_true(args[0])
    if origin in (Union, types.UnionType):
        return with_true(next(a for a in args if holds_a_number(a)))
    if origin is list:
        return [with_true(args[0])]
    if origin is tuple:
        return tuple(with_true(a) for a in args if a is not Ellipsis)
    if origin is dict:
        return {"sam": with_true(args[1])}
    assert annotation in (int, float), annotation
    return True


def numeric_fields() -> list[tuple[type[StrictModel], str]]:
    return [(model, name) for model in config_models() for name, field in model.model_fields.items()
            if holds_a_number(field.annotation)]


def test_the_walk_finds_every_config_model_and_its_numbers():
    names = {m.__name__ for m in config_models()}
    assert KNOWN <= names, KNOWN - names
    fields = {f"{m.__name__}.{n}" for m, n in numeric_fields()}
    assert {"OptimConfig.betas", "EvalConfig.ks", "MnistConfig.seed", "GridConfig.method_axes",
            "HeadConfig.hidden_dim", "CompareConfig.workers", "TrainConfig.diverge_tol"} <= fields
    assert not any(n.endswith((".sharpness", ".normalize", ".pre_norm")) for n in fields)  # booleans are not numbers


@pytest.mark.parametrize("model, name", numeric_fields(), ids=lambda x: getattr(x, "__name__", x))
def test_every_number_in_a_config_refuses_true(model, name):
    base = REQUIRED.get(model.__name__, {})
    model.model_validate(base)  # the base is valid: the failure below is the boolean's
    value = with_true(model.model_fields[name].annotation)
    with pytest.raises(ValidationError) as err:
        model.model_validate({**base, name: value})
    assert any(e["input"] is True for e in err.value.errors()), (name, value, err.value.errors())
