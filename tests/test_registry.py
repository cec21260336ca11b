"""The registry API: create, list_components, parameter checking and helpful errors."""

from __future__ import annotations

import pydantic
import pytest

import omnicore
from omnicore import hookimpl
from omnicore.errors import ParamError, UnknownComponentError
from omnicore.plugin_host import host


class WidgetParams(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")
    size: int = 3
    mode: str = "fast"


class InProcessPlugin:
    @hookimpl
    def register_heads(self, register):
        register("widget", lambda **p: ("widget", p), params_model=WidgetParams, description="Widget head")
        register("signed", self.signed)
        register("gadget", self.signed)

    @staticmethod
    def signed(d_model: int, depth: int = 2, act: str = "gelu"):
        return ("signed", d_model, depth, act)


@pytest.fixture
def plugin(fresh_registry):
    host.register_module(InProcessPlugin(), name="inproc")
    fresh_registry.reset()
    yield
    host.unregister("inproc")


def test_create_binds_signature_and_coerces(plugin):
    assert omnicore.create("head", "signed", d_model="64") == ("signed", 64, 2, "gelu")


def test_pydantic_params_model_fills_defaults(plugin):
    assert omnicore.create("head", "widget", size=5) == ("widget", {"size": 5, "mode": "fast"})


@pytest.mark.parametrize("params, fragment", [
    ({"d_model": 8, "dpeth": 3}, "unknown parameter 'dpeth'; did you mean depth"),
    ({}, "missing required parameter 'd_model'"),
    ({"d_model": "wide"}, "parameter 'd_model': Input should be a valid integer"),
])
def test_param_errors_name_component_and_parameter(plugin, params, fragment):
    with pytest.raises(ParamError) as info:
        omnicore.create("head", "signed", **params)
    assert str(info.value).startswith("head 'signed': ") and fragment in str(info.value)


def test_unknown_name_lists_closest(plugin):
    with pytest.raises(UnknownComponentError, match="no head named 'signd'; closest: signed"):
        omnicore.create("head", "signd")
    with pytest.raises(UnknownComponentError, match="unknown component kind 'heads'; did you mean head"):
        omnicore.create("heads", "signed")


def test_list_components_filters(plugin):
    names = [c.name for c in omnicore.list_components("head", "*dget")]
    assert names == ["gadget", "widget"]
    assert {c.kind for c in omnicore.list_components()} >= {"head", "recipe"}
