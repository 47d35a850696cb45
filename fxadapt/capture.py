"""Capture a model as an FX GraphModule with `torch.export` (non-strict, dynamic batch and sequence).

Accepts a Hugging Face model directory or hub id (class from `config.architectures`, `task` overrides),
a built-in tiny model (`builtin:tiny-bert`), or any `nn.Module` with example inputs. The result keeps
every node's metadata (`nn_module_stack`, `val`), which the site finder and the visualizer read.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import pickle
import re
import traceback
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import fx
from torch.export import Dim
from torch.export.dynamic_shapes import refine_dynamic_shapes_from_suggested_fixes

from . import builtin
from .errors import UserError

TASKS = {
    "base": "AutoModel",
    "sequence-classification": "AutoModelForSequenceClassification",
    "token-classification": "AutoModelForTokenClassification",
    "causal-lm": "AutoModelForCausalLM",
    "masked-lm": "AutoModelForMaskedLM",
    "seq2seq-lm": "AutoModelForSeq2SeqLM",
    "question-answering": "AutoModelForQuestionAnswering",
    "image-classification": "AutoModelForImageClassification",
}


@dataclass
class Captured:
    """A captured model: the graph plus everything needed to re-export and verify it."""

    module: fx.GraphModule
    input_names: list[str]
    output_names: list[str]
    example_inputs: dict[str, torch.Tensor]
    dynamic_shapes: dict[str, dict[int, Any]]
    source: str
    config: Any = None
    info: dict[str, Any] = field(default_factory=dict)

    def inputs(self, batch: int, seq: int, seed: int = 1) -> dict[str, torch.Tensor]:
        """Deterministic inputs of another shape, for verification on a second shape."""
        return make_inputs(self.input_names, self.config, batch, seq, seed=seed)


def load_model(name: str, task: str | None = None) -> torch.nn.Module:
    """Load a Hugging Face model (directory or hub id) or a built-in, in eval mode, without KV cache."""
    if builtin.is_builtin(name):
        return builtin.build(name)
    import transformers  # heavy: built-in models and captured graphs never need it

    if task is not None and task not in TASKS:
        raise UserError(f"unknown --task {task!r}; choose one of: {', '.join(TASKS)}.")
    path = Path(name)
    if not path.exists() and (name.startswith((".", "/")) or name.count("/") > 1):
        raise UserError(f"model {name!r}: no such directory. Pass a Hugging Face model directory, a hub id, "
                        "or a built-in such as builtin:tiny-bert.")
    try:
        config = transformers.AutoConfig.from_pretrained(name)
    except (OSError, ValueError) as exc:
        raise UserError(f"model {name!r}: cannot read its config.json ({str(exc).splitlines()[0]}). Pass a local "
                        "model directory (hub downloads need network access).") from None
    config.use_cache = False
    if task is not None:
        cls = getattr(transformers, TASKS[task])
    elif getattr(config, "architectures", None):
        cls = getattr(transformers, config.architectures[0], None)
        if cls is None:
            raise UserError(f"model {name!r}: architecture {config.architectures[0]!r} is not in this "
                            "transformers version; pass --task to choose a class.")
    else:
        cls = transformers.AutoModel
    try:
        model = cls.from_pretrained(name, config=config)
    except (pickle.UnpicklingError, OSError, ValueError, RuntimeError) as exc:
        # torch's own message advises weights_only=False (never, for untrusted files); transformers 4.57 wraps
        # it in an OSError that advises from_tf=True, so the cause is looked up along the chain.
        if _caused_by(exc, pickle.UnpicklingError):
            raise UserError(f"model {name!r}: its pickle weights (pytorch_model.bin) hold objects other than "
                            "tensors, which fxadapt does not unpickle because unpickling can run code. Use a model "
                            "directory with model.safetensors, converted from a source you trust.") from None
        raise UserError(f"model {name!r}: cannot load its weights ({str(exc).splitlines()[0]}).") from None
    return model.eval()


def _caused_by(exc: BaseException | None, kind: type[BaseException]) -> bool:
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, kind):
            return True
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return False


def _max_positions(config: Any) -> int:
    for key in ("max_position_embeddings", "n_positions", "max_seq_len"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            # RoBERTa-style models offset positions by padding_idx + 1.
            offset = getattr(config, "pad_token_id", 0) or 0
            return value - offset - 1 if getattr(config, "model_type", "") in ("roberta", "xlm-roberta") else value
    return 512


def input_names_for(model: torch.nn.Module) -> list[str]:
    """The forward inputs fxadapt feeds: the model's main input (token ids, pixels, audio features or
    samples), an attention mask beside token ids, and decoder token ids for an encoder-decoder."""
    params = inspect.signature(model.forward).parameters
    main = getattr(model, "main_input_name", "input_ids")
    names = [main, "attention_mask"] if main == "input_ids" else [main]
    config = getattr(model, "config", None)
    if getattr(config, "is_encoder_decoder", False) and "decoder_input_ids" in params:
        names.append("decoder_input_ids")
    return [n for n in names if n in params]


def audio_samples(config: Any) -> int:
    """A raw-audio length (input_values) that leaves 16 frames after the convolutional front-end."""
    frames = 16
    for kernel, stride in reversed(list(zip(getattr(config, "conv_kernel", (400,)),
                                            getattr(config, "conv_stride", (320,)), strict=False))):
        frames = (frames - 1) * stride + kernel
    return frames


def make_inputs(names: list[str], config: Any, batch: int, seq: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Deterministic example inputs; the last row of the attention mask is padded."""
    gen = torch.Generator().manual_seed(seed)
    vocab = getattr(config, "vocab_size", 100) or 100
    inputs: dict[str, torch.Tensor] = {}
    for name in names:
        if name in ("input_ids", "decoder_input_ids"):
            inputs[name] = torch.randint(1, vocab, (batch, seq), generator=gen)
        elif name == "attention_mask":
            mask = torch.ones(batch, seq, dtype=torch.long)
            mask[-1, seq - max(1, seq // 4):] = 0
            inputs[name] = mask
        elif name == "pixel_values":
            size = getattr(config, "image_size", 32)
            channels = getattr(config, "num_channels", 3)
            inputs[name] = torch.randn(batch, channels, size, size, generator=gen)
        elif name == "input_features":  # log-mel features; Whisper-style encoders need the full window
            frames = 2 * getattr(config, "max_source_positions", 1500)
            inputs[name] = torch.randn(batch, getattr(config, "num_mel_bins", 80), frames, generator=gen)
        elif name == "input_values":  # raw audio samples
            inputs[name] = torch.randn(batch, audio_samples(config), generator=gen)
    return inputs


def sequence_bound(model: torch.nn.Module, config: Any) -> int:
    """The longest token sequence: the configured positions, less the positions a padding-aware position
    embedding reserves (RoBERTa-style models count positions from padding_idx + 1)."""
    bound = _max_positions(config)
    for name, module in model.named_modules():
        padding = getattr(module, "padding_idx", None)
        if isinstance(module, torch.nn.Embedding) and "position" in name.rpartition(".")[2] and padding is not None:
            bound = min(bound, module.num_embeddings - padding - 1)
    return bound


def dynamic_shapes_for(names: list[str], config: Any, bound: int | None = None) -> dict[str, dict[int, Any]]:
    """Dynamic batch for every input; dynamic sequence (bounded by the model's positions) for token inputs."""
    batch = Dim("batch", min=1, max=4096)
    seq = Dim("seq", min=1, max=bound or _max_positions(config))
    decoder_max = getattr(config, "max_target_positions", None) or _max_positions(config)
    shapes: dict[str, dict[int, Any]] = {}
    for name in names:
        if name in ("input_ids", "attention_mask"):
            shapes[name] = {0: batch, 1: seq}
        elif name == "decoder_input_ids":
            shapes[name] = {0: batch, 1: Dim("decoder_seq", min=1, max=decoder_max)}
        else:
            shapes[name] = {0: batch}
    return shapes


def use_exportable_experts(model: torch.nn.Module) -> None:
    """Mixture-of-experts layers in plain ATen ops: transformers 5.x runs experts through its own
    `grouped_mm` kernel op, which no exporter (ONNX, TorchScript) knows; `batched_mm` computes the same
    sums with batched matmuls. transformers 4.57 has no switch (and no such op)."""
    get = getattr(model, "get_experts_implementation", None)
    if get is None:
        return
    try:
        current = get()
    except Exception:  # a model without experts may refuse the question
        return
    values = current.values() if isinstance(current, dict) else [current]
    if any(value == "grouped_mm" for value in values):
        model.set_experts_implementation("batched_mm")


@contextlib.contextmanager
def exportable_masks() -> Iterator[None]:
    """While exporting, sdpa attention masks are built without `torch.vmap`: transformers 4.57 builds them
    with vmap, which export captures as higher-order-op submodules that do not survive graph rewriting.
    Its own exporter (integrations/executorch.py) swaps in `sdpa_mask_without_vmap`; this swaps it in for
    "sdpa" only for the export, so models that test `_attn_implementation == "sdpa"` (DistilBERT) are
    unaffected. transformers 5.x builds masks without vmap and has no such function: nothing to do."""
    try:  # transformers internals (heavy), only in transformers 4.x
        from transformers.integrations.executorch import sdpa_mask_without_vmap
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    except ImportError:
        yield
        return
    local = ALL_MASK_ATTENTION_FUNCTIONS._local_mapping
    previous = local.get("sdpa")
    ALL_MASK_ATTENTION_FUNCTIONS["sdpa"] = sdpa_mask_without_vmap
    try:
        yield
    finally:
        if previous is None:
            local.pop("sdpa", None)
        else:
            local["sdpa"] = previous


def output_names_of(outputs: Any) -> list[str]:
    """ModelOutput field names (or out0, out1, ... for tuples) of an eager forward's tensors."""
    if isinstance(outputs, torch.Tensor):
        return ["output"]
    if hasattr(outputs, "keys"):
        return [k for k, v in outputs.items() if isinstance(v, torch.Tensor)]
    return [f"out{i}" for i, _ in enumerate(outputs)]


def export_program(module: torch.nn.Module, inputs: dict[str, torch.Tensor],
                   dynamic_shapes: dict[str, dict[int, Any]]) -> torch.export.ExportedProgram:
    """torch.export (non-strict) with the given dynamic dims; errors name the model and say why."""
    try:
        with exportable_masks():
            return torch.export.export(module, (), dict(inputs), dynamic_shapes=dynamic_shapes, strict=False)
    except Exception as exc:  # torch.export raises many types; all mean "cannot capture"
        raise UserError(_capture_failure(module, exc)) from exc


def _capture_failure(module: torch.nn.Module, exc: Exception) -> str:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return f"torch.export could not capture {type(module).__name__}: {first}"


def export_refining_dims(module: torch.nn.Module, inputs: dict[str, torch.Tensor],
                         dynamic_shapes: dict[str, dict[int, Any]]
                         ) -> tuple[torch.export.ExportedProgram, dict[str, dict[int, Any]]]:
    """`export_program`, narrowed where the model's code constrains a dynamic dim (GPT-Neo's local attention
    guards `seq != max`): the dims torch.export suggests, or the bound less the value a guard excludes.
    Returns the program and the dims it was captured with."""
    for _ in range(3):
        try:
            with exportable_masks():
                return torch.export.export(module, (), dict(inputs), dynamic_shapes=dynamic_shapes,
                                           strict=False), dynamic_shapes
        except Exception as exc:  # torch.export raises many types; all mean "cannot capture"
            refined = _refined_dims(str(exc), dynamic_shapes)
            if refined is None or refined == dynamic_shapes:
                raise UserError(_capture_failure(module, exc)) from exc
            dynamic_shapes = refined
    return export_program(module, inputs, dynamic_shapes), dynamic_shapes


def _refined_dims(message: str, shapes: dict[str, dict[int, Any]]) -> dict[str, dict[int, Any]] | None:
    if "Constraints violated" not in message:
        return None
    if "Suggested fixes:" in message:
        try:
            refined = refine_dynamic_shapes_from_suggested_fixes(message, shapes)
        except Exception:  # an unparsable suggestion: report the original failure
            return None
        # A dim specialized to a constant is static: leave it out, as for a dim never made dynamic.
        return {name: {d: v for d, v in dims.items() if not isinstance(v, int)} for name, dims in refined.items()}
    excluded = {m.group(1): int(m.group(2)) for m in re.finditer(
        r"Not all values of (\w+) = .*? satisfy the generated guard .*? != (\d+)", message)}
    if not excluded:
        return None

    made: dict[str, Any] = {}  # one new Dim per name, shared by every input that used the old one

    def narrowed(dim: Any) -> Any:
        bound = excluded.get(getattr(dim, "__name__", None))
        if bound is None or dim.max != bound:
            return dim
        return made.setdefault(dim.__name__, Dim(dim.__name__, min=dim.min, max=bound - 1))

    return {name: {d: narrowed(v) for d, v in dims.items()} for name, dims in shapes.items()}


def capture(model: torch.nn.Module | str, example_inputs: dict[str, torch.Tensor] | None = None,
            task: str | None = None, batch: int = 2, seq: int = 8,
            dynamic_shapes: dict[str, dict[int, Any]] | None = None) -> Captured:
    """Capture a model (a name to load, or a module) as a GraphModule with dynamic dims; given example inputs
    get a dynamic batch only, unless their `dynamic_shapes` are given too (MultiTask's, compose/task_inputs.py)."""
    source = model if isinstance(model, str) else type(model).__name__
    if isinstance(model, str):
        model = load_model(model, task)
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "use_cache"):
        config.use_cache = False
    use_exportable_experts(model)
    if example_inputs is None:
        names = input_names_for(model)
        bound = sequence_bound(model, config)
        if seq > bound:  # a Split's sizes pin the sequence length; the model must have that many positions
            raise UserError(f"the spec pins the sequence length to {seq} (a Split's splits add up to it), but model "
                            f"{source!r} has {bound} positions; make the splits add up to at most {bound}.")
        example_inputs = make_inputs(names, config, batch, seq)
        shapes = dynamic_shapes_for(names, config, bound)
    else:
        names = list(example_inputs)
        batch_dim = Dim("batch", min=1, max=4096)
        shapes = dynamic_shapes or {n: {0: batch_dim} for n in names}
    model.eval()
    eager = run_own_forward(model, example_inputs, source)
    ep, shapes = export_refining_dims(model, example_inputs, shapes)
    if any(isinstance(n.target, torch._ops.HigherOrderOperator) for n in ep.graph.nodes):
        # autocast / no_grad regions (transformers 4.57's rotary embeddings) are captured as wrapper
        # submodules that graph rewriting does not carry along; inlined, they are plain ops.
        ep = ep.run_decompositions({})
    module = ep.module()
    canonical_projections(module)
    return Captured(
        module=module,
        input_names=names,
        output_names=output_names_of(eager),
        example_inputs=example_inputs,
        dynamic_shapes=shapes,
        source=source,
        config=config,
        info={"class": type(model).__name__, "base_model_prefix": getattr(model, "base_model_prefix", "")},
    )


def run_own_forward(model: torch.nn.Module, inputs: dict[str, torch.Tensor], source: str) -> Any:
    """The model's own forward on the example inputs; its failure (e.g. Nystromformer's fixed length): UserError."""
    try:
        with torch.no_grad():
            return model(**inputs)
    except Exception as exc:
        at = traceback.extract_tb(exc.__traceback__)[-1]
        raise UserError(
            f"model {source!r} fails in its own forward on the example inputs fxadapt captures it with ("
            f"{', '.join(f'{n} {tuple(t.shape)}' for n, t in inputs.items())}"
            f"{'; the attention mask pads the last row' if 'attention_mask' in inputs else ''}): "
            f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:200]} (at {Path(at.filename).name}:"
            f"{at.lineno}, in {at.name}). fxadapt captures and verifies a model at a dynamic batch size and "
            "sequence length, so it must run at any of them (up to its positions): check its config for a length "
            "it fixes (e.g. a segment or landmark length), or compile a model that runs at these shapes.") from exc


_TRANSPOSES = {torch.ops.aten.t.default, torch.ops.aten.numpy_T.default}
_MATMULS = {torch.ops.aten.matmul.default, torch.ops.aten.mm.default}


def canonical_projections(gm: fx.GraphModule) -> int:
    """`matmul(x, W.T)` of a stored 2-D weight W (Falcon's own Linear) rewritten in place as `linear(x, W)`:
    the same product, in the one spelling the site finder and every method read as a projection. The
    node keeps its name and metadata; the transpose is dropped when nothing else uses it. Returns the count."""
    count = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in _MATMULS or len(node.args) != 2:
            continue
        x, weight_t = node.args
        if not (isinstance(weight_t, fx.Node) and weight_t.op == "call_function" and weight_t.target in _TRANSPOSES):
            continue
        weight = weight_t.args[0]
        if not (isinstance(weight, fx.Node) and weight.op == "get_attr"):
            continue
        stored = functools.reduce(getattr, weight.target.split("."), gm)
        if not isinstance(stored, torch.Tensor) or stored.dim() != 2:
            continue
        node.target, node.args = torch.ops.aten.linear.default, (x, weight)
        node.meta["fxadapt_canonical"] = "matmul(x, W.T) -> linear(x, W)"
        if not weight_t.users:
            gm.graph.erase_node(weight_t)
        count += 1
    if count:
        gm.recompile()
    return count


def flatten_outputs(outputs: Any) -> list[torch.Tensor]:
    """The output tensors in `output_names` order (ModelOutput values, tuple items or one tensor)."""
    if isinstance(outputs, torch.Tensor):
        return [outputs]
    if hasattr(outputs, "keys"):
        return [v for v in outputs.values() if isinstance(v, torch.Tensor)]
    return [v for v in outputs if isinstance(v, torch.Tensor)]
