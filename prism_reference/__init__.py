"""The reference MoE: a small Mixtral-layout model prism trains itself on built-in text (no download)."""
