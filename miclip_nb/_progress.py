"""Progress bars: tqdm everywhere, switched off by ``progress=False`` or the TQDM_DISABLE variable."""

from __future__ import annotations

import os


def bars_off(progress: bool = True) -> bool:
    """tqdm's ``disable`` flag: True when ``progress`` is False or $TQDM_DISABLE is set (as nbval
    runs do, so that stored notebook outputs stay comparable). An explicit ``disable=False`` would
    otherwise override the variable."""
    return (not progress) or os.environ.get("TQDM_DISABLE", "").strip().lower() not in ("", "0", "false", "no")
