"""Serve many adapters from one swappable model (`fxadapt compile ... --swappable`) with ONNX Runtime or AOTInductor.

    session = fxadapt.runtime.Session("OUT")             # OUT/model.onnx loaded once
    session.run({"input_ids": ids, "attention_mask": mask}, adapter="sentiment")   # OUT/adapters/sentiment...
    session.run(inputs, adapter="path/to/other.onnx_adapter")                       # any file for this layout
    session.run(inputs)                                   # the defaults: the spec's active adapter

Each call activates one adapter file through `onnxruntime.RunOptions.add_active_adapter`; files are checked
against OUT/adapters/layout.json before their first use (another model, another adapter layout, a truncated
file: a UserError, never wrong outputs) and kept loaded in a bounded LRU cache. Inputs the model declares are
passed through as they are, a multi_task model's `task_ids` included. docs/deploy.md has the plain-ONNX-Runtime
equivalent.

    aoti = fxadapt.runtime.AotiSession("OUT")          # OUT/model.aoti.pt2 (--format aoti --swappable)
    aoti.run({"input_ids": ids, "attention_mask": mask}, adapter="sentiment")   # torch tensors in and out

The AOTInductor package holds its adapter tensors as constants: a run with another adapter first swaps that
adapter file's values in (`load_constants`, no recompiling), and they stay until the next swap, so one
AotiSession serves one adapter at a time (use one session per thread).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from .errors import UserError
from .export.adapter_files import ADAPTERS_DIR, SUFFIX, Layout, read_adapter_file, read_layout

MODEL_FILE = "model.onnx"
AOTI_FILE = "model.aoti.pt2"  # fxadapt.export.aoti.PACKAGE (not imported: it loads torch)


class Session:
    """One ONNX Runtime session of OUT/model.onnx and a cache of loaded adapter files (at most `cache_size`)."""

    def __init__(self, out_dir: str | Path, cache_size: int = 8, providers: Sequence[str] | None = None,
                 options: ort.SessionOptions | None = None) -> None:
        if cache_size < 1:
            raise UserError(f"Session(cache_size={cache_size}): keep at least one adapter loaded (cache_size >= 1).")
        self.out_dir = Path(out_dir)
        self.layout: Layout = read_layout(self.out_dir)
        model = self.out_dir / MODEL_FILE
        if not model.is_file():
            raise UserError(f"{self.out_dir}: no {MODEL_FILE}; compile the model with --swappable into this directory.")
        if options is None:
            options = ort.SessionOptions()
            options.log_severity_level = 3  # adapter inputs with defaults make ORT warn that they are not constants
        self.session = ort.InferenceSession(str(model), options, providers=list(providers or ["CPUExecutionProvider"]))
        self._check_model()
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.cache_size = cache_size
        self._cache: OrderedDict[tuple[str, int, int], ort.LoraAdapter] = OrderedDict()

    @property
    def adapters(self) -> list[str]:
        """The adapters compiled with the model (each has OUT/adapters/<name>.onnx_adapter)."""
        return list(self.layout.adapters)

    @property
    def active(self) -> str:
        """The adapter a run without `adapter=` gives (the spec's active adapter)."""
        return self.layout.active

    def run(self, inputs: Mapping[str, Any], adapter: str | Path | None = None,
            outputs: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """Run the model with `adapter` (a compiled adapter's name or an .onnx_adapter path; None: the defaults);
        returns {output name: array}."""
        feed = self._feed(inputs)
        run_options = ort.RunOptions()
        if adapter is not None:
            run_options.add_active_adapter(self.load(adapter))
        names = list(outputs) if outputs is not None else self.output_names
        try:
            values = self.session.run(names, feed, run_options)
        except (ort.capi.onnxruntime_pybind11_state.InvalidArgument, ValueError) as exc:
            raise UserError(f"{self.out_dir / MODEL_FILE}: ONNX Runtime refused the inputs: {exc}") from None
        return dict(zip(names, values, strict=True))

    def load(self, adapter: str | Path) -> ort.LoraAdapter:
        """The loaded adapter file (checked on first use, then cached; least recently used dropped first)."""
        path = self._resolve(adapter)
        stat = path.stat()
        key = (str(path.resolve()), stat.st_mtime_ns, stat.st_size)  # a rewritten file is loaded again
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        read_adapter_file(path, self.layout)  # UserError for a file of another model, layout, or a damaged one
        loaded = ort.LoraAdapter()
        loaded.Load(str(path))
        self._cache[key] = loaded
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return loaded

    @property
    def cached(self) -> int:
        """How many adapter files are loaded now."""
        return len(self._cache)

    def _resolve(self, adapter: str | Path) -> Path:
        return _resolve(self.out_dir, self.layout, adapter)

    def _feed(self, inputs: Mapping[str, Any]) -> dict[str, np.ndarray]:
        unknown = [k for k in inputs if k not in self.input_names]
        missing = [k for k in self.input_names if k not in inputs]
        if unknown or missing:
            raise UserError(f"{self.out_dir / MODEL_FILE} takes inputs {', '.join(self.input_names)}"
                            f"{'; unknown: ' + ', '.join(unknown) if unknown else ''}"
                            f"{'; missing: ' + ', '.join(missing) if missing else ''}.")
        return {k: _array(v) for k, v in inputs.items()}

    def _check_model(self) -> None:
        """The model's overridable inputs must be the layout's tensors (a model.onnx replaced by another one)."""
        have = {i.name: (tuple(i.shape), i.type) for i in self.session.get_overridable_initializers()}
        want = {t.name: t.shape for t in self.layout.tensors}
        if set(have) != set(want) or any(have[n][0] != want[n] for n in want):
            raise UserError(f"{self.out_dir / MODEL_FILE} does not match {ADAPTERS_DIR}/layout.json (other adapter "
                            "inputs); compile the model again with --swappable.")


class AotiSession:
    """OUT/model.aoti.pt2 (compiled with `--format aoti --swappable`), loaded once, with the adapter files of
    OUT/adapters swapped into its constants; files are checked against the layout and their values cached
    (at most `cache_size` adapters)."""

    def __init__(self, out_dir: str | Path, cache_size: int = 8) -> None:
        from .export.aoti import constant_names, load_aoti  # torch and its compiler stack: only this class needs them

        if cache_size < 1:
            raise UserError(f"AotiSession(cache_size={cache_size}): keep at least one adapter (cache_size >= 1).")
        self.out_dir = Path(out_dir)
        self.layout: Layout = read_layout(self.out_dir)
        package = self.out_dir / AOTI_FILE
        if not package.is_file():
            raise UserError(f"{self.out_dir}: no {AOTI_FILE}; compile the model with `--format aoti --swappable` "
                            "into this directory.")
        self.compiled = load_aoti(package)
        constants = set(constant_names(self.compiled))
        missing = [t.name for t in self.layout.tensors if t.name not in constants]
        if missing:  # a package compiled without --swappable, or replaced by another model's
            raise UserError(f"{package} does not match {ADAPTERS_DIR}/layout.json: it has no constant {missing[0]!r} "
                            f"({len(missing)} missing); compile the model again with `--format aoti --swappable`.")
        self.cache_size = cache_size
        self._cache: OrderedDict[tuple[str, int, int], dict[str, Any]] = OrderedDict()
        self.current: tuple[str, int, int] | None = None  # the file swapped in last (None: the active adapter)

    @property
    def adapters(self) -> list[str]:
        """The adapters compiled with the model (each has OUT/adapters/<name>.onnx_adapter)."""
        return list(self.layout.adapters)

    @property
    def active(self) -> str:
        """The adapter the package holds until the first swap (the spec's active adapter)."""
        return self.layout.active

    def swap(self, adapter: str | Path) -> None:
        """Load `adapter` (a compiled adapter's name or an .onnx_adapter path) into the package's constants, without
        recompiling; nothing is done where it is the one swapped in last."""
        from .export.aoti import swap_constants  # as in __init__

        key, values = self._load(adapter)
        if key != self.current:
            swap_constants(self.compiled, values)
            self.current = key

    def run(self, inputs: Mapping[str, Any], adapter: str | Path | None = None) -> dict[str, Any]:
        """Run the package with `adapter` swapped in first (None: the adapter swapped in last, initially the spec's
        active one); `inputs` and the returned {output name: tensor} are torch tensors."""
        import torch  # as in __init__

        if adapter is not None:
            self.swap(adapter)
        with torch.no_grad():
            return dict(self.compiled(**inputs))

    def _load(self, adapter: str | Path) -> tuple[tuple[str, int, int], dict[str, Any]]:
        import torch  # as in __init__

        path = _resolve(self.out_dir, self.layout, adapter)
        stat = path.stat()
        key = (str(path.resolve()), stat.st_mtime_ns, stat.st_size)  # a rewritten file is loaded again
        if key not in self._cache:
            # UserError for a file of another model or layout, or a damaged one; then torch tensors, once
            values = read_adapter_file(path, self.layout)
            self._cache[key] = {name: torch.from_numpy(value) for name, value in values.items()}
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        self._cache.move_to_end(key)
        return key, self._cache[key]


def _resolve(out_dir: Path, layout: Layout, adapter: str | Path) -> Path:
    """The file of `adapter`: a compiled adapter's name (OUT/adapters/<name>.onnx_adapter) or a path."""
    if isinstance(adapter, str) and adapter in layout.adapters:
        return out_dir / ADAPTERS_DIR / f"{adapter}{SUFFIX}"
    path = Path(adapter)
    if path.suffix == SUFFIX or path.is_file():
        if not path.is_file():
            raise UserError(f"adapter file {path} does not exist.")
        return path
    raise UserError(f"unknown adapter {str(adapter)!r}: the model's adapters are {', '.join(layout.adapters)}, or "
                    f"pass the path of an {SUFFIX} file made for this model (`fxadapt adapters export`).")


def _array(value: Any) -> np.ndarray:
    # torch tensors without importing torch: anything with .numpy() (detached first when it can be)
    if hasattr(value, "detach"):
        value = value.detach()
    if hasattr(value, "cpu"):
        value = value.cpu()
    return value.numpy() if hasattr(value, "numpy") else np.asarray(value)
