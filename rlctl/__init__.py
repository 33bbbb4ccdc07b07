"""rlctl: fine-tune language models with reinforcement learning (GRPO, RLOO, REINFORCE, …)."""

__version__ = "0.1.0"
