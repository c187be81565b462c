"""Checkpoint I/O, under everything else: :mod:`~dam.io.checkpoint` reads, :mod:`~dam.io.writer` writes
sharded safetensors atomically, :mod:`~dam.io.model_folder` writes the other files of a model folder."""
