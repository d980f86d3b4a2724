"""generate's thread choice: one CPU thread for a small model during the call, torch's setting restored."""
import pytest
import torch

from ddtree import threads as th
from ddtree.decode import generate
from ddtree.tiny import random_drafter, random_target


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield before
    torch.set_num_threads(before)


def test_auto_threads_by_size_and_device(monkeypatch):
    model = random_target()
    n = sum(p.numel() for p in model.parameters())
    assert th.auto_threads(model) == 1
    monkeypatch.setattr(th, "SMALL_MODEL_PARAMS", n + 1)
    assert th.auto_threads(model) == 1
    monkeypatch.setattr(th, "SMALL_MODEL_PARAMS", n)
    assert th.auto_threads(model) is None  # at the threshold: torch's choice
    monkeypatch.undo()
    assert th.auto_threads(model.to("meta")) is None  # not on CPU
    assert th.auto_threads(object()) is None  # size unknown


def test_auto_threads_counts_a_runners_model():
    class Runner:
        model = random_target()
    assert th.auto_threads(Runner()) == 1


@pytest.mark.parametrize("bad", [0, -1, 1.5, "2", True])
def test_resolve_rejects_bad_threads(bad):
    with pytest.raises(ValueError, match="threads"):
        th.resolve(bad, random_target())


def test_cpu_threads_restores_even_on_error(restore_threads):
    torch.set_num_threads(2)
    with pytest.raises(RuntimeError):
        with th.cpu_threads(1):
            assert torch.get_num_threads() == 1
            raise RuntimeError("inside")
    assert torch.get_num_threads() == 2
    with th.cpu_threads(None):
        assert torch.get_num_threads() == 2


@pytest.mark.parametrize("threads,inside", [("auto", 1), (None, 2), (2, 2), (1, 1)])
def test_generate_runs_under_its_thread_choice(restore_threads, threads, inside):
    torch.set_num_threads(2)
    target = random_target()
    drafter = random_drafter(target.config)
    seen = []
    target.model.layers[0].register_forward_pre_hook(lambda *_: seen.append(torch.get_num_threads()))
    out = generate(target, drafter, [[1, 2, 3]], method="ddtree", max_new_tokens=6, max_nodes=8, threads=threads)
    assert seen and set(seen) == {inside}
    assert torch.get_num_threads() == 2  # restored
    ref = generate(target, None, [[1, 2, 3]], method="ar", max_new_tokens=6, threads=None)
    assert out.tokens == ref.tokens  # greedy: the thread count changes nothing but speed


def test_generate_signature_shows_threads():
    import inspect

    assert inspect.signature(generate).parameters["threads"].default == "auto"
