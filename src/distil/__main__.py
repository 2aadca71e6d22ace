"""``python -m distil`` is the ``distil`` command (also what ``torchrun -m distil`` launches)."""

from distil.cli import app

if __name__ == "__main__":
    app(prog_name="distil")
