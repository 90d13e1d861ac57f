"""Label and scribble maps: the one place of their value conventions (numpy-free, torch-free).

A label map holds ``0`` for background and ``k`` for label ``k``; a scribble map (and any training target
with gaps) holds :data:`IGNORE_INDEX` where nobody annotated. Every layer imports the values from here: the
losses (which ignore those voxels), the interactive session, the CLI and the Slicer module.
"""

from __future__ import annotations

#: "not annotated" in a scribble map or target: ignored by the losses, never a label
IGNORE_INDEX: int = 255

#: the largest label a map may hold (:data:`IGNORE_INDEX` is reserved)
MAX_LABEL: int = IGNORE_INDEX - 1
