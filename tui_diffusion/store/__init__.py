"""What the program keeps: output images (and, later, run history)."""
