"""The bundled-prior recipes: their data, and warm-started continuation of training."""

import pytest
import torch

from models.default_priors import RECIPES, mni152_slices


def test_mni152_validation_slab_is_disjoint_from_training_with_a_gap():
    train, val = mni152_slices(32, "train"), mni152_slices(32, "val")
    assert len(train) > 200 and len(val) > 20
    assert float(train.max()) <= 1 and float(train.min()) >= 0
    # No validation slice appears (even nearly) in the training set.
    dist = torch.cdist(val.flatten(1), train.flatten(1)).min(dim=1).values
    assert float(dist.min()) > 0.5


def test_every_recipe_names_its_data_and_licence():
    for recipe in RECIPES.values():
        assert recipe.image_size >= 128 and recipe.data
        for entry in recipe.data:
            assert entry["licence"] and entry["source"] and entry["files"]


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_validation_data_are_in_range(name):
    val = RECIPES[name].make_data(8, 32, "val")
    assert val.ndim == 4 and val.shape[1:] == (1, 32, 32)
    assert float(val.min()) >= 0 and float(val.max()) <= 1
