#!/usr/bin/python3
"""A tensor-parallel group of processes, end to end on the CPU backend: `shardserve-worker --rank 0`
and `--rank 1` of one group (process_per_rank: true), rendezvous through the coordinator, step
messages and collectives over the group's connection (the same code a GPU group runs, with NCCL
for the collectives). The group must give transformers' golden tokens, and a follower that is
stopped (SIGSTOP) or killed must make the group fail loudly within its collective timeout: the
request ends UNAVAILABLE, rank 0 exits saying which rank, nothing hangs. A restarted coordinator
gets the group back from rank 0's re-registration alone.
"""
import json
import os
import signal
import time
import unittest

import grpc

import cluster as cl

pb, pb_grpc = cl.load_stubs()
COLLECTIVE_TIMEOUT_MS = 3000
GOLDEN = json.load(open(os.path.join(cl.TINY, "golden.json")))["prompts"]


class GroupCluster(cl.Cluster):
    """Starts both ranks of the group 'pg'."""

    def start_worker(self, group):
        for rank in (0, 1):
            name = f"worker-{group}" if rank == 0 else f"worker-{group}-rank{rank}"
            self._spawn(name, [os.path.join(cl.BIN_DIR, "shardserve-worker"), "--coordinator", self.worker_address,
                               "--group", group, "--rank", str(rank), "--metrics-port", str(cl.free_port()),
                               "--collective-timeout-ms", str(COLLECTIVE_TIMEOUT_MS), "--shutdown-timeout", "5"],
                        append=name in self.procs)


class ProcessGroup(unittest.TestCase):
    def setUp(self):
        self.cluster = GroupCluster(models={"tiny": (cl.TINY, None)},
                                    groups=[{"name": "pg", "model": "tiny", "tp_size": 2, "process_per_rank": "true",
                                             "num_kv_blocks": 256}]).start()
        self.stub = pb_grpc.GenerationStub(grpc.insecure_channel(self.cluster.address))
        self.leader = self.cluster.procs["worker-pg"]
        self.follower = self.cluster.procs["worker-pg-rank1"]

    def tearDown(self):
        if self.follower.poll() is None:
            self.follower.send_signal(signal.SIGCONT)
        self.cluster.stop()

    def request(self, golden, timeout=60):
        return self.stub.Generate(pb.GenerateRequest(model="tiny", prompt_token_ids=pb.TokenIds(ids=golden["prompt_ids"]),
                                                     max_tokens=len(golden["token_ids"]), temperature=0,
                                                     ignore_eos=True), timeout=timeout)

    def test_two_processes_give_the_golden_tokens(self):
        for g in GOLDEN:
            self.assertEqual(list(self.request(g).token_ids), g["token_ids"])
        self.assertIsNone(self.leader.poll())
        self.assertIsNone(self.follower.poll())

    def test_the_group_serves_again_after_a_coordinator_restart(self):
        """Only rank 0 talks to the coordinator (it registers again every second); the follower is
        attached to rank 0, so a new coordinator gets the whole group back from rank 0 alone."""
        self.assertEqual(list(self.request(GOLDEN[0]).token_ids), GOLDEN[0]["token_ids"])
        self.cluster.restart_coordinator()
        self.stub = pb_grpc.GenerationStub(grpc.insecure_channel(self.cluster.address))
        for g in GOLDEN:
            self.assertEqual(list(self.request(g).token_ids), g["token_ids"])
        self.assertIsNone(self.leader.poll())
        self.assertIsNone(self.follower.poll())

    def assert_group_fails_loudly(self, expect_in_log, within_s):
        start = time.monotonic()
        with self.assertRaises(grpc.RpcError) as err:
            self.request(GOLDEN[2], timeout=within_s + 30)
        self.assertEqual(err.exception.code(), grpc.StatusCode.UNAVAILABLE, err.exception.details())
        self.assertLess(time.monotonic() - start, within_s, "the failure took too long")
        self.leader.wait(timeout=10)  # rank 0 exits so the group can be restarted
        self.assertNotEqual(self.leader.returncode, 0)
        log = self.cluster.logs()
        self.assertRegex(log, expect_in_log)
        self.assertIn("exiting so the group restarts", log)

    def test_a_stopped_follower_fails_the_group_within_the_timeout(self):
        self.assertEqual(list(self.request(GOLDEN[0]).token_ids), GOLDEN[0]["token_ids"])
        self.follower.send_signal(signal.SIGSTOP)
        self.assert_group_fails_loudly(r"rank 1 is stuck or gone", within_s=COLLECTIVE_TIMEOUT_MS / 1000 + 10)

    def test_a_killed_follower_fails_the_group_at_once(self):
        self.assertEqual(list(self.request(GOLDEN[0]).token_ids), GOLDEN[0]["token_ids"])
        self.follower.kill()
        self.follower.wait()
        # The lost connection is seen in the first collective (reading rank 1's part: "is stuck or
        # gone") or the step message before it (sending: "is gone"), well before the timeout.
        self.assert_group_fails_loudly(r"rank 1 is (stuck or )?gone", within_s=COLLECTIVE_TIMEOUT_MS / 1000)


if __name__ == "__main__":
    unittest.main()
