"""Generic parts of composition: the spec-level rules (rules.py), AdapterFusion's config and loading
(fusion_spec.py) and the task_ids input (task_inputs.py). Each family lowers its own composed sites (its
package's LOWERERS, gathered by passes/lower_composition.py): methods/bottleneck/site.py (residual sites, with
AdapterFusion's module, fusion.py), methods/lora/site.py (projections), methods/prefix_tuning/site.py, and the
first-adapter parts methods/bottleneck/invertible_site.py and methods/reft/site.py."""
