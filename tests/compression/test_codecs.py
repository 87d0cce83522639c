"""Update codecs: hand-computed codes and bytes, hostile payloads, error feedback's invariant."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedpeft.compression import (
    CODECS,
    Codec,
    ErrorFeedback,
    build_codec,
    decode_state,
    encode_state,
    payload_nbytes,
)
from fedpeft.compression.blockwise import NF4_CODE
from fedpeft.errors import AggregationError, ConfigError, RegistryError


def roundtrip(codec: Codec, t: torch.Tensor) -> torch.Tensor:
    return decode_state(codec, encode_state(codec, {"w": t}), {"w": t.shape})["w"]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


# --- registry -----------------------------------------------------------------------------

def test_registry_names_flags_and_protocol() -> None:
    assert CODECS.names() == ["bf16", "fp16", "int8", "nf4", "none", "topk"]
    codecs = {name: build_codec(name, {}) for name in CODECS.names()}
    assert all(isinstance(c, Codec) for c in codecs.values())
    assert [n for n, c in codecs.items() if c.lossless] == ["none"]
    assert [n for n, c in codecs.items() if c.needs_error_feedback] == ["topk"]


@pytest.mark.parametrize(("name", "params", "message"), [
    ("nf4", {"block_size": 3}, "`block_size` must be a positive multiple of 2, got 3"),
    ("int8", {"block_size": 0}, "`block_size` must be a positive multiple of 2, got 0"),
    ("topk", {"fraction": 0.0}, "`fraction` must be in (0, 1]"),
    ("topk", {"fraction": 1.5}, "`fraction` must be in (0, 1]"),
    ("none", {"block_size": 64}, "invalid parameters for codec 'none'"),
])
def test_bad_hyperparameters_raise_config_error(name: str, params: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("]", r"\]")):
        build_codec(name, params)


def test_unknown_codec_lists_the_valid_names() -> None:
    with pytest.raises(RegistryError, match="nf4.*topk"):
        build_codec("nf3", {})


# --- none, fp16, bf16 ---------------------------------------------------------------------

def test_none_is_exact_and_does_not_alias_the_state() -> None:
    t = torch.randn(3, 4)
    sent = t.clone()
    arrays = encode_state(build_codec("none"), {"w": t})
    t.add_(1.0)  # the sender keeps training after encoding
    assert torch.equal(decode_state(build_codec("none"), arrays, {"w": (3, 4)})["w"], sent)
    assert payload_nbytes(arrays) == 4 * 12


def test_fp16_round_trip_error_bound() -> None:
    t = torch.randn(1000, generator=torch.Generator().manual_seed(0)) * 100
    err = (roundtrip(build_codec("fp16"), t) - t).abs()
    assert (err <= t.abs() * 2.0**-11 + 2.0**-25).all()  # half an ulp of 11 significant bits
    assert err.max() > 0  # not sent in fp32 by mistake


def test_fp16_refuses_values_beyond_its_range_naming_the_tensor() -> None:
    state = {"ok": torch.ones(2), "big": torch.tensor([1.0, -1e6])}
    with pytest.raises(AggregationError, match=r"tensor 'big'.*1e\+06.*fp16.*'bf16'"):
        encode_state(build_codec("fp16"), state)


def test_bf16_sends_bit_patterns_and_keeps_fp32_range() -> None:
    arrays = build_codec("bf16").encode(torch.tensor([1.0, -2.0]))
    assert arrays["data"].dtype == np.uint16
    assert arrays["data"].tolist() == [0x3F80, 0xC000]  # sign | 8-bit exponent | 7-bit mantissa
    back = roundtrip(build_codec("bf16"), torch.tensor([1e6, -3e-30]))
    assert torch.allclose(back, torch.tensor([1e6, -3e-30]), rtol=2.0**-8, atol=0)


# --- int8, nf4 ----------------------------------------------------------------------------

def test_int8_hand_computed_codes_and_zero_block() -> None:
    codec = build_codec("int8", {"block_size": 4})
    t = torch.tensor([1.0, -2.0, 0.5, 4.0, 0.0, 0.0, 0.0, 0.0])
    parts = codec.encode(t)
    # absmax 4: x / 4 * 127 = [31.75, -63.5, 15.875, 127] -> round half to even
    assert parts["q"].dtype == np.int8 and parts["q"].tolist() == [32, -64, 16, 127, 0, 0, 0, 0]
    assert parts["absmax"].dtype == np.float32 and parts["absmax"].tolist() == [4.0, 0.0]
    back = codec.decode(parts, t.shape)
    torch.testing.assert_close(back, torch.tensor([1.00787, -2.01575, 0.50394, 4.0, 0, 0, 0, 0]), atol=1e-5, rtol=0)
    assert torch.isfinite(back).all() and (back[4:] == 0).all()


def test_int8_pads_the_last_block_without_sending_the_padding() -> None:
    codec = build_codec("int8", {"block_size": 4})
    parts = codec.encode(torch.tensor([1.0, 2.0, 3.0, 4.0, -5.0]))
    assert parts["q"].tolist() == [32, 64, 95, 127, -127] and parts["absmax"].tolist() == [4.0, 5.0]
    assert payload_nbytes(parts) == 5 + 2 * 4


def test_nf4_hand_computed_codes_and_packing() -> None:
    codec = build_codec("nf4", {"block_size": 4})
    t = torch.tensor([2.0, -1.0, 0.4, 0.1, -3.0])
    parts = codec.encode(t)
    # block 1, absmax 2: x/2 = [1, -0.5, 0.2, 0.05]; nearest codes (NF4 table):
    #   1 -> 15 (1.0); -0.5 -> 2 (-0.525 beats -0.395); 0.2 -> 9 (0.161 beats 0.246);
    #   0.05 -> 8 (0.0796 beats 0.0). Block 2, absmax 3: -1 -> 0; padded with the code of 0 (7).
    # Two codes a byte, the first in the HIGH nibble: 0xF2, 0x98, 0x07.
    assert parts["q"].dtype == np.uint8 and parts["q"].tolist() == [0xF2, 0x98, 0x07]
    assert parts["absmax"].tolist() == [2.0, 3.0]
    assert payload_nbytes(parts) == 3 + 2 * 4
    expected = torch.stack([2 * NF4_CODE[15], 2 * NF4_CODE[2], 2 * NF4_CODE[9], 2 * NF4_CODE[8], 3 * NF4_CODE[0]])
    assert torch.equal(codec.decode(parts, t.shape), expected)
    assert NF4_CODE[2].item() == pytest.approx(-0.5250730514526367)


@pytest.mark.parametrize(("name", "zero_code"), [("int8", 0), ("nf4", 0x77)])
def test_blockwise_zero_tensor_sends_the_zero_code(name: str, zero_code: int) -> None:
    codec = build_codec(name, {"block_size": 4})
    parts = codec.encode(torch.zeros(2, 5))
    assert set(parts["q"].tolist()) == {zero_code}  # 0 / absmax 0 is not NaN (NF4's zero is code 7)
    assert parts["absmax"].tolist() == [0.0, 0.0, 0.0]
    assert torch.equal(codec.decode(parts, torch.Size([2, 5])), torch.zeros(2, 5))


@pytest.mark.parametrize("name", ["int8", "nf4"])
def test_blockwise_non_finite_block_stays_non_finite(name: str) -> None:
    t = torch.tensor([1.0, float("nan"), 2.0, 3.0, 1.0, -1.0, 0.5, 0.25])
    back = roundtrip(build_codec(name, {"block_size": 4}), t)
    assert torch.isnan(back[:4]).all()  # the server's update screening must still see it
    assert torch.isfinite(back[4:]).all() and rel_err(back[4:], t[4:]) < 0.15


def test_nf4_bytes_equal_bitsandbytes() -> None:
    bnb = pytest.importorskip("bitsandbytes.functional")
    t = torch.randn(1000, generator=torch.Generator().manual_seed(1))
    t[:64] = 0.0  # a zero block
    t[64:128] = t[64:128].clamp(-0.99, 0.99)
    t[64:79], t[79] = (NF4_CODE[:-1] + NF4_CODE[1:]) / 2, 1.0  # absmax 1: values exactly halfway
    q, state = bnb.quantize_4bit(t, blocksize=64, quant_type="nf4")
    parts = build_codec("nf4").encode(t)
    assert np.array_equal(q.reshape(-1).numpy(), parts["q"])
    assert np.array_equal(state.absmax.numpy(), parts["absmax"])


# --- topk ---------------------------------------------------------------------------------

def test_topk_hand_case() -> None:
    codec = build_codec("topk", {"fraction": 0.5})
    parts = codec.encode(torch.tensor([0.1, -3.0, 2.0, 0.5]))
    assert parts["idx"].dtype == np.int32 and parts["idx"].tolist() == [1, 2]
    assert parts["val"].dtype == np.float32 and parts["val"].tolist() == [-3.0, 2.0]
    assert torch.equal(codec.decode(parts, torch.Size([2, 2])), torch.tensor([[0.0, -3.0], [2.0, 0.0]]))


def test_topk_ties_take_the_lowest_indices() -> None:
    codec = build_codec("topk", {"fraction": 0.4})
    assert codec.encode(torch.tensor([1.0, -1.0, 1.0, -1.0, 0.5]))["idx"].tolist() == [0, 1]
    ones = torch.ones(1000)
    first, again = codec.encode(ones), codec.encode(ones.clone())
    assert first["idx"].tolist() == list(range(400))
    assert all(np.array_equal(first[p], again[p]) for p in ("idx", "val"))


def test_topk_sends_at_least_one_entry() -> None:
    parts = build_codec("topk", {"fraction": 0.01}).encode(torch.tensor([0.0, 0.0, -7.0]))
    assert parts["idx"].tolist() == [2] and parts["val"].tolist() == [-7.0]


@pytest.mark.parametrize("idx", [[2, 1], [1, 1], [0, 4], [-1, 2]])
def test_topk_refuses_indices_a_sender_never_produces(idx: list[int]) -> None:
    arrays = {"w/idx": np.array(idx, dtype=np.int32), "w/val": np.ones(2, dtype=np.float32)}
    with pytest.raises(AggregationError, match="tensor 'w'.*'idx'"):
        decode_state(build_codec("topk", {"fraction": 0.5}), arrays, {"w": (4,)})


# --- decode_state -------------------------------------------------------------------------

@pytest.fixture
def nf4_payload() -> dict[str, np.ndarray]:
    state = {"a": torch.randn(4, 8), "b": torch.randn(8)}
    return encode_state(build_codec("nf4", {"block_size": 8}), state)


def test_encode_state_keys_follow_the_state_order(nf4_payload: dict[str, np.ndarray]) -> None:
    assert list(nf4_payload) == ["a/q", "a/absmax", "b/q", "b/absmax"]


@pytest.mark.parametrize(("change", "message"), [
    (lambda p: p.pop("b/absmax"), r"tensor 'b'.*missing \['absmax'\]"),
    (lambda p: p.update({"b/q": p["b/q"][:-1]}), r"tensor 'b'.*'q' has 3 values of uint8, expected 4"),
    (lambda p: p.update({"b/absmax": p["b/absmax"].astype(np.float64)}), r"tensor 'b'.*float64"),
    (lambda p: p.update({"b/extra": np.zeros(1)}), r"tensor 'b'.*unexpected \['extra'\]"),
    (lambda p: p.update({"c/q": np.zeros(1, np.uint8)}), r"tensor\(s\).*\['c'\]"),
    (lambda p: [p.pop("a/q"), p.pop("a/absmax")], r"tensor 'a' is missing"),
])
def test_decode_state_rejects_payloads_that_do_not_fit(nf4_payload: dict, change, message: str) -> None:
    change(nf4_payload)
    with pytest.raises(AggregationError, match=message):
        decode_state(build_codec("nf4", {"block_size": 8}), nf4_payload, {"a": (4, 8), "b": (8,)})


def test_decode_state_rejects_a_shape_that_needs_other_sizes(nf4_payload: dict) -> None:
    with pytest.raises(AggregationError, match="tensor 'a'"):
        decode_state(build_codec("nf4", {"block_size": 8}), nf4_payload, {"a": (4, 9), "b": (8,)})


# --- error and bytes on a realistic tensor --------------------------------------------------

def test_error_order_and_bytes_ratios_on_a_normal_tensor() -> None:
    t = torch.randn(10_000, generator=torch.Generator().manual_seed(0))
    fp32 = payload_nbytes(encode_state(build_codec("none"), {"w": t}))
    ratio, err = {}, {}
    for name, params in [("fp16", {}), ("bf16", {}), ("int8", {}), ("nf4", {}), ("topk", {"fraction": 0.1})]:
        codec = build_codec(name, params)
        ratio[name] = fp32 / payload_nbytes(encode_state(codec, {"w": t}))
        err[name] = rel_err(roundtrip(codec, t), t)
    assert err["fp16"] < err["bf16"] < err["int8"] < err["nf4"] < 0.15
    assert ratio["fp16"] == ratio["bf16"] == 2.0
    assert ratio["int8"] > 3.9 and ratio["nf4"] > 7.0
    assert ratio["topk"] == 5.0


# --- error feedback -----------------------------------------------------------------------

def test_error_feedback_carries_what_was_not_sent() -> None:
    codec, ef = build_codec("topk", {"fraction": 0.5}), ErrorFeedback()
    deltas = [torch.tensor([4.0, 3.0, 1.0, 0.5]), torch.tensor([0.5, 0.0, 0.25, 0.125])]
    _, first = ef.compress(codec, {"w": deltas[0]})
    assert torch.equal(first["w"], torch.tensor([4.0, 3.0, 0.0, 0.0]))
    assert torch.equal(ef.residual["w"], torch.tensor([0.0, 0.0, 1.0, 0.5]))
    arrays, second = ef.compress(codec, {"w": deltas[1]})
    # carry = [0.5, 0, 1.25, 0.625]: the unsent 1.0 and 0.5 win now (without the residual,
    # indices 0 and 2 of the second delta would be sent)
    assert arrays["w/idx"].tolist() == [2, 3]
    assert torch.equal(second["w"], torch.tensor([0.0, 0.0, 1.25, 0.625]))
    # the defining invariant: nothing is lost, only delayed
    assert torch.equal(first["w"] + second["w"] + ef.residual["w"], deltas[0] + deltas[1])


def test_error_feedback_residual_survives_a_checkpoint() -> None:
    codec, ef = build_codec("int8", {"block_size": 4}), ErrorFeedback()
    gen = torch.Generator().manual_seed(2)
    ef.compress(codec, {"w": torch.randn(8, generator=gen)})
    restored = ErrorFeedback()
    restored.load_state_dict(ef.state_dict())
    delta = {"w": torch.randn(8, generator=gen)}
    assert ef.residual["w"].abs().max() > 0
    assert torch.equal(ef.compress(codec, delta)[1]["w"], restored.compress(codec, delta)[1]["w"])


def test_error_feedback_refuses_a_changed_adapter() -> None:
    codec, ef = build_codec("topk", {"fraction": 0.5}), ErrorFeedback()
    ef.compress(codec, {"w": torch.ones(4)})
    with pytest.raises(AggregationError, match="residual.*'w'"):
        ef.compress(codec, {"w": torch.ones(5)})
