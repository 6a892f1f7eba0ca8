"""CUR selection with inverted importance and the SVD initialisation of A (spec §1–§2)."""

import pytest
import torch

from secura.cur import (
    brake_channel_count,
    important_output_channels,
    init_core_a,
    inverted_probabilities,
    layer_seed,
    resolve_rank,
    select_cur_indices,
)



pytestmark = pytest.mark.usefixtures("single_thread")


def weight_with_norms(row_scale: torch.Tensor, col_scale: torch.Tensor) -> torch.Tensor:
    """A rank-one weight whose row/column norms are proportional to the given scales."""
    return torch.outer(row_scale, col_scale)


def test_inverted_probabilities_favour_small_norms_and_sum_to_one():
    p = inverted_probabilities(torch.tensor([1.0, 2.0, 4.0]))
    torch.testing.assert_close(p, torch.tensor([4.0, 2.0, 1.0]) / 7.0)
    assert torch.all(p[:-1] > p[1:])


def test_topk_picks_least_important_rows_and_columns():
    rows_scale = torch.tensor([5.0, 0.1, 3.0, 0.2, 4.0, 0.3])
    cols_scale = torch.tensor([0.5, 9.0, 0.4, 8.0, 7.0])
    rows, cols = select_cur_indices(weight_with_norms(rows_scale, cols_scale), 3)
    assert rows.tolist() == [1, 3, 5]
    assert cols.tolist() == [0, 2, 4]  # 0.4 < 0.5 < 7.0
    assert rows.dtype == cols.dtype == torch.long


def test_ties_are_broken_by_index():
    rows, cols = select_cur_indices(torch.ones(6, 5), 3)
    assert rows.tolist() == [0, 1, 2] and cols.tolist() == [0, 1, 2]


def test_zero_norm_rows_and_columns_give_no_nan_and_are_selected_first():
    w = torch.randn(6, 5) + 3.0
    w[4] = 0.0
    w[:, 2] = 0.0
    p_rows = inverted_probabilities(torch.linalg.vector_norm(w, dim=1))
    assert torch.isfinite(p_rows).all()
    rows, cols = select_cur_indices(w, 2)
    assert 4 in rows.tolist() and 2 in cols.tolist()
    rows, cols = select_cur_indices(torch.zeros(4, 4), 2)  # all zero: ties → lowest indices
    assert rows.tolist() == [0, 1] and cols.tolist() == [0, 1]


def test_sampling_is_seeded_without_replacement_and_differs_across_seeds():
    w = torch.randn(64, 48)
    a = select_cur_indices(w, 16, sample=True, seed=3)
    b = select_cur_indices(w, 16, sample=True, seed=3)
    c = select_cur_indices(w, 16, sample=True, seed=4)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))
    for idx in a:
        assert idx.unique().numel() == 16 and torch.all(idx[:-1] < idx[1:])


def test_rank_errors_and_clamping():
    w = torch.randn(8, 5)
    with pytest.raises(ValueError, match=r"k=6 exceeds min\(out, in\).*clamp_rank"):
        select_cur_indices(w, 6)
    with pytest.raises(ValueError, match="positive"):
        select_cur_indices(w, 0)
    rows, cols = select_cur_indices(w, 6, clamp=True)
    assert rows.numel() == cols.numel() == 5
    assert resolve_rank(3, 8, 5) == 3


def test_important_output_channels_are_the_largest_rows():
    w = weight_with_norms(torch.tensor([1.0, 5.0, 2.0, 5.0, 0.5]), torch.ones(3))
    assert important_output_channels(w, 2).tolist() == [1, 3]
    assert important_output_channels(w, 3).tolist() == [1, 2, 3]
    assert brake_channel_count(64, 16) == 24 and brake_channel_count(64, 60) == 16


def test_init_core_a_comes_from_the_svd_of_the_intersection_block():
    torch.manual_seed(0)
    w = torch.randn(20, 16)
    rows, cols = select_cur_indices(w, 6)
    a = init_core_a(w, rows, cols, r=4)
    assert a.shape == (6, 4) and a.dtype == torch.float32
    torch.testing.assert_close(torch.linalg.matrix_norm(a), torch.tensor(2.0))  # RMS singular value 1
    u, sigma, _ = torch.linalg.svd(w[rows][:, cols])
    # columns are the top singular vectors weighted by √σ (up to sign and the common scale)
    gram = a.T @ a
    torch.testing.assert_close(gram, torch.diag(torch.diagonal(gram)), atol=1e-5, rtol=0)
    ratio = torch.diagonal(gram) / sigma[:4]
    torch.testing.assert_close(ratio, ratio[0].expand(4))
    torch.testing.assert_close((a[:, 0] @ u[:, 0]).abs(), a[:, 0].norm())


def test_init_core_a_with_r_larger_than_k_has_small_seeded_nonzero_extra_columns():
    w = torch.randn(12, 10)
    rows, cols = select_cur_indices(w, 4)
    a = init_core_a(w, rows, cols, r=7, seed=1)
    extra = a[:, 4:]
    assert a.shape == (4, 7)
    assert torch.all(extra != 0)
    assert extra.norm(dim=0).max() < 0.1 * a[:, :4].norm(dim=0).min()
    assert torch.equal(a, init_core_a(w, rows, cols, r=7, seed=1))
    assert not torch.equal(a, init_core_a(w, rows, cols, r=7, seed=2))


def test_zero_intersection_block_falls_back_to_singular_vectors():
    a = init_core_a(torch.zeros(6, 6), torch.arange(3), torch.arange(3), r=2)
    assert torch.isfinite(a).all() and a.norm() > 0


def test_layer_seed_is_stable_and_key_dependent():
    assert layer_seed(0, "model.layers.0.q_proj") == layer_seed(0, "model.layers.0.q_proj")
    assert layer_seed(0, "model.layers.0.q_proj") != layer_seed(0, "model.layers.1.q_proj")
    assert layer_seed(0, "x") != layer_seed(1, "x")
