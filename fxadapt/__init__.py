"""fxadapt: parameter-efficient adapters for any PyTorch model, as an FX graph compiler."""

__version__ = "0.1.0"
