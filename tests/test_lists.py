"""Comma-separated config lists: lists.parse_list and lists.named_list."""

import pytest

from ccdd_jax import CCDDError
from ccdd_jax import lists
from ccdd_jax.method import augment
from ccdd_jax.method import models


def test_parse_list_reads_numbers_and_refuses_a_fraction_as_integer():
  assert lists.parse_list(" a, ,b ") == ("a", "b")
  assert lists.parse_list("0.5,2", float) == (0.5, 2.0)
  with pytest.raises(ValueError, match="'2.5' is not an integer"):
    lists.parse_list("1,2.5", int)


def test_named_list_keeps_order_and_falls_back_to_the_default():
  assert lists.named_list("", "convnet", "f", models.parse_arch) == ["convnet"]
  assert lists.named_list(" alexnet, convnet:none ", "x", "f", models.parse_arch) == [
    "alexnet",
    "convnet:none",
  ]


def test_named_list_names_the_field_and_the_bad_entry_in_one_line():
  with pytest.raises(CCDDError, match=r"^distill.craft_models entry 'lenet': unknown archi") as e:
    lists.named_list("convnet,lenet", "convnet", "distill.craft_models", models.parse_arch)
  assert "\n" not in str(e.value)


def test_named_list_refuses_two_entries_that_parse_alike():
  # "none" and "NONE" are one strategy (no augmentation) written two ways.
  with pytest.raises(CCDDError, match="f lists 'none' twice \\(as 'NONE'\\)"):
    lists.named_list("none,crop,NONE", "crop", "f", augment.parse_strategy)
  assert augment.strategy_list("none,crop", "crop", "f") == ["none", "crop"]
  assert models.eval_architectures("alexnet,convnet", "convnet") == ["convnet", "alexnet"]
