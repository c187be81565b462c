"""The classic merge methods as pure tensor functions (torch and the standard library only), one module per
family. The registry (:mod:`dam.merge.registry`) names them and checks their parameters."""
