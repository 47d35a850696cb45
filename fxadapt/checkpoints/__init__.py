"""Checkpoint formats, detected from the directory's `adapter_config.json`: AdapterHub (a "config" object,
adapterhub.py) or PEFT (a "peft_type", peft.py). loading.py picks the format for a `{"load": DIR}` spec entry.

This package's `__init__` imports nothing: the method registry reaches adapterhub.py through AdapterFusion
(compose/fusion_spec.py), while loading.py needs the registry, so loading.py sits above the methods and the
format modules below them."""
