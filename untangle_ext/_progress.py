"""One switch for every progress bar: the caller's ``progress`` flag and tqdm's own ``TQDM_DISABLE``."""
from __future__ import annotations

import os

_FALSE = ("", "0", "false", "no", "off")


def bars_off(wanted: bool = True) -> bool:
    """The ``disable=`` to pass to tqdm: True unless ``wanted`` and ``$TQDM_DISABLE`` is unset or false.

    tqdm reads ``TQDM_DISABLE`` only as a default, which an explicit ``disable=`` overrides; this keeps it working.
    """
    return not wanted or os.environ.get("TQDM_DISABLE", "").strip().lower() not in _FALSE
