"""fgray: Ray-distributed hyperparameter studies for self-supervised fine-grained recognition."""

__version__ = "0.1.0"
