"""The offline demo: its tasks (:mod:`~dam.demo.tasks`), the family build (:mod:`~dam.demo.family`), the
end-to-end comparison (:mod:`~dam.demo.run`) and its configs (``configs/``, package data)."""
