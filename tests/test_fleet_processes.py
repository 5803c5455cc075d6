"""Two real `xaiserve serve` gateways and two real `xaiserve worker` processes on one Redis:
jobs submitted to one gateway are watched and fetched from the other, and each runs once."""

from __future__ import annotations

import numpy as np
import pytest

from tests.jobs_support import redis_server
from tests.serverutil import server_process
from tests.test_prometheus_scrape import start_worker
from xaiserve.proto.explain.v1 import explainer_pb2 as pb
from xaiserve.service.client import ExplainerClient
from xaiserve.service.tensors import from_tensor, to_tensor


@pytest.mark.slow
def test_two_gateways_two_workers_over_grpc(tiny_store, tmp_path):
    img = pb.Image(tensor=to_tensor(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)))
    with (
        redis_server(tmp_path / "redis") as redis,
        server_process(tiny_store, state_dir=tmp_path / "a", queue=redis.url, job_workers=0) as ga,
        server_process(tiny_store, state_dir=tmp_path / "b", queue=redis.url, job_workers=0) as gb,
    ):
        workers = [start_worker(redis.url, tiny_store, tmp_path / f"w{i}.log")[0] for i in range(2)]
        try:
            with ExplainerClient(ga.address) as a, ExplainerClient(gb.address) as b:
                ids = [
                    a.submit_job(
                        pb.JobRequest(
                            method="relax",
                            model="tiny-encoder",
                            image=img,
                            relax=pb.RelaxParams(num_masks=200, batch_size=20, seed=i),
                        )
                    ).id
                    for i in range(6)
                ]
                for jid in ids:
                    events = list(b.watch_job(jid))  # watched through the other gateway
                    assert events[-1].type == pb.EVENT_SUCCEEDED, events[-1].job.error
                jobs = [b.get_job(jid) for jid in ids]
                assert all(j.state == pb.SUCCEEDED and j.attempts == 1 for j in jobs), [
                    (j.state, j.attempts) for j in jobs
                ]
                assert all(from_tensor(j.result.relax.importance).shape == (32, 32) for j in jobs)
                # the fast path still runs in each gateway itself
                assert b.explain(np.zeros((32, 32, 3), np.uint8), "tiny-nemu").mask.shape == (32, 32)
            logs = "".join((tmp_path / f"w{i}.log").read_text() for i in range(2))
            assert logs.count("job ended") == 6, "each job runs exactly once across the two workers"
        finally:
            for w in workers:
                w.kill()
                w.wait(10)
                w.stdout.close()
