"""fxadapt: parameter-efficient adapters for any PyTorch model, as an FX graph compiler."""

__version__ = "0.1.0"

_BLOCKS = ("AdapterCompositionBlock", "Average", "BatchSplit", "Fuse", "MultiTask", "Parallel", "Split", "Stack")
__all__ = ["AdaptedModel", "adapt", *_BLOCKS]


def __getattr__(name: str):
    # Lazy: `import fxadapt` (and the CLI's --help) stays fast; torch/transformers load on first use.
    if name in _BLOCKS:
        from . import blocks

        return getattr(blocks, name)
    if name in __all__:
        from . import model

        return getattr(model, name)
    raise AttributeError(f"module 'fxadapt' has no attribute {name!r}")
