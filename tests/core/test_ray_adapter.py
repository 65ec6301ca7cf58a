"""The adapter's held actors, on the shared local Ray cluster."""

import os
import time

import pyarrow as pa

from raysel.core.ray_adapter import Resources, held_actors


class Tagged:
    """Each batch's rows tagged with the object that mapped them, and how many batches it had seen."""

    def __init__(self, label: str):
        self.label, self.calls = label, 0

    def __call__(self, batch: pa.Table) -> pa.Table:
        self.calls += 1
        n = batch.num_rows
        return batch.append_column("by", pa.array([f"{self.label}-{os.getpid()}-{id(self)}"] * n)).append_column(
            "calls", pa.array([self.calls] * n)
        )


def freed(ray, cpus: float) -> bool:
    deadline = time.time() + 30  # a killed actor's resources come back asynchronously
    while ray.available_resources().get("CPU", 0) < cpus and time.time() < deadline:
        time.sleep(0.2)
    return ray.available_resources().get("CPU", 0) >= cpus


def test_held_actors_keep_one_stage_object_each_across_rounds_and_return_results_in_order(ray_cluster):
    import ray

    batches = [pa.table({"x": [i, i + 100]}) for i in range(6)]
    with held_actors(Tagged, Resources(actors=2, num_cpus=0.5), label="t") as on_actors:
        first, second = on_actors(batches), on_actors(batches[:2])
        assert ray.available_resources().get("CPU", 0) <= 1.0  # the two actors hold their CPUs while held
    assert freed(ray, cpus=2.0)  # and give them back on exit
    assert [t["x"].to_pylist() for t in first] == [b["x"].to_pylist() for b in batches]  # in the batches' order
    makers = {t["by"][0].as_py() for t in first + second}
    assert len(makers) == 2 and all(m.startswith("t-") for m in makers)  # two objects for both rounds
    assert sum(t["calls"][0].as_py() for t in second) > 2  # the second round's calls continue the first's counts
