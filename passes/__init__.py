"""Graph passes: rewrite (insert adapters) and optimization (merge LoRA, cleanup)."""
