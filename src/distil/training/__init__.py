"""Loop pieces: accelerate setup, optimiser, schedule, checkpoint/resume, metrics, progress."""
