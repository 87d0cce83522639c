"""Update codecs: compress a state (or a delta) into NumPy arrays for the wire, and back.

A codec encodes one fp32 tensor into named parts; :func:`encode_state` flattens a whole state
into ``{f"{tensor}/{part}": array}``, what a Flower ``ArrayRecord`` carries, and
:func:`decode_state` rebuilds it against the receiver's own shapes. Codecs are registered by
name in :data:`CODECS`, one file each:

========  ==============================  =================================
name      what is sent                    bytes for n values (fp32: 4n)
========  ==============================  =================================
none      fp32                            4n
fp16      IEEE half                       2n
bf16      bfloat16 bits as uint16         2n
int8      blockwise absmax, linear int8   n + 4 ceil(n / 256)
nf4       blockwise absmax, NF4 4-bit     ceil(n / 2) + 4 ceil(n / 64)
topk      largest 10% (idx, val)          8 round(0.1 n)
========  ==============================  =================================

(block sizes and the top-k fraction are the defaults). Top-k needs :class:`ErrorFeedback`.
Pure tensor code: no Flower, no threads.
"""

from __future__ import annotations

from typing import Any

# Importing each module registers its classes in CODECS.
from fedpeft.compression import blockwise, half, none, topk  # noqa: F401
from fedpeft.compression.base import CODECS, Codec
from fedpeft.compression.blockwise import Int8Blockwise, NF4Blockwise
from fedpeft.compression.error_feedback import ErrorFeedback
from fedpeft.compression.half import BFloat16, Float16
from fedpeft.compression.none import NoCompression
from fedpeft.compression.topk import TopK
from fedpeft.compression.wire import decode_state, encode_state, payload_nbytes
from fedpeft.params import instantiate

__all__ = [
    "CODECS",
    "BFloat16",
    "Codec",
    "ErrorFeedback",
    "Float16",
    "Int8Blockwise",
    "NF4Blockwise",
    "NoCompression",
    "TopK",
    "build_codec",
    "decode_state",
    "encode_state",
    "payload_nbytes",
]


def build_codec(name: str, params: dict[str, Any] | None = None) -> Codec:
    """Construct the codec registered as ``name`` with hyperparameters ``params``.

    Args:
        name: A registered name (``"nf4"``), a ``path/file.py:Class`` plugin or an entry point
            in group ``fedpeft.codecs``.
        params: Keyword arguments of the class's ``__init__`` (``{"block_size": 128}``).

    Returns:
        The codec instance.

    Raises:
        RegistryError: if ``name`` is unknown (the message lists the valid names).
        ConfigError: if ``params`` has unknown keys, wrong types or out-of-range values.
    """
    return instantiate(CODECS, name, params, "codec")
