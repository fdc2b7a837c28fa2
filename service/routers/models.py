"""The models a caller may reconstruct with: the bundled priors and the site's own."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from models.registry import load_card
from service.catalogue import catalogue, model_path, names, public, summary
from service.deps import Caller, Ctx
from service.problems import AUTH_ERRORS, Problem, problem_responses
from service.schemas import ModelList

router = APIRouter(tags=["models"], responses=AUTH_ERRORS)


@router.get("/v1/models", response_model=ModelList)
def list_models(ctx: Ctx, _: Caller) -> dict:
    """The usable models; a model folder whose card cannot be read is listed under
    ``unusable`` with the reason, so one broken folder never hides the others."""
    usable, unusable = catalogue(ctx.settings)
    return {
        "items": [summary(n, ctx.settings) for n in usable],
        "unusable": [{"id": n, "error": why} for n, why in unusable],
    }


@router.get("/v1/models/{name}", response_model=dict[str, Any], responses=problem_responses(404))
def model_card(ctx: Ctx, name: str, _: Caller) -> dict:
    """A model's card: architecture, training, tuned solver settings, measured quality."""
    if name not in names(ctx.settings):
        raise Problem(404, "Not found", f"no model '{name}'; see GET /v1/models")
    return public(load_card(model_path(name, ctx.settings)))
