"""Every registered method keeps the contract of fxadapt.methods.base.Method (issue #10, "one method contract"),
and the registry lists each method on one line of its own."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest

from fxadapt import methods
from fxadapt.composition import KINDS
from fxadapt.errors import UserError
from fxadapt.methods.base import Method, MethodConfig
from fxadapt.methods.lora import peft

REGISTRY = Path(methods.__file__)
# BY_ARCHITECTURE plus the method PEFT checkpoints load as (fxadapt.checkpoints.loading.read_config).
MODULES = {**methods.BY_ARCHITECTURE, "peft_lora": peft}
# Modules not on the contract yet (strict xfail, so the mark goes once they are); none since issue #10.
PENDING: set[str] = set()
SIGNATURES = {
    "emit": ["gm", "sites", "adapter", "config", "path"],
    "site_modules": ["sites", "name", "config", "path", "gm"],
    "composition_refusal": ["config"],
}


def _cases():
    for key, module in MODULES.items():
        marks = [pytest.mark.xfail(strict=True, reason="bottleneck family not on the contract yet (issue #10)")]
        yield pytest.param(key, module, id=key, marks=marks if key in PENDING else [])


@pytest.mark.parametrize(("key", "module"), list(_cases()))
def test_registered_method_satisfies_the_protocol(key, module):
    assert isinstance(module, Method), [n for n in ("BLOCKS", "site_modules", "composition_refusal")
                                        if not hasattr(module, n)]
    assert module.NAME == key
    assert issubclass(module.Config, MethodConfig)
    for function, parameters in SIGNATURES.items():
        assert list(inspect.signature(getattr(module, function)).parameters) == parameters, function
    assert set(module.BLOCKS) <= set(KINDS)
    assert set(module.ALIASES.values()) <= set(module.PRESETS)
    for name, values in module.PRESETS.items():
        config = module.Config.from_dict(dict(values), f"$.{name}")
        refusal = module.composition_refusal(config)
        assert refusal is None or isinstance(refusal, str), name
    with pytest.raises(UserError, match=r"\$\.x(\.no_such_field)?: .*'no_such_field'"):
        module.Config.from_dict({"no_such_field": 1}, "$.x")


def test_the_protocol_rejects_a_module_missing_a_member():
    """The check can fail: a method module without composition_refusal is not a Method."""
    from fxadapt.methods import lora

    stripped = type(lora)("stripped")
    for name in ("NAME", "Config", "PRESETS", "ALIASES", "BLOCKS", "emit", "site_modules"):
        setattr(stripped, name, getattr(lora, name))
    assert not isinstance(stripped, Method)
    stripped.composition_refusal = lora.composition_refusal
    assert isinstance(stripped, Method)


def _registry_table() -> ast.Dict:
    tree = ast.parse(REGISTRY.read_text())
    tables = [node.value for node in tree.body
              if isinstance(node, ast.AnnAssign) and getattr(node.target, "id", None) == "BY_ARCHITECTURE"
              or isinstance(node, ast.Assign) and "BY_ARCHITECTURE" in [getattr(t, "id", None) for t in node.targets]]
    assert len(tables) == 1 and isinstance(tables[0], ast.Dict), "BY_ARCHITECTURE is one dict literal"
    return tables[0]


def test_registry_is_one_line_per_method():
    table = _registry_table()
    lines = [key.lineno for key in table.keys]
    assert len(set(lines)) == len(lines) == len(methods.BY_ARCHITECTURE), "one method per line"
    assert all(key.lineno == value.lineno for key, value in zip(table.keys, table.values, strict=True))
    source = REGISTRY.read_text()
    assert "BY_ARCHITECTURE.update" not in source and "BY_ARCHITECTURE[" not in source.split("def ", 1)[0]


def test_registry_functions_still_resolve_names_and_architectures():
    module, preset = methods.method_for_name("dora", "$.a")
    assert module is methods.BY_ARCHITECTURE["lora"] and preset == {"use_dora": True}
    assert methods.method_for_config({"architecture": "mtl_lora"}, "$.a").NAME == "mtl_lora"
    config = methods.build_config(module, preset, {"r": 4}, "$.a")
    assert (config.r, config.variant) == (4, "dora")
    with pytest.raises(UserError, match=r"\$\.a: unknown adapter method 'nope'"):
        methods.method_for_name("nope", "$.a")


@pytest.mark.parametrize(("preset", "gated", "expected"), [("lora", False, True), ("lora", True, False),
                                                            ("ia3", False, False), ("vera", False, False),
                                                            ("dora", False, False)])
def test_lora_declares_which_configs_have_a_peft_layout(preset, gated, expected):
    """lifecycle/saving.py writes PEFT's layout where the method says so, not where the name is "lora"."""
    lora = methods.BY_ARCHITECTURE["lora"]
    config = lora.Config.from_dict({**lora.PRESETS[preset], "use_gating": gated}, "$.a")
    assert lora.peft_layout(config) is expected
    assert not hasattr(methods.BY_ARCHITECTURE["bottleneck"], "peft_layout")


def test_no_site_error_reads_the_methods_own_description(monkeypatch):
    """passes/insert_adapters.py asks the method which sites it needs instead of switching on its name."""
    from fxadapt.passes.insert_adapters import _needs
    from fxadapt.spec import AdapterDef

    lora = methods.BY_ARCHITECTURE["lora"]
    adapter = AdapterDef("a", lora, lora.Config.from_dict({"attn_matrices": ["k"]}, "$.a"), "$.a")
    assert _needs(adapter) == "attention projections k or FFN projections"
    monkeypatch.setattr(lora, "describe_sites", lambda config: f"r={config.r} sites")
    assert _needs(adapter) == "r=8 sites"


def test_composed_site_kinds_are_lowered_by_the_family_that_declares_them():
    """passes/lower_composition.py gathers each family's LOWERERS (kind -> (stage, lowerer)) from the registry: a
    kind is declared by one method only, and the generic pass imports no family's lowerer or module."""
    from fxadapt.passes import lower_composition

    declared: dict[str, str] = {}
    for name, module in methods.BY_ARCHITECTURE.items():
        for kind, (stage, lower) in getattr(module, "LOWERERS", {}).items():
            assert kind not in declared, f"site kind {kind!r} declared by {declared.get(kind)} and {name}"
            assert stage in (0, 1) and callable(lower), (name, kind)
            declared[kind] = name
    assert declared == {"invertible": "bottleneck", "residual": "bottleneck", "linear": "lora",
                        "prefix": "prefix_tuning", "reft": "reft"}
    assert lower_composition.LOWER_SITES == {k: m.LOWERERS[k] for m in methods.BY_ARCHITECTURE.values()
                                             for k in getattr(m, "LOWERERS", {})}
    imported = {node.module for node in ast.walk(ast.parse(Path(lower_composition.__file__).read_text()))
                if isinstance(node, ast.ImportFrom) and node.module}
    family = {f"fxadapt.methods.{name}" for name in ("bottleneck", "lora", "prefix_tuning", "reft")}
    assert not {m for m in imported if any(m == f or m.startswith(f + ".") for f in family)}


@pytest.mark.parametrize("architecture, strategies", [("lora", {"linear", "lora_delta_w_svd"}),
                                                      ("bottleneck", {"linear"}), ("mtl_lora", {"linear"})])
def test_methods_declare_their_combine_strategies_and_fusability(architecture, strategies):
    """lifecycle/averaging.py and fusion_io.py read what the method declares, not its name."""
    module = methods.BY_ARCHITECTURE[architecture]
    assert strategies <= set(module.Config.combine_strategies)
    assert "lora_delta_w_svd" not in module.Config.combine_strategies or architecture == "lora"
    assert getattr(module, "FUSABLE", False) is (architecture == "bottleneck")
