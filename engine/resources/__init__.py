"""Files that ship inside the package (a wheel carries them as package data): the bundled model
configs ``models/<preset>/config.json`` (architecture only) and the fallback tokenizer
``tokenizer/fallback.json``. Found through ``importlib.resources``, so they load wherever Headroom
is installed, never relative to a checkout or the working directory.
"""

from importlib.resources import files
from pathlib import Path

#: Their folder. A real path, not just a Traversable: transformers reads a model folder by path, and
#: an installed package (wheel or editable) is unpacked on disk, where ``files`` is that folder.
RESOURCES = Path(files(__name__))
