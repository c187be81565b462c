"""DAM, the learned merge: layers with per-source coefficients (:mod:`~dam.adaptive.layers`), the losses
(:mod:`~dam.adaptive.losses`), the wrapper built by module surgery (:mod:`~dam.adaptive.model`), the coefficients
file (:mod:`~dam.adaptive.coefficients`) and the export to an ordinary checkpoint (:mod:`~dam.adaptive.export`)."""
