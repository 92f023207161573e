"""The training step's host syncs (``bench/host_syncs.py``): none, in the forward, backward or step.

Each is a place where the host waits for the GPU and loses its lead over it. The backward's two
(boolean-mask gathers of the packed rows and of the target positions) sat between the LLM's
gradients and the encoder's host-bound ones; NeMo's encoder all-reduced each batch's frame count;
the forward's four gathers are sized by a layout planned on the host (``salm.model.batch_layout``);
DeepSpeed's clip read the gradient norm back (``salm.train.grad_norm``).
"""

from __future__ import annotations

import inspect
import json
import warnings
from pathlib import Path

import torch
from own_process import run_python


def _sync_sites(tmp_path: Path, *flags: str) -> tuple[dict, str]:
    out = tmp_path / "sites.json"
    done = run_python("-m", "bench.host_syncs", "--json", str(out), *flags)
    return json.loads(out.read_text()), done.stdout


def test_the_packed_training_step_never_waits_for_the_gpu(tmp_path) -> None:
    """As the training loop runs it: the batch's layout planned on the host, the canary recipe's clip."""
    phases, stdout = _sync_sites(tmp_path)
    assert phases == {"forward": [], "backward": [], "step": []}
    assert "one step: 0 place(s)" in stdout


def test_without_a_host_layout_the_forward_syncs_once_per_gather_it_sizes(tmp_path) -> None:
    """What the layout removes, so the test above cannot pass by not looking."""
    phases, _ = _sync_sites(tmp_path, "--device-layout")
    assert phases["backward"] == [] and phases["step"] == []
    forward = sorted((site["op"], site["site"].split(" ")[-1]) for site in phases["forward"])
    assert forward == [
        ("_local_scalar_dense", "plan_splice"),  # the longest row: the padded width
        ("nonzero", "find_placeholders"),  # where the audio goes: sizes the gather
        ("nonzero", "gather_target_positions"),  # the target positions: the LM head's rows
        ("nonzero", "pack_sequences"),  # the real positions: the packed row's length
    ]
    assert all(site["count"] == 1 for site in phases["forward"])


def test_a_longer_positional_encoding_gives_the_encoder_the_same_outputs(tiny_salm) -> None:
    """Why NeMo's all-reduce of the frame count can go: a rank that grows its relative-position
    table alone (``sync_max_audio_length`` off) computes what a rank with a longer table does."""
    encoder = tiny_salm.perception.encoder
    assert encoder.sync_max_audio_length is False
    torch.manual_seed(0)
    features = torch.randn(2, encoder._feat_in, 301)
    lengths = torch.tensor([301, 180])
    with torch.no_grad():
        before, before_lens = encoder(audio_signal=features, length=lengths)
        encoder.set_max_audio_length(encoder.max_audio_length * 4)
        after, after_lens = encoder(audio_signal=features, length=lengths)
    assert torch.equal(before_lens, after_lens)
    torch.testing.assert_close(after, before, rtol=0, atol=0)


def test_the_sync_detector_sees_each_kind_of_host_read_and_restores_what_it_wrapped() -> None:
    """The zero above means something only if the detector sees these (a no-op on the CPU, a wait on CUDA)."""
    from deepspeed.accelerator import get_accelerator

    from bench.host_syncs import SyncSites

    accelerator = get_accelerator()
    tolist, tensor_factory, new_tensor = torch.Tensor.tolist, torch.tensor, torch.Tensor.new_tensor
    x = torch.tensor([0.0, 2.0, 3.0])
    counter = torch.tensor(5.0)  # like AdamW's step counter: lives on the host in a GPU run too
    with SyncSites(host_resident=[counter]) as trace:
        float(x.sum())  # _local_scalar_dense
        x.nonzero()
        x[x > 1]  # a boolean-mask index
        x.tolist()
        accelerator.synchronize()
        counter.item()  # left out
        torch.tensor(-1.0, device=x.device)  # host data to the device: a blocking copy on CUDA
        x.new_tensor([1.0])
        torch.tensor(3.0)  # a host tensor, no device asked for: left out
        torch.as_tensor(x, device=x.device)  # already a tensor: no host data copied
    ops = sorted(op for op, _ in trace.sites)
    assert ops == [
        "Tensor.new_tensor(host data)", "Tensor.tolist", "_local_scalar_dense", "accelerator.synchronize",
        "index with a boolean mask", "nonzero", "torch.tensor(host data, device=...)",
    ]  # fmt: skip
    assert "synchronize" not in vars(accelerator) and torch.Tensor.tolist is tolist
    assert torch.tensor is tensor_factory and torch.Tensor.new_tensor is new_tensor
    with SyncSites() as after:
        pass
    x.tolist()  # outside: not counted
    assert not after.sites


def test_sync_warnings_are_counted_by_the_line_that_made_them_and_others_pass_through() -> None:
    """On the GPU, torch warns at the Python line of each sync under its sync debug mode; the bench
    counts those lines. Here the warning is given as torch gives it, from a function standing in for an op."""
    from bench.host_syncs import SYNC_WARNING, recorded_sync_warnings

    def syncing_op() -> None:
        warnings.warn(SYNC_WARNING, UserWarning, stacklevel=1)

    line = inspect.getsourcelines(syncing_op)[1] + 1
    with warnings.catch_warnings(record=True) as others:
        shown = warnings.showwarning
        with recorded_sync_warnings() as sites:
            syncing_op()
            syncing_op()
            warnings.warn("something else", DeprecationWarning, stacklevel=1)
        assert warnings.showwarning is shown
    assert sites == {f"test_host_syncs.py:{line} syncing_op": 2}
    assert [str(warning.message) for warning in others] == ["something else"]
