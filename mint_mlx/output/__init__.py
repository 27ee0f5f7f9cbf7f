"""Writing what was planned: the byte layout, the shards, the model card and figures, the hub upload."""
