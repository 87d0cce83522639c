"""FlowerTransport's records with compression and heterogeneous ranks, without Flower processes:
the broadcast record a site decodes, and the server's rebuild of the site's reply."""

from __future__ import annotations

import pytest


@pytest.mark.parametrize(("compression", "rank"), [(None, None), (None, 2), ({"up": {"name": "int8", "block_size": 8},
                                                                             "down": {"name": "bf16"}}, 2)])
def test_the_transport_records_round_trip_through_a_sites_codec_and_rank(compression, rank):
    # FlowerTransport's broadcast record -> the site's decoding, training, encoding -> the server's rebuild
    import torch

    from fedpeft.compression.link import Link
    from fedpeft.config import CompressionConfig
    from fedpeft.deploy.records import arrays_to_record
    from fedpeft.deploy.transport import _broadcast_record, _received
    from fedpeft.ranks import pad, truncate

    link = Link.from_config(CompressionConfig(**(compression or {})))
    g = torch.Generator().manual_seed(0)
    state = {"m.lora_A.default.weight": torch.randn(4, 6, generator=g),
             "m.lora_B.default.weight": torch.randn(5, 4, generator=g)}
    record = _broadcast_record(link, state, rank)
    arrays = {k: a.numpy() for k, a in record.items()}
    received, start = link.client_start(arrays, {k: v.shape for k, v in state.items()}, rank)
    keep = rank or 4
    assert torch.equal(start["m.lora_A.default.weight"][keep:], torch.zeros(4 - keep, 6))
    trained = {k: v + 0.01 * (1 + torch.arange(v.numel()).view(v.shape) % 3) for k, v in start.items()}
    reply = arrays_to_record(link.client_reply(received, trained, rank, None))
    got = _received(link, reply, state, rank)
    expected = pad(truncate(trained, rank), {k: v.shape for k, v in state.items()})  # the site's components only
    tol = 0.05 if compression else 0.0  # bf16 down, int8 up (rebuilt on the exact global)
    assert all(float((got[k] - expected[k]).abs().max()) <= tol for k in state)
