"""Composition blocks lowered into the graph: one composed module per adapted site (bottleneck_site.py,
prefix_site.py; the LoRA family's is its own, methods/lora/site.py), the first-adapter parts
(invertible_site.py, reft_site.py), AdapterFusion (fusion.py, fusion_spec.py) and the spec-level rules (rules.py)."""
