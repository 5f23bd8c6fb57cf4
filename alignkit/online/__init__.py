"""Online methods: the generation handle and its backends, reward functions and scoring, the rollout stage."""
