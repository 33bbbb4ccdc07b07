"""Rule rewards registered by name and their weighted sum."""

from rlctl.rewards.rules import RULES, RewardResult, WeightedRewards

__all__ = ["RULES", "RewardResult", "WeightedRewards"]
