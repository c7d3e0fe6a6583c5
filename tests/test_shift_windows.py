"""train.shift_windows: every pass over the data cuts its windows at another seeded offset, so
repeated data is never trained in the same windows twice; the order stays a pure function of the
position (exact resume, any number of processes), and a resume that would change it is refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from trainer.config import ConfigError, replace
from trainer.data.loader import BatchLoader, ConcatSamples, TokenSamples, window_shift
from trainer.data.mixture import MixtureOrder
from trainer.job.run import run

T = 8


def shards(tmp_path, sizes: list[int], base: int = 0) -> tuple:
    """Shards whose token at position k of shard s is base + 1000 s + k: a window shows where it was cut."""
    entries = []
    for s, n in enumerate(sizes):
        name = f"train-{base}-{s}.bin"
        (base + 1000 * s + np.arange(n, dtype=np.uint16)).tofile(tmp_path / name)
        entries.append({"name": name, "tokens": n})
    return tmp_path, {"dtype": "uint16", "train": entries}


def test_each_pass_cuts_its_windows_at_its_own_offset_inside_the_shard(tmp_path):
    plain, shifted = TokenSamples(*shards(tmp_path, [100, 50]), "train", T), \
        TokenSamples(*shards(tmp_path, [100, 50]), "train", T, shift_seed=3)
    assert len(plain) == 12 + 6 and len(shifted) == 11 + 5  # one window per shard left for the offset
    ids = np.arange(len(shifted))
    first = shifted.get(ids, np.zeros_like(ids))
    assert np.array_equal(first, plain.get(np.r_[0:11, 12:17]))  # pass 0: the plain windows
    offsets = [window_shift(3, e, T) for e in range(1, 9)]
    assert len(set(offsets)) > 1 and all(0 <= o < T for o in offsets)
    for epoch, offset in zip(range(1, 9), offsets):
        rows = shifted.get(ids, np.full_like(ids, epoch))
        starts = np.r_[np.arange(11) * T, 1000 + np.arange(5) * T] + offset
        assert np.array_equal(rows[:, 0], starts)  # cut at the pass's offset
        assert np.array_equal(rows, starts[:, None] + np.arange(T + 1))  # whole windows of one shard
    assert window_shift(3, 2, T) != window_shift(4, 2, T) or window_shift(3, 3, T) != window_shift(4, 3, T)


def rows(samples, order, per_step: int, world: int, micro: int, position: int, steps: int) -> np.ndarray:
    out = []
    for step in range(steps):
        for rank in range(world):
            loader = BatchLoader(samples, 7, per_step, rank, world, micro, torch.device("cpu"),
                                 position + step * per_step, order=order)
            out += [loader.next().numpy() for _ in range(per_step // world // micro)]
            loader.close()
    return np.concatenate(out)


def test_the_shifted_order_is_the_same_on_any_processes_and_resumes_at_a_position(tmp_path):
    samples = TokenSamples(*shards(tmp_path, [200, 120]), "train", T, shift_seed=7)  # 24 + 14 = 38 windows
    one = rows(samples, None, 8, 1, 8, 0, 20)  # 160 sequences: past 4 passes
    assert np.array_equal(rows(samples, None, 8, 2, 2, 0, 20), one)
    assert np.array_equal(rows(samples, None, 8, 4, 1, 9 * 8, 11), one[9 * 8:])  # a resume at step 9
    first = {tuple(r) for r in one[:38]}
    assert len(first) == 38 and not first & {tuple(r) for r in one[38:76]}  # pass 2: no window again


def test_a_mixture_shifts_each_source_by_its_own_passes(tmp_path):
    a = TokenSamples(*shards(tmp_path, [200]), "train", T, shift_seed=7)
    b = TokenSamples(*shards(tmp_path, [60], base=5000), "train", T, shift_seed=7)  # 6 windows
    order = MixtureOrder(7, [len(a), len(b)], [0.5, 0.5], [0, 0])
    ids, passes = order.sample_ids_and_passes(0, 40)
    assert np.array_equal(ids, order.sample_ids(0, 40))
    from_b = ids >= len(a)
    assert passes[from_b].max() >= 2 and passes[~from_b].max() == 0  # b repeats, a is still in its first pass
    got = rows(ConcatSamples([a, b]), order.sample_ids_and_passes, 8, 1, 8, 0, 5)
    offsets = got[from_b, 0] - 5000 - (ids[from_b] - len(a)) * T
    assert np.array_equal(offsets, [window_shift(7, int(p), T) for p in passes[from_b]])


@pytest.fixture
def shifted_run(tmp_path, tiny_config, single_process):
    cfg = tiny_config(tmp_path, {"run.id": "s", "train.shift_windows": True, "train.max_steps": 4})
    assert run(cfg) == 0
    return cfg


def test_a_run_with_shifted_windows_resumes_and_cannot_switch_them_off(shifted_run):
    assert run(replace(shifted_run, **{"train.max_steps": 6})) == 0  # resumes with the same order
    with pytest.raises(ConfigError) as e:
        run(replace(shifted_run, **{"train.max_steps": 8, "train.shift_windows": False}))
    assert "windows: shifted per pass -> fixed" in str(e.value) and "\n" not in str(e.value)
