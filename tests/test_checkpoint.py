"""Training checkpoints: exact resume (weights, AdamW, LR schedule, RNG, data position), atomic saves, no pickle."""

from __future__ import annotations

import _pickle
import errno
import functools
import json
import logging
import math
import pickle
import random
import threading

import numpy as np
import pytest
import torch
from safetensors import SafetensorError

from diffusmith.errors import DiffusmithError
from diffusmith.training import checkpoint as ckpt
from diffusmith.training.checkpoint import (
    latest_checkpoint,
    load_checkpoint,
    optimizer_state_from_tensors,
    optimizer_state_to_tensors,
    prune_checkpoints,
    resolve_resume,
    rng_staging_dir,
    save_checkpoint,
    write_rng,
)


def _warmup_cosine(step: int, warmup: int, total: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def _setup(seed: int = 0):
    torch.manual_seed(seed)
    model = torch.nn.Linear(8, 4)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.8, 0.95), weight_decay=0.1)
    # the shape of transformers' / diffusers' get_cosine_schedule_with_warmup: a LambdaLR over a partial
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, functools.partial(_warmup_cosine, warmup=3, total=10))
    return model, optimizer, scheduler


def _batches(n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1234)
    return [(torch.randn(5, 8, generator=g), torch.randn(5, 4, generator=g)) for _ in range(n)]


def _train(model, optimizer, scheduler, batches) -> None:
    for x, y in batches:
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)


def _save(out, step, model, optimizer, scheduler, **kwargs):
    defaults = dict(data_state={"epoch": 0, "batches_done": step}, epoch=0)
    defaults.update(kwargs)
    return save_checkpoint(out, step, trainable=dict(model.named_parameters()), optimizer=optimizer,
                           lr_scheduler=scheduler, **defaults)


def test_adamw_resume_is_bit_identical(tmp_path):
    batches = _batches(6)
    model, optimizer, scheduler = _setup()
    _train(model, optimizer, scheduler, batches[:3])
    config = {"lr": 1e-2, "rank": 4, "betas": [0.8, 0.95], "note": None}
    path = _save(tmp_path, 3, model, optimizer, scheduler, extra={"config": config})
    assert path == tmp_path / "checkpoints" / "step-000003"
    assert sorted(p.name for p in path.iterdir()) == [
        "COMPLETE", "optimizer.safetensors", "rng-0.safetensors", "state.json", "trainable.safetensors"]
    _train(model, optimizer, scheduler, batches[3:])

    resumed, optimizer2, scheduler2 = _setup(seed=99)  # different init: everything must come from the file
    loaded = load_checkpoint(path, optimizer=optimizer2, lr_scheduler=scheduler2)
    with torch.no_grad():
        for name, param in resumed.named_parameters():
            param.copy_(loaded.trainable[name])
    assert (loaded.step, loaded.epoch) == (3, 0)
    assert loaded.data_state == {"epoch": 0, "batches_done": 3}
    assert loaded.extra == {"config": config}
    assert optimizer2.param_groups[0]["betas"] == (0.8, 0.95)
    assert isinstance(optimizer2.param_groups[0]["betas"], tuple)
    _train(resumed, optimizer2, scheduler2, batches[3:])

    for (name, a), (_, b) in zip(model.named_parameters(), resumed.named_parameters(), strict=True):
        assert (a - b).abs().max().item() == 0, name
    assert scheduler.get_last_lr() == scheduler2.get_last_lr()
    for p, p2 in zip(model.parameters(), resumed.parameters(), strict=True):
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(optimizer.state[p][key], optimizer2.state[p2][key])


def test_trainable_weights_keep_their_dtype(tmp_path):
    trainable = {"a.weight": torch.randn(3, 2), "b.weight": torch.randn(4).to(torch.bfloat16)}
    path = save_checkpoint(tmp_path, 1, trainable=trainable, optimizer=None, lr_scheduler=None,
                           data_state={}, epoch=0)
    loaded = load_checkpoint(path, restore_rng=False)
    for name, tensor in trainable.items():
        assert loaded.trainable[name].dtype == tensor.dtype
        assert torch.equal(loaded.trainable[name], tensor)


def test_lr_schedule_round_trip(tmp_path):
    model, optimizer, scheduler = _setup()
    _train(model, optimizer, scheduler, _batches(4))  # past the warmup
    path = _save(tmp_path, 4, model, optimizer, scheduler)
    _, optimizer2, scheduler2 = _setup()
    assert scheduler2.get_last_lr() != scheduler.get_last_lr()
    load_checkpoint(path, optimizer=optimizer2, lr_scheduler=scheduler2)
    assert scheduler2.state_dict() == scheduler.state_dict()
    assert optimizer2.param_groups[0]["lr"] == optimizer.param_groups[0]["lr"]
    for _ in range(5):
        optimizer.step()
        optimizer2.step()
        scheduler.step()
        scheduler2.step()
        assert scheduler2.get_last_lr() == scheduler.get_last_lr()


def test_step_lr_and_sgd_round_trip(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
    _train(model, optimizer, scheduler, [(torch.randn(2, 3), torch.randn(2, 3))] * 3)
    path = _save(tmp_path, 3, model, optimizer, scheduler)
    optimizer2 = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    scheduler2 = torch.optim.lr_scheduler.StepLR(optimizer2, step_size=2, gamma=0.5)
    load_checkpoint(path, optimizer=optimizer2, lr_scheduler=scheduler2)
    assert scheduler2.state_dict() == scheduler.state_dict()
    for p in model.parameters():
        assert torch.equal(optimizer2.state[p]["momentum_buffer"], optimizer.state[p]["momentum_buffer"])


def test_generic_optimizer_state_round_trip():
    # bitsandbytes-like 8-bit state: uint8 buffers, quantization maps, int steps, tuples, odd floats
    state = {
        "state": {
            0: {"step": 7, "state1": torch.randint(0, 255, (16,), dtype=torch.uint8),
                "qmap1": torch.linspace(-1, 1, 256), "absmax1": torch.rand(1), "flag": True},
            3: {"step": 2, "exp_avg": torch.randn(2, 2).to(torch.bfloat16), "momentum_buffer": None},
        },
        "param_groups": [{"lr": torch.tensor(0.01), "betas": (0.9, 0.999), "eps": 1e-8, "max_unorm": float("inf"),
                          "percentile_clipping": 100, "params": [0, 3], "name": "lora", "nested": [(1, 2), {}]}],
    }
    tensors, as_json = optimizer_state_to_tensors(state)
    assert all(isinstance(t, torch.Tensor) for t in tensors.values())
    text = json.dumps(as_json, allow_nan=False)  # really JSON
    back = optimizer_state_from_tensors(tensors, json.loads(text))
    assert set(back["state"]) == {0, 3}
    assert back["state"][0]["step"] == 7 and isinstance(back["state"][0]["step"], int)
    assert back["state"][0]["flag"] is True
    assert back["state"][3]["momentum_buffer"] is None
    for index in (0, 3):
        for key, value in state["state"][index].items():
            if isinstance(value, torch.Tensor):
                assert back["state"][index][key].dtype == value.dtype
                assert torch.equal(back["state"][index][key], value)
    group = back["param_groups"][0]
    assert group["betas"] == (0.9, 0.999) and isinstance(group["betas"], tuple)
    assert group["max_unorm"] == float("inf")
    assert group["nested"] == [(1, 2), {}] and isinstance(group["nested"][0], tuple)
    assert torch.equal(group["lr"], torch.tensor(0.01))


def test_dict_that_looks_like_a_marker_round_trips():
    state = {"state": {}, "param_groups": [{"params": [], "odd": {"__tuple__": [1, 2]}}]}
    tensors, as_json = optimizer_state_to_tensors(state)
    assert optimizer_state_from_tensors(tensors, json.loads(json.dumps(as_json))) == state


def _draws():
    return torch.rand(4), np.random.rand(4), [random.random() for _ in range(3)], random.gauss(0, 1)


@pytest.mark.parametrize("restore", [True, False])
def test_rng_restore(tmp_path, restore):
    torch.manual_seed(5)
    np.random.seed(5)
    random.seed(5)
    random.gauss(0, 1)  # leaves a cached Gaussian in Python's state
    np.random.randn(1)  # and in numpy's
    model, optimizer, scheduler = _setup()
    path = _save(tmp_path, 1, model, optimizer, scheduler)
    expected = _draws()
    torch.manual_seed(6)
    np.random.seed(6)
    random.seed(6)
    load_checkpoint(path, restore_rng=restore)
    got = _draws()
    same = (torch.equal(got[0], expected[0]) and np.array_equal(got[1], expected[1])
            and got[2] == expected[2] and got[3] == expected[3])
    assert same == restore


def test_latest_checkpoint_skips_tmp_and_incomplete(tmp_path, caplog):
    model, optimizer, scheduler = _setup()
    assert latest_checkpoint(tmp_path) is None
    _save(tmp_path, 1, model, optimizer, scheduler)
    second = _save(tmp_path, 2, model, optimizer, scheduler)
    root = tmp_path / "checkpoints"
    (root / "step-000003.tmp-abcd").mkdir()
    (root / "step-000003.tmp-abcd" / "COMPLETE").write_text("{}")  # even a finished tmp folder is not published
    (root / "step-000004").mkdir()
    (root / "step-000004" / "state.json").write_text("{}")
    (root / "notes.txt").write_text("not a checkpoint")
    with caplog.at_level(logging.WARNING):
        assert latest_checkpoint(tmp_path) == second
    assert "step-000004" in caplog.text and "step-000003.tmp-abcd" in caplog.text


def test_latest_checkpoint_orders_by_number(tmp_path):
    model, optimizer, scheduler = _setup()
    _save(tmp_path, 999999, model, optimizer, scheduler)
    big = _save(tmp_path, 1000000, model, optimizer, scheduler)
    assert big.name == "step-1000000"
    assert latest_checkpoint(tmp_path) == big


@pytest.mark.parametrize("where", ["_save_tensors", "_write_json", "_publish"])
def test_failed_save_leaves_previous_checkpoint_latest(tmp_path, monkeypatch, where):
    model, optimizer, scheduler = _setup()
    first = _save(tmp_path, 1, model, optimizer, scheduler)
    real = getattr(ckpt, where)
    calls = []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2 or where == "_publish":  # fail in the middle of the save
            raise RuntimeError("crash")
        return real(*args, **kwargs)

    monkeypatch.setattr(ckpt, where, failing)
    with pytest.raises(RuntimeError, match="crash"):
        _save(tmp_path, 2, model, optimizer, scheduler)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["step-000001"]  # the partial folder was cleaned up
    assert latest_checkpoint(tmp_path) == first


def test_killed_save_leaves_nothing_that_looks_complete(tmp_path, monkeypatch):
    model, optimizer, scheduler = _setup()
    first = _save(tmp_path, 1, model, optimizer, scheduler)

    def killed(tmp, final):  # the process dies after COMPLETE was written but before the rename
        raise SystemExit("killed")

    with monkeypatch.context() as m:
        m.setattr(ckpt, "_publish", killed)
        m.setattr(ckpt, "_remove_tree", lambda path: None)  # a dead process cleans nothing up
        with pytest.raises(SystemExit):
            _save(tmp_path, 2, model, optimizer, scheduler)
    leftovers = [p for p in (tmp_path / "checkpoints").iterdir() if ".tmp-" in p.name]
    assert len(leftovers) == 1 and (leftovers[0] / "COMPLETE").is_file()
    assert not (tmp_path / "checkpoints" / "step-000002").exists()
    assert latest_checkpoint(tmp_path) == first
    assert resolve_resume(tmp_path, "latest") == first
    third = _save(tmp_path, 3, model, optimizer, scheduler)  # the next save sweeps the debris
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-000001", "step-000003"]
    assert latest_checkpoint(tmp_path) == third


def test_incomplete_folder_with_the_final_name_is_replaced(tmp_path):
    model, optimizer, scheduler = _setup()
    stale = tmp_path / "checkpoints" / "step-000005"
    stale.mkdir(parents=True)
    (stale / "trainable.safetensors").write_bytes(b"garbage")
    path = _save(tmp_path, 5, model, optimizer, scheduler)
    assert path == stale
    assert load_checkpoint(path, restore_rng=False).step == 5
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-000005"]


def test_saving_an_existing_step_replaces_it(tmp_path):
    model, optimizer, scheduler = _setup()
    _save(tmp_path, 5, model, optimizer, scheduler, data_state={"old": 1})
    path = _save(tmp_path, 5, model, optimizer, scheduler, data_state={"new": 2})
    assert load_checkpoint(path, restore_rng=False).data_state == {"new": 2}
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-000005"]


@pytest.mark.parametrize("error", [
    OSError(errno.ENOSPC, "No space left on device"),
    SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)"),
])
def test_out_of_space(tmp_path, monkeypatch, error):
    model, optimizer, scheduler = _setup()
    first = _save(tmp_path, 1, model, optimizer, scheduler)

    def full(*args, **kwargs):
        raise error

    monkeypatch.setattr(ckpt, "save_file", full)
    with pytest.raises(DiffusmithError, match="no space left on device while saving checkpoint") as info:
        _save(tmp_path, 2, model, optimizer, scheduler)
    assert "step-000002" in str(info.value) and f"last good checkpoint is {first}" in str(info.value)
    monkeypatch.undo()
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-000001"]
    assert load_checkpoint(first, restore_rng=False).step == 1


def test_other_os_errors_are_not_called_out_of_space(tmp_path, monkeypatch):
    model, optimizer, scheduler = _setup()

    def denied(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(ckpt, "save_file", denied)
    with pytest.raises(PermissionError):
        _save(tmp_path, 1, model, optimizer, scheduler)


def test_resolve_resume(tmp_path, caplog):
    with caplog.at_level(logging.INFO):
        assert resolve_resume(tmp_path, "latest") is None
    assert "starting fresh" in caplog.text
    assert resolve_resume(tmp_path, None) is None
    model, optimizer, scheduler = _setup()
    first = _save(tmp_path, 1, model, optimizer, scheduler)
    second = _save(tmp_path, 2, model, optimizer, scheduler)
    assert resolve_resume(tmp_path, "latest") == second
    assert resolve_resume(tmp_path, str(first)) == first
    (second / "COMPLETE").unlink()
    with pytest.raises(DiffusmithError, match=r"incomplete \(interrupted save\?\); use an earlier one or "
                                              "--resume latest"):
        resolve_resume(tmp_path, str(second))
    with pytest.raises(DiffusmithError, match="incomplete"):
        load_checkpoint(second)
    assert resolve_resume(tmp_path, "latest") == first
    with pytest.raises(DiffusmithError, match="not found"):
        resolve_resume(tmp_path, str(tmp_path / "checkpoints" / "step-000009"))
    with pytest.raises(DiffusmithError, match="holds checkpoints"):
        resolve_resume(tmp_path, str(tmp_path))


def test_damaged_checkpoint_is_refused(tmp_path):
    model, optimizer, scheduler = _setup()
    path = _save(tmp_path, 1, model, optimizer, scheduler)
    data = (path / "optimizer.safetensors").read_bytes()
    (path / "optimizer.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(DiffusmithError, match="damaged: optimizer.safetensors"):
        load_checkpoint(path)


def test_optimizer_mismatch_is_a_clear_error(tmp_path):
    model, optimizer, scheduler = _setup()
    path = _save(tmp_path, 1, model, optimizer, scheduler)
    other = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))])
    with pytest.raises(DiffusmithError, match="does not fit this optimizer"):
        load_checkpoint(path, optimizer=other)


class _ScaleHolder:
    """A callable lr lambda whose state holds a function: LambdaLR would store it, JSON cannot."""

    def __init__(self):
        self.curve = math.sqrt

    def __call__(self, step):
        return 1.0


def test_non_json_state_is_refused_before_writing(tmp_path):
    model, optimizer, _ = _setup()
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _ScaleHolder())
    with pytest.raises(DiffusmithError, match=r"lr scheduler state holds a builtins.builtin_function_or_method "
                                              r"at 'lr_lambdas.0.curve'"):
        _save(tmp_path, 1, model, optimizer, scheduler)
    with pytest.raises(DiffusmithError, match="data_state holds a pathlib"):
        _save(tmp_path, 1, model, optimizer, None, data_state={"root": tmp_path})
    with pytest.raises(DiffusmithError, match="extra holds a tensor at 'seed'"):
        _save(tmp_path, 1, model, optimizer, None, extra={"seed": torch.tensor(1)})
    assert not (tmp_path / "checkpoints").exists() or not any((tmp_path / "checkpoints").iterdir())


def test_prune_checkpoints(tmp_path):
    model, optimizer, scheduler = _setup()
    for step in (1, 2, 3, 4):
        _save(tmp_path, step, model, optimizer, scheduler)
    root = tmp_path / "checkpoints"
    (root / "step-000002.tmp-dead").mkdir()
    assert prune_checkpoints(tmp_path, None) == []
    removed = prune_checkpoints(tmp_path, 2)
    assert sorted(p.name for p in removed) == ["step-000001", "step-000002", "step-000002.tmp-dead"]
    assert sorted(p.name for p in root.iterdir()) == ["step-000003", "step-000004"]
    with pytest.raises(DiffusmithError, match="keep_last"):
        prune_checkpoints(tmp_path, 0)


def test_several_processes(tmp_path):
    model, optimizer, scheduler = _setup()
    staging = rng_staging_dir(tmp_path, 7)
    expected = {}
    for rank in (0, 1):  # each process seeds differently and writes its own RNG state
        torch.manual_seed(100 + rank)
        write_rng(staging, rank)
        expected[rank] = torch.rand(3)
    assert save_checkpoint(tmp_path, 7, trainable={}, optimizer=None, lr_scheduler=None, data_state={}, epoch=0,
                           is_main_process=False, num_processes=2) == tmp_path / "checkpoints" / "step-000007"
    assert not (tmp_path / "checkpoints" / "step-000007").exists()  # other processes write nothing
    path = _save(tmp_path, 7, model, optimizer, scheduler, num_processes=2)
    assert {p.name for p in path.glob("rng-*")} == {"rng-0.safetensors", "rng-1.safetensors"}
    assert not staging.exists()
    for rank in (1, 0):
        torch.manual_seed(0)
        load_checkpoint(path, rank=rank)
        assert torch.equal(torch.rand(3), expected[rank])

    write_rng(rng_staging_dir(tmp_path, 8), 0)
    with pytest.raises(DiffusmithError, match=r"process\(es\) \[1\] missing"):
        _save(tmp_path, 8, model, optimizer, scheduler, num_processes=2)


def _as_processes(work, count=2):
    """Run ``work(rank, barrier)`` on ``count`` threads standing in for processes; a barrier that times out
    (someone left waiting) shows up as BrokenBarrierError."""
    meeting = threading.Barrier(count, timeout=30)
    results, errors = {}, {}

    def one(rank):
        try:
            results[rank] = work(rank, meeting.wait)
        except BaseException as error:
            errors[rank] = error

    threads = [threading.Thread(target=one, args=(rank,)) for rank in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not any(isinstance(e, threading.BrokenBarrierError) for e in errors.values()), errors
    return results, errors


def test_several_processes_with_a_barrier(tmp_path):
    model, optimizer, scheduler = _setup()
    staging = rng_staging_dir(tmp_path, 5)
    staging.mkdir(parents=True)
    (staging / "rng-2.safetensors").write_bytes(b"from an older attempt with three processes")

    def work(rank, barrier):
        return _save(tmp_path, 5, model, optimizer, scheduler, is_main_process=rank == 0, rank=rank,
                     barrier=barrier)

    results, errors = _as_processes(work)
    assert not errors
    path = tmp_path / "checkpoints" / "step-000005"
    assert results == {0: path, 1: path}
    assert {p.name for p in path.glob("rng-*")} == {"rng-0.safetensors", "rng-1.safetensors"}
    assert json.loads((path / "state.json").read_text())["num_processes"] == 2
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-000005"]


def test_a_failing_process_leaves_no_one_waiting(tmp_path, monkeypatch):
    model, optimizer, scheduler = _setup()

    def main_fails(rank, barrier):  # the main process refuses the data state
        return _save(tmp_path, 5, model, optimizer, scheduler, data_state={"bad": object()},
                     is_main_process=rank == 0, rank=rank, barrier=barrier)

    results, errors = _as_processes(main_fails)
    assert isinstance(errors[0], DiffusmithError) and results == {1: tmp_path / "checkpoints" / "step-000005"}

    real_write_rng = ckpt.write_rng

    def flaky_write_rng(directory, rank):
        if rank == 1:
            raise RuntimeError("disk of process 1 broke")
        return real_write_rng(directory, rank)

    monkeypatch.setattr(ckpt, "write_rng", flaky_write_rng)

    def work(rank, barrier):
        return _save(tmp_path, 6, model, optimizer, scheduler, is_main_process=rank == 0, rank=rank,
                     barrier=barrier, num_processes=2)

    results, errors = _as_processes(work)
    assert isinstance(errors[1], RuntimeError)
    assert isinstance(errors[0], DiffusmithError) and r"process(es) [1] missing" in str(errors[0])
    assert latest_checkpoint(tmp_path) is None


def test_no_pickle_anywhere(tmp_path, monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("pickle used")

    for module in (pickle, _pickle):
        for name in ("dump", "dumps", "load", "loads", "Pickler", "Unpickler"):
            monkeypatch.setattr(module, name, forbidden)
    monkeypatch.setattr(torch, "save", forbidden)
    monkeypatch.setattr(torch, "load", forbidden)
    model, optimizer, scheduler = _setup()
    _train(model, optimizer, scheduler, _batches(2))
    path = _save(tmp_path, 2, model, optimizer, scheduler)
    _, optimizer2, scheduler2 = _setup()
    load_checkpoint(path, optimizer=optimizer2, lr_scheduler=scheduler2)
    assert scheduler2.state_dict() == scheduler.state_dict()
    with pytest.raises(AssertionError, match="pickle used"):  # the trap is armed
        pickle.dumps(1)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("options", [{"foreach": True}, {"fused": True}, {"capturable": True}])
def test_cuda_resume_is_bit_identical(tmp_path, options):
    def setup(seed):
        torch.manual_seed(seed)
        model = torch.nn.Linear(64, 32).cuda()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1, **options)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, functools.partial(_warmup_cosine, warmup=2, total=8))
        return model, optimizer, scheduler

    def train(model, optimizer, scheduler, steps):
        for _ in range(steps):  # data drawn from the CUDA generator: its state must be restored too
            x, y = torch.randn(16, 64, device="cuda"), torch.randn(16, 32, device="cuda")
            torch.nn.functional.mse_loss(torch.nn.functional.dropout(model(x), 0.2), y).backward()
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)

    model, optimizer, scheduler = setup(0)
    torch.cuda.manual_seed_all(3)
    train(model, optimizer, scheduler, 3)
    path = _save(tmp_path, 3, model, optimizer, scheduler)
    assert "torch.cuda.0" in ckpt.load_file(path / "rng-0.safetensors")
    train(model, optimizer, scheduler, 3)

    resumed, optimizer2, scheduler2 = setup(1)
    torch.cuda.manual_seed_all(4)
    loaded = load_checkpoint(path, optimizer=optimizer2, lr_scheduler=scheduler2)
    with torch.no_grad():
        for name, param in resumed.named_parameters():
            param.copy_(loaded.trainable[name])
    train(resumed, optimizer2, scheduler2, 3)
    for a, b in zip(model.parameters(), resumed.parameters(), strict=True):
        assert (a - b).abs().max().item() == 0
