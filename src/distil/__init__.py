"""distil: a knowledge-distillation toolkit.

Turns a large teacher model into a small, fast student that keeps what matters.
"""

__version__ = "0.1.0"
