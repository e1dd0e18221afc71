"""Registry: exposing functions, refusing private names, loading by import string."""

from __future__ import annotations

import pytest

import rpc
from rpc.errors import ConfigError
from rpc.registry import load_registry

module_registry = rpc.Registry()


@module_registry.expose
def add(x, y):
    """Add two numbers.

    More text that is not the first line.
    """
    return x + y


def test_expose_forms_register_under_the_right_names():
    registry = rpc.Registry()

    @registry.expose
    def plain():
        pass

    @registry.expose(name="ns.deep.named")
    def other():
        pass

    registry.register(len, name="length")
    registry.register(abs)
    assert list(registry) == ["abs", "length", "ns.deep.named", "plain"]
    assert registry.get("plain") is plain and registry.get("ns.deep.named") is other
    assert plain.__name__ == "plain"  # decorators return the function unchanged


@pytest.mark.parametrize("name", ["_hidden", "ns._hidden", "__class__", "a.__globals__", "", "a..b", "1abc", "a b"])
def test_private_or_malformed_names_are_refused(name):
    registry = rpc.Registry()
    with pytest.raises(ConfigError):
        registry.register(lambda: None, name=name)


def test_a_name_cannot_be_taken_twice():
    registry = rpc.Registry()
    registry.register(len, name="f")
    with pytest.raises(ConfigError, match="already"):
        registry.register(abs, name="f")


def test_lookup_is_exact_with_no_attribute_walking():
    assert module_registry.get("add.__globals__") is None
    assert module_registry.get("__class__") is None
    assert "add" in module_registry


def test_describe_gives_signature_and_first_doc_line():
    (info,) = module_registry.describe()
    assert info == rpc.MethodInfo("add", "(x, y)", "Add two numbers.")


def test_module_level_registry_has_an_import_string_that_loads_it():
    spec = module_registry.import_string()
    assert spec.endswith(":module_registry")
    assert load_registry(spec) is module_registry


def test_a_registry_made_inside_a_function_has_no_import_string():
    registry = rpc.Registry()
    with pytest.raises(ConfigError, match="module-level"):
        registry.import_string()


@pytest.mark.parametrize(
    "spec, message",
    [
        ("no_colon", "must look like"),
        ("no_such_module_xyz:registry", "cannot import"),
        ("services:missing", "no attribute"),
        ("services:broken", "not an rpc.Registry"),
    ],
)
def test_bad_import_strings_say_what_is_wrong(spec, message):
    with pytest.raises(ConfigError, match=message):
        load_registry(spec)
