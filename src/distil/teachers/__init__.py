"""Teachers: the ``Teacher`` protocol and the teachers that satisfy it.

A recipe asks a teacher for what its loss needs and never branches on where the teacher lives
(a model in this process, a cache on disk, an ensemble, an API through its cache). Every teacher
is frozen, in eval mode, run under ``torch.no_grad()``, with its own dtype and device.
"""

from distil.teachers.base import Batch, Teacher, TeacherOutput, TeacherSignal
from distil.teachers.live import LiveLMTeacher, head_of, hidden_path_matches

__all__ = [
    "Batch",
    "LiveLMTeacher",
    "Teacher",
    "TeacherOutput",
    "TeacherSignal",
    "head_of",
    "hidden_path_matches",
]
