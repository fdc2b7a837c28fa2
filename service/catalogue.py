"""The models the gateway offers: the bundled priors and the site's trained ones, their
cards as the API serves them, and the checks a request's model must pass."""

from __future__ import annotations

from pathlib import Path

from models.registry import ModelError, bundled_models, card_modality, load_card
from service.problems import Problem
from service.settings import Settings


def catalogue(settings: Settings) -> tuple[list[str], list[tuple[str, str]]]:
    """Usable model names (bundled, and model folders whose card reads as a JSON object),
    and (name, reason) for each model folder whose card cannot be read."""
    own, unusable = [], []
    for path in sorted(settings.models.glob("*/card.json")):
        try:
            load_card(path.parent)
        except ModelError as exc:
            reason = str(exc).replace(str(settings.models), "<models>")
            unusable.append((path.parent.name, reason))
        else:
            own.append(path.parent.name)
    return sorted(set(bundled_models()) | set(own)), unusable


def names(settings: Settings) -> list[str]:
    return catalogue(settings)[0]


def public(card: dict) -> dict:
    """A model card as the API serves it: without the long loss curve, and with any absolute
    path (a card trained elsewhere may hold one) cut to its file name."""

    def clean(value):
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        if isinstance(value, list):
            return [clean(v) for v in value]
        if isinstance(value, str) and (value.startswith(("/", "~")) or value[1:3] == ":\\"):
            return Path(value).name
        return value

    return clean({k: v for k, v in card.items() if k != "loss_curve"})


def model_path(name: str, settings: Settings):
    return name if name in bundled_models() else settings.models / name


def summary(name: str, settings: Settings) -> dict:
    card = load_card(model_path(name, settings))
    return {
        "id": name,
        "image_size": card.get("image_size"),
        "steps": card.get("total_steps", card.get("steps")),
        "sde": card.get("sde", {}).get("kind"),
        "links": {"self": f"/v1/models/{name}"},
    }


PATCH_WISE_MAX = 4  # a CT image's side may be up to this many times its prior's (512 for 128)


def check_model(
    name: str, image_size: int | tuple[int, int], settings: Settings, modality: str
) -> dict:
    """The model's card, once the model exists, is usable and fits the modality; a CT image
    of another size than the prior's is reconstructed with the prior applied patch-wise or
    to the whole image (as its card says: docs/benchmarks/larger_images.md), up to
    PATCH_WISE_MAX times its side (docs/benchmarks/speed.md measures 256² with a 128²
    prior; MR images of any size are, as their matrices are rectangular)."""
    if name not in names(settings):
        raise Problem(
            422, "Unknown model", f"model '{name}' not found; see GET /v1/models", "model"
        )
    try:
        card = load_card(model_path(name, settings))
    except ModelError as exc:
        raise Problem(422, "Unusable model", str(exc), "model") from None
    trained_on = card_modality(card, name)
    if trained_on is not None and trained_on != modality:
        raise Problem(
            422,
            "Model modality mismatch",
            f"model '{name}' is a {trained_on.upper()} prior but the spec's modality is "
            f"'{modality}'; choose a {modality.upper()} model (see GET /v1/models)",
            "model",
        )
    trained = int(card.get("image_size") or 0)
    if modality == "ct" and not (image_size == trained or image_size <= PATCH_WISE_MAX * trained):
        limit = PATCH_WISE_MAX * trained
        raise Problem(
            422,
            "Image size too large",
            f"model '{name}' reconstructs CT images up to {limit}² (its {trained}² prior "
            f"applied patch-wise or whole); set the spec's image_size to {limit} or less",
            "spec.image_size",
        )
    return card
