"""The config schema, its validation, the paper's settings table and the loader."""
