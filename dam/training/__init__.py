"""Training DAM coefficients: the run config (:mod:`~dam.training.config`), the data (:mod:`~dam.training.data`),
the teacher cache (:mod:`~dam.training.teacher_cache`), the run folder (:mod:`~dam.training.run_dir`) and the one
training loop (:mod:`~dam.training.loop`)."""
