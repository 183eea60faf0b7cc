"""Trust: what lets a user rely on what they load, beside the tuner and entered only through its PEFT hooks.

- ``identity``: which base an adapter was trained on (a fingerprint of the base tensors it depends on, computed when
  it is saved and when it is loaded; another base warns with :class:`BaseModelMismatchWarning`).
- ``digest``: how a save binds ``adapter_config.json`` to ``adapter_model.safetensors`` (``weights_digest``, covering
  the config fields that change outputs), and reading/writing the config.
- ``load``: the checks of a load, all before anything is loaded (the file readable by PEFT, the tensors the adapter's
  own and fitting the base, never a pickle), and undoing the injection when one fails.
- ``state``: what trust remembers about a config between PEFT's calls, kept beside it.

Example:
    >>> import warnings, taps_peft
    >>> warnings.filterwarnings("error", category=taps_peft.BaseModelMismatchWarning)  # another base: refuse
"""

from .digest import read_config, saving, write_config
from .identity import BaseModelMismatchWarning, record_at_save
from .load import after_injection, before_injection, check_adapter_name, check_load, prepare_load
from .state import copy_notes, notes

__all__ = [
    "BaseModelMismatchWarning", "after_injection", "before_injection", "check_adapter_name", "check_load",
    "copy_notes", "notes", "prepare_load", "read_config", "record_at_save", "saving", "write_config",
]
