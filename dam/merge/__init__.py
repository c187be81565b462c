"""Classic (non-learned) merges, mergekit-compatible: the methods (:mod:`~dam.merge.methods`), their registry
(:mod:`~dam.merge.registry`), the mergekit YAML (:mod:`~dam.merge.config`) and the streaming engine
(:mod:`~dam.merge.engine`)."""
