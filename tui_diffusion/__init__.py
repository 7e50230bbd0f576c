"""tui-diffusion: a terminal-native node-graph front end for Stable Diffusion."""

__version__ = "0.1.0"
