"""ASHA's rungs survive Tuner.restore: Tune unpickles the scheduler as it was when the search began."""

from __future__ import annotations

from ray import cloudpickle  # what Tune writes tuner.pkl with (the scheduler class is local to make_scheduler)

from tune.stopping import RUNGS_FILE, load_rungs, make_scheduler, save_rungs


def first_rung(scheduler) -> dict:
    return scheduler._brackets[0]._rungs[-1][1]  # rungs are kept in reverse order: the last is milestone 1


def test_an_unpickled_scheduler_gets_back_the_recorded_rungs(tmp_path):
    scheduler = make_scheduler("asha", tmp_path, grace_period=1, reduction_factor=2, max_t=4)
    pickled_at_start = cloudpickle.dumps(scheduler)  # what Tuner.restore will unpickle
    first_rung(scheduler).update({"t1": -5.0, "t2": -9.0})
    save_rungs(scheduler._brackets, tmp_path / RUNGS_FILE)
    restored = cloudpickle.loads(pickled_at_start)
    assert first_rung(restored) == {"t1": -5.0, "t2": -9.0}
    # the median of what was recorded before the restore is the cutoff a new trial meets
    assert restored._brackets[0].cutoff(first_rung(restored)) == -7.0


def test_a_new_search_starts_with_empty_rungs_and_another_shape_is_ignored(tmp_path):
    old = make_scheduler("asha", tmp_path, grace_period=1, reduction_factor=2, max_t=4)
    first_rung(old)["t1"] = -5.0
    save_rungs(old._brackets, tmp_path / RUNGS_FILE)
    fresh = make_scheduler("asha", tmp_path, grace_period=1, reduction_factor=2, max_t=4)
    assert not (tmp_path / RUNGS_FILE).exists() and first_rung(fresh) == {}
    save_rungs(old._brackets, tmp_path / RUNGS_FILE)
    other = make_scheduler("asha", tmp_path / "other", grace_period=1, reduction_factor=3, max_t=27)
    load_rungs(other._brackets, tmp_path / RUNGS_FILE)  # milestones 1, 3, 9 vs 1, 2: not merged
    assert all(recorded == {} for _, recorded in other._brackets[0]._rungs)
