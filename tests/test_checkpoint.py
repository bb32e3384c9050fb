"""Checkpoint integrity (issue 16): every changed byte is detected, bad files are named, interrupted saves leave
a loadable checkpoint and no stray temporary file, permissions are the user's, the global RNG is left alone."""

from __future__ import annotations

import multiprocessing
import os
import random
import signal
import stat
import sys
import time
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from learned_inference import DecoderModel, IterativeInferenceOptimizer
from learned_inference.checkpoint import CheckpointError, load_checkpoint, save_checkpoint

posix_only = pytest.mark.skipif(sys.platform == "win32", reason="POSIX file locks, permissions and signals")


def _net(seed: int = 0, size: int = 3) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Linear(size, size)


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> bytes:
    """The bytes of a small checkpoint."""
    path = tmp_path_factory.mktemp("saved") / "run.pt"
    save_checkpoint(path, step=7, net=_net())
    return path.read_bytes()


def test_round_trip_and_plain_torch_load(tmp_path, saved):
    path = tmp_path / "run.pt"
    path.write_bytes(saved)
    net = _net(seed=1)
    assert load_checkpoint(path, net=net)["step"] == 7
    torch.testing.assert_close(net.weight, _net().weight, rtol=0, atol=0)
    assert torch.load(path, weights_only=False)["step"] == 7  # the payload is still a torch.save file


def test_every_flipped_byte_is_detected(tmp_path, saved):
    """Each byte of the file, inverted in turn: the load fails, naming the file, and loads nothing."""
    path = tmp_path / "run.pt"
    path.write_bytes(saved)
    net = _net(seed=1)
    before = net.weight.detach().clone()
    with open(path, "r+b", buffering=0) as handle:
        for position, byte in enumerate(saved):
            handle.seek(position)
            handle.write(bytes([byte ^ 0xFF]))
            with pytest.raises(CheckpointError) as error:
                load_checkpoint(path, net=net)
            assert str(path) in str(error.value)
            handle.seek(position)
            handle.write(bytes([byte]))
    assert torch.equal(net.weight, before)
    assert load_checkpoint(path, net=net)["step"] == 7  # restored byte by byte: intact again


@given(flips=st.dictionaries(st.integers(0, 10**9), st.integers(1, 255), min_size=1, max_size=64))
def test_any_set_of_changed_bytes_is_detected(tmp_path_factory, saved, flips):
    path = tmp_path_factory.mktemp("flips") / "run.pt"
    data = bytearray(saved)
    for position, mask in {p % len(data): m for p, m in flips.items()}.items():  # distinct bytes, each changed
        data[position] ^= mask
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"corrupt|truncated|not a checkpoint"):
        load_checkpoint(path, net=_net())


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (b"", "is empty"),
        (b"PK\x03\x04", "only 4 bytes long: a truncated file"),
        (None, "truncated or corrupt"),  # the checkpoint cut short
        (os.urandom(4096), "no checkpoint integrity record"),
        ("plain", "not a checkpoint written by learned_inference"),
        ("appended", "no checkpoint integrity record"),
    ],
    ids=["empty", "tiny", "truncated", "random", "plain-torch-save", "appended"],
)
def test_bad_files_are_named_with_the_cause(tmp_path, saved, content, match):
    path = tmp_path / "run.pt"
    if content is None:
        path.write_bytes(saved[: len(saved) // 2])
    elif content == "plain":
        torch.save({"step": 1, "states": {}, "rng": {}}, path)
    elif content == "appended":
        path.write_bytes(saved + b"\n")
    else:
        path.write_bytes(content)
    with pytest.raises(CheckpointError, match=rf"{path}.*{match}|{match}"):
        load_checkpoint(path, net=_net())
    assert issubclass(CheckpointError, ValueError)


def test_loading_into_an_object_of_another_size_names_the_object(tmp_path):
    save_checkpoint(tmp_path / "run.pt", step=0, net=_net(size=3))
    with pytest.raises(ValueError, match=r"cannot load the state saved as 'net' in .*run.pt into net \(Linear\)"):
        load_checkpoint(tmp_path / "run.pt", net=_net(size=4))


def test_a_network_loaded_for_other_data_is_named_at_first_use(tmp_path):
    model = DecoderModel(torch.nn.Linear(2, 6), likelihood="bernoulli", latent_dim=2)
    inference = IterativeInferenceOptimizer(model, latent_dim=2, hidden_size=8, data_shape=(6,))
    save_checkpoint(tmp_path / "run.pt", step=0, inference=inference)
    other = IterativeInferenceOptimizer(DecoderModel(torch.nn.Linear(2, 4), likelihood="bernoulli", latent_dim=2),
                                        latent_dim=2, hidden_size=8)
    load_checkpoint(tmp_path / "run.pt", inference=other)
    with pytest.raises(ValueError, match="loaded for other data"):
        other.infer(torch.ones(3, 4))


def test_unsized_parameters_are_refused_with_the_fix(tmp_path):
    lazy = torch.nn.Sequential(torch.nn.LazyLinear(4), torch.nn.ELU())
    with pytest.raises(ValueError, match=r"not sized yet \(\['model.0.weight', 'model.0.bias'\]\).*model\(x\[:1\]\)"):
        save_checkpoint(tmp_path / "run.pt", step=0, model=lazy)
    assert not list(tmp_path.iterdir())
    lazy(torch.ones(1, 3))
    save_checkpoint(tmp_path / "run.pt", step=0, model=lazy)


def test_non_finite_values_are_refused_naming_the_entry_and_where_to_look(tmp_path):
    model = torch.nn.Linear(3, 2)
    optim = torch.optim.Adam(model.parameters())
    model(torch.ones(1, 3)).sum().backward()
    optim.step()
    with torch.no_grad():
        model.weight[0, :2] = float("nan")
    optim.state[model.bias]["exp_avg_sq"][1] = float("inf")
    with pytest.raises(ValueError, match=r"non-finite values in model\.weight \(2 NaN and 0 infinite of 6 values\), "
                                         r"optim\.state\.1\.exp_avg_sq \(0 NaN and 1 infinite of 2 values\)\. "
                                         r".*keyword you passed.*max_grad_norm.*run\.pt is unchanged"):
        save_checkpoint(tmp_path / "run.pt", step=0, model=model, optim=optim)
    assert not list(tmp_path.iterdir())


def test_the_global_random_state_is_restored_only_when_asked(tmp_path):
    path, net = tmp_path / "run.pt", _net()
    torch.manual_seed(3)
    random.seed(3)
    save_checkpoint(path, step=0, net=net)
    expected = (torch.rand(1), random.random())
    torch.manual_seed(11)
    random.seed(11)
    state = (torch.get_rng_state(), random.getstate())
    load_checkpoint(path, net=net)
    assert torch.equal(torch.get_rng_state(), state[0]) and random.getstate() == state[1]
    load_checkpoint(path, restore_rng=True, net=net)
    assert (torch.rand(1), random.random()) == expected


@posix_only
def test_files_get_the_users_permissions(tmp_path):
    path = tmp_path / "run.pt"
    old = os.umask(0o022)
    try:
        save_checkpoint(path, step=0, net=_net())
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644  # 0o666 less the umask, as open() would give
    path.chmod(0o640)
    save_checkpoint(path, step=1, net=_net())
    assert stat.S_IMODE(path.stat().st_mode) == 0o640  # a replaced checkpoint keeps its mode


def _save_forever(path: str, net: torch.nn.Module, started) -> None:
    """Saves a large checkpoint again and again, on a slow disk (killed from outside)."""
    import learned_inference.checkpoint as checkpoint

    torch.set_num_threads(1)  # a forked child must not use the parent's OpenMP pool: it hangs in the first save
    fsync = os.fsync

    def slow_fsync(fd: int) -> None:  # most of a save's time is then spent with its temporary file on disk
        time.sleep(0.02)
        fsync(fd)

    checkpoint.os.fsync = slow_fsync
    started.set()
    step = 0
    while True:
        step += 1
        save_checkpoint(path, step=step, net=net)


def _temporaries(folder: Path) -> list[Path]:
    return [p for p in folder.iterdir() if p.name.endswith(".tmp")]


@posix_only
@pytest.mark.slow  # timing-dependent (kills racing saves): on a heavily loaded machine no kill may land in a save
def test_kills_during_saves_leave_a_loadable_checkpoint_and_no_stray_temporaries(tmp_path):
    path, net = tmp_path / "run.pt", torch.nn.Linear(1000, 1000)  # built here: the forked savers only serialise
    save_checkpoint(path, step=0, net=net)
    context = multiprocessing.get_context("fork")
    generator = random.Random(0)
    strays = 0
    for _ in range(20):
        started = context.Event()
        saver = context.Process(target=_save_forever, args=(str(path), net, started))
        saver.start()
        assert started.wait(30)
        deadline = time.monotonic() + 30
        while not _temporaries(tmp_path) and time.monotonic() < deadline:  # a save is under way (even on a busy
            time.sleep(0.001)                                               # machine, where the saver starts late)
        time.sleep(generator.uniform(0.0, 0.01))
        os.kill(saver.pid, signal.SIGKILL)
        saver.join()
        strays += len(_temporaries(tmp_path))
        load_checkpoint(path, net=torch.nn.Linear(1000, 1000))  # the last complete save, verified
    assert strays > 0, "no kill interrupted a save: the test did not exercise the cleanup"
    save_checkpoint(path, step=-1, net=net)
    assert _temporaries(tmp_path) == []
    assert load_checkpoint(path, net=torch.nn.Linear(1000, 1000))["step"] == -1


@posix_only
def test_the_cleanup_keeps_the_temporary_file_of_a_save_in_progress(tmp_path):
    import fcntl

    path = tmp_path / "run.pt"
    busy = tmp_path / ".run.pt.0123456789abcdef.tmp"
    busy.write_bytes(b"half a checkpoint")
    with open(busy, "rb") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # as a concurrent save holds it
        save_checkpoint(path, step=1, net=_net())
        assert busy.exists()
    save_checkpoint(path, step=2, net=_net())
    assert not busy.exists()


def test_the_cleanup_touches_only_its_own_temporary_files(tmp_path):
    path = tmp_path / "run[1].pt"  # glob metacharacters in the name
    stale = tmp_path / ".run[1].pt.fedcba9876543210.tmp"
    others = [tmp_path / ".run[1].pt.backup.tmp", tmp_path / ".run1.pt.fedcba9876543210.tmp",
              tmp_path / ".other.pt.fedcba9876543210.tmp"]
    for file in [stale, *others]:
        file.write_bytes(b"x")
    save_checkpoint(path, step=1, net=_net())
    assert not stale.exists() and all(file.exists() for file in others)
    assert load_checkpoint(path, net=_net())["step"] == 1


def test_a_failed_save_keeps_the_previous_checkpoint_and_leaves_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "run.pt"
    save_checkpoint(path, step=1, net=_net())
    good = path.read_bytes()

    def broken_replace(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, step=2, net=_net())
    assert path.read_bytes() == good and _temporaries(tmp_path) == []
