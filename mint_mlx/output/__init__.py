"""Writing what was planned: the shards and config, the model card and figures, the hub upload."""
