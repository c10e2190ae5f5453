"""SoLoPO data: records, tokenisation, packing and context-parallel sharding."""
