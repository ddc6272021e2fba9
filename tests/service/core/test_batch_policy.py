"""The batch policy from synthetic timing tables and a fake clock: nothing here is timed."""

import pytest

from service.core.batch_policy import BatchPolicy, measure, winning_sizes

# Seconds of one forward by batch size, as a 2-core CPU measures them: 2 wins a little, 3 loses to 2, 4 wins.
CPU_LIKE = {1: 0.100, 2: 0.180, 3: 0.300, 4: 0.340}
LOSING = {1: 0.100, 2: 0.250, 3: 0.400}  # every batch costs more per image than batch 1


@pytest.mark.parametrize(
    ("seconds_by_size", "sizes"),
    [(CPU_LIKE, (1, 2, 4)), (LOSING, (1,)), ({1: 0.1, 2: 0.1, 3: 0.1}, (1, 2, 3)), ({1: 0.1, 2: 0.2}, (1,))],
    ids=["cpu-like", "losing", "gpu-like", "a-tie-is-no-gain"],
)
def test_only_sizes_that_raise_throughput_over_every_smaller_size_are_run(seconds_by_size, sizes):
    assert winning_sizes(seconds_by_size) == sizes


def test_the_policy_is_per_shape_and_max_batch_size_bounds_it():
    policy = BatchPolicy(max_batch_size=3, timings={(640, 640): LOSING, (480, 640): CPU_LIKE})
    assert policy.batch_sizes((640, 640)) == (1,)
    assert policy.batch_sizes((480, 640)) == (1, 2), "4 wins but is above max_batch_size"


def test_an_unmeasured_shape_follows_the_measured_shape_nearest_in_pixels():
    policy = BatchPolicy(max_batch_size=4, timings={(640, 640): LOSING, (384, 640): CPU_LIKE})
    assert policy.batch_sizes((640, 352)) == (1, 2, 4)  # 225,280 px: nearer 245,760 than 409,600
    assert policy.batch_sizes((608, 640)) == (1,)


def test_without_measurements_every_size_up_to_max_batch_size_runs_and_the_policy_says_so():
    policy = BatchPolicy(max_batch_size=4, timings={})
    assert policy.batch_sizes((640, 480)) == (1, 2, 3, 4)
    described = policy.describe()
    assert described["source"] == "configured" and "not measured" in described["note"] and described["shapes"] == []


def test_the_description_holds_the_measured_table():
    described = BatchPolicy(max_batch_size=4, timings={(480, 640): CPU_LIKE}).describe()
    assert described["source"] == "measured"
    [shape] = described["shapes"]
    assert (shape["height"], shape["width"], shape["batch_sizes"]) == (480, 640, [1, 2, 4])
    assert shape["measured"][1] == {"batch_size": 2, "ms": 180.0, "images_per_s": 11.11}


class FakeForward:
    """A forward that records its calls and advances a fake clock by the seconds a table gives."""

    def __init__(self, seconds_by_size):
        self.seconds_by_size = seconds_by_size
        self.now = 0.0
        self.calls = []

    def clock(self):
        return self.now

    def __call__(self, shape, batch_size):
        self.calls.append((shape, batch_size))
        self.now += self.seconds_by_size[batch_size]


# Binary fractions, so that the fake clock's sums are exact: 8, 10.7, 8 and 16 images/s.
EXACT = {1: 0.125, 2: 0.1875, 3: 0.375, 4: 0.25}


def test_measure_times_each_shape_and_size_in_alternating_rounds_after_one_untimed_forward():
    forward = FakeForward(EXACT)
    timings = measure(forward, [(64, 64), (32, 64)], max_batch_size=4, rounds=2, clock=forward.clock)
    assert timings == {(64, 64): EXACT, (32, 64): EXACT}
    sizes = [size for shape, size in forward.calls if shape == (64, 64)]
    assert sizes == [1, 1, 2, 3, 4, 1, 2, 3, 4], "one untimed, then two rounds over the sizes"


def test_measure_stops_a_shape_after_two_losing_sizes_in_a_row():
    forward = FakeForward({1: 0.125, 2: 0.375, 3: 0.5, 4: 0.125})
    timings = measure(forward, [(64, 64)], max_batch_size=4, rounds=1, clock=forward.clock)
    assert timings == {(64, 64): {1: 0.125, 2: 0.375, 3: 0.5}}, "batch 4 is never measured, so never run"


def test_zero_rounds_runs_nothing():
    forward = FakeForward(EXACT)
    assert measure(forward, [(64, 64)], max_batch_size=4, rounds=0, clock=forward.clock) == {}
    assert forward.calls == []
