"""Adapter math: tiny hand-computed examples, and "merged forward == bypass forward" on random shapes.

Tolerance for the property tests (fp32 throughout): 1e-5 relative to the output's scale.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lorakit import formats
from lorakit.adapters import select

T = torch.tensor


def merged(roles: dict, w: torch.Tensor, strength: float = 1.0) -> torch.Tensor:
    adapter, unused, _ = select(roles, None)
    assert adapter is not None and not unused
    w = w.clone().float()
    adapter.apply_(w, strength)
    return w


# ---- hand-computed 2x3 examples ------------------------------------------------------------
def test_lora_by_hand() -> None:
    roles = {"up": T([[1.0], [2.0]]), "down": T([[1.0, 0.0, -1.0]]), "alpha": T(2.0)}
    # scale = alpha / rank = 2; strength 0.5 -> dW = up @ down
    assert torch.equal(merged(roles, torch.zeros(2, 3), 0.5), T([[1.0, 0, -1], [2, 0, -2]]))


def test_loha_by_hand() -> None:
    roles = {"hada_w1_a": T([[1.0], [2.0]]), "hada_w1_b": T([[1.0, 1, 1]]),
             "hada_w2_a": T([[1.0], [1.0]]), "hada_w2_b": T([[0.0, 1, 2]]), "alpha": T(1.0)}
    # [[1,1,1],[2,2,2]] * [[0,1,2],[0,1,2]]
    assert torch.equal(merged(roles, torch.ones(2, 3)), T([[1.0, 2, 3], [1, 3, 5]]))


def test_lokr_by_hand_full_factors_ignore_alpha() -> None:
    roles = {"lokr_w1": T([[1.0], [2.0]]), "lokr_w2": T([[1.0, 0, 3]]), "alpha": T(100.0)}
    assert torch.equal(merged(roles, torch.zeros(2, 3)), T([[1.0, 0, 3], [2, 0, 6]]))


def test_lokr_factorised_uses_alpha_over_rank() -> None:
    roles = {"lokr_w1": T([[1.0], [2.0]]), "lokr_w2_a": T([[2.0]]), "lokr_w2_b": T([[1.0, 0, 3]]), "alpha": T(0.5)}
    # rank 1 (w2_b), scale 0.5: kron([[1],[2]], [[2,0,6]]) * 0.5
    assert torch.equal(merged(roles, torch.zeros(2, 3)), T([[1.0, 0, 3], [2, 0, 6]]))


def test_full_diff_by_hand() -> None:
    roles = {"diff": T([[1.0, 2, 3], [4, 5, 6]])}
    assert torch.equal(merged(roles, torch.ones(2, 3), 0.5), T([[1.5, 2, 2.5], [3, 3.5, 4]]))


def test_dora_by_hand_output_axis() -> None:
    # dW = 0: W' = m * W / ||W|| per output row
    roles = {"up": torch.zeros(2, 1), "down": torch.zeros(1, 3), "dora_scale": T([[10.0], [2.0]])}
    got = merged(roles, T([[3.0, 0, 4], [0, 1, 0]]))
    assert torch.allclose(got, T([[6.0, 0, 8], [0, 2, 0]]), rtol=1e-6)
    half = merged(roles, T([[3.0, 0, 4], [0, 1, 0]]), 0.5)  # strength blends W + s (W' - W)
    assert torch.allclose(half, T([[4.5, 0, 6], [0, 1.5, 0]]), rtol=1e-6)


def test_dora_input_axis() -> None:
    roles = {"up": torch.zeros(2, 1), "down": torch.zeros(1, 3), "dora_scale": T([[1.0, 1.0, 2.0]])}
    got = merged(roles, T([[3.0, 0, 4], [4, 2, 0]]))
    assert torch.allclose(got, T([[0.6, 0, 2], [0.8, 1, 0]]), rtol=1e-6)


def test_oft_by_hand() -> None:
    # one 2x2 block, B = [[0,1],[0,0]] -> Q = [[0,1],[-1,0]] -> R = [[0,1],[-1,0]]; rows mixed by R^T
    roles = {"oft_blocks": T([[[0.0, 1.0], [0.0, 0.0]]])}
    got = merged(roles, T([[1.0, 2, 3], [4, 5, 6]]))
    assert torch.allclose(got, T([[-4.0, -5, -6], [1, 2, 3]]), atol=1e-6)


def test_glora_by_hand() -> None:
    roles = {"a1": T([[1.0], [1.0], [1.0]]), "a2": T([[1.0, 2, 3]]), "b1": T([[1.0], [0.0]]), "b2": T([[0.0, 0, 1]])}
    w = T([[1.0, 0, 0], [0, 1, 0]])
    # (W @ a1) @ a2 + b1 @ b2 = [[1,2,3],[1,2,3]] + [[0,0,1],[0,0,0]]
    assert torch.equal(merged(roles, w), w + T([[1.0, 2, 4], [1, 2, 3]]))


# ---- merged forward == bypass forward ------------------------------------------------------
def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    assert torch.allclose(a, b, rtol=1e-5, atol=1e-5 * float(b.abs().max())), float((a - b).abs().max())


@pytest.mark.parametrize("out_f, in_f, r", [(7, 5, 2), (33, 17, 4), (64, 64, 8)])
def test_lora_linear_bypass(out_f: int, in_f: int, r: int) -> None:
    g = torch.Generator().manual_seed(out_f)
    w, x = torch.randn(out_f, in_f, generator=g), torch.randn(9, in_f, generator=g)
    up, down = torch.randn(out_f, r, generator=g), torch.randn(r, in_f, generator=g)
    roles = {"up": up, "down": down, "alpha": T(float(r) / 2)}
    s = 0.8
    _close(x @ merged(roles, w, s).T, x @ w.T + s * 0.5 * ((x @ down.T) @ up.T))


@pytest.mark.parametrize("k", [1, 3])
def test_locon_conv_bypass(k: int) -> None:
    g = torch.Generator().manual_seed(k)
    w, x = torch.randn(6, 4, k, k, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    down, up = torch.randn(3, 4, k, k, generator=g), torch.randn(6, 3, 1, 1, generator=g)
    roles = {"up": up, "down": down}
    y_merged = F.conv2d(x, merged(roles, w), padding=k // 2)
    y_bypass = F.conv2d(x, w, padding=k // 2) + F.conv2d(F.conv2d(x, down, padding=k // 2), up)
    _close(y_merged, y_bypass)


def test_locon_tucker_bypass() -> None:
    g = torch.Generator().manual_seed(1)
    w, x = torch.randn(6, 4, 3, 3, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    down, mid, up = torch.randn(2, 4, 1, 1, generator=g), torch.randn(2, 2, 3, 3, generator=g), torch.randn(6, 2, 1, 1, generator=g)
    roles = {"up": up, "down": down, "mid": mid}
    y_bypass = F.conv2d(x, w, padding=1) + F.conv2d(F.conv2d(F.conv2d(x, down), mid, padding=1), up)
    _close(F.conv2d(x, merged(roles, w), padding=1), y_bypass)


def test_lokr_bypass_uses_kron_identity() -> None:
    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(3, 2, generator=g), torch.randn(5, 7, generator=g)
    w, x = torch.randn(15, 14, generator=g), torch.randn(4, 14, generator=g)
    # (A kron B) vec-row(X) == vec-row(A X' B^T) with X' = x reshaped [2, 7]
    y_bypass = x @ w.T + torch.stack([(a @ xi.reshape(2, 7) @ b.T).reshape(-1) for xi in x])
    _close(x @ merged({"lokr_w1": a, "lokr_w2": b}, w).T, y_bypass)


def test_loha_bypass() -> None:
    g = torch.Generator().manual_seed(3)
    w, x = torch.randn(8, 6, generator=g), torch.randn(5, 6, generator=g)
    f = {n: torch.randn(*s, generator=g) for n, s in
         {"hada_w1_a": (8, 2), "hada_w1_b": (2, 6), "hada_w2_a": (8, 2), "hada_w2_b": (2, 6)}.items()}
    dw = (f["hada_w1_a"] @ f["hada_w1_b"]) * (f["hada_w2_a"] @ f["hada_w2_b"])
    y_bypass = x @ w.T + 0.5 * (2.0 / 2) * torch.einsum("oi,bi->bo", dw, x)  # strength * alpha / rank
    _close(x @ merged({**f, "alpha": T(2.0)}, w, 0.5).T, y_bypass)


def test_oft_bypass_and_orthogonality() -> None:
    """Against the Cayley transform written out independently (float64, a solve instead of an
    inverse): R = (I + Q)(I - Q)^-1 with Q = B - B^T per block; the output is R^T-block (W x)."""
    g = torch.Generator().manual_seed(4)
    blocks = torch.randn(3, 4, 4, generator=g) * 0.1
    w, x = torch.randn(12, 5, generator=g), torch.randn(6, 5, generator=g)
    q = blocks.double() - blocks.double().transpose(1, 2)
    eye = torch.eye(4, dtype=torch.float64).expand(3, 4, 4)
    r = torch.linalg.solve((eye - q).transpose(1, 2), (eye + q).transpose(1, 2)).transpose(1, 2)
    assert torch.allclose(r @ r.transpose(1, 2), eye, atol=1e-12)
    rot = torch.block_diag(*r).T.float()  # y = R^T-block (W x)
    _close(x @ merged({"oft_blocks": blocks}, w).T, (x @ w.T) @ rot.T)


def test_dora_bypass_peft_definition() -> None:
    g = torch.Generator().manual_seed(5)
    w, x = torch.randn(10, 6, generator=g), torch.randn(3, 6, generator=g)
    up, down, m = torch.randn(10, 2, generator=g), torch.randn(2, 6, generator=g), torch.rand(10, generator=g) + 0.5
    wc = w + 2.0 * (up @ down)
    y_bypass = (m / (wc.norm(dim=1) + torch.finfo(torch.float32).eps)) * (x @ wc.T)
    _close(x @ merged({"up": up, "down": down, "alpha": T(4.0), "dora_scale": m}, w).T, y_bypass)


def test_several_adapters_in_one_module_last_wins_with_note() -> None:
    roles = {"up": torch.ones(2, 1), "down": torch.ones(1, 3), "diff": torch.full((2, 3), 5.0)}
    adapter, unused, notes = select(roles, None)
    assert type(adapter).__name__ == "Full" and set(unused) == {"up", "down"} and "last" in notes[0]


def test_ia3_by_hand() -> None:
    w = T([[1.0, 2, 3], [4, 5, 6]])
    assert torch.equal(merged({"ia3_weight": T([1.0, -0.5])}, w), T([[2.0, 4, 6], [2, 2.5, 3]]))
    on_input = {"ia3_weight": T([1.0, 0.0, -1.0]), "on_input": T(True)}
    assert torch.equal(merged(on_input, w, 0.5), T([[1.5, 2, 1.5], [6, 5, 3]]))


def test_norm_deltas() -> None:
    # LyCORIS norm modules' w_norm / b_norm are read as the full-delta roles diff / diff_b
    roles = {formats.split_key(f"lora_unet_x.{n}", lambda m: True)[1]: v
             for n, v in (("w_norm", T([1.0, 2.0])), ("b_norm", T([0.5, 0.5])))}
    adapter, unused, _ = select(roles, None)
    w = T([1.0, 1.0])
    adapter.apply_(w, 2.0)
    assert torch.equal(w, T([3.0, 5.0])) and torch.equal(adapter.bias_delta(), T([0.5, 0.5])) and not unused


def test_boft_by_hand() -> None:
    # one stage, one 2x2 block: R = [[0,1],[-1,0]] applied to the rows (LyCORIS: R @ W)
    roles = {"oft_blocks": T([[[[0.0, 1.0], [0.0, 0.0]]]])}
    assert torch.allclose(merged(roles, T([[1.0, 2, 3], [4, 5, 6]])), T([[4.0, 5, 6], [-1, -2, -3]]), atol=1e-6)


def test_boft_is_orthogonal_on_rows_and_identity_at_zero_strength() -> None:
    g = torch.Generator().manual_seed(6)
    blocks = torch.randn(3, 4, 4, 4, generator=g) * 0.1  # m=3 stages, 4 blocks of 4 -> 16 rows
    w = torch.randn(16, 5, generator=g)
    out = merged({"oft_blocks": blocks}, w)
    assert torch.allclose(out.norm(dim=0), w.norm(dim=0), rtol=1e-5)  # an orthogonal map of the rows
    assert not torch.allclose(out, w)
    assert torch.allclose(merged({"oft_blocks": blocks}, w, 0.0), w)


def test_loha_and_lokr_on_conv_weights() -> None:
    """LyCORIS stores conv factors flattened ([r, in*k*k]); the delta is reshaped to the kernel."""
    g = torch.Generator().manual_seed(7)
    w, x = torch.randn(8, 4, 3, 3, generator=g), torch.randn(2, 4, 6, 6, generator=g)
    f = {"hada_w1_a": torch.randn(8, 2, generator=g), "hada_w1_b": torch.randn(2, 36, generator=g),
         "hada_w2_a": torch.randn(8, 2, generator=g), "hada_w2_b": torch.randn(2, 36, generator=g)}
    dw = ((f["hada_w1_a"] @ f["hada_w1_b"]) * (f["hada_w2_a"] @ f["hada_w2_b"])).reshape(8, 4, 3, 3)
    _close(F.conv2d(x, merged(f, w), padding=1), F.conv2d(x, w, padding=1) + F.conv2d(x, dw, padding=1))
    k = {"lokr_w1": torch.randn(2, 2, generator=g), "lokr_w2": torch.randn(4, 2, 3, 3, generator=g)}
    dk = torch.kron(k["lokr_w1"][:, :, None, None], k["lokr_w2"])
    _close(F.conv2d(x, merged(k, w), padding=1), F.conv2d(x, w, padding=1) + F.conv2d(x, dk, padding=1))


def test_glora_bypass() -> None:
    g = torch.Generator().manual_seed(8)
    w, x = torch.randn(6, 5, generator=g), torch.randn(4, 5, generator=g)
    a1, a2, b1, b2 = (torch.randn(*s, generator=g) for s in ((5, 2), (2, 5), (6, 2), (2, 5)))
    # y = W x + W (a1 (a2 x)) + b1 (b2 x), times alpha/rank = 1
    y_bypass = x @ w.T + ((x @ a2.T) @ a1.T) @ w.T + (x @ b2.T) @ b1.T
    _close(x @ merged({"a1": a1, "a2": a2, "b1": b1, "b2": b2}, w).T, y_bypass)


def test_ia3_bypass() -> None:
    g = torch.Generator().manual_seed(9)
    w, x, v = torch.randn(6, 5, generator=g), torch.randn(4, 5, generator=g), torch.randn(6, generator=g)
    _close(x @ merged({"ia3_weight": v}, w, 0.5).T, (x @ w.T) * (1 + 0.5 * v))


@pytest.mark.parametrize("kernel", [(3,), (3, 3, 3)], ids=["conv1d", "conv3d"])
def test_locon_tucker_on_conv1d_and_conv3d(kernel: tuple[int, ...]) -> None:
    """The Tucker core's kernel has mid.ndim - 2 dimensions, whatever the conv."""
    g = torch.Generator().manual_seed(10)
    conv = F.conv1d if len(kernel) == 1 else F.conv3d
    w = torch.randn(6, 4, *kernel, generator=g)
    x = torch.randn(2, 4, *([5] * len(kernel)), generator=g)
    ones = (1,) * len(kernel)
    down, mid, up = (torch.randn(2, 4, *ones, generator=g), torch.randn(2, 2, *kernel, generator=g),
                     torch.randn(6, 2, *ones, generator=g))
    adapter, _, _ = select({"up": up, "down": down, "mid": mid}, None)
    assert adapter.check(tuple(w.shape)) is None
    y_bypass = conv(x, w, padding=1) + conv(conv(conv(x, down), mid, padding=1), up)
    _close(conv(x, merged({"up": up, "down": down, "mid": mid}, w), padding=1), y_bypass)


def test_bias_only_full_diff_checks_without_a_weight_change() -> None:
    adapter, _, _ = select({"diff_b": T([1.0, 2.0])}, None)
    assert not adapter.changes_weight and adapter.check((2, 3)) is None
    adapter, _, _ = select({"diff": torch.ones(3, 3)}, None)
    assert adapter.check((2, 3)) is not None
