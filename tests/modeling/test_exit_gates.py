"""Exit gates and the saturation signal: hand-computed values, save / ``recursify.load`` round trip, bad files."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import save_file

import recursify
from recursify.errors import CheckpointError
from recursify.modeling.exit_gates import GATES_FILE, ExitGates, gate_features, read_exit_gates, relative_change, save_exit_gates
from tiny import tiny_model


def test_relative_change_by_hand() -> None:
    previous = torch.tensor([[3.0, 4.0], [1.0, 0.0]])  # norms 5 and 1
    h = torch.tensor([[3.0, 5.0], [0.0, 0.0]])  # moved by 1 and by 1
    assert relative_change(h, previous).tolist() == pytest.approx([0.2, 1.0])


def test_gate_features_are_the_normalised_state_and_log_change() -> None:
    h, previous = torch.tensor([[2.0, -2.0]]), torch.tensor([[1.0, -1.0]])
    features = gate_features(h, previous)
    assert features[0, :2].tolist() == pytest.approx([1.0, -1.0], abs=1e-5)  # RMS of (2, -2) is 2
    assert float(features[0, 2]) == pytest.approx(math.log(1.0))  # the state doubled: relative change 1


@pytest.mark.parametrize("width", [0, 8])
def test_linear_and_mlp_gates_by_hand(width: int) -> None:
    gates = ExitGates(hidden=3, loops=3, width=width)
    h, previous = torch.randn(4, 3), torch.randn(4, 3)
    x = gate_features(h, previous)
    for loop in range(2):
        inner = x @ gates.w1[loop] + gates.b1[loop]
        logit = inner[:, 0] if width == 0 else torch.nn.functional.gelu(inner) @ gates.w2[loop] + gates.b2[loop]
        torch.testing.assert_close(gates(h, previous, loop), torch.sigmoid(logit))


def test_save_and_load_through_recursify_load(tmp_path) -> None:
    model = recursify.convert(tiny_model("llama", seed=1), loops=3, init="average", progress=False)
    model.save_pretrained(tmp_path / "ckpt")
    assert recursify.load(tmp_path / "ckpt").addons.gates is None
    gates = ExitGates(model.arch.hidden_size, 3, width=16)
    save_exit_gates(gates, tmp_path / "ckpt", {"note": "test"})
    loaded = recursify.load(tmp_path / "ckpt").addons.gates
    assert loaded is not None and loaded.width == 16
    h, previous = torch.randn(2, model.arch.hidden_size), torch.randn(2, model.arch.hidden_size)
    torch.testing.assert_close(loaded(h, previous, 1), gates(h, previous, 1))
    assert set(recursify.load(tmp_path / "ckpt").state_dict()) == set(model.state_dict())  # beside the weights, not in them


def test_bad_gate_files_are_refused(tmp_path) -> None:
    save_exit_gates(ExitGates(hidden=8, loops=3, width=4), tmp_path)
    with pytest.raises(CheckpointError, match="trained for hidden 8 and 3 loops"):
        read_exit_gates(tmp_path, hidden=8, loops=2)
    save_file({"w1": torch.zeros(1)}, str(tmp_path / GATES_FILE), {"hidden": "8", "loops": "3", "width": "4"})
    with pytest.raises(CheckpointError, match="does not match"):
        read_exit_gates(tmp_path, hidden=8, loops=3)
    (tmp_path / GATES_FILE).write_bytes(b"not safetensors")
    with pytest.raises(CheckpointError, match="corrupt"):
        read_exit_gates(tmp_path, hidden=8, loops=3)
    assert read_exit_gates(tmp_path / "missing", hidden=8, loops=3) is None
