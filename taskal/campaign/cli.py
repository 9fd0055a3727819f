"""What the campaign tools (``tools/al_round.py``, ``tools/campaign.py``,
``tools/demo_campaign.py``) share: quiet third-party notices and one-line user errors.

Light on purpose: the tools import it before mmengine, so the filters are in place before
mmengine's imports warn.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Callable
from typing import Any

#: what a user's mistake raises (``CampaignError`` is a ``ValueError``)
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, KeyError, OSError)
#: third-party deprecation notices that say nothing to a campaign's user
NOISE = (
    "pkg_resources is deprecated",
    "``build_loss`` would be deprecated",
    "Default ``avg_non_ignore`` is False",
)


def quiet_third_party() -> None:
    for message in NOISE:
        warnings.filterwarnings("ignore", message=message)


def run_tool(prog: str, main: Callable[[argparse.Namespace], Any], args: argparse.Namespace) -> int:
    """``main(args)``; a user's mistake prints ``<prog>: error: <one line>`` and returns 2
    (with ``args.debug``, it is raised with its traceback instead)."""
    try:
        main(args)
    except USER_ERRORS as err:
        if getattr(args, "debug", False):
            raise
        message = str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)
        line = message.splitlines()[0] if message else type(err).__name__
        print(f"{prog}: error: {line}", file=sys.stderr)
        return 2
    return 0
