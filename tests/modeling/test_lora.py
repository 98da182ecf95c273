"""Depth-indexed LoRA and norms: every visit-index form equals per-depth reference computations."""

from __future__ import annotations

import pytest
import torch

from recursify.modeling.lora import DepthLinear, DepthRMSNorm, lora_delta

VISITS, RANK, FAN_IN, FAN_OUT = 3, 4, 10, 7


@pytest.fixture(params=[False, True], ids=["lora", "lora-xs"])
def linear(request: pytest.FixtureRequest) -> DepthLinear:
    torch.manual_seed(0)
    module = DepthLinear(FAN_IN, FAN_OUT, VISITS, RANK, bias=True, bias_delta=True, fixed_factors=request.param)
    with torch.no_grad():
        for tensor in [*module.parameters(), *module.buffers()]:
            tensor.copy_(torch.randn_like(tensor))
    return module


def reference(module: DepthLinear, x: torch.Tensor, visit: int) -> torch.Tensor:
    """Materialise depth ``visit``'s full weight and bias, then one plain linear."""
    assert module.lora_A is not None and module.lora_B is not None and module.bias is not None and module.bias_delta is not None
    core = module.lora_A[visit] if module.lora_R is None else module.lora_R[visit] @ module.lora_A[visit]
    weight = module.weight + module.lora_B[visit] @ core
    return torch.nn.functional.linear(x, weight, module.bias + module.bias_delta[visit])


def test_int_visit_matches_materialised_weights(linear: DepthLinear) -> None:
    x = torch.randn(2, 5, FAN_IN)
    for visit in range(VISITS):
        torch.testing.assert_close(linear(x, visit), reference(linear, x, visit))


def test_per_row_visits_match_per_depth_references(linear: DepthLinear) -> None:
    x = torch.randn(6, 5, FAN_IN)
    visits = torch.randint(0, VISITS, (6,))
    expected = torch.stack([reference(linear, x[i : i + 1], int(v))[0] for i, v in enumerate(visits)])
    torch.testing.assert_close(linear(x, visits), expected)


def test_per_token_visits_match_per_depth_references(linear: DepthLinear) -> None:
    x = torch.randn(3, 8, FAN_IN)
    visits = torch.randint(0, VISITS, (3, 8))
    expected = torch.empty(3, 8, FAN_OUT)
    for b in range(3):
        for t in range(8):
            expected[b, t] = reference(linear, x[b, t][None, None], int(visits[b, t]))[0, 0]
    torch.testing.assert_close(linear(x, visits), expected)


def test_lora_xs_trains_only_its_cores() -> None:
    module = DepthLinear(FAN_IN, FAN_OUT, VISITS, RANK, bias=False, bias_delta=False, fixed_factors=True)
    assert {name for name, _ in module.named_parameters()} == {"weight", "lora_R"}
    assert {name for name, _ in module.named_buffers()} == {"lora_A", "lora_B"}
    assert module.lora_R is not None and module.lora_R.shape == (VISITS, RANK, RANK)


def test_lora_delta_forms_agree() -> None:
    a, b, x = torch.randn(VISITS, RANK, FAN_IN), torch.randn(VISITS, FAN_OUT, RANK), torch.randn(4, 3, FAN_IN)
    same = torch.full((4,), 2)
    torch.testing.assert_close(lora_delta(x, a, b, same), lora_delta(x, a, b, 2))
    torch.testing.assert_close(lora_delta(x, a, b, torch.full((4, 3), 2)), lora_delta(x, a, b, 2))


@pytest.mark.parametrize("offset", [0.0, 1.0])
def test_norm_gain_per_visit(offset: float) -> None:
    norm = DepthRMSNorm(6, VISITS, eps=1e-6, offset=offset)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(VISITS, 6))
    x = torch.randn(2, 4, 6)

    def expected(rows: torch.Tensor, visit: int) -> torch.Tensor:
        return rows / rows.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt() * (offset + norm.weight[visit])

    torch.testing.assert_close(norm(x, 1), expected(x, 1))
    per_row = torch.tensor([2, 0])
    torch.testing.assert_close(norm(x, per_row), torch.stack([expected(x[0], 2), expected(x[1], 0)]))
    per_token = torch.randint(0, VISITS, (2, 4))
    manual = torch.stack([torch.stack([expected(x[b, t], int(per_token[b, t])) for t in range(4)]) for b in range(2)])
    torch.testing.assert_close(norm(x, per_token), manual)
    heads = torch.randn(2, 4, 3, 6)  # q/k norms see [batch, seq, heads, head_dim]
    torch.testing.assert_close(norm(heads, per_row)[1], expected(heads[1], 0))


def test_tied_norm_ignores_visit() -> None:
    norm = DepthRMSNorm(6, 1, eps=1e-6, offset=0.0)
    x = torch.randn(2, 3, 6)
    torch.testing.assert_close(norm(x, torch.tensor([0, 1])), norm(x, 0))
