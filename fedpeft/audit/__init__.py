"""Canary memorisation audit (Carlini et al. 2019, "The Secret Sharer").

:mod:`fedpeft.audit.canary` makes and plants the canaries (no torch, imported by the data
pipeline); :mod:`fedpeft.audit.exposure` scores them on a model; :mod:`fedpeft.audit.report`
audits a finished run folder (``fedpeft audit RUN_DIR``).
"""

from fedpeft.audit.canary import Canary, is_canary_row, make_canaries, plant

__all__ = ["Canary", "is_canary_row", "make_canaries", "plant"]
