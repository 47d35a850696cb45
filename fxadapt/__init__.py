"""fxadapt: adapters for any PyTorch model, as an FX graph compiler."""
