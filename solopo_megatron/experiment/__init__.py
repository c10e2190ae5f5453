"""``solopo-experiment``: train recipe variants side by side, then compare them (JSON, table, plots)."""
