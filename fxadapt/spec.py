"""The composition spec (JSON): which adapters exist, how each is configured, which are active.

    {"adapters": {NAME: DEF, ...}, "active": NAME | BLOCK, "fusions": [FUSION, ...], "optimize": {"merge_lora": true}}

DEF is an AdapterHub config string (`"lora[r=4,alpha=8]"`), a config object (`{"config": "seq_bn",
"reduction_factor": 8}` or an AdapterHub config dict with `architecture`), or `{"load": DIR}` for a
saved AdapterHub or PEFT checkpoint (detected from its adapter_config.json; relative paths resolve
against the spec file). BLOCK is a composition block (`{"stack": [...]}`, parallel, fuse, split,
batch_split, average, multi_task: fxadapt/composition.py), FUSION an AdapterFusion definition
(`{"adapters": [...], "config": ...}`, `{"adapters": [...], "load": DIR}` or `{"load": DIR}`:
fxadapt/compose/fusion_spec.py). The JSON Schema is `spec_schema.json` beside this module. Every error
names the JSON path of the offending value.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from . import methods
from .checkpoints.adapterhub import refuse_constant
from .checkpoints.loading import read_config
from .compose.fusion_spec import parse_fusions
from .compose.rules import check_setup
from .composition import parse_composition
from .errors import UserError
from .methods import union
from .methods.base import MethodConfig
from .methods.config_string import parse_config_string
from .names import check_name

SCHEMA_PATH = Path(__file__).with_name("spec_schema.json")
_TOP_KEYS = {"adapters", "active", "fusions", "optimize", "$schema", "description"}
# The OPTIMIZE passes a spec may switch off (fxadapt/pass_list.py); each is on by default and only runs where it
# applies (fold_fusion with fusions, route_rows with a multi_task block, fuse_parallel_branches with merge off).
_OPTIMIZE_KEYS = {"merge_lora": True, "fold_fusion": True, "fuse_parallel_branches": True, "route_rows": True}


@dataclass
class AdapterDef:
    name: str
    method: ModuleType
    config: MethodConfig
    path: str  # JSON path, for messages
    load: Path | None = None

    def to_json(self) -> dict[str, Any]:
        data = {"method": self.method.NAME, "config": self.config.to_dict()}
        if self.load is not None:
            data["load"] = str(self.load)
        return data


@dataclass
class Spec:
    adapters: dict[str, AdapterDef]
    active: list[str]
    optimize: dict[str, bool] = field(default_factory=lambda: dict(_OPTIMIZE_KEYS))
    # The parsed "active" composition (fxadapt.composition.Block) or None for a single adapter; `active`
    # lists its adapters in order. `fusions`: AdapterFusion definitions (fxadapt.compose.fusion_spec).
    setup: Any = None
    fusions: list = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        data = {"adapters": {n: a.to_json() for n, a in self.adapters.items()}, "active": self.active,
                "optimize": self.optimize}
        if self.setup is not None:
            data.update(active=self.setup.to_json(), fusions=[f.to_json() for f in self.fusions])
        return data


def load_spec(path: str | Path) -> Spec:
    """Read and resolve a spec file."""
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as exc:
        raise UserError(f"spec {path}: cannot read it ({exc.strerror}).") from None
    except UnicodeDecodeError as exc:
        raise UserError(f"spec {path}: byte {exc.start} is not UTF-8 text; save the spec as UTF-8 JSON.") from None
    try:
        data = json.loads(text, parse_constant=refuse_constant(f"spec {path}"))
    except json.JSONDecodeError as exc:
        raise UserError(f"spec {path}: malformed JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}.") from None
    except RecursionError:  # thousands of nested brackets exhaust the parser's stack
        raise UserError(f"spec {path}: the JSON is nested too deeply to be a spec; check its brackets.") from None
    except ValueError as exc:  # an integer literal beyond Python's digit limit (int_max_str_digits)
        raise UserError(f"spec {path}: it holds a number that cannot be read ({exc}); use a smaller value.") from None
    return parse_spec(data, path.parent)


def parse_spec(data: Any, base_dir: Path = Path(".")) -> Spec:
    """Resolve a spec object: parse config strings, apply presets, read checkpoint configs."""
    if not isinstance(data, dict):
        raise UserError("$: the spec must be a JSON object with \"adapters\" and \"active\".")
    unknown = sorted(set(data) - _TOP_KEYS)
    if unknown:
        raise UserError(f"$: unknown spec key(s) {', '.join(map(repr, unknown))}; valid keys: "
                        f"{', '.join(sorted(_TOP_KEYS - {'$schema'}))}.")
    raw_adapters = data.get("adapters")
    if not isinstance(raw_adapters, dict) or not raw_adapters:
        raise UserError("$.adapters: expected a non-empty object mapping adapter names to definitions.")
    for name in raw_adapters:  # a name becomes a module path, a directory and checkpoint keys
        check_name(name, f"$.adapters.{name[:40]}")
    adapters = {name: _adapter(name, value, f"$.adapters.{name}", base_dir) for name, value in raw_adapters.items()}
    setup = None
    if isinstance(data.get("active"), dict):  # a composition block (fxadapt/composition.py)
        setup = parse_composition(data["active"], set(adapters))
    fusions = parse_fusions(data.get("fusions"), adapters, base_dir) if data.get("fusions") else []
    active = list(setup.flatten()) if setup is not None else _active(data.get("active"), adapters)
    optimize = dict(_OPTIMIZE_KEYS)
    if not isinstance(data.get("optimize") or {}, dict):
        raise UserError(f"$.optimize: expected an object such as {{\"merge_lora\": false}}, got "
                        f"{json.dumps(data['optimize'])[:60]}.")
    for key, value in (data.get("optimize") or {}).items():
        if key not in _OPTIMIZE_KEYS or not isinstance(value, bool):
            raise UserError(f"$.optimize.{key}: unknown optimization or non-boolean value; valid: "
                            f"{', '.join(_OPTIMIZE_KEYS)} (true/false).")
        optimize[key] = value
    spec = Spec(adapters, active, optimize, setup, fusions)
    if setup is not None:
        check_setup(spec)
    return spec


def _adapter(name: str, value: Any, path: str, base_dir: Path) -> AdapterDef:
    if isinstance(value, str):
        chunks = parse_config_string(value, path)
        if len(chunks) > 1 or chunks[0][0] in union.NAMED:
            return AdapterDef(name, union, union.from_chunks(chunks, path), path)
        method_name, overrides = chunks[0]
        module, preset = methods.method_for_name(method_name, path)
        return AdapterDef(name, module, methods.build_config(module, preset, overrides, path), path)
    if not isinstance(value, dict):
        raise UserError(f"{path}: expected a config string, a config object or {{\"load\": DIR}}, got "
                        f"{type(value).__name__}.")
    if "load" in value:
        extra = sorted(set(value) - {"load"})
        if extra:
            raise UserError(f"{path}: {{\"load\": DIR}} takes no other keys, got {extra}.")
        if not isinstance(value["load"], str) or not value["load"]:
            raise UserError(f"{path}.load: expected a checkpoint directory path (a string), got "
                            f"{json.dumps(value['load'])[:60]}.")
        directory = (base_dir / value["load"]).resolve()
        # AdapterHub or PEFT, by the directory's adapter_config.json.
        module, config = read_config(directory, f"{path}.load")
        return AdapterDef(name, module, config, path, directory)
    if "config" in value:
        if not isinstance(value["config"], str):
            raise UserError(f"{path}.config: expected a config name such as \"seq_bn\".")
        method_name, preset_overrides = parse_config_string(value["config"], f"{path}.config")[0]
        module, preset = methods.method_for_name(method_name, f"{path}.config")
        overrides = {k: v for k, v in value.items() if k != "config"}
        return AdapterDef(name, module, methods.build_config(module, {**preset, **preset_overrides}, overrides,
                                                             path), path)
    module = methods.method_for_config(value, path)
    return AdapterDef(name, module, module.Config.from_dict(value, path), path)


def resolve_adapter(name: str, value: Any, path: str, base_dir: Path = Path(".")) -> AdapterDef:
    """One adapter definition (config string, config object or {"load": DIR}) resolved exactly as in a spec;
    the Python API (`AdaptedModel.add_adapter`/`load_adapter`) uses it."""
    return _adapter(name, value, path, base_dir)


def _active(value: Any, adapters: dict[str, AdapterDef]) -> list[str]:
    if value is None:
        if len(adapters) == 1:
            return list(adapters)
        raise UserError("$.active: several adapters are defined; say which is active, e.g. "
                        f"\"active\": {json.dumps(next(iter(adapters)))}.")
    if not isinstance(value, str):
        raise UserError(f"$.active: expected an adapter name or a composition block, got {json.dumps(value)}.")
    if value not in adapters:
        raise UserError(f"$.active: unknown adapter {value!r}; defined adapters: {', '.join(adapters)}.")
    return [value]
