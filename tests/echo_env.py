"""A test environment: answers each of the first two replies with "again" and ends at the third,
so every trajectory holds observation tokens between its replies. A reply containing "ing" earns
0.5 on that turn (the tiny random model writes it now and then, so the advantages are not all 0)."""

from rlctl.envs import Step


class Echo:
    def reset(self, task):
        self.turns = 0
        return task.messages

    def step(self, reply):
        self.turns += 1
        reward = 0.5 if "ing" in reply else 0.0
        if self.turns >= 3:
            return Step(done=True, reward=reward)
        return Step([{"role": "user", "content": "again"}], done=False, reward=reward)
