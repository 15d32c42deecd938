"""Data sets, image folders, TFDS, the input transform and the on-disk cache."""
