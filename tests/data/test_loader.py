import pytest

from gad_ray.data.dataset import DataError
from gad_ray.data.loader import StepLoader
from gad_ray.data.tokenize import TokenizedExample


def examples(n: int) -> list[TokenizedExample]:
    return [TokenizedExample(str(i), [i], [i], False, [], None, {}) for i in range(n)]


def ids(batch: list[TokenizedExample]) -> list[str]:
    return [e.id for e in batch]


def take(loader: StepLoader, n: int) -> list[list[str]]:
    return [ids(loader.next_batch()) for _ in range(n)]


def test_epochs_drop_last_and_reshuffle():
    loader = StepLoader(examples(10), batch_size=3, seed=0)
    assert loader.steps_per_epoch == 3
    epoch0, epoch1 = take(loader, 3), take(loader, 3)
    assert loader.state_dict() == {"epoch": 1, "index": 9, "seed": 0}
    for epoch in (epoch0, epoch1):
        flat = [i for b in epoch for i in b]
        assert len(set(flat)) == 9 and all(len(b) == 3 for b in epoch)  # one left out per epoch
    assert epoch0 != epoch1
    assert ids(loader.next_batch()) == take(StepLoader(examples(10), 3, seed=0), 7)[6]
    assert loader.epoch == 2


def test_deterministic_per_seed_and_no_shuffle():
    a, b = StepLoader(examples(20), 4, seed=5), StepLoader(examples(20), 4, seed=5)
    assert take(a, 12) == take(b, 12)
    assert take(StepLoader(examples(20), 4, seed=6), 5) != take(StepLoader(examples(20), 4, 5), 5)
    plain = StepLoader(examples(5), 2, shuffle=False)
    assert take(plain, 3) == [["0", "1"], ["2", "3"], ["0", "1"]]


def test_iter_runs_across_epochs():
    loader = StepLoader(examples(4), 2, seed=1)
    it = iter(loader)
    got = [ids(next(it)) for _ in range(5)]
    assert got == take(StepLoader(examples(4), 2, seed=1), 5)
    assert loader.epoch == 2


@pytest.mark.parametrize("stop", [1, 2, 3, 4, 6, 7])  # 3 steps per epoch: 3 and 6 are edges
def test_resume_equals_uninterrupted(stop):
    full = take(StepLoader(examples(11), 3, seed=7), 10)
    first = StepLoader(examples(11), 3, seed=7)
    head = take(first, stop)
    state = first.state_dict()
    resumed = StepLoader(examples(11), 3, seed=123)  # the state's seed wins
    resumed.load_state_dict(dict(state))
    assert head + take(resumed, 10 - stop) == full
    assert resumed.seed == 7


def test_state_at_epoch_edge():
    loader = StepLoader(examples(6), 3, seed=2)
    take(loader, 2)
    assert loader.state_dict() == {"epoch": 0, "index": 6, "seed": 2}
    take(loader, 1)
    assert loader.state_dict() == {"epoch": 1, "index": 3, "seed": 2}


def test_errors():
    with pytest.raises(DataError, match="has 3 examples.*fewer than one batch.*=4"):
        StepLoader(examples(3), 4)
    loader = StepLoader(examples(5), 2)
    with pytest.raises(DataError, match=r"missing key\(s\) \['seed'\]"):
        loader.load_state_dict({"epoch": 0, "index": 0})
    with pytest.raises(DataError, match="index 9 is outside a dataset of 5 examples"):
        loader.load_state_dict({"epoch": 0, "index": 9, "seed": 0})
    with pytest.raises(DataError, match="epoch and index must be ints"):
        loader.load_state_dict({"epoch": -1, "index": 0, "seed": 0})
