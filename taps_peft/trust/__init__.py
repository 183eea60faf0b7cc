"""Trust: what lets a user rely on what they load, beside the tuner and entered only through its PEFT hooks.

- ``identity``: which base an adapter was trained on (a fingerprint of the base tensors it depends on, computed when
  it is saved and when it is loaded; another base warns with :class:`BaseModelMismatchWarning`).
- ``saves``: a save's files: ``weights_digest`` binds ``adapter_config.json`` to ``adapter_model.safetensors`` (and
  covers the config fields that change outputs); reading and writing the config, a save interrupted between its
  files, the card.
- ``load``: the checks of a load, all before anything is loaded (the file readable by PEFT, the tensors the adapter's
  own and fitting the base, never a pickle), and undoing the injection when one fails.
- ``state``: where a config was read from, kept beside it (what a loaded adapter needs is kept on the tuner).

Example:
    >>> import warnings, taps_peft
    >>> warnings.filterwarnings("error", category=taps_peft.BaseModelMismatchWarning)  # another base: refuse
"""

from .saves import read_config, saving, write_config
from .identity import BaseModelMismatchWarning, record_at_save
from .load import check_adapter_name, check_load, injecting, prepare_load
from .state import copy_notes, notes

__all__ = [
    "BaseModelMismatchWarning", "check_adapter_name", "check_load", "injecting",
    "copy_notes", "notes", "prepare_load", "read_config", "record_at_save", "saving", "write_config",
]
