"""Progress bars for training loops: the ones in :mod:`distil.progress`, where every package can
reach them (data and evaluation show progress too, and must not import ``training``)."""

from distil.progress import is_main_process, phase_progress, progress_bar, rate_text

__all__ = ["is_main_process", "phase_progress", "progress_bar", "rate_text"]
