"""Screens of the terminal app: the main screen, help and the pickers."""
