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


def _tiny_recipe(monkeypatch, name: str, n_train: int) -> None:
    """``name``'s recipe, for this test, at 16² on random images with the tiny network."""
    import dataclasses

    from models import default_priors

    tiny = dataclasses.replace(
        RECIPES[name],
        image_size=16,
        n_train=n_train,
        preset="tiny",
        make_data=lambda n, size, split: torch.rand(n, 1, size, size),
    )
    monkeypatch.setitem(default_priors.RECIPES, name, tiny)


def test_a_continued_prior_keeps_its_solver_values_and_drops_its_ood_calibration(
    tmp_path, monkeypatch
):
    """Fine-tuning a prior (a candidate copied from a shipped one) keeps the card's tuned
    solver values, so a comparison runs both at the same settings, and drops the OOD
    calibration fitted to the old weights; it warm-starts and counts its steps on."""
    from models import default_priors
    from models.nets.ncsnpp import build
    from models.registry import load_card, save_model
    from models.sde import VESDE

    _tiny_recipe(monkeypatch, "mri-default", 16)
    sde = VESDE(0.01, 5.0)
    recon = {"mri": {"rho": 1.6, "multicoil": {"tv": 10.0, "intensity_level": 0.7}}}
    card = {"name": "m", "image_size": 16, "total_steps": 7, "recon": recon, "ood": {"x": 1}}
    save_model(tmp_path / "m", build("tiny", sde.sigma), sde, card)
    default_priors.train_default(
        "mri-default", 2, model_dir=tmp_path / "m", runs=tmp_path / "runs", lr=1e-4
    )
    after = load_card(tmp_path / "m")
    assert after["recon"] == recon and "ood" not in after
    assert after["total_steps"] == 9 and after["train_config"]["lr"] == 1e-4


def test_bf16_training_is_warned_against_where_it_is_slow(tmp_path, monkeypatch, capsys):
    from models import default_priors, registry

    _tiny_recipe(monkeypatch, "ct-default", 8)
    monkeypatch.setattr(registry, "bf16_is_fast", lambda device="cpu": False)
    default_priors.train_default(
        "ct-default", 1, bf16=True, model_dir=tmp_path / "m", runs=tmp_path / "runs"
    )
    assert "leave out --bf16" in capsys.readouterr().out
