"""Recipes without Megatron: the schema, YAML loading with overrides, sizing (parameters, FLOPs,
memory), where the data and the reference store live, validation before any process group, the
dry-run planner and Hugging Face config parsing. Imports neither megatron-core nor Triton."""
