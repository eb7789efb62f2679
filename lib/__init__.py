"""Shared library of textworld-rl: games, env, prompts, models, losses, rollouts."""
