"""r3rl: RL post-training for Mixture-of-Experts LLMs with verified Rollout Routing Replay (R3)."""

__version__ = "0.1.0"
